"""The validation folder's two parts: the *selection* volumes (early stopping, best checkpoints,
the search) and the *held-out* volumes every reported number is computed on.

The split depends on each file's name and ``acquisition`` attribute only (never on the run's seed or
on name order), and is stratified by acquisition, so the two parts are exchangeable: a folder of
alternating proton-density and fat-suppressed volumes has both in each part."""

from __future__ import annotations

import math
import zlib
from typing import Sequence

from mriadv.data.files import VolumeInfo


def stratified_order(volumes: Sequence[VolumeInfo]) -> list[VolumeInfo]:
    """``volumes`` grouped by their ``acquisition`` attribute (groups in attribute order; a folder
    without the attribute is one group) and, within a group, ordered by the CRC-32 of the file name:
    an order that depends on nothing but each file's name and acquisition, and that no naming scheme
    (volume index, alternating protocols) lines up with."""
    return sorted(volumes, key=lambda v: (v.acquisition, zlib.crc32(v.name.encode()), v.name))


def split_for_report(index: list[VolumeInfo], fraction: float) -> tuple[list[VolumeInfo], list[VolumeInfo]]:
    """``(selection, report)``: the validation volumes split deterministically, stratified by
    acquisition, each part in name order.

    In :func:`stratified_order`, volume ``i`` goes to the report part when
    ``floor((i + 1) f) > floor(i f)``: systematic sampling within each acquisition, so each
    acquisition of ``n`` volumes puts ``floor(n f)`` or ``ceil(n f)`` of them in the report part and the
    rest in the selection part (early stopping, best checkpoints, the search), and the parts are
    exchangeable (never every second name, which alternating protocols line up with). ``f = 0``:
    everything selects and nothing is held out. Raises ``ValueError`` when either part would be empty."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"report fraction must be in [0, 1), got {fraction}")
    by_name = sorted(index, key=lambda v: v.name)
    if fraction == 0:
        return by_name, []
    ordered = stratified_order(index)
    held = {v.name for i, v in enumerate(ordered) if math.floor((i + 1) * fraction) > math.floor(i * fraction)}
    report = [v for v in by_name if v.name in held]
    selection = [v for v in by_name if v.name not in held]
    if not report or not selection:
        raise ValueError(
            f"{len(by_name)} validation volume(s) cannot be split into a selection and a report part "
            f"with report fraction {fraction}: give more volumes, or report_fraction=0"
        )
    return selection, report


def stratified_subsample(volumes: Sequence[VolumeInfo], keep: int) -> list[VolumeInfo]:
    """``keep`` of ``volumes``, returned in name order, chosen by file name and acquisition only: the
    acquisitions interleaved in proportion to their counts (the volume of rank ``r`` among an
    acquisition's ``n`` in :func:`stratified_order` comes at ``(r + 1/2) / n``), the first ``keep`` taken.
    The same volumes whatever the run's seed, so every seed of a study is judged on the same ones, and
    every acquisition kept in proportion."""
    groups: dict[str, list[VolumeInfo]] = {}
    for v in stratified_order(volumes):
        groups.setdefault(v.acquisition, []).append(v)
    keyed = [((r + 0.5) / len(g), acq, v) for acq, g in groups.items() for r, v in enumerate(g)]
    chosen = [v for _, _, v in sorted(keyed, key=lambda t: (t[0], t[1]))[: max(0, keep)]]
    return sorted(chosen, key=lambda v: v.name)


def describe_volumes(volumes: Sequence[VolumeInfo]) -> str:
    """``"3 volumes (2 CORPD_FBK, 1 CORPDFS_FBK)"``: what a part of a split holds."""
    counts: dict[str, int] = {}
    for v in volumes:
        counts[v.acquisition or "no acquisition attribute"] = (
            counts.get(v.acquisition or "no acquisition attribute", 0) + 1
        )
    kinds = ", ".join(f"{n} {acq}" for acq, n in sorted(counts.items()))
    return f"{len(volumes)} volume{'s' if len(volumes) != 1 else ''}" + (f" ({kinds})" if kinds else "")


def validation_parts(
    index: Sequence[VolumeInfo], report_fraction: float, fraction: float = 1.0, max_volumes: int | None = None
) -> tuple[list[VolumeInfo], list[VolumeInfo]]:
    """``(selection, report)`` of a validation folder: first split by name and acquisition
    (:func:`split_for_report`, on every volume of the folder, stratified by acquisition), then each part
    sub-sampled (:func:`stratified_subsample`) to ``fraction`` of its volumes (at least one), the two
    together capped at ``max_volumes`` in proportion. Neither step depends on the run's seed, so the
    held-out volumes of a folder are the same for every seed and every sub-sampling that keeps them."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"volume fraction must be in (0, 1], got {fraction}")
    selection, report = split_for_report(list(index), report_fraction)
    keep = [max(1, round(len(part) * fraction)) if part else 0 for part in (selection, report)]
    if max_volumes is not None and sum(keep) > max_volumes:
        if report and max_volumes < 2:
            raise ValueError(f"max_volumes {max_volumes}: a selection and a report part need at least 2 volumes")
        rep = min(keep[1], max(1, math.floor(max_volumes * keep[1] / sum(keep)))) if report else 0
        keep = [max_volumes - rep, rep]
    return stratified_subsample(selection, keep[0]), stratified_subsample(report, keep[1])


__all__ = ["describe_volumes", "split_for_report", "stratified_order", "stratified_subsample", "validation_parts"]
