"""safemerge cluster: deployment on top of the search: the `ray job submit` entrypoint (`safemerge.cluster.job`),
a local cluster (Ray head + MLflow server on 127.0.0.1), the nightly watcher for new expert releases, and the
KubeRay and cron manifests (cluster/k8s/)."""

from safemerge.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    local=("ClusterOptions", "up", "status", "down"),
    nightly=("run_nightly",),
    jobs=("job_client", "search_entrypoint"),
)
