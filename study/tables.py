"""A study's result tables: ``trials.parquet`` and ``robustness.parquet``, and their journal.

* ``trials.parquet``: one row per trial per epoch: trial id, epoch, hyperparameters, training and
  validation metrics, time, and the trial's status (``RUNNING``, ``TERMINATED``, ``ERROR`` with its
  message, or the trainer's own ``nan``/``early_stopped``).
* ``robustness.parquet``: long format, one row per trial, epoch, attack and budget.
* ``tables.journal``: what happened since the tables were last written, one JSON event per line.

Both tables are keyed by ``(trial_id, epoch)``: after a resume, a re-reported epoch replaces its row
instead of duplicating it. The driver (:class:`study.results.ResultsCallback`) appends every result
and status change to the journal at the end of the first Tune step that saved Tune's state after it
(a few hundred bytes per result, whatever the study's size), and rewrites the two Parquet files
whole (atomically: temporary file, then rename) only every few seconds and at the end of the study,
then replaces the journal by one that holds only what no table can (the sampled values of trials
that have not reported yet).
Rewriting the tables after every result cost the driver time that grew with the study
(``benchmarks/driver_scale.py``).

So at any moment the tables are the Parquet files plus the journal replayed over them:
:func:`load_tables` (the report, the runner's summary and a resume read them so; a reader that
raced a rewrite reads again). Replaying is idempotent (rows replace rows by key, the last status
wins), so a journal that outlived its rewrite (the driver killed between the renames) gives the same
tables, and a line cut short by a kill is ignored. After a finished study the journal is empty and
the Parquet files alone are the whole result. Pure pandas and pyarrow; no Ray.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from study.layout import JOURNAL_FILE, ROBUSTNESS_FILE, TRIALS_FILE

# result keys that are Ray's bookkeeping, not ours
RAY_KEYS = {
    "timestamp",
    "checkpoint_dir_name",
    "should_checkpoint",
    "done",
    "training_iteration",
    "trial_id",
    "date",
    "time_this_iter_s",
    "time_total_s",
    "pid",
    "hostname",
    "node_ip",
    "time_since_restore",
    "iterations_since_restore",
    "config",
    "experiment_tag",
}
FIRST_COLUMNS = [
    "trial_id",
    "epoch",
    "status",
    "epoch_status",
    "message",
    "epsilon",
    "epsilon_ref",
    "epsilon_rms",
    "lambda1",
    "lambda2",
    "loss",
    "lr_recon",
    "lr_gen",
    "train_loss",
    "val_loss",
    "val_nmse",
    "val_psnr",
    "val_ssim",
    "time_s",
    "epoch_time_s",
]


def read_parquet(path: Path) -> pd.DataFrame:
    """One Parquet file as it is on disk (empty when missing), without the journal."""
    return pd.read_parquet(path) if path.is_file() else pd.DataFrame()


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    """Write ``frame`` atomically: a temporary file in the same folder, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    """A JSON-safe scalar (NumPy scalars to Python; NaN and infinities as JSON's extension)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)) and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


class ResultsLog:
    """The two tables in memory, keyed by (trial_id, epoch): the Parquet files and the journal
    replayed over them on creation; :meth:`commit` makes what happened since durable."""

    def __init__(self, folder: str | Path, create: bool = True) -> None:
        self.folder = Path(folder)
        if create:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.rows: dict[tuple[str, int], dict[str, Any]] = {}
        self.robust: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self.status: dict[str, tuple[str, str]] = {}
        self.params: dict[str, dict[str, Any]] = {}  # sampled config, for trials that never report
        self._events: list[dict[str, Any]] = []  # not yet in the journal
        self.replayed = 0
        for _ in range(20):  # a reader racing the driver: again if the journal was replaced meanwhile
            before = _inode(self.journal)
            trials, robust = read_parquet(self.folder / TRIALS_FILE), read_parquet(self.folder / ROBUSTNESS_FILE)
            try:
                text = self.journal.read_text()
            except OSError:
                text = ""
            if _inode(self.journal) == before:
                break
        for row in trials.to_dict("records"):
            self.rows[(row["trial_id"], int(row["epoch"]))] = row
            self.status[row["trial_id"]] = (row.get("status", ""), row.get("message", "") or "")
        for row in robust.to_dict("records"):
            self.robust.setdefault((row["trial_id"], int(row["epoch"])), []).append(row)
        self.replayed = self._replay(text)

    # --- changes ---------------------------------------------------------------------------------
    def add_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """A trial's reported result (Tune's result dict): its row and its robustness rows."""
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        packed = json.loads(result.get("record_json") or "{}")  # the metrics Tune need not see (trainable.py)
        row = {
            k: _plain(v)
            for k, v in {**result, **packed}.items()
            if k not in RAY_KEYS and k not in ("robustness_json", "record_json") and not isinstance(v, (dict, list))
        }
        row.update(trial_id=trial_id, epoch=epoch, time_s=_plain(result.get("time_total_s", math.nan)))
        robust = [
            {"trial_id": trial_id, "epoch": epoch, "epsilon_ref": row.get("epsilon_ref", math.nan), **r}
            for r in json.loads(result.get("robustness_json") or "[]")
        ]
        self._apply({"kind": "row", "trial_id": trial_id, "epoch": epoch, "row": row, "robust": robust})

    def set_status(self, trial_id: str, status: str, message: str = "") -> None:
        self._apply({"kind": "status", "trial_id": trial_id, "status": status, "message": message})

    def set_params(self, trial_id: str, params: dict[str, Any]) -> None:
        self._apply(
            {
                "kind": "params",
                "trial_id": trial_id,
                "params": {k: _plain(v) for k, v in params.items() if isinstance(v, (int, float, str))},
            }
        )

    def _apply(self, event: dict[str, Any], record: bool = True) -> None:
        kind, trial_id = event["kind"], event["trial_id"]
        if kind == "row":
            row = event["row"]
            if row.get("epoch_status") == "nan":
                self.status[trial_id] = ("nan", str(row.get("message", "")))
            else:
                self.status.setdefault(trial_id, ("RUNNING", ""))
            self.rows[(trial_id, event["epoch"])] = row
            self.robust[(trial_id, event["epoch"])] = event["robust"]
        elif kind == "status":
            status = event["status"]
            current = self.status.get(trial_id, ("", ""))[0]
            if current == "nan" and status == "TERMINATED":
                pass  # the trainer's own verdict is more specific than Ray's
            else:
                if status == "TERMINATED":
                    last = max((e for t, e in self.rows if t == trial_id), default=None)
                    if last is not None and self.rows[(trial_id, last)].get("epoch_status") == "early_stopped":
                        status = "early_stopped"
                self.status[trial_id] = (status, event["message"])
        elif kind == "params":
            self.params[trial_id] = event["params"]
        if record:
            self._events.append(event)

    # --- reading ---------------------------------------------------------------------------------
    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(trials, robustness)`` as the Parquet files hold them."""
        rows = []
        for (trial_id, _), row in sorted(self.rows.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            status, message = self.status.get(trial_id, ("", ""))
            rows.append({**row, "status": status, "message": message or row.get("message", "")})
        reported = {t for t, _ in self.rows}
        for trial_id, (status, message) in sorted(self.status.items()):
            if trial_id not in reported and status == "ERROR":  # failed before its first epoch: epoch 0
                rows.append(
                    {
                        **self.params.get(trial_id, {}),
                        "trial_id": trial_id,
                        "epoch": 0,
                        "status": status,
                        "message": message,
                    }
                )
        trials = pd.DataFrame(rows)
        if not trials.empty:
            trials = trials[[c for c in FIRST_COLUMNS if c in trials] + [c for c in trials if c not in FIRST_COLUMNS]]
        robust_rows = [r for key in sorted(self.robust) for r in self.robust[key]]
        return trials, pd.DataFrame(robust_rows)

    # --- writing ---------------------------------------------------------------------------------
    @property
    def journal(self) -> Path:
        return self.folder / JOURNAL_FILE

    def commit(self) -> None:
        """Append the events since the last commit to the journal (one line each, then flushed)."""
        if not self._events:
            return
        text = "".join(json.dumps(e, allow_nan=True, default=str) + "\n" for e in self._events)
        with open(self.journal, "a+b") as f:
            if f.tell() > 0:  # a line torn by a kill: start on a fresh line, or this event is glued to it
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    text = "\n" + text
            f.write(text.encode())
            f.flush()
        self._events.clear()

    def write(self) -> None:
        """Rewrite both Parquet files from memory, then replace the journal (whose events they now
        hold) by a new one, atomically: a reader that sees the new journal sees the new tables."""
        trials, robust = self.frames()
        if not trials.empty:
            write_parquet(trials, self.folder / TRIALS_FILE)
        if not robust.empty:
            write_parquet(robust, self.folder / ROBUSTNESS_FILE)
        # the sampled values of trials without a row yet are in no table: they stay in the journal, so
        # that a trial that errors before its first epoch still gets its row with its values
        reported = {t for t, _ in self.rows}
        carry = [
            {"kind": "params", "trial_id": t, "params": p}
            for t, p in self.params.items()
            if t not in reported and self.status.get(t, ("", ""))[0] != "ERROR"
        ]
        tmp = self.journal.with_name(f".{self.journal.name}.tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(e, allow_nan=True, default=str) + "\n" for e in carry))
        os.replace(tmp, self.journal)
        self._events.clear()  # all in the tables or the new journal now

    def _replay(self, text: str) -> int:
        """Apply the journal's events (in order) over the tables read from Parquet; a last line cut
        short by a kill is skipped. Returns the number of events applied."""
        n = 0
        for line in text.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # an incomplete last line: the driver died while appending it
            self._apply(event, record=False)
            n += 1
        return n


def _inode(path: Path) -> int | None:
    """Which file ``path`` is now (the driver replaces the journal at every rewrite), or None."""
    try:
        return path.stat().st_ino
    except OSError:
        return None


def load_tables(folder: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(trials, robustness)`` of a study folder as they stand now: the Parquet files with the
    journal replayed over them (read-only: nothing is written). Empty frames where nothing exists."""
    folder = Path(folder)
    if not (folder / JOURNAL_FILE).is_file() or (folder / JOURNAL_FILE).stat().st_size == 0:
        return read_parquet(folder / TRIALS_FILE), read_parquet(folder / ROBUSTNESS_FILE)
    return ResultsLog(folder, create=False).frames()
