"""The repository's layout holds: runtime rooms and the one way their imports point."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each room may import the rooms after it, never those before: serve → stage0 → decode → stage → model.
ORDER = ["serve", "stage0", "decode", "stage", "model"]


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved)."""
    package = ["layerline", *path.relative_to(ROOT).with_suffix("").parts[:-1]]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            names.add(".".join([*base, *(node.module or "").split(".")]).strip("."))
    return names


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if parts[:2] == ["layerline", "runtime"] and len(parts) > 2 else None


def test_runtime_root_holds_only_rooms():
    assert sorted(p.name for p in (ROOT / "runtime").glob("*.py")) == ["__init__.py"]
    for room in [*ORDER, "bench"]:
        assert (ROOT / "runtime" / room / "__init__.py").read_text().startswith('"""')


def test_runtime_imports_point_down_the_rooms():
    wrong = []
    for room in ORDER:
        allowed = set(ORDER[ORDER.index(room):])
        for path in (ROOT / "runtime" / room).rglob("*.py"):
            for module in imported_modules(path):
                target = room_of(module)
                if target is not None and target not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not wrong


def test_the_library_never_imports_the_cli_and_the_packager_never_the_runtime():
    wrong = []
    for folder in ("packager", "runtime", "hf_jobs", "proto"):
        for path in (ROOT / folder).rglob("*.py"):
            for module in imported_modules(path):
                if module.startswith("layerline.cli") or (
                        folder == "packager" and module.startswith("layerline.runtime")):
                    wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not wrong


def test_no_two_test_modules_share_a_name():
    # pytest imports test files by their base name (tests/ has no packages): a second one fails
    # the whole run at collection.
    names: dict[str, list[str]] = {}
    for path in (ROOT / "tests").rglob("test_*.py"):
        names.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in names.items() if len(paths) > 1} == {}
