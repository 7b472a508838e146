"""One driver per study folder: ``results/<name>/driver.lock``, held for the driver's life.

Re-running ``study/run.py`` while the study's first driver is still alive (a lost SSH session, a run
under nohup) would otherwise repair Tune's state under the live driver, kill its Ray processes and
append to the same tables and ``optuna.db``. The lock is ``flock(LOCK_EX | LOCK_NB)`` on the file,
which the kernel releases when the holder's last descriptor closes, however it dies: a SIGKILLed
driver leaves nothing stuck, and there is no stale-lock rule to get wrong. The file is opened
non-inheritable (Python's default), so the Ray processes a driver starts do not hold it after it.

The file holds the holder's PID, host and start time, for the refusal message; it is never removed
(removing a flock'ed file lets a second driver lock a new file beside a live holder).

flock on NFS: Linux emulates it with NFS byte-range locks (NLM for v3, the protocol's own for v4),
which work between clients of a server that supports locking, but not with ``nolock`` or
``local_lock=flock``/``all`` mounts, where each client only sees its own locks. Readers (the
report, ``--dashboard``) take no lock. Standard library only.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO

from study.layout import LOCK_FILE


class StudyBusy(Exception):
    """Another live driver holds the study's lock; the message is one line naming it."""


def lock_study(study_dir: Path) -> IO[str]:
    """Take the study's lock (creating ``study_dir`` if needed) and return the open lock file,
    which the caller keeps open for as long as it drives the study (closing it releases the lock).
    Raises :class:`StudyBusy` at once, naming the live holder's PID and host, if another process
    holds it. Touches nothing else in the folder."""
    study_dir.mkdir(parents=True, exist_ok=True)
    path = study_dir / LOCK_FILE
    handle = open(path, "a+")  # noqa: SIM115 - held open for the driver's life; "a+": never truncate a holder's line
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(handle)
        handle.close()
        raise StudyBusy(
            f"study folder {study_dir} is in use by another driver ({holder}); wait for it to finish, or stop "
            "that process, before running this study again (its lock is released when it exits, however it exits)"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def _holder(handle: IO[str], wait_s: float = 1.0) -> str:
    """The holder's line (``pid 1234 on host h since ...``); it writes it just after locking."""
    deadline = time.monotonic() + wait_s
    while True:
        handle.seek(0)
        line = handle.read().strip()
        if line or time.monotonic() > deadline:
            return line or "its PID and host are not written yet"
        time.sleep(0.05)
