"""What a study folder, ``results/<name>/``, holds, and the keys every trial reports. A study on
object storage (``--results s3://...``, :mod:`study.storage`) has the same layout at ``<uri>/<name>/``
(the driver's files pushed from its working copy, ``.tune_state/`` as numbered sets).

The runner, the result tables, the trainable and the report all name these; each is written here
once. Only the standard library is imported (and :mod:`mriadv.checkpoint`'s file names, itself
standard library only at import), so the report (which must not import Ray or torch) shares the
names instead of copying them.

    results/<name>/
        study.json                 STATE_FILE: space, profile, base config (written by study/run.py)
        trials.parquet             TRIALS_FILE: one row per trial and epoch (study/tables.py)
        robustness.parquet         ROBUSTNESS_FILE: one row per trial, epoch, attack and budget
        tables.journal             JOURNAL_FILE: results since the tables were last rewritten (study/tables.py)
        optuna.db                  OPTUNA_FILE: the searcher's Optuna storage
        tuner.pkl                  TUNER_FILE: Tune's state; with study.json, the study resumes
        driver.lock                LOCK_FILE: flock'ed by the live driver, its PID and host (study/lock.py)
        driver.lease               on object storage only: the live driver's lease (study/lease.py)
        .ray_processes             PIDFILE: the driver's Ray processes (study/procs.py), JSON; not
                                   named *.json, which Tune copies to its staging folder on a resume
                                   and back over the live file at every step
        .tune_state/               TUNE_STATE_DIR: a complete copy of Tune's state (study/tune_state.py)
        trial_<id>_<values>/       one folder per trial (Tune's, named by trial_dirname()); TensorBoard's
                                   run of the trial (study/board.py); earlier studies: train_trial_<id>_<n>_...
            best.pt                BEST_CHECKPOINT: the networks of the trial's best epoch
        reference_trial            REFERENCE_FILE: a space's reference trial, once it has ended (JSON:
                                   folder, status, best.pt); fine-tuned trials wait for it (study/reference.py)
        report/                    REPORT_DIR: written by study/report.py
        mlflow.db                  MLFLOW_FILE: the MLflow runs of --track mlflow, by default (study/tracking.py)
        mlartifacts/               MLFLOW_ARTIFACTS: that experiment's artifact folder (not created: no run logs artifacts)
        wandb/                     WANDB_DIR: the W&B run files of --track wandb (offline-run-* with WANDB_MODE=offline)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mriadv.checkpoint import BEST_NAME  # standard library only at import, like this module

STATE_FILE = "study.json"
TRIALS_FILE = "trials.parquet"
ROBUSTNESS_FILE = "robustness.parquet"
JOURNAL_FILE = "tables.journal"  # not *.json: Tune copies those back and forth on a resume (see PIDFILE)
OPTUNA_FILE = "optuna.db"
TUNER_FILE = "tuner.pkl"
PIDFILE = ".ray_processes"
LOCK_FILE = "driver.lock"  # one driver per study (study/lock.py)
TUNE_STATE_DIR = ".tune_state"
BEST_CHECKPOINT = BEST_NAME
REPORT_DIR = "report"
MLFLOW_FILE = "mlflow.db"  # --track mlflow's default store (study/tracking.py)
MLFLOW_ARTIFACTS = "mlartifacts"
WANDB_DIR = "wandb"  # --track wandb's files
REFERENCE_FILE = "reference_trial"  # not *.json (see PIDFILE)
REFERENCE_KEY = "study_reference"  # in the reference trial's config (a space's ``reference:``): True
REFERENCE_INIT = "reference"  # init_from's value in a space: start from the reference trial's best.pt

# hyperparameters reported with every result (besides the searched ones) and shown in
# TensorBoard's HParams dashboard and the report's summary
HPARAM_KEYS = ("epsilon_ref", "lambda1", "lambda2", "loss", "lr_recon", "lr_gen", "perturbation", "seed")


def values_label(config: dict[str, Any]) -> str:
    """A trial's searched values as ``name=value`` pairs (``epsilon=1000,lr_recon=0.0003162``): the
    space's own units, four significant digits; in the trial's folder name, TensorBoard's run list
    and the console."""
    return ",".join(f"{k}={_short(v)}" for k, v in config.items())


def trial_dirname(trial: Any) -> str:
    """Tune's ``trial_dirname_creator``: ``trial_<id>_<values>``, short enough to read as a
    TensorBoard run name (Tune's own adds the trainable, a counter and the date)."""
    values = values_label(trial.config)[:100].replace("/", "_")
    return f"trial_{trial.trial_id}_{values}" if values else f"trial_{trial.trial_id}_"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e7 else f"{value:.4g}"
    return str(value)


def trial_folder(study_dir: str | Path, trial_id: str) -> Path | None:
    """Tune's folder of a trial, ``trial_<trial_id>_<values>`` (:func:`trial_dirname`; before it,
    ``<trainable>_<trial_id>_<n>_<values>_<date>``), or None.

    The id must stand between underscores: a bare substring could also match another trial's
    searched values or date in its folder name."""
    matches = sorted(p for p in Path(study_dir).glob(f"*_{trial_id}_*") if p.is_dir())
    return matches[0] if matches else None


def best_checkpoint(study_dir: str | Path, trial_id: str) -> Path | None:
    """The trial's ``best.pt``, or None where the trial folder or the file is missing."""
    folder = trial_folder(study_dir, trial_id)
    return folder / BEST_CHECKPOINT if folder is not None and (folder / BEST_CHECKPOINT).is_file() else None


def searched_metric(metric: str) -> str:
    """What Optuna and ASHA are told for an objective: its value at the trial's best selection epoch
    so far (``best_<metric>``, see :class:`study.trainable.BestSoFar`), the epoch the study keeps."""
    return f"best_{metric}"
