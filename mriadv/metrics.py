"""Reconstruction metrics: fastMRI's volume-level NMSE / PSNR / SSIM, and the seed paper's batch metrics.

**fastMRI definitions** (``fastmri/evaluate.py``; Zbontar et al., "fastMRI: An Open Dataset and
Benchmarks for Accelerated MRI", 2018). On a de-normalised magnitude volume ``gt`` and its
reconstruction ``pred``, both ``(slices, H, W)``, in float64:

* ``nmse = ||gt - pred||^2 / ||gt||^2`` over the whole volume;
* ``psnr = 10 log10(maxval^2 / mean((gt - pred)^2))`` over the whole volume, ``maxval = gt.max()``
  of the volume unless given (== ``skimage.metrics.peak_signal_noise_ratio(gt, pred, data_range=maxval)``);
* ``ssim`` = mean over slices of ``skimage.metrics.structural_similarity(gt[i], pred[i],
  data_range=maxval)`` with skimage's defaults: 7x7 uniform window, K1 = 0.01, K2 = 0.03, sample
  (co)variances (factor 49/48), averaged over the valid region (a 3-pixel border is excluded).
  ``maxval`` is the *volume's* maximum, not the slice's.

:func:`nmse`, :func:`psnr` and :func:`ssim` compute these in NumPy (no scikit-image needed).
During training, :class:`VolumeMetrics` gives the same volume numbers from batches of slices in any
order, keeping only a few sums per slice; :func:`ssim_slices`, :func:`squared_error` and
:func:`sum_of_squares` (NMSE's denominator) are the batched torch kernels it uses.

**The seed paper's published evaluation** (:func:`seed_batch_metrics`), kept only so that our
numbers can be put next to its Table 1. It is *not* comparable to the fastMRI numbers above:

1. it is computed per mini-batch of slices, not per volume;
2. on instance-normalised, clamped network tensors (z-scores, which are negative in the background
   and whose maximum is not the image's peak), not on de-normalised magnitudes;
3. with prediction and reference swapped, so the normaliser of NMSE is ``||pred||^2``, and PSNR's
   peak and SSIM's data range are ``pred.max()`` of the batch: a reconstruction can improve its own
   scores by changing its peak or energy.

Its definitions, with ``gt`` and ``pred`` the batch's normalised tensors ``(B, 1, H, W)``:
``nmse_seed = ||pred - gt||^2 / ||pred||^2``; ``psnr_seed = 10 log10(pred.max()^2 / mean((pred - gt)^2))``;
``ssim_seed`` = mean over the batch's slices of the 7x7 SSIM above with ``data_range = pred.max()``
and ``pred`` as the first argument (SSIM is symmetric in its images, so only the data range changes).
Clamping (to the range the data transform uses) is the caller's job: the function measures what
it is given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# skimage.metrics.structural_similarity's defaults, which fastMRI's evaluation uses.
SSIM_WIN = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03


# --------------------------------------------------------------------------------------------
# NumPy, whole volumes (fastMRI evaluate.py)
# --------------------------------------------------------------------------------------------


def _check_volumes(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    for name, a in (("gt", gt), ("pred", pred)):
        if a.ndim != 3:
            raise ValueError(f"{name} must be a volume (slices, H, W), got shape {a.shape}")
        if np.iscomplexobj(a):
            raise ValueError(f"{name} must be real (a magnitude volume), got dtype {a.dtype}")
    if gt.shape != pred.shape:
        raise ValueError(f"pred must have the shape of gt {gt.shape}, got shape {pred.shape}")
    return gt.astype(np.float64, copy=False), pred.astype(np.float64, copy=False)


def _nmse_from_sums(sse: float, gt_norm: float) -> float:
    """``sse / gt_norm``; 0 when both are 0 (identical, e.g. all-zero, volumes), inf when only gt is 0."""
    if sse == 0.0:
        return 0.0
    return sse / gt_norm if gt_norm > 0.0 else math.inf


def _psnr_from_mse(mse: float, maxval: float) -> float:
    """``10 log10(maxval^2 / mse)``; +inf when ``mse == 0``, -inf when ``maxval == 0 < mse``."""
    if mse == 0.0:
        return math.inf
    if maxval == 0.0:
        return -math.inf
    return 10.0 * math.log10(float(maxval) ** 2 / mse)


def nmse(gt: np.ndarray, pred: np.ndarray) -> float:
    """Normalised MSE ``||gt - pred||^2 / ||gt||^2`` over a volume ``(slices, H, W)``.

    Returns 0.0 for identical volumes (even all-zero ones) and inf when ``gt`` is all zero and
    ``pred`` is not.
    """
    gt, pred = _check_volumes(gt, pred)
    return _nmse_from_sums(float(np.sum((gt - pred) ** 2)), float(np.sum(gt**2)))


def psnr(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> float:
    """PSNR in dB, ``10 log10(maxval^2 / MSE)`` over a volume ``(slices, H, W)``.

    ``maxval`` defaults to ``gt.max()``. Equals ``skimage.metrics.peak_signal_noise_ratio(gt, pred,
    data_range=maxval)``; identical volumes give +inf.
    """
    gt, pred = _check_volumes(gt, pred)
    maxval = float(gt.max()) if maxval is None else float(maxval)
    return _psnr_from_mse(float(np.mean((gt - pred) ** 2)), maxval)


def _box_mean(a: np.ndarray, win: int) -> np.ndarray:
    """Mean over every ``win x win`` window fully inside the image: ``(S, H, W) -> (S, H-win+1, W-win+1)``.

    Separable shifted sums (2 * win adds per pixel) rather than cumulative sums, whose rounding
    error grows with the image's total and would leak into the small local variances.
    """
    h, w = a.shape[-2] - win + 1, a.shape[-1] - win + 1
    rows = sum(a[..., i : i + h, :] for i in range(win))
    return sum(rows[..., j : j + w] for j in range(win)) / (win * win)


def _ssim_map_np(x: np.ndarray, y: np.ndarray, data_range: np.ndarray) -> np.ndarray:
    """skimage's default SSIM map on the valid region. ``x, y``: ``(S, H, W)``; ``data_range``
    broadcastable to ``(S, 1, 1)`` -> ``(S, H-6, W-6)``."""
    np_win = SSIM_WIN * SSIM_WIN
    cov_norm = np_win / (np_win - 1)  # sample covariance, as skimage's default
    ux, uy = _box_mean(x, SSIM_WIN), _box_mean(y, SSIM_WIN)
    uxx, uyy, uxy = _box_mean(x * x, SSIM_WIN), _box_mean(y * y, SSIM_WIN), _box_mean(x * y, SSIM_WIN)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))


def ssim(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> float:
    """Mean over slices of the 7x7 SSIM, as fastMRI's ``evaluate.ssim``.

    ``gt``, ``pred``: ``(slices, H, W)`` with ``H, W >= 7``. ``maxval`` (the SSIM data range) defaults
    to ``gt.max()`` of the whole volume. Agrees with looping ``skimage.metrics.structural_similarity
    (gt[i], pred[i], data_range=maxval)`` over slices (to ~1e-12 on float64 data).
    """
    gt, pred = _check_volumes(gt, pred)
    if min(gt.shape[-2:]) < SSIM_WIN:
        raise ValueError(f"ssim needs slices of at least {SSIM_WIN}x{SSIM_WIN}, got shape {gt.shape}")
    maxval = float(gt.max()) if maxval is None else float(maxval)
    smap = _ssim_map_np(gt, pred, np.float64(maxval))
    return float(smap.mean(axis=(-2, -1)).mean())


# --------------------------------------------------------------------------------------------
# torch, batches of slices (validation during training)
# --------------------------------------------------------------------------------------------


def _as_slices(x: torch.Tensor, name: str) -> torch.Tensor:
    """``(B, 1, H, W)`` or ``(B, H, W)`` real tensor -> float64 ``(B, H, W)``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor (B, 1, H, W) or (B, H, W), got {type(x).__name__}")
    if x.is_complex():
        raise ValueError(f"{name} must be real, got dtype {x.dtype}")
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    elif x.ndim != 3:
        raise ValueError(f"{name} must have shape (B, 1, H, W) or (B, H, W), got {tuple(x.shape)}")
    return x.detach().to(torch.float64)


def _pair(gt: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g, p = _as_slices(gt, "gt"), _as_slices(pred, "pred")
    if g.shape != p.shape:
        raise ValueError(f"pred must have the shape of gt {tuple(gt.shape)}, got {tuple(pred.shape)}")
    return g, p


def _per_slice(
    value: torch.Tensor | float | Sequence[float], batch: int, like: torch.Tensor, name: str
) -> torch.Tensor:
    """A float or a ``(B,)`` tensor/sequence -> float64 ``(B,)`` on ``like``'s device."""
    v = torch.as_tensor(value, dtype=torch.float64, device=like.device)
    if v.ndim == 0:
        return v.expand(batch)
    if v.shape != (batch,):
        raise ValueError(f"{name} must be a float or have shape ({batch},), got {tuple(v.shape)}")
    return v


@torch.no_grad()
def squared_error(gt: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Per-slice sum of squared errors ``sum((gt - pred)^2)``: ``(B, 1, H, W)`` or ``(B, H, W)`` -> float64 ``(B,)``."""
    g, p = _pair(gt, pred)
    return (g - p).square().sum(dim=(-2, -1))


@torch.no_grad()
def sum_of_squares(gt: torch.Tensor) -> torch.Tensor:
    """Per-slice ``sum(gt^2)``, the denominator of NMSE: ``(B, 1, H, W)`` or ``(B, H, W)`` -> float64 ``(B,)``.
    (Not :func:`mriadv.perturbations.squared_norm`, the differentiable norm of a perturbation.)"""
    return _as_slices(gt, "gt").square().sum(dim=(-2, -1))


@torch.no_grad()
def ssim_slices(gt: torch.Tensor, pred: torch.Tensor, maxval: torch.Tensor | float) -> torch.Tensor:
    """Per-slice 7x7 SSIM with skimage's defaults (the definition :func:`ssim` averages).

    ``gt``, ``pred``: ``(B, 1, H, W)`` or ``(B, H, W)``, ``H, W >= 7``, any float dtype and device;
    computed in float64. ``maxval``: the data range, a float or a ``(B,)`` tensor (in validation, the
    maximum of each slice's *volume*). Returns float64 ``(B,)`` on the inputs' device.
    """
    g, p = _pair(gt, pred)
    if min(g.shape[-2:]) < SSIM_WIN:
        raise ValueError(f"ssim_slices needs slices of at least {SSIM_WIN}x{SSIM_WIN}, got shape {tuple(gt.shape)}")
    rng = _per_slice(maxval, g.shape[0], g, "maxval")[:, None, None]
    np_win = SSIM_WIN * SSIM_WIN
    cov_norm = np_win / (np_win - 1)
    with torch.autocast(device_type=g.device.type, enabled=False):  # keep float64 under autocast
        stats = torch.stack([g, p, g * g, p * p, g * p], dim=1)  # (B, 5, H, W)
        ux, uy, uxx, uyy, uxy = F.avg_pool2d(stats, SSIM_WIN, stride=1).unbind(1)  # each (B, H-6, W-6)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1 = (SSIM_K1 * rng) ** 2
    c2 = (SSIM_K2 * rng) ** 2
    smap = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return smap.mean(dim=(-2, -1))


class VolumeMetrics:
    """Accumulates per-slice sums from validation batches and reports fastMRI's volume metrics.

    Feed it batches in any order with :meth:`update`; it groups slices by ``fname`` and keeps, per
    slice, only the squared error, the squared norm of ``gt``, the slice SSIM, the pixel count and
    ``maxval``. A slice seen twice (e.g. padded by a distributed sampler) overwrites the first.
    :meth:`per_volume` then gives, for each volume, exactly the :func:`nmse`, :func:`psnr` and
    :func:`ssim` of the stacked volume (with ``maxval`` as the PSNR peak and SSIM data range), and
    :meth:`summary` their means over volumes.
    """

    def __init__(self) -> None:
        # fname -> slice index -> (sse, ||gt||^2, ssim, pixels, maxval)
        self._slices: dict[str, dict[int, tuple[float, float, float, int, float]]] = {}

    def __len__(self) -> int:
        """Number of volumes seen."""
        return len(self._slices)

    def reset(self) -> None:
        self._slices.clear()

    def update(
        self,
        fnames: Sequence[str],
        slice_idx: torch.Tensor | Sequence[int],
        gt: torch.Tensor,
        pred: torch.Tensor,
        maxval: torch.Tensor | float,
    ) -> None:
        """Add a batch of ``B`` slices.

        ``fnames``: ``B`` volume names; ``slice_idx``: ``(B,)`` slice numbers within each volume;
        ``gt``, ``pred``: de-normalised images ``(B, 1, H, W)`` or ``(B, H, W)``; ``maxval``: float or
        ``(B,)``, the maximum of each slice's volume (all slices of a volume must agree).
        """
        g, p = _pair(gt, pred)
        b = g.shape[0]
        if isinstance(fnames, str) or len(fnames) != b:
            raise ValueError(f"fnames must be a sequence of {b} names, got {fnames!r:.80}")
        idx = torch.as_tensor(slice_idx)
        if idx.shape != (b,):
            raise ValueError(f"slice_idx must have shape ({b},), got {tuple(idx.shape)}")
        mv = _per_slice(maxval, b, g, "maxval")
        sse = squared_error(g, p)
        norm = sum_of_squares(g)
        ss = ssim_slices(g, p, mv)
        pixels = g.shape[-2] * g.shape[-1]
        rows = zip(fnames, idx.tolist(), sse.tolist(), norm.tolist(), ss.tolist(), mv.tolist())
        for fname, i, e, n, s, m in rows:
            vol = self._slices.setdefault(str(fname), {})
            if vol:
                m0 = next(iter(vol.values()))[4]
                if not math.isclose(m, m0, rel_tol=1e-6, abs_tol=0.0):
                    raise ValueError(f"maxval of volume {fname!r} differs between slices: {m0} vs {m} (slice {i})")
            vol[int(i)] = (e, n, s, pixels, m)

    def per_volume(self) -> dict[str, dict[str, float]]:
        """``{fname: {"nmse": ..., "psnr": ..., "ssim": ...}}`` with fastMRI's volume definitions."""
        out: dict[str, dict[str, float]] = {}
        for fname, vol in self._slices.items():
            sse = math.fsum(v[0] for v in vol.values())
            norm = math.fsum(v[1] for v in vol.values())
            pixels = sum(v[3] for v in vol.values())
            maxval = next(iter(vol.values()))[4]
            out[fname] = {
                "nmse": _nmse_from_sums(sse, norm),
                "psnr": _psnr_from_mse(sse / pixels, maxval),
                "ssim": math.fsum(v[2] for v in vol.values()) / len(vol),
            }
        return out

    def summary(self) -> dict[str, float]:
        """Means over volumes: ``{"nmse": ..., "psnr": ..., "ssim": ...}``. Raises if nothing was added."""
        vols = self.per_volume()
        if not vols:
            raise ValueError("VolumeMetrics.summary: no slices have been added")
        return {k: math.fsum(v[k] for v in vols.values()) / len(vols) for k in ("nmse", "psnr", "ssim")}

    def standard_errors(self) -> dict[str, float]:
        """Standard errors of the means of :meth:`summary` over volumes: ``std(ddof=1) / sqrt(n)``
        (NaN with fewer than two volumes). Volumes, not slices, are the independent units."""
        vols = self.per_volume()
        n = len(vols)
        if n < 2:
            return dict.fromkeys(("nmse", "psnr", "ssim"), float("nan"))
        out = {}
        for k in ("nmse", "psnr", "ssim"):
            values = [v[k] for v in vols.values()]
            mean = math.fsum(values) / n
            out[k] = math.sqrt(math.fsum((x - mean) ** 2 for x in values) / (n - 1) / n)
        return out


@torch.no_grad()
def seed_batch_metrics(gt: torch.Tensor, pred: torch.Tensor) -> dict[str, float]:
    """The seed paper's per-batch metrics (see the module docstring for why they differ from fastMRI's).

    ``gt``, ``pred``: one batch of instance-normalised (and clamped) images ``(B, 1, H, W)`` or
    ``(B, H, W)``. Returns ``{"nmse", "psnr", "ssim"}`` with prediction and reference swapped:
    ``||pred - gt||^2 / ||pred||^2``, ``10 log10(pred.max()^2 / mean((pred - gt)^2))`` and the mean
    over slices of ``SSIM(pred_i, gt_i, data_range=pred.max())``.
    """
    g, p = _pair(gt, pred)
    sse = float((p - g).square().sum())
    peak = float(p.max())
    return {
        "nmse": _nmse_from_sums(sse, float(p.square().sum())),
        "psnr": _psnr_from_mse(sse / g.numel(), peak),
        "ssim": float(ssim_slices(p, g, peak).mean()),
    }
