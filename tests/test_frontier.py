"""The frontier space's parts (issue 22.3): a sampled space's reference trial (run first, outside the
sampled ranges), fine-tuning from its best.pt, and the report's best recipe within 0.5 dB of it."""

from __future__ import annotations

import json
import math
import threading
import time

import pandas as pd
import pytest

from study.layout import REFERENCE_FILE, REFERENCE_KEY
from study.reference import record_reference, resolve_sampled
from study.spaces import SpaceError, load_space, space_from_dict

SAMPLED = {
    "parameters": {"adversary": {"choice": ["pgd", "noise"]}, "epsilon": {"loguniform": [100, 5000]}},
    "objectives": [{"metric": "val_nmse", "mode": "min"}],
}


def test_the_frontier_space_has_its_reference_and_fine_tunes_it():
    space = load_space("frontier")
    assert space.reference == {"adversary": "none", "epsilon": 0, "lambda1": 1.0, "init_from": None}
    assert space.fine_tunes_reference and space.scheduler["type"] == "asha" and len(space.objectives) == 2
    kinds = next(p for p in space.params if p.name == "adversary").values
    assert set(kinds) == {"pgd", "trades", "noise", "smoothing"}


@pytest.mark.parametrize(
    "extra, key, why",
    [
        ({"reference": {"adversary": "none"}}, "reference", "every searched parameter"),
        ({"reference": {"adversary": "none", "epsilon": 0, "lr": 1}}, "reference.lr", "not a TrainConfig field"),
        ({"reference": {"adversary": "nothing", "epsilon": 0}}, "reference.adversary", "adversary"),
        ({"reference": "standard"}, "reference", "mapping"),
    ],
)
def test_a_bad_reference_is_refused_naming_the_key(tmp_path, extra, key, why):
    with pytest.raises(SpaceError, match=rf"{tmp_path / 's.yaml'}: {key}: .*{why}"):
        space_from_dict({**SAMPLED, **extra}, "s", tmp_path / "s.yaml")


def test_fine_tuning_needs_a_reference_and_a_sampled_space(tmp_path):
    params = {**SAMPLED["parameters"], "init_from": {"choice": [None, "reference"]}}
    with pytest.raises(SpaceError, match="parameters.init_from: 'reference' fine-tunes"):
        space_from_dict({**SAMPLED, "parameters": params}, "s", tmp_path / "s.yaml")
    grid = {"parameters": {"epsilon": {"grid": [0, 1000]}}, "reference": {"epsilon": 0}}
    with pytest.raises(SpaceError, match="reference: is for a sampled space"):
        space_from_dict(grid, "s", tmp_path / "s.yaml")


def test_the_searcher_runs_the_reference_first_and_alone(tmp_path):
    optuna = pytest.importorskip("optuna")
    tune = pytest.importorskip("ray.tune")
    from study.search import StudySearch, commit

    search = StudySearch(
        space={"adversary": tune.choice(["pgd", "noise"]), "epsilon": tune.loguniform(100, 5000)},
        metric=["best_val_nmse", "best_rob"],
        mode=["min", "min"],
        sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=1),
        storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}"),
        study_name="f",
        study_dir=str(tmp_path),
        curve_metric="val_nmse",
        reference={"adversary": "none", "epsilon": 0},
        reference_first=True,
    )
    assert search.suggest("ref") == {"adversary": "none", "epsilon": 0, REFERENCE_KEY: True}
    assert search.suggest("t1") is None  # fine-tuned trials would wait for it: none starts beside it
    search.on_trial_complete("ref", {"best_val_nmse": 0.1, "best_rob": 0.5, "epoch": 1})
    commit(tmp_path)
    configs = [search.suggest(f"t{i}") for i in range(1, 4)]
    assert all(c["adversary"] in ("pgd", "noise") and 100 <= c["epsilon"] <= 5000 for c in configs)
    for i, c in enumerate(configs, 1):  # TPE goes on with the reference among its trials (no params)
        search.on_trial_complete(f"t{i}", {"best_val_nmse": 0.1 + i, "best_rob": 0.5 - i / 10, "epoch": 1})
    commit(tmp_path)
    assert search.suggest("t4")["adversary"] in ("pgd", "noise")
    trials = optuna.load_study(study_name="f", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    assert trials[0].user_attrs["reference"] is True and trials[0].params == {} and trials[0].values == [0.1, 0.5]


def test_a_fine_tuned_trial_waits_for_the_reference_best(tmp_path):
    folder = tmp_path / "trial_ref"
    folder.mkdir()
    (folder / "best.pt").write_bytes(b"weights")
    lines: list[str] = []
    threading.Timer(0.3, record_reference, (tmp_path, "ref", folder, "TERMINATED")).start()  # the driver, later
    t0 = time.monotonic()
    values = resolve_sampled({"epsilon": 10.0, "init_from": "reference"}, tmp_path, lines.append)
    assert values == {"epsilon": 10.0, "init_from": str(folder / "best.pt")} and time.monotonic() - t0 >= 0.3
    assert len(lines) == 1 and "waiting for the space's reference trial" in lines[0]
    assert resolve_sampled({"epsilon": 0, REFERENCE_KEY: True, "init_from": None}, tmp_path, lines.append) == {
        "epsilon": 0,
        "init_from": None,
    }


def test_a_moved_study_folder_fine_tunes_the_reference_where_it_now_is(tmp_path):
    study = tmp_path / "study"
    (study / "trial_ref").mkdir(parents=True)
    (study / "trial_ref" / "best.pt").write_bytes(b"weights")
    record_reference(study, "ref", study / "trial_ref", "TERMINATED")
    study.rename(tmp_path / "moved")
    values = resolve_sampled({"init_from": "reference"}, tmp_path / "moved", print)
    assert values == {"init_from": str(tmp_path / "moved" / "trial_ref" / "best.pt")}


def test_a_reference_without_a_best_fails_the_fine_tuned_trial_in_one_line(tmp_path):
    record_reference(tmp_path, "ref", None, "ERROR")
    assert json.loads((tmp_path / REFERENCE_FILE).read_text())["best"] is None
    with pytest.raises(RuntimeError, match="reference trial None ended ERROR without a best.pt"):
        resolve_sampled({"init_from": "reference"}, tmp_path, print)


def test_the_best_recipe_within_half_a_decibel(tmp_path):
    """Chosen on the selection split where every configuration has its figures, reported held-out."""
    from study.report_findings import _within_psnr

    d = "Δ PGD dNMSE"
    versus = pd.DataFrame(
        {
            "configuration": ["a", "b", "c"],
            d: [-0.05, -0.20, -0.01],
            f"{d} ±": [0.01, 0.02, 0.01],
            f"{d} %": [-10.0, -40.0, -2.0],
            f"{d} % ±": [2.0, 4.0, 2.0],
            "ΔPSNR": [-0.3, -1.2, 0.1],
            "ΔPSNR ±": [0.1, 0.1, 0.1],
        }
    )
    # no selection figures: chosen on the held-out point estimates, and said so
    (line,) = _within_psnr(versus, "std", d, "pgd", 5000)
    assert "on the held-out volumes, the best recipe there is a: held-out PGD@5000 degradation -10.0 ± 2.0 %" in line
    assert "(a gain) at -0.30 ± 0.10 dB" in line  # b costs 1.2 dB
    far = versus.assign(ΔPSNR=[-0.9, -1.2, -0.7])
    (line,) = _within_psnr(far, "std", d, "pgd", 5000)
    assert "no configuration is within 0.5 dB of std's clean PSNR on the held-out volumes" in line
    assert "the closest there, c, at -0.70 ± 0.10 dB held-out, changes" in line
    assert _within_psnr(versus.assign(ΔPSNR=math.nan), "std", d, "pgd", 5000) == []
    # on the selection split b is within 0.5 dB and cuts most there: b is chosen, its held-out cost shown
    picked = versus.assign(**{"selection ΔPSNR": [-0.2, -0.4, 0.0], "selection %": [-15.0, -35.0, -1.0]})
    (line,) = _within_psnr(picked, "std", d, "pgd", 5000)
    assert "on the selection volumes, the best recipe there is b: held-out PGD@5000 degradation -40.0 ± 4.0 %" in line
    assert "at -1.20 ± 0.10 dB" in line
    gap = picked.assign(**{"selection ΔPSNR": [-0.6, -0.9, math.nan]})  # one configuration without: held-out
    assert "on the held-out volumes" in _within_psnr(gap, "std", d, "pgd", 5000)[0]


def test_the_findings_choose_on_the_selection_volumes_and_report_the_held_out_figures(monkeypatch):
    """Where the selection split and the held-out split would pick differently, the findings name the
    selection split's pick, with its held-out figures; without selection figures, the held-out pick."""
    import study.report_findings as rf
    from study.report_seeds import ConfigurationTables

    monkeypatch.setattr(rf, "held_out", lambda res, model="trained": pd.DataFrame({"attack": ["clean"], "nmse": [0.1]}))
    d = "Δ PGD dNMSE"
    table = pd.DataFrame(
        {
            "configuration": ["std", "a", "b"],
            "seeds": [1, 1, 1],
            "NMSE": [0.040, 0.035, 0.038],  # held-out: a is best
            "NMSE ±": [0.002] * 3,
            "selection NMSE": [0.050, 0.052, 0.047],  # selection: b is best
        }
    )
    versus = pd.DataFrame(
        {
            "configuration": ["a", "b"],
            "ΔNMSE": [-0.005, -0.002],
            "ΔNMSE ±": [0.001, 0.001],
            d: [-0.10, -0.05],  # held-out: a cuts more
            f"{d} ±": [0.01, 0.01],
            f"{d} %": [-33.0, -17.0],
            f"{d} % ±": [3.0, 3.0],
            "ΔPSNR": [-0.2, -0.1],
            "ΔPSNR ±": [0.1, 0.1],
            "selection ΔPSNR": [-0.3, -0.1],
            "selection %": [-10.0, -25.0],  # selection: b cuts more
        }
    )
    tables = ConfigurationTables(table, versus, "std", ["std"], "pgd", 5000.0)
    first, second, third = rf.findings(None, tables)
    assert first.startswith("found: best clean NMSE b (chosen on the selection volumes): held-out 0.0380 ± 0.0020")
    assert "zero-filled input 0.1000; std 0.0400" in first
    assert ", b (chosen on the selection volumes) changes the held-out degradation by -0.0500 ± 0.0100" in second
    assert "the best recipe there is b: held-out PGD@5000 degradation -17.0 ± 3.0 %" in third
    plain = tables._replace(table=table.drop(columns="selection NMSE"), versus=versus.drop(columns="selection %"))
    first, second, _ = rf.findings(None, plain)
    assert first.startswith("found: best clean NMSE a (chosen on the held-out volumes): held-out 0.0350")
    assert ", a (chosen on the held-out volumes) changes the held-out degradation by -0.1000" in second


def test_the_comparison_says_that_fine_tuned_configurations_had_more_training():
    from study.report_seeds import ConfigurationTables, configurations_markdown

    ref = "adversary=none, init_from=scratch"
    rows = [
        "adversary=pgd, init_from=reference",
        "adversary=pgd, init_from=scratch",
        "adversary=trades, init_from=reference",
    ]
    table = pd.DataFrame({"configuration": [ref, *rows], "seeds": [1] * 4})
    versus = pd.DataFrame({"configuration": rows, "seeds": [1] * 3})
    text = "\n".join(configurations_markdown(ConfigurationTables(table, versus, ref, [ref], "pgd", 5000.0)))
    assert "The 2 configurations with an `init_from` other than scratch started from a trained model" in text
    plain = versus.iloc[[1]]
    assert "other than scratch" not in "\n".join(
        configurations_markdown(ConfigurationTables(table, plain, ref, [ref], "pgd", 5000.0))
    )


def test_a_fine_tuned_trial_costs_the_reference_too(tmp_path):
    """The report's minutes per trial: a fine-tuned trial's own, plus the reference's shown beside."""
    from study.report_data import load_results
    from study.report_summary import _minutes

    rows = [
        {"trial_id": t, "epoch": e, "epoch_time_s": s, "init_from": init, "val_nmse": 0.1, "val_loss": 0.1}
        for t, init, s in (
            ("aaaa0001", "scratch", 60.0),
            ("bbbb0002", "reference", 30.0),
            ("cccc0003", "scratch", 90.0),
        )
        for e in (1, 2)
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "trials.parquet", index=False)
    pd.DataFrame({"trial_id": [], "attack": []}).to_parquet(tmp_path / "robustness.parquet", index=False)
    assert _minutes(load_results(tmp_path)) == {"aaaa0001": "2.0", "bbbb0002": "1.0", "cccc0003": "3.0"}
    (tmp_path / "trial_aaaa0001_adversary=none").mkdir()
    record_reference(tmp_path, "aaaa0001", tmp_path / "trial_aaaa0001_adversary=none", "TERMINATED")
    assert _minutes(load_results(tmp_path))["bbbb0002"] == "1.0 + 2.0 (reference)"


def test_a_fine_tuned_trial_never_waits_for_ever(tmp_path):
    """Without the reference's record (the searcher never lets that happen), a bounded wait, then one line."""
    from study.reference import reference_checkpoint

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="no record of the reference trial's end in .* after 0.2 s"):
        reference_checkpoint(tmp_path, lambda _line: None, poll_s=0.05, wait_s=0.2)
    assert time.monotonic() - t0 < 5
