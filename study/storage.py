"""A study on object storage: ``--results s3://bucket/prefix`` (any URI pyarrow opens: ``s3://``,
``gs://``, ``abfs://``; options in the query, e.g. ``?endpoint_override=host:port&scheme=http`` for a
MinIO or other S3-compatible server; credentials from the usual environment variables).

The study lives at ``<uri>/<name>/`` with the layout of a local study folder (:mod:`study.layout`):

* Tune writes its own state and every trial's checkpoints there (``storage_path``);
* a trial writes its files (TensorBoard run, ``best.pt``, preview) into its working directory on
  whichever node runs it, and Tune uploads them into the trial's folder as artifacts, at every
  checkpoint and at the trial's end (:func:`study.trainable.train_trial`); nothing is written into a
  folder of the driver's;
* the driver keeps its own files (``study.json``, the tables and their journal, ``optuna.db``,
  ``reference_trial``, the report, ``mlflow.db``) in a local working copy,
  ``results/.object_storage/<bucket>/<prefix>/<name>/``, and pushes them beside Tune's after every
  save of Tune's state (:class:`study.results.ResultsCallback`), in the order the local rule needs:
  the tables, then a complete copy of Tune's state, then Optuna;
* Tune's state copy (``.tune_state/`` locally) is pushed as one set: ``.tune_state/<n>/`` with the
  three files of one save, then ``.tune_state/current`` naming ``<n>`` (an object store has no
  atomic rename; a kill mid-push leaves ``current`` on the previous, complete set).

A resume needs nothing but the URI: :meth:`RemoteStudy.pull_driver` replaces the working copy with
the driver's files on the URI (the URI is the truth; a copy left here may be ahead of it), the state
is repaired locally as for a local study, and the set Tune will load is put back on the URI
(:meth:`RemoteStudy.publish_state`). ``study/report.py <uri>/<name>`` downloads the trial folders
without their checkpoints (:meth:`RemoteStudy.pull_trials`), writes the report and pushes it.

One driver per study is enforced by the lock of the working copy, which is per machine: a second
driver on another machine is not stopped (object stores have no lock). pyarrow only; no Ray.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from study.layout import (
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
)

URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
WORKING_COPIES = Path("results") / ".object_storage"  # under the driver's working directory
CURRENT = "current"  # in TUNE_STATE_DIR on the URI: the number of the last complete set
LOCAL_ONLY = {LOCK_FILE, PIDFILE}  # never pushed: they describe this machine's processes
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


def shown(uri: str) -> str:
    """The URI without its query (options, never credentials, but long): for messages."""
    return urlunsplit(urlsplit(uri)._replace(query="", fragment=""))


def working_copy(uri: str, root: Path | None = None) -> Path:
    """The driver's local folder for the study at ``uri``: ``results/.object_storage/<host>/<path>``."""
    parts = urlsplit(uri)
    return (root or WORKING_COPIES).resolve() / parts.scheme / parts.netloc / parts.path.strip("/")


class RemoteStudy:
    """The study at ``uri`` (``<results>/<name>``, with its options) and the driver's working copy
    ``local``; picklable (the filesystem is opened again where it is used)."""

    def __init__(self, uri: str, local: Path | None = None) -> None:
        self.uri, self.local = uri, local if local is not None else working_copy(uri)
        self._fs: Any = None
        self._path = ""
        self._pushed: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) when pushed

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "local": self.local, "_fs": None, "_path": "", "_pushed": {}}

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
                raise StorageError(f"--results {self.shown}: cannot open it: {_first_line(exc)}") from None
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
            raise StorageError(f"--results {self.shown}: cannot write there: {_first_line(exc)}") from None

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
        with self.fs.open_output_stream(self.remote(rel)) as f:
            f.write(data)

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
        with open(src, "rb") as f, self.fs.open_output_stream(self.remote(rel)) as out:
            shutil.copyfileobj(f, out, 1 << 20)
        self._pushed[rel] = mark
        return True

    def push_driver(self) -> None:
        """The driver's files after a save of Tune's state, in the order of the local rule: the tables,
        Tune's state copy as one set (:meth:`push_state`), then Optuna and the rest."""
        for rel in TABLES:
            self.push(rel)
        self.push_state()
        for rel in AFTER_STATE:
            self.push(rel)
        self.mirror_state()

    def mirror_state(self) -> None:
        """The working copy's Tune state files become its state copy's (hard links where possible), as
        in a local study folder, where Tune writes them: what reads the folder (the trials' statuses at
        the end, the report) sees the state of this session, not the one pulled at its start."""
        from study.tune_state import copy_atomic, saved_set

        for f in saved_set(self.local / TUNE_STATE_DIR) or []:
            copy_atomic(f, self.local / f.name, link=True)

    def push_state(self) -> bool:
        """The working copy's ``.tune_state/`` (one complete save, :func:`study.tune_state.saved_set`) as
        ``.tune_state/<n>/`` followed by ``.tune_state/current`` = n; older sets are deleted after."""
        from study.tune_state import saved_set

        files = saved_set(self.local / TUNE_STATE_DIR)
        if files is None:
            return False
        marks = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        if self._pushed.get(TUNE_STATE_DIR) == marks:
            return False
        number = self._state_number() + 1
        for f in files:
            with (
                open(f, "rb") as src,
                self.fs.open_output_stream(self.remote(f"{TUNE_STATE_DIR}/{number}/{f.name}")) as out,
            ):
                shutil.copyfileobj(src, out, 1 << 20)
        self.write_bytes(f"{TUNE_STATE_DIR}/{CURRENT}", str(number).encode())
        self._pushed[TUNE_STATE_DIR] = marks  # type: ignore[assignment]
        for rel, is_dir in self.listing(TUNE_STATE_DIR):
            if is_dir and rel.rpartition("/")[2] != str(number):
                self.fs.delete_dir(self.remote(rel))
        return True

    def _state_number(self) -> int:
        text = self.read_bytes(f"{TUNE_STATE_DIR}/{CURRENT}")
        try:
            return int(text or b"0")
        except ValueError:
            return 0

    def push_tree(self, rel: str) -> None:
        """Every file of the working copy's folder ``rel`` (the report)."""
        for path in sorted((self.local / rel).rglob("*")):
            if path.is_file():
                self.push(path.relative_to(self.local).as_posix(), force=True)

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
            if not is_dir and not rel.rpartition("/")[2].startswith(".storage_check"):
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

    def pull_trials(self) -> int:
        """Every trial folder's files but its checkpoints (``best.pt``, TensorBoard runs, previews) into
        the working copy, where they differ in size; how many files were downloaded."""
        count = 0
        for folder, is_dir in self.listing():
            if not is_dir or not folder.startswith("trial_") and "_trial_" not in folder:
                continue
            for rel, sub_dir in self.listing(folder, recursive=True):
                parts = rel.split("/")
                if sub_dir or any(p.startswith("checkpoint_") for p in parts[1:]):
                    continue
                dest = self.local / rel
                size = self.fs.get_file_info(self.remote(rel)).size
                if not dest.is_file() or dest.stat().st_size != size:
                    self.download(rel, dest)
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
