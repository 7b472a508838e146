"""Tune's experiment state: saved cheaply enough for a study of hundreds of trials, and kept in a
complete copy so that a hard-killed study always resumes.

Tune keeps its experiment state in three files per driver session: ``experiment_state-<session>.json``
(the trials and their checkpoints), ``search_gen_state-<session>.json`` and
``searcher-state-<session>.pkl`` (the search algorithm, Optuna's sampler included). It writes them
into a staging folder on the driver and then copies them into the study folder in the background;
neither write is atomic. A driver killed in the middle (SIGKILL, a lost machine) leaves a truncated
file, and Tune 2.60 then fails to restore: measured here as a ``JSONDecodeError`` followed by a
fresh search without a space, in about one of ten kills while a trial reports.

So the study keeps its own copy: after every save Tune makes (:class:`study.results.ResultsCallback`
at the end of the step, which first journals the results that save covers; and at the study's end),
:func:`backup_state` copies the staging files atomically into ``results/<name>/.tune_state/``, with
a record of which files of one save it holds; and before a resume :func:`repair_state` makes the
three files Tune will load one set: that copy, or else the newest session whose three files are all
complete, moving newer files aside (a truncated one, or a file whose save was cut short). Repairing
each kind alone once paired a resumed session's experiment state with the previous session's
searcher, and ``OptunaSearch.on_trial_complete`` then raised ``KeyError`` at every resume. Files are
checked by parsing, never by executing them (pickles are scanned with :mod:`pickletools`).

How often Tune saves, and what a save costs, is set by :func:`install_state_saving` (which
``study/run.py`` calls): a save as soon as a trial appears or fails, or is one checkpoint short of
those Tune keeps, else at most every ``SAVE_EVERY_S`` seconds while results come in
(:func:`save_state_when_due`), each encoding only the trials that changed and replacing the file
atomically (:func:`encode_state_incrementally`).
``benchmarks/driver_scale.py`` measures the driver's cost per result with and without them.
"""

from __future__ import annotations

import fnmatch
import json
import os
import pickletools
import shutil
import time
import weakref
from pathlib import Path

from study.layout import TUNE_STATE_DIR

EXPERIMENT_STATE = "experiment_state-*.json"  # the trials; the other two hold the search algorithm
STATE_PATTERNS = (EXPERIMENT_STATE, "search_gen_state-*.json", "searcher-state-*.pkl")
CORRUPT_SUFFIX = ".corrupt"  # a truncated state file, moved aside by repair_state
UNPAIRED_SUFFIX = ".unpaired"  # a complete state file whose save's other files are missing or older
SET_FILE = ".set"  # in TUNE_STATE_DIR: the files of the save the copy holds, written after them
SAVE_EVERY_S = 5.0  # the longest a running trial's results wait for Tune's next state save
FAILED = "ERROR"  # Tune's status of a trial that failed (a finished one may wait: see save_state_when_due)
CHECKPOINTS_KEPT = 3  # CheckpointConfig(num_to_keep): with 2, every checkpoint would need a save


def is_complete(path: Path) -> bool:
    """Whether a state file parses to its end: JSON for ``experiment_state``, else a pickle with
    its STOP opcode (Tune's ``search_gen_state-*.json`` is a pickle despite its name)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if fnmatch.fnmatch(path.name, EXPERIMENT_STATE):
        try:
            json.loads(data)
        except ValueError:
            return False
        return True
    try:
        for opcode, _, _ in pickletools.genops(data):
            if opcode.name == "STOP":
                return True
    except Exception:  # noqa: BLE001 - any malformed pickle: truncated, or garbage
        return False
    return False


def ends_complete(path: Path) -> bool:
    """A cheap check for :func:`backup_state`: the file ends as a whole JSON object (``}``) or a
    pickle (its STOP opcode, ``.``) ends. Tune writes its staging files synchronously before the
    step ends, so this guards only against the unexpected; parsing them whole after every result
    cost the driver time that grew with the study. :func:`repair_state` parses fully."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64))
            tail = f.read().rstrip()
    except OSError:
        return False
    return tail.endswith(b"}" if fnmatch.fnmatch(path.name, EXPERIMENT_STATE) else b".")


def copy_atomic(src: Path, dst: Path, link: bool = False) -> None:
    """``dst`` becomes a copy of ``src`` at once; with ``link``, the same file (a hard link: no
    bytes copied) where both folders are on one file system."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    if link:
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or no hard links there
            link = False
    if not link:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


_saves_replace = False  # set by encode_state_incrementally's save_to_dir: see saves_replace_files


def saves_replace_files() -> bool:
    """Whether Tune's last save replaced its three staging files by new ones rather than rewriting
    one in place: Tune's searcher saves always do, the experiment state does when
    :func:`encode_state_incrementally` wrote it. Only then may the backup share the staging files
    (:func:`backup_state` with ``link``); :func:`repair_state` gives the backup files of their own
    before anything can write into the staging folder again (Tune's download of its state on a
    resume does)."""
    return _saves_replace


def newest(folder: Path, pattern: str) -> Path | None:
    """The file Tune restores from: the greatest name matching ``pattern`` (session timestamps sort)."""
    return max(folder.glob(pattern), default=None)


def newest_set(folder: Path) -> list[Path] | None:
    """The newest file of each state kind in ``folder`` (as :func:`newest`, from one listing of the
    folder), or None while one is missing."""
    try:
        names = [n for n in os.listdir(folder) if not n.startswith(".")]
    except OSError:
        return None
    found = [max(fnmatch.filter(names, pattern), default=None) for pattern in STATE_PATTERNS]
    return None if None in found else [folder / n for n in found]  # type: ignore[operator]


def session_of(name: str) -> str | None:
    """The driver session of a state file (``<session>`` in ``experiment_state-<session>.json``), or None."""
    for pattern in STATE_PATTERNS:
        head, tail = pattern.split("*")
        if name.startswith(head) and name.endswith(tail) and len(name) > len(head) + len(tail):
            return name[len(head) : len(name) - len(tail)]
    return None


def _identity(path: Path) -> list[int]:
    """Which file ``path`` is: inode, size, modification time (a replaced or rewritten file differs)."""
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def record_set(folder: Path, files: list[Path]) -> None:
    """Write ``folder/SET_FILE``, naming ``files`` (one save's) as they are now, atomically."""
    tmp = folder / f".{SET_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"files": {f.name: _identity(f) for f in files}}))
    os.replace(tmp, folder / SET_FILE)


def saved_set(backup: Path) -> list[Path] | None:
    """The study's copy (``backup``, its ``.tune_state/``) as one complete set of one save, one file
    per kind in :data:`STATE_PATTERNS` order, or None: no copy, a copy cut short by a kill (a file
    is no longer the one its record names), or a truncated file. A copy made before records were
    kept counts when its newest files are of one session."""
    try:
        record = json.loads((backup / SET_FILE).read_text())["files"]
        files = [backup / n for n in record]
    except (OSError, ValueError, KeyError, TypeError):
        record, files = None, newest_set(backup) or []
    by_kind = [[f for f in files if fnmatch.fnmatch(f.name, p)] for p in STATE_PATTERNS]
    if any(len(k) != 1 for k in by_kind) or len({session_of(k[0].name) for k in by_kind}) != 1:
        return None
    files = [k[0] for k in by_kind]
    try:
        if record is not None and any(_identity(f) != record[f.name] for f in files):
            return None
    except OSError:
        return None
    return files if all(is_complete(f) for f in files) else None


def state_signature(staging: Path) -> tuple | None:
    """Names, sizes, inodes and modification times of the newest state files in Tune's staging
    folder (None while one is missing): it changes with every save Tune makes."""
    files = newest_set(staging)
    if files is None:
        return None
    try:
        return tuple((f.name, st.st_size, st.st_ino, st.st_mtime_ns) for f in files for st in [f.stat()])
    except OSError:
        return None


def backup_state(staging: Path, study_dir: Path, link: bool = False) -> bool:
    """Copy the newest complete state files of Tune's driver staging folder into the study's
    ``.tune_state/`` (nothing is copied unless all three are complete and of one session), each
    atomically, then record them as one set (:data:`SET_FILE`: a kill between the copies leaves a
    record that no longer matches, :func:`saved_set`); ``link``: hard-link them where possible (see
    :func:`saves_replace_files`). Returns whether a copy was made."""
    files = newest_set(staging)
    if files is None or len({session_of(f.name) for f in files}) != 1 or not all(ends_complete(f) for f in files):
        return False
    dest = study_dir / TUNE_STATE_DIR
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        copy_atomic(f, dest / f.name, link)
    record_set(dest, [dest / f.name for f in files])
    keep = {f.name for f in files}
    for old in dest.iterdir():
        if old.name not in keep and not old.name.startswith("."):
            old.unlink(missing_ok=True)
    return True


def repair_state(study_dir: Path) -> list[str]:
    """Before Tune restores ``study_dir``: make the three state files Tune loads (the newest of each
    kind) one set of one save. That is the study's own copy (:func:`saved_set`), put back where the
    study folder's file differs or is missing; without a usable copy, the newest session whose three
    files in the study folder are all complete. Every state file newer than the set is moved aside
    (``<name>.corrupt`` if truncated, else ``<name>.unpaired``); with no complete set at all, every
    state file is, and the runner refuses to resume. Returns one line per change, for the user."""
    notes = []
    backup = study_dir / TUNE_STATE_DIR
    chosen = saved_set(backup)
    for f in backup.iterdir() if backup.is_dir() else ():
        if f.is_file() and f.stat().st_nlink > 1:  # a hard link into Tune's staging folder: a copy of its own
            copy_atomic(f, f)
    if chosen is not None:
        record_set(backup, chosen)  # the same bytes, in files of their own now
        for ours in chosen:
            current = study_dir / ours.name
            if not current.is_file() or ours.read_bytes() != current.read_bytes():
                was = "behind the last complete step" if is_complete(current) else "truncated"
                was = was if current.is_file() else "missing"
                copy_atomic(ours, current)
                notes.append(f"{current.name} was {was}: restored the study's own copy")
    else:
        sessions = sorted({session_of(f.name) for p in STATE_PATTERNS for f in study_dir.glob(p)} - {None})
        for session in reversed(sessions):
            files = [study_dir / p.replace("*", session) for p in STATE_PATTERNS]  # type: ignore[arg-type]
            if all(is_complete(f) for f in files):
                chosen = files
                break
    for i, pattern in enumerate(STATE_PATTERNS):
        for f in sorted(study_dir.glob(pattern)):
            if chosen is not None and f.name <= chosen[i].name:
                continue
            if not is_complete(f):
                f.rename(f.with_name(f.name + CORRUPT_SUFFIX))
                notes.append(f"{f.name} is truncated (the driver was killed while writing it): moved aside")
            else:
                f.rename(f.with_name(f.name + UNPAIRED_SUFFIX))
                notes.append(f"{f.name} is of a save cut short (the driver was killed while saving): moved aside")
    return notes


def encode_experiment_state(
    trial_data: dict[str, tuple[str, str]], runner_data: dict, stats: dict, cache: dict
) -> list[bytes]:
    """The bytes of Tune's ``experiment_state-*.json``, in pieces to write one after the other:
    exactly ``json.dumps({"trial_data": [...], "runner_data": ..., "stats": ...},
    cls=TuneFunctionEncoder)``, as Tune 2.60 writes it. Each trial's entry (its two JSON strings,
    escaped once more as a JSON list) is encoded only when Tune has replaced one of those strings
    since the last call; ``cache`` maps trial ids to ``(state, metadata, encoded)`` between calls.

    Tune re-encoded every trial at every save, through the pure-Python ``json.dump``: at 300 trials
    that was most of its save, and grew with the study (``benchmarks/driver_scale.py``)."""
    from ray.tune.utils.serialization import TuneFunctionEncoder

    pieces = [b'{"trial_data": [']
    for trial_id, (state, metadata) in trial_data.items():
        hit = cache.get(trial_id)
        if hit is None or hit[0] is not state or hit[1] is not metadata:
            hit = (state, metadata, json.dumps([state, metadata]).encode("ascii"))
            cache[trial_id] = hit
        pieces += [hit[2], b", "]
    if trial_data:
        pieces.pop()
    for gone in set(cache) - set(trial_data):
        del cache[gone]
    rest = json.dumps({"runner_data": runner_data, "stats": stats}, cls=TuneFunctionEncoder)
    pieces.append(b"], " + rest[1:].encode("ascii"))
    return pieces


def install_state_saving(every_s: float = SAVE_EVERY_S) -> None:
    """Tune's experiment-state saves as the study makes them (see the module docstring): a save when
    one cannot wait, else at most every ``every_s`` seconds (:func:`save_state_when_due`), each
    encoding only the trials that changed and replacing the file atomically
    (:func:`encode_state_incrementally`); and a resumed trial that passes over a checkpoint deleted
    after the last save (:func:`tolerate_deleted_checkpoints`). Idempotent."""
    save_state_when_due(every_s)
    encode_state_incrementally()
    tolerate_deleted_checkpoints()


def tolerate_deleted_checkpoints() -> None:
    """Let Tune's checkpoint manager pass over a checkpoint that is gone when it deletes it.

    With saves a few seconds apart, the saved state can list a trial's oldest kept checkpoint after
    Tune has deleted it (registering one more checkpoint deletes the oldest). A trial resumed from
    that state still resumes from its latest checkpoint, which exists (:func:`_cannot_wait`), but at
    its next checkpoint Tune deletes the listed one again, and Ray 2.60's ``_delete_fs_path`` raises
    ``FileNotFoundError`` for a missing path: Tune then logs the error and skips the rest of the
    checkpoint's bookkeeping (its index, the trial's next save). A path that is gone is deleted
    already; anything else still raises. Idempotent."""
    from ray.train._internal import checkpoint_manager

    original = checkpoint_manager._delete_fs_path
    if getattr(original, "_tolerant", False):
        return

    def _delete_fs_path(fs, fs_path: str) -> None:  # noqa: ANN001 - pyarrow's FileSystem
        try:
            original(fs=fs, fs_path=fs_path)
        except FileNotFoundError:
            pass

    _delete_fs_path._tolerant = _delete_fs_path.__wrapped__ = original  # type: ignore[attr-defined]
    checkpoint_manager._delete_fs_path = _delete_fs_path


def encode_state_incrementally() -> None:
    """Make ``TuneController.save_to_dir`` encode only the trials that changed since its last save
    (:func:`encode_experiment_state`) and replace ``experiment_state-*.json`` atomically (Tune
    truncated and rewrote it in place). The file's bytes are Tune's; the searcher's and the
    callbacks' states are saved by Tune's own code. Where Tune's internals differ from 2.60's the
    patch leaves Tune's behaviour alone."""
    from ray.tune.execution.tune_controller import TuneController

    original = TuneController.save_to_dir
    if getattr(original, "_incremental", False):
        return
    caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # controller -> its trials' encodings

    def save_to_dir(self) -> None:
        global _saves_replace
        needed = ("_get_trial_checkpoints", "_storage", "_search_alg", "_callbacks", "_session_str")
        if not all(hasattr(self, name) for name in needed):
            _saves_replace = False
            return original(self)
        pieces = encode_experiment_state(
            self._get_trial_checkpoints(),
            self.__getstate__(),
            {"start_time": self._start_time},
            caches.setdefault(self, {}),
        )
        staging = Path(self._storage.experiment_driver_staging_path)
        staging.mkdir(parents=True, exist_ok=True)
        target = staging / self.experiment_state_file_name
        tmp = staging.parent / f".{target.name}.tmp{os.getpid()}"  # Tune's syncer copies `staging` meanwhile
        with open(tmp, "wb") as f:
            f.writelines(pieces)
        os.replace(tmp, target)
        _saves_replace = True
        self._search_alg.save_to_dir(str(staging), session_str=self._session_str)
        self._callbacks.save_to_dir(str(staging), session_str=self._session_str)

    save_to_dir._incremental = True  # type: ignore[attr-defined]
    save_to_dir.__doc__ = original.__doc__
    TuneController.save_to_dir = save_to_dir


def _cannot_wait(manager, pending, saved: frozenset) -> bool:  # noqa: ANN001 - Tune's internal types
    """Whether a save is due now: a marked trial that the last save did not hold, or that failed
    (ERROR), or a trial one checkpoint short of the number Tune keeps (``num_to_keep``: registering
    one more deletes the oldest, which the last save may still name as its latest)."""
    if any(t.trial_id not in saved or t.status == FAILED for t in pending):
        return True
    keep = getattr(manager, "_sync_every_n_trial_checkpoints", None)
    counts = getattr(manager, "_trial_num_checkpoints_since_last_sync", {})
    return bool(keep) and any(n >= keep - 1 for n in counts.values())


def save_state_when_due(every_s: float = SAVE_EVERY_S) -> None:
    """Make Tune save its experiment state in a step where a trial appeared that the last save did
    not hold, a trial failed, or a trial is one checkpoint short of the ``num_to_keep`` that Tune
    keeps (:func:`_cannot_wait`; the study keeps 3, so a trial that reports every few seconds is
    saved every second checkpoint); otherwise where some trial changed and ``every_s`` seconds have
    passed since the last save. A forced save (the end of the study, an interrupt, Tune's own
    consistency syncs) always happens.

    With ``TUNE_GLOBAL_CHECKPOINT_S=0`` Tune 2.60 saves its whole state at the end of *every* step
    of its event loop (a step ends after each event, or after 0.1 s without one): ~10 saves per
    result with 100 trivial trials, each serialising every trial, the searcher and the callbacks.
    Tune's own period (``TUNE_GLOBAL_CHECKPOINT_S``, 10 s or more) is worse the other way: a study
    killed within it re-ran finished trials as new ones and lost trials that had started. Here a new
    trial is saved before it can report (so it is never run twice under two ids), a failed one at
    once (a rerun could succeed where Optuna was told it failed), and what a kill can lose is the
    last few seconds of results of the other trials (at most ``every_s`` and one unsaved
    checkpoint each, finished trials included; one more where the kill comes between a save and
    the copy :class:`study.results.ResultsCallback` makes of it): those trials resume from their
    last saved checkpoint, which still exists, and run those epochs again, to the same values (the
    training resumes exactly); the tables and Optuna take the repeated values in place of the first
    ones (:mod:`study.tables`, :class:`study.search.StudySearch`). Where Tune's internals differ
    from 2.60's the patch leaves Tune's behaviour alone.
    """
    from ray.tune.execution.tune_controller import TuneController

    original = getattr(TuneController.checkpoint, "_tune_checkpoint", TuneController.checkpoint)
    last: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # controller -> (time, saved trial ids)

    def checkpoint(self, force: bool = False, wait: bool = False):
        manager = getattr(self, "_checkpoint_manager", None)
        pending = getattr(self, "_trials_to_cache", None)
        trials = getattr(self, "_trials", None)
        if manager is None or pending is None or trials is None:
            return original(self, force=force, wait=wait)
        if not force and not getattr(manager, "_should_force_sync_up", True):
            if not pending:
                return None  # nothing changed since the last save
            at, saved = last.get(self, (float("-inf"), frozenset()))
            if not _cannot_wait(manager, pending, saved) and time.monotonic() - at < every_s:
                return None  # the marked trials stay marked for the next save
        out = original(self, force=force, wait=wait)
        last[self] = (time.monotonic(), frozenset(t.trial_id for t in trials))
        return out

    checkpoint._tune_checkpoint = original  # type: ignore[attr-defined]
    checkpoint.__doc__ = original.__doc__
    TuneController.checkpoint = checkpoint
