"""One evaluation loop for clean validation, training-set evaluation and every attack.

:func:`evaluate` runs the reconstructor over a loader, optionally through an
:class:`mriadv.attacks.Attack`, and reports fastMRI's volume metrics on de-normalised images (NMSE,
PSNR and SSIM with the volume maximum as data range, averaged over volumes), the training loss on
normalised images, the seed's own per-batch metric definitions (for comparison with its Table 1),
and the mean squared norm of the perturbation. :func:`robustness` evaluates a list of attacks and
states each one's degradation relative to clean.

Every evaluation runs in fp32 with TF32 off (:meth:`mriadv.runtime.Runtime.evaluating`), whatever
precision the run trains in: the effects it measures (a small attack's degradation, a small
feature's error) can be far below bf16's resolution (8 mantissa bits, ~0.4 % relative).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from mriadv.attacks import Attack
from mriadv.config import TrainConfig
from mriadv.data.transforms import Batch, denormalize
from mriadv.metrics import VolumeMetrics, seed_batch_metrics
from mriadv.perturbations import reconstruct
from mriadv.runtime import Runtime

METRICS = ("nmse", "psnr", "ssim")


@dataclass
class EvalResult:
    """Metrics of one pass. ``nmse``/``psnr``/``ssim``: fastMRI definitions, mean over volumes;
    ``loss``: the training loss (normalised images), mean over slices; ``seed_*``: the seed's
    definitions (per batch, normalised, prediction and reference swapped), mean over batches;
    ``delta_sq``: mean squared norm of the perturbation (0 when clean); ``delta_rel``: its mean size
    relative to the sampled k-space or the input (``||delta|| / ||ref||``, see
    :func:`mriadv.perturbations.relative_size`; 0 when clean, NaN for an attack that does not report it);
    ``*_se``: standard errors of the volume means (std over volumes / sqrt(volumes); NaN for one
    volume); ``volume_nmse``: NMSE of each volume, by file name (for paired comparisons of two models
    on the same volumes); ``volume_ssim``: the same for SSIM."""

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
    nmse_se: float = float("nan")
    psnr_se: float = float("nan")
    ssim_se: float = float("nan")
    volume_nmse: dict[str, float] = field(default_factory=dict)
    delta_rel: float = 0.0
    volume_ssim: dict[str, float] = field(default_factory=dict)  # SSIM of each volume, by file name

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    runtime: Runtime,
    attack: Attack | None = None,
    clamp: float | None = TrainConfig.clamp,
) -> EvalResult:
    """Evaluate ``model`` (put in eval mode, restored afterwards) on every batch of ``batches``, in fp32
    (:meth:`Runtime.evaluating`; the attacks too).

    ``clamp``: the seed's metrics are computed against the target clamped like its data transform
    did (fastMRI's ``UnetDataTransform``: 6); the fastMRI metrics use the exact target."""
    was_training = model.training
    model.eval()
    volumes = VolumeMetrics()
    loss_sum, delta_sum, slices = 0.0, 0.0, 0
    rel_sum, rel_slices = 0.0, 0
    seed_sums = dict.fromkeys(METRICS, 0.0)
    num_batches = 0
    try:
        with runtime.evaluating():
            for batch in batches:
                batch = batch.to(runtime.device, non_blocking=True)
                if attack is None:
                    attacked = batch
                    delta_sq = torch.zeros(len(batch))
                else:
                    out = attack(model, batch, runtime)
                    attacked, delta_sq = out.batch, out.delta_sq
                    if out.relative is not None:
                        rel_sum += float(out.relative.sum())
                        rel_slices += len(batch)
                pred = reconstruct(model, runtime, attacked).float()
                loss_sum += float(loss_fn(pred, batch.target)) * len(batch)
                delta_sum += float(delta_sq.sum())
                slices += len(batch)
                std, mean = batch.std.view(-1, 1, 1, 1), batch.mean.view(-1, 1, 1, 1)
                volumes.update(
                    batch.fnames,
                    batch.slice_nums,
                    denormalize(batch.target, mean, std),
                    denormalize(pred, mean, std),
                    batch.max_value,
                )
                seed_target = batch.target.clamp(-clamp, clamp) if clamp is not None else batch.target
                for k, v in seed_batch_metrics(seed_target, pred).items():
                    seed_sums[k] += v
                num_batches += 1
    finally:
        model.train(was_training)
    if num_batches == 0:
        raise ValueError("evaluate: the loader produced no batches")
    summary, se = volumes.summary(), volumes.standard_errors()
    return EvalResult(
        nmse=summary["nmse"],
        psnr=summary["psnr"],
        ssim=summary["ssim"],
        nmse_se=se["nmse"],
        psnr_se=se["psnr"],
        ssim_se=se["ssim"],
        volume_nmse={f: v["nmse"] for f, v in sorted(volumes.per_volume().items())},
        volume_ssim={f: v["ssim"] for f, v in sorted(volumes.per_volume().items())},
        loss=loss_sum / slices,
        seed_nmse=seed_sums["nmse"] / num_batches,
        seed_psnr=seed_sums["psnr"] / num_batches,
        seed_ssim=seed_sums["ssim"] / num_batches,
        delta_sq=delta_sum / slices,
        num_volumes=len(volumes),
        num_slices=slices,
        delta_rel=0.0 if attack is None else (rel_sum / rel_slices if rel_slices == slices else float("nan")),
    )


@dataclass
class RobustRow:
    """One attack at one budget: its metrics and the degradation ``attacked - clean``, with standard
    errors over volumes (``d_nmse_se``: of the paired per-volume differences). ``budget``: the
    absolute ``||delta||^2`` budget (NaN for a relative one); ``rel``: the relative budget
    ``||delta|| / ||ref||`` (NaN for an absolute one); ``delta_sq`` and ``delta_rel``: the mean size
    the attack delivered, in both units."""

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
    nmse_se: float = float("nan")
    psnr_se: float = float("nan")
    ssim_se: float = float("nan")
    d_nmse_se: float = float("nan")
    rel: float = float("nan")
    delta_rel: float = float("nan")
    volume_nmse: dict[str, float] = field(default_factory=dict)  # attacked NMSE per volume

    def as_dict(self) -> dict[str, float | str]:
        return asdict(self)


def robustness(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    runtime: Runtime,
    attacks: Sequence[Attack],
    clean: EvalResult,
    clamp: float | None = TrainConfig.clamp,
) -> list[RobustRow]:
    """Evaluate each attack with :func:`evaluate`; ``batches`` must be re-iterable (a DataLoader)."""
    rows = []
    for attack in attacks:
        res = evaluate(model, batches, loss_fn, runtime, attack, clamp)
        rows.append(
            RobustRow(
                attack=attack.name,
                budget=float(attack.budget),
                nmse=res.nmse,
                psnr=res.psnr,
                ssim=res.ssim,
                loss=res.loss,
                delta_sq=res.delta_sq,
                d_nmse=res.nmse - clean.nmse,
                d_psnr=_finite_diff(res.psnr, clean.psnr),
                d_ssim=res.ssim - clean.ssim,
                nmse_se=res.nmse_se,
                psnr_se=res.psnr_se,
                ssim_se=res.ssim_se,
                d_nmse_se=paired_se(res.volume_nmse, clean.volume_nmse),
                volume_nmse=res.volume_nmse,
                rel=_relative_budget(attack),
                delta_rel=res.delta_rel,
            )
        )
    return rows


def paired_se(a: dict[str, float], b: dict[str, float]) -> float:
    """Standard error of the mean of the per-volume differences ``a[v] - b[v]`` over the volumes both
    hold (NaN for fewer than two): the error bar of a difference measured on the same volumes."""
    diffs = [a[k] - b[k] for k in a if k in b]
    n = len(diffs)
    if n < 2:
        return float("nan")
    mean = math.fsum(diffs) / n
    return math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1) / n)


def _relative_budget(attack: Attack) -> float:
    rel = getattr(attack, "rel", None)
    return float("nan") if rel is None else float(rel)


def _finite_diff(a: float, b: float) -> float:
    return a - b if math.isfinite(a) and math.isfinite(b) else float("nan")


@torch.no_grad()
def preview(
    model: nn.Module, batch: Batch, runtime: Runtime, perturbed: dict[str, Batch] | None = None
) -> dict[str, np.ndarray]:
    """Images of a few slices for logs and figures, in normalised units, each ``(B, h, w)`` float32:
    ``input``, ``target``, ``recon``, and for each named perturbed batch ``p`` in ``perturbed``
    (e.g. ``{"pgd": AttackOutput.batch, ...}``): ``<name>_delta`` (its network input ``x`` minus the
    clean one; for a k-space perturbation, the change it makes to the zero-filled image),
    ``<name>_input`` (``x``) and ``<name>_recon``."""
    was_training = model.training
    model.eval()

    def run(b: Batch) -> torch.Tensor:
        with runtime.evaluating():
            return reconstruct(model, runtime, b).float()

    try:
        batch = batch.to(runtime.device)
        out = {"input": batch.image, "target": batch.target, "recon": run(batch)}
        for name, p in (perturbed or {}).items():
            x = p.image
            out |= {f"{name}_delta": x - batch.image, f"{name}_input": x, f"{name}_recon": run(p)}
    finally:
        model.train(was_training)
    return {k: v[:, 0].float().cpu().numpy() for k, v in out.items()}
