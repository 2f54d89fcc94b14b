"""Run a benchmark module and record what it prints (markdown) as its own section of docs/benchmarks.md.

``python -m tests.bench.record "Title" tests.bench.bench_cache --entries 100000``
"""

from __future__ import annotations

import platform
import subprocess
import sys

from tests.bench.run import write_section


def main() -> None:
    title, module, *args = sys.argv[1:]
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, check=True)
    command = " ".join(["python -m", module, *args])
    section = (f"## {title}\n\nCommand: `{command}` ({platform.machine()}, run by `make bench`).\n\n"
               f"{out.stdout.strip()}\n")
    print(section)
    write_section(f"bench:{module.rsplit('.', 1)[-1]}", section)


if __name__ == "__main__":
    main()
