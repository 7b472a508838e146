"""One evaluation loop for clean validation, training-set evaluation and every attack.

:func:`evaluate` runs the reconstructor over a loader, optionally through an
:class:`mriadv.attacks.Attack`, and reports fastMRI's volume metrics on de-normalised images (NMSE,
PSNR and SSIM with the volume maximum as data range, averaged over volumes), the training loss on
normalised images, the seed's own per-batch metric definitions (for comparison with its Table 1),
and the mean squared norm of the perturbation. :func:`robustness` evaluates a list of attacks and
states each one's degradation relative to clean.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from mriadv.attacks import Attack
from mriadv.data.transforms import Batch, denormalize
from mriadv.metrics import VolumeMetrics, seed_batch_metrics
from mriadv.runtime import Runtime

METRICS = ("nmse", "psnr", "ssim")


@dataclass
class EvalResult:
    """Metrics of one pass. ``nmse``/``psnr``/``ssim``: fastMRI definitions, mean over volumes;
    ``loss``: the training loss (normalised images), mean over slices; ``seed_*``: the seed's
    definitions (per batch, normalised, prediction and reference swapped), mean over batches;
    ``delta_sq``: mean squared norm of the perturbation (0 when clean)."""

    nmse: float
    psnr: float
    ssim: float
    loss: float
    seed_nmse: float
    seed_psnr: float
    seed_ssim: float
    delta_sq: float
    num_volumes: int
    num_slices: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    runtime: Runtime,
    attack: Attack | None = None,
    clamp: float | None = 6.0,
) -> EvalResult:
    """Evaluate ``model`` (put in eval mode, restored afterwards) on every batch of ``batches``.

    ``clamp``: the seed's metrics are computed against the target clamped like its data transform
    did (fastMRI's ``UnetDataTransform``: 6); the fastMRI metrics use the exact target."""
    was_training = model.training
    model.eval()
    volumes = VolumeMetrics()
    loss_sum, delta_sum, slices = 0.0, 0.0, 0
    seed_sums = dict.fromkeys(METRICS, 0.0)
    num_batches = 0
    try:
        for batch in batches:
            batch = batch.to(runtime.device, non_blocking=True)
            if attack is None:
                inputs = batch.image
                delta_sq = torch.zeros(len(batch))
            else:
                out = attack(model, batch, runtime)
                inputs, delta_sq = out.inputs, out.delta_sq
            with runtime.autocast():
                pred = model(runtime.image(inputs))
            pred = pred.float()
            loss_sum += float(loss_fn(pred, batch.target)) * len(batch)
            delta_sum += float(delta_sq.sum())
            slices += len(batch)
            std, mean = batch.std.view(-1, 1, 1, 1), batch.mean.view(-1, 1, 1, 1)
            volumes.update(batch.fnames, batch.slice_nums, denormalize(batch.target, mean, std),
                           denormalize(pred, mean, std), batch.max_value)
            seed_target = batch.target.clamp(-clamp, clamp) if clamp is not None else batch.target
            for k, v in seed_batch_metrics(seed_target, pred).items():
                seed_sums[k] += v
            num_batches += 1
    finally:
        model.train(was_training)
    if num_batches == 0:
        raise ValueError("evaluate: the loader produced no batches")
    summary = volumes.summary()
    return EvalResult(
        nmse=summary["nmse"], psnr=summary["psnr"], ssim=summary["ssim"],
        loss=loss_sum / slices,
        seed_nmse=seed_sums["nmse"] / num_batches, seed_psnr=seed_sums["psnr"] / num_batches,
        seed_ssim=seed_sums["ssim"] / num_batches,
        delta_sq=delta_sum / slices, num_volumes=len(volumes), num_slices=slices,
    )


@dataclass
class RobustRow:
    """One attack at one budget: its metrics and the degradation ``attacked - clean``."""

    attack: str
    budget: float
    nmse: float
    psnr: float
    ssim: float
    loss: float
    delta_sq: float
    d_nmse: float
    d_psnr: float
    d_ssim: float

    def as_dict(self) -> dict[str, float | str]:
        return asdict(self)


def robustness(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    runtime: Runtime,
    attacks: Sequence[Attack],
    clean: EvalResult,
    clamp: float | None = 6.0,
) -> list[RobustRow]:
    """Evaluate each attack with :func:`evaluate`; ``batches`` must be re-iterable (a DataLoader)."""
    rows = []
    for attack in attacks:
        res = evaluate(model, batches, loss_fn, runtime, attack, clamp)
        rows.append(RobustRow(
            attack=attack.name, budget=float(attack.budget), nmse=res.nmse, psnr=res.psnr, ssim=res.ssim,
            loss=res.loss, delta_sq=res.delta_sq, d_nmse=res.nmse - clean.nmse,
            d_psnr=_finite_diff(res.psnr, clean.psnr), d_ssim=res.ssim - clean.ssim,
        ))
    return rows


def _finite_diff(a: float, b: float) -> float:
    return a - b if math.isfinite(a) and math.isfinite(b) else float("nan")


@torch.no_grad()
def preview(model: nn.Module, batch: Batch, runtime: Runtime,
            perturbed: dict[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """Images of a few slices for logs and figures, in normalised units, each ``(B, h, w)`` float32:
    ``input``, ``target``, ``recon``, and for each named perturbed input ``x`` in ``perturbed``
    (e.g. ``{"pgd": ..., "generator": ...}``): ``<name>_delta`` (``x - input``), ``<name>_input``
    and ``<name>_recon``."""
    was_training = model.training
    model.eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with runtime.autocast():
            return model(runtime.image(x)).float()

    try:
        batch = batch.to(runtime.device)
        out = {"input": batch.image, "target": batch.target, "recon": run(batch.image)}
        for name, x in (perturbed or {}).items():
            out |= {f"{name}_delta": x - batch.image, f"{name}_input": x, f"{name}_recon": run(x)}
    finally:
        model.train(was_training)
    return {k: v[:, 0].float().cpu().numpy() for k, v in out.items()}
