"""The runtime: evaluation in fp32 whatever the training precision, the deterministic option, the
deterministic forms of the U-Net's padding, and the loader workers a run takes."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mriadv.config import ConfigError, TrainConfig
from mriadv.data.loading import build_data
from mriadv.evaluate import evaluate, robustness
from mriadv.fit import RESUMABLE_CHANGES, report_evaluation
from mriadv.models.unet import reflected
from mriadv.runtime import Runtime, seed_everything
from mriadv.train import parse_sets
from mriadv.trainer import Trainer

# CPU autocast supports bf16, so a CPU runtime with a bf16 training dtype stands in for a GPU's
# (Runtime.resolve refuses bf16 on a CPU; evaluation must not depend on it anyway)
BF16 = Runtime(torch.device("cpu"), torch.bfloat16)
FP32 = Runtime(torch.device("cpu"), None)


def numbers(value, path=""):
    """Every numeric leaf of a nested report (lists, dicts, JSON strings of dicts) by its path."""
    if isinstance(value, str) and value.startswith("{"):
        value = json.loads(value)
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in numbers(item, f"{path}.{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in numbers(item, f"{path}[{i}]").items()}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {path: float(value)}
    return {}


def assert_close(a: dict[str, float], b: dict[str, float], tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key, x in a.items():
        y = b[key]
        assert (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=tol, abs_tol=tol), (key, x, y)


def twin_trainers(cfg: TrainConfig, kspace_shape) -> tuple[Trainer, Trainer]:
    """The same networks in a bf16 and an fp32 runtime."""
    seed_everything(0)
    bf16 = Trainer(cfg, BF16, kspace_shape=kspace_shape)
    fp32 = Trainer(cfg, FP32, kspace_shape=kspace_shape)
    fp32.load_networks(bf16.networks())
    return bf16, fp32


def test_evaluation_is_fp32_under_a_bf16_training_runtime(synthetic_root, tiny_config):
    cfg = tiny_config(synthetic_root, attacks=("pgd", "noise", "generator", "pgd_kspace"), pgd_steps=2)
    data = build_data(cfg, FP32)
    bf16, fp32 = twin_trainers(cfg, data.kspace_shape())
    loader = data.loader(data.val, shuffle=False)
    # the autocast is real: the same forward pass under it differs far beyond the tolerance below
    batch = next(iter(loader))
    with torch.no_grad(), BF16.autocast():
        low = bf16.recon.eval()(batch.image).float()
    with torch.no_grad():
        assert (low - fp32.recon.eval()(batch.image)).abs().max() > 1e-4

    clean = {r: evaluate(t.recon, loader, t.loss_fn, r, clamp=cfg.clamp) for r, t in ((BF16, bf16), (FP32, fp32))}
    assert_close(numbers(clean[BF16].as_dict()), numbers(clean[FP32].as_dict()))
    rows = {
        r: robustness(t.recon, loader, t.loss_fn, r, t.attacks(), clean[r], cfg.clamp)
        for r, t in ((BF16, bf16), (FP32, fp32))
    }
    assert {row.attack for row in rows[BF16]} == {"pgd", "noise", "generator", "pgd_kspace"}
    assert_close(numbers([r.as_dict() for r in rows[BF16]]), numbers([r.as_dict() for r in rows[FP32]]))
    # the held-out report: every attack, the zero-filled input, small features and the sampling sweep
    report = report_evaluation(bf16, data, BF16), report_evaluation(fp32, data, FP32)
    assert "features" in report[0] and "sampling" in report[0]
    assert_close(numbers(report[0]), numbers(report[1]))

    # training steps do run under the bf16 autocast
    steps = [t.train_step(batch) for t in (bf16, fp32)]
    assert abs(steps[0]["recon_loss"] - steps[1]["recon_loss"]) > 1e-6


def test_pgd_training_perturbation_keeps_the_training_precision(synthetic_root, tiny_config):
    """PGD as the training adversary is part of the training step: it runs under the bf16 autocast."""
    cfg = tiny_config(synthetic_root, adversary="pgd", adv_steps=2)
    data = build_data(cfg, FP32)
    bf16, fp32 = twin_trainers(cfg, data.kspace_shape())
    batch = next(iter(data.loader(data.val, shuffle=False)))
    assert not torch.allclose(bf16.attack_perturbation(batch), fp32.attack_perturbation(batch), atol=1e-6)


def test_evaluating_restores_tf32_and_switches_an_enclosing_autocast_off():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with BF16.evaluating():
            assert not torch.is_autocast_enabled("cpu")
            assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before


@pytest.fixture
def restore_determinism():
    """Runtime.resolve sets process-wide flags: put them back for the tests that follow."""
    state = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    yield
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = state[2], state[3]


def test_the_deterministic_option(restore_determinism):
    assert TrainConfig().deterministic is False
    assert TrainConfig.from_dict({"deterministic": True}).deterministic is True
    assert TrainConfig.from_dict(parse_sets(["deterministic=true"])).deterministic is True
    with pytest.raises(ConfigError, match="deterministic"):
        TrainConfig.from_dict({"deterministic": "yes"})
    assert "deterministic" in RESUMABLE_CHANGES  # how a run executes, not what it trains
    Runtime.resolve("cpu", "fp32", None, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic
    Runtime.resolve("cpu", "fp32", None)  # the flags follow the config both ways
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def test_bf16_is_refused_where_it_cannot_run():
    with pytest.raises(RuntimeError, match="bf16"):
        Runtime.resolve("cpu", "bf16")
    assert Runtime.resolve("cpu", "auto").dtype is None


@pytest.mark.parametrize("size, pad", [((5, 7), (2, 3, 1, 4)), ((3, 4), (0, 2, 2, 0)), ((6, 6), (1, 1, 1, 1))])
def test_reflect_padding_by_index_matches_torch(size, pad):
    """The deterministic form of reflection padding (index_select with these indices) picks what
    F.pad(mode='reflect') picks, at odd and uneven pads."""
    x = torch.randn(2, 3, *size)
    left, right, top, bottom = pad
    by_index = x.index_select(-2, reflected(size[0], top, bottom)).index_select(-1, reflected(size[1], left, right))
    assert torch.equal(by_index, F.pad(x, pad, mode="reflect"))


def test_loader_workers_follow_the_run_share(synthetic_root, tiny_config):
    cuda = Runtime(torch.device("cuda"), None)  # build_data only reads is_cuda; nothing runs on it here
    assert build_data(tiny_config(synthetic_root, threads=1), cuda).num_workers == 1
    assert build_data(tiny_config(synthetic_root, threads=64), cuda).num_workers <= 8
    assert build_data(tiny_config(synthetic_root), FP32).num_workers == 0


def test_evaluation_loaders_with_workers_are_kept_and_give_the_same_batches(synthetic_root, tiny_config):
    plain = build_data(tiny_config(synthetic_root), FP32)
    assert plain.loader(plain.val, shuffle=False) is not plain.loader(plain.val, shuffle=False)  # 0 workers: as before
    data = build_data(tiny_config(synthetic_root, num_workers=1), FP32)
    loader = data.loader(data.val, shuffle=False)
    assert loader is data.loader(data.val, shuffle=False) and loader.persistent_workers
    assert data.loader(data.train, shuffle=True) is not data.loader(data.train, shuffle=True)
    want = [b.image for b in plain.loader(plain.val, shuffle=False)]
    for _ in range(2):  # the second pass reuses the same worker
        got = [b.image for b in loader]
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
