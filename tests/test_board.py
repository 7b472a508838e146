"""A study's TensorBoard run per trial (study/board.py), read back with TensorBoard's own backend,
and its Optuna searcher's grid sampler (study/search.py). No study is started here."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from study.board import TrialBoard, hparams_metrics, tag_of
from study.layout import trial_dirname, values_label

STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


def hparams_route(folder: Path, route: str, request: dict) -> dict:
    """What TensorBoard's HParams plugin answers the browser for ``route`` on ``folder`` (its own
    event reading and data provider, called as its web server calls it)."""
    with warnings.catch_warnings():  # TensorBoard's vendored html5lib, on import
        warnings.simplefilter("ignore", DeprecationWarning)
        from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
        from tensorboard.plugins import base_plugin
        from tensorboard.plugins.hparams import hparams_plugin
    from werkzeug.test import Client
    from werkzeug.wrappers import Response

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(folder))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(folder))
    plugin = hparams_plugin.HParamsPlugin(
        base_plugin.TBContext(logdir=str(folder), data_provider=provider, multiplexer=mux)
    )
    answer = Client(plugin.get_plugin_apps()[route], Response).post("/", json=request)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return answer.get_json()


def session_groups(folder: Path) -> dict[str, dict]:
    """The HParams table's rows by run name."""
    answer = hparams_route(
        folder, "/session_groups", {"startIndex": 0, "sliceSize": 100, "colParams": [], "allowedStatuses": STATUSES}
    )
    return {g["name"]: g for g in answer["sessionGroups"]}


def test_session_end_follows_the_trial(tmp_path):
    """The driver ends each trial's HParams session: SUCCESS when it ran to its end, FAILURE for an
    error or a NaN stop, nothing while it runs (TensorBoard: unknown)."""
    from study.results import ResultsCallback

    callback = ResultsCallback(tmp_path, record_processes=False)
    cases = {
        "aaaa0001": ("completed", "complete", "STATUS_SUCCESS"),
        "aaaa0002": ("nan", "complete", "STATUS_FAILURE"),
        "aaaa0003": ("running", "error", "STATUS_FAILURE"),
        "aaaa0004": ("running", None, "STATUS_UNKNOWN"),
    }
    for i, (trial_id, (epoch_status, event, _)) in enumerate(cases.items()):
        folder = tmp_path / f"trial_{trial_id}_epsilon={i}"
        board = TrialBoard(folder, {"epsilon_ref": float(i), "loss": "mse"}, ["epsilon_ref"], ["val/nmse"])
        board.scalar("val/nmse", 0.5, 1)
        board.scalar("val/nmse", float("nan"), 2)  # not written
        board.close()
        trial = SimpleNamespace(trial_id=trial_id, path=str(folder), config={})
        callback.log.add_result(trial_id, {"epoch": 1, "epoch_status": epoch_status})
        if event == "complete":
            callback.on_trial_complete(0, [], trial)
        elif event == "error":
            callback.on_trial_error(0, [], trial)
    callback.on_trial_complete(0, [], SimpleNamespace(trial_id="aaaa0005", path=None, config={}))  # never started
    groups = session_groups(tmp_path)
    assert len(groups) == 4
    for i, (trial_id, (_, _, status)) in enumerate(cases.items()):
        (session,) = groups[f"trial_{trial_id}_epsilon={i}"]["sessions"]
        assert session["status"] == status
        assert [m["value"] for m in session["metricValues"]] == [0.5]


def test_hparams_metrics_are_the_same_list_in_every_trial():
    metrics = hparams_metrics(["val_nmse", "rob_pgd_e5000_nmse"], (1000.0, 5000.0))
    assert metrics[:5] == [
        "best/val_nmse",
        "best/rob_pgd_e5000_nmse",
        "report/nmse",
        "report/rob_pgd_e5000_nmse",
        "report/ssim",
    ]
    assert len(metrics) == len(set(metrics)) and "rob/pgd_e1000_nmse" in metrics
    assert "report/rob_pgd_e1000_d_nmse" in metrics and "report_zero_filled/nmse" in metrics
    assert tag_of("rob_pgd_e0p5_nmse") == "rob/pgd_e0p5_nmse"


def test_trial_folder_names_are_readable_run_names():
    trial = SimpleNamespace(
        trial_id="7683b80e", config={"epsilon": 10000, "lr_recon": 3.1622776e-4, "loss": "l1/ssim", "lambda1": 2.0}
    )
    assert values_label(trial.config) == "epsilon=10000,lr_recon=0.0003162,loss=l1/ssim,lambda1=2"
    assert trial_dirname(trial) == "trial_7683b80e_epsilon=10000,lr_recon=0.0003162,loss=l1_ssim,lambda1=2"
    assert trial_dirname(SimpleNamespace(trial_id="7683b80e", config={})) == "trial_7683b80e_"


def test_grid_sampler_does_not_stop_an_ask_and_tell_study():
    """Optuna's GridSampler calls Study.stop() after the last point, which only works inside
    study.optimize(); Ray asks and tells, and the call raised a warning through Ray's logger."""
    import optuna

    from study.search import GridSampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=GridSampler({"x": [0, 1]}, seed=0))
    distributions = {"x": optuna.distributions.CategoricalDistribution([0, 1])}
    seen = []
    for _ in range(2):
        trial = study.ask(distributions)
        seen.append(trial.params["x"])
        study.tell(trial, 0.0)  # raised RuntimeError("`Study.stop` is supposed to be invoked inside ...")
    assert sorted(seen) == [0, 1]


@pytest.mark.parametrize("seconds, text", [(0, "0:00:00"), (61.4, "0:01:01"), (3725, "1:02:05")])
def test_clock(seconds, text):
    from study.console import clock

    assert clock(seconds) == text


def test_status_table_shows_progress_and_time_left():
    from study.console import StudyReporter

    def trial(trial_id, eps, status, **result):
        return SimpleNamespace(trial_id=trial_id, config={"epsilon": eps}, status=status, last_result=result)

    reporter = StudyReporter("eps_sweep", ["epsilon"], ["val_nmse"], max_epochs=4, num_samples=4)
    reporter.setup()
    assert reporter.should_report([]) is False  # the first step: nothing ran before this driver
    trials = [
        trial(
            "aaaa0001",
            0,
            "TERMINATED",
            epoch=3,
            val_nmse=0.5,
            epoch_status="early_stopped",
            report_vs_input="worse",
            report_vs_input_ratio=2.034,
        ),
        trial("aaaa0002", 1000, "RUNNING", epoch=2, val_nmse=float("nan")),
        trial("aaaa0003", 5000, "PENDING"),
    ]
    lines = reporter.table(trials, now=reporter._start + 50).splitlines()
    # 5 epochs ran in 50 s; left: 2 + 4 + 4 (a trial not yet created) = 10 epochs, about 100 s
    assert lines[0] == (
        "== study eps_sweep: 4 trials (1 early_stopped, 1 RUNNING, 1 PENDING, 1 not started) | "
        "0:00:50 elapsed, at most ~0:01:40 left =="
    )
    assert lines[1].split() == ["trial", "epsilon", "status", "epoch", "val_nmse", "vs", "input"]
    assert lines[2].split() == ["aaaa0001", "0", "early_stopped", "3/4", "0.5", "WORSE", "2.03x"]
    assert lines[3].split() == ["aaaa0002", "1000", "RUNNING", "2/4", "-", "-"]
    assert lines[4].split() == ["aaaa0003", "5000", "PENDING", "-/4", "-", "-"]
