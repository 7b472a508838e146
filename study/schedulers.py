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
Tune pickles a scheduler with the study's tuner when the study starts and saves no later state of it,
so a resumed study would start its rungs empty: a restored trial would be judged only against trials
that report after the resume, and more of them would run on than in the uninterrupted study. Both
schedulers of :func:`for_space` refill their rungs, once, before the first trial a resumed driver
adds: from ``trials.parquet``, whose epochs are those of the Tune state the resume starts from
(:class:`study.results.ResultsCallback`), each trial's objectives at each milestone epoch
(:func:`study_tables`, :func:`recorded_epochs`, :func:`refill`), as the rungs had recorded them. Decisions taken before the
stop are not retaken: a stopped trial stays stopped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from study.analysis import pareto_mask
from study.home import home
from study.layout import searched_metric
from study.tables import load_tables


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


def study_tables(study_dir: str | Path | None) -> pd.DataFrame:
    """The trials table (``trials.parquet`` with its journal replayed, :func:`study.tables.load_tables`)
    of the study folder this driver runs (:func:`study.home.home`: a moved folder too); empty for a new
    study (no folder or file) or without ``study_dir``. Read once per refill."""
    if not study_dir or not home(study_dir).is_dir():
        return pd.DataFrame()
    return load_tables(home(study_dir))[0]


def recorded_epochs(rows: pd.DataFrame, metrics: list[str]) -> list[tuple[str, int, list[float]]]:
    """``(trial id, epoch, [value of each metric])`` of every epoch of the trials table ``rows``
    (:func:`study_tables`); [] where it is empty or lacks a metric. A missing value reads as NaN."""
    if rows.empty or not {"trial_id", "epoch", *metrics} <= set(rows.columns):
        return []
    rows = rows[rows["epoch"] > 0]
    return [
        (str(r[0]), int(r[1]), [float(v) if v is not None else math.nan for v in r[2:]])
        for r in rows[["trial_id", "epoch", *metrics]].itertuples(index=False)
    ]


def trial_groups(rows: pd.DataFrame, column: str) -> dict[str, str]:
    """Each trial's :func:`group_name` of ``column`` (``init_from``) in the trials table ``rows``; {} without."""
    if rows.empty or not {"trial_id", column} <= set(rows.columns):
        return {}
    return {str(t): group_name(v) for t, v in rows.groupby("trial_id")[column].first().items()}


def group_name(value: Any) -> str:
    """The rung group of a trial's ``init_from``: ``scratch`` for none (the tables write ``scratch``,
    the trial's config holds None), else the value as a string (``reference``, a checkpoint path)."""
    return "scratch" if value is None or str(value).lower() in ("", "scratch", "null", "none", "nan") else str(value)


def refill(rungs: list[tuple[float, dict[str, Any]]], records: list[tuple[str, int, Any]]) -> int:
    """Record ``records`` (``(trial id, epoch, value)``, each trial's epochs in any order) at the rungs as
    ASHA recorded them, without deciding anything: each epoch, in order, at the highest milestone ≤
    it that does not hold the trial yet, unless a higher one holds it (so at the first epoch ≥ each
    milestone: epoch 3 for a milestone of 2.25); a ``None`` value is not recorded, as ASHA records no
    result without its metrics. What a rung already holds is kept. Returns how many were recorded.
    ``rungs``: ``[(milestone, {trial id: value})]`` with descending milestones, ParetoASHA's or a Ray
    ASHA bracket's ``_rungs``."""
    added = 0
    for trial_id, epoch, value in sorted(records, key=lambda r: r[1]):
        for milestone, recorded in rungs:
            if epoch < milestone:
                continue
            if trial_id not in recorded and value is not None:
                recorded[trial_id] = value
                added += 1
            break
    return added


class _Refilled:
    """Rungs refilled from the study's tables before the first trial a driver adds (see the module's
    docstring); ``_refilled`` is cleared when the scheduler is unpickled, as a resume does."""

    study_dir: str | None = None
    _refilled = False
    refilled = 0  # how many epochs the last refill recorded

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._refilled = False

    def _refill_once(self) -> None:
        if self._refilled:
            return
        self._refilled = True
        try:
            self.refilled = self._refill()
        except Exception as exc:  # noqa: BLE001 - a table it cannot read must not stop the resume
            print(f"warning: ASHA's rungs start empty: the study's tables could not be read ({exc})", flush=True)
            return
        if self.refilled:
            print(f"resume: ASHA's rungs hold {self.refilled} epochs from the study's tables", flush=True)

    def _refill(self) -> int:
        raise NotImplementedError


class ParetoASHA(_Refilled, FIFOScheduler):
    """ASHA over several ``metrics`` (each with its ``modes`` entry, "min" or "max"), one bracket, with
    the rule of :func:`continues`; ``time_attr``, ``max_t``, ``grace_period`` and ``reduction_factor``
    as Ray's ``ASHAScheduler``. A result without every metric, or with a non-finite one, is not
    recorded and the trial goes on. ``study_dir``: the study whose tables refill the rungs on resume.

    ``group``: a config key (``init_from``) whose values keep rungs of their own, so that a trial is
    ranked only against trials that started alike: a trial fine-tuning the reference's ``best.pt`` has
    had the reference's epochs besides its own, and at equal epochs it would dominate every trial from
    scratch, which would all stop at the first rung (the ``frontier`` run before this: all of them)."""

    def __init__(
        self,
        metrics: list[str],
        modes: list[str],
        max_t: int,
        grace_period: int = 1,
        reduction_factor: float = 2,
        time_attr: str = "training_iteration",
        study_dir: str | Path | None = None,
        group: str | None = None,
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
        self.study_dir = str(study_dir) if study_dir else None
        self.group, self.grouped = group, {}  # group name -> its own rungs, like self.rungs

    def rungs_of(self, value: Any = None) -> list[tuple[float, dict[str, np.ndarray]]]:
        """The rungs a trial whose ``group`` key holds ``value`` is ranked in (all trials share
        :attr:`rungs` without a ``group``)."""
        if getattr(self, "group", None) is None:
            return self.rungs
        return self.grouped.setdefault(group_name(value), [(m, {}) for m, _ in self.rungs])

    def _refill(self) -> int:
        rows = study_tables(self.study_dir)
        records = recorded_epochs(rows, self.metrics)
        groups = trial_groups(rows, self.group) if getattr(self, "group", None) else {}
        added = 0
        for value in {groups.get(t) for t, _, _ in records}:
            mine = [(t, e, self._point(dict(zip(self.metrics, v)))) for t, e, v in records if groups.get(t) == value]
            added += refill(self.rungs_of(value), mine)
        return added

    def on_trial_add(self, tune_controller, trial) -> None:
        self._refill_once()
        super().on_trial_add(tune_controller, trial)

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # the metrics are its own; Tune's single metric (None for a multi-objective study) is not

    def _point(self, result: dict[str, Any]) -> np.ndarray | None:
        try:
            values = np.array([float(result[m]) for m in self.metrics])
        except (KeyError, TypeError, ValueError):
            return None
        return values * self.signs if np.isfinite(values).all() else None

    def on_result(self, trial_id: str, t: float, point: np.ndarray | None, group: Any = None) -> str:
        """The rung decision for ``trial_id`` at time ``t`` (ASHA's bookkeeping, Tune-free), among the
        trials of its ``group`` value (:meth:`rungs_of`)."""
        for milestone, recorded in self.rungs_of(group):
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
        action = self.on_result(trial.trial_id, result[self.time_attr], self._point(result), self._group_of(trial))
        self.stopped += action == TrialScheduler.STOP
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict[str, Any]) -> None:
        if result and self.time_attr in result:
            self.on_result(trial.trial_id, result[self.time_attr], self._point(result), self._group_of(trial))

    def _group_of(self, trial) -> Any:
        group = getattr(self, "group", None)  # a scheduler pickled before groups existed has none
        return (getattr(trial, "config", None) or {}).get(group) if group else None

    def debug_string(self) -> str:
        every = self.grouped.values() if getattr(self, "group", None) else [self.rungs]
        rungs = ", ".join(f"{m:g}: {sum(len(g[i][1]) for g in every)} recorded" for i, (m, _) in enumerate(self.rungs))
        return f"Using ParetoASHA over {', '.join(self.metrics)}: {self.stopped} stopped; rungs {rungs}"


class StudyASHA(_Refilled, ASHAScheduler):
    """Ray's ``ASHAScheduler`` (one bracket) whose rungs are refilled on resume from the tables of
    ``study_dir`` (a keyword besides Ray's)."""

    def __init__(self, *args: Any, study_dir: str | Path | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.study_dir = str(study_dir) if study_dir else None

    def _refill(self) -> int:
        records = recorded_epochs(study_tables(self.study_dir), [self._metric])
        rungs = self._brackets[0]._rungs  # Ray 2.x's bracket: [(milestone, {trial id: metric_op * value})]
        return refill(rungs, [(t, e, self._metric_op * v[0] if math.isfinite(v[0]) else None) for t, e, v in records])

    def on_trial_add(self, tune_controller, trial) -> None:
        self._refill_once()
        super().on_trial_add(tune_controller, trial)


def for_space(space, max_epochs: int, study_dir: str | Path | None = None) -> TrialScheduler | None:
    """A space's scheduler (:class:`study.spaces.StudySpace`, ``scheduler: asha``): Ray's ASHA on its one
    objective; with several, :class:`ParetoASHA` on all of them; where the space searches
    ``init_from``, :class:`ParetoASHA` with rungs per value of it (fine-tuning or from scratch). ``None`` for ``scheduler: none``. Both
    are told each objective at the trial's best selection epoch so far (``best_<metric>``), and refill
    their rungs from the tables of ``study_dir`` when the study resumes."""
    if space.scheduler.get("type") != "asha":
        return None
    metrics = [searched_metric(o.metric) for o in space.objectives]
    grace, rf = int(space.scheduler.get("grace_period", 1)), float(space.scheduler.get("reduction_factor", 2))
    group = "init_from" if "init_from" in {p.name for p in space.params} else None
    if len(metrics) > 1 or group:
        modes = [o.mode for o in space.objectives]
        return ParetoASHA(
            metrics, modes, max_t=max_epochs, grace_period=grace, reduction_factor=rf, study_dir=study_dir, group=group
        )
    return StudyASHA(
        time_attr="training_iteration",
        metric=metrics[0],
        mode=space.objectives[0].mode,
        max_t=max_epochs,
        grace_period=grace,
        reduction_factor=rf,
        brackets=1,
        study_dir=study_dir,
    )


__all__ = [
    "ParetoASHA",
    "StudyASHA",
    "continues",
    "for_space",
    "fronts",
    "group_name",
    "recorded_epochs",
    "refill",
    "study_tables",
    "trial_groups",
]
