"""safemerge: search for merges of expert LLMs that keep domain skill and safety alignment.

The layers live in the repository's top-level folders and install under this namespace: `safemerge.merges`,
`safemerge.evaluators`, `safemerge.zoo`, `safemerge.search`, `safemerge.cluster`. This package itself holds only
what every layer shares: user-facing errors (`safemerge.errors`), atomic files (`safemerge.files`), argument
parsing (`safemerge.arguments`), and the root command line (`safemerge.cli`).
"""

__version__ = "0.1.0"

import os
from pathlib import Path

# torch's OpenMP threads spin for about a millisecond after each parallel op (libgomp's default, read when torch
# loads). The merge alternates torch ops with compiled loops on its own thread pool (merges/methods/cpu_kernels.py),
# which the spinning threads slow down by up to 2x on a 2-core machine; a shorter spin keeps back-to-back torch
# ops as fast (della's merge on benchmarks/merge_speed.py's family: 4.5 s -> 3.1 s here). Effective where this
# package is imported before torch, as in safemerge's entry points and workers; a value already set is kept.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

LAYERS = ("merges", "evaluators", "zoo", "search", "cluster")

# Installed, the layers sit inside this package (setuptools maps merges/ to safemerge/merges, ...). In a copy of
# the source tree that is not installed, such as the working directory `ray job submit --working-dir .` uploads,
# they are this folder's siblings: look there too, so the job runs the code it uploaded, all of it.
_source_tree = Path(__file__).resolve().parent.parent
if (_source_tree / "pyproject.toml").is_file() and all(
    (_source_tree / layer / "__init__.py").is_file() for layer in LAYERS
):
    __path__.append(str(_source_tree))  # noqa: F821 - a package's own __path__
