"""Experiment tracking, ``--track mlflow`` and ``--track wandb`` (study/tracking.py, study/trackers.py).

One smoke study of two trials logs to both (W&B offline: ``WANDB_MODE=offline``, no network); its
runs are read back with MLflow's own client and from W&B's offline run files, and compared with
the study's tables and TensorBoard runs. Then the same command again: a resume opens no new run.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from study.tracking import INSTALL_EXTRA, Tracker, parse_track, tracked_metrics, trial_status
from study.trainable import StudyContext

REPO = Path(__file__).resolve().parent.parent
RUN = [sys.executable, str(REPO / "study" / "run.py")]
SPACE = (
    "description: tracking test\nparameters:\n  epsilon: {grid: [0, 1000]}\n"
    "objectives: [{metric: val_nmse, mode: min}]\nattack_budgets: [1000]\n"
)


def study_command(tmp: Path) -> list[str]:
    (tmp / "two.yaml").write_text(SPACE)
    return [
        *RUN,
        *("--space", str(tmp / "two.yaml"), "--profile", "smoke", "--max-epochs", "2"),
        *("--results", str(tmp / "results"), "--no-report", "--track", "mlflow", "--track", "wandb"),
    ]


@pytest.fixture(scope="module")
def tracked_study(tmp_path_factory):
    """A 2-trial smoke study tracked by MLflow (default store) and W&B (offline)."""
    pytest.importorskip("mlflow", reason=f"the [track] extra is not installed: {INSTALL_EXTRA}")
    pytest.importorskip("wandb", reason=f"the [track] extra is not installed: {INSTALL_EXTRA}")
    tmp = tmp_path_factory.mktemp("tracked")
    cmd, env = study_command(tmp), {**os.environ, "WANDB_MODE": "offline"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return SimpleNamespace(folder=tmp / "results" / "two", cmd=cmd, env=env, cwd=tmp, out=out)


def mlflow_runs(folder: Path) -> tuple:
    """MLflow's client on the study's default store, and the runs of its experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("two")
    return client, client.search_runs([experiment.experiment_id])


@pytest.mark.slow
def test_mlflow_one_run_per_trial(tracked_study):
    """Read back with MLflow's client: a run per trial named as its TensorBoard run, TensorBoard's
    HParams as params (epsilon_ref at 320x320), TensorBoard's scalar tags with their per-epoch
    history, the held-out report, and the trial's status."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = tracked_study.folder
    trials = pd.read_parquet(folder / "trials.parquet").set_index(["trial_id", "epoch"])
    client, runs = mlflow_runs(folder)
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(trials.index.levels[0])
    assert f"tracking: MLflow sqlite:///{folder / 'mlflow.db'}" in tracked_study.out.stdout
    for run in runs:
        trial_id = run.data.tags["trial_id"]
        last = trials.loc[(trial_id, 2)]
        assert run.info.run_name == f"trial_{trial_id}_epsilon={last['epsilon_ref']:g}"
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "TERMINATED"
        assert float(run.data.params["epsilon_ref"]) == last["epsilon_ref"]  # 0 or 1000, at 320x320
        assert {"lambda1", "lambda2", "loss", "lr_recon", "lr_gen", "perturbation", "seed"} <= set(run.data.params)
        history = client.get_metric_history(run.info.run_id, "val/nmse")
        assert [(m.step, m.value) for m in history] == [(e, trials.loc[(trial_id, e), "val_nmse"]) for e in (1, 2)]
        assert run.data.metrics["report/nmse"] == last["report_nmse"]
        assert run.data.metrics["report/rob_pgd_e1000_nmse"] == last["report_rob_pgd_e1000_nmse"]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "report/nmse")] == [2]
        board = EventAccumulator(str(folder / run.info.run_name), size_guidance={"scalars": 0}).Reload()
        assert set(run.data.metrics) == set(board.Tags()["scalars"])  # the same names as TensorBoard's


@pytest.mark.slow
def test_wandb_offline_runs(tracked_study):
    """W&B offline: one run file per trial under <study>/wandb, its id the trial's, with the
    hyperparameters as config, val/nmse at steps 1 and 2, and the trial's status."""
    folder = tracked_study.folder
    trials = pd.read_parquet(folder / "trials.parquet").set_index(["trial_id", "epoch"])
    runs = sorted((folder / "wandb").glob("offline-run-*"))
    assert sorted(p.name.rsplit("-", 1)[1] for p in runs) == sorted(trials.index.levels[0])
    for path in runs:
        trial_id = path.name.rsplit("-", 1)[1]
        run = read_wandb_run(next(path.glob("run-*.wandb")))
        assert run["id"] == trial_id and run["project"] == "two"
        assert run["config"]["epsilon_ref"] == trials.loc[(trial_id, 2), "epsilon_ref"]
        assert run["config"]["loss"] == "dssim"
        assert [(h["_step"], h["val/nmse"]) for h in run["history"]] == [
            (e, trials.loc[(trial_id, e), "val_nmse"]) for e in (1, 2)
        ]
        assert run["history"][-1]["report/nmse"] == trials.loc[(trial_id, 2), "report_nmse"]
        assert run["tags"] == ["TERMINATED"] and run["summary"]["status"] == "TERMINATED"


@pytest.mark.slow
def test_resume_opens_no_new_run(tracked_study):
    """The same command again resumes the finished study: still one MLflow run and one W&B run
    per trial (a trial that restarts reopens its run: test_a_restored_callback_reopens_the_run)."""
    out = subprocess.run(
        tracked_study.cmd, capture_output=True, text=True, cwd=tracked_study.cwd, env=tracked_study.env, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming study 'two'" in out.stdout and "note: --track ignored" not in out.stdout
    _, runs = mlflow_runs(tracked_study.folder)
    assert len(runs) == 2 and len({r.data.tags["trial_id"] for r in runs}) == 2
    assert len(list((tracked_study.folder / "wandb").glob("offline-run-*"))) == 2


def test_a_restored_callback_reopens_the_run(tmp_path):
    """After a resume Tune's callbacks are new objects and the trial a new Trial: the trial's
    MLflow run is found by its trial_id tag and continued, not duplicated."""
    pytest.importorskip("mlflow", reason=f"the [track] extra is not installed: {INSTALL_EXTRA}")
    from mlflow.tracking import MlflowClient

    from study.trackers import StudyMLflowCallback

    uri, ctx = f"sqlite:///{tmp_path / 'mlflow.db'}", context()
    for epoch in (1, 2):  # the driver before the kill, then the resumed one
        callback = StudyMLflowCallback(uri, "study", ctx, artifact_location=str(tmp_path / "mlartifacts"))
        callback.setup()
        trial = FakeTrial("abc12_00000", {"epsilon": 1000.0})
        callback.log_trial_start(trial)
        callback.log_trial_result(epoch, trial, {"epoch": epoch, "val_nmse": 0.5 / epoch, "record_json": "{}"})
    callback.log_trial_end(trial, failed=False)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("study").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/nmse")] == [(1, 0.5), (2, 0.25)]
    assert run.data.params["epsilon_ref"] == "1000.0" and run.data.tags["status"] == "TERMINATED"
    assert run.info.status == "FINISHED" and run.info.run_name == "trial_abc12_00000_epsilon=1000"


def test_wandb_run_id_is_the_trial_id(monkeypatch):
    """W&B: the run's id is the trial's and it is opened with resume='allow', so a resumed trial
    continues its run; the mode is WANDB_MODE's, read when the driver starts."""
    pytest.importorskip("wandb", reason=f"the [track] extra is not installed: {INSTALL_EXTRA}")
    from study.trackers import StudyWandbCallback

    monkeypatch.setenv("WANDB_MODE", "offline")
    callback = StudyWandbCallback("study", "/tmp/study", context())
    callback.setup()
    started = {}
    monkeypatch.setattr(callback, "_start_logging_actor", lambda trial, exclude, **kw: started.update(kw))
    callback.log_trial_start(FakeTrial("abc12_00000", {"epsilon": 1000.0}))
    assert started["id"] == "abc12_00000" and started["resume"] == "allow" and started["mode"] == "offline"
    assert started["dir"] == "/tmp/study" and started["project"] == "study" and started["tags"] == ["RUNNING"]
    assert started["config"]["epsilon_ref"] == 1000.0 and "epsilon" not in started["config"]


def test_missing_extra_fails_before_ray_in_one_line(tmp_path):
    """Without MLflow installed (hidden from the import system here), --track mlflow is refused in one
    line naming the extra, before the study folder is written or Ray starts."""
    (tmp_path / "two.yaml").write_text(SPACE)
    args = ["--space", str(tmp_path / "two.yaml"), "--profile", "smoke", "--results", str(tmp_path / "results")]
    code = (
        "import sys; sys.modules['mlflow'] = None; from study.run import main; "
        f"code = main({[*args, '--track', 'mlflow']!r}); "
        "assert not any(m.split('.')[0] == 'ray' for m in sys.modules); sys.exit(code)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr == 'error: --track mlflow needs MLflow: pip install -e ".[track]"\n'
    assert not (tmp_path / "results").exists()


def test_track_values():
    assert parse_track(["mlflow", "wandb"]) == [Tracker("mlflow"), Tracker("wandb")]
    assert parse_track(["mlflow=http://host:5000"]) == [Tracker("mlflow", "http://host:5000")]
    assert parse_track(None) == []
    for values, message in (
        (["tensorboard"], "unknown tracker 'tensorboard'"),
        (["wandb=x"], "wandb takes no value"),
        (["mlflow="], "give a tracking URI"),
        (["mlflow", "mlflow=sqlite:///a.db"], "--track mlflow given twice"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_track(values)


def test_tracked_metrics_unpack_the_record_and_skip_what_tensorboard_skips():
    record = {"val_psnr": 20.0, "rob_pgd_e1000_nmse": 0.3, "rob_pgd_e1000_nmse_se": 0.01, "report_nmse": 0.2}
    result = {"val_nmse": 0.1, "val_ssim": float("nan"), "best_val_nmse": 0.1, "epoch": 2, "lambda1": 1.0}
    metrics = tracked_metrics({**result, "record_json": json.dumps(record)}, ["val_nmse"])
    assert metrics == {
        "val/nmse": 0.1,
        "val/psnr": 20.0,
        "rob/pgd_e1000_nmse": 0.3,
        "report/nmse": 0.2,
        "best/val_nmse": 0.1,
    }
    assert trial_status(True, "completed") == "ERROR" and trial_status(False, "nan") == "nan"
    assert trial_status(False, "completed") == "TERMINATED"


class FakeTrial:
    """What the callbacks read of Tune's Trial."""

    def __init__(self, trial_id: str, config: dict) -> None:
        self.trial_id, self.config, self.experiment_dir_name = trial_id, config, "study"

    def __str__(self) -> str:
        return f"train_trial_{self.trial_id}"


def context() -> StudyContext:
    return StudyContext(
        base={"epsilon": 0.0, "attack_budgets": [1000.0]},
        epsilon_keys=("epsilon",),
        study_dir="/tmp/study",
        attack_budgets_ref=(1000.0,),
        objective_metrics=("val_nmse",),
    )


def read_wandb_run(path: Path) -> dict:
    """A W&B run file (``run-<id>.wandb``: a LevelDB-style log of protobuf records, 32 KiB blocks of
    records with a 7-byte header) as its id, project, config, history rows, tags and summary."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    run = {"config": {}, "history": [], "summary": {}}
    pos, pending = header, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        pending, pos = pending + data[pos + header : pos + header + length], pos + header + length
        if kind not in (1, 4):  # FULL or LAST ends a record; FIRST and MIDDLE continue it
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        pending, what = b"", record.WhichOneof("record_type")
        if what == "run":
            run.update(id=record.run.run_id, project=record.run.project, tags=list(record.run.tags))
            run["config"].update(items(record.run.config.update))
        elif what == "config":
            run["config"].update(items(record.config.update))
        elif what == "history":
            run["history"].append(items(record.history.item))
        elif what == "summary":
            run["summary"].update(items(record.summary.update))
    return run


def items(updates) -> dict:
    """W&B's key / JSON value items (config, history, summary) as a dict; nested keys joined by '/'."""
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in updates}
