"""Tune's experiment state survives a hard kill: the study's own complete copy, its repair of
truncated files before a resume, and result tables that never run ahead of that state."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from study.tune_state import CORRUPT_SUFFIX, UNPAIRED_SUFFIX, backup_state, is_complete, newest, repair_state

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
    kept = sorted(p.name for p in (study / ".tune_state").iterdir() if not p.name.startswith("."))
    assert kept == sorted(p.name for p in staging.iterdir() if S1 in p.name)  # ... the last good set stays
    (staging / f"searcher-state-{S2}.pkl").unlink()  # a set of two sessions (S2's save cut short) is not either
    assert not backup_state(staging, study)
    write_state(staging, S2, 2)
    assert backup_state(staging, study)
    assert sorted(p.name for p in (study / ".tune_state").iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in staging.iterdir() if S2 in p.name
    )  # only the newest set is kept


def test_backup_shares_replaced_files_until_a_resume_gives_it_its_own(tmp_path):
    """With ``link`` the backup is the staging files themselves (no bytes copied); a save replaces
    the staging files by new ones, so the backup keeps the old complete set; before a resume the
    backup gets files of its own, since Tune's download of its state writes into the staging files."""
    import os

    staging, study = tmp_path / "staging", tmp_path / "study"
    write_state(staging, S1, 1)
    assert backup_state(staging, study, link=True)
    name = f"experiment_state-{S1}.json"
    ours = study / ".tune_state" / name
    assert ours.stat().st_ino == (staging / name).stat().st_ino
    before = ours.read_bytes()
    new = staging / f".{name}.new"  # the next save, as Tune's searcher and study.tune_state write it
    new.write_text(json.dumps({"trial_data": [2] * 50}))
    os.replace(new, staging / name)
    assert ours.read_bytes() == before and is_complete(ours)
    assert backup_state(staging, study, link=True) and json.loads(ours.read_bytes()) == {"trial_data": [2] * 50}
    repair_state(study)
    assert all(f.stat().st_nlink == 1 for f in (study / ".tune_state").iterdir())
    (staging / name).write_text("{")  # a write in place into the staging file (Tune's download on a resume)
    assert json.loads(ours.read_bytes()) == {"trial_data": [2] * 50}


def test_repair_restores_the_copy_over_a_truncated_or_stale_file(tmp_path):
    write_state(tmp_path / ".tune_state", S1, 7)
    write_state(tmp_path, S1, 6)  # Tune's background copy lags one step
    truncate(tmp_path / f"experiment_state-{S1}.json")  # and was cut by the kill
    notes = repair_state(tmp_path)
    assert len(notes) == 3 and "truncated" in notes[0] and "behind" in notes[1]
    for name in (f"experiment_state-{S1}.json", f"search_gen_state-{S1}.json", f"searcher-state-{S1}.pkl"):
        assert (tmp_path / name).read_bytes() == (tmp_path / ".tune_state" / name).read_bytes()
    assert repair_state(tmp_path) == []  # idempotent


def loaded_set(folder: Path) -> list[Path]:
    """The three files Tune 2.60 restores from: the greatest name of each kind (its `max()` of a listing)."""
    return [newest(folder, p) for p in ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl")]


def test_repair_moves_a_truncated_newer_session_aside_with_its_searcher(tmp_path):
    write_state(tmp_path, S1, 1)
    write_state(tmp_path, S2, 2)  # killed during its first write, before any copy was kept
    truncate(tmp_path / f"experiment_state-{S2}.json")
    notes = repair_state(tmp_path)
    assert notes[0] == f"experiment_state-{S2}.json is truncated (the driver was killed while writing it): moved aside"
    assert (tmp_path / f"experiment_state-{S2}.json{CORRUPT_SUFFIX}").is_file()
    # S2's complete search states go aside too: with S1's experiment state they would be another save's
    assert len(notes) == 3 and all("moved aside" in n for n in notes[1:])
    assert (tmp_path / f"searcher-state-{S2}.pkl{UNPAIRED_SUFFIX}").is_file()
    assert [p.name for p in loaded_set(tmp_path)] == [
        f"experiment_state-{S1}.json",
        f"search_gen_state-{S1}.json",
        f"searcher-state-{S1}.pkl",
    ]


def test_repair_restores_one_set_after_a_kill_in_a_resumed_sessions_first_save(tmp_path):
    """Issue 21, 6a: the resumed session S2's first save reached the study folder with its experiment
    state only (the driver was killed before the searcher's files and before the study's copy of S2).
    Tune would pair S2's experiment state (trials S1's searcher never saw) with S1's searcher, and
    OptunaSearch.on_trial_complete then raised KeyError at this and every later resume."""
    staging, study = tmp_path / "staging", tmp_path / "study"
    write_state(staging, S1, 1)
    assert backup_state(staging, study)  # S1's last save, copied
    write_state(study, S1, 1)  # and synced into the study folder by Tune
    (study / f"experiment_state-{S2}.json").write_text(json.dumps({"trial_data": [2] * 60}))  # complete
    notes = repair_state(study)
    backup = sorted(p for p in (study / ".tune_state").iterdir() if not p.name.startswith("."))
    # what Tune loads is the copy's set, whole: S1's three files (names sort as the kinds do)
    assert [(p.name, p.read_bytes()) for p in loaded_set(study)] == [(p.name, p.read_bytes()) for p in backup]
    assert notes == [
        f"experiment_state-{S2}.json is of a save cut short (the driver was killed while saving): moved aside"
    ]
    assert (study / f"experiment_state-{S2}.json{UNPAIRED_SUFFIX}").is_file()  # kept, not deleted
    assert repair_state(study) == []


def test_repair_puts_back_the_copy_of_the_newer_session_as_a_whole(tmp_path):
    """The study's copy holds S2's first save while the study folder holds S1's files and S2's
    experiment state only (Tune's background copy was cut short): the copy's three files are put back."""
    staging, study = tmp_path / "staging", tmp_path / "study"
    write_state(study, S1, 1)
    write_state(staging, S2, 2)
    assert backup_state(staging, study)
    (study / f"experiment_state-{S2}.json").write_bytes((staging / f"experiment_state-{S2}.json").read_bytes())
    notes = repair_state(study)
    assert [p.read_bytes() for p in loaded_set(study)] == [
        (staging / n).read_bytes()
        for n in (f"experiment_state-{S2}.json", f"search_gen_state-{S2}.json", f"searcher-state-{S2}.pkl")
    ]
    assert len(notes) == 2 and all("was missing: restored the study's own copy" in n for n in notes)


def test_a_copy_cut_short_by_a_kill_is_not_used(tmp_path):
    """A kill between the copies of one backup leaves the copy with files of two saves: its record
    no longer matches, and the study folder's newest complete set is loaded instead, untouched."""
    import os

    staging, study = tmp_path / "staging", tmp_path / "study"
    write_state(staging, S2, 2)
    assert backup_state(staging, study)
    write_state(study, S1, 1)
    write_state(study, S2, 2)
    before = [p.read_bytes() for p in loaded_set(study)]
    ours = study / ".tune_state" / f"experiment_state-{S2}.json"
    new = ours.with_name(".next")  # the next save's experiment state copied, its searcher not yet
    new.write_text(json.dumps({"trial_data": [3] * 50}))
    os.replace(new, ours)
    assert repair_state(study) == []
    assert [p.read_bytes() for p in loaded_set(study)] == before


class FakeTrial(SimpleNamespace):
    pass


def test_results_wait_for_their_checkpoint_and_tunes_next_save(tmp_path):
    """What a reader sees (the Parquet files with the journal replayed, study/tables.py) never runs
    ahead of Tune's saved state: events reach it at the end of a step in which Tune saved (here:
    rewrote its staging files); the end of the study leaves whole Parquet files and no journal."""
    import os

    from study.results import ResultsCallback
    from study.tables import load_tables

    staging = tmp_path / "staging"
    trial = FakeTrial(
        trial_id="t1",
        config={"epsilon": 0.0},
        path=None,  # Tune's Trial.path: None before a folder
        storage=SimpleNamespace(experiment_driver_staging_path=str(staging)),
    )
    saves = iter(range(1, 100))

    def tune_saves():  # a new set of files, as Tune's save (and study.tune_state's, atomically) writes
        write_state(staging, S1, next(saves))
        for f in staging.iterdir():
            os.utime(f, ns=(f.stat().st_mtime_ns + 10**9,) * 2)  # a save within the clock's resolution

    study = tmp_path / "study"
    cb = ResultsCallback(study, record_processes=False)
    table = study / "trials.parquet"
    result = {"epoch": 1, "val_nmse": 0.5, "should_checkpoint": True, "robustness_json": "[]"}
    cb.on_step_end(0, [trial])  # nothing saved yet, nothing to journal
    cb.on_trial_start(0, [trial], trial)
    cb.on_trial_result(0, [trial], trial, result)
    tune_saves()
    cb.on_step_end(0, [trial])
    assert load_tables(study)[0].empty  # Tune has not registered the epoch's checkpoint yet
    cb.on_checkpoint(1, [trial], trial, checkpoint=None)
    assert load_tables(study)[0].empty  # registered, but Tune saves its state only at the end of the step
    cb.on_step_end(1, [trial])
    assert load_tables(study)[0].empty  # the step ended without a save (not due): the row waits
    tune_saves()
    cb.on_step_end(2, [trial])
    rows = load_tables(study)[0]
    assert list(rows["epoch"]) == [1] and rows["val_nmse"].iloc[0] == 0.5
    copied = study / ".tune_state" / f"searcher-state-{S1}.pkl"
    assert pickle.loads(copied.read_bytes()) == {"trials": [0, 1]}  # the save that covers the row
    # a save in a step where the callback holds nothing new (the epoch's checkpoint is not registered
    # yet) does not cover the row that the checkpoint's registration releases in a later step
    cb.on_trial_result(3, [trial], trial, {**result, "epoch": 2})
    tune_saves()
    cb.on_step_end(3, [trial])
    cb.on_checkpoint(4, [trial], trial, checkpoint=None)
    cb.on_step_end(4, [trial])
    assert list(load_tables(study)[0]["epoch"]) == [1]
    assert pickle.loads(copied.read_bytes()) == {"trials": [0, 1, 2]}  # the copy follows every save
    tune_saves()
    cb.on_step_end(5, [trial])
    assert list(load_tables(study)[0]["epoch"]) == [1, 2]
    cb.on_trial_result(6, [trial], trial, {**result, "epoch": 3})
    cb.on_trial_complete(6, [trial], trial)  # a trial that ends releases what it reported
    tune_saves()
    cb.on_step_end(6, [trial])
    rows = load_tables(study)[0]
    assert list(rows["epoch"]) == [1, 2, 3] and set(rows["status"]) == {"TERMINATED"}
    tune_saves()  # Tune's final save, after the last step: copied at the end of the study
    cb.on_experiment_end([trial])
    assert pickle.loads(copied.read_bytes()) == {"trials": [0, 1, 2, 3, 4, 5]}
    rows = pd.read_parquet(table)
    assert list(rows["epoch"]) == [1, 2, 3] and set(rows["status"]) == {"TERMINATED"}
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


def test_incremental_encoding_is_tunes_own_bytes():
    """encode_experiment_state writes what Tune's json.dump(runner_state, cls=TuneFunctionEncoder)
    writes, call after call, while trials change, appear and disappear (an independent encoding
    of the whole state every time)."""
    from ray.tune.utils.serialization import TuneFunctionEncoder

    from study.tune_state import encode_experiment_state as pieces

    def encode_experiment_state(*args):
        return b"".join(pieces(*args))

    def tunes(trial_data, runner_data, stats):
        state = {"trial_data": list(trial_data.values()), "runner_data": runner_data, "stats": stats}
        return json.dumps(state, cls=TuneFunctionEncoder).encode()

    def metadata(i, epoch):
        return json.dumps({"last_result": {"epoch": epoch, "note": 'quote " and \\ and\nnewline é'}}, indent=2)

    runner = {"_iteration": 3, "_search_alg": len, "nested": {"x": [1.5, None, True]}}  # len: pickled by Tune's encoder
    stats = {"start_time": 1764150000.25}
    trials = {f"t{i}": (json.dumps({"trial_id": f"t{i}"}, indent=2), metadata(i, 1)) for i in range(4)}
    cache: dict = {}
    assert encode_experiment_state(trials, runner, stats, cache) == tunes(trials, runner, stats)
    assert json.loads(encode_experiment_state(trials, runner, stats, cache))["trial_data"][2][1] == metadata(2, 1)
    trials["t1"] = (trials["t1"][0], metadata(1, 2))  # a result: Tune replaces the trial's metadata string
    trials["t9"] = (json.dumps({"trial_id": "t9"}), metadata(9, 0))
    del trials["t3"]
    assert encode_experiment_state(trials, runner, stats, cache) == tunes(trials, runner, stats)
    assert set(cache) == set(trials)
    assert encode_experiment_state({}, runner, stats, cache) == tunes({}, runner, stats)


def test_tune_saves_when_a_save_cannot_wait_else_every_few_seconds():
    """study.tune_state.save_state_when_due on a stand-in for Tune's controller: which steps save."""
    import time
    from collections import Counter

    from ray.tune.execution.tune_controller import TuneController

    from study.tune_state import save_state_when_due

    class Trial:
        def __init__(self, trial_id):
            self.trial_id, self.status = trial_id, "PENDING"

    saves = []

    class Controller:
        def __init__(self):
            self._trials, self._trials_to_cache = [], set()
            self._checkpoint_manager = SimpleNamespace(
                _should_force_sync_up=False,
                _sync_every_n_trial_checkpoints=3,  # num_to_keep
                _trial_num_checkpoints_since_last_sync=Counter(),
                sync_up_experiment_state=self.sync_up,
            )

        def save_to_dir(self):
            pass

        def sync_up(self, save_fn, force, wait):  # Tune's manager with TUNE_GLOBAL_CHECKPOINT_S=0: saves
            saves.append(sorted(t.trial_id for t in self._trials_to_cache))
            self._trials_to_cache.clear()
            self._checkpoint_manager._trial_num_checkpoints_since_last_sync.clear()

        def step(self, *marked, force=False):
            self._trials_to_cache.update(marked)
            before = len(saves)
            TuneController.checkpoint(self, force=force)
            return len(saves) > before

    original = TuneController.checkpoint
    try:
        save_state_when_due(every_s=0.5)
        c, a, b = Controller(), Trial("a"), Trial("b")
        c._trials.append(a)
        assert c.step(a)  # a new trial: saved before it can report
        assert not c.step()  # nothing changed
        a.status = "RUNNING"
        assert not c.step(a)  # started, first result: waits (a known trial)
        c._checkpoint_manager._trial_num_checkpoints_since_last_sync[a] = 2
        assert c.step(a)  # one checkpoint short of num_to_keep: Tune's next would delete the saved one
        assert not c.step(a)
        c._trials.append(b)
        assert c.step(b) and saves[-1] == ["a", "b"]  # the waiting change goes with the next save
        time.sleep(0.6)
        assert c.step(a)  # every_s passed
        a.status = "TERMINATED"
        assert not c.step(a)  # a finished trial may wait: a rerun of its last epoch gives the same values
        b.status = "ERROR"
        assert c.step(b)  # a failed one may not: a rerun could succeed where Optuna was told it failed
        assert c.step(force=True)  # Tune's forced saves (the study's end, an interrupt) always happen
    finally:
        TuneController.checkpoint = original


def test_a_checkpoint_deleted_after_the_last_save_does_not_trip_the_resumed_trial(tmp_path):
    """The saved state can list a checkpoint that Tune deleted after the save; a resumed trial's
    next checkpoint makes Tune delete it again, which must pass (Ray 2.60 raised FileNotFoundError)."""
    import shutil

    import pytest
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal import checkpoint_manager
    from ray.train._internal.session import _TrainingResult

    from study.tune_state import tolerate_deleted_checkpoints

    def checkpoint(i):
        folder = tmp_path / f"checkpoint_{i:06d}"
        folder.mkdir()
        return _TrainingResult(Checkpoint.from_directory(str(folder)), {"epoch": i})

    original = checkpoint_manager._delete_fs_path
    # Ray's own function, also when a study run earlier in this process has made it tolerant already
    checkpoint_manager._delete_fs_path = getattr(original, "__wrapped__", original)
    try:
        for tolerant in (False, True):
            if tolerant:
                tolerate_deleted_checkpoints()
            shutil.rmtree(tmp_path)
            tmp_path.mkdir()
            manager = checkpoint_manager._CheckpointManager(CheckpointConfig(num_to_keep=3))
            for i in range(3):  # what the last save listed
                manager.register_checkpoint(checkpoint(i))
            shutil.rmtree(tmp_path / "checkpoint_000000")  # deleted by a registration the save missed
            if not tolerant:
                with pytest.raises(FileNotFoundError):
                    manager.register_checkpoint(checkpoint(3))
                continue
            manager.register_checkpoint(checkpoint(3))
            assert [r.metrics["epoch"] for r in manager.best_checkpoint_results] == [1, 2, 3]
            assert sorted(p.name for p in tmp_path.iterdir()) == [f"checkpoint_{i:06d}" for i in (1, 2, 3)]
    finally:
        checkpoint_manager._delete_fs_path = original
