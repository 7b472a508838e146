"""Reading a study's result tables: each trial's best epoch, the best trials, the Pareto front.

Pure pandas on ``trials.parquet``; used by the runner's final summary and by the report.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

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
