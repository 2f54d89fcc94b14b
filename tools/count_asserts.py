"""Count the assert statements and test functions under tests/ at a git revision.

Refactors must not weaken the suite (issue 15: "the assertion count must not drop"): run it on the
revision before and after and compare. ``python tools/count_asserts.py [REV]`` (default HEAD).
"""

from __future__ import annotations

import ast
import subprocess
import sys


def count(rev: str) -> tuple[int, int]:
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "tests"], capture_output=True, text=True,
                           check=True).stdout.split()
    asserts = tests = 0
    for name in names:
        if not name.endswith(".py"):
            continue
        source = subprocess.run(["git", "show", f"{rev}:{name}"], capture_output=True, text=True, check=True).stdout
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Assert):
                asserts += 1
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
                tests += 1
    return asserts, tests


if __name__ == "__main__":
    revision = sys.argv[1] if len(sys.argv) > 1 else "HEAD"
    found_asserts, found_tests = count(revision)
    print(f"{revision}: {found_asserts} assert statements in {found_tests} test functions")
