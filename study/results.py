"""The driver's side of a study's results: :class:`ResultsCallback` keeps the tables
(:mod:`study.tables`), a complete copy of Tune's state (:mod:`study.tune_state`) and the record of
Ray's processes (:mod:`study.procs`) current as results arrive, and ends each trial's HParams
session in TensorBoard.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ray import tune

from study.board import FAILURE, SUCCESS, write_session_end
from study.home import home, home_remote
from study.procs import ProcessRecord
from study.reference import is_reference, record_reference
from study.search import commit as commit_searchers
from study.storage import RemoteStudy, StorageError, first_line
from study.tables import ResultsLog, load_tables, read_parquet
from study.tune_state import backup_state, saves_replace_files, state_signature

__all__ = ["ResultsCallback", "ResultsLog", "load_tables", "read_parquet"]

# The Parquet tables are rewritten whole at most every REWRITE_S seconds, and not before
# REWRITE_FACTOR times the last rewrite's duration has passed (so that rewriting never takes more
# than ~1/REWRITE_FACTOR of the driver's time however large the study); the journal carries every
# result in between. The process record is refreshed at most every PROCS_S seconds (and at every
# trial start, when new workers appear).
REWRITE_S = 5.0
REWRITE_FACTOR = 20.0
PROCS_S = 2.0


class ResultsCallback(tune.Callback):
    """Tune callback (runs in the driver) that keeps the Parquet tables current, keeps a complete
    copy of Tune's state (:mod:`study.tune_state`), records the driver's Ray processes (see
    :mod:`study.procs`) as trials start and report, and ends each trial's HParams session in
    TensorBoard (:func:`study.board.write_session_end`).

    The tables never run ahead of the state a resume starts from, so a trial interrupted after
    epoch k resumes after epoch k: a result that carries a checkpoint is held until Tune has
    registered that checkpoint (a later event, ``on_checkpoint``), and results reach the journal at
    the end of the first Tune step in which Tune saved its state after them (:meth:`on_step_end`),
    just before this callback copies that state; Optuna is told what the searcher held back just
    after (:func:`study.search.commit`). The Parquet files are rewritten from the journal's
    events every few seconds (``REWRITE_S``) and at the end of the study."""

    remote: RemoteStudy | None = None  # defaults for a callback pickled before these existed
    _push_failed = False

    def __init__(self, folder: str | Path, record_processes: bool = True, remote: RemoteStudy | None = None) -> None:
        self.folder = Path(folder)
        self.record_processes = record_processes
        self.remote = remote  # object storage: the driver's files are pushed there after each copy
        self._log: ResultsLog | None = None
        self._procs: ProcessRecord | None = None
        self._pending = False
        self._saved: tuple | None = None  # the signature of Tune's state files at the last copy
        self._held: dict[str, list[dict[str, Any]]] = {}  # trial id -> results awaiting their checkpoint
        self._written = 0.0  # monotonic time of the last Parquet rewrite, and what it cost
        self._write_s = 0.0
        self._procs_at = -PROCS_S
        self._push_failed = False

    @property
    def log(self) -> ResultsLog:
        if self._log is None:  # created lazily: the callback is pickled with the tuner and restored
            self._log = ResultsLog(self.folder)
        return self._log

    def __getstate__(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "record_processes": self.record_processes,
            "remote": self.remote,
            "_log": None,
            "_procs": None,
            "_pending": False,
            "_saved": None,
            "_held": {},
            "_written": 0.0,
            "_write_s": 0.0,
            "_procs_at": -PROCS_S,
            "_push_failed": False,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restored from ``tuner.pkl``: the study this driver runs (:mod:`study.home`; another folder or
        machine than the one that saved it, for a study on object storage)."""
        self.__dict__.update(state)
        self.folder = home(self.folder)
        self.remote = home_remote(self.remote)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.log.set_params(trial.trial_id, trial.config)
        self.log.set_status(trial.trial_id, "RUNNING")
        self._pending = True
        self._event(force=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get("should_checkpoint"):
            self._held.setdefault(trial.trial_id, []).append(dict(result))
        else:
            self._add(trial.trial_id, [result])
        self._event()

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        self._add(trial.trial_id, self._held.pop(trial.trial_id, []))

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        """The trial failed and Tune retries it from its last checkpoint (``--max-failures``): a result
        still waiting for its checkpoint belongs to the lost attempt; the retry reports that epoch again."""
        self._held.pop(trial.trial_id, None)

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
        """The trial's HParams status in TensorBoard: FAILURE for an error or a NaN stop; the reference
        trial's end recorded for the trials that fine-tune it."""
        status = self.log.status.get(trial.trial_id, ("", ""))[0]
        folder = self.folder / Path(trial.path).name if trial.path else None  # None: it never got one
        try:
            if folder is not None:
                self._session_end(folder, FAILURE if status in ("ERROR", "nan") else SUCCESS)
            if is_reference(trial.config):  # fine-tuned trials wait for it (study.reference)
                record_reference(self.folder, trial.trial_id, folder, status, self.remote)
        except (OSError, StorageError) as exc:  # object storage unreachable: a warning, not the study's end
            if self.remote is None:
                raise
            self._push_failed = self._warn(exc, self._push_failed)

    def _session_end(self, folder: Path, status: str) -> None:
        """The trial's HParams session end (:func:`study.board.write_session_end`); on object storage the
        trial's run is there: the end is written into the working copy and that one file pushed."""
        if self.remote is None:
            write_session_end(folder, status)
            return
        started = any(r.rpartition("/")[2].startswith("events.") for r, _ in self.remote.listing(folder.name))
        before = set(folder.glob("*.end"))
        if write_session_end(folder, status, started):
            for end in set(folder.glob("*.end")) - before:
                self.remote.push(f"{folder.name}/{end.name}")

    def _add(self, trial_id: str, results: list[dict[str, Any]]) -> None:
        for result in results:
            self.log.add_result(trial_id, result)
            self._pending = True

    def on_step_end(self, iteration, trials, **info) -> None:
        """When Tune has saved its state in this step (into its staging folder): journal the events
        that save covers (all until now: a step's events precede its save), copy the state, and
        rewrite the Parquet tables when they are due. Tune saves when a trial appears or fails, or a
        few seconds after a change (:mod:`study.tune_state`); until then the events wait here, so
        that the tables never run ahead of Tune's saved state."""
        if trials and self._backup(trials) and self._pending:
            self._pending = False
            now = time.monotonic()
            if now - self._written >= max(REWRITE_S, REWRITE_FACTOR * self._write_s):
                self._rewrite()

    def _backup(self, trials) -> bool:
        """If Tune saved since the last call: commit the journal, then copy Tune's state; whether it did.
        The journal first: a row that runs ahead of Tune's saved state is reported again after a
        resume and replaces itself; a state copy ahead of the journal would lose the row."""
        staging = Path(trials[0].storage.experiment_driver_staging_path)
        saved = state_signature(staging)
        if saved is None or saved == self._saved:
            return False  # no save since the last one: a kill now loses the events since, not more
        self.log.commit()
        backup_state(staging, self.folder, link=saves_replace_files())
        self._push("state")  # on object storage the same order: the tables, Optuna's asks, the state copy
        commit_searchers(self.folder)  # Optuna under the same rule: after the state that holds it is copied
        self._push("rest")  # then what Optuna was told
        self._saved = saved
        return True

    def on_experiment_end(self, trials, **info) -> None:
        """After Tune's final save: every event into the tables, and that save copied."""
        for trial_id in list(self._held):
            self._add(trial_id, self._held.pop(trial_id))
        if trials:
            self._backup(trials)
        commit_searchers(self.folder)  # the final save covers everything
        self._rewrite()  # a finished (or interrupted) study leaves whole Parquet files and no journal
        self._pending = False
        self._push()

    def _push(self, stage: str = "all") -> None:
        """With object storage: push the driver's files (:meth:`study.storage.RemoteStudy.push_driver`). A
        failed push is said once and tried again at the next save; the working copy keeps everything.
        Optuna's tells never go up ahead of the state set on the URI: where this save's set failed to go
        up, the ``"rest"`` stage waits for the next save."""
        if self.remote is None or (stage == "rest" and self._push_failed):
            return
        try:
            self.remote.push_driver(stage)
        except (OSError, StorageError) as exc:
            self._push_failed = self._warn(exc, self._push_failed)
        else:
            self._push_failed = False

    def _warn(self, exc: BaseException, said: bool) -> bool:
        """One warning line for a failed exchange with the object storage, the first time; True."""
        if not said:
            print(
                f"warning: could not push the study's files to {self.remote.shown}: {first_line(exc)}; the working copy "
                "keeps them and the next save tries again (until then a resume from the URI goes back further)",
                flush=True,
            )
        return True

    def _rewrite(self) -> None:
        start = time.monotonic()
        self.log.write()
        self._written = time.monotonic()
        self._write_s = self._written - start

    def _event(self, force: bool = False) -> None:
        if self.record_processes and (force or time.monotonic() - self._procs_at >= PROCS_S):
            if self._procs is None:
                self._procs = ProcessRecord(self.folder)
            self._procs.update()
            self._procs_at = time.monotonic()


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
