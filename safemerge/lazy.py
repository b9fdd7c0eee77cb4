"""Lazy re-exports for a layer's `__init__.py`: the public names import their module on first use, so importing
`safemerge.search` (as every Tune trial process does for its trainable) does not load torch, Ray or MLflow."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(
    package: str, **modules: tuple[str, ...]
) -> tuple[list[str], Callable[[str], object], Callable[[], list[str]]]:
    """`__all__`, `__getattr__` and `__dir__` for `package`, whose module `NAME` exports the names `NAME=(...)`."""
    exports = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return sorted(exports), __getattr__, __dir__
