#!/usr/bin/env python3
"""Message rendering: renders per second through the bounded sandbox, and the cost of refusing a bomb.

Prints renders per second of each shipped template through ``Composer.render`` (sandbox,
character checks, SMS parts), then the time and peak RSS of `dispatch validate` on a
605-byte alias-bomb campaign and on a template asking for 300,000,000 characters.

    .venv/bin/python bench/bench_render.py [--renders 20000]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dispatcher.templates import Composer, load

ROOT = Path(__file__).resolve().parent.parent
BOMB = "\n".join(
    ['  a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
)
HEAD = "id: drill\ntitle: 演练\nowner: 公安分局\n"


def renders(n: int) -> None:
    for name in ("themes/brushing.sms.j2", "groups/retirees.sms.j2"):
        source = load(ROOT / "templates", name)
        composer = Composer(source, "【常州经开区反诈中心】", "回T退订", {"hotline": "96110"}, {})
        started = time.perf_counter()
        for i in range(n):
            composer.render({"name": f"居民{i}", "district": "横林镇", "grid": "HL-01"})
        seconds = time.perf_counter() - started
        print(f"{name}: {n / seconds:,.0f} renders/s ({seconds / n * 1e6:.1f} µs each)")


def refused(label: str, campaign: str, template: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "campaigns").mkdir()
        subprocess.run(["cp", "-r", str(ROOT / "templates"), str(root)], check=True)
        if template is not None:
            (root / "templates" / "bomb.sms.j2").write_text(template, encoding="utf-8")
        path = root / "campaigns" / "drill.yaml"
        path.write_text(campaign, encoding="utf-8")
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "dispatcher", "validate", str(path)],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=300,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "DISPATCH_DATABASE_URL": f"sqlite:///{root}/d.db"},
        )
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        print(
            f"{label}: exit {result.returncode} in {seconds:.2f} s, peak RSS {max(peak, before) / 1024:.0f} MB: "
            f"{result.stderr.strip().splitlines()[-1][:120] if result.stderr.strip() else ''}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--renders", type=int, default=20000)
    args = parser.parse_args()
    renders(args.renders)
    refused("alias bomb (605 bytes)", HEAD + "template: themes/brushing.sms.j2\nvariables:\n" + BOMB + "\n")
    refused(
        'template {{ "a" * 300000000 }}',
        HEAD + 'template: bomb.sms.j2\nvariables: {hotline: "96110"}\n',
        '{{ "a" * 300000000 }}{{ hotline }}',
    )


if __name__ == "__main__":
    main()
