"""Smoothing inside the unroll (SMUG, ``unroll_smooth_samples`` / ``unroll_smooth_sigma``,
:mod:`mriadv.models.unrolled`): each cascade's denoiser step is the mean of N passes on its input plus
complex Gaussian noise. Checked against the formula computed here step by step, its limit as sigma
goes to 0, its randomness (fresh in training, common random numbers in evaluation), an attack through
it, the config's refusals, and a fit that round-trips through best.pt and assess."""

from __future__ import annotations

import re

import pytest
import torch

from mriadv.assess import assess
from mriadv.attacks import PGDAttack
from mriadv.checkpoint import BEST_NAME, load_checkpoint
from mriadv.config import ConfigError, TrainConfig
from mriadv.data.transforms import Batch, center_crop
from mriadv.fft import fft2c, ifft2c
from mriadv.fit import fit
from mriadv.models.smoothing import SMOOTHING_SEED
from mriadv.models.unrolled import UnrolledNet
from mriadv.runtime import Runtime
from mriadv.trainer import build_reconstructor

SIZE = dict(cascades=2, chans=2, num_pools=1, crop=8)


def _inputs(seed: int = 0, b: int = 2, h: int = 16, w: int = 12):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, w, generator=g) < 0.5
    kspace = torch.randn(b, h, w, generator=g, dtype=torch.complex64) * mask[:, None, :]
    return kspace, mask, torch.rand(b, generator=g), 1.0 + torch.rand(b, generator=g)


def _by_hand(net: UnrolledNet, kspace, mask, mean, std, samples: int, sigma: float) -> torch.Tensor:
    """The smoothed network written out: per cascade k, z = x + mean_i D_k(x + sigma n_i) with the
    evaluation's draws (a generator seeded SMOOTHING_SEED + k, real then imaginary parts), then
    x = F^H[(M y + lam F z) / (M + lam)] (sampled columns) or F^H F z (the others)."""
    x = ifft2c(kspace)
    for k in range(net.cascades):
        g = torch.Generator().manual_seed(SMOOTHING_SEED + k)
        outs = []
        for _ in range(samples):
            noise = torch.complex(torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g))
            noisy = x + sigma * noise
            two = torch.stack([noisy.real, noisy.imag], dim=1)  # (B, 2, H, W)
            d = net.denoisers[k](two)
            outs.append(torch.complex(d[:, 0], d[:, 1]))
        z = x + torch.stack(outs).mean(0)
        lam = torch.nn.functional.softplus(net.rho[k])
        kz = fft2c(z)
        sampled = mask[:, None, :].expand_as(kz)
        x = ifft2c(torch.where(sampled, (kspace + lam * kz) / (1 + lam), kz))
    image = center_crop(x, (net.crop, net.crop)).abs()
    return (image - (mean / (std + 1e-11))[:, None, None]).unsqueeze(1)


def test_each_denoiser_step_is_the_mean_of_noisy_passes():
    torch.manual_seed(0)
    net = UnrolledNet(**SIZE, smooth_samples=3, smooth_sigma=0.2).eval()
    kspace, mask, mean, std = _inputs()
    with torch.no_grad():
        got = net(kspace, mask, mean, std)
        want = _by_hand(net, kspace, mask, mean, std, samples=3, sigma=0.2)
        plain = UnrolledNet(**SIZE).eval()
        plain.load_state_dict(net.state_dict())  # the same weights, no smoothing
        unsmoothed = plain(kspace, mask, mean, std)
    assert got.shape == (2, 1, 8, 8)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert (got - unsmoothed).abs().max() > 1e-3  # the noise matters at sigma 0.2

    tiny = UnrolledNet(**SIZE, smooth_samples=4, smooth_sigma=1e-6).eval()
    tiny.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.allclose(tiny(kspace, mask, mean, std), unsmoothed, atol=1e-4)  # sigma -> 0: the plain network


def test_evaluation_draws_are_fixed_and_training_draws_follow_the_global_generator():
    torch.manual_seed(1)
    net = UnrolledNet(**SIZE, smooth_samples=2, smooth_sigma=0.3)  # instance norm: no running statistics
    kspace, mask, mean, std = _inputs(1)
    with torch.no_grad():
        net.eval()
        assert torch.equal(net(kspace, mask, mean, std), net(kspace, mask, mean, std))
        net.train()
        torch.manual_seed(7)
        a = net(kspace, mask, mean, std)
        b = net(kspace, mask, mean, std)
        torch.manual_seed(7)
        again = net(kspace, mask, mean, std)
    assert not torch.equal(a, b)  # fresh noise at every training pass
    assert torch.equal(a, again)  # from torch's generator, which every checkpoint saves


def test_a_kspace_attack_differentiates_through_the_smoothed_network():
    torch.manual_seed(2)
    net = UnrolledNet(**SIZE, smooth_samples=2, smooth_sigma=0.1).eval()
    kspace, mask, mean, std = _inputs(2)
    with torch.no_grad():
        target = net(kspace, mask, mean, std) + 0.05 * torch.randn(2, 1, 8, 8)
    batch = Batch(
        image=torch.zeros(2, 1, 8, 8),
        target=target,
        mean=mean,
        std=std,
        max_value=torch.full((2,), 6.0),
        fnames=["a.h5", "b.h5"],
        slice_nums=torch.arange(2),
        kspace=kspace,
        mask=mask,
    )
    runtime = Runtime.resolve("cpu", "fp32")
    out = PGDAttack(float("nan"), steps=3, domain="kspace", rel=0.2)(net, batch, runtime)
    with torch.no_grad():
        clean = (net(kspace, mask, mean, std) - target).pow(2).mean()
        attacked = (net(out.batch.kspace, mask, mean, std) - target).pow(2).mean()
    assert out.delta.abs().sum() > 0 and attacked > clean  # its gradient reached the input through the means


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"unroll_smooth_samples": 2, "unroll_smooth_sigma": 0.1},
            "'unroll_smooth_samples' = 2: smooths arch=unrolled",
        ),
        (
            {"arch": "unrolled", "perturbation": "kspace", "attacks": ("pgd_kspace",), "unroll_smooth_samples": 2},
            "'unroll_smooth_sigma' = 0.0: and unroll_smooth_samples: set both > 0, or neither",
        ),
        ({"unroll_smooth_sigma": -0.1}, "'unroll_smooth_sigma' = -0.1: must be a finite number >= 0"),
        ({"unroll_smooth_samples": -1}, "'unroll_smooth_samples' = -1: must be an integer >= 0"),
    ],
)
def test_the_config_refuses_smoothing_it_cannot_do_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig.from_dict(overrides)


def test_a_smoothed_unrolled_fit_round_trips_through_best_pt_and_assess(tiny_config, synthetic_root, tmp_path):
    cfg = tiny_config(
        synthetic_root,
        arch="unrolled",
        perturbation="kspace",
        attacks=("pgd_kspace",),
        epsilon=0.0,
        unroll_cascades=2,
        unroll_chans=4,
        unroll_pools=1,
        unroll_smooth_samples=2,
        unroll_smooth_sigma=0.05,
        loss="mse",
        attack_budgets=(20.0,),
        pgd_steps=2,
        train_eval_volumes=0,
        max_epochs=1,
        max_train_batches=2,
        instabilities=False,
        threads=1,
    )
    result = fit(cfg, out_dir=tmp_path, log=None)
    assert result.status == "completed"
    payload = load_checkpoint(tmp_path / BEST_NAME)
    net = build_reconstructor(TrainConfig.from_dict(payload["config"]))
    assert (net.smooth_samples, net.smooth_sigma) == (2, 0.05)
    final = result.history[-1].report
    rep = assess(tmp_path)  # the same smoothed predictor, its fixed draws: the same numbers
    assert rep.clean["nmse"] == pytest.approx(final["clean"]["nmse"], rel=1e-6)
    got = {(r["attack"], r["budget"]): r["nmse"] for r in rep.rows}
    want = {(r["attack"], r["budget"]): r["nmse"] for r in final["robustness"]}
    assert got == pytest.approx(want, rel=1e-6)
