"""Randomised smoothing (``adversary='smoothing'``, RS-E2E): the smoothed predictor against the explicit
mean of its noisy passes, its determinism, its limit as sigma -> 0 and its input gradient (the mean of
the per-sample gradients: expectation over transformation); the training step against its closed form;
both architectures; a fit whose every evaluation is the smoothed predictor's, through ``assess`` too."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from mriadv.adversaries import gaussian_perturbation, predictor, training_noise_mode
from mriadv.assess import assess
from mriadv.attacks import PGDAttack
from mriadv.checkpoint import BEST_NAME, load_checkpoint
from mriadv.config import ConfigError, TrainConfig
from mriadv.data.loading import build_data
from mriadv.data.transforms import Batch, image_from_normalized_kspace
from mriadv.evaluate import evaluate
from mriadv.fit import fit
from mriadv.models import UNet
from mriadv.models.smoothing import SMOOTHING_SEED, Smoothed
from mriadv.models.unrolled import UnrolledNet
from mriadv.perturbations import reconstruct, squared_norm, takes_measurements
from mriadv.runtime import Runtime
from mriadv.trainer import NOISE_SEED_OFFSET, Trainer, build_reconstructor
from test_training import fake_batch  # the shared synthetic batch

CPU = Runtime.resolve("cpu", "fp32")
UNROLLED = dict(arch="unrolled", perturbation="kspace", attacks=("pgd_kspace",), unroll_cascades=2)
UNROLLED_SIZE = dict(unroll_chans=4, unroll_pools=1)


def tiny(**kw) -> TrainConfig:
    base = dict(crop_size=32, unet_chans=4, unet_pools=2, batch_size=2, epsilon=20.0, loss="mse", device="cpu")
    return TrainConfig.from_dict({**base, "adversary": "smoothing", **kw})


def kspace_batch(seed: int = 0, b: int = 2, h: int = 16, w: int = 12, crop: int = 8) -> Batch:
    """Random measurements on a column mask, with their zero-filled image (as UnetTransform's)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, w, generator=g) < 0.5
    mask[:, w // 2] = True  # every slice has a sampled column
    y = torch.randn(b, h, w, generator=g, dtype=torch.complex64) * mask[:, None, :]
    mean, std = torch.rand(b, generator=g) + 0.1, torch.ones(b)
    image = image_from_normalized_kspace(y, mean, std, (crop, crop), clamp=6.0)
    target = image + 0.1 * torch.randn(image.shape, generator=g)
    names = [f"f{i}.h5" for i in range(b)]
    return Batch(image, target, mean, std, torch.full((b,), 6.0), names, torch.arange(b), kspace=y, mask=mask)


def hand_kspace_sigma(epsilon: float, y: torch.Tensor, mask: torch.Tensor, crop: int) -> torch.Tensor:
    """sigma per slice from the definition: E||n||^2 = (epsilon / crop^2) ||M y||^2 over 2 H C real entries."""
    out = []
    for yi, mi in zip(y, mask):
        energy = sum(float(yi[:, j].abs().pow(2).sum()) for j in range(len(mi)) if mi[j])
        out.append(math.sqrt(epsilon / crop**2 * energy / (2 * yi.shape[0] * int(mi.sum()))))
    return torch.tensor(out)


# ----------------------------------------------------------------------------------------------
# the smoothed predictor
# ----------------------------------------------------------------------------------------------
def test_the_unet_predictor_is_the_mean_of_its_noisy_passes_and_deterministic():
    torch.manual_seed(0)
    net = UNet(1, 1, 4, 2).eval()
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    eps, n = 3.0, 5
    g = Smoothed(net, n, eps, (16, 16))
    assert not takes_measurements(g) and g.training is False  # it follows the base's mode
    rng = torch.Generator().manual_seed(SMOOTHING_SEED)
    sigma = math.sqrt(eps / 256)
    with torch.no_grad():
        by_hand = sum(net(x + sigma * torch.randn(x.shape, generator=rng)) for _ in range(n)) / n
        first, second = g(x), g(x)
        assert torch.allclose(first, by_hand, rtol=1e-5, atol=1e-6)
        assert torch.equal(first, second)  # common random numbers: the same draws at every call
        assert not torch.allclose(first, net(x), atol=1e-4)  # the noise is there
        # reconstruct() runs it as it runs the U-Net (on the zero-filled image)
        batch = fake_batch(b=2, size=16)
        assert torch.equal(reconstruct(g, CPU, batch), g(batch.image))


def test_the_unrolled_predictor_is_the_mean_over_noise_on_the_sampled_measurements():
    torch.manual_seed(0)
    net = UnrolledNet(cascades=2, chans=4, num_pools=1, crop=8).eval()
    batch = kspace_batch()
    eps, n = 4.0, 3
    g = Smoothed(net, n, eps, (8, 8), sampled_only=True)
    assert takes_measurements(g)
    sigma = hand_kspace_sigma(eps, batch.kspace, batch.mask, 8)
    rng = torch.Generator().manual_seed(SMOOTHING_SEED)
    keep = batch.mask[:, None, :].float()
    with torch.no_grad():
        outs = []
        for _ in range(n):
            noise = torch.complex(
                torch.randn(batch.kspace.shape, generator=rng), torch.randn(batch.kspace.shape, generator=rng)
            )
            outs.append(net(batch.kspace + sigma[:, None, None] * noise * keep, batch.mask, batch.mean, batch.std))
        got = reconstruct(g, CPU, batch)
        assert torch.allclose(got, sum(outs) / n, rtol=1e-5, atol=1e-6)
        assert torch.equal(got, reconstruct(g, CPU, batch))


@pytest.mark.parametrize("arch", ["unet", "unrolled"])
def test_with_a_vanishing_sigma_the_smoothed_prediction_is_the_plain_one(arch):
    torch.manual_seed(0)
    if arch == "unet":
        net, batch, crop = UNet(1, 1, 4, 2).eval(), fake_batch(b=2, size=16), (16, 16)
    else:
        net, batch, crop = UnrolledNet(cascades=2, chans=4, num_pools=1, crop=8).eval(), kspace_batch(), (8, 8)
    g = Smoothed(net, 4, 1e-12, crop)
    with torch.no_grad():
        plain, smoothed = reconstruct(net, CPU, batch), reconstruct(g, CPU, batch)
    assert torch.allclose(smoothed, plain, rtol=1e-5, atol=1e-5)


def test_the_input_gradient_is_the_mean_of_the_per_sample_gradients():
    """An attack's gradient through the predictor: for a linear functional <g(x), v> exactly the mean
    of the per-sample gradients of <f(x + sigma n_i), v> (EOT), and for the squared error the mean of the
    per-sample vector-Jacobian products at the smoothed output's residual (the chain rule)."""
    torch.manual_seed(0)
    net = UNet(1, 1, 4, 2).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    x0 = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    v = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    eps, n = 5.0, 4
    g = Smoothed(net, n, eps, (16, 16))
    rng = torch.Generator().manual_seed(SMOOTHING_SEED)
    noises = [math.sqrt(eps / 256) * torch.randn(x0.shape, generator=rng) for _ in range(n)]

    def per_sample_mean(cotangent: torch.Tensor) -> torch.Tensor:
        grads = []
        for noise in noises:
            x = x0.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad((net(x + noise) * cotangent).sum(), x)
            grads.append(grad)
        return sum(grads) / n

    x = x0.clone().requires_grad_(True)
    (linear,) = torch.autograd.grad((g(x) * v).sum(), x)
    assert torch.allclose(linear, per_sample_mean(v), rtol=1e-4, atol=1e-6)
    target = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    x = x0.clone().requires_grad_(True)
    out = g(x)
    (squared,) = torch.autograd.grad((out - target).pow(2).sum(), x)
    assert torch.allclose(squared, per_sample_mean(2 * (out.detach() - target)), rtol=1e-4, atol=1e-6)


def test_the_predictor_is_chosen_in_one_place():
    tr = Trainer(tiny(smooth_samples=3), CPU)
    g = tr.predictor
    assert isinstance(g, Smoothed) and g.base is tr.recon and g.samples == 3  # the same weights, not a copy
    assert predictor(tr.cfg, tr.recon).samples == 3
    for cfg in (tiny(adversary="noise"), tiny(epsilon=0.0)):  # epsilon 0: standard training, no smoothing
        plain = Trainer(cfg, CPU)
        assert plain.predictor is plain.recon


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def test_the_training_step_is_lambda1_times_the_loss_on_the_noisy_input_alone():
    """The config's noise_mode is 'norm' (the default): smoothing's noise is i.i.d. at sigma^2 = eps / n
    whatever it says, drawn from the trainer's noise stream (seed + 2); no clean term."""
    lam = 0.7
    tr = Trainer(tiny(lambda1=lam, clamp=None), CPU)
    assert tr.cfg.noise_mode == "norm"
    batch = fake_batch()
    rng = torch.Generator().manual_seed(tr.cfg.seed + NOISE_SEED_OFFSET)
    noise = torch.randn(batch.image.shape, generator=rng) * math.sqrt(20.0 / (32 * 32))
    net = copy.deepcopy(tr.recon).train()
    loss = lam * (net(batch.image + noise) - batch.target).pow(2).mean()
    grads = torch.autograd.grad(loss, list(net.parameters()))
    stats = tr.train_step(batch)
    assert stats["recon_loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert stats["pert_loss"] == pytest.approx(loss.item() / lam, rel=1e-6)
    assert math.isnan(stats["clean_loss"])  # RS-E2E never passes a clean input in training
    assert stats["delta_sq"] == pytest.approx(squared_norm(noise).mean().item(), rel=1e-6)
    for grad, p in zip(grads, tr.recon.parameters()):
        assert torch.allclose(p.grad, grad, rtol=1e-5, atol=1e-8)


def test_unrolled_smoothing_trains_one_step_and_evaluates_the_smoothed_predictor():
    cfg = tiny(crop_size=8, smooth_samples=2, epsilon=4.0, **UNROLLED, **UNROLLED_SIZE)
    tr = Trainer(cfg, CPU)
    batch = kspace_batch()
    # the training noise has the predictor's sigma: complex, on the sampled columns
    rng = torch.Generator().manual_seed(11)
    delta = gaussian_perturbation(cfg, batch, torch.Generator().manual_seed(11), mode=training_noise_mode(cfg))
    unit = torch.complex(torch.randn(batch.kspace.shape, generator=rng), torch.randn(batch.kspace.shape, generator=rng))
    sigma = hand_kspace_sigma(4.0, batch.kspace, batch.mask, 8)
    assert torch.allclose(delta, unit * batch.mask[:, None, :] * sigma[:, None, None], rtol=1e-5, atol=1e-7)
    assert cfg.noise_mode == "norm" and training_noise_mode(cfg) == "sigma"  # whatever the config says
    with pytest.raises(ValueError, match="mode"):
        gaussian_perturbation(cfg, batch, torch.Generator(), mode="iid")
    before = [p.detach().clone() for p in tr.recon.parameters()]
    stats = tr.train_step(batch)
    assert math.isfinite(stats["recon_loss"]) and stats["delta_sq"] > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.recon.parameters()))
    model = tr.predictor
    assert isinstance(model, Smoothed) and takes_measurements(model)
    clean = evaluate(model, [batch], tr.loss_fn, CPU)
    plain = evaluate(tr.recon, [batch], tr.loss_fn, CPU)
    assert math.isfinite(clean.nmse) and clean.nmse != plain.nmse
    rows = evaluate(model, [batch], tr.loss_fn, CPU, PGDAttack(4.0, 2, 2.5, "kspace"))
    assert math.isfinite(rows.nmse) and rows.nmse > clean.nmse and tr.recon.training  # its mode restored


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_smooth_samples_below_one_is_refused_naming_the_key(bad):
    with pytest.raises(ConfigError, match=f"config key 'smooth_samples' = {bad!r}: must be an integer >= 1"):
        tiny(smooth_samples=bad)


def test_smoothing_a_unet_in_kspace_is_refused_and_the_rest_is_taken():
    with pytest.raises(ConfigError, match="config key 'perturbation' = 'kspace': adversary='smoothing' smooths"):
        tiny(perturbation="kspace")
    assert tiny(perturbation="kspace", epsilon=0.0).adversary_kind == "none"  # nothing to smooth
    assert tiny(crop_size=8, **UNROLLED).adversary_kind == "smoothing"
    assert tiny().smooth_samples == 8  # the default N


# ----------------------------------------------------------------------------------------------
# end to end: a fit whose every evaluation is the smoothed predictor's, and assess
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoothing_run(synthetic_root, tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("smoothing")
    cfg = tiny_config(
        synthetic_root,
        adversary="smoothing",
        smooth_samples=2,
        loss="mse",
        attacks=("pgd", "noise"),
        attack_budgets=(20.0,),
        pgd_steps=2,
        max_epochs=1,
        max_train_batches=2,
        train_eval_volumes=0,
        instabilities=False,
        threads=1,
    )
    return cfg, out, fit(cfg, out_dir=out, log=None)


def test_a_smoothing_fit_evaluates_the_smoothed_predictor(smoothing_run):
    cfg, out, result = smoothing_run
    r = result.history[-1]
    assert result.status == "completed" and r.steps == 2
    for key in ("train_loss", "train_pert_loss", "delta_sq", "val_loss", "val_nmse", "val_psnr", "val_ssim"):
        assert math.isfinite(getattr(r, key)), key
    assert math.isnan(r.train_clean_loss) and r.train_loss == pytest.approx(r.train_pert_loss, rel=1e-6)
    assert all(math.isfinite(row["nmse"]) for row in r.robustness) and {row["attack"] for row in r.robustness} == {
        "pgd",
        "noise",
    }
    assert r.report is not None and math.isfinite(r.report["clean"]["nmse"])
    # the selection split evaluated independently: the plain network, and the smoothed one by hand
    payload = load_checkpoint(out / BEST_NAME)
    net = build_reconstructor(TrainConfig.from_dict(payload["config"]))
    net.load_state_dict(payload["networks"]["recon"])
    data = build_data(cfg, CPU)
    loader = data.loader(data.val, shuffle=False)
    loss_fn = Trainer(cfg, CPU).loss_fn
    plain = evaluate(net, loader, loss_fn, CPU, clamp=cfg.clamp)
    smoothed = evaluate(Smoothed(net, 2, cfg.epsilon, (64, 64)), loader, loss_fn, CPU, clamp=cfg.clamp)
    assert r.val_nmse == pytest.approx(smoothed.nmse, rel=1e-6) and r.val_loss == pytest.approx(smoothed.loss, rel=1e-6)
    assert abs(r.val_nmse - plain.nmse) > 1e-6 * plain.nmse  # not the plain network's
    assert set(np.load(out / "preview.npz").files) >= {"recon", "pgd_recon"}


def test_assess_evaluates_the_smoothed_predictor_of_a_smoothing_checkpoint(smoothing_run):
    cfg, out, result = smoothing_run
    record = result.history[result.best_epoch - 1]
    sel = assess(out, split="selection", attacks=["noise"])
    assert sel.config["adversary"] == "smoothing" and sel.config["smooth_samples"] == 2
    assert sel.clean["nmse"] == pytest.approx(record.val_nmse, rel=1e-6)  # the smoothed predictor's, as in training
    rep = assess(out)  # the held-out report split, its attacks through the smoothed predictor
    final = result.history[-1].report
    assert rep.clean["nmse"] == pytest.approx(final["clean"]["nmse"], rel=1e-6)
    got = {(row["attack"], row["budget"]): row["nmse"] for row in rep.rows}
    want = {(row["attack"], row["budget"]): row["nmse"] for row in final["robustness"]}
    assert got.keys() == want.keys() and got == pytest.approx(want, rel=1e-6)
