"""The unrolled reconstructor (mriadv.models.unrolled): its data consistency against the closed form, and
``arch=unrolled`` end to end: config refusals, the one forward call, k-space PGD against hard data
consistency, and a tiny fit that round-trips through best.pt and assess."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from mriadv import choices
from mriadv.assess import assess, main
from mriadv.attacks import PGDAttack
from mriadv.checkpoint import BEST_NAME, load_checkpoint
from mriadv.config import ConfigError, TrainConfig
from mriadv.data.transforms import Batch, concat, image_from_normalized_kspace
from mriadv.fft import fft2c
from mriadv.fit import PREVIEW_NAME, fit
from mriadv.models import UNet
from mriadv.models.unrolled import UnrolledNet, data_consistency
from mriadv.perturbations import perturbed_batch, reconstruct, squared_norm
from mriadv.runtime import Runtime
from mriadv.trainer import build_reconstructor


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


# --- arch=unrolled end to end --------------------------------------------------------------------------
UNROLLED = dict(arch="unrolled", perturbation="kspace", attacks=("pgd_kspace",))


def _batch(seed: int = 0, b: int = 2, h: int = 16, w: int = 12, crop: int = 8) -> Batch:
    """A batch whose image is the zero-filled input of its measurements (as UnetTransform's)."""
    _, y, mask = _problem(seed, b, h, w)
    mean, std = torch.rand(b) + 0.1, torch.ones(b)
    image = image_from_normalized_kspace(y, mean, std, (crop, crop), clamp=6.0)
    return Batch(
        image=image,
        target=image + 0.1 * torch.randn(image.shape, generator=torch.Generator().manual_seed(seed)),
        mean=mean,
        std=std,
        max_value=torch.full((b,), 6.0),
        fnames=[f"f{i}.h5" for i in range(b)],
        slice_nums=torch.arange(b),
        kspace=y,
        mask=mask,
    )


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"attacks": ("pgd_kspace",)}, "config key 'perturbation' = 'image': arch=unrolled reconstructs from the"),
        (
            {"perturbation": "kspace", "attacks": ("pgd_kspace", "pgd")},
            "config key 'attacks': arch=unrolled reconstructs from the measurements: attack 'pgd' perturbs the "
            "image; use 'pgd_kspace'",
        ),
        ({"perturbation": "kspace", "attacks": ("noise",)}, "attack 'noise' perturbs the image"),
        ({"epsilon": 0.0, "attacks": ("pgd_kspace", "generator")}, "attack 'generator' perturbs the image"),
        ({**UNROLLED, "report_protocol": "seed"}, "config key 'report_protocol' = 'seed': arch=unrolled"),
        ({**UNROLLED, "residual": True}, "config key 'residual' = True: is the U-Net's"),
        ({**UNROLLED, "unroll_cascades": 0}, "config key 'unroll_cascades' = 0: must be an integer >= 1"),
        ({**UNROLLED, "unroll_pools": -1}, "config key 'unroll_pools' = -1: must be an integer >= 0"),
    ],
)
def test_unrolled_config_refuses_what_perturbs_the_image_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig.from_dict({"arch": "unrolled", **overrides})


def test_unrolled_config_takes_kspace_attacks_and_builds_each_arch():
    assert TrainConfig().arch == "unet"  # and the U-Net takes every attack, as before
    assert TrainConfig.from_dict({**UNROLLED, "attacks": ("pgd_kspace", "generator")}).arch == "unrolled"
    assert TrainConfig.from_dict({"arch": "unrolled", "epsilon": 0.0, "attacks": ("pgd_kspace",)}).arch == "unrolled"
    with pytest.raises(ConfigError, match="config key 'arch'"):
        TrainConfig.from_dict({"arch": "unlisted"})
    small = dict(crop_size=8, unet_chans=2, unet_pools=1, unroll_chans=2, unroll_pools=1, unroll_share=True)
    for arch in choices.ARCHS:
        net = build_reconstructor(TrainConfig.from_dict({**UNROLLED, **small, "arch": arch}))
        assert net.takes_measurements == (arch == "unrolled")
    assert len(build_reconstructor(TrainConfig.from_dict({**UNROLLED, **small})).denoisers) == 1
    with pytest.raises(ValueError, match="unknown arch"):
        build_reconstructor(replace(TrainConfig(), arch="unlisted"))


@pytest.mark.parametrize("channels_last", [False, True])
def test_reconstruct_of_a_unet_is_the_old_call(channels_last):
    torch.manual_seed(0)
    unet, batch = UNet(1, 1, 4, 1).eval(), _batch()
    runtime = replace(Runtime.resolve("cpu", "fp32"), channels_last=channels_last)
    with torch.no_grad():
        assert torch.equal(reconstruct(unet, runtime, batch), unet(runtime.image(batch.image)))
        batch.kspace = None  # the U-Net never reads the measurements
        assert torch.equal(reconstruct(unet, runtime, batch), unet(runtime.image(batch.image)))


def test_perturbed_batches_carry_the_perturbed_measurements_or_none():
    batch, net = _batch(), UnrolledNet(cascades=1, chans=2, num_pools=1, crop=8)
    runtime = Runtime.resolve("cpu", "fp32")
    delta = 0.1 * batch.kspace
    moved = perturbed_batch(batch, delta, "kspace", 6.0)
    assert torch.equal(moved.kspace, batch.kspace + delta) and not torch.equal(moved.image, batch.image)
    pixels = perturbed_batch(batch, torch.ones_like(batch.image), "image", 6.0)
    assert pixels.kspace is None and torch.equal(pixels.image, batch.image + 1)
    with pytest.raises(ValueError, match="takes the measurements, and the batch carries none"):
        reconstruct(net, runtime, pixels)  # never silently the clean measurements
    both = concat(batch, moved)
    assert torch.equal(both.kspace, torch.cat([batch.kspace, moved.kspace])) and both.fnames == batch.fnames * 2
    assert torch.equal(both.mask, batch.mask.repeat(2, 1)) and concat(batch, pixels).kspace is None
    with torch.no_grad():
        assert torch.equal(reconstruct(net, runtime, both)[2:], reconstruct(net, runtime, moved))


def test_kspace_pgd_against_hard_data_consistency_moves_the_output_by_at_least_the_perturbation():
    """With lambda -> 0 the sampled columns of the output's k-space are the perturbed measurements y + delta,
    so the output over the whole grid moves by at least ||M delta|| (F is orthonormal)."""
    torch.manual_seed(0)
    net = UnrolledNet(cascades=2, chans=4, num_pools=1, crop=8).eval()
    with torch.no_grad():
        net.rho.fill_(-40.0)  # softplus(-40) ~ 4e-18: hard data consistency
    batch, runtime = _batch(3), Runtime.resolve("cpu", "fp32")
    out = PGDAttack(float("nan"), steps=3, domain="kspace", rel=0.2)(net, batch, runtime)
    delta, y, mask = out.delta, batch.kspace, batch.mask[:, None, :].expand_as(batch.kspace)
    assert torch.equal(out.batch.kspace, y + delta) and (squared_norm(delta) > 0).all()
    with torch.no_grad():
        x = net(out.batch.kspace, batch.mask, batch.mean, batch.std, full=True)
        x0 = net(y, batch.mask, batch.mean, batch.std, full=True)
    k = fft2c(x)
    assert torch.allclose(k[mask], (y + delta)[mask], atol=1e-5)
    floor = squared_norm(delta * mask).sqrt()  # ||M delta||: delta lives on the sampled columns already
    assert torch.allclose(floor, squared_norm(delta).sqrt())
    assert ((x - x0).abs().pow(2).flatten(1).sum(1).sqrt() >= floor * (1 - 1e-5)).all()


@pytest.fixture(scope="module")
def unrolled_run(tiny_config, synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("unrolled")
    cfg = tiny_config(
        synthetic_root,
        **UNROLLED,
        adversary="pgd",
        adv_steps=1,
        unroll_cascades=2,
        unroll_chans=4,
        unroll_pools=1,
        loss="mse",
        attack_budgets=(20.0,),
        pgd_steps=2,
        train_eval_volumes=0,
        max_epochs=2,
        max_train_batches=3,
        threads=1,
    )
    return out, fit(cfg, out_dir=out, log=None)


def test_unrolled_fit_round_trips_through_best_pt_and_assess(unrolled_run, tmp_path):
    out, result = unrolled_run
    assert result.status == "completed" and all(np.isfinite(r.train_loss) for r in result.history)
    payload = load_checkpoint(out / BEST_NAME)
    net = build_reconstructor(TrainConfig.from_dict(payload["config"]))
    assert isinstance(net, UnrolledNet) and net.cascades == 2 and len(net.denoisers) == 2
    net.load_state_dict(payload["networks"]["recon"])  # every weight, lambda too, and nothing else
    final = result.history[-1].report
    assert final["epoch"] == result.best_epoch and final["features"] is not None and final["sampling"]
    assert {r["attack"] for r in final["robustness"]} == {"pgd_kspace"}
    assert {"pgd_delta", "pgd_recon"} <= set(np.load(out / PREVIEW_NAME).files)  # the preview's PGD in k-space
    rep = assess(out)  # best.pt on the report split
    assert rep.clean["nmse"] == pytest.approx(final["clean"]["nmse"], rel=1e-6)
    got = {(r["attack"], r["budget"]): r["nmse"] for r in rep.rows}
    want = {(r["attack"], r["budget"]): r["nmse"] for r in final["robustness"]}
    assert got.keys() == want.keys() and got == pytest.approx(want, rel=1e-6)
    assert main([str(out), "--instabilities", "--out", str(tmp_path / "a.json")]) == 0  # the CLI, with types 2 and 3
    cli = json.loads((tmp_path / "a.json").read_text())
    assert cli["clean"]["nmse"] == pytest.approx(rep.clean["nmse"], rel=1e-6)
    assert cli["features"]["worst"]["error"] == pytest.approx(final["features"]["worst"]["error"], rel=1e-6)
    assert [r["nmse"] for r in cli["sampling"]] == pytest.approx([r["nmse"] for r in final["sampling"]], rel=1e-6)
    with pytest.raises(ConfigError, match="attack 'pgd' perturbs the image"):
        assess(out, attacks=["pgd"])
    with pytest.raises(ConfigError, match="protocol 'seed': arch=unrolled .* attack 'pgd' perturbs the image"):
        assess(out, protocol="seed")
