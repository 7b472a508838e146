"""Reading a study's result tables: each trial's best epoch, the best trials, the Pareto front,
statuses and error messages.

Pure pandas on ``trials.parquet`` (and ``robustness.parquet``), with the verdicts' words of
:mod:`mriadv.verdict` (standard library); the one place both the runner's final summary and the report
compute these.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mriadv.verdict import VERDICT_WORDS

FINISHED = ("completed", "early_stopped")


def best_epochs(trials: pd.DataFrame, by: str = "val_loss") -> pd.DataFrame:
    """One row per trial: the epoch with the lowest ``by`` (the early-stopping criterion, whose
    networks are the trial's ``best.pt``). Trials without a finite ``by`` are left out."""
    if trials.empty or by not in trials:
        return trials.iloc[0:0]
    ok = trials[np.isfinite(trials[by].astype(float))]
    if ok.empty:
        return ok
    idx = ok.groupby("trial_id")[by].idxmin()
    return ok.loc[idx.values].sort_values("trial_id").reset_index(drop=True)


def finished_trials(trials: pd.DataFrame) -> set[str]:
    """Trials whose trainer finished its own schedule (all epochs, or early stopping by patience);
    trials stopped by ASHA or still running are not, and are kept out of Pareto fronts."""
    if trials.empty or "epoch_status" not in trials:
        return set()
    last = trials.sort_values("epoch").groupby("trial_id").tail(1)
    return set(last.loc[last["epoch_status"].isin(FINISHED), "trial_id"])


def best_trials(rows: pd.DataFrame, objectives: list[tuple[str, str]]) -> dict[str, pd.Series]:
    """For each objective ``(metric, mode)``, the row that optimises it."""
    out = {}
    for metric, mode in objectives:
        if metric not in rows or rows[metric].isna().all():
            continue
        idx = rows[metric].idxmin() if mode == "min" else rows[metric].idxmax()
        out[metric] = rows.loc[idx]
    return out


def pareto_mask(values: np.ndarray, modes: list[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``values`` ``(n, k)`` (NaN rows never on the front)."""
    signs = np.array([1.0 if m == "min" else -1.0 for m in modes])
    v = values * signs
    n = len(v)
    mask = np.isfinite(v).all(axis=1)
    for i in range(n):
        if not mask[i]:
            continue
        dominated = np.all(v <= v[i], axis=1) & np.any(v < v[i], axis=1) & np.isfinite(v).all(axis=1)
        if dominated.any():
            mask[i] = False
    return mask


def pareto_front(rows: pd.DataFrame, finished: np.ndarray, objectives: list[tuple[str, str]]) -> np.ndarray:
    """Boolean mask ``(n,)`` of the ``rows`` (one per trial, e.g. from :func:`best_epochs`) on the
    Pareto front of ``objectives`` ``(metric, mode)``, taken among the ``finished`` rows ``(n,)``
    only: an unfinished trial is never on the front, nor does it push a finished one off it."""
    front = np.zeros(len(rows), bool)
    if finished.any():
        values = rows[[metric for metric, _ in objectives]].to_numpy(float)
        front[finished] = pareto_mask(values[finished], [mode for _, mode in objectives])
    return front


def trial_status(trials: pd.DataFrame) -> pd.Series:
    """Each trial's current status (that of its last row: ``TERMINATED``, ``ERROR``, ``RUNNING``,
    ``early_stopped`` or ``nan``), indexed by trial id."""
    if trials.empty or "status" not in trials:
        return pd.Series(dtype=object)
    last = trials.sort_values("epoch", kind="stable").groupby("trial_id").tail(1)
    return last.set_index("trial_id")["status"].fillna("").sort_index()


def at_best_epochs(best: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a table keyed by ``(trial_id, epoch)`` (e.g. ``robustness.parquet``) at each
    trial's best epoch, as given by :func:`best_epochs`."""
    if best.empty or table.empty or not {"trial_id", "epoch"} <= set(table):
        return table.iloc[0:0]
    keys = best[["trial_id", "epoch"]].astype({"epoch": int})
    return table.astype({"epoch": int}).merge(keys, on=["trial_id", "epoch"]).reset_index(drop=True)


def identical_trials(trials: pd.DataFrame, by: str = "val_loss") -> list[list[str]]:
    """Groups (of two or more) of trials whose ``by`` is exactly equal at every epoch: runs that
    the searched values did not change (e.g. a budget that never bound the perturbation)."""
    if trials.empty or by not in trials:
        return []
    rows = trials[trials["epoch"] > 0].sort_values(["trial_id", "epoch"])
    curves = rows.groupby("trial_id").apply(lambda g: tuple(zip(g["epoch"], g[by])), include_groups=False)
    groups: dict[tuple, list[str]] = {}
    for trial_id, curve in curves.items():
        if curve and all(np.isfinite(v) for _, v in curve):
            groups.setdefault(curve, []).append(str(trial_id))
    return [ids for ids in groups.values() if len(ids) > 1]


def trial_messages(trials: pd.DataFrame) -> pd.Series:
    """Each trial's last recorded message (a failed trial's error, why a trial stopped), indexed by
    trial id; trials that recorded none are left out."""
    if trials.empty or "message" not in trials:
        return pd.Series(dtype=object)
    return trials.dropna(subset=["message"]).groupby("trial_id")["message"].last().astype(str)


def failed_trials(trials: pd.DataFrame) -> dict[str, str]:
    """``{trial id: its error message}`` for the trials whose status is ``ERROR``, ordered by id."""
    statuses, messages = trial_status(trials), trial_messages(trials)
    return {t: messages.get(t, "") for t in statuses[statuses == "ERROR"].index}


def input_verdicts(trials: pd.DataFrame) -> pd.DataFrame:
    """Per trial with a held-out evaluation, its model against its zero-filled input
    (:mod:`mriadv.verdict`): ``verdict`` ('beats', 'worse', 'unclear'), ``ratio`` (NMSE over the
    input's) and ``ratio_se``, indexed by trial id; empty for tables written before the verdict."""
    if trials.empty or "report_vs_input" not in trials:
        return pd.DataFrame(columns=["verdict", "ratio", "ratio_se"])
    rows = trials[trials["report_vs_input"].notna() & (trials["report_vs_input"] != "")]
    last = rows.sort_values("epoch").groupby("trial_id").last()
    return pd.DataFrame(
        {
            "verdict": last["report_vs_input"].astype(str),
            "ratio": last["report_vs_input_ratio"].astype(float),
            "ratio_se": last["report_vs_input_ratio_se"].astype(float),
        }
    )


def behind_input(versus: pd.DataFrame, ratios: bool = False) -> tuple[str, str] | None:
    """The models of :func:`input_verdicts` that do not beat their zero-filled input, for the sentence
    the runner's summary and the report's each write: ``("2 of 5", "t1 (worse than its input), t2 (not
    distinguishable from its input)")``, the count and every such trial with its verdict in words (and,
    with ``ratios``, its NMSE ratio: ``t1 (worse than its input, 2.03x)``); None when every model beats it."""
    behind = [t for t, v in versus["verdict"].items() if v != "beats"]
    if not behind:
        return None

    def entry(t: str) -> str:
        ratio = f", {versus.loc[t, 'ratio']:.2f}x" if ratios else ""
        return f"{t} ({VERDICT_WORDS[versus.loc[t, 'verdict']]}{ratio})"

    return f"{len(behind)} of {len(versus)}", ", ".join(entry(t) for t in behind)
