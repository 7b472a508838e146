"""Configs built from dicts and command lines: tuple fields from single or comma-separated values, and
every bad value named by the key or option the user typed; the allowed values of a named option are
exactly those the code that consumes it builds."""

from __future__ import annotations

import pytest
import torch

from mriadv import choices, losses
from mriadv.attacks import PGDAttack
from mriadv.config import ConfigError, TrainConfig
from mriadv.data.files import inspect_volume
from mriadv.data.masks import make_mask_func
from mriadv.models.unet import UNet
from mriadv.train import build_parser, config_from_args


@pytest.mark.parametrize(
    "value,want",
    [
        ("pgd", ("pgd",)),
        ("pgd,noise", ("pgd", "noise")),
        (" noise , pgd_kspace ", ("noise", "pgd_kspace")),
        (["generator"], ("generator",)),
        (("pgd", "noise"), ("pgd", "noise")),
    ],
)
def test_attacks_from_a_single_or_comma_separated_value(value, want):
    assert TrainConfig.from_dict({"attacks": value}).attacks == want


@pytest.mark.parametrize(
    "value,want",
    [
        ("1000,5000", (1000.0, 5000.0)),
        ("2.5e3", (2500.0,)),
        (1000, (1000.0,)),
        (12.5, (12.5,)),
        ([10, 20.5], (10.0, 20.5)),
        ("7", (7.0,)),
    ],
)
def test_attack_budgets_from_a_single_or_comma_separated_value(value, want):
    budgets = TrainConfig.from_dict({"attack_budgets": value}).attack_budgets
    assert budgets == want and all(isinstance(b, (int, float)) for b in budgets)


@pytest.mark.parametrize(
    "key,value,bad",
    [
        ("attacks", "pgdx", "'pgdx'"),
        ("attacks", "pgd,nois", "'nois'"),
        ("attacks", ["noise", "fgsm"], "'fgsm'"),
        ("attack_budgets", "1000,abc", "'abc'"),
        ("attack_budgets", "1000,-5", "-5"),
        ("attack_budgets", [10, 0], "0"),
    ],
)
def test_a_bad_tuple_item_is_named(key, value, bad):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({key: value})
    message = str(err.value)
    assert f"config key '{key}'" in message and bad in message
    assert "each must be" not in message


def test_train_cli_set_takes_single_and_comma_separated_values(tmp_path):
    args = build_parser().parse_args(
        ["--out", str(tmp_path), "--profile", "smoke", "--set", "attacks=pgd", "--set", "attack_budgets=1000,5000"]
    )
    cfg, _ = config_from_args(args)
    assert cfg.attacks == ("pgd",) and cfg.attack_budgets == (1000.0, 5000.0)
    args = build_parser().parse_args(
        ["--out", str(tmp_path), "--set", "attacks=pgd,noise", "--set", "attack_budgets=40"]
    )
    cfg, _ = config_from_args(args)
    assert cfg.attacks == ("pgd", "noise") and cfg.attack_budgets == (40.0,)
    with pytest.raises(ConfigError, match="'pgdx' is not one of"):
        config_from_args(build_parser().parse_args(["--out", str(tmp_path), "--set", "attacks=pgd,pgdx"]))


def test_train_cli_set_adversary_none_is_the_standard_model_not_a_missing_value(tmp_path):
    args = build_parser().parse_args(
        ["--out", str(tmp_path), "--profile", "smoke", "--set", "adversary=none", "--set", "report_protocol=none"]
    )
    cfg, _ = config_from_args(args)
    assert cfg.adversary == "none" and cfg.report_protocol is None


@pytest.mark.parametrize(
    "option,value",
    [
        ("--max-epochs", "0"),
        ("--num-samples", "0"),
        ("--max-concurrent", "-1"),
        ("--cpus-per-trial", "0"),
        ("--gpus-per-trial", "-0.5"),
    ],
)
def test_study_cli_names_the_bad_option_before_anything_starts(option, value, tmp_path, capsys, monkeypatch):
    from study import run

    for var in ("TUNE_GLOBAL_CHECKPOINT_S", "RAY_AIR_NEW_OUTPUT", "RAY_DEDUP_LOGS"):  # main sets them
        monkeypatch.setenv(var, "")
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    code = run.main(["--space", "eps_sweep", "--profile", "smoke", "--results", str(results), option, value])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: {option} must be" in err and f"got {value}" in err
    assert "eps_sweep.yaml" not in err  # not blamed on the space file
    assert not results.exists()  # failed before any data, study folder or Ray


# --- each allowed-value list once: the config accepts exactly what the code builds ----------------------
UNLISTED = "unlisted"


def _unet_output(**option):
    model = UNet(chans=2, num_pools=1, **option)
    return model(torch.zeros(2, 1, 8, 8))


def _build(key, value, root):
    """Build or call what consumes config key ``key`` with ``value``; raises for a value it refuses."""
    if key == "unet_activation":
        assert _unet_output(activation=value).shape == (2, 1, 8, 8)
    elif key == "unet_pooling":
        assert _unet_output(pooling=value).shape == (2, 1, 8, 8)
    elif key == "unet_norm":
        assert _unet_output(norm=value).shape == (2, 1, 8, 8)
    elif key == "mask_type":
        assert make_mask_func(value, 0.08, 4.0)(64, 0).shape == (64,)
    elif key == "target_key":
        volume = sorted((root / "singlecoil_val").glob("*.h5"))[0]
        assert inspect_volume(volume, value, None).num_slices > 0
    elif key == "loss":
        pred, target = torch.rand(2, 2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(losses.make_loss(value)(pred, target))
    elif key == "perturbation":
        assert PGDAttack(1.0, domain=value).domain == value
    else:
        raise AssertionError(f"no builder for {key}")


ALLOWED = [
    ("unet_activation", choices.ACTIVATIONS),
    ("unet_pooling", choices.POOLINGS),
    ("unet_norm", choices.NORMS),
    ("mask_type", choices.MASK_TYPES),
    ("target_key", choices.TARGET_KEYS),
    ("loss", choices.LOSSES),
    ("perturbation", choices.DOMAINS),
]


@pytest.mark.parametrize("key,values", ALLOWED, ids=[k for k, _ in ALLOWED])
def test_config_allows_exactly_what_the_code_builds(key, values, synthetic_root):
    assert values and len(set(values)) == len(values)
    for value in values:
        assert getattr(TrainConfig.from_dict({key: value}), key) == value
        _build(key, value, synthetic_root)
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        TrainConfig.from_dict({key: UNLISTED})
    with pytest.raises(ValueError):
        _build(key, UNLISTED, synthetic_root)


def test_allowed_values_are_the_ones_the_modules_use():
    from mriadv import attacks, perturbations
    from mriadv.data import masks, transforms
    from mriadv.models import unet

    assert (unet.ACTIVATIONS, unet.POOLINGS, unet.NORMS) == (choices.ACTIVATIONS, choices.POOLINGS, choices.NORMS)
    assert masks.MASK_TYPES == choices.MASK_TYPES and transforms.TARGET_KEYS == choices.TARGET_KEYS
    assert attacks.DOMAINS == perturbations.DOMAINS == choices.DOMAINS
    assert set(losses.LOSSES) == set(choices.LOSSES)
