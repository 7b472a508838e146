"""fastMRI single-coil HDF5 files: reading one volume, a cached volume index, and a slice dataset.

A file holds ``kspace`` ``(slices, H, W)`` complex64 (readout H oversampled 2x, phase-encode columns
zero-padded outside the acquired band), ``reconstruction_esc`` (and often ``reconstruction_rss``)
``(slices, 320, 320)`` float32, attrs ``max``, ``norm``, ``acquisition``, ``patient_id``, and an
``ismrmrd_header`` XML string from which the acquired band ``[padding_left, padding_right)`` is read
exactly as fastMRI's ``SliceDataset`` does. The same code reads real fastMRI folders and the
synthetic ones of :mod:`mriadv.data.synthetic`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import zlib
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import h5py
import numpy as np
import torch

from mriadv.atomic import atomic_write
from mriadv.data.transforms import TARGET_KEYS, RawSlice, center_crop, zero_filled_magnitude

ISMRMRD_NS = "http://www.ismrm.org/ISMRMRD"
SPLITS = {"train": "singlecoil_train", "val": "singlecoil_val", "test": "singlecoil_test"}
INDEX_VERSION = 2


class DataError(ValueError):
    """A data file or folder that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class VolumeInfo:
    """One volume of the index. ``max_value`` is the data range used by the metrics (the maximum of
    the target volume after cropping); ``size``/``mtime_ns`` detect a changed file."""

    name: str
    num_slices: int
    kspace_shape: tuple[int, int]
    target_shape: tuple[int, int] | None
    padding: tuple[int, int]
    acquisition: str
    max_value: float
    size: int
    mtime_ns: int


def _xml_int(root: ET.Element, path: Sequence[str]) -> int:
    query = "/".join(f"ns:{p}" for p in path)
    node = root.find(query, {"ns": ISMRMRD_NS})
    if node is None or node.text is None:
        raise KeyError("/".join(path))
    return int(float(node.text))


def acquired_band(header: bytes | str, num_cols: int) -> tuple[int, int]:
    """``(padding_left, padding_right)`` from the ISMRMRD header, as fastMRI computes them.

    ``padding_left = W_enc // 2 - center``; ``padding_right = padding_left + maximum + 1``. Without a
    usable header the whole width counts as acquired.
    """
    try:
        root = ET.fromstring(header)
        enc_y = _xml_int(root, ["encoding", "encodedSpace", "matrixSize", "y"])
        center = _xml_int(root, ["encoding", "encodingLimits", "kspace_encoding_step_1", "center"])
        maximum = _xml_int(root, ["encoding", "encodingLimits", "kspace_encoding_step_1", "maximum"])
    except (ET.ParseError, KeyError, ValueError, TypeError):
        return 0, num_cols
    left = enc_y // 2 - center
    right = left + maximum + 1
    if not 0 <= left < right <= num_cols:
        return 0, num_cols
    return left, right


def inspect_volume(path: Path, target_key: str, crop_size: int | None) -> VolumeInfo:
    """Read a file's metadata (not its arrays) and validate it. Raises :class:`DataError`.

    ``max_value`` comes from ``attrs['max']`` when that is exactly the maximum the metrics need
    (the ESC target, uncropped, fastMRI's convention); otherwise it is computed from the volume.
    """
    if target_key not in TARGET_KEYS:
        raise ValueError(f"target_key must be one of {TARGET_KEYS}, got {target_key!r}")
    stat = path.stat()
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc.__class__.__name__}: {exc})") from None
    with f:
        if "kspace" not in f:
            raise DataError(f"{path}: no 'kspace' dataset (found: {sorted(f.keys())})")
        kspace = f["kspace"]
        if kspace.ndim != 3:
            raise DataError(f"{path}: 'kspace' has rank {kspace.ndim}, shape {kspace.shape}; expected (slices, H, W)")
        if not np.issubdtype(kspace.dtype, np.complexfloating):
            raise DataError(f"{path}: 'kspace' has dtype {kspace.dtype}; expected complex")
        num_slices, H, W = (int(n) for n in kspace.shape)
        if num_slices == 0:
            raise DataError(f"{path}: 'kspace' has no slices")
        try:  # a truncated file fails here, not later inside a training worker
            kspace[num_slices - 1, 0, :1]
        except (OSError, RuntimeError) as exc:
            raise DataError(f"{path}: cannot read the last k-space slice, file truncated? ({exc})") from None

        target_shape = None
        key = target_key
        if key != "kspace" and key not in f:
            key = "kspace"  # no reference reconstruction: computed from full k-space
        if key != "kspace":
            target = f[key]
            if target.ndim != 3:
                raise DataError(f"{path}: '{key}' has shape {target.shape}; expected ({num_slices}, H, W)")
            if target.shape[0] != num_slices:
                raise DataError(
                    f"{path}: slice counts differ: '{key}' has {target.shape[0]} slices, 'kspace' {num_slices}"
                )
            target_shape = (int(target.shape[1]), int(target.shape[2]))
        header = f["ismrmrd_header"][()] if "ismrmrd_header" in f else b""
        padding = acquired_band(header, W)
        acquisition = str(f.attrs.get("acquisition", ""))

        image_shape = target_shape if target_shape is not None else (H, W)
        crop = crop_size if crop_size is not None else min(image_shape)
        if crop > min(image_shape) or crop > min(H, W):
            raise DataError(f"{path}: crop size {crop} does not fit the target {image_shape} / k-space ({H}, {W})")
        if key == "reconstruction_esc" and "max" in f.attrs and crop == min(image_shape) == max(image_shape):
            max_value = float(f.attrs["max"])
        elif key != "kspace":
            max_value = float(center_crop(torch.from_numpy(f[key][()]), (crop, crop)).max())
        else:
            full = torch.from_numpy(f["kspace"][()])
            max_value = float(zero_filled_magnitude(full, (crop, crop)).max())
    return VolumeInfo(
        name=path.name,
        num_slices=num_slices,
        kspace_shape=(H, W),
        target_shape=target_shape,
        padding=padding,
        acquisition=acquisition,
        max_value=max_value,
        size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
    )


def resolve_split_dir(root: str | Path, split: str) -> Path:
    """``root/singlecoil_<split>`` if it exists, else ``root`` itself (a folder of .h5 files)."""
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    sub = root / SPLITS[split]
    return sub if sub.is_dir() else root


def list_volumes(folder: Path) -> list[Path]:
    """The ``.h5`` files of a folder, sorted by name. Raises :class:`DataError` if there are none."""
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix == ".h5" and p.is_file())
    if not files:
        raise DataError(f"{folder}: no .h5 files")
    return files


def build_index(
    folder: str | Path,
    target_key: str = "reconstruction_esc",
    crop_size: int | None = None,
    cache_dir: str | Path | None = None,
) -> list[VolumeInfo]:
    """The volume index of ``folder``, read from ``cache_dir`` when it is still valid.

    The cache file is keyed by the folder's absolute path, the target key and the crop; each entry
    is reused only if the file's size and modification time are unchanged, so a new, changed or
    removed file is noticed without re-reading the others.
    """
    folder = Path(folder).resolve()
    files = list_volumes(folder)
    cached: dict[str, VolumeInfo] = {}
    cache_file = None
    if cache_dir is not None:
        key = hashlib.sha1(f"{INDEX_VERSION}|{folder}|{target_key}|{crop_size}".encode()).hexdigest()[:16]
        cache_file = Path(cache_dir) / f"index-{folder.name}-{key}.json"
        if cache_file.is_file():
            try:
                for entry in json.loads(cache_file.read_text())["volumes"]:
                    info = VolumeInfo(
                        **{
                            **entry,
                            "kspace_shape": tuple(entry["kspace_shape"]),
                            "target_shape": tuple(entry["target_shape"]) if entry["target_shape"] else None,
                            "padding": tuple(entry["padding"]),
                        }
                    )
                    cached[info.name] = info
            except (ValueError, KeyError, TypeError):
                cached = {}  # unreadable cache: rebuild
    index, changed = [], False
    for path in files:
        stat = path.stat()
        info = cached.get(path.name)
        if info is None or info.size != stat.st_size or info.mtime_ns != stat.st_mtime_ns:
            info = inspect_volume(path, target_key, crop_size)
            changed = True
        index.append(info)
    if cache_file is not None and (changed or len(cached) != len(index)):
        with atomic_write(cache_file) as tmp:
            tmp.write_text(json.dumps({"folder": str(folder), "volumes": [asdict(v) for v in index]}))
    return index


def subsample_volumes(
    index: list[VolumeInfo], fraction: float = 1.0, max_volumes: int | None = None, seed: int = 0
) -> list[VolumeInfo]:
    """A seeded subset of volumes, returned in name order (deterministic)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"volume fraction must be in (0, 1], got {fraction}")
    n = max(1, int(round(len(index) * fraction)))
    if max_volumes is not None:
        n = min(n, max_volumes)
    if n >= len(index):
        return list(index)
    keep = np.random.default_rng(seed).permutation(len(index))[:n]
    return [index[i] for i in sorted(keep)]


def seeded_slices(volumes: Sequence[VolumeInfo], per_volume: int, seed: int = 0) -> list[tuple[VolumeInfo, int]]:
    """A fixed subset of slices covering every volume: ``per_volume`` distinct slices of each, drawn
    with a generator seeded by ``(seed, CRC of the file name)`` and kept in slice order (all slices of
    a shorter volume; ``per_volume = 0``: every slice)."""
    out = []
    for v in volumes:
        if per_volume == 0 or per_volume >= v.num_slices:
            out += [(v, s) for s in range(v.num_slices)]
            continue
        rng = np.random.default_rng([seed, zlib.crc32(v.name.encode())])
        out += [(v, int(s)) for s in sorted(rng.choice(v.num_slices, per_volume, replace=False))]
    return out


class SliceDataset(torch.utils.data.Dataset):
    """All slices of a split's volumes, in deterministic (file name, slice) order.

    Args:
        root: a folder of .h5 files, or a root holding ``singlecoil_train/`` and ``singlecoil_val/``.
        split: ``'train'`` or ``'val'`` (which sub-folder of ``root`` to use, when present).
        transform: turns a :class:`RawSlice` (and the epoch) into a model-ready sample.
        target_key: ``'reconstruction_esc'`` (default), ``'reconstruction_rss'``, or ``'kspace'`` to
            compute the target from full k-space; files without the key fall back to k-space.
        crop_size: the crop the transform uses (for the metrics' data range); None: full target.
        volume_fraction, max_volumes, seed: seeded sub-sampling of volumes.
        cache_dir: where the volume index is cached (None: not cached).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable[[RawSlice, int], object],
        target_key: str = "reconstruction_esc",
        crop_size: int | None = None,
        volume_fraction: float = 1.0,
        max_volumes: int | None = None,
        seed: int = 0,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.folder = resolve_split_dir(root, split)
        self.transform = transform
        self.target_key = target_key
        index = build_index(self.folder, target_key, crop_size, cache_dir)
        self.volumes = subsample_volumes(index, volume_fraction, max_volumes, seed)
        self.slices = [(v, s) for v in self.volumes for s in range(v.num_slices)]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Training masks depend on the epoch; call before iterating (workers are re-created)."""
        self.epoch = epoch

    def restricted(self, volumes: Sequence[VolumeInfo], transform: Callable[[RawSlice, int], object]) -> "SliceDataset":
        """The same folder and index limited to ``volumes``, read through another ``transform``
        (e.g. the first training volumes with fixed validation masks, to evaluate on training data)."""
        other = copy.copy(self)
        other.transform = transform
        other.volumes = list(volumes)
        other.slices = [(v, s) for v in other.volumes for s in range(v.num_slices)]
        return other

    def with_slices(self, slices: Sequence[tuple[VolumeInfo, int]]) -> "SliceDataset":
        """The same folder and transform limited to the given ``(volume, slice)`` pairs."""
        other = copy.copy(self)
        other.slices = list(slices)
        other.volumes = list(dict.fromkeys(v for v, _ in other.slices))
        return other

    def __len__(self) -> int:
        return len(self.slices)

    def read(self, i: int) -> RawSlice:
        vol, s = self.slices[i]
        path = self.folder / vol.name
        with h5py.File(path, "r") as f:
            kspace = f["kspace"][s]
            target = f[self.target_key][s] if self.target_key != "kspace" and self.target_key in f else None
        return RawSlice(
            kspace=kspace.astype(np.complex64, copy=False),
            target=target,
            fname=vol.name,
            slice_num=s,
            padding=vol.padding,
            max_value=vol.max_value,
        )

    def __getitem__(self, i: int):
        return self.transform(self.read(i), self.epoch)

    def kspace_shapes(self) -> list[tuple[int, int]]:
        """The k-space shape of every slice, in dataset order (for shape-bucketed batching)."""
        return [v.kspace_shape for v, _ in self.slices]


class ShapeBucketSampler(torch.utils.data.Sampler[list[int]]):
    """Batches whose slices share one k-space shape (real fastMRI widths vary: 368, 372, ...).

    Needed only when batches carry k-space. Shuffles within and across buckets with ``seed + epoch``.
    """

    def __init__(
        self, shapes: Sequence[tuple[int, int]], batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False
    ) -> None:
        self.shapes, self.batch_size, self.shuffle, self.seed = list(shapes), batch_size, shuffle, seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, shape in enumerate(self.shapes):
            buckets.setdefault(shape, []).append(i)
        batches = []
        for shape in sorted(buckets):
            idx = np.array(buckets[shape])
            if self.shuffle:
                idx = rng.permutation(idx)
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size].tolist()
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
