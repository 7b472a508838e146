"""Synthetic knee-like volumes written in fastMRI's single-coil HDF5 format.

A reader for real fastMRI folders reads the output unchanged: ``OUT/singlecoil_train/*.h5`` and
``OUT/singlecoil_val/*.h5``, each file one volume of ``S`` slices with

* ``kspace``: complex64 ``(S, 2C, W)``. Rows (H = 2C) are the readout, oversampled two-fold, so the
  anatomy fills about the central half of the rows; ``W = 2 * round(0.575 C)`` phase-encode columns
  (368 for C = 320), of which only the central ``A ~ 0.93 W`` are acquired and the rest are exactly
  zero, as in fastMRI's zero-padded phase encodes.
* ``reconstruction_esc``: float32 ``(S, C, C)``, the centre crop of ``|ifft2c(kspace)|``.
* ``reconstruction_rss``: float32 ``(S, C, C)``, the centre crop of the noise-free, un-truncated
  magnitude (a second reference, close to but not equal to ``esc``).
* ``ismrmrd_header``: ISMRMRD XML whose ``encodingLimits/kspace_encoding_step_1`` reproduce the zero
  columns through fastMRI's ``padding_left = W // 2 - center``, ``padding_right = padding_left +
  maximum + 1``.
* attributes ``max``, ``norm`` (of the esc volume), ``acquisition`` (``CORPD_FBK`` /
  ``CORPDFS_FBK``) and ``patient_id``.

Each volume is the coronal knee-like phantom of :mod:`mriadv.data.phantom` (proton density, or fat
suppressed for ``CORPDFS_FBK``) drawn on the oversampled ``2C x W`` grid. A smooth bias field (about
+-15..30 %), a smooth phase and complex Gaussian measurement noise on the acquired columns make it
look acquired, at fastMRI's absolute scale (image intensities ~1e-5..1e-4). Everything is drawn from
``numpy.random.default_rng(SeedSequence([seed, split, index]))``, so a spec gives identical k-space.

Usage: ``python -m mriadv.data.synthetic OUT --volumes 24 --val-volumes 6 --slices 12 --size 128``.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import h5py
import numpy as np
import torch

from mriadv.data.phantom import knee_magnitude, slice_positions, smooth_polynomial
from mriadv.fft import fft2c, ifft2c

SPLITS = ("singlecoil_train", "singlecoil_val")
ACQUISITIONS = ("CORPD_FBK", "CORPDFS_FBK")
MANIFEST = "synthetic.json"
FORMAT = "mriadv-synthetic-fastmri-singlecoil"
# Bump when the generated content changes, so ensure() refuses a stale cached dataset.
# 2: k-space and esc use torch's FFT (mriadv.fft) instead of numpy's; values differ in the last bits.
# 3: acquisitions in a seeded balanced order per split, no longer alternating with the volume index
#    (which lined up with any split by alternate names).
GENERATOR_VERSION = 3


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate.

    Args:
        volumes: training volumes (files in ``singlecoil_train``).
        val_volumes: validation volumes (files in ``singlecoil_val``).
        slices: slices per volume.
        size: crop size C (even, >= 32); k-space is ``(slices, 2C, W)``, targets ``(slices, C, C)``.
        seed: non-negative base seed; volume ``i`` of split ``s`` uses ``SeedSequence([seed, s, i])``.
    """

    volumes: int = 24
    val_volumes: int = 6
    slices: int = 12
    size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{f.name} must be an integer, got {value!r}")
        for name in ("volumes", "val_volumes", "slices"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.size < 32 or self.size % 2:
            raise ValueError(f"size must be an even integer >= 32, got {self.size}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")


class KspaceGeometry(NamedTuple):
    """Matrix sizes for crop size C: k-space ``(height, width)``, ``acquired`` central columns."""

    crop: int
    height: int
    width: int
    acquired: int
    padding_left: int

    @property
    def padding_right(self) -> int:
        """First zero column after the acquired band (fastMRI's ``padding_right``)."""
        return self.padding_left + self.acquired


def geometry(size: int) -> KspaceGeometry:
    """fastMRI knee proportions: ``H = 2C``, ``W = 2 round(0.575 C)``, ``A = 2 round(0.465 W)``.

    Rounding is half-up in integer arithmetic (C = 320 gives the real 640 x 368 with 342 acquired).
    """
    width = 2 * ((23 * size + 20) // 40)
    acquired = 2 * ((93 * width + 100) // 200)
    return KspaceGeometry(size, 2 * size, width, acquired, (width - acquired) // 2)


def volume_file_name(seed: int, split: int, index: int) -> str:
    """fastMRI-style name ``file{seed:03d}{split}{index:04d}.h5``, e.g. ``file00010003.h5``."""
    return f"file{seed:03d}{split}{index:04d}.h5"


def split_file_names(spec: SyntheticSpec) -> dict[str, list[str]]:
    """The file names of each split, in generation order."""
    counts = (spec.volumes, spec.val_volumes)
    return {
        split: [volume_file_name(spec.seed, s, i) for i in range(n)] for s, (split, n) in enumerate(zip(SPLITS, counts))
    }


# --------------------------------------------------------------------------------------------------
# Volumes and files


def center_crop_np(x: np.ndarray, size: int) -> np.ndarray:
    """``(..., H, W) -> (..., size, size)``, window starting at ``(dim - size) // 2`` (fastMRI)."""
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size]


@dataclass(frozen=True)
class SyntheticVolume:
    """One generated volume: the arrays and attributes of a fastMRI single-coil file."""

    kspace: np.ndarray  # complex64 (S, 2C, W)
    reconstruction_esc: np.ndarray  # float32 (S, C, C)
    reconstruction_rss: np.ndarray  # float32 (S, C, C)
    header: str
    acquisition: str
    patient_id: str


def acquisition_order(spec: SyntheticSpec, split: int) -> list[str]:
    """The acquisitions of split ``split``'s volumes, by index: half proton density, half fat
    suppressed (the extra one proton density), in an order drawn from ``SeedSequence([seed, split])``
    and so unrelated to file names, as in a real folder."""
    count = spec.volumes if split == 0 else spec.val_volumes
    balanced = [ACQUISITIONS[i % 2] for i in range(count)]
    order = np.random.default_rng(np.random.SeedSequence([spec.seed, split, 2**31])).permutation(count)
    return [balanced[i] for i in order]


def synthesize_volume(
    spec: SyntheticSpec, split: int, index: int, anatomy: Callable[..., np.ndarray] = knee_magnitude
) -> SyntheticVolume:
    """Draw volume ``index`` of split ``split`` (0 train, 1 val); deterministic for its arguments.

    ``anatomy(rng, crop, (H, W), slices, fat_suppressed)`` draws the noise-free magnitude ``(S, H, W)``
    in ~0..1 (default: the knee of :func:`~mriadv.data.phantom.knee_magnitude`; another phantom gives
    another anatomy under the same scanner effects, e.g. ``benchmarks/recipe_check.py``'s head)."""
    geom = geometry(spec.size)
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, split, index]))
    acquisition = acquisition_order(spec, split)[index]
    fat_suppressed = acquisition == "CORPDFS_FBK"
    grid = (geom.height, geom.width)
    magnitude = anatomy(rng, geom.crop, grid, spec.slices, fat_suppressed)  # (S, H, W)

    # Scanner effects in pixel coordinates (they do not move with the anatomy).
    px = 2.0 / geom.crop
    y = ((np.arange(geom.height) - geom.height // 2) * px)[None, :, None]
    x = ((np.arange(geom.width) - geom.width // 2) * px)[None, None, :]
    t = slice_positions(spec.slices)
    bias = np.clip(1.0 + smooth_polynomial(rng, y, x, t, rng.uniform(0.15, 0.3)), 0.3, None)
    phase = rng.uniform(-np.pi, np.pi) + smooth_polynomial(rng, y, x, t, rng.uniform(1.5, 3.5))
    scale = 10.0 ** rng.uniform(-4.6, -4.1)  # fastMRI-like absolute intensities
    clean = (scale * bias * magnitude).astype(np.float32)
    image = clean * np.exp(1j * phase.astype(np.float32)).astype(np.complex64)

    kspace = fft2c(torch.from_numpy(image)).numpy()  # complex64 (S, H, W), writable
    band = slice(geom.padding_left, geom.padding_right)
    kspace[..., : geom.padding_left] = 0
    kspace[..., geom.padding_right :] = 0
    noise_fraction = rng.uniform(0.015, 0.03) * (1.5 if fat_suppressed else 1.0)
    sigma = noise_fraction * float(clean[magnitude > 0.05].mean()) / np.sqrt(2.0)
    shape = kspace[..., band].shape
    noise = rng.standard_normal(shape, dtype=np.float32) + 1j * rng.standard_normal(shape, dtype=np.float32)
    kspace[..., band] += (sigma * noise).astype(np.complex64)

    esc = np.abs(center_crop_np(ifft2c(torch.from_numpy(kspace)).numpy(), geom.crop))  # float32 (S, C, C)
    rss = np.ascontiguousarray(center_crop_np(clean, geom.crop))
    patient_id = hashlib.sha256(f"mriadv-synthetic/{spec.seed}/{split}/{index}".encode()).hexdigest()
    header = _ismrmrd_header(geom, spec.slices, acquisition, rng)
    return SyntheticVolume(kspace, esc, rss, header, acquisition, patient_id)


def _ismrmrd_header(geom: KspaceGeometry, slices: int, acquisition: str, rng: np.random.Generator) -> str:
    """ISMRMRD XML with the fields fastMRI reads (matrix sizes, FOV, encoding limits)."""
    fov = round(float(rng.uniform(120.0, 160.0)), 1)  # reconstructed FOV in mm, square
    thickness = 3.0
    field = float(rng.choice([1.5, 3.0]))
    te, tr = (round(float(rng.uniform(27, 34)), 2), round(float(rng.uniform(2700, 3100)), 1))
    centre = geom.acquired // 2

    def limits(name: str, maximum: int, center: int) -> str:
        return f"<{name}><minimum>0</minimum><maximum>{maximum}</maximum><center>{center}</center></{name}>"

    return (
        '<?xml version="1.0"?>\n'
        '<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        f"<measurementInformation><patientPosition>FFS</patientPosition>"
        f"<protocolName>{acquisition}</protocolName></measurementInformation>"
        "<acquisitionSystemInformation><systemVendor>mriadv</systemVendor>"
        "<systemModel>synthetic</systemModel>"
        f"<systemFieldStrength_T>{field}</systemFieldStrength_T>"
        "<receiverChannels>1</receiverChannels></acquisitionSystemInformation>"
        f"<experimentalConditions><H1resonanceFrequency_Hz>{int(round(42.577478e6 * field))}"
        "</H1resonanceFrequency_Hz></experimentalConditions>"
        "<encoding>"
        f"<encodedSpace><matrixSize><x>{geom.height}</x><y>{geom.width}</y><z>1</z></matrixSize>"
        f"<fieldOfView_mm><x>{2 * fov}</x><y>{round(fov * geom.width / geom.crop, 2)}</y>"
        f"<z>{thickness}</z></fieldOfView_mm></encodedSpace>"
        f"<reconSpace><matrixSize><x>{geom.crop}</x><y>{geom.crop}</y><z>1</z></matrixSize>"
        f"<fieldOfView_mm><x>{fov}</x><y>{fov}</y><z>{thickness}</z></fieldOfView_mm></reconSpace>"
        "<trajectory>cartesian</trajectory>"
        "<encodingLimits>"
        + limits("kspace_encoding_step_1", geom.acquired - 1, centre)
        + limits("kspace_encoding_step_2", 0, 0)
        + limits("average", 0, 0)
        + limits("slice", slices - 1, slices // 2)
        + limits("contrast", 0, 0)
        + limits("phase", 0, 0)
        + limits("repetition", 0, 0)
        + limits("set", 0, 0)
        + limits("segment", 0, 0)
        + "</encodingLimits></encoding>"
        f"<sequenceParameters><TR>{tr}</TR><TE>{te}</TE><flipAngle_deg>90.0</flipAngle_deg>"
        "<sequence_type>TurboSpinEcho</sequence_type></sequenceParameters>"
        "</ismrmrdHeader>"
    )


def write_volume(path: Path, volume: SyntheticVolume) -> None:
    """Write one volume as a fastMRI single-coil HDF5 file."""
    esc = volume.reconstruction_esc
    with h5py.File(path, "w") as hf:
        hf.create_dataset("kspace", data=volume.kspace)
        hf.create_dataset("reconstruction_esc", data=esc)
        hf.create_dataset("reconstruction_rss", data=volume.reconstruction_rss)
        hf.create_dataset("ismrmrd_header", data=np.bytes_(volume.header.encode("utf-8")))
        hf.attrs["acquisition"] = volume.acquisition
        hf.attrs["max"] = float(esc.max())
        hf.attrs["norm"] = float(np.linalg.norm(esc.astype(np.float64)))
        hf.attrs["patient_id"] = volume.patient_id


# --------------------------------------------------------------------------------------------------
# Dataset folders


def _manifest(spec: SyntheticSpec) -> dict:
    return {
        "format": FORMAT,
        "version": GENERATOR_VERSION,
        "spec": asdict(spec),
        "files": split_file_names(spec),
    }


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def generate(
    out_dir: str | os.PathLike,
    spec: SyntheticSpec = SyntheticSpec(),
    anatomy: Callable[..., np.ndarray] = knee_magnitude,
    marker: tuple[str, str] | None = None,
) -> Path:
    """Write the dataset of ``spec`` to ``out_dir`` and return its path.

    ``anatomy``: the phantom (:func:`synthesize_volume`); ``marker``: ``(file name, text)`` of one more
    file written into the folder with the rest (a caller's own description of what it holds).

    The files are written into a temporary sibling folder that is renamed to ``out_dir`` at the end,
    so an interrupted run leaves no partial dataset. Raises ``FileExistsError`` if ``out_dir``
    already exists and is not empty (use :func:`ensure` to reuse an existing dataset).
    """
    out = Path(out_dir)
    if out.exists() and not _is_empty_dir(out):
        raise FileExistsError(f"{out} already exists; use ensure() to reuse it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for split_index, (split, names) in enumerate(split_file_names(spec).items()):
            (tmp / split).mkdir()
            for index, name in enumerate(names):
                write_volume(tmp / split / name, synthesize_volume(spec, split_index, index, anatomy))
        (tmp / MANIFEST).write_text(json.dumps(_manifest(spec), indent=2, sort_keys=True) + "\n")
        if marker is not None:
            (tmp / marker[0]).write_text(marker[1])
        tmp.chmod(0o755)
        try:
            os.rename(tmp, out)  # atomic; replaces an empty folder, fails on a non-empty one
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(f"{out} was created by someone else while generating") from exc
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_existing(out: Path, spec: SyntheticSpec) -> None:
    """Raise ``FileExistsError`` unless ``out`` is a complete synthetic dataset of ``spec``."""
    try:
        found = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise FileExistsError(f"{out} exists but is not a synthetic dataset (no readable {MANIFEST})") from exc
    if not isinstance(found, dict) or found.get("format") != FORMAT:
        raise FileExistsError(f"{out} exists but {MANIFEST} is not an {FORMAT} manifest")
    if found.get("version") != GENERATOR_VERSION:
        raise FileExistsError(
            f"{out} was made by generator version {found.get('version')}, this is version "
            f"{GENERATOR_VERSION}; delete it or choose another folder"
        )
    if found.get("spec") != asdict(spec):
        raise FileExistsError(
            f"{out} holds a synthetic dataset with spec {found.get('spec')}, not {asdict(spec)}; "
            "delete it or choose another folder"
        )
    expected = [f"{split}/{name}" for split, names in split_file_names(spec).items() for name in names]
    missing = [rel for rel in expected if not (out / rel).is_file()]
    if missing:
        raise FileExistsError(f"{out} is incomplete: {len(missing)} files missing, e.g. {missing[0]}")


def ensure(out_dir: str | os.PathLike, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Return ``out_dir`` holding the dataset of ``spec``: reuse it if complete, generate it if absent.

    Raises ``FileExistsError`` if ``out_dir`` exists with a different spec or is not a synthetic
    dataset. Safe when several processes call it at once: one rename wins, the others reuse it.
    """
    out = Path(out_dir)
    if not out.exists() or _is_empty_dir(out):
        try:
            return generate(out, spec)
        except FileExistsError:
            pass  # another process published it first; check what it wrote
    _check_existing(out, spec)
    return out


# --------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """Argument parser; defaults are read from :class:`SyntheticSpec`."""
    defaults = {f.name: f.default for f in fields(SyntheticSpec)}
    parser = argparse.ArgumentParser(
        prog="python -m mriadv.data.synthetic",
        description="Write (or reuse) a synthetic knee dataset in fastMRI single-coil format.",
    )
    parser.add_argument("out", type=Path, help="output folder (gets singlecoil_train/ and singlecoil_val/)")
    for name in defaults:
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, type=int, default=defaults[name], help=f"default: {defaults[name]}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: 0 on success, 2 on invalid arguments, 1 if the folder holds something else."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        spec = SyntheticSpec(**{f.name: getattr(args, f.name) for f in fields(SyntheticSpec)})
    except ValueError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    existed = args.out.exists() and not _is_empty_dir(args.out)
    try:
        out = ensure(args.out, spec)
    except FileExistsError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    geom = geometry(spec.size)
    print(f"{'reused' if existed else 'wrote'} {out} ({asdict(spec)})")
    for split, names in split_file_names(spec).items():
        print(
            f"  {split}: {len(names)} files {names[0]} .. {names[-1]}; kspace ({spec.slices}, {geom.height}, "
            f"{geom.width}) complex64 with columns [{geom.padding_left}, {geom.padding_right}) acquired; "
            f"reconstruction_esc/rss ({spec.slices}, {geom.crop}, {geom.crop}) float32"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
