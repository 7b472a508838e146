"""What a study prints while it runs.

Tune's ``CLIReporter`` named Ray's temporary session folder as "Result logdir" (not where the
results are) and said nothing of the study's progress. :class:`StudyReporter` prints instead, every
half minute and at the end, one table: a header with the trials by status, the elapsed time and an
estimate of the time left, and a row per trial with its id, searched values, status,
epoch / max epochs and key metrics. Each trial's own epoch lines carry a label,
``[epsilon=1000 7683b80e]`` (:func:`trial_label`), so that lines of concurrent trials can be told
apart.
"""

from __future__ import annotations

import math
import time
from typing import Any

from ray.tune import ProgressReporter

from study.layout import values_label

FINISHED = ("TERMINATED", "ERROR")


def trial_label(trial_id: str, config: dict[str, Any]) -> str:
    """``[epsilon=1000 7683b80e]``: the prefix of a trial's console lines."""
    values = values_label(config)
    return f"[{values} {trial_id}]" if values else f"[{trial_id}]"


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class StudyReporter(ProgressReporter):
    """Tune progress reporter: one status table for the whole study (see the module docstring).

    The time left is the epochs still to run (unfinished and not yet started trials at their
    maximum) at the rate epochs have run since this driver started, so early stopping makes it an
    overestimate.

    Args:
        name: the study's name.
        params: the searched parameters (columns, in the space's units).
        metrics: result keys shown per trial (their last reported value).
        max_epochs: epochs per trial, unless a trial's config searches ``max_epochs``.
        num_samples: trials the study runs in all.
        every_s: seconds between tables (one is always printed at the end).
        max_rows: trial rows per table; unfinished trials first, then the latest finished.
    """

    def __init__(
        self,
        name: str,
        params: list[str],
        metrics: list[str],
        max_epochs: int,
        num_samples: int,
        every_s: float = 30.0,
        max_rows: int = 24,
    ) -> None:
        self.name, self.params, self.metrics = name, list(params), list(metrics)
        self.max_epochs, self.num_samples, self.every_s, self.max_rows = max_epochs, num_samples, every_s, max_rows
        self._start: float | None = None
        self._last = 0.0
        self._baseline: dict[str, int] | None = None  # trial id -> epochs done before this driver started

    def __getstate__(self) -> dict[str, Any]:  # pickled with the tuner: no run-time state
        return {**self.__dict__, "_start": None, "_last": 0.0, "_baseline": None}

    def setup(self, start_time: float | None = None, total_samples: int | None = None, **kwargs: Any) -> None:
        self._start = time.time()
        if total_samples:
            self.num_samples = total_samples

    def should_report(self, trials: list[Any], done: bool = False) -> bool:
        if self._baseline is None:  # the first step: trials restored by a resume carry their epochs
            self._baseline = {t.trial_id: _epoch(t) for t in trials}
            self._last = time.time()
        if done or time.time() - self._last >= self.every_s:
            self._last = time.time()
            return True
        return False

    def report(self, trials: list[Any], done: bool, *sys_info: str) -> None:
        print(self.table(trials, time.time()), flush=True)

    # -----------------------------------------------------------------------------------------
    def table(self, trials: list[Any], now: float) -> str:
        """The status table as text (``now``: the clock, for the elapsed time and the estimate)."""
        counts: dict[str, int] = {}
        for t in trials:
            counts[_status(t)] = counts.get(_status(t), 0) + 1
        waiting = max(0, self.num_samples - len(trials))
        if waiting:
            counts["not started"] = waiting
        elapsed = now - (self._start or now)
        lines = [
            f"== study {self.name}: {self.num_samples} trials ("
            + ", ".join(f"{n} {s}" for s, n in counts.items())
            + f") | {clock(elapsed)} elapsed, "
            + self._time_left(trials, elapsed, waiting)
            + " =="
        ]
        header = ["trial", *self.params, "status", "epoch", *self.metrics, "vs input"]
        rows = [
            [
                t.trial_id,
                *(_cell(t.config.get(p)) for p in self.params),
                _status(t),
                f"{_epoch(t) or '-'}/{self._max_epochs(t)}",
                *(_cell(t.last_result.get(m)) for m in self.metrics),
                _versus(t.last_result or {}),
            ]
            for t in self._shown(trials)
        ]
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            lines.append(
                "  ".join(
                    str(c).rjust(w) if i > 0 else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))
                ).rstrip()
            )
        hidden = len(trials) - len(rows)
        if hidden:
            lines.append(f"... and {hidden} more finished trials (all of them: trials.parquet)")
        return "\n".join(lines)

    def _shown(self, trials: list[Any]) -> list[Any]:
        if len(trials) <= self.max_rows:
            return list(trials)
        unfinished = [t for t in trials if t.status not in FINISHED]
        finished = [t for t in trials if t.status in FINISHED]
        keep = set(map(id, unfinished + finished[len(finished) - max(0, self.max_rows - len(unfinished)) :]))
        return [t for t in trials if id(t) in keep]

    def _max_epochs(self, trial: Any) -> int:
        return int(trial.config.get("max_epochs", self.max_epochs))

    def _time_left(self, trials: list[Any], elapsed: float, waiting: int) -> str:
        if all(t.status in FINISHED for t in trials) and not waiting:
            return "done"
        baseline = self._baseline or {}
        ran = sum(max(0, _epoch(t) - baseline.get(t.trial_id, 0)) for t in trials)
        left = sum(self._max_epochs(t) - _epoch(t) for t in trials if t.status not in FINISHED)
        left += waiting * self.max_epochs
        if ran == 0 or elapsed <= 0:
            return "time left unknown until an epoch ends"
        return f"at most ~{clock(left * elapsed / ran)} left"


def _epoch(trial: Any) -> int:
    epoch = (trial.last_result or {}).get("epoch")
    return int(epoch) if isinstance(epoch, (int, float)) and math.isfinite(epoch) else 0


def _status(trial: Any) -> str:
    """Tune's status, or for a finished trial how it ended: the trainer's ``early_stopped`` or
    ``nan``, or ``stopped`` by the scheduler (ASHA) after an epoch that was not its last."""
    ended = (trial.last_result or {}).get("epoch_status")
    if trial.status != "TERMINATED" or ended not in ("early_stopped", "nan", "running"):
        return trial.status
    return "stopped" if ended == "running" else ended


def _versus(result: dict[str, Any]) -> str:
    """The held-out verdict of a finished trial (:mod:`mriadv.verdict`): ``beats 0.45x``, ``WORSE
    2.03x`` (its model is worse than its own zero-filled input), ``~input 0.98x``; '-' before it."""
    verdict, ratio = result.get("report_vs_input"), result.get("report_vs_input_ratio")
    if not isinstance(verdict, str) or not isinstance(ratio, (int, float)):
        return "-"
    return f"{ {'beats': 'beats', 'worse': 'WORSE', 'unclear': '~input'}.get(verdict, verdict) } {ratio:.2f}x"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else (str(int(value)) if value.is_integer() else f"{value:.4g}")
    return str(value)
