"""Issue 22.2's defences: the TRADES adversary (its loss against a hand-written closed form, its
perturbation inside the budget, a fit in both domains, the command line) and fine-tuning from a
trained model (``init_from``: the first step starts from the checkpoint's weights; a missing file and
another architecture are refused in one line; a resumed run does not read it; a study may fix it)."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch

from mriadv.adversaries import TRADES_START_SALT, trades_penalty
from mriadv.checkpoint import BEST_NAME, CHECKPOINT_NAME, load_checkpoint
from mriadv.config import ConfigError, TrainConfig
from mriadv.fit import fit
from mriadv.perturbations import random_start, squared_norm
from mriadv.runtime import Runtime
from mriadv.trainer import Trainer
from test_training import fake_batch  # the shared synthetic batch

CPU = Runtime.resolve("cpu", "fp32")
QUICK = dict(
    max_epochs=1, max_train_batches=1, attacks=("noise",), train_eval_volumes=0, instabilities=False, threads=1
)


def tiny(**kw) -> TrainConfig:
    base = dict(crop_size=32, unet_chans=4, unet_pools=2, batch_size=2, epsilon=20.0, loss="mse", device="cpu")
    return TrainConfig.from_dict({**base, **kw})


# ----------------------------------------------------------------------------------------------
# TRADES
# ----------------------------------------------------------------------------------------------
def test_trades_step_is_its_closed_form(monkeypatch):
    """With delta set by hand, the step's loss and every gradient equal those of a hand-written
    ``mse(f(x~), x) + beta * mean((f(x~ + delta) - f(x~))^2)`` on a copy of the network; detaching
    f(x~) in the penalty would give other gradients, so the test sees whether both terms train."""
    beta = 0.7
    tr = Trainer(tiny(adversary="trades", lambda1=beta, clamp=None), CPU)
    batch = fake_batch()
    delta = 0.1 * torch.randn(batch.image.shape, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(tr, "attack_perturbation", lambda b: delta)
    net = copy.deepcopy(tr.recon).train()

    def hand(detach: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        clean, pert = net(batch.image), net(batch.image + delta)  # instance norm: per image, batching is moot
        ref = clean.detach() if detach else clean
        loss = (clean - batch.target).pow(2).mean() + beta * (pert - ref).pow(2).mean()
        return loss, list(torch.autograd.grad(loss, list(net.parameters())))

    loss, grads = hand(detach=False)
    _, detached = hand(detach=True)
    stats = tr.train_step(batch)
    assert stats["recon_loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert stats["delta_sq"] == pytest.approx(squared_norm(delta).mean().item(), rel=1e-6)
    for g, p in zip(grads, tr.recon.parameters()):
        assert torch.allclose(p.grad, g, rtol=1e-5, atol=1e-8)
    assert any(not torch.allclose(g, d, rtol=1e-3, atol=1e-7) for g, d in zip(grads, detached))
    # the penalty itself: the mean over batch and pixels of the squared deviation
    a, b = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    assert trades_penalty(a, b).item() == pytest.approx(((a - b) ** 2).sum().item() / 32, rel=1e-6)


def test_trades_perturbation_is_inside_the_budget_and_beats_its_start():
    tr = Trainer(tiny(adversary="trades", epsilon=20.0, adv_steps=3), CPU)
    batch = fake_batch()
    theta = [p.detach().clone() for p in tr.recon.parameters()]
    delta = tr.attack_perturbation(batch)
    assert all(torch.equal(a, b) for a, b in zip(theta, tr.recon.parameters()))
    assert all(p.grad is None for p in tr.recon.parameters())
    sq = squared_norm(delta)
    assert (sq <= 20.0 * (1 + 1e-5)).all() and (sq > 0).all()
    start = random_start(batch, "image", 20.0**0.5, "gaussian", TRADES_START_SALT + tr.steps_done)
    with torch.no_grad():
        tr.recon.eval()
        clean = tr.recon(batch.image)
        deviation = lambda d: (tr.recon(batch.image + d) - clean).pow(2).flatten(1).sum(1)  # noqa: E731
        assert (deviation(delta) > deviation(start)).all()  # PGD ascended the deviation from its start


@pytest.mark.parametrize("domain", ["image", "kspace"])
def test_trades_fit_runs_within_its_budget(synthetic_root, tiny_config, domain):
    cfg = tiny_config(synthetic_root, adversary="trades", perturbation=domain, **{**QUICK, "max_train_batches": 2})
    r = fit(cfg, log=None).history[-1]
    assert r.status == "completed" and r.steps == 2
    assert r.delta_sq > 0 and r.over_budget == 0.0  # k-space: each slice's (eps / c^2) ||y||^2
    if domain == "image":
        assert r.delta_sq <= 20.0 * (1 + 1e-4)
        assert r.delta_sq_budget == pytest.approx(r.delta_sq / 20.0, rel=1e-5)  # the image budget is epsilon
    assert 0 < r.delta_sq_budget <= 1 + 1e-4  # within each slice's own budget, in either domain
    assert r.train_loss == pytest.approx(r.train_clean_loss + r.train_pert_loss, rel=1e-5)  # beta = lambda1 = 1


def test_the_command_line_takes_trades_and_init_from(tmp_path):
    from mriadv.train import build_parser, config_from_args

    argv = ["--out", str(tmp_path), "--profile", "smoke", "--set", "adversary=trades", "--set", "lambda1=6"]
    argv += ["--set", f"init_from={tmp_path / BEST_NAME}"]
    cfg, _ = config_from_args(build_parser().parse_args(argv))
    assert cfg.adversary == "trades" and cfg.adversary_kind == "trades" and cfg.lambda1 == 6
    assert cfg.init_from == str(tmp_path / BEST_NAME)
    with pytest.raises(ConfigError, match="init_from"):
        TrainConfig.from_dict({"init_from": ""})


# ----------------------------------------------------------------------------------------------
# fine-tuning
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(synthetic_root, tiny_config, tmp_path_factory):
    """A standard model of one step: its folder."""
    out = tmp_path_factory.mktemp("standard")
    fit(tiny_config(synthetic_root, epsilon=0.0, adversary="none", **QUICK), out_dir=out, log=None)
    return out


class _FirstStep(Exception):
    pass


def _first_step_weights(monkeypatch, cfg) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The reconstructor's weights when ``fit`` takes its first training step (the run stops there)."""
    seen: dict[str, torch.Tensor] = {}

    def step(self, batch):
        seen.update({k: v.detach().clone() for k, v in self.recon.state_dict().items()})
        raise _FirstStep

    monkeypatch.setattr(Trainer, "train_step", step)
    lines: list[str] = []
    with pytest.raises(_FirstStep):
        fit(cfg, log=lines.append)
    return seen, lines


@pytest.mark.parametrize("where", ["file", "folder"])
def test_fine_tuning_starts_from_the_checkpoints_weights(monkeypatch, synthetic_root, tiny_config, trained, where):
    best = load_checkpoint(trained / BEST_NAME)["networks"]["recon"]
    init = trained / BEST_NAME if where == "file" else trained
    cfg = tiny_config(synthetic_root, adversary="pgd", seed=7, init_from=str(init), **QUICK)
    weights, lines = _first_step_weights(monkeypatch, cfg)
    assert weights.keys() == best.keys() and all(torch.equal(weights[k], best[k]) for k in best)
    assert any(line.startswith(f"fine-tuning: the reconstructor starts from {trained / BEST_NAME}") for line in lines)
    scratch, _ = _first_step_weights(monkeypatch, TrainConfig.from_dict({"init_from": None}, base=cfg))
    assert not all(torch.equal(scratch[k], best[k]) for k in best)  # without it: a fresh network


@pytest.mark.parametrize(
    "change,names",
    [
        ({"unet_chans": 8}, "unet_chans: 4 -> 8"),
        ({"unet_norm": "batch"}, "unet_norm: 'instance' -> 'batch'"),
        ({"arch": "unrolled", "perturbation": "kspace", "attacks": ("pgd_kspace",)}, "arch: 'unet' -> 'unrolled'"),
    ],
)
def test_fine_tuning_refuses_another_reconstructor(synthetic_root, tiny_config, trained, change, names):
    cfg = tiny_config(synthetic_root, init_from=str(trained / BEST_NAME), **{**QUICK, **change})
    with pytest.raises(ConfigError) as err:
        fit(cfg, log=None)
    message = str(err.value)
    assert "\n" not in message and "'init_from'" in message and str(trained / BEST_NAME) in message
    assert names in message


def test_fine_tuning_refuses_a_missing_file(synthetic_root, tiny_config, tmp_path):
    missing = tmp_path / "nowhere" / BEST_NAME
    with pytest.raises(ConfigError, match=rf"config key 'init_from': {missing} does not exist$"):
        fit(tiny_config(synthetic_root, init_from=str(missing), **QUICK), log=None)


def test_a_resumed_run_does_not_read_init_from(synthetic_root, tiny_config, trained, tmp_path):
    copied = tmp_path / "start.pt"
    copied.write_bytes((trained / BEST_NAME).read_bytes())
    cfg = tiny_config(synthetic_root, epsilon=0.0, adversary="none", init_from=str(copied), **QUICK)
    first = fit(cfg, out_dir=tmp_path / "run", log=None)
    assert first.history[-1].init_from == str(copied) and first.history[-1].flat()["init_from"] == str(copied)
    copied.unlink()  # a resumed run takes its weights from its checkpoint: the file may be gone
    more = TrainConfig.from_dict({"max_epochs": 2}, base=cfg)
    resumed = fit(more, out_dir=tmp_path / "run", resume_from=tmp_path / "run" / CHECKPOINT_NAME, log=None)
    assert [r.epoch for r in resumed.history] == [1, 2] and resumed.history[-1].init_from == str(copied)
    with pytest.raises(ConfigError, match="init_from"):  # but it names what it started from
        fit(TrainConfig.from_dict({"init_from": None}, base=more), resume_from=tmp_path / "run", log=None)


def test_a_study_fixes_init_from_for_every_trial(tmp_path, trained):
    from study.plan import base_config
    from study.spaces import SpaceError, load_space
    from study.trainable import trial_config
    from test_spaces import demo_context

    best = trained / BEST_NAME
    text = "parameters:\n  epsilon: {grid: [0, 1000]}\nfixed: {init_from: %s, unet_chans: 4, unet_pools: 2}\n"
    space = load_space(_write(tmp_path, text % best))
    assert space.fixed["init_from"] == str(best)
    ctx = demo_context(space, tmp_path)
    cfg = trial_config(ctx, {"epsilon": 1000})
    assert cfg.init_from == str(best) and cfg.crop_size == 96  # demo's crop; budgets scaled as without it
    assert cfg.epsilon == pytest.approx(1000 * 96**2 / 320**2)
    assert cfg.attack_budgets == pytest.approx(tuple(b * 96**2 / 320**2 for b in (1000, 5000)))
    with pytest.raises(SpaceError, match="fixed.init_from: 'best.pt': give an absolute path"):
        load_space(_write(tmp_path, text % "best.pt"))
    demo_width = load_space(_write(tmp_path, text.replace(", unet_chans: 4", "") % best))  # demo: 16 channels
    with pytest.raises(ConfigError, match="unet_chans: 4 -> 16"):  # refused on the driver, before Ray
        base_config(demo_width, "demo", tmp_path, argparse.Namespace(max_epochs=None), tmp_path / ".cache")


def _write(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path
