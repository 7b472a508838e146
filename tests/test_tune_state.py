"""Tune's experiment state survives a hard kill: the study's own complete copy, its repair of
truncated files before a resume, and result tables that never run ahead of that state."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from study.tune_state import CORRUPT_SUFFIX, backup_state, is_complete, repair_state

S1, S2 = "2026-01-01_10-00-00", "2026-01-01_11-00-00"  # two driver sessions; names sort by time


def write_state(folder: Path, session: str, marker: int) -> None:
    """The three files Tune writes per session (the search states are pickles, one named .json)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"experiment_state-{session}.json").write_text(json.dumps({"trial_data": [marker] * 50}))
    (folder / f"search_gen_state-{session}.json").write_bytes(pickle.dumps({"counter": marker}))
    (folder / f"searcher-state-{session}.pkl").write_bytes(pickle.dumps({"trials": list(range(marker))}))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_complete_and_truncated_files(tmp_path):
    write_state(tmp_path, S1, 3)
    files = sorted(tmp_path.iterdir())
    assert all(is_complete(f) for f in files)
    for f in files:
        truncate(f)
        assert not is_complete(f), f.name
    empty = tmp_path / f"searcher-state-{S2}.pkl"
    empty.write_bytes(b"")
    assert not is_complete(empty) and not is_complete(tmp_path / "missing.json")


def test_backup_copies_a_complete_set_only(tmp_path):
    staging, study = tmp_path / "staging", tmp_path / "study"
    write_state(staging, S1, 1)
    assert backup_state(staging, study)
    write_state(staging, S2, 2)  # a resumed session: the older session's files stay in staging
    truncate(staging / f"searcher-state-{S2}.pkl")
    assert not backup_state(staging, study)  # an incomplete set is not copied ...
    kept = sorted(p.name for p in (study / ".tune_state").iterdir())
    assert kept == sorted(p.name for p in staging.iterdir() if S1 in p.name)  # ... the last good set stays
    write_state(staging, S2, 2)
    assert backup_state(staging, study)
    assert sorted(p.name for p in (study / ".tune_state").iterdir()) == sorted(
        p.name for p in staging.iterdir() if S2 in p.name
    )  # only the newest set is kept


def test_repair_restores_the_copy_over_a_truncated_or_stale_file(tmp_path):
    write_state(tmp_path / ".tune_state", S1, 7)
    write_state(tmp_path, S1, 6)  # Tune's background copy lags one step
    truncate(tmp_path / f"experiment_state-{S1}.json")  # and was cut by the kill
    notes = repair_state(tmp_path)
    assert len(notes) == 3 and "truncated" in notes[0] and "behind" in notes[1]
    for name in (f"experiment_state-{S1}.json", f"search_gen_state-{S1}.json", f"searcher-state-{S1}.pkl"):
        assert (tmp_path / name).read_bytes() == (tmp_path / ".tune_state" / name).read_bytes()
    assert repair_state(tmp_path) == []  # idempotent


def test_repair_moves_a_truncated_newer_session_aside(tmp_path):
    write_state(tmp_path, S1, 1)
    write_state(tmp_path, S2, 2)  # killed during its first write, before any copy was kept
    truncate(tmp_path / f"experiment_state-{S2}.json")
    notes = repair_state(tmp_path)
    assert notes == [f"experiment_state-{S2}.json is truncated (the driver was killed while writing it): moved aside"]
    assert (tmp_path / f"experiment_state-{S2}.json{CORRUPT_SUFFIX}").is_file()
    assert max(p.name for p in tmp_path.glob("experiment_state-*.json")) == f"experiment_state-{S1}.json"
    assert (tmp_path / f"searcher-state-{S2}.pkl").is_file()  # complete files are left alone


class FakeTrial(SimpleNamespace):
    pass


def test_results_wait_for_their_checkpoint_and_the_step_end(tmp_path):
    """What a reader sees (the Parquet files with the journal replayed, study/tables.py) never runs
    ahead of Tune's saved state; the end of the study leaves whole Parquet files and no journal."""
    from study.results import ResultsCallback
    from study.tables import load_tables

    staging = tmp_path / "staging"
    write_state(staging, S1, 1)
    trial = FakeTrial(
        trial_id="t1",
        config={"epsilon": 0.0},
        path=None,  # Tune's Trial.path: None before a folder
        storage=SimpleNamespace(experiment_driver_staging_path=str(staging)),
    )
    study = tmp_path / "study"
    cb = ResultsCallback(study, record_processes=False)
    table = study / "trials.parquet"
    result = {"epoch": 1, "val_nmse": 0.5, "should_checkpoint": True, "robustness_json": "[]"}
    cb.on_trial_start(0, [trial], trial)
    cb.on_trial_result(0, [trial], trial, result)
    cb.on_step_end(0, [trial])
    assert load_tables(study)[0].empty  # Tune has not registered the epoch's checkpoint yet
    cb.on_checkpoint(1, [trial], trial, checkpoint=None)
    assert load_tables(study)[0].empty  # registered, but Tune saves its state only at the end of the step
    cb.on_step_end(1, [trial])
    rows = load_tables(study)[0]
    assert list(rows["epoch"]) == [1] and rows["val_nmse"].iloc[0] == 0.5
    assert (study / ".tune_state" / f"experiment_state-{S1}.json").is_file()
    cb.on_trial_result(2, [trial], trial, {**result, "epoch": 2})
    cb.on_trial_complete(2, [trial], trial)  # a trial that ends releases what it reported
    cb.on_step_end(2, [trial])
    rows = load_tables(study)[0]
    assert list(rows["epoch"]) == [1, 2] and set(rows["status"]) == {"TERMINATED"}
    cb.on_experiment_end([trial])
    rows = pd.read_parquet(table)
    assert list(rows["epoch"]) == [1, 2] and set(rows["status"]) == {"TERMINATED"}
    assert (study / "tables.journal").stat().st_size == 0


def test_runner_refuses_to_resume_without_any_complete_state(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    study = tmp_path / "results" / "eps_sweep"
    study.mkdir(parents=True)
    (study / "study.json").write_text(json.dumps({"profile": "smoke", "base": {"data": str(tmp_path)}}))
    (study / "tuner.pkl").write_bytes(b"")
    write_state(study, S1, 1)
    truncate(study / f"experiment_state-{S1}.json")
    out = subprocess.run(
        [
            sys.executable,
            str(repo / "study" / "run.py"),
            "--space",
            "eps_sweep",
            "--results",
            str(tmp_path / "results"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert "moved aside" in out.stdout and "cannot resume study 'eps_sweep'" in out.stderr
    assert (study / f"experiment_state-{S1}.json{CORRUPT_SUFFIX}").is_file()  # kept, not deleted
