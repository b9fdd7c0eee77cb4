"""safemerge cluster: deployment on top of the search: the `ray job submit` entrypoint (`safemerge.cluster.job`),
a local cluster (Ray head + MLflow server on 127.0.0.1), the nightly watcher for new expert releases, and the
KubeRay and cron manifests (cluster/k8s/)."""

from safemerge.lazy import lazy_exports

_EXPORTS = {
    "ClusterOptions": "local",
    "up": "local",
    "status": "local",
    "down": "local",
    "run_nightly": "nightly",
    "job_client": "jobs",
    "search_entrypoint": "jobs",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
