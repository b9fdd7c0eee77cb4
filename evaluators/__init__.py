"""safemerge evaluators: evaluation data (templated generator, model-written pipeline, import of users' files and
datasets), generation backends (vLLM with in-place weight reload; transformers fallback), judges, and the metrics
and objectives of a merge."""

from safemerge.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    directions=("OBJECTIVE_DIRECTIONS", "reported_metrics"),
    synthetic=("generate_datasets", "ensure_datasets", "load_datasets", "save_datasets"),
    imports=("ImportRequest", "import_datasets"),
    pipeline=("run_pipeline", "PipelineSettings"),
    generation=("GenerationBackend", "VLLMGenerator", "HFGenerator", "open_backend"),
    judges=("RefusalJudge", "GuardJudge"),
    objectives=("EvalSet", "load_eval_set", "open_judge", "score", "evaluate_model_dir"),
)
