"""Training losses on normalised images ``(B, C, H, W)`` (``C = 1`` in mriadv): MSE and DSSIM.

DSSIM is ``(1 - SSIM) / 2`` with the SSIM of Wang et al., "Image quality assessment: from error
visibility to structural similarity", IEEE TIP 13(4), 2004: an 11x11 Gaussian window (sigma 1.5,
weights normalised to sum 1), Gaussian-weighted *population* statistics, averaged over the valid
region (no padding). This is ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
sigma=1.5, use_sample_covariance=False)`` (whose Gaussian is truncated at 3.5 sigma, i.e. the same
11 taps), and differs from the 7x7 uniform, sample-covariance SSIM used for evaluation in
:mod:`mriadv.metrics`.

Every loss returns the batch mean (``reduction="mean"``) or one value per sample
(``reduction="none"``, shape ``(B,)``). :func:`make_loss` builds one by name.
"""

from __future__ import annotations

import functools
import inspect
from types import MappingProxyType
from typing import Callable

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "none")


def _check_pair(pred: torch.Tensor, target: torch.Tensor, name: str) -> None:
    for arg, x in (("pred", pred), ("target", target)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: {arg} must be a torch.Tensor (B, C, H, W), got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name}: {arg} must have shape (B, C, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name}: {arg} must be a real floating tensor, got dtype {x.dtype}")
    if pred.shape != target.shape:
        raise ValueError(f"{name}: pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def mse_loss(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean squared error. ``pred``, ``target``: ``(B, C, H, W)``.

    Returns a scalar (mean over all elements) or, with ``reduction="none"``, ``(B,)`` per-sample
    means over ``(C, H, W)``.
    """
    _check_pair(pred, target, "mse_loss")
    per_sample = (pred - target).square().flatten(1).mean(dim=1)  # (B,)
    return _reduce(per_sample, reduction)


@functools.lru_cache(maxsize=16)
def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """Normalised ``(size, size)`` Gaussian on the CPU in float64; callers move it with ``.to()``.

    Cached per process (lru_cache holds CPU tensors only, so it is safe across fork/spawn); never
    modify the returned tensor in place.
    """
    k = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(k**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def _data_range(target: torch.Tensor, data_range: float | torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The SSIM data range per sample as ``(B, 1, 1, 1)`` of ``dtype``."""
    b = target.shape[0]
    if data_range is None:
        flat = target.detach().flatten(1)
        rng = (flat.amax(dim=1) - flat.amin(dim=1)).to(dtype)
        # A constant target has no range and would make C1 = C2 = 0 (SSIM = 0/0); such samples
        # fall back to 1, the unit of the z-scored images this loss is meant for.
        rng = torch.where(rng > 0, rng, torch.ones_like(rng))
    elif isinstance(data_range, torch.Tensor):
        if data_range.shape != (b,):
            raise ValueError(f"dssim_loss: data_range tensor must have shape ({b},), got {tuple(data_range.shape)}")
        rng = data_range.detach().to(device=target.device, dtype=dtype)
        if not bool((rng > 0).all()):  # a device sync, paid only by callers passing a tensor
            raise ValueError(f"dssim_loss: data_range must be positive, got {rng.tolist()}")
    else:
        if not float(data_range) > 0:
            raise ValueError(f"dssim_loss: data_range must be positive, got {data_range}")
        rng = torch.full((b,), float(data_range), dtype=dtype, device=target.device)
    return rng.view(b, 1, 1, 1)


def dssim_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float | torch.Tensor | None = None,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    reduction: str = "mean",
) -> torch.Tensor:
    """Structural dissimilarity ``(1 - SSIM) / 2`` in ``[0, 1]``, differentiable in ``pred``.

    ``pred``, ``target``: ``(B, C, H, W)`` with ``H, W >= window_size``; channels are treated
    independently (depthwise convolution) and averaged. ``data_range`` sets ``C1 = (k1 R)^2`` and
    ``C2 = (k2 R)^2``: ``None`` -> per sample ``target.amax() - target.amin()`` over ``(C, H, W)``
    (detached; 1 for a constant target); a float, e.g. 1.0, which reproduces the seed paper's code
    (``C1 = 0.01^2``, ``C2 = 0.03^2`` on z-scored images); or a ``(B,)`` tensor.

    The statistics are computed in float32 (float64 if the inputs are float64) with autocast
    disabled, because ``E[x^2] - E[x]^2`` loses all its digits in bfloat16. For the same reason the
    images are first shifted by the (detached) per-sample mean of ``target``; this changes nothing
    mathematically, since variances are shift-invariant and the shift is added back to the means.

    Returns a scalar (batch mean) or, with ``reduction="none"``, ``(B,)``, in the statistics' dtype.
    """
    _check_pair(pred, target, "dssim_loss")
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"dssim_loss: window_size must be a positive odd integer, got {window_size}")
    if not sigma > 0:
        raise ValueError(f"dssim_loss: sigma must be positive, got {sigma}")
    if min(pred.shape[-2:]) < window_size:
        raise ValueError(
            f"dssim_loss: images {tuple(pred.shape)} are smaller than the {window_size}x{window_size} window"
        )
    dtype = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
    b, c = pred.shape[:2]
    with torch.autocast(device_type=pred.device.type, enabled=False):
        x = pred.to(dtype)
        y = target.to(dtype)
        shift = y.detach().mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        x = x - shift
        y = y - shift
        window = _gaussian_window(int(window_size), float(sigma)).to(device=pred.device, dtype=dtype)
        weight = window.expand(5 * c, 1, window_size, window_size)
        stats = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (B, 5C, H, W)
        moments = F.conv2d(stats, weight, groups=5 * c)  # (B, 5C, H', W'), valid region
        ux, uy, uxx, uyy, uxy = moments.split(c, dim=1)  # each (B, C, H', W')
        vx = uxx - ux * ux
        vy = uyy - uy * uy
        vxy = uxy - ux * uy
        ux = ux + shift
        uy = uy + shift
        rng = _data_range(target, data_range, dtype)
        c1 = (k1 * rng) ** 2
        c2 = (k2 * rng) ** 2
        smap = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
        per_sample = (1 - smap.flatten(1).mean(dim=1)) / 2  # (B,)
    return _reduce(per_sample, reduction)


LOSSES: MappingProxyType[str, Callable[..., torch.Tensor]] = MappingProxyType({"mse": mse_loss, "dssim": dssim_loss})


def make_loss(name: str, **kwargs) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss ``name`` (one of :data:`LOSSES`) with keyword options bound: ``loss(pred, target)``.

    Unknown names and options raise ``ValueError`` now rather than at the first training step.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(sorted(LOSSES))}")
    fn = LOSSES[name]
    params = inspect.signature(fn).parameters
    options = [p for p in params if p not in ("pred", "target")]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ValueError(f"loss {name!r} has no option(s) {unknown}; valid options: {options}")
    if "reduction" in kwargs and kwargs["reduction"] not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {kwargs['reduction']!r}")
    return functools.partial(fn, **kwargs)
