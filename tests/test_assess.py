"""Assessing a checkpoint after training: it reproduces the recorded epoch, takes stronger attacks and
budgets in the seed's units, and rejects bad input by name."""

from __future__ import annotations

import json
import shutil

import pytest

from mriadv.assess import assess, main
from mriadv.config import ConfigError, TrainConfig
from mriadv.training import fit


def _fit(root, out, **kw):
    cfg = TrainConfig.from_dict(dict(
        data=str(root), crop_size=64, unet_chans=4, unet_pools=2, gen_chans=4, batch_size=2,
        epsilon=20.0, loss="mse", attack_budgets=(20.0, 80.0), pgd_steps=2, train_eval_volumes=0,
        max_epochs=2, max_train_batches=3, device="cpu", threads=1, **kw))
    return fit(cfg, out_dir=out, log=None)


@pytest.fixture(scope="module")
def run(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, _fit(synthetic_root, out)


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


def test_batch_norm_model_saved_is_the_model_evaluated(synthetic_root, tmp_path):
    """With batch norm, nothing after validation (the preview's PGD) may run the U-Net in train mode:
    that would overwrite its running statistics with perturbed validation slices before saving."""
    _check_reproduces(tmp_path, _fit(synthetic_root, tmp_path, unet_norm="batch"))


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
    with pytest.raises(ConfigError, match="x.pt: cannot load"):
        assess(tmp_path / "x.pt")
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
