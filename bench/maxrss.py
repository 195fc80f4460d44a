"""Run a command and report its peak RSS in MB on the last line of stderr.

A tiny parent, so the figure is the command's own: a child forked straight from a large
benchmark process would inherit that process's pages in ru_maxrss before it execs.
"""

from __future__ import annotations

import resource
import subprocess
import sys

if __name__ == "__main__":
    code = subprocess.call(sys.argv[1:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"maxrss_mb={peak:.1f}", file=sys.stderr)
    sys.exit(code)
