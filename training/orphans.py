"""What a `refit worker` killed mid-job leaves in its REFIT_HOME, removed when it starts again.

A job of any project runs in `jobs/<id>/` of the worker's home (the dataset, unpacked; the run's temp files),
and its publish builds the version in `tmp/staging-*`; a kill -9 leaves both. At start the worker removes:

- `tmp/staging-*` that no process holds (a publish flocks its staging folder for as long as it runs), and,
  on S3, the files of versions whose publish was cut short, in every project's model (`Store.sweep_orphans`);
- `jobs/<id>/` unless the job may still be running here: its record in the store (under its project's
  records, `projects/NAME/jobs/<id>/job.json`, as the folder's job.json names it) says queued or running (a
  running job without a heartbeat for REFIT_JOB_TTL_SECONDS is recorded failed on this read) and the work
  horse its folder names is a live process of this machine. A worker that was killed took its horse with
  it (PDEATHSIG), so its job's folder goes at the restart, while the record may still say running.
"""
from __future__ import annotations

import logging
import os
import shutil

from core.jobs import ACTIVE, MADE_ID, alive, read_json
from core.projects import Registry
from core.queue import SharedRecords
from core.store import Store

log = logging.getLogger("refit.orphans")
QUEUED_JOB_ID = MADE_ID  # the ids a job is given (core.jobs.new_id); nothing else is touched


class ProjectRecords:
    """The shared job records of every project of one store, each project's opened once, when first needed."""

    def __init__(self, store: Store, queue_url: str):
        self.store, self.queue_url = store, queue_url
        self._open: dict[str, SharedRecords] = {}
        self._names: list[str] | None = None

    def names(self) -> list[str]:
        if self._names is None:
            self._names = Registry(self.store.base).names()
        return self._names

    def of(self, project: str) -> SharedRecords:
        if project not in self._open:
            self._open[project] = SharedRecords(self.store.for_project(project), self.queue_url)
        return self._open[project]

    def get(self, job_id: str, project: str | None = None) -> dict:
        """The job's record in `project`, or, when the folder does not say which (killed before its job.json
        was written), in whichever project has it. KeyError when none does."""
        for name in [project] if project else self.names():
            try:
                return self.of(name).get(job_id)
            except KeyError:
                continue
        raise KeyError(job_id)


def sweep_worker_home(store: Store, records: ProjectRecords) -> list[str]:
    """Returns what was removed."""
    removed = store.sweep_orphans(every_project=True)  # a worker publishes into any project's model
    root = store.home / "jobs"
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir() or not QUEUED_JOB_ID.fullmatch(folder.name) or _may_run_here(folder, records):
            continue
        log.warning("removing the folder of job %s, which no process of this machine runs any more", folder.name)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(str(folder))
    return removed


def _may_run_here(folder, records: ProjectRecords) -> bool:
    job = read_json(folder / "job.json") or {}
    horse = str(job.get("worker") or "").rpartition("/")[2]
    if horse.isdigit() and (int(horse) == os.getpid() or not alive(int(horse))):
        return False  # its horse is gone (a pid alive again by chance only keeps the folder a while longer)
    try:
        status = records.get(folder.name, job.get("project")).get("status")
    except KeyError:
        return False  # the store has no such job
    except Exception as e:  # noqa: BLE001 - the store away: keep it, the next start looks again
        log.warning("job %s: its record cannot be read (%s); its folder is kept", folder.name, e)
        return True
    return status in ACTIVE
