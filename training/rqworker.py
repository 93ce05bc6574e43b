"""RQ's worker, made to ride out a Redis outage while it trains, and to start again at once after a crash.

A busy RQ worker renews its registration in Redis every job monitoring interval while it waits for its work
horse (`monitor_work_horse` -> `maintain_heartbeats`). With Redis away that call raises ConnectionError,
which reaches the catch-all of `Worker.work`: the worker quits, and its horse, training a healthy job, dies
with it (PDEATHSIG). An idle worker already retries (`dequeue_job_and_maintain_ttl`). Upstream:
https://github.com/rq/rq/issues/1119 (a Redis failover during a job makes the worker exit) and
https://github.com/rq/rq/issues/35. Nothing the horse does needs Redis (the job's state is in the store), so
here a renewal that fails is logged and tried again at the next interval, and the bookkeeping after the horse
has ended is given up when Redis is away rather than the worker.

A worker killed with kill -9 leaves its registration in Redis for up to RQ's worker TTL, and RQ refuses to
start another worker under that name (`There exists an active worker named ... already`). In a container the
default name, host-pid, is the same on every restart, so the restarts fail in a loop. `free_name` checks the
old registration's liveness first: one made on this host whose process is gone (no such pid, or a pid reused
by a process started after that registration) is retired with RQ's own `register_death`; a live one, or one
of another host, is refused with one line that says which.
"""
from __future__ import annotations

import logging
import socket
import time

import psutil
from redis.exceptions import ConnectionError as RedisDown
from redis.exceptions import TimeoutError as RedisSlow
from rq import Worker

from core.queue import JOB_FUNCTION, OLD_JOB_FUNCTION

log = logging.getLogger("refit.worker")

QUEUE_AWAY = (RedisDown, RedisSlow)


class QueueWorker(Worker):
    """`rq.Worker` whose Redis bookkeeping while (and right after) a job runs survives Redis being away, and
    which runs jobs queued under the job function's old name."""

    _away_since: float | None = None

    def perform_job(self, job, queue, execution):
        # RQ keeps the function a job calls by name and imports it in the work horse (`Job.func`). A job queued
        # before an upgrade names `service.worker.run_queued`, which no longer exists (and the serving package
        # must not import the training code): it runs as the function's new name.
        if job.func_name == OLD_JOB_FUNCTION:
            job.func_name = JOB_FUNCTION
        return super().perform_job(job, queue, execution)

    def maintain_heartbeats(self, job, execution):
        try:
            super().maintain_heartbeats(job, execution)
        except QUEUE_AWAY as e:
            self._away(e, f"job {job.id} trains on")
        else:
            self._back()

    def heartbeat(self, timeout=None, pipeline=None):
        if pipeline is not None:  # queued on a pipeline: its execute() is where Redis is reached
            return super().heartbeat(timeout, pipeline)
        try:
            super().heartbeat(timeout)
        except QUEUE_AWAY as e:
            self._away(e, "retrying")
        else:
            self._back()

    def execute_job(self, job, queue):
        try:
            super().execute_job(job, queue)
        except QUEUE_AWAY as e:
            # Only Redis calls made around the horse can raise here (the renewals while it runs are caught
            # above): RQ's record of the job is left as it is; the job's outcome is in the store.
            if self.horse_pid and psutil.pid_exists(self.horse_pid):
                self.wait_for_horse()
            self._away(e, f"RQ's record of job {job.id} is not updated")

    # Between jobs, in `work`'s loop outside the retrying dequeue: with Redis away these would end the worker
    # too; the dequeue that follows waits for Redis (with RQ's backoff) instead.
    def check_for_suspension(self, burst: bool):
        try:
            super().check_for_suspension(burst)
        except QUEUE_AWAY as e:
            self._away(e, "waiting for it")

    def run_maintenance_tasks(self):
        try:
            super().run_maintenance_tasks()
        except QUEUE_AWAY as e:
            self._away(e, "maintenance put off")

    def _away(self, e: Exception, then: str) -> None:
        if self._away_since is None:
            self._away_since = time.monotonic()
        log.warning("worker %s: the job queue cannot be reached (%s: %s) for %.0f s; %s", self.name,
                    type(e).__name__, e, time.monotonic() - self._away_since, then)

    def _back(self) -> None:
        if self._away_since is not None:
            log.warning("worker %s: the job queue answers again after %.0f s", self.name,
                        time.monotonic() - self._away_since)
            self._away_since = None


def free_name(connection, name: str) -> str | None:
    """None when a worker may register as `name` (retiring a dead worker's registration of this host), else
    why not, in one line."""
    key = Worker.redis_worker_namespace_prefix + name
    if not connection.exists(key) or connection.hexists(key, "death"):
        return None
    old = Worker.find_by_key(key, connection=connection)
    if old is None:  # expired meanwhile
        return None
    here = socket.gethostname()
    if old.hostname != here:
        beat = f"{old.last_heartbeat:%Y-%m-%d %H:%M:%S} UTC" if old.last_heartbeat else "unknown"
        return (f"a worker named {name!r} is registered from host {old.hostname} (pid {old.pid}, last heartbeat "
                f"{beat}); give this one another --name, or wait until that registration expires")
    if _alive(old.pid, old.birth_date):
        return f"a worker named {name!r} is already running on this host (pid {old.pid}); give this one another --name"
    log.warning("worker %s: retiring the registration left by its previous process (pid %s, gone)", name, old.pid)
    old.register_death()
    return None


def _alive(pid: int | None, born) -> bool:
    """Whether the process that made a registration born at `born` still runs: a pid that now belongs to a
    process started after that registration (a restarted container reuses pids) is not it."""
    if not pid:
        return False
    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        return False
    return born is None or started <= born.timestamp() + 1
