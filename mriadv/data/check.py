"""Validate a data folder before a study is launched on it.

``python -m mriadv.data.check DIR [--crop 320] [--target reconstruction_esc]`` lists, per split,
the number of volumes and slices, the k-space shape(s) and the target shape; a file that cannot
be used gets a one-line error naming it. Exit status 0 if every split is usable, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

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
        fmt = lambda c: ", ".join(f"{'x'.join(map(str, s)) if s else 'none (from k-space)'} ({n})" for s, n in sorted(c.items(), key=str))
        return (f"{len(self.volumes)} volumes, {slices} slices; k-space {fmt(kshapes) or '-'}; "
                f"target {fmt(tshapes) or '-'}")


def check_folder(root: str | Path, crop_size: int | None = None,
                 target_key: str = "reconstruction_esc") -> dict[str, SplitReport]:
    """Inspect every .h5 file under ``root`` (its ``singlecoil_train``/``singlecoil_val`` sub-folders
    when present, else ``root`` itself). Never raises on a bad file: errors are collected."""
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
        for path in files:
            try:
                report.volumes.append(inspect_volume(path, target_key, crop_size))
            except DataError as exc:
                report.errors.append(str(exc))
        reports[split] = report
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mriadv.data.check", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--crop", type=int, default=None, help="crop size the study will use (default: target size)")
    parser.add_argument("--target", default="reconstruction_esc", choices=TARGET_KEYS)
    args = parser.parse_args(argv)
    reports = check_folder(args.folder, args.crop, args.target)
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
