"""The seed's other two instabilities: small features that vanish, and more samples that do not help.

Huang & Liang (Sec. 1, after Antun et al., PNAS 2020) name three instabilities of learned
reconstruction; :mod:`mriadv.attacks` measures the first (tiny worst-case perturbations). This
module measures the other two on the same models and data.

**Type 2, small-feature recovery** (:func:`feature_recovery`), after Cheng, Calivá et al., "Addressing
the false negative problem of MRI reconstruction networks by adversarial attacks and robust training"
(MIDL 2020; code fcaliva/FNAF-fastMRI), who insert ~10-pixel features at random positions and keep the
worst of several restarts. A feature of ``size`` pixels (:class:`FeatureSpec`) is inserted into the
*data*, not painted onto the input. With ``z = F^-1 y`` the complex image of the slice's fully
sampled k-space ``y`` (``(H, W)``, readout oversampled) and ``C`` the centre crop to ``(h, w)``::

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

**Type 3, sampling sweep** (:func:`sampling_sweep`): the model is evaluated by
:func:`mriadv.evaluate.evaluate` at other accelerations with fixed, *nested* per-volume masks
(:class:`mriadv.data.masks.NestedMaskFunc`: one random column ranking per volume, seeded by the file
name; more samples are a superset of fewer; the centre band always included), and each row is flagged
where NMSE does not fall by more than its paired standard error relative to the row with fewer samples.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mriadv.data.files import SliceDataset
from mriadv.data.masks import NestedMaskFunc, volume_seed
from mriadv.data.transforms import (NORM_EPS, RawSlice, UnetTransform, apply_mask, center_crop, collate, denormalize,
                                    normalize, zero_filled_magnitude)
from mriadv.evaluate import evaluate, paired_se
from mriadv.fft import fft2c, ifft2c
from mriadv.runtime import Runtime

FEATURE_SHAPES = ("disc", "square")
SWEEP_ACCELERATIONS = (8.0, 6.0, 4.0, 3.0, 2.0)


class NoTissue(ValueError):
    """No slice of a dataset has a position where the whole feature lies in tissue."""


# ---------------------------------------------------------------------------------------------
# type 2: the feature, its positions, its insertion into the data
# ---------------------------------------------------------------------------------------------
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


def valid_anchors(target: np.ndarray, offsets: np.ndarray, tissue_fraction: float, contrast: float,
                  magnitude: np.ndarray | None = None) -> np.ndarray:
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


def insert_feature(kspace: torch.Tensor, target: torch.Tensor, masks: torch.Tensor,
                   contrast: float) -> FeatureInsertion:
    """Insert a feature into a slice's data (see the module docstring).

    ``kspace``: complex ``(H, W)``, the fully sampled k-space; ``target``: real ``(h, w)``, the
    reference (raw units); ``masks``: boolean ``(R, h, w)`` footprints in the centre crop (fastMRI's
    ``(H - h) // 2`` offset). Returns ``R`` versions of the data, each with the feature at one
    footprint, such that ``fft2c`` of the modified full image is the returned k-space and
    ``|C ifft2c(kspace')| = |C ifft2c(kspace)| + feature``."""
    if not torch.is_complex(kspace) or kspace.ndim != 2:
        raise ValueError(f"kspace must be complex (H, W), got {tuple(kspace.shape)} {kspace.dtype}")
    if masks.ndim != 3 or masks.shape[-2:] != target.shape or masks.dtype != torch.bool:
        raise ValueError(f"masks must be boolean (R, h, w) with (h, w) = {tuple(target.shape)}, got "
                         f"{tuple(masks.shape)} {masks.dtype}")
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


def measured_input(kspace: torch.Tensor, mask: torch.Tensor, crop: tuple[int, int], mean: torch.Tensor,
                   std: torch.Tensor, clamp: float | None) -> torch.Tensor:
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
    ``mean``, ``std``: the clean input's, 0-d."""

    inputs: torch.Tensor
    targets: torch.Tensor
    features: torch.Tensor
    masks: torch.Tensor
    anchors: np.ndarray
    mean: torch.Tensor
    std: torch.Tensor
    fname: str
    slice_num: int


def feature_case(raw: RawSlice, transform: UnetTransform, spec: FeatureSpec,
                 search: FeatureSearch) -> FeatureCase | None:
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
    targets = normalize(ins.target, mean, std)
    return FeatureCase(
        inputs=torch.cat([sample.image[None], inputs[:, None]]).float(),
        targets=torch.cat([sample.target[None], targets[:, None].float()]),
        features=(ins.feature / (std + NORM_EPS)).float(), masks=masks, anchors=anchors,
        mean=mean, std=std, fname=raw.fname, slice_num=raw.slice_num)


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


# ---------------------------------------------------------------------------------------------
# type 2: evaluation over a dataset
# ---------------------------------------------------------------------------------------------
FEATURE_METRICS = ("error", "contrast", "fnr", "fnaf_nmse")


@dataclass
class FeatureStats:
    """One reconstructor and one way of choosing positions: per-slice values averaged per volume,
    then means over volumes with standard errors (``*_se``; NaN for one volume). ``error``: relative
    L2 error of the recovered feature; ``contrast``: recovered share of the inserted contrast;
    ``fnr``: false-negative rate (share of slices whose feature is lost); ``fnaf_nmse``: FNAF's masked
    NMSE; ``volume_fnr``: FNR per volume, by file name (for paired comparisons)."""

    error: float
    contrast: float
    fnr: float
    fnaf_nmse: float
    error_se: float = float("nan")
    contrast_se: float = float("nan")
    fnr_se: float = float("nan")
    fnaf_nmse_se: float = float("nan")
    volume_fnr: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FeatureResult:
    """Outcome of :func:`feature_recovery`: ``random`` (the first position drawn per slice) and
    ``worst`` (the highest-error of ``search.restarts`` positions) for the model, the same for the
    zero-filled input (``zero_filled_*``, its own worst positions); ``num_slices``: slices measured,
    ``skipped_slices``: slices without a valid position (no tissue)."""

    spec: FeatureSpec
    search: FeatureSearch
    num_volumes: int
    num_slices: int
    skipped_slices: int
    random: FeatureStats
    worst: FeatureStats
    zero_filled_random: FeatureStats
    zero_filled_worst: FeatureStats

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _stats(per_slice: dict[str, list[dict[str, float]]]) -> FeatureStats:
    """``{fname: [{"error", "contrast", "fnr", "fnaf_nmse"} per slice]}`` -> volume means -> stats."""
    volumes = {f: {k: math.fsum(s[k] for s in rows) / len(rows) for k in FEATURE_METRICS}
               for f, rows in sorted(per_slice.items())}
    out: dict[str, Any] = {}
    for k in FEATURE_METRICS:
        out[k], out[f"{k}_se"] = _mean_se([v[k] for v in volumes.values()])
    return FeatureStats(**out, volume_fnr={f: v["fnr"] for f, v in volumes.items()})


def _pick(metrics: dict[str, torch.Tensor], i: int, threshold: float) -> dict[str, float]:
    err = float(metrics["error"][i])
    return {"error": err, "contrast": float(metrics["contrast"][i]), "fnr": float(err > threshold),
            "fnaf_nmse": float(metrics["fnaf_nmse"][i])}


@torch.no_grad()
def feature_recovery(model: nn.Module, dataset: SliceDataset, runtime: Runtime, spec: FeatureSpec = FeatureSpec(),
                     search: FeatureSearch = FeatureSearch()) -> FeatureResult:
    """Small-feature recovery (type 2) of ``model`` on every slice of ``dataset``.

    ``model`` maps normalised inputs ``(B, 1, h, w)`` to reconstructions of the same shape (it is put
    in eval mode, restored afterwards); ``dataset`` is a :class:`SliceDataset` whose transform is a
    validation :class:`UnetTransform` (``train=False``): its raw slices are read and the feature
    inserted into their k-space (see the module docstring). Each slice costs one forward pass of
    ``search.restarts + 1`` images. Restrict ``dataset`` (``with_slices``) to measure fewer slices.
    Raises :class:`NoTissue` when no slice has a valid position."""
    transform = dataset.transform
    if not isinstance(transform, UnetTransform):
        raise ValueError(f"feature recovery needs a dataset with a UnetTransform, got {type(transform).__name__}")
    was_training = model.training
    model.eval()
    per_slice: dict[str, dict[str, list[dict[str, float]]]] = {
        k: {} for k in ("random", "worst", "zero_filled_random", "zero_filled_worst")}
    measured = skipped = 0
    try:
        for i in range(len(dataset)):
            case = feature_case(dataset.read(i), transform, spec, search)
            if case is None:
                skipped += 1
                continue
            with runtime.autocast():
                preds = model(runtime.image(case.inputs.to(runtime.device))).float()
            for prefix, out in (("", case_metrics(case, preds)), ("zero_filled_", case_metrics(case, case.inputs))):
                worst = int(torch.argmax(out["error"]))
                per_slice[prefix + "random"].setdefault(case.fname, []).append(_pick(out, 0, search.threshold))
                per_slice[prefix + "worst"].setdefault(case.fname, []).append(_pick(out, worst, search.threshold))
            measured += 1
    finally:
        model.train(was_training)
    if measured == 0:
        raise NoTissue(f"feature recovery: none of {len(dataset)} slices has a position where every pixel of the "
                         f"feature is in tissue (tissue_fraction={search.tissue_fraction})")
    stats = {k: _stats(v) for k, v in per_slice.items()}
    return FeatureResult(spec=spec, search=search, num_volumes=len(per_slice["random"]), num_slices=measured,
                         skipped_slices=skipped, **stats)


@torch.no_grad()
def feature_example(model: nn.Module, dataset: SliceDataset, runtime: Runtime, index: int,
                    spec: FeatureSpec = FeatureSpec(),
                    search: FeatureSearch = FeatureSearch()) -> dict[str, np.ndarray]:
    """Images for a figure of slice ``index`` at its worst position, each float32 ``(h, w)`` in
    normalised units: ``target`` (with the feature), ``feature``, ``input`` (with the feature),
    ``recon`` (of that input), ``recon_clean`` (without the feature), ``difference`` (``recon -
    recon_clean``), ``mask`` (the footprint, 0/1). Raises ``ValueError`` for a slice without tissue."""
    case = feature_case(dataset.read(index), dataset.transform, spec, search)
    if case is None:
        raise ValueError(f"slice {index} of the dataset has no valid feature position")
    was_training = model.training
    model.eval()
    try:
        with runtime.autocast():
            preds = model(runtime.image(case.inputs.to(runtime.device))).float().cpu()
    finally:
        model.train(was_training)
    k = int(torch.argmax(case_metrics(case, preds)["error"]))
    images = {"target": case.targets[k + 1, 0], "feature": case.features[k], "input": case.inputs[k + 1, 0],
              "recon": preds[k + 1, 0], "recon_clean": preds[0, 0], "difference": preds[k + 1, 0] - preds[0, 0],
              "mask": case.masks[k].float()}
    return {name: v.float().numpy() for name, v in images.items()}


# ---------------------------------------------------------------------------------------------
# type 3: the sampling sweep
# ---------------------------------------------------------------------------------------------
@dataclass
class SamplingRow:
    """One acceleration of :func:`sampling_sweep`: the model's fastMRI metrics (mean over volumes,
    ``*_se`` standard errors) and the zero-filled input's (``zf_*``). ``effective_acceleration``:
    acquired columns / sampled acquired columns, mean over volumes (zero-padded columns are never
    sampled, so it can exceed the nominal one slightly). ``d_nmse``: NMSE minus the previous row's
    (fewer samples; NaN for the first), ``d_nmse_se`` its paired standard error over volumes;
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
        tf = replace(base, mask_func=func, train=False, keep_kspace=False)
        ds = dataset.restricted(dataset.volumes, tf).with_slices(dataset.slices)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                             collate_fn=collate)
        res = evaluate(model, loader, loss_fn, runtime, clamp=base.clamp)
        row = SamplingRow(
            acceleration=func.acceleration, center_fraction=cf, effective_acceleration=_effective(tf, ds),
            nmse=res.nmse, psnr=res.psnr, ssim=res.ssim, nmse_se=res.nmse_se, psnr_se=res.psnr_se,
            ssim_se=res.ssim_se, volume_nmse=res.volume_nmse)
        if zero_filled:
            zf = evaluate(nn.Identity(), loader, loss_fn, runtime, clamp=base.clamp)
            row.zf_nmse, row.zf_psnr, row.zf_ssim, row.zf_nmse_se = zf.nmse, zf.psnr, zf.ssim, zf.nmse_se
            if zf_prev is not None:
                row.zf_stagnant = _stagnant(zf.nmse - rows[-1].zf_nmse, paired_se(zf.volume_nmse, zf_prev))
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


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------
def format_features(result: FeatureResult | dict[str, Any]) -> list[str]:
    """Human-readable lines: one per reconstructor and position choice (``result`` or its ``as_dict()``)."""
    d = result.as_dict() if isinstance(result, FeatureResult) else result
    s, q = d["spec"], d["search"]
    lines = [f"small features (type 2): {s['size']} px {s['shape']}, contrast {s['contrast']:+g}; {q['restarts']} "
             f"positions per slice, lost when relative error > {q['threshold']:g}; {d['num_volumes']} volumes, "
             f"{d['num_slices']} slices ({d['skipped_slices']} without tissue)"]
    for name in ("random", "worst", "zero_filled_random", "zero_filled_worst"):
        st = d[name]
        lines.append(f"  {name:<19} error {st['error']:.3f}±{st['error_se']:.3f}  contrast {st['contrast']:.3f}"
                     f"±{st['contrast_se']:.3f}  FNR {st['fnr']:.3f}±{st['fnr_se']:.3f}  "
                     f"fnaf_nmse {st['fnaf_nmse']:.4f}")
    return lines


def format_sampling(rows: Sequence[SamplingRow | dict[str, Any]]) -> list[str]:
    """Human-readable lines: one per acceleration, fewest samples first, stagnation flagged (``rows``:
    :class:`SamplingRow` s or their ``as_dict()``)."""
    lines = ["sampling sweep (type 3), nested masks: R (effective)  nmse  psnr  ssim | zero-filled nmse"]
    for row in rows:
        r = row.as_dict() if isinstance(row, SamplingRow) else row
        flag = "  <- no improvement with more samples" if r["stagnant"] else ""
        lines.append(f"  {r['acceleration']:4g}x ({r['effective_acceleration']:4.2f}) cf {r['center_fraction']:g}  "
                     f"nmse {r['nmse']:.4f}±{r['nmse_se']:.4f}  psnr {r['psnr']:6.2f}  ssim {r['ssim']:.4f} | "
                     f"{r['zf_nmse']:.4f}{flag}")
    return lines
