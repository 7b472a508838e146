"""Bookkeeping of the Ray processes a study driver starts, so that none outlive it.

When the driver is killed (SIGKILL, a crashed terminal), some of Ray's processes keep running
(RuntimeEnvAgent and DashboardAgent ignore SIGTERM). The driver records the process ids of all its
descendants, with their start times, in ``results/<name>/.ray_processes`` (JSON); the next run of
the same study kills those that are still alive (and still the same processes), by PID only: never
``ray stop`` or a kill by name, which would hit every Ray process on the host.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from study.layout import PIDFILE


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, from /proc (Linux); None for a
    process that is gone or a zombie (dead, waiting to be reaped)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def descendants(root: int | None = None) -> dict[int, int]:
    """``{pid: start_time}`` of every live descendant of ``root`` (default: this process)."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _stat(int(entry))
            if info is not None:
                children.setdefault(info[0], []).append(int(entry))
                starts[int(entry)] = info[1]
    out, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid in starts and pid not in out:
            out[pid] = starts[pid]
            todo.extend(children.get(pid, []))
    return out


class ProcessRecord:
    """The study's record of its Ray processes."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / PIDFILE
        self.known: dict[int, int] = {}

    def update(self) -> None:
        """Add this driver's current descendants to the record (cheap: one scan of /proc)."""
        current = descendants()
        if set(current.items()) - set(self.known.items()):
            self.known.update(current)
            tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({str(p): s for p, s in self.known.items()}))
            os.replace(tmp, self.path)

    def kill_leftovers(self, grace_s: float = 3.0) -> list[int]:
        """Kill the recorded processes of an earlier driver that are still alive; returns their pids."""
        if not self.path.is_file():
            return []
        try:
            recorded = {int(p): int(s) for p, s in json.loads(self.path.read_text()).items()}
        except (ValueError, OSError):
            recorded = {}
        alive = [pid for pid, start in recorded.items() if (_stat(pid) or (0, -1))[1] == start and pid != os.getpid()]
        for pid in alive:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_stat(p) for p in alive):
            time.sleep(0.1)
        for pid in alive:
            if _stat(pid) is not None:
                _signal(pid, signal.SIGKILL)
        self.path.unlink(missing_ok=True)
        return alive

    def kill_remaining(self) -> list[int]:
        """After ``ray.shutdown()``: kill recorded processes of this driver that did not exit."""
        return self.kill_leftovers(grace_s=2.0)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
