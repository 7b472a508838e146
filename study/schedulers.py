"""Asynchronous successive halving for several objectives: the early stopping of a multi-objective
study that does not cut away the end of the front it is searching for.

Ray Tune's ``ASHAScheduler`` ranks trials at each rung by one metric. A study of the robustness
frontier (clean NMSE against the degradation PGD causes) told to halve by clean NMSE alone stops
exactly the trials it is looking for: a robust recipe is less accurate at its first rungs by
construction, and a stopped trial never gets its held-out evaluation, so it vanishes from the front.

:class:`ParetoASHA` keeps ASHA's rungs (``grace_period · η^k`` below ``max_t``, one bracket) and its
asynchronous rule (a trial is judged once per rung, against the trials recorded there before it), with
the ranking of MO-ASHA (Schmucker, Donini, Zafar, Salinas & Archambeau, "Multi-objective asynchronous
successive halving", 2021): non-dominated sorting. Of the ``n`` trials at a rung (the new one
included), the fronts that hold the best ``⌈n/η⌉`` go on (:func:`continues`). So a trial that no
other trial at its rung dominates always goes on, the first trial at a rung goes on, and with one
objective the rule is close to ASHA's (it ranks, where ASHA interpolates a percentile of the trials
recorded before: at η = 2 they agree with 0, 1 or 3 of them, and this rule keeps a little more otherwise).

The decision (:func:`fronts`, :func:`continues`) is pure NumPy; :class:`ParetoASHA` is the thin Tune
scheduler around it, and :func:`for_space` picks a space's scheduler (Ray's ASHA for one objective).
Like Ray's ASHA it is pickled with the study's tuner: a resumed study starts its rungs afresh.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from study.analysis import pareto_mask
from study.layout import searched_metric


def fronts(points: np.ndarray) -> np.ndarray:
    """Non-dominated sorting: the front index ``(n,)`` of each row of ``points`` ``(n, k)`` (every
    objective minimised; finite values), 0 for the rows no other row dominates, 1 for those only rows of
    front 0 dominate, and so on."""
    points = np.asarray(points, dtype=np.float64)
    index = np.full(len(points), -1)
    left = np.arange(len(points))
    level = 0
    while left.size:
        first = pareto_mask(points[left], ["min"] * points.shape[1])
        index[left[first]] = level
        left = left[~first]
        level += 1
    return index


def continues(recorded: np.ndarray, point: np.ndarray, reduction_factor: float) -> bool:
    """Whether a trial whose objectives at a rung are ``point`` ``(k,)`` goes on, given those of the
    trials recorded at that rung before it, ``recorded`` ``(m, k)`` (all minimised): its front is among
    the fronts of the best ``⌈n/η⌉`` of the ``n = m + 1`` trials, in the order of their fronts."""
    recorded = np.asarray(recorded, dtype=np.float64).reshape(-1, len(point))
    if recorded.shape[0] == 0:
        return True
    ranks = fronts(np.vstack([recorded, np.asarray(point, dtype=np.float64)]))
    keep = math.ceil(len(ranks) / reduction_factor)
    return bool(ranks[-1] <= np.sort(ranks)[keep - 1])


class ParetoASHA(FIFOScheduler):
    """ASHA over several ``metrics`` (each with its ``modes`` entry, "min" or "max"), one bracket, with
    the rule of :func:`continues`; ``time_attr``, ``max_t``, ``grace_period`` and ``reduction_factor``
    as Ray's ``ASHAScheduler``. A result without every metric, or with a non-finite one, is not
    recorded and the trial goes on."""

    def __init__(
        self,
        metrics: list[str],
        modes: list[str],
        max_t: int,
        grace_period: int = 1,
        reduction_factor: float = 2,
        time_attr: str = "training_iteration",
    ):
        if len(metrics) != len(modes) or not metrics:
            raise ValueError("ParetoASHA: one mode per metric, at least one metric")
        if not (0 < grace_period <= max_t and reduction_factor > 1):
            raise ValueError(
                f"ParetoASHA: need 0 < grace_period <= max_t and reduction_factor > 1, got "
                f"{grace_period}, {max_t}, {reduction_factor}"
            )
        super().__init__()
        self.metrics, self.signs = list(metrics), np.array([1.0 if m == "min" else -1.0 for m in modes])
        self.time_attr, self.max_t, self.rf = time_attr, max_t, float(reduction_factor)
        rungs = int(math.log(max_t / grace_period) / math.log(self.rf) + 1 + 1e-9)
        # descending milestones, each with the minimised objectives recorded there by trial id
        self.rungs: list[tuple[float, dict[str, np.ndarray]]] = [
            (grace_period * self.rf**k, {}) for k in reversed(range(rungs)) if grace_period * self.rf**k < max_t
        ]
        self.stopped = 0

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # the metrics are its own; Tune's single metric (None for a multi-objective study) is not

    def _point(self, result: dict[str, Any]) -> np.ndarray | None:
        try:
            values = np.array([float(result[m]) for m in self.metrics])
        except (KeyError, TypeError, ValueError):
            return None
        return values * self.signs if np.isfinite(values).all() else None

    def on_result(self, trial_id: str, t: float, point: np.ndarray | None) -> str:
        """The rung decision for ``trial_id`` at time ``t`` (ASHA's bookkeeping, Tune-free)."""
        for milestone, recorded in self.rungs:
            if t < milestone:
                continue
            if trial_id in recorded:
                return TrialScheduler.CONTINUE  # judged at its highest rung already
            if point is None:
                return TrialScheduler.CONTINUE
            goes_on = continues(np.array(list(recorded.values())), point, self.rf)
            recorded[trial_id] = point
            return TrialScheduler.CONTINUE if goes_on else TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_result(self, tune_controller, trial, result: dict[str, Any]) -> str:
        if self.time_attr not in result:
            return TrialScheduler.CONTINUE
        if result[self.time_attr] >= self.max_t:
            return TrialScheduler.STOP
        action = self.on_result(trial.trial_id, result[self.time_attr], self._point(result))
        self.stopped += action == TrialScheduler.STOP
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict[str, Any]) -> None:
        if result and self.time_attr in result:
            self.on_result(trial.trial_id, result[self.time_attr], self._point(result))

    def debug_string(self) -> str:
        rungs = ", ".join(f"{m:g}: {len(r)} recorded" for m, r in self.rungs)
        return f"Using ParetoASHA over {', '.join(self.metrics)}: {self.stopped} stopped; rungs {rungs}"


def for_space(space, max_epochs: int) -> TrialScheduler | None:
    """A space's scheduler (:class:`study.spaces.StudySpace`, ``scheduler: asha``): Ray's ASHA on its one
    objective; with several, :class:`ParetoASHA` on all of them. ``None`` for ``scheduler: none``. Both
    are told each objective at the trial's best selection epoch so far (``best_<metric>``)."""
    if space.scheduler.get("type") != "asha":
        return None
    metrics = [searched_metric(o.metric) for o in space.objectives]
    grace, rf = int(space.scheduler.get("grace_period", 1)), float(space.scheduler.get("reduction_factor", 2))
    if len(metrics) > 1:
        modes = [o.mode for o in space.objectives]
        return ParetoASHA(metrics, modes, max_t=max_epochs, grace_period=grace, reduction_factor=rf)
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=metrics[0],
        mode=space.objectives[0].mode,
        max_t=max_epochs,
        grace_period=grace,
        reduction_factor=rf,
    )


__all__ = ["ParetoASHA", "continues", "for_space", "fronts"]
