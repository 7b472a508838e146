"""Validate a data folder before a study is launched on it.

``python -m mriadv.data.check DIR [--crop 320] [--target reconstruction_esc] [--quick]`` lists, per
split, the number of volumes and slices, the k-space shape(s) and the target shape; a file that
cannot be used gets a one-line error naming it: unreadable, truncated, wrong layout, a target whose
slice count differs from the k-space's, and (unless ``--quick``) non-finite values or all-zero
slices in the k-space or the target, which would stop training with a NaN loss at the first step.
Every slice is read once, one at a time; with a cache folder the verdict is kept per file (size
and modification time) so an unchanged folder is not read again. Exit status 0 if every split is
usable, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from mriadv.atomic import atomic_write
from mriadv.data.files import SPLITS, DataError, VolumeInfo, inspect_volume, list_volumes
from mriadv.data.transforms import TARGET_KEYS


@dataclass
class SplitReport:
    """What :func:`check_folder` found in one folder of .h5 files."""

    folder: Path
    volumes: list[VolumeInfo] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.volumes) and not self.errors

    def summary(self) -> str:
        slices = sum(v.num_slices for v in self.volumes)
        kshapes = Counter(v.kspace_shape for v in self.volumes)
        tshapes = Counter(v.target_shape for v in self.volumes)
        fmt = lambda c: ", ".join(
            f"{'x'.join(map(str, s)) if s else 'none (from k-space)'} ({n})" for s, n in sorted(c.items(), key=str)
        )
        return (
            f"{len(self.volumes)} volumes, {slices} slices; k-space {fmt(kshapes) or '-'}; target {fmt(tshapes) or '-'}"
        )


def scan_volume(path: Path, target_key: str) -> list[str]:
    """Problems in the arrays of a file that :func:`inspect_volume` accepted: NaN or inf values and
    all-zero slices in ``kspace`` ``(slices, H, W)`` and in the target ``(slices, H, W)`` (when the
    file has ``target_key``). Reads one slice at a time; one message per dataset and kind, naming
    the file and the slices."""
    problems = []
    with h5py.File(path, "r") as f:
        for key in ("kspace", target_key):
            if key not in f or (key == target_key and key == "kspace"):
                continue
            data = f[key]
            nonfinite, empty = [], []
            for i in range(data.shape[0]):
                x = data[i]
                if not np.isfinite(x).all():
                    nonfinite.append(i)
                elif not x.any():
                    empty.append(i)
            if nonfinite:
                problems.append(f"{path}: '{key}' has NaN or inf values in {_slices(nonfinite, data.shape[0])}")
            if empty:
                problems.append(f"{path}: '{key}' is all zero in {_slices(empty, data.shape[0])}")
    return problems


def _slices(found: list[int], total: int) -> str:
    listed = ", ".join(map(str, found[:5])) + (", ..." if len(found) > 5 else "")
    return f"{'slice' if len(found) == 1 else 'slices'} {listed} ({len(found)} of {total})"


class ScanCache:
    """:func:`scan_volume` verdicts of one folder, kept per file name with its size and modification
    time in ``cache_dir`` (JSON), so that an unchanged file is not read again."""

    def __init__(self, folder: Path, target_key: str, cache_dir: str | Path | None) -> None:
        self.path, self.entries = None, {}
        if cache_dir is not None:
            key = hashlib.sha1(f"{folder.resolve()}|{target_key}".encode()).hexdigest()[:16]
            self.path = Path(cache_dir) / f"scan-{folder.name}-{key}.json"
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.entries = {}

    def scan(self, path: Path, target_key: str) -> list[str]:
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = self.entries.get(path.name)
        if entry is None or entry["stamp"] != stamp:
            entry = self.entries[path.name] = {"stamp": stamp, "problems": scan_volume(path, target_key)}
        return list(entry["problems"])

    def save(self) -> None:
        if self.path is not None:
            with atomic_write(self.path) as tmp:
                tmp.write_text(json.dumps(self.entries))


def check_folder(
    root: str | Path,
    crop_size: int | None = None,
    target_key: str = "reconstruction_esc",
    scan: bool = True,
    cache_dir: str | Path | None = None,
) -> dict[str, SplitReport]:
    """Inspect every .h5 file under ``root`` (its ``singlecoil_train``/``singlecoil_val`` sub-folders
    when present, else ``root`` itself) and, with ``scan``, read every slice of the usable ones
    (:func:`scan_volume`; verdicts cached in ``cache_dir`` when given). Never raises on a bad file:
    errors are collected."""
    root = Path(root)
    if not root.is_dir():
        report = SplitReport(root)
        report.errors.append(f"{root}: no such folder")
        return {"data": report}
    splits = {s: root / d for s, d in SPLITS.items() if (root / d).is_dir()} or {"data": root}
    reports = {}
    for split, folder in splits.items():
        report = SplitReport(folder)
        try:
            files = list_volumes(folder)
        except DataError as exc:
            report.errors.append(str(exc))
            files = []
        cache = ScanCache(folder, target_key, cache_dir) if scan else None
        for path in files:
            try:
                report.volumes.append(inspect_volume(path, target_key, crop_size))
            except DataError as exc:
                report.errors.append(str(exc))
                continue
            if cache is not None:
                try:
                    report.errors.extend(cache.scan(path, target_key))
                except (OSError, RuntimeError) as exc:  # a slice that cannot be read
                    report.errors.append(f"{path}: cannot read every slice ({exc})")
        if cache is not None:
            cache.save()
        reports[split] = report
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mriadv.data.check", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--crop", type=int, default=None, help="crop size the study will use (default: target size)")
    parser.add_argument("--target", default="reconstruction_esc", choices=TARGET_KEYS)
    parser.add_argument("--quick", action="store_true", help="check the layout only; do not read every slice")
    args = parser.parse_args(argv)
    reports = check_folder(args.folder, args.crop, args.target, scan=not args.quick)
    ok = True
    for split, report in reports.items():
        print(f"{split}: {report.folder}: {report.summary()}")
        for err in report.errors:
            print(f"  error: {err}", file=sys.stderr)
        ok &= report.ok
    print("usable" if ok else "NOT usable: fix the errors above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
