"""Refit's Prometheus metrics: the counters each model worker keeps, and the text it adds to BentoML's
`/metrics` (`Refit.__metrics__`): promoted and served versions, the pointer's health, drift per version.
"""
from __future__ import annotations

from core.projects import DEFAULT
from core.settings import settings
from core.store import StoreError
from service.deps import Service
from service.drift import served_report

OTHER = "_other"  # the project label of every project past the named ones


class Counters:
    """The worker's own metrics (BentoML's multiprocess registry pools them across workers)."""

    def __init__(self, max_batch_size: int):
        import prometheus_client as prom  # here, not at import: the worker has set up multiprocess metrics

        self.predictions = prom.Counter("refit_predictions", "Images classified, by version and label",
                                        ["version", "label"])
        self.batch = prom.Histogram("refit_batch_size", "Images per onnxruntime run (adaptive batching)",
                                    buckets=tuple(sorted({1, 2, 4, 8, 16, 32, 64, max_batch_size})))
        self.capture_dropped = prom.Counter("refit_capture_dropped", "Predicted images not captured because "
                                            "the store fell behind, or one image alone was over the capture "
                                            "budget (the predictions were answered)")
        self.retrains = prom.Counter("refit_retrains", "Retrain jobs finished, by status", ["status"])
        self.retrain_seconds = prom.Histogram("refit_retrain_duration_seconds", "Retrain job wall time",
                                              buckets=(10, 30, 60, 120, 300, 600, 1200, 3600, 7200))

        # Per project, bounded: the first REFIT_METRICS_PROJECTS projects this worker serves by name, the rest
        # summed under "_other" (a worker's choice; the series of one project name mean the same on every worker).
        self.project_predictions = prom.Counter("refit_project_predictions", "Images classified, by project",
                                                ["project"])
        self.model_loads = prom.Counter("refit_model_loads", "Versions of projects other than default loaded "
                                        "into a model worker (first request, or again after an eviction)",
                                        ["project"])
        self.model_evictions = prom.Counter("refit_model_evictions", "Loaded versions evicted, least recently "
                                            "used first, to stay within REFIT_MAX_LOADED_MODELS", ["project"])
        self.model_load_seconds = prom.Histogram("refit_model_load_seconds", "Time to load a project's version "
                                                 "(checksum, session, warm-up run)",
                                                 buckets=(0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10))
        self._named: set[str] = set()

    def project_label(self, project: str) -> str:
        if project in self._named:
            return project
        if len(self._named) < settings().metrics_projects:
            self._named.add(project)
            return project
        return OTHER

    def predicted(self, project: str, version: str, label: str) -> None:
        if project == DEFAULT:  # refit_predictions keeps its meaning: the default project's versions and labels
            self.predictions.labels(version=version, label=label).inc()
        self.project_predictions.labels(project=self.project_label(project)).inc()

    def loaded(self, project: str, seconds: float) -> None:
        self.model_loads.labels(project=self.project_label(project)).inc()
        self.model_load_seconds.observe(seconds)

    def evicted(self, project: str) -> None:
        self.model_evictions.labels(project=self.project_label(project)).inc()

    def finished(self, job: dict) -> None:
        """A retrain job ended (the local runner's `on_finish`)."""
        self.retrains.labels(status=job["status"]).inc()
        if job.get("seconds") is not None:
            self.retrain_seconds.observe(job["seconds"])


def text(svc: Service, content: str) -> str:
    """BentoML's metrics text `content`, with Refit's gauges after it."""
    return content + "\n".join(_versions(svc) + _drift(svc)) + "\n"


def _versions(svc: Service) -> list[str]:
    lines = ["# HELP refit_promoted_version_info The promoted version.",
             "# TYPE refit_promoted_version_info gauge"]
    try:
        promoted = svc.store.promoted()
    except StoreError:  # damaged pointer: shown by refit_promoted_pointer_ok and /versions
        promoted = None
    if promoted:
        lines.append(f'refit_promoted_version_info{{version="{promoted}"}} 1')
    lines += ["# HELP refit_worker_version_info The version each model worker of this replica serves.",
              "# TYPE refit_worker_version_info gauge"]
    try:
        workers = svc.board.live(svc.replica)
    except StoreError:
        workers = []  # /versions names the store's problem
    for w in workers:
        lines.append(f'refit_worker_version_info{{replica="{svc.replica}",pid="{w["pid"]}",'
                     f'version="{w.get("version")}"}} 1')
    lines += ["# HELP refit_promoted_pointer_ok 1 when a version is promoted or the store is empty; 0 when "
              "the pointer is damaged or missing beside versions (see GET /versions).",
              "# TYPE refit_promoted_pointer_ok gauge",
              f"refit_promoted_pointer_ok {0 if svc.store.pointer_problem() else 1}"]
    return lines


def _drift(svc: Service) -> list[str]:
    lines = ["# HELP refit_drift_score Drift of recent inputs against the training data, per version: "
             "signal=embedding (distance ratio, about 1 without drift) and signal=labels (total variation of "
             "predicted labels against validation); see GET /drift for the thresholds.",
             "# TYPE refit_drift_score gauge",
             "# HELP refit_drift_flagged 1 when a version's drift score is over its threshold.",
             "# TYPE refit_drift_flagged gauge"]
    for d in served_report(svc)["versions"]:
        if d["available"] and d["window_fill"]:
            v = d["version"]
            lines += [f'refit_drift_score{{version="{v}",signal="embedding"}} {d["embedding"]["score"]}',
                      f'refit_drift_score{{version="{v}",signal="labels"}} {d["labels"]["score"]}',
                      f'refit_drift_flagged{{version="{v}"}} {int(d["flagged"])}']
    return lines
