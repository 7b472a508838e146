"""A sampled space's reference trial (``reference:`` in the space, :mod:`study.space_sections`): the
configuration the searcher runs first (:class:`study.search.StudySearch`), e.g. the standard model
beside a search over defences, which the report compares every trial with and which trials with
``init_from: reference`` fine-tune.

The driver, which sees every trial end whatever ends it (its last epoch, early stopping, a scheduler,
an error), writes ``reference_trial`` in the study folder when the reference trial ends
(:func:`record_reference`, from :class:`study.results.ResultsCallback`). A fine-tuned trial waits for
that file (:func:`reference_checkpoint`) and starts from the reference's ``best.pt``; a reference
that ended without one fails the fine-tuned trial in one line. The reference is the first trial the
searcher makes, so it runs before (or beside) any trial that waits for it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from study.layout import BEST_CHECKPOINT, REFERENCE_FILE, REFERENCE_INIT, REFERENCE_KEY

if TYPE_CHECKING:
    from study.storage import RemoteStudy

POLL_S = 2.0
WAIT_S = 120.0  # the longest a fine-tuned trial waits for the reference's record


def is_reference(config: dict[str, Any]) -> bool:
    """Whether a trial's config is the space's reference trial."""
    return bool(config.get(REFERENCE_KEY, False))


def record_reference(
    study_dir: Path, trial_id: str, trial_folder: Path | None, status: str, remote: RemoteStudy | None = None
) -> None:
    """The reference trial ``trial_id`` ended with ``status`` (driver side): ``reference_trial``, written
    atomically (and pushed at once where the study is on object storage, ``remote``: its ``best.pt``
    is there, as ``best_rel`` relative to the study)."""
    best = trial_folder / BEST_CHECKPOINT if trial_folder is not None else None
    info = {
        "trial_id": trial_id,
        "folder": trial_folder.name if trial_folder is not None else None,
        "status": status,
        "best": str(best) if best is not None and best.is_file() else None,
    }
    if remote is not None and trial_folder is not None:
        rel = f"{trial_folder.name}/{BEST_CHECKPOINT}"
        info["best_rel"] = rel if remote.exists(rel) else None
        info["best"] = f"{remote.shown}/{rel}" if info["best_rel"] else None
    tmp = study_dir / f".{REFERENCE_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, study_dir / REFERENCE_FILE)
    if remote is not None:
        remote.push(REFERENCE_FILE, force=True)


def reference_trial_id(study_dir: Path) -> str | None:
    """The reference trial's id, once it has ended (None: no reference, or not yet)."""
    try:
        return str(json.loads((Path(study_dir) / REFERENCE_FILE).read_text())["trial_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _record(study_dir: Path, remote: RemoteStudy | None) -> str | None:
    """The text of ``reference_trial``, or None while it is missing."""
    if remote is not None:
        data = remote.read_bytes(REFERENCE_FILE)
        return data.decode() if data is not None else None
    path = Path(study_dir) / REFERENCE_FILE
    return path.read_text() if path.is_file() else None


def reference_checkpoint(
    study_dir: Path,
    say: Callable[[str], None],
    poll_s: float = POLL_S,
    wait_s: float = WAIT_S,
    remote: RemoteStudy | None = None,
    work: Path | None = None,
) -> str:
    """The reference trial's ``best.pt`` (worker side), once it has ended; RuntimeError in one line
    where it ended without one, or where its record has not appeared within ``wait_s`` (the searcher
    starts no fine-tuned trial before the reference has ended, so only a slow shared file system makes
    one wait; never for ever: the trial fails and Tune retries it, ``--max-failures``). With object
    storage (``remote``) the record is read there and the file downloaded into ``work``."""
    where = f"{remote.shown}/{REFERENCE_FILE}" if remote is not None else str(Path(study_dir) / REFERENCE_FILE)
    text = _record(study_dir, remote)
    if text is None:
        say("fine-tuning: waiting for the space's reference trial to end (its best.pt is this trial's start)")
    deadline = time.monotonic() + wait_s
    while text is None:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"init_from: reference: no record of the reference trial's end in {where} after {wait_s:g} s"
            )
        time.sleep(poll_s)
        text = _record(study_dir, remote)
    info = json.loads(text)
    if not info.get("best"):
        raise RuntimeError(
            f"init_from: reference: the reference trial {info.get('folder')} ended {info.get('status')} "
            "without a best.pt to fine-tune"
        )
    if remote is not None:
        dest = (work or Path(study_dir)) / f"reference_{BEST_CHECKPOINT}"
        return remote.reference_best(info, dest) or str(info["best"])
    here = Path(study_dir) / info["folder"] / BEST_CHECKPOINT if info.get("folder") else None
    return str(here) if here is not None and here.is_file() else str(info["best"])  # a moved study folder too


def resolve_sampled(
    sampled: dict[str, Any],
    study_dir: Path,
    say: Callable[[str], None],
    remote: RemoteStudy | None = None,
    work: Path | None = None,
) -> dict[str, Any]:
    """A trial's sampled values as TrainConfig values: without the reference flag, and with
    ``init_from: reference`` replaced by the reference's ``best.pt`` (after waiting for it)."""
    out = {k: v for k, v in sampled.items() if k != REFERENCE_KEY}
    if out.get("init_from") == REFERENCE_INIT:
        out["init_from"] = reference_checkpoint(study_dir, say, remote=remote, work=work)
    return out
