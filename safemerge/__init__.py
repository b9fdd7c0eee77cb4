"""safemerge: search for merges of expert LLMs that keep domain skill and safety alignment.

The layers live in the repository's top-level folders and install under this namespace: `safemerge.merges`,
`safemerge.evaluators`, `safemerge.zoo`, `safemerge.search`, `safemerge.cluster`. This package itself holds only
what every layer shares: user-facing errors (`safemerge.errors`), atomic files (`safemerge.files`), argument
parsing (`safemerge.arguments`), and the root command line (`safemerge.cli`).
"""

__version__ = "0.1.0"
