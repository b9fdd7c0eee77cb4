"""safemerge: search for merges of expert LLMs that keep domain skill and safety alignment.

The layers live in the repository's top-level folders and install under this namespace: `safemerge.merges`,
`safemerge.evaluators`, `safemerge.zoo`, `safemerge.search`, `safemerge.cluster`. This package itself holds only
what every layer shares: user-facing errors (`safemerge.errors`), atomic files (`safemerge.files`), argument
parsing (`safemerge.arguments`), and the root command line (`safemerge.cli`).
"""

__version__ = "0.1.0"

from pathlib import Path

LAYERS = ("merges", "evaluators", "zoo", "search", "cluster")

# Installed, the layers sit inside this package (setuptools maps merges/ to safemerge/merges, ...). In a copy of
# the source tree that is not installed, such as the working directory `ray job submit --working-dir .` uploads,
# they are this folder's siblings: look there too, so the job runs the code it uploaded, all of it.
_source_tree = Path(__file__).resolve().parent.parent
if (_source_tree / "pyproject.toml").is_file() and all(
    (_source_tree / layer / "__init__.py").is_file() for layer in LAYERS
):
    __path__.append(str(_source_tree))  # noqa: F821 - a package's own __path__
