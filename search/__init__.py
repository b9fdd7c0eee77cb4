"""safemerge search: the search config, the define-by-run space, samplers, the memory plan and the trial a worker
runs, the Ray Tune driver over an Optuna study, the Pareto front, MLflow tracking, and the test-split evaluation
and registration of the chosen merges."""

from safemerge.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    config=("SearchConfig", "load_config", "parse_config"),
    samplers=("SAMPLERS", "make_sampler"),
    space=("suggest_recipe", "standard_points"),
    searcher=("StudySearcher",),
    plan=("WorkerPlan", "plan_worker", "check_plan", "format_plan"),
    trial=("TrialWorker", "start_workers"),
    driver=("run_search", "worker_pool"),
    pareto=("Point", "pareto_front", "hypervolume"),
    tracking=("Tracker",),
    run=("execute", "format_front", "load_summary"),
    compare=("compare", "format_comparison"),
)
