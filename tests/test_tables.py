"""The study's result tables and their journal (study/tables.py): what a reader sees at any moment
equals what a driver that rewrote the Parquet files after every event would have written."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from study.layout import JOURNAL_FILE, ROBUSTNESS_FILE, TRIALS_FILE
from study.tables import ResultsLog, load_tables


def result(epoch: int, nmse: float, status: str = "ok") -> dict:
    rows = [{"attack": "pgd", "budget_ref": 5000.0, "nmse": 2 * nmse}]
    return {
        "epoch": epoch,
        "val_nmse": nmse,
        "epsilon_ref": 5000.0,
        "epoch_status": status,
        "time_total_s": epoch,
        "training_iteration": epoch,
        "config": {"x": 1},
        "robustness_json": json.dumps(rows),
    }


def events(log: ResultsLog) -> None:
    """Two trials: a finishes 3 epochs (epoch 2 re-reported after a resume), b stops on NaN;
    c errors before its first epoch."""
    for t in ("a", "b", "c"):
        log.set_params(t, {"epsilon": 5000.0, "lambda1": 1.0, "skip": [1]})
        log.set_status(t, "RUNNING")
    log.add_result("a", result(1, 0.5))
    log.add_result("a", result(2, 0.4))
    log.add_result("b", result(1, 0.9))
    log.add_result("a", result(2, 0.3))  # the same epoch again replaces its row
    log.add_result("b", result(2, math.nan, status="nan"))
    log.set_status("b", "TERMINATED")  # the trainer's 'nan' is kept
    log.add_result("a", result(3, 0.2))
    log.set_status("a", "TERMINATED")
    log.set_status("c", "ERROR", "ValueError: boom")


def reference(tmp_path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tables written in one go, with no journal involved."""
    log = ResultsLog(tmp_path / "ref")
    events(log)
    return log.frames()


def test_rows_statuses_and_errors(tmp_path):
    trials, robust = reference(tmp_path)
    assert list(zip(trials["trial_id"], trials["epoch"])) == [
        ("a", 1),
        ("a", 2),
        ("a", 3),
        ("b", 1),
        ("b", 2),
        ("c", 0),
    ]
    assert trials.loc[(trials["trial_id"] == "a") & (trials["epoch"] == 2), "val_nmse"].item() == 0.3
    assert set(trials.loc[trials["trial_id"] == "a", "status"]) == {"TERMINATED"}
    assert set(trials.loc[trials["trial_id"] == "b", "status"]) == {"nan"}
    c = trials[trials["trial_id"] == "c"].iloc[0]
    assert c["status"] == "ERROR" and c["message"] == "ValueError: boom" and c["epsilon"] == 5000.0
    assert "config" not in trials and "training_iteration" not in trials and "skip" not in trials
    assert len(robust) == 5 and robust.loc[(robust["trial_id"] == "a") & (robust["epoch"] == 2), "nmse"].item() == 0.6


@pytest.mark.parametrize("rewrite_after", [None, 3, 7])
def test_parquet_plus_journal_equals_the_tables(tmp_path, rewrite_after):
    """Events journaled one commit each, the Parquet files rewritten after ``rewrite_after`` commits
    (or never): load_tables and a restarted log give the reference tables, and so does a final
    rewrite, after which the journal is empty."""
    ref_trials, ref_robust = reference(tmp_path)
    folder = tmp_path / "study"
    log = ResultsLog(folder)
    n = 0

    original = log._apply

    def apply(event, record=True):
        nonlocal n
        original(event, record)
        if record:
            log.commit()
            n += 1
            if n == rewrite_after:
                log.write()

    log._apply = apply
    events(log)
    assert (folder / JOURNAL_FILE).stat().st_size > 0
    for trials, robust in (load_tables(folder), ResultsLog(folder).frames()):
        pd.testing.assert_frame_equal(trials, ref_trials, check_like=True)
        pd.testing.assert_frame_equal(robust, ref_robust, check_like=True)
    ResultsLog(folder).write()
    assert (folder / JOURNAL_FILE).stat().st_size == 0
    pd.testing.assert_frame_equal(pd.read_parquet(folder / TRIALS_FILE), ref_trials, check_like=True)
    pd.testing.assert_frame_equal(pd.read_parquet(folder / ROBUSTNESS_FILE), ref_robust, check_like=True)


def test_a_journal_that_outlived_its_rewrite_and_a_cut_last_line(tmp_path):
    """Killed between the Parquet rename and emptying the journal: replaying it again changes
    nothing; killed while appending: the incomplete last line is skipped."""
    ref_trials, _ = reference(tmp_path)
    folder = tmp_path / "study"
    log = ResultsLog(folder)
    events(log)
    log.commit()
    journal = (folder / JOURNAL_FILE).read_text()
    log.write()
    (folder / JOURNAL_FILE).write_text(journal + '{"kind": "row", "trial_id": "a", "ep')
    trials, _ = load_tables(folder)
    pd.testing.assert_frame_equal(trials, ref_trials, check_like=True)
    assert ResultsLog(folder).replayed == journal.count("\n")


def test_an_event_appended_after_a_torn_line_is_kept(tmp_path):
    """A driver killed mid-append leaves a torn last line; the next driver's events start on a line of
    their own, so the torn line is skipped and nothing after it is lost."""
    folder = tmp_path / "study"
    log = ResultsLog(folder)
    log.set_params("a", {"epsilon": 0.0})
    log.add_result("a", result(1, 0.5))
    log.commit()
    with open(folder / JOURNAL_FILE, "a") as f:
        f.write('{"kind": "row", "trial_id": "a", "ep')  # the kill
    resumed = ResultsLog(folder)
    resumed.add_result("a", result(2, 0.4))
    resumed.commit()
    lines = (folder / JOURNAL_FILE).read_text().splitlines()
    assert lines[-2] == '{"kind": "row", "trial_id": "a", "ep' and json.loads(lines[-1])["kind"] == "row"
    trials, _ = load_tables(folder)
    assert list(trials.sort_values("epoch")["val_nmse"]) == [0.5, 0.4]


def test_empty_folder_reads_as_empty_tables(tmp_path):
    trials, robust = load_tables(tmp_path)
    assert trials.empty and robust.empty
    assert not list(tmp_path.iterdir())  # reading writes nothing


def test_metrics_packed_for_tune_come_back_as_the_same_row(tmp_path):
    """The trainable reports only the keys Tune reads as numbers and packs the rest into
    ``record_json`` (study/trainable.py); the table's row is the same as from the unpacked result."""
    from study.trainable import TUNE_KEYS, tune_result

    flat = {
        "epoch": 3,
        "val_nmse": 0.05,
        "rob_pgd_e5000_nmse": 0.2,
        "best_rob_pgd_e5000_nmse": 0.19,
        "report_nmse": 0.051,
        "report_feature_fnr": math.nan,
        "train_seed_ssim": 0.7,
        "epoch_status": "ok",
        "stopped": False,
        "epsilon_ref": 5000.0,
        "lr_recon": 1e-3,
        "node_id": "abc",
    }
    packed = tune_result(flat, ("val_nmse", "rob_pgd_e5000_nmse"))
    numeric = {k for k, v in packed.items() if isinstance(v, float)}
    assert numeric == {"val_nmse", "rob_pgd_e5000_nmse", "best_rob_pgd_e5000_nmse", "epsilon_ref", "lr_recon"}
    assert {"epoch", "epoch_status", "stopped", "node_id"} <= set(packed) and "epoch" in TUNE_KEYS
    a, b = ResultsLog(tmp_path / "a"), ResultsLog(tmp_path / "b")
    a.add_result("t", {**flat, "robustness_json": "[]"})
    b.add_result("t", {**packed, "robustness_json": "[]"})
    ra, rb = a.frames()[0], b.frames()[0]
    pd.testing.assert_frame_equal(ra, rb[list(ra.columns)])
    assert set(ra.columns) == set(rb.columns) and math.isnan(rb["report_feature_fnr"].item())


def test_a_reader_that_races_a_rewrite_reads_again(tmp_path, monkeypatch):
    """The driver rewrites the tables and replaces the journal while a reader is between reading the
    Parquet files and the journal: the reader must not combine old tables with the new, emptied
    journal (every row since the previous rewrite would vanish)."""
    import study.tables as tables

    ref_trials, ref_robust = reference(tmp_path)
    folder = tmp_path / "study"
    driver = ResultsLog(folder)
    events(driver)
    driver.commit()  # all in the journal, no Parquet file yet
    original, calls = tables.read_parquet, []

    def racing(path):
        frame = original(path)
        if not calls:
            driver.write()  # between the reader's Parquet reads and its journal read
        calls.append(path)
        return frame

    monkeypatch.setattr(tables, "read_parquet", racing)
    trials, robust = load_tables(folder)
    pd.testing.assert_frame_equal(trials, ref_trials, check_like=True)
    pd.testing.assert_frame_equal(robust, ref_robust, check_like=True)
    assert len(calls) > 2  # it read again
