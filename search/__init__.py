"""safemerge search: the search config, the define-by-run space, samplers, the trial a worker runs, the Ray Tune
driver over an Optuna study, the Pareto front, MLflow tracking, and the test-split evaluation and registration
of the chosen merges."""

from safemerge.lazy import lazy_exports

_EXPORTS = {
    "SearchConfig": "config",
    "load_config": "config",
    "parse_config": "config",
    "SAMPLERS": "samplers",
    "make_sampler": "samplers",
    "suggest_recipe": "space",
    "standard_points": "space",
    "StudySearcher": "searcher",
    "TrialWorker": "trial",
    "start_workers": "trial",
    "run_search": "driver",
    "worker_pool": "driver",
    "Point": "pareto",
    "pareto_front": "pareto",
    "hypervolume": "pareto",
    "Tracker": "tracking",
    "execute": "run",
    "format_front": "run",
    "load_summary": "run",
    "compare": "compare",
    "format_comparison": "compare",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
