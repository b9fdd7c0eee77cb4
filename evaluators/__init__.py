"""safemerge evaluators: evaluation data (templated generator, model-written pipeline), generation backends
(vLLM with in-place weight reload; transformers fallback), judges, and the metrics and objectives of a merge."""

from safemerge.lazy import lazy_exports

_EXPORTS = {
    "OBJECTIVE_DIRECTIONS": "directions",
    "reported_metrics": "directions",
    "generate_datasets": "synthetic",
    "ensure_datasets": "synthetic",
    "load_datasets": "synthetic",
    "save_datasets": "synthetic",
    "run_pipeline": "pipeline",
    "PipelineSettings": "pipeline",
    "GenerationBackend": "generation",
    "VLLMGenerator": "generation",
    "HFGenerator": "generation",
    "open_backend": "generation",
    "RefusalJudge": "judges",
    "GuardJudge": "judges",
    "EvalSet": "objectives",
    "load_eval_set": "objectives",
    "open_judge": "objectives",
    "score": "objectives",
    "evaluate_model_dir": "objectives",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
