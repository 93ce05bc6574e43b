"""The warm standby's socket protocol, both ends of it: the server worker that hands a job over
(`service/jobs.py`) and the training process that waits for one (`training/jobrun.py`).

The standby listens on a unix socket in the jobs folder. A worker connects and sends the job's folder as
one line; the standby answers with its pid, one line, closes the socket (one job per standby) and runs the
job. A connection that is refused means there is no standby to take it: the job starts a fresh process.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

SOCKET_NAME = ".standby.sock"


def address(jobs_root: Path) -> Path:
    return jobs_root / SOCKET_NAME


def hand_over(address: Path, job_dir: Path) -> int | None:
    """Give the job to the standby listening at `address`: its pid once it has taken the job (after its
    warm-up, if that is still going on), or None when there is none to take it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        try:
            conn.connect(str(address))
            conn.sendall(f"{job_dir}\n".encode())
            reply = conn.makefile("r").readline().strip()
        except OSError:  # no standby listening (none started, or it has taken a job), or it died
            return None
    return int(reply) if reply.isdigit() else None


def listen(address: Path) -> socket.socket:
    """Listen at `address`, bound under a name of its own first and renamed into place, so a worker never
    connects to a socket not yet listening."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = address.with_name(f".standby-{os.getpid()}.sock")
    staging.unlink(missing_ok=True)
    server.bind(str(staging))
    server.listen(1)
    os.replace(staging, address)  # listening from now on: a job handed over during warm-up waits for it
    return server


def take_job(server: socket.socket) -> Path | None:
    """The job folder the first worker to connect sends, answered with this pid; then the socket is closed:
    later connections are refused, and a fresh standby replaces this one. None when the worker sent nothing."""
    conn, _ = server.accept()
    with conn:
        line = conn.makefile("r").readline().strip()
        if not line:
            return None
        conn.sendall(f"{os.getpid()}\n".encode())
    server.close()
    return Path(line)
