"""The import contracts: the layers point one way, and nothing imports the pre-namespace module names.

    cli -> cluster -> search -> {merges, evaluators} -> core;  zoo -> evaluators -> core

`merges` and `evaluators` never import each other; `core` is what safemerge/ holds besides the root CLI.
Every import counts, also those inside functions and under TYPE_CHECKING. import-linter cannot check this
tree: its graph builder (grimp) walks a package's own folder, and the layers are folders beside safemerge/.

Run: python scripts/check_layers.py [REPO]; exit code 1 and one line per wrong import when a contract breaks.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

# layer -> the layers it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "merges": {"core"},
    "evaluators": {"core"},
    "zoo": {"evaluators", "core"},
    "search": {"merges", "evaluators", "core"},
    "cluster": {"search", "merges", "evaluators", "zoo", "core"},
    "cli": {"cluster", "search", "merges", "evaluators", "zoo", "core"},
}
LAYER_FOLDERS = ("merges", "evaluators", "zoo", "search", "cluster")
# Folders whose code may import any layer, but only under the namespace.
FREE_FOLDERS = ("tests", "benchmarks", "scripts")
OLD_TOP_LEVEL = {"common", *LAYER_FOLDERS}


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name under the namespace, or None for third-party modules."""
    parts = module.split(".")
    if parts[0] != "safemerge":
        return None
    if len(parts) == 1:
        return "core"
    if parts[1] in LAYER_FOLDERS:
        return parts[1]
    return "cli" if parts[1] == "cli" else "core"


def source_layer(repo: Path, path: Path) -> str | None:
    """The layer a source file belongs to; None for tests, benchmarks and scripts."""
    top = path.relative_to(repo).parts[0]
    if top in LAYER_FOLDERS:
        return top
    if top == "safemerge":
        return "cli" if path.name == "cli.py" else "core"
    return None


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in a file; relative imports are the file's own layer."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            for alias in node.names:  # `from safemerge import cli` imports safemerge.cli
                if node.module == "safemerge":
                    yield node.lineno, f"safemerge.{alias.name}"


def python_files(repo: Path) -> Iterator[Path]:
    for folder in ("safemerge", *LAYER_FOLDERS, *FREE_FOLDERS):
        yield from sorted((repo / folder).rglob("*.py"))


def violations(repo: Path) -> list[str]:
    """One line per import that breaks a contract, naming the file, the line, the import and the rule."""
    repo = Path(repo)
    found = []
    for path in python_files(repo):
        where = path.relative_to(repo)
        layer = source_layer(repo, path)
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            if top in OLD_TOP_LEVEL:
                found.append(f"{where}:{line}: imports {module!r}; the layers install as safemerge.{top}")
                continue
            target = layer_of(module)
            if layer is None or target is None or target == layer or target in ALLOWED[layer]:
                continue
            allowed = ", ".join(sorted(ALLOWED[layer])) or "nothing"
            found.append(
                f"{where}:{line}: {layer} imports {module} ({target}); {layer} may import only {allowed}. "
                "Move the code to the layer that owns it, or pass what it needs in from above."
            )
    return found


def main(argv: list[str]) -> int:
    repo = Path(argv[0]) if argv else Path(__file__).resolve().parents[1]
    found = violations(repo)
    for line in found:
        print(line)
    checked = sum(1 for _ in python_files(repo))
    print(f"layers: {len(found)} wrong imports in {checked} files" if found else f"layers: {checked} files, all ok")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
