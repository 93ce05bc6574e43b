"""Worker processes exit when the `bentoml serve` supervisor that started them dies.

BentoML's supervisor (a circus arbiter) binds the port and starts the workers, which inherit the listening
socket. When only the supervisor is killed (kill -9, the OOM killer), nothing tells the workers: they keep
the port, so a restart fails with "Address already in use", and a retrain they run goes on to publish and
promote with nobody supervising it. Each worker therefore watches its parent: once the supervisor is gone it
kills its own children (the training process, the warm standby) and exits at once. The training processes
are also tied to their worker by PR_SET_PDEATHSIG (service/jobs.py), so they go even if this check is late.
"""
from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger("refit.lifeline")

SUPERVISOR_ENV = "REFIT_SUPERVISOR_PID"  # set by the supervisor's deployment hook, read by its workers
POLL_SECONDS = 0.5


def record_supervisor() -> None:
    """In the supervisor, before it starts the workers: they inherit this environment."""
    os.environ[SUPERVISOR_ENV] = str(os.getpid())


def die_with_supervisor(poll_seconds: float = POLL_SECONDS) -> None:
    """In a worker: start a daemon thread that ends this process when the supervisor is gone. Polling the
    parent pid rather than PR_SET_PDEATHSIG, because that signal follows the supervisor's forking *thread*,
    which BentoML does not promise to keep, and a worker killed by mistake costs a failed request."""
    supervisor = int(os.environ.get(SUPERVISOR_ENV) or os.getppid())
    if os.getppid() != supervisor:  # gone before we got here
        _exit(supervisor)

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != supervisor:  # reparented: the supervisor has died
                _exit(supervisor)

    threading.Thread(target=watch, name="refit-lifeline", daemon=True).start()


def _exit(supervisor: int) -> None:
    import psutil  # a dependency of BentoML's

    log.error("the bentoml serve supervisor (pid %s) is gone; worker %s stops its children and exits",
              supervisor, os.getpid())
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        children = []
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    os._exit(1)  # no graceful shutdown: there is no supervisor left to finish it for
