"""Type 2 of the seed's instabilities, small-feature recovery: a feature inserted into one slice's
data, and how much of it a reconstruction recovers (over a dataset:
:func:`mriadv.instabilities.recovery.feature_recovery`).

After Cheng, Calivá et al., "Addressing the false negative problem of MRI reconstruction networks by
adversarial attacks and robust training" (MIDL 2020; code fcaliva/FNAF-fastMRI), who insert ~10-pixel
features at random positions and keep the worst of several restarts. A feature of ``size`` pixels
(:class:`FeatureSpec`) is inserted into the *data*, not painted onto the input. With ``z = F^-1 y``
the complex image of the slice's fully sampled k-space ``y`` (``(H, W)``, readout oversampled) and
``C`` the centre crop to ``(h, w)``::

    a     = contrast * mean(target over the footprint)            # local tissue level, raw units
    z'    = z + C^T(a * 1_footprint * z / |z|)                     # |C z'| = |C z| + a on the footprint
    y'    = y + F C^T(a * 1_footprint * z / |z|) = F z'            # the feature's k-space added
    x~'   = clamp(normalize(|C F^-1 P y'|, mean, std))             # the volume's fixed mask P
    target' = target + a * 1_footprint

The feature follows the local phase, so it adds exactly ``a`` to the magnitude of each footprint pixel
(for a negative contrast, positions where ``|C z| + a < 0`` somewhere are not drawn). Its k-space also
fills the file's zero-padded columns, which the mask never samples, as for the anatomy.
``mean``/``std`` are the *clean* input's: the feature changes them by a negligible amount (10 pixels in
~10^5), and keeping them makes ``f(x~') - f(x~)`` the feature's effect alone, not a global rescaling.

Recovery is measured against the same position without the feature: with ``d = f(x~') - f(x~)`` (the
reconstruction with the feature minus the one without, in raw units) and ``M`` the footprint,

* ``error = ||(d - a) 1_M|| / ||a 1_M||`` (relative L2 error of the recovered feature: 0 perfect,
  1 for a feature the reconstruction ignores);
* ``contrast = mean_M(d) / a`` (the recovered share of the inserted contrast);
* ``lost = error > threshold`` (FNAF counts a feature as a false negative when its masked loss exceeds
  a threshold; ours is relative, so one threshold serves every contrast and intensity scale. The
  default 0.5: a feature recovered at under half its contrast, or smeared or displaced as much, is lost);
* ``fnaf_nmse = ||(f(x~') - target') 1_M||^2 / ||target' 1_M||^2``, FNAF's own masked NMSE (it includes
  the reconstruction's error at that position without the feature), for comparison.

Positions (:class:`FeatureSearch`) lie inside the anatomy: every footprint pixel's target is at least
``tissue_fraction`` of the slice maximum. Each slice draws ``restarts`` positions from a generator
seeded by ``(seed, file, slice)``; the first is the *random* variant, the one with the highest error
the *worst* (adversarial position search by random restarts, as FNAF). The zero-filled input is
measured the same way as a baseline. Per-volume means, then means and standard errors over volumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np
import torch

from mriadv.data.masks import volume_seed
from mriadv.data.transforms import (
    NORM_EPS,
    Batch,
    RawSlice,
    UnetTransform,
    apply_mask,
    center_crop,
    denormalize,
    normalize,
    zero_filled_magnitude,
)
from mriadv.fft import fft2c, ifft2c

FEATURE_SHAPES = ("disc", "square")


@dataclass(frozen=True)
class FeatureSpec:
    """A small synthetic feature.

    Args:
        size: its area in pixels of the crop, exactly.
        shape: ``'disc'`` (the ``size`` pixels nearest its centre) or ``'square'`` (nearest in the max
            norm; ``size = s^2`` gives an ``s x s`` square).
        contrast: what it adds to the magnitude, relative to the local tissue (the mean target over
            its footprint): 0.5 makes it 50 % brighter than the tissue there, -0.5 50 % darker;
            nonzero, > -1.
    """

    size: int = 10
    shape: str = "disc"
    contrast: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ValueError(f"feature size must be a positive number of pixels, got {self.size!r}")
        if self.shape not in FEATURE_SHAPES:
            raise ValueError(f"feature shape {self.shape!r}: must be one of {FEATURE_SHAPES}")
        if not (math.isfinite(self.contrast) and self.contrast > -1.0 and self.contrast != 0.0):
            raise ValueError(f"feature contrast must be finite, nonzero and > -1, got {self.contrast}")


@dataclass(frozen=True)
class FeatureSearch:
    """Where features go and when one counts as lost.

    Args:
        restarts: positions drawn per slice; the first gives the random variant, the worst of all the
            adversarial one (FNAF: 11).
        threshold: a feature is lost when its relative error exceeds this.
        tissue_fraction: every footprint pixel's target must be at least this fraction of the slice's
            maximum (inside the anatomy, not air).
        seed: positions are drawn from ``default_rng([seed, CRC(file), slice])``.
    """

    restarts: int = 8
    threshold: float = 0.5
    tissue_fraction: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.restarts, int) or self.restarts < 1:
            raise ValueError(f"restarts must be a positive integer, got {self.restarts!r}")
        if not self.threshold > 0:
            raise ValueError(f"threshold must be > 0, got {self.threshold}")
        if not 0.0 < self.tissue_fraction <= 1.0:
            raise ValueError(f"tissue_fraction must be in (0, 1], got {self.tissue_fraction}")


def footprint(size: int, shape: str) -> np.ndarray:
    """The feature's pixels as integer offsets ``(size, 2)`` (row, column) from its anchor pixel.

    The ``size`` grid points nearest a reference point (Euclidean distance for a disc, the max norm for
    a square; ties broken by Euclidean distance, then angle). The reference is the anchor itself or its
    corner (-0.5, -0.5): for a square the anchor when ``round(sqrt(size))`` is odd, so that ``s^2``
    pixels make an ``s x s`` square; for a disc whichever gives the smaller radius (then the smaller
    sum of squared distances), so that it is as round as its area allows."""
    FeatureSpec(size=size, shape=shape)  # validates
    side = int(round(math.sqrt(size)))
    r = side + 2
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1].reshape(2, -1)

    def nearest(ref: float) -> tuple[np.ndarray, np.ndarray]:
        ey, ex = dy - ref, dx - ref
        euclid = np.hypot(ey, ex)
        primary = euclid if shape == "disc" else np.maximum(np.abs(ey), np.abs(ex))
        order = np.lexsort((np.arctan2(ey, ex), np.round(euclid, 9), np.round(primary, 9)))[:size]
        return order, euclid[order]

    if shape == "square":
        order, _ = nearest(0.0 if side % 2 else -0.5)
    else:
        candidates = [nearest(0.0), nearest(-0.5)]
        order, _ = min(candidates, key=lambda c: (round(float(c[1].max()), 9), round(float(np.square(c[1]).sum()), 9)))
    return np.stack([dy[order], dx[order]], axis=1).astype(np.int64)


def _stack(x: np.ndarray, offsets: np.ndarray, fill: Any) -> np.ndarray:
    """``out[i, r, c] = x[r + dy_i, c + dx_i]`` (``fill`` outside): ``(h, w) -> (n, h, w)``."""
    h, w = x.shape
    pad = int(np.abs(offsets).max())
    padded = np.pad(x, pad, constant_values=fill)
    return np.stack([padded[pad + dy : pad + dy + h, pad + dx : pad + dx + w] for dy, dx in offsets])


def valid_anchors(
    target: np.ndarray,
    offsets: np.ndarray,
    tissue_fraction: float,
    contrast: float,
    magnitude: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean ``(h, w)``: the anchors whose whole footprint lies in the crop and in tissue.

    ``target``: real ``(h, w)`` (raw units); every footprint pixel must be ``>= tissue_fraction *
    target.max()``. For a negative contrast also ``magnitude + contrast * level >= 0`` on the footprint
    (``magnitude``: ``|C F^-1 y|``, default ``target``; ``level``: the footprint's mean target), so that
    the feature adds exactly ``contrast * level`` to the magnitude there."""
    target = np.asarray(target, dtype=np.float64)
    if target.ndim != 2:
        raise ValueError(f"target must be (h, w), got shape {target.shape}")
    peak = float(target.max())
    if not peak > 0:
        return np.zeros(target.shape, dtype=bool)
    valid = _stack(target >= tissue_fraction * peak, offsets, False).all(0)
    if contrast < 0:
        mag = target if magnitude is None else np.asarray(magnitude, dtype=np.float64)
        level = _stack(target, offsets, 0.0).mean(0)
        valid &= _stack(mag, offsets, 0.0).min(0) + contrast * level >= 0
    return valid


def footprint_masks(anchors: np.ndarray, offsets: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """Boolean ``(R, h, w)``: the footprint at each anchor of ``anchors`` ``(R, 2)`` (row, column)."""
    anchors = np.asarray(anchors, dtype=np.int64).reshape(-1, 2)
    rows = anchors[:, None, 0] + offsets[None, :, 0]
    cols = anchors[:, None, 1] + offsets[None, :, 1]
    h, w = shape
    if rows.min(initial=0) < 0 or cols.min(initial=0) < 0 or rows.max(initial=0) >= h or cols.max(initial=0) >= w:
        raise ValueError(f"a footprint leaves the {shape} crop")
    masks = np.zeros((len(anchors), h, w), dtype=bool)
    masks[np.arange(len(anchors))[:, None], rows, cols] = True
    return torch.from_numpy(masks)


class FeatureInsertion(NamedTuple):
    """The data with the feature: one entry per footprint.

    ``kspace``: complex ``(R, H, W)``, ``F z'``; ``target``: real ``(R, h, w)``, the target plus the
    feature; ``feature``: real ``(R, h, w)``, what was added to the magnitude (``contrast * level`` on
    the footprint, 0 elsewhere); ``level``: ``(R,)``, the mean target over each footprint. Raw units."""

    kspace: torch.Tensor
    target: torch.Tensor
    feature: torch.Tensor
    level: torch.Tensor


def insert_feature(
    kspace: torch.Tensor, target: torch.Tensor, masks: torch.Tensor, contrast: float
) -> FeatureInsertion:
    """Insert a feature into a slice's data (see the module docstring).

    ``kspace``: complex ``(H, W)``, the fully sampled k-space; ``target``: real ``(h, w)``, the
    reference (raw units); ``masks``: boolean ``(R, h, w)`` footprints in the centre crop (fastMRI's
    ``(H - h) // 2`` offset). Returns ``R`` versions of the data, each with the feature at one
    footprint, such that ``fft2c`` of the modified full image is the returned k-space and
    ``|C ifft2c(kspace')| = |C ifft2c(kspace)| + feature``."""
    if not torch.is_complex(kspace) or kspace.ndim != 2:
        raise ValueError(f"kspace must be complex (H, W), got {tuple(kspace.shape)} {kspace.dtype}")
    if masks.ndim != 3 or masks.shape[-2:] != target.shape or masks.dtype != torch.bool:
        raise ValueError(
            f"masks must be boolean (R, h, w) with (h, w) = {tuple(target.shape)}, got "
            f"{tuple(masks.shape)} {masks.dtype}"
        )
    h, w = target.shape
    H, W = kspace.shape
    if h > H or w > W:
        raise ValueError(f"target {(h, w)} does not fit in k-space {(H, W)}")
    top, left = (H - h) // 2, (W - w) // 2
    target = target.to(torch.float64)
    weights = masks.to(torch.float64)
    level = (weights * target).sum((-2, -1)) / weights.sum((-2, -1))  # (R,)
    feature = contrast * level[:, None, None] * weights  # (R, h, w)
    image = ifft2c(kspace.to(torch.complex128))
    crop = image[top : top + h, left : left + w]
    phase = torch.where(crop.abs() > 0, torch.sgn(crop), torch.ones_like(crop))
    full = torch.zeros((len(masks), H, W), dtype=torch.complex128)
    full[:, top : top + h, left : left + w] = feature * phase
    new_k = kspace.to(torch.complex128) + fft2c(full)
    return FeatureInsertion(new_k.to(kspace.dtype), (target + feature).float(), feature.float(), level.float())


def measured_input(
    kspace: torch.Tensor,
    mask: torch.Tensor,
    crop: tuple[int, int],
    mean: torch.Tensor,
    std: torch.Tensor,
    clamp: float | None,
) -> torch.Tensor:
    """The network input of full k-space ``(..., H, W)`` under the column mask ``(W,)``: the zero-filled
    magnitude, normalised with the given ``mean``/``std`` and clamped as :class:`UnetTransform` does.
    Returns ``(..., h, w)``; equals ``Sample.image[0]`` for the slice's own k-space, mean and std."""
    image = normalize(zero_filled_magnitude(apply_mask(kspace, mask), crop), mean, std).float()
    return image.clamp(-clamp, clamp) if clamp is not None else image


class FeatureCase(NamedTuple):
    """One slice with the feature at ``R`` positions, model-ready (normalised units).

    ``inputs``, ``targets``: ``(R + 1, 1, h, w)``, the clean slice first, then one per position;
    ``features``: ``(R, h, w)``, the inserted feature in normalised units (``a / (std + eps)`` on the
    footprint); ``masks``: boolean ``(R, h, w)``; ``anchors``: ``(R, 2)`` (row, column) in the crop;
    ``mean``, ``std``: the clean input's, 0-d; ``kspace``: complex ``(R + 1, H, W)``, the measurements of
    each input (masked, divided by ``std + eps``, as :class:`~mriadv.data.transforms.Sample`'s) and
    ``mask`` ``(W,)`` their columns, for a reconstructor that takes the measurements (:meth:`batch`)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    features: torch.Tensor
    masks: torch.Tensor
    anchors: np.ndarray
    mean: torch.Tensor
    std: torch.Tensor
    fname: str
    slice_num: int
    kspace: torch.Tensor
    mask: torch.Tensor

    def batch(self) -> Batch:
        """The ``R + 1`` inputs as one :class:`~mriadv.data.transforms.Batch` (for
        :func:`mriadv.perturbations.reconstruct`); ``max_value`` is NaN: not a batch to score."""
        n = len(self.inputs)
        return Batch(
            image=self.inputs,
            target=self.targets,
            mean=self.mean.expand(n),
            std=self.std.expand(n),
            max_value=torch.full((n,), float("nan")),
            fnames=[self.fname] * n,
            slice_nums=torch.full((n,), self.slice_num, dtype=torch.long),
            kspace=self.kspace,
            mask=self.mask.expand(n, -1),
        )


def feature_case(
    raw: RawSlice, transform: UnetTransform, spec: FeatureSpec, search: FeatureSearch
) -> FeatureCase | None:
    """Draw ``search.restarts`` positions in ``raw``'s anatomy and build the inputs with the feature
    there, through ``transform``'s fixed per-volume mask (``transform.train`` must be False). None
    when the slice has no valid position."""
    if transform.train:
        raise ValueError("feature recovery needs the fixed per-volume validation masks (a transform with train=False)")
    sample = replace(transform, keep_kspace=True)(raw)  # the clean input, its mean/std and the exact mask
    crop = (transform.crop_size, transform.crop_size)
    kspace = torch.from_numpy(np.ascontiguousarray(raw.kspace))
    if raw.target is not None:
        target = center_crop(torch.from_numpy(np.ascontiguousarray(raw.target)), crop).float()
    else:
        target = zero_filled_magnitude(kspace, crop)
    offsets = footprint(spec.size, spec.shape)
    magnitude = zero_filled_magnitude(kspace, crop).numpy() if spec.contrast < 0 else None
    valid = np.flatnonzero(valid_anchors(target.numpy(), offsets, search.tissue_fraction, spec.contrast, magnitude))
    if valid.size == 0:
        return None
    rng = np.random.default_rng([search.seed, volume_seed(raw.fname), raw.slice_num])
    picks = rng.choice(valid, size=search.restarts, replace=valid.size < search.restarts)
    anchors = np.stack(np.unravel_index(picks, crop), axis=1)
    masks = footprint_masks(anchors, offsets, crop)
    ins = insert_feature(kspace, target, masks, spec.contrast)
    mean, std = sample.mean, sample.std
    inputs = measured_input(ins.kspace, sample.mask, crop, mean, std, transform.clamp)  # (R, h, w)
    measured = (apply_mask(ins.kspace, sample.mask) / (std + NORM_EPS)).to(torch.complex64)  # as sample.kspace
    targets = normalize(ins.target, mean, std)
    return FeatureCase(
        inputs=torch.cat([sample.image[None], inputs[:, None]]).float(),
        targets=torch.cat([sample.target[None], targets[:, None].float()]),
        features=(ins.feature / (std + NORM_EPS)).float(),
        masks=masks,
        anchors=anchors,
        mean=mean,
        std=std,
        fname=raw.fname,
        slice_num=raw.slice_num,
        kspace=torch.cat([sample.kspace[None], measured]),  # type: ignore[index]
        mask=sample.mask,
    )


def case_metrics(case: FeatureCase, preds: torch.Tensor) -> dict[str, torch.Tensor]:
    """Recovery of each position's feature from reconstructions ``preds`` ``(R + 1, 1, h, w)`` of
    ``case.inputs`` (normalised units, the clean slice first). Returns float64 ``(R,)`` tensors
    ``error``, ``contrast`` and ``fnaf_nmse`` (see the module docstring)."""
    if preds.shape != case.inputs.shape:
        raise ValueError(f"preds must have the inputs' shape {tuple(case.inputs.shape)}, got {tuple(preds.shape)}")
    preds = preds.detach().to("cpu", torch.float64)[:, 0]
    m = case.masks.to(torch.float64)
    f = case.features.to(torch.float64)
    d = preds[1:] - preds[:1]  # the reconstruction's change where the feature is, normalised units
    error = ((d - f) * m).square().sum((-2, -1)).sqrt() / (f * m).square().sum((-2, -1)).sqrt()
    contrast = (d * m).sum((-2, -1)) / (f * m).sum((-2, -1))
    std, mean = case.std.double(), case.mean.double()
    recon = denormalize(preds[1:], mean, std)
    target = denormalize(case.targets[1:, 0].double(), mean, std)
    fnaf = ((recon - target) * m).square().sum((-2, -1)) / (target * m).square().sum((-2, -1))
    return {"error": error, "contrast": contrast, "fnaf_nmse": fnaf}
