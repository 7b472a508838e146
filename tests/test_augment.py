"""Random flips of the training slices (``augment``): exact k-space of the flipped image, the target
flipped with it, drawn per (seed, epoch, file, slice), and 'auto' on only where an epoch cycles the data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mriadv.config import ConfigError, TrainConfig
from mriadv.data.loading import build_data
from mriadv.data.masks import make_mask_func
from mriadv.data.transforms import RawSlice, UnetTransform, flip_slice
from mriadv.runtime import Runtime


def _slice(rng: np.random.Generator, shape=(16, 10), crop=(8, 6)):
    """A complex image, its centred-FFT k-space (NumPy, independent of mriadv.fft) and its target."""
    image = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    kspace = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(image), norm="ortho"))
    top, left = (shape[0] - crop[0]) // 2, (shape[1] - crop[1]) // 2
    target = np.abs(image)[top : top + crop[0], left : left + crop[1]]
    return image, kspace, target, (top, left)


@pytest.mark.parametrize("flips", [(True, False), (False, True), (True, True), (False, False)])
def test_flip_gives_the_kspace_of_the_flipped_image_and_its_target(flips):
    image, kspace, target, (top, left) = _slice(np.random.default_rng(0))
    axes = tuple(a for a, f in zip((0, 1), flips) if f)
    k2, t2, padding = flip_slice(torch.from_numpy(kspace), torch.from_numpy(target), (2, 9), flips)
    flipped = np.flip(image, axes) if axes else image
    back = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k2.numpy()), norm="ortho"))
    np.testing.assert_allclose(back, flipped, atol=1e-10)
    crop = np.abs(flipped)[top : top + target.shape[0], left : left + target.shape[1]]
    np.testing.assert_allclose(t2.numpy(), crop, atol=1e-12)  # still the centre crop of the image
    assert padding == ((10 - 9, 10 - 2) if flips[1] else (2, 9))  # the acquired band, mirrored


def test_an_axis_whose_crop_margin_is_odd_is_not_flipped():
    _, kspace, _, _ = _slice(np.random.default_rng(1))
    k = torch.from_numpy(kspace)
    odd_target = torch.zeros(7, 6)  # 16 - 7 is odd: flipping rows would shift the target by a pixel
    k2, t2, _ = flip_slice(k, odd_target, (0, 10), (True, False))
    assert k2 is k and t2 is odd_target


def _transform(augment: str, train: bool = True) -> UnetTransform:
    return UnetTransform(make_mask_func("random", 0.08, 4), crop_size=6, train=train, seed=3, augment=augment)


def test_flips_are_drawn_per_epoch_and_slice_and_only_for_training():
    rng = np.random.default_rng(2)
    image, kspace, target, _ = _slice(rng, crop=(6, 6))
    raws = [
        RawSlice(kspace.astype(np.complex64), target.astype(np.float32), f"f{i}.h5", i, (0, 10), 1.0) for i in range(40)
    ]
    plain, flip = _transform("none"), _transform("flip")
    same = [torch.equal(plain(r, 1).target, flip(r, 1).target) for r in raws]
    assert 0 < sum(same) < len(raws)  # unflipped with probability 1/4: some, not all
    assert all(torch.equal(flip(r, 1).image, flip(r, 1).image) for r in raws[:5])  # a pure function
    assert any(not torch.equal(flip(raws[0], e).target, flip(raws[0], 0).target) for e in range(1, 8))
    fixed = _transform("flip", train=False)
    assert all(torch.equal(fixed(r).target, _transform("none", train=False)(r).target) for r in raws)


def test_auto_flips_only_when_an_epoch_cycles_the_training_set(synthetic_root, tiny_config):
    runtime = Runtime.resolve("cpu", "fp32", None)
    cycled = build_data(tiny_config(synthetic_root, steps_per_epoch=8), runtime)  # 12 slices, batch 2: 6 a pass
    assert cycled.augment == "flip" and cycled.train.transform.augment == "flip"
    assert "random flips" in cycled.clock(tiny_config(synthetic_root, steps_per_epoch=8)).describe()
    for steps in (None, 6, 3):  # one pass, exactly one pass, part of a pass
        data = build_data(tiny_config(synthetic_root, steps_per_epoch=steps), runtime)
        assert data.augment == "none" and data.train.transform.augment == "none"
    forced = build_data(tiny_config(synthetic_root, augment="flip"), runtime)
    assert forced.augment == "flip" and forced.val.transform.augment == "none"  # never the validation slices
    off = build_data(tiny_config(synthetic_root, steps_per_epoch=8, augment="none"), runtime)
    assert off.augment == "none"


def test_an_unknown_augmentation_is_refused_by_name():
    with pytest.raises(ConfigError, match="'augment'"):
        TrainConfig(augment="rotate").validate()
