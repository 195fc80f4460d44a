#!/usr/bin/env python3
"""Run the whole test suite in two parts: most of it ``N`` tests at a time, then the ``slow`` tests one at a time.

Usage: suite.py [--jobs N] [PYTEST ARGS...]; ``make test`` calls it (``TEST_JOBS``, ``PYTEST_ARGS``).

1. The tests not marked ``slow`` (commands, stores, parsing, the web app in-process) in ``N`` pytest-xdist
   processes. Most of their time is spent starting ``dispatch`` subprocesses one after another, with one
   core of two idle: two processes at a time use both. Tests, not files, are handed out (``--dist
   load``): the command-line files are the largest, and whole files left one process with most of the
   work (``tests/test_campaign_validation.py`` with the segments tests: 121 s by file, 80 s by test,
   134 s in one process). A module's fixtures are then built once in each process.
2. The ``slow`` tests (worker and scheduler processes, faults, anything that times what happens within a few
   seconds) in one process, after the rest, so that none of them shares the machine with another test.
   A test that is only long is not marked (the README's commands in a clean copy, each shipped campaign
   through an operator's steps, 10,000 searches of the dashboard): its limits are generous, so it loses
   nothing by sharing the machine, and in part 1 it holds one core of two instead of the whole machine
   (together 170 s of the slow part's 917 s, on a host where the suite took 24 minutes).

Both parts always run; the exit status is the first part's failure, else the second's. A part that selects
nothing (``PYTEST_ARGS`` naming only slow tests, say) does not fail the run. Arguments that choose their own
markers or processes (``-m``, ``-n``), or ``--jobs 1`` (``make test TEST_JOBS=1``), run one plain pytest.
"""

from __future__ import annotations

import subprocess
import sys

from pytest import ExitCode

NO_TESTS = ExitCode.NO_TESTS_COLLECTED


def run_pytest(*args: str) -> int:
    return subprocess.call([sys.executable, "-m", "pytest", *args])


def main(argv: list[str]) -> int:
    jobs = "2"
    if argv[:1] == ["--jobs"]:
        jobs, argv = argv[1], argv[2:]
    if any(a.startswith(("-m", "-n", "--numprocesses")) for a in argv) or jobs in ("0", "1"):
        return run_pytest(*argv)
    parallel = run_pytest("-n", jobs, "--dist", "load", "-m", "not slow", *argv)
    serial = run_pytest("-m", "slow", *argv)
    if parallel == serial == NO_TESTS:
        return NO_TESTS
    for status in (parallel, serial):
        if status not in (0, NO_TESTS):
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
