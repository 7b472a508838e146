"""A study on object storage: ``--results s3://bucket/prefix`` (any URI pyarrow opens: ``s3://``,
``gs://``, ``abfs://``, ``file://``; options in the query, e.g. ``?endpoint_override=host:port&scheme=http``
for a MinIO or other S3-compatible server; credentials from the usual environment variables).

The study lives at ``<uri>/<name>/`` with the layout of a local study folder (:mod:`study.layout`):

* Tune writes its own state and every trial's checkpoints there (``storage_path``);
* a trial writes its files (TensorBoard run, ``best.pt``, preview) into its working directory on
  whichever node runs it, and Tune uploads them into the trial's folder as artifacts, at every
  checkpoint and at the trial's end (:func:`study.trainable.train_trial`); trials read their data
  without the driver's index cache, so nothing is written into a folder of the driver's;
* the driver keeps its own files (``study.json``, the tables and their journal, ``optuna.db``,
  ``reference_trial``, the report, ``mlflow.db``) in a local working copy,
  ``results/.object_storage/<scheme>/<bucket>/<prefix>/<name>/``, and pushes them after every save of
  Tune's state (:class:`study.results.ResultsCallback`) in the order of the local rule: the tables,
  ``optuna.db`` (every Optuna trial the state names), a complete copy of Tune's state, and, once Optuna
  has been told what that state holds, ``optuna.db`` again (:meth:`RemoteStudy.push_driver`);
* Tune's state copy (``.tune_state/`` locally) is pushed as one set: ``.tune_state/<n>/`` with the
  three files of one save, then ``.tune_state/current`` naming ``<n>`` (an object store has no
  atomic rename; a kill mid-push leaves ``current`` on the previous, complete set).

A resume needs nothing but the URI, on any machine or in any directory: :meth:`RemoteStudy.pull_driver`
replaces the working copy with the driver's files on the URI (the URI is the truth; a copy left here
may be ahead of it), the state is repaired locally as for a local study, the set Tune will load is put
back on the URI (:meth:`RemoteStudy.publish_state`), and what Tune restores from its pickles follows
the new working copy (:mod:`study.home`). ``study/report.py <uri>/<name>`` downloads the trial folders
without their checkpoints (:meth:`RemoteStudy.pull_trials`), writes the report and pushes it.

One driver per study: the working copy's lock (:mod:`study.lock`) and a lease on the URI
(:mod:`study.lease`). pyarrow only; no Ray.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from study.layout import (
    BEST_CHECKPOINT,
    JOURNAL_FILE,
    LOCK_FILE,
    MLFLOW_FILE,
    OPTUNA_FILE,
    PIDFILE,
    REFERENCE_FILE,
    ROBUSTNESS_FILE,
    STATE_FILE,
    TRIALS_FILE,
    TUNE_STATE_DIR,
    WANDB_DIR,
)

URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
WORKING_COPIES = Path("results") / ".object_storage"  # under the driver's working directory
CURRENT = "current"  # in TUNE_STATE_DIR on the URI: the number of the last complete set
# never pushed, and kept through a pull: this machine's processes, and W&B's offline runs (wandb sync uploads them)
LOCAL_ONLY = {LOCK_FILE, PIDFILE, WANDB_DIR}
# the driver's files, pushed in this order after each save of Tune's state (the tables may run ahead
# of the state copy, never behind it; Optuna is told after the copy that holds what it is told)
TABLES = (TRIALS_FILE, ROBUSTNESS_FILE, JOURNAL_FILE)
AFTER_STATE = (OPTUNA_FILE, REFERENCE_FILE, STATE_FILE, MLFLOW_FILE)


class StorageError(Exception):
    """The object storage cannot be used as asked: one line naming the URI."""


def is_uri(text: str | os.PathLike) -> bool:
    """Whether ``--results`` names object storage (``scheme://...``) rather than a folder."""
    return bool(URI.match(str(text)))


def study_uri(results: str, name: str) -> str:
    """``<results>/<name>``, the query (the storage's options) kept at the end."""
    parts = urlsplit(results)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + name))


def _host(uri: str) -> str:
    """The URI's bucket or host, without credentials written into it (``s3://KEY:SECRET@bucket``)."""
    return urlsplit(uri).netloc.rpartition("@")[2]


def shown(uri: str) -> str:
    """The URI without its query (long options) and without credentials: for messages."""
    return urlunsplit(urlsplit(uri)._replace(netloc=_host(uri), query="", fragment=""))


def working_copy(uri: str, root: Path | None = None) -> Path:
    """The driver's local folder for the study at ``uri``: ``results/.object_storage/<scheme>/<bucket>/<path>``."""
    parts = urlsplit(uri)
    return (root or WORKING_COPIES).resolve() / parts.scheme / _host(uri) / parts.path.strip("/")


class RemoteStudy:
    """The study at ``uri`` (``<results>/<name>``, with its options) and the driver's working copy
    ``local``; picklable (the filesystem is opened again where it is used)."""

    def __init__(self, uri: str, local: Path | None = None) -> None:
        self.uri, self.local = uri, local if local is not None else working_copy(uri)
        self._fs: Any = None
        self._path = ""
        self._pushed: dict[str, Any] = {}  # relative path -> (size, mtime_ns) when pushed
        self._number: int | None = None  # the last state set pushed (.tune_state/<n>), once known

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "local": self.local, "_fs": None, "_path": "", "_pushed": {}, "_number": None}

    @property
    def shown(self) -> str:
        return shown(self.uri)

    @property
    def fs(self) -> Any:
        if self._fs is None:
            import pyarrow.fs as pafs

            try:
                self._fs, self._path = pafs.FileSystem.from_uri(self.uri)
            except Exception as exc:  # noqa: BLE001 - pyarrow's ArrowInvalid, OSError, ...
                raise StorageError(f"--results {self.shown}: cannot open it: {first_line(exc)}") from None
        return self._fs

    @property
    def path(self) -> str:
        self.fs  # noqa: B018 - opens it
        return self._path

    def tune_storage(self) -> tuple[Any, str, str]:
        """Tune's ``storage_filesystem``, ``storage_path`` (the results prefix) and run name."""
        parent, _, name = self.path.rstrip("/").rpartition("/")
        return self.fs, parent, name

    def remote(self, rel: str) -> str:
        return f"{self.path}/{rel}" if rel else self.path

    # -- reading -------------------------------------------------------------------------------
    def check(self) -> None:
        """Write, read and delete a marker under the study's prefix: StorageError in one line where the
        storage cannot be reached, the bucket does not exist or the credentials do not allow it."""
        rel = f".storage_check_{os.getpid()}"
        try:
            self.write_bytes(rel, b"ok")
            if self.read_bytes(rel) != b"ok":
                raise OSError("what was written reads back differently")
            self.fs.delete_file(self.remote(rel))
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - OSError from pyarrow with the service's message
            raise StorageError(f"--results {self.shown}: cannot write there: {first_line(exc)}") from None

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.remote(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes | None:
        """The object's bytes, or None where it is missing."""
        try:
            with self.fs.open_input_stream(self.remote(rel)) as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            if "not found" in str(exc).lower() or "NoSuchKey" in str(exc):
                return None
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        """One object, whole (an object store's writes are whole or nothing)."""
        with self._output(rel) as f:
            f.write(data)

    def _output(self, rel: str) -> Any:
        """A stream that writes the object ``rel``; on a file system (``file://``) its folder is made first."""
        path = self.remote(rel)
        if self.fs.type_name == "local":
            self.fs.create_dir(path.rpartition("/")[0], recursive=True)
        return self.fs.open_output_stream(path)

    def listing(self, rel: str = "", recursive: bool = False) -> list[tuple[str, bool]]:
        """``(path relative to the study, is a folder)`` under ``rel``; empty where it is missing."""
        import pyarrow.fs as pafs

        base = self.remote(rel)
        infos = self.fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=recursive))
        root = self.path.rstrip("/") + "/"
        return [(i.path[len(root) :], i.type == pafs.FileType.Directory) for i in infos if i.path.startswith(root)]

    def download(self, rel: str, dest: Path) -> None:
        """The object ``rel`` into ``dest``, replacing it at once (a kill leaves the old file or the new)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
        with self.fs.open_input_stream(self.remote(rel)) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp, dest)

    # -- the driver's files --------------------------------------------------------------------
    def push(self, rel: str, force: bool = False) -> bool:
        """Upload the working copy's ``rel`` where it changed since this driver last pushed it (or
        ``force``); whether it did. A file missing here is left alone there."""
        src = self.local / rel
        try:
            st = src.stat()
        except OSError:
            return False
        mark = (st.st_size, st.st_mtime_ns)
        if not force and self._pushed.get(rel) == mark:
            return False
        with open(src, "rb") as f, self._output(rel) as out:
            shutil.copyfileobj(f, out, 1 << 20)
        self._pushed[rel] = mark
        return True

    def push_driver(self, stage: str = "all") -> None:
        """The driver's files after a save of Tune's state, in the order of the local rule. ``"state"``
        (before Optuna is told what that save holds): the state copy mirrored into the working copy
        (:meth:`mirror_state`), then pushed: the tables (they may run ahead of the state copy, never
        behind it), ``optuna.db`` (its asks: every Optuna trial the state names), Tune's state copy as one
        set (:meth:`push_state`). ``"rest"`` (after Optuna was told): ``optuna.db`` again and the other
        files. ``"all"``: both, each file where it changed."""
        if stage in ("state", "all"):
            from study.tune_state import saved_set

            files = saved_set(self.local / TUNE_STATE_DIR)  # parsed once a save, for both
            self.mirror_state(files)
            for rel in (*TABLES, OPTUNA_FILE):
                self.push(rel)
            self.push_state(files)
        if stage in ("rest", "all"):
            for rel in AFTER_STATE:
                self.push(rel)

    def mirror_state(self, files: list[Path] | None) -> None:
        """The working copy's Tune state files become its state copy's ``files`` (hard links where
        possible), as in a local study folder, where Tune writes them: what reads the folder (the trials'
        statuses at the end, the report) sees the state of this session, not the one pulled at its start."""
        from study.tune_state import copy_atomic

        for f in files or []:
            copy_atomic(f, self.local / f.name, link=True)

    def push_state(self, files: list[Path] | None) -> bool:
        """The working copy's ``.tune_state/`` (``files``: one complete save, :func:`study.tune_state.saved_set`)
        as ``.tune_state/<n>/`` (emptied first: a push cut short may have left files of another session
        there) followed by ``.tune_state/current`` = n; the previous set is deleted after."""
        if files is None:
            return False
        marks = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        if self._pushed.get(TUNE_STATE_DIR) == marks:
            return False
        if self._number is None:  # once per driver: older sets, left by a kill, go too
            self._number = self._state_number()
            stale = [rel for rel, is_dir in self.listing(TUNE_STATE_DIR) if is_dir]
        else:
            stale = [f"{TUNE_STATE_DIR}/{self._number}"]
        number = self._number + 1
        folder = self.remote(f"{TUNE_STATE_DIR}/{number}")
        self.fs.delete_dir_contents(folder, missing_dir_ok=True)
        for f in files:
            with open(f, "rb") as src, self._output(f"{TUNE_STATE_DIR}/{number}/{f.name}") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        self.write_bytes(f"{TUNE_STATE_DIR}/{CURRENT}", str(number).encode())
        self._number, self._pushed[TUNE_STATE_DIR] = number, marks
        for rel in stale:
            if rel != f"{TUNE_STATE_DIR}/{number}":
                if self.exists(rel):
                    self.fs.delete_dir(self.remote(rel))
        return True

    def _state_number(self) -> int:
        text = self.read_bytes(f"{TUNE_STATE_DIR}/{CURRENT}")
        try:
            return int(text or b"0")
        except ValueError:
            return 0

    def push_tree(self, rel: str) -> None:
        """The working copy's folder ``rel`` (the report): every file pushed, and files there that are no
        longer here (a figure not drawn this time) deleted."""
        here = {p.relative_to(self.local).as_posix() for p in (self.local / rel).rglob("*") if p.is_file()}
        for name in sorted(here):
            self.push(name, force=True)
        for name, is_dir in self.listing(rel, recursive=True):
            if not is_dir and name not in here:
                self.fs.delete_file(self.remote(name))

    def pull_driver(self) -> bool:
        """Make the working copy the driver's files on the URI: its top-level files (the driver's and
        Tune's state files) and the last complete set of Tune's state copy; whatever else the working copy
        held is removed first (but this driver's lock). Whether a study is there."""
        self.local.mkdir(parents=True, exist_ok=True)
        for path in self.local.iterdir():  # the URI is the truth: nothing of an earlier copy stays
            if path.name in LOCAL_ONLY:
                continue
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if not self.exists(STATE_FILE):
            return False
        for rel, is_dir in self.listing():
            if not is_dir and not rel.rpartition("/")[2].startswith((".storage_check", ".lease_probe", "driver.lease")):
                self.download(rel, self.local / rel)
        number = self._state_number()
        files = [rel for rel, is_dir in self.listing(f"{TUNE_STATE_DIR}/{number}") if not is_dir] if number else []
        backup = self.local / TUNE_STATE_DIR
        for rel in files:
            self.download(rel, backup / rel.rpartition("/")[2])
        if files:
            from study.tune_state import record_set

            record_set(backup, [backup / rel.rpartition("/")[2] for rel in files])
        return True

    @contextlib.contextmanager
    def reading(self) -> Iterator[bool]:
        """The study brought into the working copy for a reader (the report, ``--dashboard``), under the
        working copy's lock for the block: the driver's files pulled unless this machine's driver holds
        that lock (its copy is current), the trials' files in either case. Yields whether a study is there."""
        from study.lock import StudyBusy, lock_study

        try:
            lock = lock_study(self.local)
        except StudyBusy:
            lock = None
        try:
            found = lock is None or self.pull_driver()
            if found:
                self.pull_trials()
            yield found
        finally:
            if lock is not None:
                lock.close()

    def pull_trials(self, models: bool = True) -> int:
        """Every trial folder's files but its checkpoints (``best.pt``, TensorBoard runs, previews) into
        the working copy, where they are missing or differ from the URI's in size or modification time
        (which the downloaded copy keeps); how many files were downloaded. ``models=False`` leaves the
        ``best.pt`` files on the URI too (the end of a study without a report needs none of them)."""
        import pyarrow.fs as pafs

        root = self.path.rstrip("/") + "/"
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True, recursive=True))
        count = 0
        for info in infos:
            rel = info.path[len(root) :]
            parts = rel.split("/")
            trial = parts[0].startswith("trial_") or "_trial_" in parts[0]
            if info.type != pafs.FileType.File or len(parts) < 2 or not trial:
                continue
            if any(p.startswith("checkpoint_") for p in parts[1:]) or (not models and parts[-1] == BEST_CHECKPOINT):
                continue
            dest = self.local / rel
            stamp = info.mtime_ns
            try:
                st = dest.stat()
                if st.st_size == info.size and (stamp is None or st.st_mtime_ns == stamp):
                    continue
            except OSError:
                pass
            self.download(rel, dest)
            if stamp is not None:
                os.utime(dest, ns=(stamp, stamp))
            count += 1
        return count

    def publish_state(self, names: list[str]) -> None:
        """After a local repair: Tune's state files on the URI become the working copy's ``names`` (the
        set Tune will restore); every other state file there is deleted (Tune loads the newest)."""
        from study.tune_state import STATE_PATTERNS, session_of

        keep = set(names)
        for name in names:
            self.push(name, force=True)
        for rel, is_dir in self.listing():
            if not is_dir and rel not in keep and session_of(rel) is not None:
                if any(_matches(rel, p) for p in STATE_PATTERNS):
                    self.fs.delete_file(self.remote(rel))

    def reference_best(self, record: dict[str, Any], dest: Path) -> str | None:
        """The reference trial's ``best.pt`` (``record``: its ``reference_trial``) downloaded to ``dest``."""
        rel = record.get("best_rel")
        if not rel:
            return None
        self.download(rel, dest)
        return str(dest)


def _matches(name: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatch(name, pattern)


def first_line(exc: BaseException) -> str:
    """An exception's first line (pyarrow's can run to several), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
