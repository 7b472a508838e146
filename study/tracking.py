"""Experiment tracking for a study: ``--track mlflow[=URI]`` and ``--track wandb`` (repeatable).

Each attaches one of Ray Tune's own logger callbacks (:mod:`study.trackers`: MLflow's
``MLflowLoggerCallback``, W&B's ``WandbLoggerCallback``): one run per trial, named as its
TensorBoard run (the trial's folder), with

* the hyperparameters of TensorBoard's HParams (:func:`study.trainable.hparams_of`; budgets as
  ``epsilon_ref``, in the space's 320x320 units), logged when the trial starts;
* the scalars of TensorBoard, under the same tags (:func:`tracked_metrics`: ``val/nmse``,
  ``rob/pgd_e5000_nmse``, ``best/val_nmse``, and on the last epoch the held-out ``report/nmse``,
  ``report_zero_filled/ssim``, ...), at step = epoch;
* the trial's status (:func:`trial_status`), as the ``status`` column of ``trials.parquet`` has it:
  ``RUNNING`` from the start, then ``TERMINATED``, ``early_stopped``, ``nan`` or ``ERROR``.

MLflow: the tracking URI defaults to a SQLite store in the study folder (``sqlite:///<study>/mlflow.db``;
MLflow 3 refuses its old ``file:`` store unless ``MLFLOW_ALLOW_FILE_STORE=true``), the experiment is
the study's name. W&B: the project is the study's name, the files go to ``<study>/wandb/``, and
the mode comes from ``WANDB_MODE`` (``offline`` logs locally, never logging in; default
``online``). A resumed study keeps the tracking it started with (Tune restores its callbacks), and
reopens each trial's run: the MLflow run tagged with the trial's id, the W&B run whose id is the
trial's id.

This module imports neither Ray nor the trackers: it is what the runner checks before Ray starts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from study.board import ATTACK_METRICS, SCALARS, report_scalar_tag, tag_of
from study.layout import MLFLOW_FILE, STATE_FILE, WANDB_DIR
from study.plan import Refused

# tracker -> (the package it needs, the name a person knows it by)
TRACKERS = {"mlflow": ("mlflow", "MLflow"), "wandb": ("wandb", "W&B")}
INSTALL_EXTRA = 'pip install -e ".[track]"'
RUNNING = "RUNNING"


@dataclass(frozen=True)
class Tracker:
    """One ``--track`` value: the tracker and, for MLflow, its tracking URI ("" for the default)."""

    kind: str
    uri: str = ""

    @property
    def spec(self) -> str:
        """As typed on the command line (and kept in ``study.json``)."""
        return f"{self.kind}={self.uri}" if self.uri else self.kind


def parse_track(values: Iterable[str] | None) -> list[Tracker]:
    """The ``--track`` values, each ``mlflow``, ``mlflow=URI`` or ``wandb``; ValueError naming the bad one."""
    out: list[Tracker] = []
    for value in values or ():
        kind, _, uri = value.partition("=")
        if kind not in TRACKERS:
            raise ValueError(f"--track {value}: unknown tracker {kind!r} (choose from {', '.join(TRACKERS)})")
        if kind == "wandb" and uri:
            raise ValueError(f"--track {value}: wandb takes no value (W&B reads WANDB_* environment variables)")
        if "=" in value and not uri:
            raise ValueError(f"--track {value}: give a tracking URI after '=', or none for the default")
        if any(t.kind == kind for t in out):
            raise ValueError(f"--track {kind} given twice")
        out.append(Tracker(kind, uri))
    return out


def tracking_problem(values: Iterable[str] | None) -> str | None:
    """What is wrong with the ``--track`` values, checked before Ray starts: a bad value, a tracker
    whose package is not installed (the ``[track]`` extra), online W&B without an API key; or None."""
    try:
        trackers = parse_track(values)
    except ValueError as exc:
        return str(exc)
    return missing_extra(trackers) or login_problem(trackers)


def missing_extra(trackers: Iterable[Tracker]) -> str | None:
    """The message for the first tracker whose package is not installed, or None."""
    for t in trackers:
        package, known_as = TRACKERS[t.kind]
        if importlib.util.find_spec(package) is None:
            return f"--track {t.kind} needs {known_as}: {INSTALL_EXTRA}"
    return None


def wandb_mode() -> str:
    """W&B's mode for the study's runs: ``WANDB_MODE`` (``online``, ``offline``, ``disabled``),
    read by the driver and passed to every run (a cluster's workers need not share its environment)."""
    return os.environ.get("WANDB_MODE") or "online"


def login_problem(trackers: Iterable[Tracker]) -> str | None:
    """Online W&B without an API key fails once Ray has started (Ray's own check): say so before.
    The check is Ray's (``WANDB_API_KEY``, ``wandb login``'s netrc, its key hook); no network."""
    if not any(t.kind == "wandb" for t in trackers) or wandb_mode() in ("offline", "disabled"):
        return None
    from ray.air.integrations.wandb import _set_api_key  # imports Ray, not starts it

    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:  # wandb warns that the credential check it uses is deprecated
            _set_api_key(None, None)
        except ValueError:
            return "--track wandb: no W&B API key (run `wandb login` or set WANDB_API_KEY; WANDB_MODE=offline logs locally)"
    return None


def settle_tracking(requested: list[Tracker], study_dir: Path, name: str, resuming: bool) -> list[Tracker]:
    """The study's trackers, with MLflow's default URI filled in. A new study records them in its
    ``study.json``; a resumed one keeps those it started with (Tune restores its callbacks), with a
    note where ``--track`` asked for others. Prints where the runs go; :class:`Refused` where a
    resumed study's tracker is not installed."""
    state_file = study_dir / STATE_FILE
    state = json.loads(state_file.read_text())
    if resuming:
        trackers = parse_track(state.get("track", []))
        asked = {resolved(t, study_dir).spec for t in requested}
        if requested and asked != {t.spec for t in trackers}:
            print("note: --track ignored: a resumed study keeps the tracking it started with")
        problem = missing_extra(trackers)
        if problem:
            raise Refused(f"study '{name}' was started with {problem}")
    else:
        trackers = [resolved(t, study_dir) for t in requested]
        if trackers:
            state["track"] = [t.spec for t in trackers]
            state_file.write_text(json.dumps(state, indent=2))
    for t in trackers:
        print(f"tracking: {where(t, name, study_dir)}")
    return trackers


def resolved(tracker: Tracker, study_dir: Path) -> Tracker:
    """MLflow's default URI: a SQLite store in the study folder."""
    if tracker.kind == "mlflow" and not tracker.uri:
        return Tracker("mlflow", f"sqlite:///{study_dir / MLFLOW_FILE}")
    return tracker


def where(tracker: Tracker, name: str, study_dir: Path) -> str:
    """Where a tracker's runs go, for the console: ``mlflow ui`` or ``wandb sync`` to see them."""
    if tracker.kind == "mlflow":
        return f"MLflow {tracker.uri}, experiment '{name}' (mlflow ui --backend-store-uri {tracker.uri})"
    mode = wandb_mode()
    line = f"W&B project '{name}', {mode}"
    if mode == "offline":
        line += f": runs in {study_dir / WANDB_DIR} (wandb sync {study_dir / WANDB_DIR}/offline-run-* uploads them)"
    return line


def tracked_metrics(result: dict[str, Any], objectives: Iterable[str]) -> dict[str, float]:
    """One Tune result as TensorBoard's scalars of that epoch (:class:`study.board.TrialBoard`), tag
    -> value: the per-epoch scalars, the attacks on the selection slices, each objective at the best
    epoch so far, and on the last epoch the held-out report (``report/...``, ``report_zero_filled/...``).
    Values that are not finite numbers are left out, as TensorBoard leaves them out.

    Tune's result packs most numbers into ``record_json`` (:func:`study.trainable.tune_result`);
    it is unpacked here."""
    flat = {**result, **json.loads(result.get("record_json") or "{}")}
    out: dict[str, float] = {}
    for tag, key in SCALARS:
        out[tag] = flat.get(key)
    for key, value in flat.items():
        if key.startswith("rob_") and _attack_metric(key) in ATTACK_METRICS:
            out[tag_of(key)] = value
        elif key.startswith(("report_", "zf_report_")):
            tag = report_scalar_tag(key)
            if tag is not None:
                out[tag] = value
    for metric in objectives:
        out[f"best/{metric}"] = flat.get(f"best_{metric}")
    return {tag: float(v) for tag, v in out.items() if _is_number(v)}


def trial_status(failed: bool, epoch_status: str | None) -> str:
    """A finished trial's status as ``trials.parquet`` has it: ``ERROR``, the trainer's own verdict
    on its last epoch (``nan``, ``early_stopped``), else ``TERMINATED``."""
    if failed:
        return "ERROR"
    return epoch_status if epoch_status in ("nan", "early_stopped") else "TERMINATED"


def _attack_metric(key: str) -> str:
    """``rob_pgd_e5000_d_nmse`` -> ``d_nmse``; ``rob_pgd_e5000_ssim`` -> ``ssim``."""
    parts = key.rsplit("_", 2)
    return f"d_{parts[-1]}" if parts[-2] == "d" else parts[-1]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
