"""From a k-space slice to model-ready tensors: masking, zero-filled image, crop, normalisation.

Pure functions first, then :class:`UnetTransform`, which the dataset applies to every slice, and the
typed :class:`Sample` / :class:`Batch` it produces. The seed's input is
``x~ = C(|F^-1 P(y)|)`` (Huang & Liang, Sec. 2.4), instance-normalised with its own mean and std;
the target gets the same normalisation. The input is clamped to ``[-clamp, clamp]`` as in fastMRI's
``UnetDataTransform`` (which the seed used); unlike there, the target is not clamped, so that the
de-normalised target equals the file's reference exactly and the metrics are fastMRI's evaluation
(clamping at 6 sigma clips the brightest ~0.2% of pixels of a knee-like image).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple, Sequence

import numpy as np
import torch

from mriadv.choices import TARGET_KEYS  # noqa: F401 (re-exported: mriadv.data.files and .check import it here)
from mriadv.config import TrainConfig
from mriadv.data.masks import MaskFunc, volume_seed
from mriadv.fft import fft2c, ifft2c

NORM_EPS = 1e-11
AUGMENT_STREAM = 1  # the augmentation's draws: a stream of their own beside the mask's (seed, epoch, file, slice)


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Centre crop over the last two dims. ``x``: ``(..., H, W)`` -> ``(..., h, w)``.

    The window starts at ``(H - h) // 2``, fastMRI's convention.
    """
    h, w = size
    H, W = x.shape[-2:]
    if not (0 < h <= H and 0 < w <= W):
        raise ValueError(f"crop size {size} does not fit in an image of size {(H, W)}")
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top : top + h, left : left + w]


def apply_mask(kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the unsampled columns. ``kspace``: complex ``(..., H, W)``; ``mask``: ``(W,)`` or ``(..., W)``."""
    if mask.shape[-1] != kspace.shape[-1]:
        raise ValueError(f"mask has {mask.shape[-1]} columns, k-space has {kspace.shape[-1]}")
    return kspace * mask.unsqueeze(-2).to(kspace.real.dtype)


def zero_filled_magnitude(kspace: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """``|C(F^-1 kspace)|``: complex ``(..., H, W)`` -> real ``(..., h, w)``."""
    return center_crop(ifft2c(kspace), crop).abs()


def flip_slice(
    kspace: torch.Tensor, target: torch.Tensor | None, padding: tuple[int, int], flips: tuple[bool, bool]
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
    """The slice whose fully sampled image is flipped along rows (``flips[0]``) and columns (``flips[1]``).

    ``kspace``: complex ``(H, W)``; ``target``: ``(Ht, Wt)``, the centre crop of ``|F^-1 kspace|``, or None;
    ``padding``: the acquired columns ``[left, right)``. The image ``F^-1 kspace`` is flipped and transformed
    back, so the k-space is exactly that of the flipped image; the target is flipped with it, which keeps
    it the centre crop of the flipped image when ``H - Ht`` (``W - Wt``) is even, so an axis where it is odd
    is left as it is. A column flip mirrors the acquired band: ``[W - right, W - left)``."""
    H, W = kspace.shape[-2:]
    dims = []
    if flips[0] and (target is None or (H - target.shape[-2]) % 2 == 0):
        dims.append(-2)
    if flips[1] and (target is None or (W - target.shape[-1]) % 2 == 0):
        dims.append(-1)
        padding = (W - padding[1], W - padding[0])
    if not dims:
        return kspace, target, padding
    kspace = fft2c(torch.flip(ifft2c(kspace), dims)).to(kspace.dtype)
    return kspace, None if target is None else torch.flip(target, dims), padding


def normalize(x: torch.Tensor, mean: torch.Tensor | float, std: torch.Tensor | float) -> torch.Tensor:
    """``(x - mean) / (std + eps)``, the instance normalisation of fastMRI."""
    return (x - mean) / (std + NORM_EPS)


def denormalize(x: torch.Tensor, mean: torch.Tensor | float, std: torch.Tensor | float) -> torch.Tensor:
    """Inverse of :func:`normalize`."""
    return x * (std + NORM_EPS) + mean


class Sample(NamedTuple):
    """One slice, model-ready. Image sizes are ``(1, h, w)``; scalars are 0-d tensors.

    ``kspace`` (complex ``(H, W)``) is the *masked* k-space divided by ``std + eps`` and ``mask``
    the boolean ``(W,)`` column mask; both are present only when the transform keeps k-space (for
    k-space perturbations), so that ``normalize(|C(F^-1 (P y))|) = |C(F^-1 kspace)| - mean/std``.
    """

    image: torch.Tensor
    target: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    max_value: torch.Tensor
    fname: str
    slice_num: int
    kspace: torch.Tensor | None = None
    mask: torch.Tensor | None = None


@dataclass
class Batch:
    """A mini-batch of :class:`Sample` s. ``image``/``target``: ``(B, 1, h, w)``; ``mean``, ``std``,
    ``max_value``: ``(B,)``; ``kspace``: complex ``(B, H, W)`` or None; ``mask``: ``(B, W)`` or None."""

    image: torch.Tensor
    target: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    max_value: torch.Tensor
    fnames: list[str]
    slice_nums: torch.Tensor
    kspace: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.image.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=non_blocking)
            moved[f.name] = value
        return Batch(**moved)

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader (``pin_memory=True``) so that ``to(cuda, non_blocking=True)`` is
        asynchronous."""
        pinned = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in pinned.items():
            if isinstance(value, torch.Tensor):
                pinned[key] = value.pin_memory()
        return Batch(**pinned)

    @property
    def crop(self) -> tuple[int, int]:
        return tuple(self.image.shape[-2:])  # type: ignore[return-value]


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack samples into a :class:`Batch` (k-space only when every sample carries it)."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    has_k = samples[0].kspace is not None
    if has_k and len({tuple(s.kspace.shape) for s in samples}) > 1:  # type: ignore[union-attr]
        raise ValueError("samples in one batch have different k-space shapes; use a shape-bucketed batch sampler")
    return Batch(
        image=torch.stack([s.image for s in samples]),
        target=torch.stack([s.target for s in samples]),
        mean=torch.stack([s.mean for s in samples]),
        std=torch.stack([s.std for s in samples]),
        max_value=torch.stack([s.max_value for s in samples]),
        fnames=[s.fname for s in samples],
        slice_nums=torch.tensor([s.slice_num for s in samples], dtype=torch.long),
        kspace=torch.stack([s.kspace for s in samples]) if has_k else None,  # type: ignore[misc]
        mask=torch.stack([s.mask for s in samples]) if has_k else None,  # type: ignore[misc]
    )


def concat(*batches: Batch) -> Batch:
    """The batches one after another along the batch dimension (e.g. clean and perturbed, ``2B``); k-space
    and mask only when every batch carries them."""
    out = {}
    for f in fields(Batch):
        values = [getattr(b, f.name) for b in batches]
        if f.name in ("kspace", "mask") and any(b.kspace is None or b.mask is None for b in batches):
            out[f.name] = None
        else:
            out[f.name] = sum(values, []) if f.name == "fnames" else torch.cat(values)
    return Batch(**out)


class RawSlice(NamedTuple):
    """What the dataset reads from a file for one slice (NumPy, raw units)."""

    kspace: np.ndarray  # complex64 (H, W)
    target: np.ndarray | None  # float32 (Ht, Wt), or None when computed from k-space
    fname: str
    slice_num: int
    padding: tuple[int, int]  # acquired columns are [left, right)
    max_value: float  # data range for metrics: max of the volume's (cropped) target


@dataclass(frozen=True)
class UnetTransform:
    """Turn a :class:`RawSlice` into a :class:`Sample`.

    Args:
        mask_func: the under-sampling mask.
        crop_size: side of the square centre crop of input and target (fastMRI: 320).
        train: True draws a new mask per sample and epoch; False fixes the mask per volume,
            seeded from the file name.
        seed: base seed of the training masks: the mask of (epoch, file, slice) is a pure function
            of these, whatever the number of loader workers, so resumed runs see the same masks.
        clamp: clamp the normalised input to ``[-clamp, clamp]`` (fastMRI: 6); None: off.
        keep_kspace: also return the masked, normalised k-space and the mask (k-space attacks).
        augment: ``'flip'`` flips each training slice's image along each axis with probability 1/2
            (:func:`flip_slice`), drawn like the mask from (seed, epoch, file, slice); never when
            ``train`` is False.
    """

    mask_func: MaskFunc
    crop_size: int = 320
    train: bool = True
    seed: int = 0
    clamp: float | None = TrainConfig.clamp
    keep_kspace: bool = False
    augment: str = "none"

    def mask_rng(self, fname: str, slice_num: int, epoch: int) -> np.random.Generator:
        if self.train:
            return np.random.default_rng([self.seed, epoch, volume_seed(fname), slice_num])
        return np.random.default_rng(volume_seed(fname))

    def __call__(self, raw: RawSlice, epoch: int = 0) -> Sample:
        kspace = torch.from_numpy(np.ascontiguousarray(raw.kspace))
        raw_target = None if raw.target is None else torch.from_numpy(np.ascontiguousarray(raw.target))
        padding = raw.padding
        if self.train and self.augment == "flip":
            rng = np.random.default_rng([self.seed, epoch, volume_seed(raw.fname), raw.slice_num, AUGMENT_STREAM])
            flips = tuple(bool(f) for f in rng.random(2) < 0.5)
            kspace, raw_target, padding = flip_slice(kspace, raw_target, padding, flips)  # type: ignore[arg-type]
        num_cols = kspace.shape[-1]
        mask_np = self.mask_func(num_cols, self.mask_rng(raw.fname, raw.slice_num, epoch))
        left, right = padding
        mask_np[:left] = False  # zero-padded phase encodes are never "sampled"
        mask_np[right:] = False
        mask = torch.from_numpy(mask_np)
        masked = apply_mask(kspace, mask)

        crop = (self.crop_size, self.crop_size)
        image = zero_filled_magnitude(masked, crop)
        if raw_target is not None:
            target = center_crop(raw_target, crop)
        else:
            target = zero_filled_magnitude(kspace, crop)
        mean, std = image.mean(), image.std()
        image = normalize(image, mean, std)
        target = normalize(target.float(), mean, std)
        if self.clamp is not None:  # the input only: the target stays exact for the metrics
            image = image.clamp(-self.clamp, self.clamp)
        return Sample(
            image=image.unsqueeze(0).float(),
            target=target.unsqueeze(0).float(),
            mean=mean.float(),
            std=std.float(),
            max_value=torch.tensor(raw.max_value, dtype=torch.float32),
            fname=raw.fname,
            slice_num=raw.slice_num,
            kspace=(masked / (std + NORM_EPS)).to(torch.complex64) if self.keep_kspace else None,
            mask=mask if self.keep_kspace else None,
        )


def image_from_normalized_kspace(
    kspace: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, crop: tuple[int, int], clamp: float | None
) -> torch.Tensor:
    """The network input from normalised k-space (see :class:`Sample`), differentiable.

    ``kspace``: complex ``(B, H, W)``; ``mean``, ``std``: ``(B,)``. Returns ``(B, 1, h, w)``, equal to
    the clean ``Batch.image`` when ``kspace`` is the clean ``Batch.kspace``. Used to add a
    perturbation in k-space before the inverse FFT (the seed's Algorithm 2).
    """
    image = zero_filled_magnitude(kspace, crop) - (mean / (std + NORM_EPS))[:, None, None]
    if clamp is not None:
        image = image.clamp(-clamp, clamp)
    return image.unsqueeze(1)
