"""mriadv.metrics against closed forms and scikit-image (the reference fastMRI's evaluate.py calls)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.data import shepp_logan_phantom
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mriadv import metrics
from mriadv.metrics import (
    VolumeMetrics,
    nmse,
    psnr,
    seed_batch_metrics,
    squared_error,
    ssim,
    ssim_slices,
    sum_of_squares,
)


def _sk_ssim(gt: np.ndarray, pred: np.ndarray, maxval: float) -> float:
    """fastMRI's evaluate.ssim, verbatim in spirit: skimage per slice, mean over slices."""
    return float(np.mean([structural_similarity(gt[i], pred[i], data_range=maxval) for i in range(gt.shape[0])]))


def _random_pair(shape, seed=0, noise=0.1):
    rng = np.random.default_rng(seed)
    gt = rng.random(shape)
    return gt, gt + noise * rng.standard_normal(shape)


def _phantom_pair(shape, seed=1):
    """Piecewise-constant anatomy-like slices with a smooth bias field, plus noise and a blur-like error."""
    rng = np.random.default_rng(seed)
    s, h, w = shape
    base = shepp_logan_phantom()  # (400, 400) in [0, 1]
    ys = np.linspace(0, 399, h).round().astype(int)
    xs = np.linspace(0, 399, w).round().astype(int)
    sl = base[np.ix_(ys, xs)]
    ramp = np.linspace(0.5, 1.5, w)[None, :]
    gt = np.stack([sl * ramp * (1 + 0.1 * k) for k in range(s)]) * 1e-4  # fastMRI-like magnitudes
    pred = 0.5 * (gt + np.roll(gt, 1, axis=-1)) + 2e-6 * rng.standard_normal(shape)
    return gt, pred


PAIRS = [
    _random_pair((3, 37, 41)),
    _random_pair((2, 7, 7), seed=2),
    _random_pair((4, 64, 48), seed=3, noise=0.5),
    _phantom_pair((3, 45, 53)),
    _phantom_pair((2, 80, 80), seed=4),
]


def test_core_imports_only_numpy_and_torch():
    for module in (metrics, __import__("mriadv.losses", fromlist=["_"])):
        tree = ast.parse(Path(module.__file__).read_text())
        roots = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots.add(node.module.split(".")[0])
        assert roots <= {
            "__future__",
            "numpy",
            "torch",
            "math",
            "collections",
            "functools",
            "inspect",
            "types",
            "typing",
        }, roots


# ---------------------------------------------------------------- closed forms


def test_identical_volumes():
    gt, _ = _phantom_pair((3, 45, 53))
    assert nmse(gt, gt) == 0.0
    assert psnr(gt, gt) == math.inf
    assert ssim(gt, gt) == pytest.approx(1.0, abs=1e-12)


def test_constant_offset_closed_forms():
    gt, _ = _phantom_pair((3, 37, 41))
    c = 3e-6
    pred = gt + c
    assert nmse(gt, pred) == pytest.approx(c**2 * gt.size / np.sum(gt**2), rel=1e-9)
    assert psnr(gt, pred) == pytest.approx(10 * np.log10(gt.max() ** 2 / c**2), rel=1e-9)
    assert psnr(gt, pred, maxval=2e-4) == pytest.approx(10 * np.log10(2e-4**2 / c**2), rel=1e-9)


def test_all_zero_reference():
    z = np.zeros((2, 8, 8))
    assert nmse(z, z) == 0.0
    assert nmse(z, z + 1) == math.inf
    assert psnr(z, z + 1) == -math.inf


# ---------------------------------------------------------------- scikit-image agreement


@pytest.mark.parametrize("gt,pred", PAIRS)
def test_agrees_with_skimage(gt, pred):
    mx = gt.max()
    assert psnr(gt, pred) == pytest.approx(peak_signal_noise_ratio(gt, pred, data_range=mx), rel=1e-12)
    assert ssim(gt, pred) == pytest.approx(_sk_ssim(gt, pred, mx), abs=1e-9)
    assert ssim(gt, pred, maxval=3 * mx) == pytest.approx(_sk_ssim(gt, pred, 3 * mx), abs=1e-9)
    assert nmse(gt, pred) == pytest.approx(np.linalg.norm(gt - pred) ** 2 / np.linalg.norm(gt) ** 2, rel=1e-12)


def test_float32_volumes_are_computed_in_float64():
    gt, pred = _phantom_pair((3, 37, 41))
    gt32, pred32 = gt.astype(np.float32), pred.astype(np.float32)
    ref = _sk_ssim(gt32.astype(np.float64), pred32.astype(np.float64), float(gt32.max()))
    assert ssim(gt32, pred32) == pytest.approx(ref, abs=1e-9)


@pytest.mark.parametrize(
    "gt,pred,match",
    [
        (np.zeros((8, 8)), np.zeros((8, 8)), "gt"),
        (np.zeros((2, 8, 8)), np.zeros((2, 8, 9)), "pred"),
        (np.zeros((2, 8, 8)), np.zeros((1, 2, 8, 8)), "pred"),
        (np.zeros((2, 8, 8), np.complex64), np.zeros((2, 8, 8)), "gt"),
    ],
)
def test_shape_errors(gt, pred, match):
    for fn in (nmse, psnr, ssim):
        with pytest.raises(ValueError, match=match):
            fn(gt, pred)


def test_ssim_rejects_slices_smaller_than_window():
    with pytest.raises(ValueError, match="7x7"):
        ssim(np.ones((1, 6, 9)), np.ones((1, 6, 9)))
    with pytest.raises(ValueError, match="7x7"):
        ssim_slices(torch.ones(1, 1, 9, 6), torch.ones(1, 1, 9, 6), 1.0)


# ---------------------------------------------------------------- torch kernels


@pytest.mark.parametrize("gt,pred", PAIRS)
def test_torch_slice_kernels(gt, pred):
    mx = gt.max()
    g4, p4 = torch.from_numpy(gt)[:, None], torch.from_numpy(pred)[:, None]  # (B, 1, H, W)
    ref = [structural_similarity(gt[i], pred[i], data_range=mx) for i in range(gt.shape[0])]
    np.testing.assert_allclose(ssim_slices(g4, p4, mx).numpy(), ref, atol=1e-9)
    per_slice_range = torch.full((gt.shape[0],), mx)
    np.testing.assert_allclose(ssim_slices(g4[:, 0], p4[:, 0], per_slice_range).numpy(), ref, atol=1e-9)
    np.testing.assert_allclose(squared_error(g4, p4).numpy(), ((gt - pred) ** 2).sum(axis=(1, 2)), rtol=1e-12)
    np.testing.assert_allclose(sum_of_squares(g4).numpy(), (gt**2).sum(axis=(1, 2)), rtol=1e-12)
    # float32 inputs (as during training) are promoted, not computed in float32
    s32 = ssim_slices(g4.float(), p4.float(), float(mx)).numpy()
    ref32 = [
        structural_similarity(
            gt[i].astype(np.float32).astype(np.float64), pred[i].astype(np.float32).astype(np.float64), data_range=mx
        )
        for i in range(gt.shape[0])
    ]
    np.testing.assert_allclose(s32, ref32, atol=1e-9)


def test_torch_shape_errors():
    with pytest.raises(ValueError, match="gt"):
        sum_of_squares(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="pred"):
        squared_error(torch.zeros(2, 8, 8), torch.zeros(2, 8, 9))
    with pytest.raises(ValueError, match="maxval"):
        ssim_slices(torch.zeros(2, 8, 8), torch.zeros(2, 8, 8), torch.ones(3))


def _feed(vm: VolumeMetrics, volumes: dict, seed: int, dtype=torch.float64) -> None:
    """Feed every slice of every volume in shuffled, uneven batches (volumes of one H, W per batch)."""
    rng = np.random.default_rng(seed)
    by_shape: dict = {}
    for name, (gt, pred) in volumes.items():
        for i in range(gt.shape[0]):
            by_shape.setdefault(gt.shape[1:], []).append((name, i, gt[i], pred[i], gt.max()))
    for items in by_shape.values():
        order = rng.permutation(len(items))
        start = 0
        while start < len(order):
            size = int(rng.integers(1, 5))
            batch = [items[k] for k in order[start : start + size]]
            start += size
            vm.update(
                [b[0] for b in batch],
                torch.tensor([b[1] for b in batch]),
                torch.from_numpy(np.stack([b[2] for b in batch]))[:, None].to(dtype),
                torch.from_numpy(np.stack([b[3] for b in batch]))[:, None].to(dtype),
                torch.tensor([b[4] for b in batch]),
            )


def _volumes():
    return {
        "a.h5": _phantom_pair((5, 37, 41), seed=10),
        "b.h5": _phantom_pair((3, 37, 41), seed=11),
        "c.h5": _random_pair((4, 37, 41), seed=12),
        "d.h5": _phantom_pair((6, 32, 24), seed=13),
    }


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_volume_metrics_match_numpy(dtype, rel):
    volumes = _volumes()
    if dtype == torch.float32:  # the reference sees the same rounded images
        volumes = {
            k: (g.astype(np.float32).astype(np.float64), p.astype(np.float32).astype(np.float64))
            for k, (g, p) in volumes.items()
        }
    vm = VolumeMetrics()
    _feed(vm, volumes, seed=0, dtype=dtype)
    assert len(vm) == len(volumes)
    got = vm.per_volume()
    expected = {name: {"nmse": nmse(g, p), "psnr": psnr(g, p), "ssim": ssim(g, p)} for name, (g, p) in volumes.items()}
    assert set(got) == set(expected)
    for name in expected:
        for key in ("nmse", "psnr", "ssim"):
            assert got[name][key] == pytest.approx(expected[name][key], rel=rel), (name, key)
    summary = vm.summary()
    for key in ("nmse", "psnr", "ssim"):
        assert summary[key] == pytest.approx(np.mean([e[key] for e in expected.values()]), rel=rel)


def test_volume_metrics_bookkeeping():
    gt, pred = _phantom_pair((3, 16, 16))
    g, p = torch.from_numpy(gt), torch.from_numpy(pred)
    vm = VolumeMetrics()
    with pytest.raises(ValueError, match="no slices"):
        vm.summary()
    vm.update(["v"] * 3, [0, 1, 2], g, p, float(gt.max()))
    vm.update(["v"], [1], g[1:2], p[1:2], float(gt.max()))  # duplicate slice (padded sampler): no double count
    assert vm.per_volume()["v"]["nmse"] == pytest.approx(nmse(gt, pred), rel=1e-12)
    with pytest.raises(ValueError, match="maxval"):
        vm.update(["v"], [0], g[:1], p[:1], 2 * float(gt.max()))
    with pytest.raises(ValueError, match="fnames"):
        vm.update(["v", "w"], [0], g[:1], p[:1], 1.0)
    with pytest.raises(ValueError, match="slice_idx"):
        vm.update(["v"], [0, 1], g[:1], p[:1], 1.0)
    vm.reset()
    assert len(vm) == 0


def test_volume_metrics_identical():
    gt, _ = _phantom_pair((2, 16, 16))
    g = torch.from_numpy(gt)
    vm = VolumeMetrics()
    vm.update(["v", "v"], [0, 1], g, g.clone(), float(gt.max()))
    assert vm.per_volume()["v"] == {"nmse": 0.0, "psnr": math.inf, "ssim": pytest.approx(1.0, abs=1e-12)}


# ---------------------------------------------------------------- the seed paper's batch metrics


@pytest.mark.parametrize("shape,seed", [((4, 1, 37, 41), 0), ((2, 1, 32, 32), 1)])
def test_seed_metrics_are_skimage_with_arguments_swapped(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    gt = torch.randn(shape, generator=gen, dtype=torch.float64).clamp(-6, 6)
    pred = (0.8 * gt + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)).clamp(-6, 6)
    got = seed_batch_metrics(gt, pred)
    g, p = gt[:, 0].numpy(), pred[:, 0].numpy()
    peak = p.max()
    assert got["nmse"] == pytest.approx(np.linalg.norm(p - g) ** 2 / np.linalg.norm(p) ** 2, rel=1e-12)
    assert got["psnr"] == pytest.approx(peak_signal_noise_ratio(p, g, data_range=peak), rel=1e-12)
    ref_ssim = np.mean([structural_similarity(p[i], g[i], data_range=peak) for i in range(shape[0])])
    assert got["ssim"] == pytest.approx(ref_ssim, abs=1e-9)
    # ...and the swap matters: the fastMRI definitions give different numbers on the same batch.
    assert got["nmse"] != pytest.approx(nmse(g, p), rel=1e-3)
    assert got["psnr"] != pytest.approx(psnr(g, p), rel=1e-3)


def test_seed_nmse_rewards_a_larger_prediction():
    """Closed form of the swap: pred = 2 gt has fastMRI NMSE 1 but seed NMSE 1/4."""
    gt = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert seed_batch_metrics(gt, 2 * gt)["nmse"] == pytest.approx(0.25, rel=1e-6)
    assert nmse(gt[:, 0].numpy(), 2 * gt[:, 0].numpy()) == pytest.approx(1.0, rel=1e-6)
