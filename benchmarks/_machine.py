"""Shared by the benchmarks: how much of the machine other processes used while one measured.

Timings on a shared 2-core machine are only meaningful when nothing else runs; the benchmarks warn
when others took more than a tenth of the CPU during a measurement.
"""

from __future__ import annotations

import os
import resource


def cpu_seconds() -> tuple[float, float] | None:
    """``(busy CPU seconds of the whole machine, CPU seconds of this process and its reaped children)``
    from ``/proc/stat`` and ``getrusage``; None where ``/proc/stat`` is missing (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait
    own = sum(
        getattr(resource.getrusage(who), k)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for k in ("ru_utime", "ru_stime")
    )
    return busy / os.sysconf("SC_CLK_TCK"), own


def others_share(start: tuple[float, float] | None, seconds: float) -> float | None:
    """Fraction of the machine's CPU that other processes used since ``start`` (a :func:`cpu_seconds`)."""
    end = cpu_seconds()
    if start is None or end is None or seconds <= 0:
        return None
    return max(0.0, (end[0] - start[0]) - (end[1] - start[1])) / (seconds * (os.cpu_count() or 1))
