"""Type 3 of the seed's instabilities, more samples that do not help: the sampling sweep.

:func:`sampling_sweep` evaluates the model with :func:`mriadv.evaluate.evaluate` at other
accelerations with fixed, *nested* per-volume masks (:class:`mriadv.data.masks.NestedMaskFunc`: one
random column ranking per volume, seeded by the file name; more samples are a superset of fewer; the
centre band always included), and flags each row where NMSE does not fall by more than its paired
standard error relative to the row with fewer samples.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mriadv.data.files import ShapeBucketSampler, SliceDataset
from mriadv.data.masks import NestedMaskFunc
from mriadv.data.transforms import UnetTransform, collate
from mriadv.evaluate import evaluate, paired_se
from mriadv.perturbations import takes_measurements
from mriadv.runtime import Runtime

SWEEP_ACCELERATIONS = (8.0, 6.0, 4.0, 3.0, 2.0)


@dataclass
class SamplingRow:
    """One acceleration of :func:`sampling_sweep`: the model's fastMRI metrics (mean over volumes,
    ``*_se`` standard errors) and the zero-filled input's (``zf_*``). ``effective_acceleration``:
    acquired columns / sampled acquired columns, mean over volumes (zero-padded columns are never
    sampled, so it can exceed the nominal one slightly). ``d_nmse``: NMSE minus the previous row's
    (fewer samples; NaN for the first), ``d_nmse_se`` its paired standard error over volumes (``zf_d_nmse``,
    ``zf_d_nmse_se``: the zero-filled input's);
    ``stagnant``: more samples did not lower NMSE by more than ``d_nmse_se`` (without a standard
    error, one volume: did not lower it at all); ``zf_stagnant`` the same for the zero-filled input.
    ``volume_nmse``: the model's NMSE per volume."""

    acceleration: float
    center_fraction: float
    effective_acceleration: float
    nmse: float
    psnr: float
    ssim: float
    nmse_se: float
    psnr_se: float
    ssim_se: float
    zf_nmse: float = float("nan")
    zf_psnr: float = float("nan")
    zf_ssim: float = float("nan")
    zf_nmse_se: float = float("nan")
    d_nmse: float = float("nan")
    d_nmse_se: float = float("nan")
    stagnant: bool = False
    zf_d_nmse: float = float("nan")
    zf_d_nmse_se: float = float("nan")
    zf_stagnant: bool = False
    volume_nmse: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stagnant(d: float, se: float) -> bool:
    return not (d < -se) if math.isfinite(se) else not d < 0


def sampling_sweep(
    model: nn.Module,
    dataset: SliceDataset,
    runtime: Runtime,
    accelerations: Sequence[float] = SWEEP_ACCELERATIONS,
    center_fraction: float | None = None,
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.mse_loss,
    zero_filled: bool = True,
) -> list[SamplingRow]:
    """Evaluate ``model`` on ``dataset``'s slices at each acceleration with nested per-volume masks.

    ``dataset``: a :class:`SliceDataset` with a :class:`UnetTransform` (its crop and clamp are kept,
    its mask function is replaced by :class:`NestedMaskFunc` ``(center_fraction, R)`` with the fixed
    per-volume seed). ``center_fraction``: one for the whole sweep, so that the masks nest (default:
    the transform's). Rows are returned from the highest acceleration (fewest samples) to the lowest,
    each through :func:`mriadv.evaluate.evaluate` (``loss_fn`` only fills its ``loss``); with
    ``zero_filled`` the identity is evaluated beside it. Raises ``ValueError`` for an acceleration the
    centre fraction does not allow (``center_fraction * R >= 1``)."""
    base = dataset.transform
    if not isinstance(base, UnetTransform):
        raise ValueError(f"the sampling sweep needs a dataset with a UnetTransform, got {type(base).__name__}")
    cf = base.mask_func.center_fraction if center_fraction is None else float(center_fraction)
    funcs = nested_masks(accelerations, cf)  # validates every one before evaluating any
    rows: list[SamplingRow] = []
    zf_prev: dict[str, float] | None = None
    for func in funcs:
        measured = takes_measurements(model)  # then batches carry k-space, one shape per batch
        tf = replace(base, mask_func=func, train=False, keep_kspace=measured)
        ds = dataset.restricted(dataset.volumes, tf).with_slices(dataset.slices)
        if measured:
            batching: dict[str, Any] = {"batch_sampler": ShapeBucketSampler(ds.kspace_shapes(), batch_size, False)}
        else:
            batching = {"batch_size": batch_size, "shuffle": False}
        loader = torch.utils.data.DataLoader(  # iterated twice (model, zero-filled): its workers forked once
            ds,
            **batching,
            num_workers=num_workers,
            collate_fn=collate,
            persistent_workers=num_workers > 0,
        )
        res = evaluate(model, loader, loss_fn, runtime, clamp=base.clamp)
        row = SamplingRow(
            acceleration=func.acceleration,
            center_fraction=cf,
            effective_acceleration=_effective(tf, ds),
            nmse=res.nmse,
            psnr=res.psnr,
            ssim=res.ssim,
            nmse_se=res.nmse_se,
            psnr_se=res.psnr_se,
            ssim_se=res.ssim_se,
            volume_nmse=res.volume_nmse,
        )
        if zero_filled:
            zf = evaluate(nn.Identity(), loader, loss_fn, runtime, clamp=base.clamp)
            row.zf_nmse, row.zf_psnr, row.zf_ssim, row.zf_nmse_se = zf.nmse, zf.psnr, zf.ssim, zf.nmse_se
            if zf_prev is not None:
                row.zf_d_nmse, row.zf_d_nmse_se = zf.nmse - rows[-1].zf_nmse, paired_se(zf.volume_nmse, zf_prev)
                row.zf_stagnant = _stagnant(row.zf_d_nmse, row.zf_d_nmse_se)
            zf_prev = zf.volume_nmse
        if rows:
            row.d_nmse = res.nmse - rows[-1].nmse
            row.d_nmse_se = paired_se(res.volume_nmse, rows[-1].volume_nmse)
            row.stagnant = _stagnant(row.d_nmse, row.d_nmse_se)
        rows.append(row)
    return rows


def nested_masks(accelerations: Sequence[float], center_fraction: float) -> list[NestedMaskFunc]:
    """The sweep's mask functions, highest acceleration first (duplicates dropped). Raises
    ``ValueError`` for none, or for an acceleration the centre fraction does not allow."""
    accs = sorted({float(a) for a in accelerations}, reverse=True)
    if not accs:
        raise ValueError("the sampling sweep needs at least one acceleration")
    return [NestedMaskFunc(center_fraction=center_fraction, acceleration=a) for a in accs]


def _effective(tf: UnetTransform, dataset: SliceDataset) -> float:
    """Mean over volumes of acquired columns / sampled acquired columns, with ``tf``'s fixed masks."""
    ratios = []
    for v in dataset.volumes:
        mask = tf.mask_func(v.kspace_shape[1], tf.mask_rng(v.name, 0, 0))
        left, right = v.padding
        ratios.append((right - left) / max(1, int(mask[left:right].sum())))
    return math.fsum(ratios) / len(ratios)


def format_sampling(rows: Sequence[SamplingRow | dict[str, Any]]) -> list[str]:
    """Human-readable lines: one per acceleration, fewest samples first, stagnation flagged (``rows``:
    :class:`SamplingRow` s or their ``as_dict()``)."""
    lines = ["sampling sweep (type 3), nested masks: R (effective)  nmse  psnr  ssim | zero-filled nmse"]
    for row in rows:
        r = row.as_dict() if isinstance(row, SamplingRow) else row
        flag = "  <- no improvement with more samples" if r["stagnant"] else ""
        lines.append(
            f"  {r['acceleration']:4g}x ({r['effective_acceleration']:4.2f}) cf {r['center_fraction']:g}  "
            f"nmse {r['nmse']:.4f}±{r['nmse_se']:.4f}  psnr {r['psnr']:6.2f}  ssim {r['ssim']:.4f} | "
            f"{r['zf_nmse']:.4f}{flag}"
        )
    return lines
