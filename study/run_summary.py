"""What the study runner prints about a study: the closing summary and the trials' statuses.

:func:`summarize` gives the lines printed when a study ends (statuses, the best trial by each
objective at its best epoch, the Pareto front, errors, where everything is); paths in them are
relative to the current folder where they lie below it; :func:`closing_warning` the line it ends
with when no model beats its input, and :func:`summary_and_warning` both from one read of the tables.
No Ray at import: :func:`trial_statuses` imports it when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from mriadv.verdict import VERDICT_WORDS, study_warning
from study.analysis import (
    behind_input,
    best_epochs,
    best_trials,
    failed_trials,
    finished_trials,
    pareto_front,
    trial_status,
    input_verdicts,
)
from study.layout import OPTUNA_FILE, ROBUSTNESS_FILE, TRIALS_FILE, best_checkpoint
from study.spaces import EPSILON_KEYS, StudySpace
from study.tables import load_tables


def summarize(study_dir: Path, space: StudySpace, trials: pd.DataFrame | None = None) -> list[str]:
    """The lines printed at the end of a study: statuses, the best trial by each objective (at
    its best epoch), the Pareto front of finished trials, errors, and where everything is.
    ``trials``: the study's trials table when already read (:func:`study.tables.load_tables`)."""
    trials = load_tables(study_dir)[0] if trials is None else trials
    lines = [f"results: {here(study_dir)}"]
    if trials.empty:
        return lines + ["no trial reported a result"]
    statuses = trial_status(trials).value_counts().to_dict()
    lines.append("trials: " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())))
    best = best_epochs(trials)
    objectives = [(o.metric, o.mode) for o in space.objectives]
    versus = input_verdicts(trials)
    for metric, row in best_trials(best, objectives).items():
        params = ", ".join(
            f"{p.name}={_fmt(row.get('epsilon_ref' if p.name in EPSILON_KEYS else p.name))}" for p in space.params
        )
        lines.append(
            f"best by {metric}: trial {row['trial_id']} ({params}), epoch {int(row['epoch'])}: "
            f"{metric} {row[metric]:.5g}; val nmse {row['val_nmse']:.5f} psnr {row['val_psnr']:.2f} "
            f"ssim {row['val_ssim']:.4f}; checkpoint "
            f"{here(best_checkpoint(study_dir, row['trial_id'])) or 'missing (no best.pt)'}"
            + _versus(versus, row["trial_id"])
        )
    cols = [m for m, _ in objectives]
    if len(objectives) > 1 and all(c in best for c in cols):
        done = best["trial_id"].isin(finished_trials(trials)).to_numpy()
        if done.any():
            front = pareto_front(best, done, objectives)
            lines.append(f"Pareto front ({' vs '.join(cols)}): " + ", ".join(best.loc[front, "trial_id"]))
    for trial_id, message in failed_trials(trials).items():
        lines.append(f"trial {trial_id} failed: {message}")
    behind = behind_input(versus, ratios=True)
    if behind:
        count, listing = behind
        lines.append(f"{count} models do not beat their zero-filled input on the held-out volumes: {listing}")
    lines.append(f"tables: {here(study_dir / TRIALS_FILE)}, {here(study_dir / ROBUSTNESS_FILE)}")
    lines.append(f"TensorBoard: tensorboard --logdir {here(study_dir)}")
    lines.append(f"Optuna: optuna-dashboard sqlite:///{here(study_dir / OPTUNA_FILE)}")
    return lines


def closing_warning(trials: pd.DataFrame) -> str | None:
    """The line a study ends with when none of its models beats its own zero-filled input; ``trials``:
    the study's trials table (:func:`study.tables.load_tables`)."""
    return study_warning(list(input_verdicts(trials)["verdict"]))


def summary_and_warning(study_dir: Path, space: StudySpace) -> tuple[list[str], str | None]:
    """:func:`summarize` and :func:`closing_warning` of a study, from one read of its tables."""
    trials, _ = load_tables(study_dir)
    return summarize(study_dir, space, trials), closing_warning(trials)


def _versus(versus, trial_id: str) -> str:
    """``; held-out NMSE 0.45x its input's: beats its input`` for a trial with a held-out verdict."""
    if trial_id not in versus.index:
        return ""
    v = versus.loc[trial_id]
    return f"; held-out NMSE {v['ratio']:.2f}x ± {v['ratio_se']:.2f} its input's: {VERDICT_WORDS[v['verdict']]}"


def here(path: Path | None) -> str:
    """``path`` relative to the current directory where it lies below it (shorter lines, valid when
    copied), else as it is; '' for None."""
    if path is None:
        return ""
    cwd = Path.cwd().resolve()
    return str(path.relative_to(cwd)) if path.is_absolute() and path.is_relative_to(cwd) else str(path)


def _fmt(value: Any) -> str:
    """``10000``, not ``1e+04``: whole numbers as integers, others to four significant digits."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e7 else f"{value:.4g}"
    return str(value)


def trial_statuses(study_dir: Path) -> dict[str, str]:
    """Status of every trial in Tune's experiment state (no Ray needed)."""
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(str(study_dir))
    except Exception:  # noqa: BLE001 - no readable state yet
        return {}
    return {t.trial_id: t.status for t in analysis.trials}
