"""safemerge zoo: the embedded default, a tiny trained model family (base, aligned, domain experts, a guard)
built on the CPU in minutes, and random Llama-shaped families of real shapes for benchmarks."""

from safemerge.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    build=("MODEL_NAMES", "ZooSpec", "build_zoo", "ensure_zoo", "existing_zoo"),
    random_family=("LlamaShape", "write_random_family"),
)
