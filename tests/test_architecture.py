"""docs/ARCHITECTURE.md's layer table matches the code's imports."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.helpers import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "prunecxr"


def _layers() -> dict[str, tuple[int, str]]:
    """{module path relative to prunecxr/ (a folder ends in /): (layer, name)} from the table."""
    text = (PROJECT_ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = text.split("<!-- layers:", 1)[1].split("\n\n", 1)[0]
    layers = {}
    for row in re.findall(r"^\| (\d) \| (\w+) \| (.+?) \|", table, re.MULTILINE):
        for module in re.findall(r"`([^`]+)`", row[2]):
            layers[module] = (int(row[0]), row[1])
    return layers


def _place(path: Path, layers: dict) -> tuple[int, str]:
    relative = path.relative_to(PACKAGE).as_posix()
    for module, place in layers.items():
        if relative == module or (module.endswith("/") and relative.startswith(module)):
            return place
    raise AssertionError(f"prunecxr/{relative} is in no layer of docs/ARCHITECTURE.md")


def _module_path(name: str) -> Path:
    parts = name.split(".")[1:]
    folder = PACKAGE.joinpath(*parts)
    return folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")


def _imports(path: Path) -> set[str]:
    """Every module `path` imports (prunecxr's as dotted names, others by their top name)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "prunecxr":
                found |= {f"prunecxr.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def test_every_import_runs_down_the_layers():
    layers, wrong = _layers(), []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer, name = _place(path, layers)
        for imported in _imports(path):
            top = imported.split(".")[0]
            if top == "mlflow" and name != "tracking":
                wrong.append(f"{path.name} imports mlflow (only tracking/ may)")
            if top == "click" and name != "cli":
                wrong.append(f"{path.name} imports click (only the CLI layer may)")
            if top != "prunecxr" or imported == "prunecxr.PrunecxrError":
                continue
            target = _module_path(imported)
            if not target.exists():  # `from prunecxr import tracking`-style names of __init__
                target = PACKAGE / "__init__.py"
            their_layer, their_name = _place(target, layers)
            if their_layer > layer:
                wrong.append(f"{path.relative_to(PACKAGE)} ({name}) imports {imported}")
            if {name, their_name} == {"core", "tracking"}:
                wrong.append(f"{path.relative_to(PACKAGE)} ({name}) imports {imported}")
    assert not wrong, "imports against docs/ARCHITECTURE.md:\n" + "\n".join(wrong)


def test_the_layer_table_names_only_modules_that_exist():
    for module in _layers():
        assert (PACKAGE / module).exists(), f"docs/ARCHITECTURE.md names prunecxr/{module}"
