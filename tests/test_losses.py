"""mriadv.losses against closed forms and scikit-image's Gaussian-window SSIM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity

from mriadv.losses import LOSSES, _gaussian_window, dssim_loss, make_loss, mse_loss

SHAPES = [(2, 1, 32, 40), (1, 1, 11, 11), (3, 1, 13, 17), (2, 2, 24, 24)]


def _pair(shape, seed=0, dtype=torch.float32, noise=0.5):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, generator=gen, dtype=torch.float64)
    pred = target + noise * torch.randn(shape, generator=gen, dtype=torch.float64)
    return pred.to(dtype), target.to(dtype)


def _sk_dssim(pred: torch.Tensor, target: torch.Tensor, data_range) -> np.ndarray:
    """Independent reference: skimage's Gaussian SSIM (truncate 3.5 sigma -> 11 taps at sigma 1.5),
    population statistics, mean over its cropped (valid) region, averaged over channels."""
    out = []
    for b in range(pred.shape[0]):
        t = target[b].double().numpy()
        r = (
            float(t.max() - t.min())
            if data_range is None
            else float(data_range[b] if np.ndim(data_range) else data_range)
        )
        s = [
            structural_similarity(
                pred[b, c].double().numpy(),
                t[c],
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=r,
            )
            for c in range(pred.shape[1])
        ]
        out.append((1 - np.mean(s)) / 2)
    return np.array(out)


def test_window_is_scipys_truncated_gaussian():
    w = _gaussian_window(11, 1.5)
    delta = np.zeros((11, 11))
    delta[5, 5] = 1.0
    ref = gaussian_filter(delta, sigma=1.5, truncate=3.5, mode="constant")  # the kernel itself
    np.testing.assert_allclose(w.numpy(), ref, atol=1e-15)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dssim_of_identical_images_is_zero(shape, dtype):
    _, x = _pair(shape, dtype=dtype)
    for dr in (None, 1.0, torch.full((shape[0],), 4.0)):
        d = dssim_loss(x, x.clone(), data_range=dr, reduction="none")
        assert d.shape == (shape[0],)
        torch.testing.assert_close(d, torch.zeros_like(d), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("data_range", [None, 1.0, "tensor"])
def test_dssim_matches_skimage_gaussian_ssim(shape, data_range):
    pred, target = _pair(shape, seed=1, dtype=torch.float64)
    dr = torch.linspace(2.0, 5.0, shape[0], dtype=torch.float64) if data_range == "tensor" else data_range
    ref = _sk_dssim(pred, target, dr.numpy() if isinstance(dr, torch.Tensor) else dr)
    # Observed agreement: ~1e-16 in float64 (the valid region is exactly skimage's crop), ~4e-7 in float32.
    np.testing.assert_allclose(dssim_loss(pred, target, data_range=dr, reduction="none").numpy(), ref, atol=1e-12)
    got32 = dssim_loss(pred.float(), target.float(), data_range=dr, reduction="none")
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.double().numpy(), ref, atol=2e-6)
    assert float(dssim_loss(pred, target, data_range=dr)) == pytest.approx(ref.mean(), abs=1e-12)


def test_dssim_is_in_unit_interval():
    target = torch.randn(4, 1, 24, 24, generator=torch.Generator().manual_seed(2))
    for pred in (target + 0.1, target * 3, -target, torch.randn_like(target), torch.zeros_like(target)):
        d = dssim_loss(pred, target, reduction="none")
        assert bool(((d >= 0) & (d <= 1)).all()), d
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(3))
    levels = [float(dssim_loss(target + s * noise, target)) for s in (0.0, 0.1, 0.3, 1.0, 3.0)]
    assert levels == sorted(levels) and levels[0] == 0.0 and levels[-1] > 0.3


def test_dssim_with_large_offset_uses_centred_statistics():
    """A DC offset 1000x the texture: E[x^2] - E[x]^2 would lose every digit in float32 without the shift."""
    pred, target = _pair((2, 1, 32, 32), seed=3, dtype=torch.float64, noise=0.3)
    ref = _sk_dssim(pred + 1000.0, target + 1000.0, [4.0, 4.0])
    got = dssim_loss((pred + 1000.0).float(), (target + 1000.0).float(), data_range=4.0, reduction="none")
    np.testing.assert_allclose(got.double().numpy(), ref, atol=1e-5)


@pytest.mark.parametrize(
    "pred,target",
    [
        (torch.randn(2, 1, 16, 16), None),  # pred == target
        (torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 16)),  # constant, identical
        (torch.full((2, 1, 16, 16), -2.0), torch.full((2, 1, 16, 16), 3.0)),  # constant, different
        (torch.randn(2, 1, 16, 16), torch.zeros(2, 1, 16, 16)),  # constant target, random pred
    ],
)
def test_dssim_gradient_is_finite(pred, target):
    target = pred.clone() if target is None else target
    for dr in (None, 1.0):
        p = pred.clone().requires_grad_(True)
        loss = dssim_loss(p, target, data_range=dr)
        loss.backward()
        assert 0.0 <= float(loss.detach()) <= 1.0
        assert torch.isfinite(p.grad).all()


def test_dssim_under_bf16_autocast_matches_float32():
    pred, target = _pair((2, 1, 32, 32), seed=4, noise=0.1)
    pred, target = pred + 3.0, target + 3.0  # a DC level, where bf16 statistics would cancel to nothing
    ref = dssim_loss(pred, target, data_range=1.0, reduction="none")
    p = pred.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dssim_loss(p, target, data_range=1.0, reduction="none")
        got.sum().backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert torch.isfinite(p.grad).all()
    # bf16 inputs (a network output under autocast) are cast up, too
    torch.testing.assert_close(
        dssim_loss(pred.bfloat16(), target.bfloat16(), data_range=1.0),
        dssim_loss(pred.bfloat16().float(), target.bfloat16().float(), data_range=1.0),
    )


def test_mse_closed_form_and_reduction():
    target = torch.randn(3, 1, 9, 7, generator=torch.Generator().manual_seed(5))
    offsets = torch.tensor([0.5, -1.0, 2.0]).view(3, 1, 1, 1)
    per_sample = mse_loss(target + offsets, target, reduction="none")
    assert per_sample.shape == (3,)
    torch.testing.assert_close(per_sample, torch.tensor([0.25, 1.0, 4.0]))
    torch.testing.assert_close(mse_loss(target + offsets, target), torch.tensor((0.25 + 1.0 + 4.0) / 3))
    torch.testing.assert_close(mse_loss(target + 0.1, target), torch.nn.functional.mse_loss(target + 0.1, target))


def test_shape_and_argument_errors():
    x = torch.zeros(2, 1, 16, 16)
    for fn in (mse_loss, dssim_loss):
        with pytest.raises(ValueError, match="pred"):
            fn(torch.zeros(2, 16, 16), torch.zeros(2, 16, 16))
        with pytest.raises(ValueError, match="differs"):
            fn(x, torch.zeros(2, 1, 16, 15))
        with pytest.raises(ValueError, match="reduction"):
            fn(x, x, reduction="sum")
    with pytest.raises(ValueError, match="window"):
        dssim_loss(torch.zeros(1, 1, 10, 32), torch.zeros(1, 1, 10, 32))
    with pytest.raises(ValueError, match="odd"):
        dssim_loss(x, x, window_size=4)
    with pytest.raises(ValueError, match="data_range"):
        dssim_loss(x, x, data_range=torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        dssim_loss(x, x, data_range=0.0)


def test_make_loss():
    pred, target = _pair((2, 1, 16, 16), seed=6)
    assert set(LOSSES) == {"mse", "dssim"}
    torch.testing.assert_close(make_loss("mse")(pred, target), mse_loss(pred, target))
    loss = make_loss("dssim", data_range=1.0, reduction="none")
    torch.testing.assert_close(loss(pred, target), dssim_loss(pred, target, data_range=1.0, reduction="none"))
    with pytest.raises(ValueError, match=r"unknown loss 'ssim'.*dssim, mse"):
        make_loss("ssim")
    with pytest.raises(ValueError, match="data_rang"):
        make_loss("dssim", data_rang=1.0)  # a typo must not be silently ignored
    with pytest.raises(ValueError, match="reduction"):
        make_loss("mse", reduction="sum")
