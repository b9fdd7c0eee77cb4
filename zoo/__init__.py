"""safemerge zoo: the embedded default, a tiny trained model family (base, aligned, domain experts, a guard)
built on the CPU in minutes, and random Llama-shaped families of real shapes for benchmarks."""

from safemerge.lazy import lazy_exports

_EXPORTS = {
    "MODEL_NAMES": "build",
    "ZooSpec": "build",
    "build_zoo": "build",
    "ensure_zoo": "build",
    "existing_zoo": "build",
    "LlamaShape": "random_family",
    "write_random_family": "random_family",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
