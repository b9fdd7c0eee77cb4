"""Fixtures of the fast tier: quiet Optuna, and a merge engine over the tiny family of `support`."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from .support import write_tiny_family

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def tiny_family(tmp_path: Path) -> dict[str, Path]:
    return write_tiny_family(tmp_path / "family")


@pytest.fixture
def engine(tiny_family: dict[str, Path]):
    """A merge engine holding the tiny family: base, aligned and medical."""
    from safemerge.merges.engine import MergeEngine

    experts = {role: folder for role, folder in tiny_family.items() if role != "base"}
    return MergeEngine(tiny_family["base"], experts, base_name="base", device="cpu")
