"""A complete copy of Tune's experiment state, so that a hard-killed study always resumes.

Tune keeps its experiment state in three files per driver session: ``experiment_state-<session>.json``
(the trials and their checkpoints), ``search_gen_state-<session>.json`` and
``searcher-state-<session>.pkl`` (the search algorithm, Optuna's sampler included). It writes them
into a staging folder on the driver and then copies them into the study folder in the background;
neither write is atomic. A driver killed in the middle (SIGKILL, a lost machine) leaves a truncated
file, and Tune 2.60 then fails to restore: measured here as a ``JSONDecodeError`` followed by a
fresh search without a space, in about one of ten kills while a trial reports.

So the study keeps its own copy: after every Tune step in which something happened (the staging
files are complete then: Tune writes them synchronously earlier in the same step),
:func:`backup_state` copies them atomically into ``results/<name>/.tune_state/``; and before a
resume :func:`repair_state` puts that copy back over the study folder's newest state, or moves a
truncated file aside so that Tune takes the previous complete one. Files are checked by parsing,
never by executing them (pickles are scanned with :mod:`pickletools`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import pickletools
import shutil
from pathlib import Path

from study.layout import TUNE_STATE_DIR

EXPERIMENT_STATE = "experiment_state-*.json"  # the trials; the other two hold the search algorithm
STATE_PATTERNS = (EXPERIMENT_STATE, "search_gen_state-*.json", "searcher-state-*.pkl")
CORRUPT_SUFFIX = ".corrupt"


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


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def newest(folder: Path, pattern: str) -> Path | None:
    """The file Tune restores from: the greatest name matching ``pattern`` (session timestamps sort)."""
    return max(folder.glob(pattern), default=None)


def backup_state(staging: Path, study_dir: Path) -> bool:
    """Copy the newest complete state files of Tune's driver staging folder into the study's
    ``.tune_state/`` (atomically, as one set: nothing is copied unless all three are complete).
    Returns whether a copy was made."""
    files = [newest(staging, pattern) for pattern in STATE_PATTERNS]
    if any(f is None or not ends_complete(f) for f in files):
        return False
    dest = study_dir / TUNE_STATE_DIR
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        _copy_atomic(f, dest / f.name)  # type: ignore[union-attr]
    keep = {f.name for f in files}  # type: ignore[union-attr]
    for old in dest.iterdir():
        if old.name not in keep and not old.name.startswith("."):
            old.unlink(missing_ok=True)
    return True


def repair_state(study_dir: Path) -> list[str]:
    """Before Tune restores ``study_dir``: for each state kind, the newest file is replaced by the
    study's own copy when that copy is of the same session and differs, kept when complete, and
    otherwise moved aside (``<name>.corrupt``) so that Tune takes the next newest. Returns one line
    per change, for the user."""
    notes = []
    backup = study_dir / TUNE_STATE_DIR
    for pattern in STATE_PATTERNS:
        while (current := newest(study_dir, pattern)) is not None:
            ours = backup / current.name
            if ours.is_file() and is_complete(ours):
                if ours.read_bytes() != current.read_bytes():
                    was = "truncated" if not is_complete(current) else "behind the last complete step"
                    _copy_atomic(ours, current)
                    notes.append(f"{current.name} was {was}: restored the study's own copy")
                break
            if is_complete(current):
                break
            current.rename(current.with_name(current.name + CORRUPT_SUFFIX))
            notes.append(f"{current.name} is truncated (the driver was killed while writing it): moved aside")
    return notes


def save_state_only_on_change() -> None:
    """Make Tune save its experiment state only in steps where a trial changed.

    With ``TUNE_GLOBAL_CHECKPOINT_S=0`` (which exact resume after SIGKILL needs: with Tune's default
    period a killed study re-ran finished trials and lost new ones) Tune 2.60 saves its whole state at
    the end of *every* step of its event loop, and a step ends after each event or after 0.1 s
    without one: measured with 100 trivial trials, ~10 saves per reported result, each one
    serialising every trial, the searcher and the callbacks. Tune marks a trial for its next save
    whenever anything about it changes (added, started, a result, a checkpoint, stopped; the
    searcher's state changes only with these), so a step with no marked trial would write the same
    state again: skipped here. A forced save (the end of the study, Tune's own consistency syncs)
    always happens. Where Tune's internals differ from 2.60's the patch leaves Tune's behaviour alone.
    """
    from ray.tune.execution.tune_controller import TuneController

    original = TuneController.checkpoint
    if getattr(original, "_only_on_change", False):
        return

    def checkpoint(self, force: bool = False, wait: bool = False):
        manager = getattr(self, "_checkpoint_manager", None)
        pending = getattr(self, "_trials_to_cache", None)
        if not force and pending is not None and not pending and not getattr(manager, "_should_force_sync_up", True):
            return None
        return original(self, force=force, wait=wait)

    checkpoint._only_on_change = True  # type: ignore[attr-defined]
    checkpoint.__doc__ = original.__doc__
    TuneController.checkpoint = checkpoint
