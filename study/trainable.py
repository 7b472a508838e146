"""The Ray Tune trainable: a thin adapter around :func:`mriadv.fit.fit`.

It builds the trial's :class:`~mriadv.config.TrainConfig` (the study's base config plus the
sampled parameters), resumes from Tune's checkpoint when there is one, and forwards each epoch's
record to :func:`ray.tune.report` together with a checkpoint. The trial's folder is its
TensorBoard run (:class:`study.board.TrialBoard`: HParams at start, the same scalar tags in every
trial, validation images), and its console lines carry the trial's label (``[epsilon=1000 7683b80e]``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from mriadv.atomic import atomic_write
from mriadv.checkpoint import BEST_NAME, CHECKPOINT_NAME, load_checkpoint
from mriadv.config import TrainConfig
from mriadv.fit import PREVIEW_NAME, fit
from mriadv.records import EpochRecord
from mriadv.units import budgets_at_crop
from study.board import TrialBoard, hparams_metrics
from study.console import trial_label
from study.layout import BEST_CHECKPOINT, HPARAM_KEYS, REFERENCE_KEY
from study.reference import resolve_sampled
from study.storage import RemoteStudy


@dataclass(frozen=True)
class StudyContext:
    """What every trial of a study shares: the base config (profile + fixed values + run settings,
    with ``epsilon`` and ``attack_budgets`` in the space's 320x320 units), the objective metrics, and
    where the study lives."""

    base: dict[str, Any]
    epsilon_keys: tuple[str, ...]
    study_dir: str  # results/<name>, absolute (shared storage on a cluster)
    attack_budgets_ref: tuple[float, ...]
    objective_metrics: tuple[str, ...]
    verbose: bool = False  # keep Ray's per-checkpoint log lines
    remote: RemoteStudy | None = None  # --results URI: the trial's files travel as Tune's artifacts


def trial_config(ctx: StudyContext, sampled: dict[str, Any]) -> TrainConfig:
    """The trial's config: base values overridden by the sampled ones, then every budget (given at
    320x320) scaled to the trial's *own* crop, which a space may fix or search."""
    return TrainConfig.from_dict(budgets_at_crop({**ctx.base, **sampled}))


class BestSoFar:
    """The objective metrics at the trial's best epoch so far (lowest selection-split loss), reported
    as ``best_<metric>``: what the searcher and the scheduler are told, so Optuna ranks a trial by the
    epoch the study keeps (its ``best.pt``), not by its last epoch."""

    def __init__(self, metrics: tuple[str, ...]) -> None:
        self.metrics, self.values = metrics, {m: float("nan") for m in metrics}

    def update(self, record: EpochRecord) -> dict[str, float]:
        if record.is_best:
            flat = record.flat()
            self.values = {m: float(flat.get(m, float("nan"))) for m in self.metrics}
        return {f"best_{m}": v for m, v in self.values.items()}

    def replay(self, history: list[EpochRecord]) -> None:
        for record in history:
            self.update(record)


def hparams_of(cfg: TrainConfig, sampled: dict[str, Any], epsilon_keys: tuple[str, ...]) -> dict[str, Any]:
    """The trial's hyperparameters: :data:`HPARAM_KEYS` and the searched keys, as the trainer uses
    them; a searched budget appears once, as ``epsilon_ref`` (the space's 320x320 units)."""
    out: dict[str, Any] = {}
    for key in HPARAM_KEYS:  # epsilon_ref: TrainConfig.epsilon_ref
        out[key] = getattr(cfg, key)
    for key in sampled:
        if key not in epsilon_keys:
            out.setdefault(key, getattr(cfg, key))
    return out


def trial_allocation() -> dict[str, Any]:
    """What Tune gave the running trial, ``{"cpu": c, "gpu": g, "cuda_visible_devices": ..., "threads": n}``,
    with torch's intra-op threads set to its CPUs (at least 1), on CPU and CUDA alike: the trial's own
    share, not the node's every core (trials share a node) nor a count decided on the driver's machine.
    A trial given a GPU by Ray on a node without CUDA still runs, on CPU (``device='auto'``)."""
    req = tune.get_context().get_trial_resources().required_resources
    cpu, gpu = float(req.get("CPU", 0.0)), float(req.get("GPU", 0.0))
    threads = max(1, int(cpu))
    torch.set_num_threads(threads)
    return {"cpu": cpu, "gpu": gpu, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "threads": threads}


def train_trial(config: dict[str, Any], ctx: StudyContext) -> None:
    """Tune function trainable: one :func:`fit`, reporting every epoch with a checkpoint."""
    sampled = {k: v for k, v in config.items() if k != REFERENCE_KEY}
    label = trial_label(tune.get_context().get_trial_id(), sampled)
    given = trial_allocation()
    work = Path(tempfile.mkdtemp(prefix="mriadv-trial-"))
    try:
        _train(ctx, sampled, label, given, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _train(ctx: StudyContext, sampled: dict[str, Any], label: str, given: dict[str, Any], work: Path) -> None:
    """:func:`train_trial`'s body, with ``work`` its temporary folder (removed however it ends)."""
    # init_from: reference waits for the space's reference trial and starts from its best.pt
    values = resolve_sampled(
        sampled, Path(ctx.study_dir), lambda line: print(f"{label} {line}", flush=True), ctx.remote, work
    )
    cfg = replace(trial_config(ctx, values), threads=given["threads"])  # a study.json before this kept threads=1
    hp = hparams_of(cfg, values, ctx.epsilon_keys)
    if "init_from" in sampled:  # searched: as the space names it (a file, 'reference' or scratch)
        hp["init_from"] = "scratch" if sampled["init_from"] is None else str(sampled["init_from"])
    trial_dir = trial_folder(ctx)
    trial_dir.mkdir(parents=True, exist_ok=True)
    devices = given["cuda_visible_devices"]
    print(
        f"{label} {given['cpu']:g} CPU, {given['gpu']:g} GPU"
        + (f" (CUDA_VISIBLE_DEVICES={devices})" if devices is not None else "")
        + f", {given['threads']} torch threads",
        flush=True,
    )
    if not ctx.verbose:  # "Checkpoint successfully created at: ..." after every epoch
        logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    searched = ["epsilon_ref" if k in ctx.epsilon_keys else k for k in sampled]
    board = TrialBoard(trial_dir, hp, searched, hparams_metrics(ctx.objective_metrics, ctx.attack_budgets_ref))
    resume_from, start_epoch = None, 0  # start_epoch > 0: this process continued from a checkpoint
    node_id = ray.get_runtime_context().get_node_id()  # which cluster node ran it (a column of trials.parquet)
    checkpoint = tune.get_checkpoint()
    best = BestSoFar(ctx.objective_metrics)
    try:
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                shutil.copy2(Path(d) / CHECKPOINT_NAME, work / CHECKPOINT_NAME)
            resume_from = work / CHECKPOINT_NAME
            state = load_checkpoint(resume_from)
            start_epoch = int(state["epoch"])
            best.replay([EpochRecord.from_dict(r) for r in state["history"]])

        def on_epoch(record: EpochRecord, ckpt: Path | None) -> None:
            # at a new best, and at a resume's first epoch: fit() wrote best.pt again from the checkpoint
            # it resumed, so a best.pt of the attempt that was lost (a later epoch) is replaced
            fresh = record.is_best or record.epoch == start_epoch + 1
            if fresh and (work / BEST_NAME).is_file():  # whole or not at all: a kill mid-copy
                with atomic_write(trial_dir / BEST_CHECKPOINT) as tmp:  # left a truncated best.pt
                    shutil.copy2(work / BEST_NAME, tmp)
            best_values = best.update(record)
            board.log_epoch(record, {m: best_values[f"best_{m}"] for m in best.metrics}, work / PREVIEW_NAME)
            if (work / PREVIEW_NAME).is_file():
                with atomic_write(trial_dir / PREVIEW_NAME) as tmp:
                    shutil.copy2(work / PREVIEW_NAME, tmp)
            flat = {**hp, **record.flat(), **best_values, "start_epoch": start_epoch, "node_id": node_id}
            if "init_from" in hp:  # searched: the space's name for it, not the file it resolved to
                flat["init_from"] = hp["init_from"]
            metrics = tune_result(flat, ctx.objective_metrics)
            metrics["robustness_json"] = json.dumps(robustness_rows(record))
            with tempfile.TemporaryDirectory(prefix="mriadv-ckpt-") as d:
                _link_or_copy(ckpt, Path(d) / CHECKPOINT_NAME)  # Tune copies the folder during report
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

        fit(
            cfg,
            out_dir=work,
            on_epoch=on_epoch,
            resume_from=resume_from,  # a NaN stop is a record too
            log=lambda line: print(f"{label} {line}", flush=True),
        )
    finally:
        board.close()


def trial_folder(ctx: StudyContext) -> Path:
    """Where the trial writes its files (TensorBoard run, ``best.pt``, preview): its folder in the study
    folder, which every node sees; with object storage, the trial's working directory on this node,
    which Tune uploads into the trial's folder there as artifacts (``SyncConfig(sync_artifacts=True)``)."""
    name = Path(tune.get_context().get_trial_dir()).name
    if ctx.remote is None:
        return Path(ctx.study_dir) / name
    from ray.train._internal.session import get_session

    session = get_session()
    storage = getattr(session, "storage", None)
    working = getattr(storage, "trial_working_directory", None)
    return Path(working) if working else Path(os.getcwd())  # Tune runs a trial in its working directory


# result keys Tune itself uses (console, searcher, scheduler, stopping) besides the objectives
TUNE_KEYS = (
    "epoch",
    "epoch_status",
    "message",
    "train_loss",
    "val_loss",
    "val_nmse",
    "val_psnr",
    "val_ssim",
    "epoch_time_s",
    "start_epoch",
    "node_id",
    "report_vs_input_ratio",  # the console's "vs input" column, with report_vs_input (a string, kept anyway)
    *HPARAM_KEYS,
)


def tune_result(flat: dict[str, Any], objectives: tuple[str, ...]) -> dict[str, Any]:
    """What one epoch reports to Tune: the keys Tune itself reads (:data:`TUNE_KEYS`, among them the
    hyperparameters of :data:`study.layout.HPARAM_KEYS`; the objectives; ``best_<objective>``) and
    every non-numeric value as they are, and every other number (other searched values included:
    Tune reads those from the trial's config) packed into one JSON string, ``record_json``, that the
    result tables unpack (:mod:`study.tables`).

    Tune keeps, for every numeric key of a trial's results, six statistics and the last 5 and 10
    values in its experiment state, which it rewrites with each save: with ~100 numeric keys
    per epoch that state, and the driver's time to save it, grew ~20 kB per trial."""
    keep = set(TUNE_KEYS) | set(objectives) | {f"best_{m}" for m in objectives}
    out = {k: v for k, v in flat.items() if k in keep or not isinstance(v, (int, float)) or isinstance(v, bool)}
    rest = {k: v for k, v in flat.items() if k not in out}
    out["record_json"] = json.dumps(rest)
    return out


def robustness_rows(record: EpochRecord) -> list[dict[str, Any]]:
    """The rows of ``robustness.parquet`` for one epoch: the per-epoch attacks (``split``
    'selection', on the fixed subset of selection slices) and, on the last epoch, the best epoch's
    held-out evaluation (``split`` 'report' or 'test') of the trained model and of the zero-filled
    input (``model`` 'zero_filled'), with the clean metrics as ``attack`` 'clean', budget 0."""
    rows = [{**r, "split": "selection", "model": "trained", "eval_epoch": record.epoch} for r in record.robustness]
    rep = record.report
    if rep is not None:
        for model, clean, attacked in (
            ("trained", rep["clean"], rep["robustness"]),
            ("zero_filled", rep["zero_filled"], rep["zero_filled_robustness"]),
        ):
            keep = (
                "nmse",
                "psnr",
                "ssim",
                "loss",
                "delta_sq",
                "nmse_se",
                "psnr_se",
                "ssim_se",
                "volume_nmse",
                "num_volumes",
                "num_slices",
            )
            rows.append(
                {
                    "attack": "clean",
                    "budget": 0.0,
                    "budget_ref": 0.0,
                    **{k: clean[k] for k in keep},
                    "d_nmse": 0.0,
                    "d_psnr": 0.0,
                    "d_ssim": 0.0,
                    "split": rep["split"],
                    "model": model,
                    "eval_epoch": rep["epoch"],
                }
            )
            rows += [{**r, "split": rep["split"], "model": model, "eval_epoch": rep["epoch"]} for r in attacked]
        rows += instability_rows(rep)
    return rows


def instability_rows(rep: dict[str, Any]) -> list[dict[str, Any]]:
    """The seed's instabilities of types 2 and 3 as rows of ``robustness.parquet``, with attack names
    of their own: ``feature_random`` / ``feature_worst`` (small-feature recovery: ``fnr``, ``error``,
    ``contrast`` and their standard errors) and ``sampling`` (one row per ``acceleration``: NMSE,
    PSNR, SSIM with nested masks, ``stagnant``), for the trained model and the zero-filled input."""
    common = {"split": rep["split"], "eval_epoch": rep["epoch"], "budget": 0.0, "budget_ref": 0.0}
    rows: list[dict[str, Any]] = []
    feats = rep.get("features")
    if feats:
        for key, model in (
            ("random", "trained"),
            ("worst", "trained"),
            ("zero_filled_random", "zero_filled"),
            ("zero_filled_worst", "zero_filled"),
        ):
            stats = {k: v for k, v in feats[key].items() if k != "volume_fnr"}
            stats["volume_fnr"] = json.dumps(feats[key].get("volume_fnr", {}))  # per volume: paired comparisons
            rows.append({**common, "attack": f"feature_{key.removeprefix('zero_filled_')}", "model": model, **stats})
    for row in rep.get("sampling") or []:
        for model, prefix in (("trained", ""), ("zero_filled", "zf_")):
            rows.append(
                {
                    **common,
                    "attack": "sampling",
                    "model": model,
                    "acceleration": row["acceleration"],
                    "center_fraction": row["center_fraction"],
                    **{m: row[f"{prefix}{m}"] for m in ("nmse", "psnr", "ssim", "nmse_se")},
                    # the step from the next fewer samples and its paired SE (the ``stagnant`` flag's basis)
                    **{m: row.get(f"{prefix}{m}", float("nan")) for m in ("d_nmse", "d_nmse_se")},
                    "stagnant": bool(row[f"{prefix}stagnant"]),
                }
            )
    return rows


def _link_or_copy(src: Path | None, dst: Path) -> None:
    if src is None:
        raise RuntimeError("fit() reported an epoch without a checkpoint")
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)
