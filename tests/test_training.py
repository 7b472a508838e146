"""The min-max trainer: Algorithm 1's two steps, the hinge and projection, fit, resume, NaN stop."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch

from mriadv.attacks import PGDAttack
from mriadv.perturbations import budget_per_slice, hinge, project_l2, squared_norm
from mriadv.config import ConfigError, TrainConfig
from mriadv.data.transforms import Batch
from mriadv.checkpoint import BEST_NAME, CHECKPOINT_NAME, Checkpoint, load_checkpoint
from mriadv.fit import EarlyStopping, fit
from mriadv.runtime import Runtime
from mriadv.trainer import Trainer

CPU = Runtime.resolve("cpu", "fp32")


def tiny(**kw) -> TrainConfig:
    base = dict(
        crop_size=32,
        unet_chans=4,
        unet_pools=2,
        gen_chans=4,
        batch_size=2,
        epsilon=20.0,
        loss="mse",
        attack_budgets=(20.0,),
        pgd_steps=2,
        train_eval_volumes=1,
        max_epochs=2,
        device="cpu",
    )
    return TrainConfig.from_dict({**base, **kw})


def fake_batch(b=2, size=32, seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(b, 1, size, size, generator=g)
    return Batch(
        image=target + 0.3 * torch.randn(b, 1, size, size, generator=g),
        target=target,
        mean=torch.zeros(b),
        std=torch.ones(b),
        max_value=torch.full((b,), 3.0),
        fnames=[f"f{i}.h5" for i in range(b)],
        slice_nums=torch.arange(b),
    )


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_generator_step_leaves_reconstructor_unchanged():
    tr = Trainer(tiny(), CPU)
    theta, phi = params(tr.recon), params(tr.generator)
    batch = fake_batch()
    tr.generator_step(batch, tr.draw_latent(2))
    assert same(theta, params(tr.recon))
    assert all(p.grad is None for p in tr.recon.parameters())  # no gradient reached theta at all
    assert not same(phi, params(tr.generator))


def test_reconstructor_step_leaves_generator_unchanged():
    tr = Trainer(tiny(), CPU)
    batch = fake_batch()
    with torch.no_grad():
        delta = tr.perturbation(batch, tr.draw_latent(2))
    theta, phi = params(tr.recon), params(tr.generator)
    tr.reconstructor_step(batch, delta)
    assert same(phi, params(tr.generator))
    assert not same(theta, params(tr.recon))


def test_reconstructor_objective_is_clean_plus_lambda1_perturbed():
    tr = Trainer(tiny(lambda1=3.0), CPU)
    batch = fake_batch()
    delta = 0.1 * torch.ones_like(batch.image)
    with torch.no_grad():
        clean = torch.mean((tr.recon(batch.image) - batch.target) ** 2)
        pert = torch.mean((tr.recon(batch.image + delta) - batch.target) ** 2)
    stats = tr.reconstructor_step(batch, delta)
    assert float(stats["recon_loss"]) == pytest.approx(float(clean + 3.0 * pert), rel=1e-5)


def test_hinge_zero_inside_budget_and_linear_outside():
    delta = torch.zeros(2, 1, 4, 4)
    delta[0, 0, 0, 0] = 3.0  # ||.||^2 = 9
    delta[1, 0, 0, :2] = 1.0  # ||.||^2 = 2
    assert float(hinge(delta, 10.0)) == 0.0
    assert float(hinge(delta, 5.0)) == pytest.approx((9 - 5) / 2)  # mean over the batch of max(0, n - eps)
    assert float(hinge(delta, 1.0)) == pytest.approx(((9 - 1) + (2 - 1)) / 2)
    # the seed's code: the whole batch's norm against B * eps
    assert float(hinge(delta, 5.0, scope="batch")) == pytest.approx(max(0.0, 11 - 10))


def test_projection_onto_the_epsilon_ball():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(4, 1, 8, 8, generator=g) * torch.tensor([0.1, 1.0, 3.0, 10.0]).view(4, 1, 1, 1)
    out = project_l2(delta, 10.0)
    sq = squared_norm(out)
    assert torch.all(sq <= 10.0 * (1 + 1e-5))
    inside = squared_norm(delta) <= 10.0
    assert torch.equal(out[inside], delta[inside])  # points inside the ball do not move
    torch.testing.assert_close(sq[~inside], torch.full_like(sq[~inside], 10.0))  # others land on the sphere
    kd = torch.randn(3, 6, 5, dtype=torch.complex64, generator=g) * 5
    assert torch.all(squared_norm(project_l2(kd, 2.0)) <= 2.0 * (1 + 1e-5))


def test_project_option_bounds_generator_output():
    tr = Trainer(tiny(project=True, epsilon=0.5), CPU)
    delta = tr.perturbation(fake_batch(), tr.draw_latent(2))
    assert torch.all(squared_norm(delta) <= 0.5 * (1 + 1e-5))


def test_epsilon_zero_is_standard_training():
    tr = Trainer(tiny(epsilon=0.0), CPU)
    assert tr.generator is None and tr.opt_gen is None and not tr.attacks()[-1].name == "generator"
    stats = tr.train_step(fake_batch())
    assert set(stats) == {"recon_loss", "clean_loss", "pert_loss"}


def test_kspace_perturbation_steps():
    cfg = tiny(perturbation="kspace", epsilon=5.0)
    tr = Trainer(cfg, CPU)
    b = fake_batch()
    k = torch.randn(2, 64, 40, dtype=torch.complex64)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[:, 15:25] = True
    b.kspace, b.mask = k * mask[:, None, :], mask
    delta = tr.perturbation(b, None)
    assert delta.shape == (2, 64, 40) and delta.is_complex()
    assert torch.all(delta[..., :15] == 0) and torch.all(delta[..., 25:] == 0)  # only acquired columns
    theta = params(tr.recon)
    tr.generator_step(b, None)
    assert same(theta, params(tr.recon))


def batch_norms(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]


@pytest.mark.parametrize("domain", ["image", "kspace"])
def test_batch_norm_statistics_follow_each_training_step_once(domain):
    """Issue 21, 6e: with ``unet_norm=batch`` the reconstructor's running statistics follow only the
    reconstructor step's clean + perturbed batch (2B; the generator step runs it in eval mode, as PGD
    does), and the generator's batch norm is updated once per training step (by its own step)."""
    tr = Trainer(tiny(unet_norm="batch", perturbation=domain, epsilon=5.0), CPU)
    batch = fake_batch()
    if domain == "kspace":
        mask = torch.zeros(2, 40, dtype=torch.bool)
        mask[:, 15:25] = True
        batch.kspace, batch.mask = torch.randn(2, 64, 40, dtype=torch.complex64) * mask[:, None, :], mask
    recon_bn, gen_bn = batch_norms(tr.recon), batch_norms(tr.generator)
    assert recon_bn and gen_bn
    first = recon_bn[0]
    seen = []  # the inputs of the first batch-norm layer of the reconstructor in training mode
    first.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()) if m.training else None)
    expected = first.running_mean.clone()
    for step in (1, 2, 3):
        seen.clear()
        tr.train_step(batch)
        assert [x.shape[0] for x in seen] == [2 * len(batch)]  # one forward in training mode: clean + perturbed
        # the running mean after the step, computed from that forward alone: PyTorch's momentum update
        expected = (1 - first.momentum) * expected + first.momentum * seen[0].mean(dim=(0, 2, 3))
        assert torch.allclose(first.running_mean, expected, rtol=1e-5, atol=1e-7)
        assert [int(m.num_batches_tracked) for m in recon_bn] == [step] * len(recon_bn)
        assert [int(m.num_batches_tracked) for m in gen_bn] == [step] * len(gen_bn)
    assert tr.recon.training and tr.generator.training
    tr.recon.train(False)
    tr.generator_step(batch, tr.draw_latent(2))
    assert not tr.recon.training  # the caller's mode, restored


def test_running_stats_kept_gives_the_training_output_and_updates_nothing():
    """How the reconstructor step's delta is made: the updated generator in training mode (batch
    statistics, as in its own step) without a second update of its running statistics."""
    from mriadv.models.utils import running_stats_kept

    tr = Trainer(tiny(), CPU)
    z = tr.draw_latent(2)
    tr.generator_step(fake_batch(), z)
    before = {k: v.clone() for k, v in tr.generator.state_dict().items()}
    with torch.no_grad(), running_stats_kept(tr.generator):
        kept = tr.generator(z)
    assert all(torch.equal(v, tr.generator.state_dict()[k]) for k, v in before.items())
    assert all(m.track_running_stats for m in batch_norms(tr.generator))  # restored
    with torch.no_grad():
        plain = tr.generator(z)  # training mode as it is: the same output, and one more running update
    assert torch.equal(kept, plain)
    assert not all(torch.equal(v, tr.generator.state_dict()[k]) for k, v in before.items())


def test_pgd_increases_error_and_respects_budget():
    torch.manual_seed(0)
    tr = Trainer(tiny(epsilon=0.0), CPU)
    batch = fake_batch()
    for budget in (1.0, 20.0):
        attack = PGDAttack(budget, steps=5)
        out = attack(tr.recon, batch, CPU)
        assert torch.all(out.delta_sq <= budget * (1 + 1e-4))
        with torch.no_grad():
            clean = torch.mean((tr.recon(batch.image) - batch.target) ** 2)
            attacked = torch.mean((tr.recon(out.inputs) - batch.target) ** 2)
        assert attacked > clean
    assert all(p.requires_grad for p in tr.recon.parameters())  # restored after the attack


def test_kspace_pgd_respects_budget_and_acquired_columns(synthetic_root):
    from mriadv.data.files import SliceDataset
    from mriadv.data.masks import RandomMaskFunc
    from mriadv.data.transforms import UnetTransform, collate

    torch.manual_seed(0)
    ds = SliceDataset(
        synthetic_root, "val", UnetTransform(RandomMaskFunc(), 64, train=False, keep_kspace=True), crop_size=64
    )
    batch = collate([ds[0], ds[5]])
    tr = Trainer(tiny(epsilon=0.0, crop_size=64), CPU)
    attack = PGDAttack(40.0, steps=3, domain="kspace")
    out = attack(tr.recon, batch, CPU)
    budget = budget_per_slice(batch, 40.0, "kspace")  # (40 / 64^2) ||y||^2 per slice
    assert torch.all(out.delta_sq <= budget * (1 + 1e-4)) and torch.all(out.delta_sq > 0)
    assert out.delta.is_complex() and out.delta.shape == batch.kspace.shape
    assert torch.all(out.delta[~batch.mask[:, None, :].expand_as(out.delta)] == 0)  # only measured columns
    with torch.no_grad():
        clean = torch.mean((tr.recon(batch.image) - batch.target) ** 2)
        attacked = torch.mean((tr.recon(out.inputs) - batch.target) ** 2)
    assert attacked > clean


@pytest.mark.parametrize(
    "key,value",
    [
        ("epsilon", -1.0),
        ("lr_recon", 0.0),
        ("lr_gen", -1e-4),
        ("patience", 0),
        ("batch_size", 0),
        ("loss", "l1"),
        ("perturbation", "phase"),
        ("attack_budgets", (0.0,)),
        ("center_fraction", 1.5),
    ],
)
def test_bad_config_values_are_rejected_by_name(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        TrainConfig.from_dict({key: value})


def test_unknown_config_key_is_rejected():
    with pytest.raises(ConfigError, match="lr_recn"):
        TrainConfig.from_dict({"lr_recn": 1e-3})


# ----------------------------------------------------------------------------------------------
# fit on synthetic data
# ----------------------------------------------------------------------------------------------
def smoke_cfg(root, **kw) -> TrainConfig:
    return tiny(data=str(root), crop_size=64, **kw)


def test_smoke_fit_lowers_training_loss(synthetic_root, tmp_path):
    records = []
    res = fit(
        smoke_cfg(synthetic_root, max_epochs=4, lr_recon=1e-3),
        out_dir=tmp_path,
        on_epoch=lambda r, p: records.append((r, p)),
        log=None,
    )
    assert res.status == "completed" and len(records) == 4
    losses = [r.train_loss for r, _ in records]
    assert losses[-1] < losses[0]
    r = records[-1][0]
    assert r.epsilon_rms == pytest.approx((20.0 / 64**2) ** 0.5)
    assert {row["attack"] for row in r.robustness} == {"pgd", "noise", "generator"}
    flat = r.flat()
    assert "rob_pgd_e500_nmse" in flat and flat["rob_pgd_e500_nmse"] >= flat["val_nmse"]
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # loadable without pickle code
    assert ckpt["epoch"] == 4 and len(ckpt["history"]) == 4


def test_resume_equals_uninterrupted_run(synthetic_root, tmp_path):
    """Bit for bit on CPU, where this runs; on a GPU only with deterministic=true (README: determinism)."""
    cfg = smoke_cfg(synthetic_root, max_epochs=2, max_train_batches=3)
    full = fit(cfg, out_dir=tmp_path / "full", log=None)
    first = fit(TrainConfig.from_dict({"max_epochs": 1}, base=cfg), out_dir=tmp_path / "part", log=None)
    assert len(first.history) == 1
    resumed = fit(cfg, out_dir=tmp_path / "part", resume_from=tmp_path / "part" / "checkpoint.pt", log=None)
    a, b = full.history[-1], resumed.history[-1]
    for key in ("train_loss", "gen_objective", "delta_sq", "val_loss", "val_nmse", "val_psnr", "val_ssim"):
        assert getattr(a, key) == getattr(b, key), key
    assert [r["nmse"] for r in a.robustness] == [r["nmse"] for r in b.robustness]
    wa = load_checkpoint(tmp_path / "full")["networks"]["recon"]
    wb = load_checkpoint(tmp_path / "part")["networks"]["recon"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_writes_best_of_the_timeline_it_continues(synthetic_root, tmp_path):
    """A run killed between an epoch's two saves (best.pt first), or resumed from an earlier
    checkpoint (a study's retry), holds a best.pt of epochs that will be run again: the resume writes
    best.pt again from its checkpoint's best networks, epoch and stopping state (issue 21.5)."""
    cfg = smoke_cfg(synthetic_root, max_epochs=1, max_train_batches=2, attacks=("noise",), instabilities=False)
    fit(cfg, out_dir=tmp_path, log=None)
    kept = load_checkpoint(tmp_path / BEST_NAME)
    recon = kept["networks"]["recon"]
    stale = {**kept, "epoch": 2, "networks": {**kept["networks"], "recon": {k: v + 1 for k, v in recon.items()}}}
    torch.save(stale, tmp_path / BEST_NAME)  # the lost timeline's epoch 2, "best"
    fit(cfg, out_dir=tmp_path, resume_from=tmp_path, log=None)  # nothing left to run: only the rewrite
    best = load_checkpoint(tmp_path / BEST_NAME)
    assert best["epoch"] == 1 and best["status"] == kept["status"]
    assert best["early_stopping"] == kept["early_stopping"] and best["config"] == kept["config"]
    assert all(torch.equal(best["networks"][n][k], v) for n in kept["networks"] for k, v in kept["networks"][n].items())


def test_resume_rejects_a_changed_config(synthetic_root, tmp_path):
    cfg = smoke_cfg(synthetic_root, max_epochs=1, max_train_batches=1, attacks=("noise",))
    fit(cfg, out_dir=tmp_path, log=None)
    with pytest.raises(ConfigError, match="lambda1"):
        fit(
            TrainConfig.from_dict({"lambda1": 2.0, "max_epochs": 2}, base=cfg),
            out_dir=tmp_path,
            resume_from=tmp_path,
            log=None,
        )


def test_best_and_last_checkpoint_share_one_shape(synthetic_root, tmp_path):
    cfg = smoke_cfg(
        synthetic_root, max_epochs=1, max_train_batches=1, attacks=("noise",), train_eval_volumes=0, instabilities=False
    )
    fit(cfg, out_dir=tmp_path, log=None)
    best, last = load_checkpoint(tmp_path / BEST_NAME), load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert set(best) == set(last) == set(Checkpoint.__annotations__)
    assert set(best["networks"]) == set(last["networks"]) == {"recon", "generator"}
    recon = best["networks"]["recon"]  # one epoch: the best epoch is the last one
    assert all(torch.equal(recon[k], last["networks"]["recon"][k]) for k in recon)
    assert best["trainer"] is None and best["history"] == [] and last["trainer"] is not None
    assert EarlyStopping(**last["early_stopping"]) == EarlyStopping(last["history"][0]["val_loss"], 1, 0)
    # the first format-2 files (networks at best.pt's top level, inside checkpoint.pt's "trainer") load as the one shape
    old_best = {"format": 2, "config": best["config"], "epoch": best["epoch"], **best["networks"]}
    old_last = {k: v for k, v in last.items() if k != "networks"} | {"trainer": {**last["trainer"], **last["networks"]}}
    for old, new in ((old_best, best), (old_last, last)):
        torch.save(old, tmp_path / "old.pt")
        again = load_checkpoint(tmp_path / "old.pt")
        assert set(again) == set(new) and set(again["trainer"] or {}) == set(new["trainer"] or {})
        assert all(torch.equal(again["networks"]["recon"][k], recon[k]) for k in recon)


def _poison(folder, split):
    for path in sorted((folder / split).glob("*.h5")):
        with h5py.File(path, "r+") as f:
            k = f["kspace"][()]
            k[:] = np.nan
            f["kspace"][...] = k


def test_nan_loss_stops_the_run_and_the_status_is_persisted(synthetic_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    _poison(data, "singlecoil_train")
    records = []
    res = fit(
        smoke_cfg(data, max_epochs=3), out_dir=tmp_path / "run", log=None, on_epoch=lambda r, p: records.append(r)
    )
    assert res.status == "nan"
    assert "not finite" in res.message or "nan" in res.message
    # the stop is a record of its own (reported like any epoch) and the checkpoint says 'nan'
    assert [r.status for r in res.history] == ["nan"] and [r.status for r in records] == ["nan"]
    assert np.isnan(records[0].val_nmse) and records[0].message == res.message
    assert load_checkpoint(tmp_path / "run")["status"] == "nan"
    # so a resume does not replay the NaN epoch: it sees a finished run
    again = fit(smoke_cfg(data, max_epochs=3), out_dir=tmp_path / "run", resume_from=tmp_path / "run", log=None)
    assert again.status == "nan" and again.message == "resumed a finished run"


def test_non_finite_validation_loss_stops_the_run(synthetic_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    _poison(data, "singlecoil_val")  # training is finite; validation is not
    res = fit(smoke_cfg(data, max_epochs=3, max_train_batches=1), out_dir=tmp_path / "run", log=None)
    assert res.status == "nan" and "validation loss" in res.message
    assert len(res.history) == 1 and res.history[0].status == "nan"
    assert load_checkpoint(tmp_path / "run")["status"] == "nan"


def test_kspace_run_on_validation_volumes_of_different_widths(synthetic_root, tmp_path):
    """Real fastMRI volumes differ in k-space width (368, 372, ...); the end-of-epoch preview must not
    collate slices of two widths into one k-space batch."""
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    wider = sorted((data / "singlecoil_val").glob("*.h5"))[1]
    with h5py.File(wider, "r+") as f:  # two zero columns more on each side, as a wider acquisition
        k = np.pad(f["kspace"][()], ((0, 0), (0, 0), (2, 2)))
        del f["kspace"]
        f["kspace"] = k
    cfg = smoke_cfg(
        data, max_epochs=1, max_train_batches=1, perturbation="kspace", report_fraction=0.0, attacks=("pgd_kspace",)
    )
    res = fit(cfg, out_dir=tmp_path / "run", log=None)
    assert res.status == "completed"
    assert (tmp_path / "run" / "preview.npz").is_file()


@pytest.mark.parametrize("crop, eps", [(32, 20.0), (32, 2000.0), (64, 90.0)])
def test_budget_scaled_generator_starts_inside_the_budget(crop, eps):
    """gen_scale='budget': a saturated output has ||delta||^2 = 2 eps, so the initial output (tanh RMS
    below 1) lies inside the ball whatever eps and crop; 'unit' is the raw tanh, independent of eps."""
    tr = Trainer(tiny(crop_size=crop, epsilon=eps), CPU)
    batch = fake_batch(4, crop)
    with torch.no_grad():
        sq = squared_norm(tr.perturbation(batch, tr.draw_latent(4)))
        raw = tr.generator(tr.draw_latent(4)).float()
    assert (sq < eps).all() and (sq > 0.05 * eps).all()
    a = tr.output_scale(batch, raw)
    assert torch.allclose(a.flatten(), torch.full((4,), (2 * eps / crop**2) ** 0.5))
    unit = Trainer(tiny(crop_size=crop, epsilon=eps, gen_scale="unit"), CPU)
    with torch.no_grad():
        assert torch.allclose(unit.perturbation(batch, unit.draw_latent(4)).abs().max(), torch.tensor(1.0), atol=0.5)


def test_cosine_schedule_matches_its_closed_form():
    tr = Trainer(tiny(lr_schedule="cosine", lr_recon=1e-3, lr_gen=2e-4), CPU)
    tr.total_steps = 10
    batch = fake_batch()
    seen = []
    for _ in range(10):
        tr.train_step(batch)
        seen.append((tr.opt_recon.param_groups[0]["lr"], tr.opt_gen.param_groups[0]["lr"]))
    for t, (lr_r, lr_g) in enumerate(seen):  # the lr used by step t (0-based)
        f = 0.5 * (1 + np.cos(np.pi * t / 10))
        assert lr_r == pytest.approx(1e-3 * f) and lr_g == pytest.approx(2e-4 * f)
    constant = Trainer(tiny(), CPU)
    constant.total_steps = 10
    constant.train_step(batch)
    assert constant.opt_recon.param_groups[0]["lr"] == pytest.approx(1e-4)


# ----------------------------------------------------------------------------------------------
# adversary kinds (issue 10)
# ----------------------------------------------------------------------------------------------
def test_conditional_generator_output_depends_on_every_input_pixel():
    from mriadv.models import ConditionalGenerator

    gen = ConditionalGenerator(1, 1, latent_dim=8, chans=4, num_pools=1).eval()  # a small U-Net: RF << 40 px
    x = torch.randn(1, 1, 40, 40, requires_grad=True)
    out = gen(x, torch.randn(1, 8))
    (grad,) = torch.autograd.grad(out[0, 0, 0, 0], x)  # one corner pixel of the output
    assert (grad.abs() > 0).all()  # ... moves with every input pixel, the far corner included


@pytest.mark.parametrize("kind", ["pgd", "noise", "conditional"])
def test_each_adversary_keeps_the_other_side_frozen(kind):
    tr = Trainer(tiny(adversary=kind, epsilon=20.0), CPU)
    batch = fake_batch()
    theta = params(tr.recon)
    if kind == "conditional":
        phi = params(tr.generator)
        tr.generator_step(batch, tr.draw_latent(2))
        assert same(theta, params(tr.recon)) and all(p.grad is None for p in tr.recon.parameters())
        assert not same(phi, params(tr.generator))
        with torch.no_grad():
            delta = tr.perturbation(batch, tr.draw_latent(2))
        phi = params(tr.generator)
        tr.reconstructor_step(batch, delta)
        assert same(phi, params(tr.generator)) and not same(theta, params(tr.recon))
        return
    assert tr.generator is None
    delta = tr.attack_perturbation(batch) if kind == "pgd" else tr.noise_perturbation(batch)
    assert same(theta, params(tr.recon)) and all(p.grad is None for p in tr.recon.parameters())
    assert (squared_norm(delta) <= 20.0 * (1 + 1e-5)).all()
    stats = tr.train_step(batch)
    assert not same(theta, params(tr.recon)) and stats["delta_sq"] > 0


def test_pgd_training_perturbation_is_worse_than_noise_of_equal_norm():
    tr = Trainer(tiny(adversary="pgd", epsilon=20.0, adv_steps=5), CPU)
    batch = fake_batch()
    pgd = tr.attack_perturbation(batch)
    noise = tr.noise_perturbation(batch)
    assert squared_norm(noise) == pytest.approx(torch.full((2,), 20.0), rel=1e-5)  # jittering on the sphere
    with torch.no_grad():
        err = lambda d: (tr.recon(batch.image + d) - batch.target).pow(2).sum()  # noqa: E731
        assert err(pgd) > err(noise)


def test_noise_sigma_mode_has_the_budget_as_expected_norm():
    tr = Trainer(tiny(adversary="noise", noise_mode="sigma", epsilon=20.0), CPU)
    sq = torch.cat([squared_norm(tr.noise_perturbation(fake_batch(8))) for _ in range(20)])
    # ||delta||^2 / sigma^2 is chi-square with n = 32*32 degrees of freedom: mean eps, sd eps*sqrt(2/n)
    assert sq.mean() == pytest.approx(20.0, rel=3 * (2 / 1024) ** 0.5 / 160**0.5 + 0.01)
    assert sq.std() == pytest.approx(20.0 * (2 / 1024) ** 0.5, rel=0.3)


@pytest.mark.parametrize("kind", ["pgd", "noise", "conditional"])
@pytest.mark.parametrize("domain", ["image", "kspace"])
def test_every_adversary_trains_in_both_domains(synthetic_root, kind, domain):
    cfg = smoke_cfg(
        synthetic_root,
        adversary=kind,
        perturbation=domain,
        max_epochs=1,
        max_train_batches=2,
        attacks=("noise",),
        train_eval_volumes=0,
    )
    res = fit(cfg, log=None)
    r = res.history[-1]
    assert res.status == "completed" and r.steps == 2 and r.delta_sq > 0
    if domain == "image":
        assert r.delta_sq <= 20.0 * 1.0001
    else:  # per slice (eps / c^2) ||y||^2 (budget_per_slice): PGD and noise stay inside it
        assert kind == "conditional" or r.over_budget == 0.0
    assert r.report is not None and r.report["clean"]["nmse"] > 0


def test_a_named_protocol_joins_the_held_out_evaluation(synthetic_root):
    cfg = smoke_cfg(
        synthetic_root,
        max_epochs=1,
        max_train_batches=1,
        attacks=("noise",),
        train_eval_volumes=0,
        report_protocol="deviation-kspace",
    )
    record = fit(cfg, log=None).history[-1]
    mine = [r for r in record.report["robustness"] if r["protocol"] == "deviation-kspace"]
    assert [r["rel"] for r in mine] == [0.04, 0.08] and all(r["attack"] == "pgd_kspace" for r in mine)
    for r in mine:  # inside the relative ball: ||delta|| <= rel ||y||, and on its surface after 100 steps
        assert r["rel"] * 0.5 < r["delta_rel"] <= r["rel"] * (1 + 1e-4)
    assert "report_deviation_kspace_pgd_kspace_r0p04_nmse" in record.flat()
    with pytest.raises(ConfigError, match="report_protocol"):
        smoke_cfg(synthetic_root, report_protocol="nope")


def test_instabilities_are_recorded_each_epoch_and_held_out(synthetic_root):
    cfg = smoke_cfg(synthetic_root, max_epochs=1, max_train_batches=1, attacks=("noise",), train_eval_volumes=0)
    record = fit(cfg, log=None).history[-1]
    assert 0 <= record.feature_fnr <= 1 and record.feature_error > 0  # on the attacked selection subset
    flat = record.flat()
    for key in (
        "report_feature_random_fnr",
        "report_feature_worst_fnr",
        "zf_report_feature_random_fnr",
        "report_sampling_r8_nmse",
        "report_sampling_r2_nmse",
        "zf_report_sampling_r2_nmse",
    ):
        assert key in flat, key
    # the worst of several positions is never easier than the first one drawn
    assert flat["report_feature_worst_error"] >= flat["report_feature_random_error"]
    # the zero-filled input gains from more samples (type 3 is about the network, not the data)
    assert flat["zf_report_sampling_r2_nmse"] < flat["zf_report_sampling_r8_nmse"]
    off = fit(TrainConfig.from_dict({"instabilities": False}, base=cfg), log=None).history[-1]
    assert np.isnan(off.feature_fnr) and "report_feature_random_fnr" not in off.flat()


@pytest.mark.parametrize("domain", ["image", "kspace"])
def test_a_projected_generator_is_never_counted_over_its_budget(synthetic_root, domain):
    """project=true puts G(z) on the epsilon-ball's sphere when it starts outside it: rounding there
    is not 'outside the ball' (over_budget read about 0.5 before a tolerance was used)."""
    cfg = smoke_cfg(
        synthetic_root,
        project=True,
        gen_scale="unit",  # a raw tanh output, far outside the ball: every image is projected
        perturbation=domain,
        batch_size=4,
        max_epochs=2,
        attacks=("noise",),
        train_eval_volumes=0,
        instabilities=False,
    )
    history = fit(cfg, log=None).history  # 24 projected images: rounding put about a quarter above
    assert all(r.over_budget == 0.0 and r.delta_sq > 0 for r in history)


def test_what_a_run_evaluates_does_not_change_what_it_trains(synthetic_root, tiny_config, tmp_path):
    """The same standard config trains the same model whatever it evaluates: the per-epoch attacks
    (k-space ones make the evaluation batches carry k-space), their budgets and the held-out protocol
    (``l2-kspace-curve`` made the training batches bucketed by k-space shape, a different order), none at
    all (``benchmarks/recipe_check.py``'s quality-only evaluation) and the instabilities (their feature
    search and sampling sweep draw masks and positions)."""
    base = dict(epsilon=0.0, adversary="none", max_epochs=2, max_train_batches=3, seed=3)
    variants = {
        "plain": {"attacks": ["pgd"], "instabilities": False},
        "kspace_attacks": {"attacks": ["pgd", "pgd_kspace"], "attack_budgets": [7.0], "instabilities": False},
        "protocol": {"attacks": ["noise"], "report_protocol": "l2-kspace-curve", "instabilities": False},
        "nothing": {"attacks": [], "instabilities": False},
        "instabilities": {"attacks": ["pgd"], "instabilities": True},
    }
    weights, losses = {}, {}
    for name, extra in variants.items():
        res = fit(tiny_config(synthetic_root, **base, **extra), out_dir=tmp_path / name, log=None)
        losses[name] = [r.train_loss for r in res.history]
        state = torch.load(tmp_path / name / "checkpoint.pt", map_location="cpu", weights_only=False)
        weights[name] = state["networks"]["recon"]
    for name in variants:
        assert losses[name] == losses["plain"], name
        assert weights[name].keys() == weights["plain"].keys()
        assert all(torch.equal(weights[name][k], weights["plain"][k]) for k in weights["plain"]), name
