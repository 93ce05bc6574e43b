"""Worker processes exit when the `bentoml serve` supervisor that started them dies.

BentoML's supervisor (a circus arbiter) binds the port and starts the workers, which inherit the listening
socket. When only the supervisor is killed (kill -9, the OOM killer), nothing tells the workers: they keep
the port, so a restart fails with "Address already in use", and a retrain they run goes on to publish and
promote with nobody supervising it. Each worker therefore watches its parent: once the supervisor is gone it
kills its own children (the training process, the warm standby) and exits at once. The training processes
are also tied to their worker by PR_SET_PDEATHSIG (training/jobrun.py), so they go even if this check is late.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

from core.settings import settings

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
    supervisor = settings().supervisor_pid or os.getppid()
    if os.getppid() != supervisor:  # gone before we got here
        _exit(supervisor)

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != supervisor:  # reparented: the supervisor has died
                _exit(supervisor)

    threading.Thread(target=watch, name="refit-lifeline", daemon=True).start()


def bound_shutdown(seconds: float) -> None:
    """In a worker: once SIGTERM (or SIGINT) arrives, give the graceful shutdown `seconds`, then stop.

    Uvicorn waits for every open request before it exits, with no limit unless it is given
    `timeout_graceful_shutdown`; `bentoml serve` passes that only when asked (`--timeout-graceful-shutdown`,
    hidden, and never to dependency services; https://github.com/bentoml/BentoML/issues/4671), and circus
    then waits a day before it kills. One long request (a synchronous POST /retrain) would keep the server
    up for as long as it runs. So the signal handler uvicorn installed is wrapped: it still starts the
    graceful shutdown, and a timer ends the process (and a training process it runs) when time is up.
    Must run in the main thread, after uvicorn has installed its handlers (a service's __init__ does)."""
    if threading.current_thread() is not threading.main_thread():
        log.warning("bounded shutdown not installed: not on the main thread")
        return
    fired = threading.Event()

    def deadline() -> None:
        fired.wait()
        time.sleep(seconds)
        log.error("graceful shutdown took more than %ss; worker %s stops its children and exits",
                  seconds, os.getpid())
        _kill_children()
        os._exit(0)

    threading.Thread(target=deadline, name="refit-shutdown-deadline", daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum, frame, previous=previous):
            fired.set()
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                raise SystemExit(128 + signum)

        signal.signal(sig, handler)


def _kill_children() -> None:
    import psutil  # a dependency of BentoML's

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        children = []
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass


def _exit(supervisor: int) -> None:
    log.error("the bentoml serve supervisor (pid %s) is gone; worker %s stops its children and exits",
              supervisor, os.getpid())
    _kill_children()
    os._exit(1)  # no graceful shutdown: there is no supervisor left to finish it for


def trim_heap() -> None:
    """Give the heap's free pages back to the system. Under concurrent load a worker's Python heap fills with
    request-sized buffers (uploads, decoded images, model inputs) that are freed afterwards, but glibc keeps
    the pages: a replica's RSS rose from 386 to about 680 MB over a benchmark's 18,000 predictions and stayed
    there (docs/benchmarks.md). The batcher calls this when its queue runs empty, at most once a second."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to give back this way
        pass


def _libc():
    import ctypes

    return ctypes.CDLL("libc.so.6")
