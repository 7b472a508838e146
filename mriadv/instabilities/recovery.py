"""Type 2 of the seed's instabilities over a dataset: small-feature recovery of a model and of the
zero-filled input, at random and at worst positions (the feature and its measures:
:mod:`mriadv.instabilities.features`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from mriadv.data.files import SliceDataset
from mriadv.data.transforms import UnetTransform
from mriadv.instabilities.features import FeatureSearch, FeatureSpec, case_metrics, feature_case
from mriadv.perturbations import reconstruct
from mriadv.runtime import Runtime


class NoTissue(ValueError):
    """No slice of a dataset has a position where the whole feature lies in tissue."""


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
    volumes = {
        f: {k: math.fsum(s[k] for s in rows) / len(rows) for k in FEATURE_METRICS}
        for f, rows in sorted(per_slice.items())
    }
    out: dict[str, Any] = {}
    for k in FEATURE_METRICS:
        out[k], out[f"{k}_se"] = _mean_se([v[k] for v in volumes.values()])
    return FeatureStats(**out, volume_fnr={f: v["fnr"] for f, v in volumes.items()})


def _pick(metrics: dict[str, torch.Tensor], i: int, threshold: float) -> dict[str, float]:
    err = float(metrics["error"][i])
    return {
        "error": err,
        "contrast": float(metrics["contrast"][i]),
        "fnr": float(err > threshold),
        "fnaf_nmse": float(metrics["fnaf_nmse"][i]),
    }


@torch.no_grad()
def feature_recovery(
    model: nn.Module,
    dataset: SliceDataset,
    runtime: Runtime,
    spec: FeatureSpec = FeatureSpec(),
    search: FeatureSearch = FeatureSearch(),
) -> FeatureResult:
    """Small-feature recovery (type 2) of ``model`` on every slice of ``dataset``.

    ``model`` maps normalised inputs ``(B, 1, h, w)`` (or, one that takes the measurements, their k-space)
    to reconstructions ``(B, 1, h, w)`` (:func:`mriadv.perturbations.reconstruct`; it is put in eval mode,
    restored afterwards); ``dataset`` is a :class:`SliceDataset` whose transform is a
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
        k: {} for k in ("random", "worst", "zero_filled_random", "zero_filled_worst")
    }
    measured = skipped = 0
    try:
        for i in range(len(dataset)):
            case = feature_case(dataset.read(i), transform, spec, search)
            if case is None:
                skipped += 1
                continue
            with runtime.evaluating():  # fp32: a small feature's error is below bf16's resolution
                preds = reconstruct(model, runtime, case.batch().to(runtime.device)).float()
            for prefix, out in (("", case_metrics(case, preds)), ("zero_filled_", case_metrics(case, case.inputs))):
                worst = int(torch.argmax(out["error"]))
                per_slice[prefix + "random"].setdefault(case.fname, []).append(_pick(out, 0, search.threshold))
                per_slice[prefix + "worst"].setdefault(case.fname, []).append(_pick(out, worst, search.threshold))
            measured += 1
    finally:
        model.train(was_training)
    if measured == 0:
        raise NoTissue(
            f"feature recovery: none of {len(dataset)} slices has a position where every pixel of the "
            f"feature is in tissue (tissue_fraction={search.tissue_fraction})"
        )
    stats = {k: _stats(v) for k, v in per_slice.items()}
    return FeatureResult(
        spec=spec,
        search=search,
        num_volumes=len(per_slice["random"]),
        num_slices=measured,
        skipped_slices=skipped,
        **stats,
    )


@torch.no_grad()
def feature_example(
    model: nn.Module,
    dataset: SliceDataset,
    runtime: Runtime,
    index: int,
    spec: FeatureSpec = FeatureSpec(),
    search: FeatureSearch = FeatureSearch(),
) -> dict[str, np.ndarray]:
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
        with runtime.evaluating():
            preds = reconstruct(model, runtime, case.batch().to(runtime.device)).float().cpu()
    finally:
        model.train(was_training)
    k = int(torch.argmax(case_metrics(case, preds)["error"]))
    images = {
        "target": case.targets[k + 1, 0],
        "feature": case.features[k],
        "input": case.inputs[k + 1, 0],
        "recon": preds[k + 1, 0],
        "recon_clean": preds[0, 0],
        "difference": preds[k + 1, 0] - preds[0, 0],
        "mask": case.masks[k].float(),
    }
    return {name: v.float().numpy() for name, v in images.items()}


def format_features(result: FeatureResult | dict[str, Any]) -> list[str]:
    """Human-readable lines: one per reconstructor and position choice (``result`` or its ``as_dict()``)."""
    d = result.as_dict() if isinstance(result, FeatureResult) else result
    s, q = d["spec"], d["search"]
    lines = [
        f"small features (type 2): {s['size']} px {s['shape']}, contrast {s['contrast']:+g}; {q['restarts']} "
        f"positions per slice, lost when relative error > {q['threshold']:g}; {d['num_volumes']} volumes, "
        f"{d['num_slices']} slices ({d['skipped_slices']} without tissue)"
    ]
    for name in ("random", "worst", "zero_filled_random", "zero_filled_worst"):
        st = d[name]
        lines.append(
            f"  {name:<19} error {st['error']:.3f}±{st['error_se']:.3f}  contrast {st['contrast']:.3f}"
            f"±{st['contrast_se']:.3f}  FNR {st['fnr']:.3f}±{st['fnr_se']:.3f}  "
            f"fnaf_nmse {st['fnaf_nmse']:.4f}"
        )
    return lines
