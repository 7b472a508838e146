"""The Ray Tune trainable: a thin adapter around :func:`mriadv.training.fit`.

It builds the trial's :class:`~mriadv.config.TrainConfig` (the study's base config plus the
sampled parameters), resumes from Tune's checkpoint when there is one, and forwards each epoch's
record to :func:`ray.tune.report` together with a checkpoint. Alongside Ray's own TensorBoard
scalars it writes, into the trial folder, an event file with the trial's hyperparameters (for the
HParams dashboard, written at trial start so running and killed trials show too), clean scalar
tags that are the same in every trial, and a few validation images per epoch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import tune

from mriadv.config import TrainConfig
from mriadv.training import (BEST_NAME, CHECKPOINT_NAME, PREVIEW_NAME, EpochRecord, fit, load_checkpoint,
                             to_reference)
from study.layout import BEST_CHECKPOINT, HPARAM_KEYS

# scalar tags written by TrialBoard: (tag, record field)
SCALARS = (
    ("train/loss", "train_loss"), ("train/clean_loss", "train_clean_loss"), ("train/pert_loss", "train_pert_loss"),
    ("train/gen_objective", "gen_objective"), ("train/hinge", "hinge"), ("train/delta_sq", "delta_sq"),
    ("val/loss", "val_loss"), ("val/nmse", "val_nmse"), ("val/psnr", "val_psnr"), ("val/ssim", "val_ssim"),
    ("train_eval/nmse", "train_nmse"), ("train_eval/psnr", "train_psnr"), ("train_eval/ssim", "train_ssim"),
    ("time/epoch_s", "epoch_time_s"),
)
IMAGE_KEYS = ("input", "recon", "target", "pgd_delta", "pgd_recon", "generator_delta", "generator_recon")


@dataclass(frozen=True)
class StudyContext:
    """What every trial of a study shares: the base config (profile + fixed values + run settings,
    budgets already scaled to the crop), the searched keys whose values need epsilon scaling, and
    where the study lives."""

    base: dict[str, Any]
    epsilon_keys: tuple[str, ...]
    study_dir: str  # results/<name>, absolute (shared storage on a cluster)
    attack_budgets_ref: tuple[float, ...]
    objective_metrics: tuple[str, ...]


def trial_config(ctx: StudyContext, sampled: dict[str, Any]) -> TrainConfig:
    """The trial's config: base values overridden by the sampled ones (epsilon scaled to the crop)."""
    from mriadv.config import scale_epsilon

    crop = int(ctx.base.get("crop_size", TrainConfig.crop_size))
    values = {k: (scale_epsilon(float(v), crop) if k in ctx.epsilon_keys else v) for k, v in sampled.items()}
    return TrainConfig.from_dict({**ctx.base, **values})


def hparams_of(cfg: TrainConfig, sampled: dict[str, Any], epsilon_keys: tuple[str, ...]) -> dict[str, Any]:
    """The trial's hyperparameters: :data:`HPARAM_KEYS` and the searched keys, as the trainer uses
    them; a searched budget appears once, as ``epsilon_ref`` (the space's 320x320 units)."""
    out: dict[str, Any] = {}
    for key in HPARAM_KEYS:
        out[key] = to_reference(cfg.epsilon, cfg.crop_size) if key == "epsilon_ref" else getattr(cfg, key)
    for key in sampled:
        if key not in epsilon_keys:
            out.setdefault(key, getattr(cfg, key))
    return out


class TrialBoard:
    """The trial's own TensorBoard event file (HParams at start, scalars and images per epoch)."""

    def __init__(self, folder: Path, hparams: dict[str, Any], metric_tags: list[str]) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        self.writer = SummaryWriter(log_dir=str(folder), filename_suffix=".mriadv")
        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        exp, ssi, sei = hparams_summary(clean, {tag: float("nan") for tag in metric_tags})
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def log_epoch(self, record: EpochRecord, preview_file: Path | None) -> None:
        step = record.epoch
        for tag, key in SCALARS:
            value = getattr(record, key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        for row in record.robustness:
            tag = f"rob/{row['attack']}_e{row['budget_ref']:g}"
            for m in ("nmse", "psnr", "ssim"):
                if math.isfinite(row[m]):
                    self.writer.add_scalar(f"{tag}/{m}", row[m], step)
        if preview_file is not None and preview_file.is_file():
            with np.load(preview_file) as arrays:
                for key in IMAGE_KEYS:
                    if key in arrays:
                        images = _to_unit(arrays[key].astype(np.float32))[:, None]  # (N, 1, H, W)
                        self.writer.add_images(f"images/{key}", images, step, dataformats="NCHW")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _to_unit(x: np.ndarray) -> np.ndarray:
    """Scale each image to [0, 1] for display (perturbations are symmetric about 0)."""
    lo = x.min(axis=(1, 2), keepdims=True)
    hi = x.max(axis=(1, 2), keepdims=True)
    return (x - lo) / np.maximum(hi - lo, 1e-12)


def metric_tags(budgets_ref: tuple[float, ...]) -> list[str]:
    tags = [tag for tag, _ in SCALARS if tag.startswith("val/")]
    return tags + [f"rob/pgd_e{b:g}/{m}" for b in budgets_ref for m in ("nmse", "ssim")]


def train_trial(config: dict[str, Any], ctx: StudyContext) -> None:
    """Tune function trainable: one :func:`fit`, reporting every epoch with a checkpoint."""
    sampled = dict(config)
    cfg = trial_config(ctx, sampled)
    hp = hparams_of(cfg, sampled, ctx.epsilon_keys)
    trial_dir = Path(ctx.study_dir) / Path(tune.get_context().get_trial_dir()).name
    trial_dir.mkdir(parents=True, exist_ok=True)
    board = TrialBoard(trial_dir / "tb", hp, metric_tags(ctx.attack_budgets_ref))
    resume_from, start_epoch = None, 0  # start_epoch > 0: this process continued from a checkpoint
    node_id = ray.get_runtime_context().get_node_id()  # which cluster node ran it (a column of trials.parquet)
    checkpoint = tune.get_checkpoint()
    work = Path(tempfile.mkdtemp(prefix="mriadv-trial-"))
    try:
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                shutil.copy2(Path(d) / CHECKPOINT_NAME, work / CHECKPOINT_NAME)
            resume_from = work / CHECKPOINT_NAME
            start_epoch = int(load_checkpoint(resume_from)["epoch"])

        def on_epoch(record: EpochRecord, ckpt: Path | None) -> None:
            if record.is_best and (work / BEST_NAME).is_file():
                shutil.copy2(work / BEST_NAME, trial_dir / BEST_CHECKPOINT)
            board.log_epoch(record, work / PREVIEW_NAME)
            if (work / PREVIEW_NAME).is_file():
                shutil.copy2(work / PREVIEW_NAME, trial_dir / PREVIEW_NAME)
            metrics = {**hp, **record.flat(), "start_epoch": start_epoch, "node_id": node_id, "message": "",
                       "robustness_json": json.dumps(record.robustness)}
            with tempfile.TemporaryDirectory(prefix="mriadv-ckpt-") as d:
                _link_or_copy(ckpt, Path(d) / CHECKPOINT_NAME)  # Tune copies the folder during report
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

        result = fit(cfg, out_dir=work, on_epoch=on_epoch, resume_from=resume_from, log=print)
        if result.status == "nan":
            # a final row that says why the trial stopped: its metrics are NaN, its status 'nan'
            nan = {k: float("nan") for k in (*EpochRecord.__dataclass_fields__, *ctx.objective_metrics)
                   if k not in ("epoch", "status", "robustness")}
            tune.report({**nan, **hp, "epoch": len(result.history) + 1, "epoch_status": "nan",
                         "start_epoch": start_epoch, "node_id": node_id, "robustness_json": "[]",
                         "message": result.message})
    finally:
        board.close()
        shutil.rmtree(work, ignore_errors=True)


def _link_or_copy(src: Path | None, dst: Path) -> None:
    if src is None:
        raise RuntimeError("fit() reported an epoch without a checkpoint")
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)
