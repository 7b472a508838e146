"""Budget units and the flat metric names of records. Standard library only (no torch), so that the
study's search spaces and its report share them without loading the networks.

Perturbation budgets are squared L2 norms of one image's perturbation, in normalised units, at the
run's crop. The seed gives its budgets for 320x320 images (:data:`REFERENCE_CROP`); the same budget
is a larger per-pixel perturbation on a smaller crop, so a budget moves between crops at equal
per-pixel RMS ``sqrt(epsilon / (H W))``: :func:`scale_epsilon` (320x320 -> crop) and
:func:`to_reference` (crop -> 320x320) are the one conversion, each way. Metric names carry the
320x320 budget (``rob_pgd_e5000_nmse``), so one study space gives the same names on every profile.

What a budget ``epsilon`` at crop ``c`` bounds depends on the perturbation's domain:

* image: ``||delta||^2 <= epsilon`` on the z-scored ``c x c`` input (``||x~||^2 ~ c^2``), a relative
  size ``||delta|| / ||x~|| ~ sqrt(epsilon / c^2)``;
* k-space: the same *relative* energy of the slice's sampled k-space ``y`` (the normalised masked
  k-space): ``||delta||^2 <= (epsilon / c^2) ||y||^2`` per slice, i.e. ``||delta|| / ||y|| <=
  sqrt(epsilon / c^2)``. A k-space perturbation spreads over the whole k-space grid (fastMRI:
  640 x 368), which does not shrink with the crop, and ``y`` is normalised by the *cropped* image's
  std, so an absolute ``||delta||^2`` would mean a different raw energy at every crop; the ratio
  ``||delta||^2 / ||y||^2`` does not depend on the normalisation, and ``epsilon / c^2 =
  epsilon_ref / 320^2`` (:func:`relative_energy`), so one budget gives the same relative k-space
  energy on every crop and data set (Krainovic, Soltanolkotabi & Heckel, NeurIPS 2023, also give
  k-space budgets relative to ``||y||``).

:func:`epsilon_rms` ``= sqrt(epsilon / c^2)`` is therefore the per-pixel RMS of an image budget and,
for a k-space run, the relative size ``||delta|| / ||y||`` of its perturbation.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

REFERENCE_CROP = 320  # the seed's crop; epsilon values "at 320" are scaled from here
ROBUST_METRICS = ("nmse", "psnr", "ssim", "d_nmse", "d_psnr", "d_ssim")  # per attack and budget


def scale_epsilon(epsilon_at_reference: float, crop_size: int, reference: int = REFERENCE_CROP) -> float:
    """A budget given for ``reference``x``reference`` images, at equal per-pixel RMS for ``crop_size``."""
    return float(epsilon_at_reference) * (crop_size * crop_size) / (reference * reference)


def to_reference(budget: float, crop_size: int, reference: int = REFERENCE_CROP) -> float:
    """A budget at ``crop_size`` expressed at 320x320 with the same per-pixel RMS (the seed's units)."""
    return round(budget * reference * reference / (crop_size * crop_size), 6)


def relative_energy(epsilon: float, crop: int | tuple[int, int]) -> float:
    """``epsilon / (h w)``: the energy of a budget ``epsilon`` at crop ``crop`` (a side, or ``(h, w)``)
    relative to a z-scored image of that crop, the same at every crop for a budget moved by
    :func:`scale_epsilon` (``epsilon_ref / 320^2``). A k-space perturbation at budget ``epsilon`` has
    ``||delta||^2 <= relative_energy(epsilon, crop) * ||y||^2`` per slice (see the module docstring)."""
    h, w = (crop, crop) if isinstance(crop, int) else crop
    return epsilon / (h * w)


def epsilon_rms(epsilon: float, crop_size: int) -> float:
    """``sqrt(epsilon / crop_size^2)``: the per-pixel RMS of an image perturbation with squared norm
    ``epsilon`` on a ``crop_size``^2 image, and the relative size ``||delta|| / ||y||`` of a k-space
    perturbation at budget ``epsilon`` (:func:`relative_energy`)."""
    return math.sqrt(relative_energy(epsilon, crop_size))


def crop_of(values: Mapping[str, Any]) -> int:
    """The crop that config values set, or the default crop (:class:`~mriadv.config.TrainConfig`'s
    ``crop_size`` is :data:`REFERENCE_CROP`, the seed's)."""
    return int(values["crop_size"]) if "crop_size" in values else REFERENCE_CROP


def budgets_at_crop(values: Mapping[str, Any]) -> dict[str, Any]:
    """Config values whose ``epsilon`` and ``attack_budgets`` are given at 320x320 (a study space's
    units), with both scaled to the crop that ``values`` itself sets (or the default crop)."""
    crop = crop_of(values)
    out = dict(values)
    if "epsilon" in out:
        out["epsilon"] = scale_epsilon(float(out["epsilon"]), crop)
    if "attack_budgets" in out:
        budgets = out["attack_budgets"]
        budgets = [budgets] if isinstance(budgets, (int, float)) else budgets
        out["attack_budgets"] = tuple(scale_epsilon(float(b), crop) for b in budgets)
    return out


# ---------------------------------------------------------------------------------------------
# flat metric names (EpochRecord.flat, the study's objectives and TensorBoard tags)
# ---------------------------------------------------------------------------------------------
def robust_key(attack: str, budget_ref: float, metric: str) -> str:
    """Flat metric name, e.g. ``rob_pgd_e5000_nmse``: keyed by the 320x320-equivalent budget, so the
    same study space gives the same names on every profile."""
    return f"rob_{attack}_e{budget_ref:g}_{metric}".replace(".", "p").replace("+", "")


def robust_flat(prefix: str, rows: list[dict[str, Any]]) -> dict[str, float]:
    """``{prefix}rob_<attack>_e<budget>_<metric>`` for each row, with the standard errors beside;
    rows of a named protocol: ``{prefix}<protocol>_<attack>_r<relative budget>_<metric>``."""
    out: dict[str, float] = {}
    for row in rows:
        protocol, rel = row.get("protocol") or "", row.get("rel")
        for m in (*ROBUST_METRICS, "nmse_se", "d_nmse_se"):
            if m not in row:
                continue
            if protocol:
                budget = f"r{rel:g}" if rel is not None and math.isfinite(rel) else f"e{row['budget_ref']:g}"
                key = f"{protocol}_{row['attack']}_{budget}_{m}".replace(".", "p").replace("-", "_")
            else:
                key = robust_key(row["attack"], row["budget_ref"], m)
            out[prefix + key] = row[m]
    return out


def instability_flat(rep: dict[str, Any]) -> dict[str, float]:
    """Flat keys of the held-out instability results: ``report_feature_<random|worst>_<stat>`` (and
    ``zf_report_...`` for the zero-filled input), ``report_sampling_r<R>_<metric>`` per acceleration
    and ``report_sampling_stagnant``, the number of steps to more samples that did not help."""
    out: dict[str, float] = {}
    feats = rep.get("features")
    if feats:
        for where, prefix in (
            ("random", "report_"),
            ("worst", "report_"),
            ("zero_filled_random", "zf_report_"),
            ("zero_filled_worst", "zf_report_"),
        ):
            kind = where.removeprefix("zero_filled_")
            for stat in ("fnr", "fnr_se", "error", "error_se", "contrast", "contrast_se"):
                out[f"{prefix}feature_{kind}_{stat}"] = feats[where][stat]
    rows = rep.get("sampling") or []
    for row in rows:
        r = f"{row['acceleration']:g}".replace(".", "p")
        for m in ("nmse", "nmse_se", "psnr", "ssim"):
            out[f"report_sampling_r{r}_{m}"] = row[m]
        out[f"zf_report_sampling_r{r}_nmse"] = row["zf_nmse"]
    if rows:
        out["report_sampling_stagnant"] = float(sum(bool(row["stagnant"]) for row in rows[1:]))
    return out


__all__ = [
    "REFERENCE_CROP",
    "ROBUST_METRICS",
    "budgets_at_crop",
    "crop_of",
    "epsilon_rms",
    "instability_flat",
    "relative_energy",
    "robust_flat",
    "robust_key",
    "scale_epsilon",
    "to_reference",
]
