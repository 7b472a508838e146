"""Search-space files: validation errors name the file and key; every searched key reaches the trainer."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from mriadv.config import TrainConfig
from mriadv.units import scale_epsilon
from study.spaces import SpaceError, available_spaces, load_space
from study.trainable import StudyContext, trial_config

REPO = Path(__file__).resolve().parent.parent


def demo_context(space, tmp_path) -> StudyContext:
    """The trials' context of ``space`` at the demo profile, as the driver builds it (study.plan)."""
    import argparse

    from study.plan import base_config

    base = base_config(space, "demo", tmp_path, argparse.Namespace(max_epochs=None), tmp_path / ".cache")
    return StudyContext(
        base=base,
        epsilon_keys=("epsilon",),
        study_dir=str(tmp_path),
        attack_budgets_ref=space.attack_budgets,
        objective_metrics=(),
    )


def write(tmp_path, text, name="space.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text,key,why",
    [
        ("parameters:\n  lr_recn: {loguniform: [1e-5, 1e-3]}\n", "parameters.lr_recn", "unknown parameter"),
        (
            "parameters:\n  lr_recon: {lognormal: [1e-5, 1e-3]}\n",
            "parameters.lr_recon.lognormal",
            "unknown distribution",
        ),
        ("parameters:\n  lambda1: {uniform: [3, 1]}\n", "parameters.lambda1.uniform", "low must be < high"),
        ("parameters:\n  lambda1: {uniform: [2, 2]}\n", "parameters.lambda1.uniform", "low must be < high"),
        ("parameters:\n  lr_gen: {loguniform: [0, 1e-3]}\n", "parameters.lr_gen.loguniform", "log range must be > 0"),
        ("parameters:\n  epsilon: {grid: [0, -5]}\n", "parameters.epsilon.grid", "'epsilon'"),
        ("parameters:\n  loss: {choice: [mse, l1]}\n", "parameters.loss.choice", "'loss'"),
        ("parameters:\n  epsilon: {grid: [0, 1]}\nfixed: {lr_recon: -1}\n", "fixed.lr_recon", "'lr_recon'"),
        (
            "parameters:\n  epsilon: {grid: [0, 1]}\nobjectives: [{metric: val_nmse, mode: up}]\n",
            "objectives[0].mode",
            "min",
        ),
        (
            "parameters:\n  epsilon: {grid: [0, 1]}\nobjectives: [{metric: accuracy, mode: max}]\n",
            "objectives[0].metric",
            "unknown metric",
        ),
        ("parameters:\n  epsilon: {grid: [0, 1]}\nscheduler: hyperband\n", "scheduler", "asha"),
        ("parameters:\n  epsilon: {grid: [0, 1]}\n  lambda1: {uniform: [1, 2]}\n", "parameters", "mixes grid"),
        ("parameters:\n  data: {choice: [a, b]}\n", "parameters.data", "belongs to the run"),
        ("paramters:\n  epsilon: {grid: [0]}\n", "paramters", "unknown key"),
        ("parameters: [epsilon\n", "not valid YAML", ""),
    ],
)
def test_space_errors_name_file_and_key(tmp_path, text, key, why):
    path = write(tmp_path, text)
    with pytest.raises(SpaceError) as err:
        load_space(str(path))
    message = str(err.value)
    assert str(path) in message and key in message and why in message


def test_a_parsed_space_is_the_same_space_and_its_errors_name_the_source(tmp_path):
    """space_from_dict builds from already-parsed YAML (the text a study.json keeps) what load_space
    builds from the file, and names the given source in its errors."""
    from study.spaces import parse_space_yaml, space_from_dict

    text = "parameters:\n  lr_recon: {loguniform: [1e-5, 1e-3]}\nnum_samples: 3\n"
    path = write(tmp_path, text)
    parsed = space_from_dict(parse_space_yaml(text, "study.json"), "saved", path)
    loaded = load_space(str(path))
    assert (parsed.name, loaded.name) == ("saved", "space")  # the given name; a file's is its stem
    assert dataclasses.replace(parsed, name="space") == loaded and parsed.params[0].low == 1e-5  # read as a float
    with pytest.raises(SpaceError, match=r"^saved/study.json: parameters.lr_recn: unknown parameter"):
        space_from_dict({"parameters": {"lr_recn": {"loguniform": [1e-5, 1e-3]}}}, "space", "saved/study.json")
    with pytest.raises(SpaceError, match=r"^saved/study.json: not valid YAML"):
        parse_space_yaml("parameters: [epsilon\n", "saved/study.json")


def test_cli_exits_2_with_one_clear_line(tmp_path):
    path = write(tmp_path, "parameters:\n  lr_gen: {loguniform: [0, 1e-3]}\n")
    out = subprocess.run(
        [sys.executable, str(REPO / "study" / "run.py"), "--space", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert f"error: {path}: parameters.lr_gen.loguniform" in out.stderr
    assert "Traceback" not in out.stderr
    unknown = subprocess.run(
        [sys.executable, str(REPO / "study" / "run.py"), "--space", "no_such_space"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert unknown.returncode == 2 and "eps_sweep" in unknown.stderr  # lists what is available


def test_list_spaces():
    out = subprocess.run(
        [sys.executable, str(REPO / "study" / "run.py"), "--list-spaces"], capture_output=True, text=True
    )
    assert out.returncode == 0
    names = [line.split()[0] for line in out.stdout.splitlines()]
    assert set(names) == set(available_spaces()) >= {"eps_sweep", "lambda_sweep", "loss_type", "lr_sweep", "full"}


@pytest.mark.parametrize("name", ["eps_sweep", "lambda_sweep", "loss_type", "lr_sweep", "full"])
def test_every_searched_key_reaches_the_trainer(name):
    space = load_space(name)
    crop = 96
    ctx = StudyContext(
        base={"crop_size": crop},
        epsilon_keys=("epsilon",),
        study_dir="/tmp",
        attack_budgets_ref=space.attack_budgets,
        objective_metrics=(),
    )
    for p in space.params:
        values = p.values if p.values else (p.low, (p.low + p.high) / 2, p.high)
        for v in values:
            cfg = trial_config(ctx, {p.name: v})
            expected = scale_epsilon(v, crop) if p.name == "epsilon" else v
            assert (
                getattr(cfg, p.name) == pytest.approx(expected)
                if isinstance(v, float)
                else getattr(cfg, p.name) == expected
            )
            # and differs from the default for some value: a searched key is not silently ignored
    for p in space.params:
        values = p.values if p.values else (p.low, p.high)
        seen = {getattr(trial_config(ctx, {p.name: v}), p.name) for v in values}
        assert len(seen) == len(set(values)), p.name


def test_grid_and_budgets():
    space = load_space("eps_sweep")
    assert space.is_grid and space.trial_count() == len(space.params[0].values)
    assert 0 in space.params[0].values and 1000 in space.params[0].values and 5000 in space.params[0].values
    assert space.budgets_at(320) == (1000.0, 5000.0)
    assert space.budgets_at(160) == (250.0, 1250.0)  # same per-pixel RMS on a quarter of the pixels
    assert TrainConfig().crop_size == 320


def test_budgets_follow_the_trials_own_crop(tmp_path):
    """A space that fixes (or searches) crop_size trains at budgets scaled for that crop, not the
    profile's, and its robustness keys stay in the space's 320x320 units (issue 8.3)."""

    space = load_space(
        write(
            tmp_path,
            "parameters:\n  epsilon: {grid: [0, 1000]}\nfixed: {crop_size: 128}\nattack_budgets: [1000, 5000]\n",
        )
    )
    ctx = demo_context(space, tmp_path)  # demo's own crop: 96
    cfg = trial_config(ctx, {"epsilon": 1000})
    assert cfg.crop_size == 128
    assert cfg.epsilon == pytest.approx(1000 * 128**2 / 320**2)  # 160, not 1000 * 96^2 / 320^2 = 90
    assert cfg.epsilon_rms == pytest.approx((1000 / 320**2) ** 0.5)  # 0.099 per pixel, as at 320
    assert cfg.attack_budgets == pytest.approx((160.0, 800.0))
    from mriadv.units import robust_key, to_reference

    assert [robust_key("pgd", to_reference(b, 128), "nmse") for b in cfg.attack_budgets] == [
        "rob_pgd_e1000_nmse",
        "rob_pgd_e5000_nmse",
    ]
    # searching the crop: each trial scales with its own
    searched = trial_config(ctx, {"epsilon": 1000, "crop_size": 64})
    assert searched.epsilon == pytest.approx(1000 * 64**2 / 320**2)


def test_robust_every_with_a_robustness_objective(tiny_config, synthetic_root):
    """robust_every > 1: attacks also run at every new best epoch, so the value the searcher is told
    (the objective at the best epoch so far) exists in every result."""
    from mriadv.fit import fit
    from study.trainable import BestSoFar

    cfg = tiny_config(
        synthetic_root,
        epsilon=40.0,
        attack_budgets=(40.0, 200.0),
        attacks=("pgd",),
        pgd_steps=2,
        train_eval_volumes=0,
        max_epochs=3,
        max_train_batches=2,
        robust_every=5,
        threads=1,
    )
    best = BestSoFar(("val_nmse", "rob_pgd_e5000_nmse"))
    told = [best.update(r) for r in fit(cfg, log=None).history]
    assert len(told) == 3 and all(t["best_rob_pgd_e5000_nmse"] > 0 for t in told)


def test_a_list_of_points_is_one_trial_each(tmp_path):
    space = load_space("defences")
    assert space.trial_count() == len(space.points) == 8 and not space.is_grid
    assert space.grid_points()[0] == {"adversary": "none", "epsilon": 0, "lambda1": 1.0}
    assert {p.name for p in space.params} == {"adversary", "epsilon", "lambda1"}
    assert set(next(p for p in space.params if p.name == "adversary").values) == {
        "none",
        "generator",
        "pgd",
        "noise",
        "conditional",
    }
    ctx = StudyContext(
        base={"crop_size": 96},
        epsilon_keys=("epsilon",),
        study_dir="/tmp",
        attack_budgets_ref=space.attack_budgets,
        objective_metrics=(),
    )
    cfg = trial_config(ctx, space.grid_points()[3])
    assert cfg.adversary == "pgd" and cfg.epsilon == pytest.approx(scale_epsilon(5000, 96))
    for text, key, why in [
        ("points:\n  - {adversary: pgd, epsilon: 1}\n  - {adversary: pgd}\n", "points[1]", "same keys"),
        ("points:\n  - {adversary: pgdx, epsilon: 1}\n", "points[0].adversary", "adversary"),
        ("points:\n  - {epsilon: 1}\n  - {epsilon: 1}\n", "points", "same trial"),
        ("points:\n  - {epsilon: 1}\nparameters:\n  lambda1: {grid: [1]}\n", "points", "not both"),
    ]:
        with pytest.raises(SpaceError) as err:
            load_space(write(tmp_path, text))
        assert key in str(err.value) and why in str(err.value), str(err.value)


def test_seeds_repeat_every_configuration_of_a_grid_or_a_list_of_points(tmp_path):
    grid = load_space(write(tmp_path, "parameters:\n  epsilon: {grid: [0, 1000]}\nseeds: 3\n"))
    assert grid.is_grid and grid.seeds == 3 and grid.trial_count() == 6
    assert grid.grid_points() == [{"epsilon": e, "seed": s} for e in (0, 1000) for s in (0, 1, 2)]
    assert "each configuration with 3 training seeds" in grid.summary_line()
    points = load_space(
        write(tmp_path, "points:\n  - {adversary: none, epsilon: 0}\n  - {adversary: pgd, epsilon: 5}\nseeds: 2\n")
    )
    assert points.trial_count() == 4 and points.num_samples == 4
    assert points.grid_points()[:2] == [
        {"adversary": "none", "epsilon": 0, "seed": 0},
        {"adversary": "none", "epsilon": 0, "seed": 1},
    ]
    assert next(p for p in points.params if p.name == "seed").values == (0, 1)
    assert load_space(write(tmp_path, "parameters:\n  epsilon: {grid: [0]}\n")).seeds == 1
    for text, why in [
        ("parameters:\n  lambda1: {uniform: [1, 2]}\nseeds: 2\n", "sampled space"),
        ("parameters:\n  epsilon: {grid: [0]}\n  seed: {grid: [0, 1]}\nseeds: 2\n", "seed parameter"),
        ("parameters:\n  epsilon: {grid: [0]}\nfixed: {seed: 4}\nseeds: 2\n", "seed parameter"),
        ("points:\n  - {epsilon: 0, seed: 1}\nseeds: 2\n", "seeds in the points"),
        ("parameters:\n  epsilon: {grid: [0]}\nseeds: 0\n", "positive integer"),
        ("parameters:\n  epsilon: {grid: [0]}\nseeds: two\n", "positive integer"),
    ]:
        with pytest.raises(SpaceError) as err:
            load_space(write(tmp_path, text))
        assert "seeds" in str(err.value) and why in str(err.value), str(err.value)


def test_the_architectures_space_runs_both_networks_under_the_same_kspace_attack(tmp_path):
    """Issue 22.3: U-Net vs unrolled, standard vs k-space PGD training, each point a valid trial at
    the demo profile (the unrolled network is valid only beside the space's k-space settings)."""

    from mriadv.units import robust_key

    space = load_space("architectures")
    assert [{k: p[k] for k in ("arch", "adversary", "epsilon")} for p in space.grid_points()[::3]] == [
        {"arch": "unet", "adversary": "none", "epsilon": 0},
        {"arch": "unrolled", "adversary": "none", "epsilon": 0},
        {"arch": "unet", "adversary": "pgd", "epsilon": 1000},
        {"arch": "unrolled", "adversary": "pgd", "epsilon": 1000},
    ]
    assert space.seeds == 3 and space.trial_count() == 12 and space.scheduler["type"] == "none"
    assert space.fixed == {"perturbation": "kspace", "attacks": ["pgd_kspace"], "report_protocol": "l2-kspace-curve"}
    assert [o.metric for o in space.objectives] == ["val_nmse", robust_key("pgd_kspace", 5000.0, "nmse")]
    assert space.attack_budgets == (1000.0, 5000.0)
    ctx = demo_context(space, tmp_path)
    for point in space.grid_points():
        cfg = trial_config(ctx, point)
        assert (cfg.arch, cfg.adversary_kind, cfg.seed) == (
            point["arch"],
            point["adversary"],
            point["seed"],
        )
        assert cfg.perturbation == "kspace" and cfg.attacks == ("pgd_kspace",)
        assert cfg.report_protocol == "l2-kspace-curve"
        assert cfg.epsilon == pytest.approx(scale_epsilon(point["epsilon"], cfg.crop_size))
    # without its k-space settings the unrolled point is refused, naming the key
    text = space.path.read_text().replace("  perturbation: kspace", "  perturbation: image")
    with pytest.raises(SpaceError, match="perturbation"):
        load_space(write(tmp_path, text))


def test_points_may_set_keys_valid_only_together(tmp_path):
    """SMUG's two keys are valid together or not at all: a point is checked whole (the repository's
    smug space loads), and a point that sets one alone is refused naming the point and the key."""
    space = load_space("smug")
    assert space.points == (
        {"unroll_smooth_samples": 0, "unroll_smooth_sigma": 0.0},
        {"unroll_smooth_samples": 2, "unroll_smooth_sigma": 0.1},
    )
    head = (
        "description: d\nfixed: {arch: unrolled, perturbation: kspace, attacks: [pgd_kspace]}\n"
        "objectives: [{metric: val_nmse, mode: min}]\npoints:\n"
    )
    bad = write(tmp_path, head + "  - {unroll_smooth_samples: 0}\n  - {unroll_smooth_samples: 2}\n")
    with pytest.raises(SpaceError, match=r"points\[1\]\.unroll_smooth_samples: config key 'unroll_smooth_sigma' = 0.0"):
        load_space(str(bad))
