"""The study folder this driver runs, for what Tune restores from its pickles.

Tune pickles the study's callbacks with the tuner (``tuner.pkl``) and the searcher with each state
save, and each holds the study folder's absolute path: the tables and their pushes
(:class:`study.results.ResultsCallback`), Optuna's SQLite file (:class:`study.search.StudySearch`),
MLflow's default store and W&B's folder (:mod:`study.trackers`). A study resumed from another folder
(the working copy of a study on object storage, pulled on another machine or in another directory; a
study folder that was moved) must not write into the old path, or fail to open it. ``study/run.py``
sets the home before Tune restores (:func:`set_home`), and what is unpickled then follows it
(:func:`moved`, :func:`home`). Standard library only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_home: dict[str, Any] = {}


def set_home(study_dir: Path, remote: Any = None) -> None:
    """The study this driver runs: its folder (a working copy for object storage) and its
    :class:`study.storage.RemoteStudy`, or None."""
    _home.clear()
    _home.update(study_dir=Path(study_dir), remote=remote)


def home(default: str | Path) -> Path:
    """The study folder this driver runs, or ``default`` (the path a restored object was saved with)
    where none is set."""
    return Path(_home.get("study_dir", default))


def home_remote(default: Any) -> Any:
    """The object storage of the study this driver runs (None for a local study), or ``default`` where
    no home is set."""
    return _home["remote"] if "study_dir" in _home else default


def moved(path: str, name: str) -> str:
    """``path``, a file ``<old study>/<name>`` or ``sqlite:///<old study>/<name>``, in the home study
    folder; any other path (a user's own MLflow server or file) as it is."""
    if "study_dir" not in _home:
        return path
    prefix = "sqlite:///" if path.startswith("sqlite:///") else ""
    if Path(path[len(prefix) :]).name != name:
        return path
    return prefix + str(_home["study_dir"] / name)
