"""k-space budgets (issue 19, item 4): an absolute budget ``epsilon`` at crop ``c`` bounds a k-space
perturbation by the relative energy ``||delta||^2 <= (epsilon / c^2) ||y||^2`` of the slice's sampled
k-space ``y``, so one 320x320 budget gives the same k-space energy at every crop. Checked on a file in
fastMRI's real geometry (640 x 368 k-space, 320x320 target) read at crops 96 and 320, against closed
forms computed from the file itself."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch

from mriadv.attacks import GeneratorAttack, NoiseAttack, PGDAttack
from mriadv.config import get_profile
from mriadv.data.files import SliceDataset
from mriadv.data.masks import RandomMaskFunc
from mriadv.data.synthetic import SyntheticSpec, synthesize_volume, write_volume
from mriadv.data.transforms import NORM_EPS, Batch, UnetTransform, collate
from mriadv.models import UNet
from mriadv.perturbations import budget_per_slice, hinge, squared_norm
from mriadv.runtime import Runtime
from mriadv.trainer import GEN_HEADROOM, Trainer
from mriadv.units import REFERENCE_CROP, epsilon_rms, relative_energy, scale_epsilon

CPU = Runtime.resolve("cpu", "fp32")
REF_BUDGET = 1000.0  # ||delta||^2 at 320x320, the seed's units
ZETA = REF_BUDGET / 320**2  # the relative k-space energy ||delta||^2 / ||y||^2 it must give at any crop
CROPS = (96, 320)
NAME = "file1000000.h5"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """One volume of 2 slices in fastMRI's knee geometry: k-space (2, 640, 368), targets (2, 320, 320)."""
    out = tmp_path_factory.mktemp("fastmri_geometry")
    write_volume(out / NAME, synthesize_volume(SyntheticSpec(volumes=1, val_volumes=1, slices=2, size=320), 1, 0))
    with h5py.File(out / NAME, "r") as f:
        assert f["kspace"].shape == (2, 640, 368) and f["reconstruction_esc"].shape == (2, 320, 320)
    return out


@pytest.fixture(scope="module")
def batches(folder) -> dict[int, Batch]:
    """Both slices at each crop, with fixed (validation) masks: the same columns at every crop."""
    out = {}
    for crop in CROPS:
        transform = UnetTransform(RandomMaskFunc(), crop, train=False, keep_kspace=True)
        ds = SliceDataset(folder, "val", transform, crop_size=crop)
        out[crop] = collate([ds[0], ds[1]])
    assert torch.equal(out[96].mask, out[320].mask)
    return out


@pytest.fixture(scope="module")
def raw_energy(folder, batches) -> torch.Tensor:
    """``||P k||^2`` per slice in the file's own units (float64), from the file and the mask."""
    with h5py.File(folder / NAME, "r") as f:
        k = f["kspace"][()].astype(np.complex128)
    mask = batches[96].mask.numpy()[:, None, :]
    return torch.from_numpy((np.abs(k * mask) ** 2).sum((1, 2)))


def scale2(batch: Batch) -> torch.Tensor:
    """``(std + eps)^2`` per slice: normalised k-space energy times this is energy in file units."""
    return (batch.std.double() + NORM_EPS) ** 2


def y_energy(batch: Batch) -> torch.Tensor:
    """``||y||^2`` per slice (float64): the normalised masked k-space the batch carries."""
    return (batch.kspace.abs().double() ** 2).sum((1, 2))


def tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet(1, 1, 4, 2).eval()


# ---------------------------------------------------------------------------------------------
# the conversion
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("crop", [32, 64, 96, 128, 320, 384])
def test_relative_energy_of_a_scaled_budget_is_the_same_at_every_crop(crop):
    eps = scale_epsilon(REF_BUDGET, crop)
    assert relative_energy(eps, crop) == pytest.approx(ZETA, rel=1e-12)
    assert relative_energy(eps, (crop, crop)) == relative_energy(eps, crop)
    assert relative_energy(7.0, (4, 5)) == pytest.approx(7.0 / 20)
    assert epsilon_rms(eps, crop) == pytest.approx(math.sqrt(REF_BUDGET) / REFERENCE_CROP, rel=1e-12)


def test_budget_per_slice_is_the_relative_energy_of_the_sampled_kspace(batches, raw_energy):
    for crop, b in batches.items():
        eps = scale_epsilon(REF_BUDGET, crop)
        assert budget_per_slice(b, eps, "image") == eps  # the number itself: the image path is unchanged
        expected = ZETA * raw_energy / scale2(b)  # (eps / c^2) ||y||^2, y = P k / (std + eps)
        assert torch.allclose(budget_per_slice(b, eps, "kspace").double(), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="domain"):
        budget_per_slice(batches[96], 1.0, "phase")


# ---------------------------------------------------------------------------------------------
# attacks
# ---------------------------------------------------------------------------------------------
def test_kspace_noise_puts_the_same_energy_into_kspace_at_every_crop(batches, raw_energy):
    delivered, old = {}, {}
    for crop, b in batches.items():
        eps = scale_epsilon(REF_BUDGET, crop)
        out = NoiseAttack(eps, "noise_kspace", domain="kspace")(tiny_unet(), b, CPU)
        assert torch.allclose(y_energy(b), raw_energy / scale2(b), rtol=1e-5)
        assert torch.allclose(
            out.delta_sq.double() / y_energy(b), torch.full((2,), ZETA, dtype=torch.float64), rtol=1e-5
        )
        assert torch.allclose(out.relative.double(), torch.full((2,), math.sqrt(ZETA), dtype=torch.float64), rtol=1e-5)
        assert torch.all(out.delta[~b.mask[:, None, :].expand_as(out.delta)] == 0)  # acquired columns only
        delivered[crop] = out.delta_sq.double() * scale2(b)  # in the file's units
        old[crop] = eps * scale2(b)  # the old rule, ||delta||^2 = eps at the crop, in the file's units
    for crop in CROPS:
        assert torch.allclose(delivered[crop], ZETA * raw_energy, rtol=1e-5)
    # the old rule gave a crop-dependent energy: (96/320)^2 times the ratio of the crops' normalisations
    ratio = old[96] / old[320]
    expected = (96 / 320) ** 2 * scale2(batches[96]) / scale2(batches[320])
    assert torch.allclose(ratio, expected, rtol=1e-12)
    assert torch.all((ratio < 0.5) | (ratio > 2.0))


@pytest.mark.parametrize("steps", [1, 3])
def test_kspace_pgd_budget_is_the_relative_energy_at_every_crop(batches, raw_energy, steps):
    """One step of 2.5 r from delta = 0 overshoots and is projected onto the sphere ||delta|| = r: the
    delivered energy is exactly the budget; with more steps it stays inside the ball."""
    model = tiny_unet()
    for crop, b in batches.items():
        out = PGDAttack(scale_epsilon(REF_BUDGET, crop), steps=steps, domain="kspace")(model, b, CPU)
        rel = out.delta_sq.double() / y_energy(b)
        assert torch.all(rel <= ZETA * (1 + 1e-4)) and torch.all(rel > 0)
        assert torch.allclose(out.relative.double(), rel.sqrt(), rtol=1e-5)
        assert torch.all(out.delta[~b.mask[:, None, :].expand_as(out.delta)] == 0)
        if steps == 1:
            assert torch.allclose(rel, torch.full((2,), ZETA, dtype=torch.float64), rtol=1e-4)
            assert torch.allclose(out.delta_sq.double() * scale2(b), ZETA * raw_energy, rtol=1e-4)


def test_kspace_generator_attack_is_rescaled_to_the_relative_energy(batches):
    for crop, b in batches.items():

        def perturb(batch: Batch) -> torch.Tensor:  # a fixed direction on the acquired columns
            ones = torch.ones(batch.kspace.shape)
            return torch.complex(ones, -ones) * batch.mask[:, None, :]

        out = GeneratorAttack(scale_epsilon(REF_BUDGET, crop), perturb, domain="kspace")(tiny_unet(), b, CPU)
        assert torch.allclose(
            out.delta_sq.double() / y_energy(b), torch.full((2,), ZETA, dtype=torch.float64), rtol=1e-5
        )
        assert torch.allclose(out.relative.double(), torch.full((2,), math.sqrt(ZETA), dtype=torch.float64), rtol=1e-5)


def test_image_budgets_are_unchanged(batches):
    model = tiny_unet()
    for crop, b in batches.items():
        eps = scale_epsilon(REF_BUDGET, crop)
        noise = NoiseAttack(eps)(model, b, CPU)
        pgd = PGDAttack(eps, steps=1)(model, b, CPU)
        for out in (noise, pgd):
            assert torch.allclose(out.delta_sq, torch.full((2,), eps), rtol=1e-5)  # ||delta||^2 = eps


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def kspace_trainer(**kw) -> Trainer:
    crop = 96
    cfg = get_profile("smoke").config(
        crop_size=crop, epsilon=scale_epsilon(REF_BUDGET, crop), perturbation="kspace", loss="mse", device="cpu", **kw
    )
    torch.manual_seed(0)
    return Trainer(cfg, CPU)


def slice_budgets(b: Batch) -> torch.Tensor:
    return ZETA * y_energy(b)  # (eps / c^2) ||y||^2 per slice, eps / c^2 = ZETA


@pytest.mark.parametrize("scope", ["image", "batch"])
def test_generator_projection_is_onto_the_per_slice_kspace_ball(batches, scope):
    b = batches[96]
    tr = kspace_trainer(gen_scale="unit", project=True, epsilon_scope=scope)  # raw tanh: far outside the ball
    with torch.no_grad():
        sq = squared_norm(tr.perturbation(b, None)).double()
    if scope == "image":
        assert torch.allclose(sq, slice_budgets(b), rtol=1e-4)
        assert tr.train_step(b)["over_budget"] == 0.0  # on the sphere, up to rounding: inside
    else:  # the batch's norm against the sum of its slices' budgets
        assert float(sq.sum()) == pytest.approx(float(slice_budgets(b).sum()), rel=1e-4)


def test_hinge_takes_a_budget_per_slice():
    delta = torch.zeros(2, 3, 4, dtype=torch.complex64)
    delta[0, 0, 0], delta[1, 0, 0] = 2.0, 1j  # ||delta||^2 = 4, 1
    budget = torch.tensor([1.0, 2.0])
    assert float(hinge(delta, budget, "image")) == pytest.approx((3.0 + 0.0) / 2)
    assert float(hinge(delta, budget, "batch")) == pytest.approx(5.0 - 3.0)
    assert float(hinge(delta, torch.tensor([5.0, 0.5]), "batch")) == 0.0


@pytest.mark.parametrize("scope", ["image", "batch"])
def test_generator_step_hinge_is_against_the_per_slice_kspace_budget(batches, scope):
    b = batches[96]
    tr = kspace_trainer(gen_scale="unit", epsilon_scope=scope)
    tr.generator.train()
    with torch.no_grad():
        sq = squared_norm(tr.perturbation(b, None)).double()
    expected = (sq - slice_budgets(b)).clamp_min(0).mean() if scope == "image" else (sq - slice_budgets(b)).sum()
    stats = tr.generator_step(b, None)
    assert float(expected) > 0
    assert float(stats["hinge"]) == pytest.approx(float(max(expected, 0.0)), rel=1e-4)


def test_budget_output_scale_is_per_slice(batches):
    b = batches[96]
    tr = kspace_trainer()
    delta = torch.ones(b.kspace.shape, dtype=torch.complex64)
    cols = b.mask.double().sum(1)
    expected = (GEN_HEADROOM * slice_budgets(b) / (2 * 640 * cols)).sqrt()
    assert torch.allclose(tr.output_scale(b, delta).flatten().double(), expected, rtol=1e-5)


def test_noise_and_pgd_training_perturbations_have_the_per_slice_budget(batches):
    b = batches[96]
    tr = kspace_trainer(adversary="noise")
    delta = tr.noise_perturbation(b)
    assert torch.allclose(squared_norm(delta).double(), slice_budgets(b), rtol=1e-5)  # on the sphere
    stats = tr.train_step(b)
    assert stats["over_budget"] == 0.0
    assert stats["delta_sq"] == pytest.approx(float(slice_budgets(b).mean()), rel=1e-5)
    assert stats["delta_sq_budget"] == pytest.approx(1.0, rel=1e-5)  # each slice at its own budget
    assert stats["delta_sq"] / tr.cfg.epsilon != pytest.approx(1.0, rel=0.05)  # what Table 1 divided by before
    sigma = kspace_trainer(adversary="noise", noise_mode="sigma")
    # i.i.d. sigma^2 = budget / n over n = 2 * 640 * cols real components: ||delta||^2 / budget ~ 1 +- sqrt(2/n)
    sq = squared_norm(sigma.noise_perturbation(b)).double()
    assert torch.allclose(sq / slice_budgets(b), torch.ones(2, dtype=torch.float64), atol=0.03)
    pgd = kspace_trainer(adversary="pgd", adv_steps=1)
    assert torch.allclose(squared_norm(pgd.attack_perturbation(b)).double(), slice_budgets(b), rtol=1e-4)
    pgd_stats = pgd.train_step(b)
    assert pgd_stats["over_budget"] == 0.0 and pgd_stats["delta_sq_budget"] == pytest.approx(1.0, rel=1e-4)
