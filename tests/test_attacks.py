"""Attacks judged slice by slice: the noise attack's draw depends on the slice, never on the batch."""

from __future__ import annotations

import zlib

import pytest
import torch

from mriadv.attacks import NoiseAttack, squared_norm
from mriadv.data.transforms import Batch
from mriadv.runtime import Runtime

CPU = Runtime.resolve("cpu", "fp32")
SLICES = [("file1000001.h5", 3), ("file1000001.h5", 4), ("file1000002.h5", 3), ("file1000007.h5", 0)]


def batch_of(keys: list[tuple[str, int]], size: int = 16) -> Batch:
    """A batch of the given (file, slice) pairs; each slice's image is a function of its key alone."""
    images = []
    for fname, s in keys:
        g = torch.Generator().manual_seed(zlib.crc32(f"{fname}/{s}".encode()))
        images.append(torch.randn(1, size, size, generator=g))
    image = torch.stack(images)
    b = len(keys)
    return Batch(image=image, target=image.clone(), mean=torch.zeros(b), std=torch.ones(b),
                 max_value=torch.full((b,), 3.0), fnames=[f for f, _ in keys],
                 slice_nums=torch.tensor([s for _, s in keys]))


def noise_by_slice(keys: list[tuple[str, int]], budget: float) -> dict[tuple[str, int], torch.Tensor]:
    out = NoiseAttack(budget)(torch.nn.Identity(), batch_of(keys), CPU)
    assert torch.allclose(out.delta_sq, torch.full((len(keys),), budget), rtol=1e-5)  # on the sphere
    assert torch.allclose(squared_norm(out.inputs - batch_of(keys).image), torch.full((len(keys),), budget), rtol=1e-4)
    return {k: out.delta[i] for i, k in enumerate(keys)}


@pytest.mark.parametrize("budget", [1.0, 40.0])
def test_noise_of_a_slice_does_not_depend_on_its_batch(budget):
    alone = {k: noise_by_slice([k], budget)[k] for k in SLICES}
    compositions = [SLICES, SLICES[::-1], SLICES[:2], SLICES[2:], [SLICES[3], SLICES[0]], SLICES[1:3]]
    for keys in compositions:
        for k, delta in noise_by_slice(keys, budget).items():
            assert torch.equal(delta, alone[k]), (k, keys)
    # different slices (even of one file) get different directions
    flat = torch.stack([alone[k].flatten() for k in SLICES])
    cos = torch.nn.functional.normalize(flat, dim=1) @ torch.nn.functional.normalize(flat, dim=1).T
    assert torch.all(cos.fill_diagonal_(0).abs() < 0.5)
