"""The README's commands, executed as written in a clean copy of the repository: a README that
lies fails the build. `make demo` builds its own virtual environment from nothing, as on a fresh
machine; the steps after it run with nothing set but what a person's shell has.

The one command not run here is `make test`: it is the command running this test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
from acceptance_support import REPO, VENV_BIN, http_ready, log_in, stop, wait_until
from prism_support import free_port

#: processes that run until stopped: started in the background, probed, then stopped with SIGTERM
LONG_RUNNING = re.compile(r"^dispatch (web|worker|scheduler)\b")
PASSWORD = "a password long enough for a person"


def shell_blocks(readme: str) -> list[list[str]]:
    """The command lines of every ```sh block, comments stripped."""
    blocks = []
    for body in re.findall(r"```sh\n(.*?)```", readme, flags=re.S):
        lines = [line.split("  #", 1)[0].split(" #", 1)[0].strip() for line in body.splitlines()]
        blocks.append([line for line in lines if line and not line.startswith("#")])
    return blocks


def fresh_machine_env(home: str) -> dict[str, str]:
    """PATH without this test run's virtual environment: the copy must build its own."""
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != VENV_BIN]
    return {"PATH": os.pathsep.join(path), "HOME": home, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def clean_copy(dest: Path) -> Path:
    """The files git would clone (tracked, or new and not ignored): no .venv, no var/, no caches."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def test_readme_quick_start_is_make_demo_and_make_test() -> None:
    blocks = shell_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    assert blocks and blocks[0] == ["make demo", "make test"]


def test_the_acceptance_layer_sets_only_variables_the_readme_documents() -> None:
    """A setting only the tests know about would let this layer pass where a user's deployment fails."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Configuration (environment)", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(DISPATCH_[A-Z0-9_]+)", table))
    used = {
        name
        for path in Path(__file__).parent.glob("*.py")
        for name in re.findall(r"\b(DISPATCH_[A-Z0-9_]+)\b", path.read_text(encoding="utf-8"))
    }
    assert used and used <= documented, sorted(used - documented)


def test_every_readme_command_works_as_written_in_a_clean_copy(tmp_path: Path) -> None:
    blocks = shell_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    copy = clean_copy(tmp_path / "clone")
    env = fresh_machine_env(os.environ.get("HOME", str(tmp_path)))
    quick_start, *after = blocks
    for command in quick_start:
        if command == "make test":
            continue  # this very suite
        done = subprocess.run(command, shell=True, cwd=copy, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stdout + done.stderr

    # the campaign file the README shows is one `dispatch validate` accepts
    for n, example in enumerate(
        re.findall(r"```yaml\n(.*?)```", (copy / "README.md").read_text(encoding="utf-8"), re.S)
    ):
        if example.startswith("id:"):
            (copy / "campaigns" / f"readme-example-{n}.yaml").write_text(example, encoding="utf-8")
            checked = subprocess.run(
                [str(copy / ".venv" / "bin" / "dispatch"), "validate", f"campaigns/readme-example-{n}.yaml"],
                cwd=copy, env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert checked.returncode == 0, checked.stderr
            (copy / "campaigns" / f"readme-example-{n}.yaml").unlink()

    port = free_port()
    for block in after:
        setup = [line for line in block if line.startswith((". ", "source "))]
        steps = [line for line in block if not LONG_RUNNING.match(line)]
        script = "set -euo pipefail\n" + "\n".join(steps) + "\n"
        done = subprocess.run(
            ["bash", "-c", script], cwd=copy, env=env, input=PASSWORD + "\n", capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, f"{script}\nexit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
        for line in block:
            if LONG_RUNNING.match(line):
                probe_long_running(copy, setup, line, {**env, "DISPATCH_WEB_PORT": str(port)}, port, tmp_path)


def probe_long_running(copy: Path, setup: list[str], line: str, env: dict[str, str], port: int, tmp: Path) -> None:
    log = tmp / "process.log"
    proc = subprocess.Popen(
        ["bash", "-c", "\n".join([*setup, "exec " + line])], cwd=copy, env=env, stdout=log.open("w"),
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        if line.startswith("dispatch web"):
            base = f"http://127.0.0.1:{port}"
            wait_until(lambda: http_ready(base), 30, "dispatch web", proc)
            # the account the README's previous step created logs in and sees the demo's run
            client = log_in(base, "alice", PASSWORD)
            page = client.get("/dashboard", headers={"Accept": "text/html"})
            assert page.status_code == 200 and "quarterly-themes" in page.text
            assert httpx.get(base + "/dashboard", follow_redirects=False).status_code == 401
    finally:
        code = stop(proc)
    assert code == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
