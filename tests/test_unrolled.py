"""The unrolled reconstructor's data consistency (mriadv.models.unrolled) against its closed form."""

from __future__ import annotations

import torch

from mriadv.data.transforms import image_from_normalized_kspace
from mriadv.fft import fft2c
from mriadv.models.unrolled import UnrolledNet, data_consistency


def _problem(seed: int = 0, b: int = 2, h: int = 16, w: int = 12):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, h, w, generator=g, dtype=torch.complex64)
    mask = torch.rand(b, w, generator=g) < 0.4
    y = torch.randn(b, h, w, generator=g, dtype=torch.complex64) * mask[:, None, :]
    return z, y, mask


def test_hard_data_consistency_keeps_the_measurements_and_is_idempotent():
    z, y, mask = _problem()
    x = data_consistency(z, y, mask, torch.tensor(0.0))
    k = fft2c(x)
    sampled = mask[:, None, :].expand_as(k)
    assert torch.allclose(k[sampled], y[sampled], atol=1e-5)
    assert torch.allclose(k[~sampled], fft2c(z)[~sampled], atol=1e-5)
    assert torch.allclose(data_consistency(x, y, mask, torch.tensor(0.0)), x, atol=1e-5)


def test_soft_data_consistency_is_the_minimiser_of_its_objective():
    """x = argmin ‖M F x − y‖² + λ ‖x − z‖²: the gradient of the objective vanishes at the output,
    and not at a nearby point."""
    z, y, mask = _problem(1)
    lam = torch.tensor(0.3)
    m = mask[:, None, :].to(torch.float32)

    def objective(x: torch.Tensor) -> torch.Tensor:
        return (m * (fft2c(x) - y)).abs().pow(2).sum() + lam * (x - z).abs().pow(2).sum()

    x = data_consistency(z, y, mask, lam).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(x), x)
    assert grad.abs().max() < 1e-4
    moved = (x.detach() + 0.05).requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(moved), moved)
    assert grad.abs().max() > 1e-2


def test_with_silent_denoisers_the_network_returns_its_zero_filled_input_and_gradients_reach_lambda():
    torch.manual_seed(0)
    net = UnrolledNet(cascades=3, chans=4, num_pools=1, crop=8)
    z, y, mask = _problem(2, h=16, w=12)
    mean, std = torch.tensor([0.2, 0.5]), torch.tensor([1.0, 2.0])
    out = net(y, mask, mean, std)
    assert out.shape == (2, 1, 8, 8)
    with torch.no_grad():
        for p in net.denoisers.parameters():
            p.zero_()
    silent = net(y, mask, mean, std)
    expected = image_from_normalized_kspace(y, mean, std, (8, 8), clamp=None)
    assert torch.allclose(silent, expected, atol=1e-5)
    net = UnrolledNet(cascades=2, chans=4, num_pools=1, crop=8, share=True)
    assert len(net.denoisers) == 1 and net.lambdas.shape == (2,)
    net(y, mask, mean, std).pow(2).sum().backward()
    assert net.rho.grad is not None and (net.rho.grad != 0).all()
