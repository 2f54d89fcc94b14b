"""The layout rules a reader relies on: router modules stay small, and docs/architecture.md names only
files that exist in this repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
MAX_ROUTER_MODULE_LINES = 500
# A repository path as the doc writes it: a top-level folder, then path characters, not ending in '.'.
_PATH = re.compile(r"(?<![\w./-])((?:protos|libs|services|ops|tools|tests|deploy|docs)/[\w./-]*[\w/])")


def named_paths(text: str) -> set[str]:
    return {m.group(1) for m in _PATH.finditer(text)}


def test_the_path_pattern_finds_what_the_doc_writes() -> None:
    text = "see `services/router/pipeline/admit.py`, libs/chat.py and services/router/migrations; not x/libs/y"
    assert named_paths(text) == {"services/router/pipeline/admit.py", "libs/chat.py", "services/router/migrations"}


def test_every_path_the_architecture_doc_names_exists() -> None:
    paths = named_paths(ARCHITECTURE.read_text(encoding="utf-8"))
    assert len(paths) > 30  # the walk names each stage's module
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_the_architecture_doc_names_no_file_outside_the_repository() -> None:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    assert "../" not in text


def test_the_walk_names_every_pipeline_stage() -> None:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    stages = sorted(p.name for p in (ROOT / "services" / "router" / "pipeline").glob("*.py") if p.name != "__init__.py")
    unnamed = [s for s in stages if f"services/router/pipeline/{s}" not in text]
    assert not unnamed, f"docs/architecture.md does not mention pipeline modules {unnamed}"


def test_no_router_module_is_over_500_lines() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
             for p in (ROOT / "services" / "router").rglob("*.py")}
    assert len(sizes) > 20
    too_long = {p: n for p, n in sizes.items() if n > MAX_ROUTER_MODULE_LINES}
    assert not too_long, f"split these router modules: {too_long}"
