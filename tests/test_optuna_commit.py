"""Optuna is told under the tables' rule (issue 21.5): what a trial reports reaches Optuna's database
only once a Tune state save that covers it has been copied (``study.search.commit``), so that after a
kill Optuna keeps the values of the timeline the resume goes on from, even where a re-run differs."""

from __future__ import annotations

import gc

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("ray.tune")

from ray import tune  # noqa: E402

from study.search import StudySearch, commit  # noqa: E402

COMPLETE, RUNNING = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING


def searcher(tmp_path, storage):
    return StudySearch(
        space={"epsilon": tune.uniform(0.0, 1.0)},
        metric="best_val_nmse",
        mode="min",
        sampler=optuna.samplers.RandomSampler(seed=0),
        storage=storage,
        study_name="commit",
        study_dir=str(tmp_path),
        curve_metric="val_nmse",
    )


def restored(tmp_path, storage, saved):
    """A fresh driver's searcher restored from a saved state, as Tune restores it on a resume."""
    search = searcher(tmp_path, storage)
    search.restore(str(saved))
    return search


def database(tmp_path, storage):
    """What an independent reader of the database sees (optuna-dashboard, the report)."""
    return optuna.load_study(study_name="commit", storage=storage).trials


def epoch(value, n, status="running"):
    return {"val_nmse": value, "best_val_nmse": value, "epoch": n, "epoch_status": status}


@pytest.fixture
def storage(tmp_path):
    return optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")


def test_nothing_reaches_optuna_before_the_save_that_covers_it(tmp_path, storage):
    search = searcher(tmp_path, storage)
    search.suggest("t1")
    search.on_trial_result("t1", epoch(0.5, 1))
    search.on_trial_complete("t1", epoch(0.4, 2, "completed"))
    (trial,) = database(tmp_path, storage)
    assert trial.state == RUNNING and trial.intermediate_values == {}
    commit(tmp_path / "another_study")  # another study's commit leaves it alone
    assert database(tmp_path, storage)[0].state == RUNNING
    commit(tmp_path)
    (trial,) = database(tmp_path, storage)
    assert trial.state == COMPLETE and trial.values == [0.4]
    assert trial.intermediate_values == {1: 0.5, 2: 0.4} and trial.user_attrs["status"] == "TERMINATED"


def test_a_kill_before_the_save_leaves_optuna_to_the_rerun(tmp_path, storage):
    """The first session ends the trial at 0.4 and is killed before a save covers it; the resume
    starts from the save after epoch 1 and its re-run (not bit-exact) ends at 0.3: Optuna says 0.3,
    as the tables do. Before this rule Optuna kept 0.4 and silently refused the second tell."""
    first = searcher(tmp_path, storage)
    first.suggest("t1")
    first.on_trial_result("t1", epoch(0.5, 1))
    first.save(str(tmp_path / "after_epoch_1.pkl"))
    commit(tmp_path)  # the save is copied: epoch 1 is told
    first.on_trial_complete("t1", epoch(0.4, 2, "completed"))  # ... and then the driver is killed
    del first
    gc.collect()  # the killed driver's searcher is gone
    second = restored(tmp_path, storage, tmp_path / "after_epoch_1.pkl")
    assert database(tmp_path, storage)[0].state == RUNNING
    second.on_trial_complete("t1", epoch(0.3, 2, "completed"))
    commit(tmp_path)
    (trial,) = database(tmp_path, storage)
    assert trial.state == COMPLETE and trial.values == [0.3] and trial.intermediate_values == {1: 0.5, 2: 0.3}


def test_a_kill_after_the_save_is_told_by_the_resume(tmp_path, storage):
    """Killed after the save that holds the trial's end was copied, before Optuna was told: the
    restored searcher tells it, once."""
    first = searcher(tmp_path, storage)
    first.suggest("t1")
    first.on_trial_complete("t1", epoch(0.4, 1, "early_stopped"))
    first.save(str(tmp_path / "covering.pkl"))
    del first  # killed before commit
    gc.collect()
    second = restored(tmp_path, storage, tmp_path / "covering.pkl")
    (trial,) = database(tmp_path, storage)
    assert trial.state == COMPLETE and trial.values == [0.4] and trial.user_attrs["status"] == "early_stopped"
    second.on_trial_complete("t1", epoch(0.4, 1, "early_stopped"))  # Tune's own duplicate is ignored
    commit(tmp_path)
    assert len(database(tmp_path, storage)) == 1 and "t1" in second._completed_trials
