"""Result tables of a study, written by the driver as results arrive.

* ``trials.parquet``: one row per trial per epoch: trial id, epoch, hyperparameters, training and
  validation metrics, time, and the trial's status (``RUNNING``, ``TERMINATED``, ``ERROR`` with its
  message, or the trainer's own ``nan``/``early_stopped``).
* ``robustness.parquet``: long format, one row per trial, epoch, attack and budget.

Both are rewritten atomically (temporary file, then rename) at the end of every Tune step that
brought a result (see :class:`ResultsCallback`), so they can be read at any moment, and are keyed
by ``(trial_id, epoch)``: after a resume, a re-reported epoch replaces its row instead of
duplicating it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
from ray import tune

from study.board import FAILURE, SUCCESS, write_session_end
from study.layout import ROBUSTNESS_FILE, TRIALS_FILE
from study.procs import ProcessRecord
from study.tune_state import backup_state

# result keys that are Ray's bookkeeping, not ours
_RAY_KEYS = {"timestamp", "checkpoint_dir_name", "should_checkpoint", "done", "training_iteration", "trial_id",
             "date", "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "time_since_restore",
             "iterations_since_restore", "config", "experiment_tag"}
FIRST_COLUMNS = ["trial_id", "epoch", "status", "epoch_status", "message", "epsilon", "epsilon_ref", "epsilon_rms", "lambda1",
                 "lambda2", "loss", "lr_recon", "lr_gen", "train_loss", "val_loss", "val_nmse", "val_psnr", "val_ssim",
                 "time_s", "epoch_time_s"]


def read_table(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.is_file() else pd.DataFrame()


def write_table(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


class ResultsLog:
    """The two tables in memory, keyed by (trial_id, epoch), loaded from disk on (re)start."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rows: dict[tuple[str, int], dict[str, Any]] = {}
        self.robust: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self.status: dict[str, tuple[str, str]] = {}
        self.params: dict[str, dict[str, Any]] = {}  # sampled config, for trials that never report
        trials = read_table(self.folder / TRIALS_FILE)
        for row in trials.to_dict("records"):
            key = (row["trial_id"], int(row["epoch"]))
            self.rows[key] = row
            self.status[row["trial_id"]] = (row.get("status", ""), row.get("message", "") or "")
        robust = read_table(self.folder / ROBUSTNESS_FILE)
        for row in robust.to_dict("records"):
            self.robust.setdefault((row["trial_id"], int(row["epoch"])), []).append(row)

    def add_result(self, trial_id: str, result: dict[str, Any]) -> None:
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        row = {k: v for k, v in result.items() if k not in _RAY_KEYS and k != "robustness_json"
               and not isinstance(v, (dict, list))}
        row.update(trial_id=trial_id, epoch=epoch, time_s=result.get("time_total_s", math.nan))
        if row.get("epoch_status") == "nan":
            self.status[trial_id] = ("nan", str(row.get("message", "")))
        else:
            self.status.setdefault(trial_id, ("RUNNING", ""))
        self.rows[(trial_id, epoch)] = row
        robust = json.loads(result.get("robustness_json") or "[]")
        self.robust[(trial_id, epoch)] = [
            {"trial_id": trial_id, "epoch": epoch, "epsilon_ref": row.get("epsilon_ref", math.nan), **r} for r in robust
        ]

    def set_status(self, trial_id: str, status: str, message: str = "") -> None:
        current = self.status.get(trial_id, ("", ""))[0]
        if current in ("nan",) and status == "TERMINATED":
            return  # the trainer's own verdict is more specific than Ray's
        if status == "TERMINATED":
            last = max((e for t, e in self.rows if t == trial_id), default=None)
            if last is not None and self.rows[(trial_id, last)].get("epoch_status") == "early_stopped":
                status = "early_stopped"
        self.status[trial_id] = (status, message)

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        rows = []
        for (trial_id, _), row in sorted(self.rows.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            status, message = self.status.get(trial_id, ("", ""))
            rows.append({**row, "status": status, "message": message or row.get("message", "")})
        reported = {t for t, _ in self.rows}
        for trial_id, (status, message) in sorted(self.status.items()):
            if trial_id not in reported and status == "ERROR":  # failed before its first epoch: epoch 0
                rows.append({**self.params.get(trial_id, {}), "trial_id": trial_id, "epoch": 0, "status": status,
                             "message": message})
        trials = pd.DataFrame(rows)
        if not trials.empty:
            trials = trials[[c for c in FIRST_COLUMNS if c in trials] + [c for c in trials if c not in FIRST_COLUMNS]]
        robust_rows = [r for key in sorted(self.robust) for r in self.robust[key]]
        return trials, pd.DataFrame(robust_rows)

    def write(self) -> None:
        trials, robust = self.frames()
        if not trials.empty:
            write_table(trials, self.folder / TRIALS_FILE)
        if not robust.empty:
            write_table(robust, self.folder / ROBUSTNESS_FILE)


class ResultsCallback(tune.Callback):
    """Tune callback (runs in the driver) that keeps the Parquet tables current, keeps a complete
    copy of Tune's state (:mod:`study.tune_state`), records the driver's Ray processes (see
    :mod:`study.procs`) as trials start and report, and ends each trial's HParams session in
    TensorBoard (:func:`study.board.write_session_end`).

    The tables never run ahead of the state a resume starts from, so a trial interrupted after
    epoch k resumes after epoch k: a result that carries a checkpoint is held until Tune has
    registered that checkpoint (a later event, ``on_checkpoint``), and tables are written at the end
    of Tune's step, after Tune has saved its state for the step and this callback has copied it."""

    def __init__(self, folder: str | Path, record_processes: bool = True) -> None:
        self.folder = Path(folder)
        self.record_processes = record_processes
        self._log: ResultsLog | None = None
        self._procs: ProcessRecord | None = None
        self._pending = False
        self._held: dict[str, list[dict[str, Any]]] = {}  # trial id -> results awaiting their checkpoint

    @property
    def log(self) -> ResultsLog:
        if self._log is None:  # created lazily: the callback is pickled with the tuner and restored
            self._log = ResultsLog(self.folder)
        return self._log

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "record_processes": self.record_processes, "_log": None, "_procs": None,
                "_pending": False, "_held": {}}

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.log.params[trial.trial_id] = {k: v for k, v in trial.config.items() if isinstance(v, (int, float, str))}
        self.log.set_status(trial.trial_id, "RUNNING")
        self._event()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get("should_checkpoint"):
            self._held.setdefault(trial.trial_id, []).append(dict(result))
        else:
            self._add(trial.trial_id, [result])
        self._event()

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        self._add(trial.trial_id, self._held.pop(trial.trial_id, []))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._add(trial.trial_id, self._held.pop(trial.trial_id, []))
        self.log.set_status(trial.trial_id, "TERMINATED")
        self._end_session(trial)
        self._pending = True

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._add(trial.trial_id, self._held.pop(trial.trial_id, []))
        self.log.set_status(trial.trial_id, "ERROR", _error_message(trial))
        self._end_session(trial)
        self._pending = True

    def _end_session(self, trial) -> None:
        """The trial's HParams status in TensorBoard: FAILURE for an error or a NaN stop."""
        status = self.log.status.get(trial.trial_id, ("", ""))[0]
        if trial.path:  # None for a trial that never got a folder
            write_session_end(self.folder / Path(trial.path).name, FAILURE if status in ("ERROR", "nan") else SUCCESS)

    def _add(self, trial_id: str, results: list[dict[str, Any]]) -> None:
        for result in results:
            self.log.add_result(trial_id, result)
            self._pending = True

    def on_step_end(self, iteration, trials, **info) -> None:
        """Tune has saved this step's state (into its staging folder): copy it, then write the tables."""
        if not self._pending:
            return
        if trials:
            backup_state(Path(trials[0].storage.experiment_driver_staging_path), self.folder)
        self.log.write()
        self._pending = False

    def on_experiment_end(self, trials, **info) -> None:
        for trial_id in list(self._held):
            self._add(trial_id, self._held.pop(trial_id))
        if self._pending:
            self.log.write()
            self._pending = False

    def _event(self) -> None:
        if self.record_processes:
            if self._procs is None:
                self._procs = ProcessRecord(self.folder)
            self._procs.update()


def _error_message(trial) -> str:
    """The last line of the trial's error (the exception and its message)."""
    text = ""
    try:
        text = trial.get_error() and str(trial.get_error()) or ""
    except Exception:  # noqa: BLE001 - older/newer Ray: fall back to the error file
        pass
    if not text and getattr(trial, "error_file", None) and Path(trial.error_file).is_file():
        text = Path(trial.error_file).read_text()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else "error"
