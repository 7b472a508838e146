"""The study's Optuna searcher saves only what the database does not hold, and a searcher restored
from that save goes on with the same study."""

from __future__ import annotations

import pickle

import optuna
import pytest

pytest.importorskip("ray.tune.search.optuna")

POINTS = 40  # grid points of the test study
RUNNING = [f"t{POINTS - 4}", f"t{POINTS - 3}"]  # the trials still running at the save


def make_searcher(tmp_path, name="s"):
    from ray import tune

    from study.search import GridSampler, StudySearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = StudySearch(
        metric="best_val_nmse",
        mode="min",
        sampler=GridSampler({"epsilon": list(range(POINTS))}, seed=0),
        storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}"),
        study_name=name,
        study_dir=str(tmp_path),
        curve_metric="val_nmse",
    )
    searcher.set_search_properties(None, None, {"epsilon": tune.choice(list(range(POINTS)))})
    return searcher


def test_saved_searcher_is_small_and_resumes_the_study(tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    searcher = make_searcher(tmp_path)
    configs = {f"t{i}": searcher.suggest(f"t{i}") for i in range(POINTS - 2)}
    for i in range(POINTS - 4):  # finished; two still running, two not yet asked for
        searcher.on_trial_result(f"t{i}", {"val_nmse": 0.5 + i, "epoch": 1})
        searcher.on_trial_complete(f"t{i}", {"best_val_nmse": 0.5 + i, "val_nmse": 0.5 + i, "epoch": 1})
    searcher.commit()  # a save covered them: Optuna is told (study.search.commit)
    searcher.on_trial_result(RUNNING[0], {"val_nmse": 0.25, "epoch": 1})  # held by the save below

    ours, rays = tmp_path / "ours.pkl", tmp_path / "rays.pkl"
    searcher.save(str(ours))
    OptunaSearch.save(searcher, str(rays))
    saved = pickle.loads(ours.read_bytes())
    assert sorted(saved["_ot_trials"]) == RUNNING  # finished trials live in the database only
    assert saved["_completed_trials"] == {f"t{i}" for i in range(POINTS - 4)}
    cached = saved["_ot_study"]._storage
    assert cached._studies == {} and cached._trial_id_to_study_id_and_number == {}
    assert ours.stat().st_size < rays.stat().st_size / 3  # Ray's holds every trial, twice

    restored = make_searcher(tmp_path, name="s")  # what Tune does: build, then restore from the file
    restored.restore(str(ours))
    a, b = RUNNING
    restored.on_trial_result(a, {"val_nmse": 0.2, "epoch": 2})
    restored.on_trial_complete(a, {"best_val_nmse": 0.2, "val_nmse": 0.2, "epoch": 2})
    restored.on_trial_complete(b, {"best_val_nmse": 0.1, "val_nmse": 0.1, "epoch": 1})
    restored.on_trial_complete("t0", {"best_val_nmse": 9.0})  # finished before the save: ignored
    new = [f"t{i}" for i in range(POINTS - 2, POINTS)]
    configs.update({t: restored.suggest(t) for t in new})
    restored.commit()
    assert sorted(c["epsilon"] for c in configs.values()) == list(range(POINTS))  # every grid point once

    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    by_ray = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    assert len(study.trials) == POINTS
    assert by_ray["t0"].value == 0.5 and by_ray[a].value == 0.2 and by_ray[b].value == 0.1
    assert by_ray[a].intermediate_values == {1: 0.25, 2: 0.2}
    assert by_ray[a].user_attrs["status"] == "TERMINATED"
    assert [by_ray[t].state for t in new] == [optuna.trial.TrialState.RUNNING] * 2


def test_a_trial_told_before_a_kill_is_not_told_again(tmp_path):
    """Optuna is told only after a save covers a trial's end (study.search.commit), so a resume
    normally finds it still running; where it was told anyway (a study's copy of Tune's state cut short
    by a kill, and an older save restored), the trial reports its last epochs again and the searcher
    takes them without writing to the finished Optuna trial."""
    searcher = make_searcher(tmp_path)
    searcher.suggest("t0")
    searcher.save(str(tmp_path / "saved.pkl"))  # Tune's last save: t0 running
    searcher.on_trial_result("t0", {"val_nmse": 0.3, "epoch": 1})
    searcher.on_trial_complete("t0", {"best_val_nmse": 0.3, "val_nmse": 0.3, "epoch": 1})
    searcher.commit()  # then the kill

    restored = make_searcher(tmp_path)
    restored.restore(str(tmp_path / "saved.pkl"))
    restored.on_trial_result("t0", {"val_nmse": 0.3, "epoch": 1})  # the same epoch, run again
    restored.on_trial_complete("t0", {"best_val_nmse": 0.3, "val_nmse": 0.3, "epoch": 1})
    restored.commit()
    assert "t0" in restored._completed_trials
    (trial,) = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 0.3
