"""Assessing a checkpoint after training: it reproduces the recorded epoch, takes stronger attacks and
budgets in the seed's units, and rejects bad input by name."""

from __future__ import annotations

import json
import shutil

import pytest

from mriadv.assess import assess, main
from mriadv.config import ConfigError
from mriadv.fit import fit


def _fit(make, root, out, **kw):
    cfg = make(
        root,
        loss="mse",
        attack_budgets=(20.0, 80.0),
        pgd_steps=2,
        train_eval_volumes=0,
        max_epochs=2,
        max_train_batches=3,
        threads=1,
        **kw,
    )
    return fit(cfg, out_dir=out, log=None)


@pytest.fixture(scope="module")
def run(tiny_config, synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, _fit(tiny_config, synthetic_root, out)


def _check_reproduces(out, result):
    """best.pt reproduces, on each split, exactly what the run recorded there for its best epoch."""
    record = result.history[result.best_epoch - 1]
    sel = assess(out, split="selection")  # the folder: best.pt
    assert sel.checkpoint.endswith("best.pt") and sel.epoch == result.best_epoch
    for key in ("nmse", "psnr", "ssim", "loss"):
        assert sel.clean[key] == pytest.approx(getattr(record, f"val_{key}"), rel=1e-6), key
    rob = assess(out, split="robust")
    got = {(r["attack"], r["budget"]): r["nmse"] for r in rob.rows}
    want = {(r["attack"], r["budget"]): r["nmse"] for r in record.robustness}
    assert got.keys() == want.keys() and got == pytest.approx(want, rel=1e-6)
    final = result.history[-1].report  # held out: evaluated once, for the best epoch
    assert final is not None and final["epoch"] == result.best_epoch and final["split"] == "report"
    rep = assess(out)  # default: the report split
    assert rep.split == "report" and rep.clean["nmse"] == pytest.approx(final["clean"]["nmse"], rel=1e-6)
    got = {(r["attack"], r["budget"]): r["nmse"] for r in rep.rows}
    want = {(r["attack"], r["budget"]): r["nmse"] for r in final["robustness"]}
    assert got.keys() == want.keys() and got == pytest.approx(want, rel=1e-6)
    # checkpoint.pt holds the last epoch's networks as evaluated (nothing ran them in train mode after)
    last = assess(out / "checkpoint.pt", split="selection", attacks=["noise"])
    assert last.clean["nmse"] == pytest.approx(result.history[-1].val_nmse, rel=1e-6)
    # the report split and the selection split hold different volumes
    assert set(json.loads(final["clean"]["volume_nmse"])).isdisjoint(sel.clean["volume_nmse"])


def test_best_checkpoint_reproduces_its_epochs_record(run):
    _check_reproduces(*run)


def test_batch_norm_model_saved_is_the_model_evaluated(tiny_config, synthetic_root, tmp_path):
    """With batch norm, nothing after validation (the preview's PGD) may run the U-Net in train mode:
    that would overwrite its running statistics with perturbed validation slices before saving."""
    _check_reproduces(tmp_path, _fit(tiny_config, synthetic_root, tmp_path, unet_norm="batch"))


def test_budgets_in_the_seeds_units_and_a_stronger_attack(run):
    out, _ = run
    a = assess(out / "checkpoint.pt", budgets_ref=[1000.0, 5000.0], attacks=["pgd", "noise"], pgd_steps=5)
    assert a.config["pgd_steps"] == 5
    budgets = sorted({r["budget"] for r in a.rows})
    assert budgets == pytest.approx([1000.0 * 64**2 / 320**2, 5000.0 * 64**2 / 320**2])  # 40, 200
    assert sorted({r["budget_ref"] for r in a.rows}) == pytest.approx([1000.0, 5000.0])
    for r in a.rows:
        if r["attack"] == "noise":  # exactly on the sphere
            assert r["delta_sq"] == pytest.approx(r["budget"], rel=1e-5)
        else:  # inside the ball, and worse than clean
            assert r["delta_sq"] <= r["budget"] * (1 + 1e-5)
            assert r["d_nmse"] > 0


def test_bad_input_is_named(run, tmp_path, capsys):
    out, _ = run
    with pytest.raises(ConfigError, match="no such checkpoint"):
        assess(tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="holds no best.pt or checkpoint.pt"):
        assess(tmp_path)
    (tmp_path / "x.pt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="x.pt: not a readable mriadv checkpoint"):
        assess(tmp_path / "x.pt")
    (tmp_path / "empty.pt").write_bytes(b"")  # an EOFError without a message once ended in an IndexError
    assert main([str(tmp_path / "empty.pt")]) == 2
    assert "empty.pt: not a readable mriadv checkpoint (EOFError: empty)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not both"):
        assess(out, budgets=[1.0], budgets_ref=[1.0])
    with pytest.raises(ConfigError, match="pgd_steps"):
        assess(out, pgd_steps=0)
    assert main([str(out), "--data", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_cli_writes_json(run, tmp_path, capsys):
    out, _ = run
    assert main([str(out), "--attacks", "noise", "--budgets", "10", "--out", str(tmp_path / "a.json")]) == 0
    text = capsys.readouterr().out
    assert "clean" in text and "noise @ 250 (320²)" in text
    saved = json.loads((tmp_path / "a.json").read_text())
    assert [(r["attack"], r["budget"]) for r in saved["robustness"]] == [("noise", 10.0)]


def test_assess_on_a_flat_folder_of_validation_volumes(run, synthetic_root, tmp_path):
    out, _ = run
    flat = tmp_path / "val_only"
    shutil.copytree(synthetic_root / "singlecoil_val", flat)  # the same validation volumes, no sub-folders
    a, b = assess(out, data=flat, attacks=["noise"]), assess(out, attacks=["noise"])
    assert a.config["data"] == str(flat)
    keys = ("nmse", "psnr", "ssim", "loss", "num_volumes", "num_slices")
    assert {k: a.clean[k] for k in keys} == pytest.approx({k: b.clean[k] for k in keys}, rel=1e-6)
    assert [r["nmse"] for r in a.rows] == pytest.approx([r["nmse"] for r in b.rows], rel=1e-6)


# --- attack protocols, relative budgets, PGD options ----------------------------------------------
import math  # noqa: E402
from dataclasses import replace  # noqa: E402

import torch  # noqa: E402

from mriadv.attacks import PGDAttack  # noqa: E402
from mriadv.units import scale_epsilon  # noqa: E402
from mriadv.protocols import PROTOCOLS, get_protocol  # noqa: E402


def test_protocol_presets_load_with_their_sources():
    for name, proto in PROTOCOLS.items():
        assert get_protocol(name) is proto and proto.source and proto.differences
        attacks = proto.build(64, generator=lambda batch: torch.zeros_like(batch.image))
        assert len(attacks) == (len(proto.budgets_ref) + len(proto.rel_budgets)) * len(proto.attacks)
        for a in attacks:
            if isinstance(a, PGDAttack):
                assert (a.steps, a.step_scale, a.random_start, a.restarts, a.keep_best, a.objective) == (
                    proto.steps,
                    proto.step_scale,
                    proto.random_start,
                    proto.restarts,
                    proto.keep_best,
                    proto.objective,
                )
                assert (a.rel is None) == math.isfinite(a.budget)
    # the facts of the sources
    assert get_protocol("seed").budgets_at(64) == pytest.approx((40.0, 200.0))
    k = get_protocol("l2-kspace-100")
    assert (k.attacks, k.steps, k.step_scale, k.random_start, k.restarts) == (("pgd_kspace",), 100, 2.5, None, 1)
    assert [r * r for r in k.rel_budgets] == pytest.approx([0.003 * i for i in range(1, 11)], rel=1e-5)
    g = get_protocol("l2-kspace-restarts")
    assert g.rel_budgets == (0.0025, 0.005, 0.01, 0.015, 0.02, 0.025) and g.restarts == 6
    assert get_protocol("deviation-kspace").objective == "deviation"
    with pytest.raises(ConfigError, match="unknown attack protocol 'nope'"):
        get_protocol("nope")
    with pytest.raises(ConfigError, match="random start"):
        replace(get_protocol("seed"), restarts=2)


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_each_protocol_runs_on_a_tiny_model(run, name):
    out, _ = run
    proto = get_protocol(name)
    rel = [0.02] if proto.restarts > 1 else None  # one level of the restart protocol keeps this short
    a = assess(out, protocol=name, pgd_steps=1, rel_budgets=rel)
    assert a.protocol["name"] == name and a.protocol["steps"] == 1
    grid = set(rel or proto.rel_budgets)
    assert len(a.rows) == len(a.protocol["budgets"]) * len(proto.attacks) + len(grid) * len(proto.attacks)
    for r in a.rows:
        if math.isnan(r["rel"]):  # absolute
            assert r["budget"] in a.protocol["budgets"] and r["delta_sq"] <= r["budget"] * (1 + 1e-5)
        else:
            assert math.isnan(r["budget"]) and r["rel"] in grid
            if r["attack"].startswith("noise"):
                assert r["delta_rel"] == pytest.approx(r["rel"], rel=1e-5)
            else:
                assert 0 < r["delta_rel"] <= r["rel"] * (1 + 1e-5)
    pgd_rows = [r for r in a.rows if r["attack"].startswith("pgd")]
    assert len(a.pgd_trace) == len(pgd_rows)
    for t in a.pgd_trace:
        assert len(t["trace"]) == proto.restarts and all(len(run_) == 2 for run_ in t["trace"])


def test_seed_protocol_is_the_training_attacks_at_the_seeds_budgets(run):
    out, _ = run
    a = assess(out, protocol="seed", pgd_steps=2)
    b = assess(out, budgets_ref=[1e3, 5e3], attacks=["pgd", "noise", "generator"], pgd_steps=2)
    assert [(r["attack"], r["budget"]) for r in a.rows] == [(r["attack"], r["budget"]) for r in b.rows]
    assert {r["budget"] for r in a.rows} == {scale_epsilon(1e3, 64), scale_epsilon(5e3, 64)}
    assert [r["nmse"] for r in a.rows] == [r["nmse"] for r in b.rows]
    assert b.protocol is None and len(b.pgd_trace) == 2  # the trained path records its traces too


def test_relative_budgets_and_pgd_options_without_a_protocol(run):
    out, _ = run
    a = assess(out, rel_budgets=[0.05], attacks=["pgd", "noise"], pgd_steps=1)
    assert [(r["attack"], r["rel"]) for r in a.rows] == [("pgd", 0.05), ("noise", 0.05)]
    assert a.protocol["name"] == "trained" and a.protocol["budgets"] == []
    noise = a.rows[1]
    assert noise["delta_rel"] == pytest.approx(0.05, rel=1e-5)
    assert noise["delta_sq"] == pytest.approx(0.05**2 * 64 * 64, rel=0.1)  # ||x~||^2 ~ h w (z-scored, clamped)
    b = assess(out, attacks=["pgd"], pgd_steps=1, pgd_restarts=2, pgd_random_start="uniform", pgd_keep_best=True)
    assert [r["budget"] for r in b.rows] == [20.0, 80.0]  # the training's budgets
    assert (b.protocol["restarts"], b.protocol["random_start"], b.protocol["keep_best"]) == (2, "uniform", True)
    assert all(len(t["trace"]) == 2 for t in b.pgd_trace)
    with pytest.raises(ConfigError, match="random start"):
        assess(out, pgd_restarts=2)
    with pytest.raises(ConfigError, match="not both"):
        assess(out, protocol="seed", attacks=["pgd"])
    with pytest.raises(ConfigError, match="rel_budgets"):
        assess(out, rel_budgets=[-0.1])


def test_cli_protocol_writes_the_trace(run, tmp_path, capsys):
    out, _ = run
    assert main(["--list-protocols"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in PROTOCOLS) and "Krainovic" in listed
    path = tmp_path / "p.json"
    assert (
        main(
            [
                str(out),
                "--protocol",
                "deviation-kspace",
                "--pgd-steps",
                "2",
                "--rel-budgets",
                "0.05",
                "--out",
                str(path),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "protocol deviation-kspace" in text and "pgd_kspace @ rel 0.05" in text and "objective per step" in text
    saved = json.loads(path.read_text())
    assert saved["protocol"]["objective"] == "deviation" and saved["protocol"]["rel_budgets"] == [0.05]
    (trace,) = saved["pgd_trace"]
    assert trace["attack"] == "pgd_kspace" and trace["rel"] == 0.05 and len(trace["trace"][0]) == 3
