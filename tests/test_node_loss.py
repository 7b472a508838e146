"""A node lost mid-study (issue 21, item 4): Tune's ``FailureConfig(max_failures=N)`` (``--max-failures``)
retries the interrupted trial from its last checkpoint on a node that is still there, the tables keep
one row per (trial, epoch), and Optuna is told each trial once.

The cluster is started by the test in private temporary folders (helpers of ``test_cluster``) and
stopped by the process groups of the ``ray start --block`` processes it started; the lost node's
raylet is killed by its PID: never ``ray stop``, never by name.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from test_cluster import REPO, RUN, SMOKE, driver_env, free_port, group_alive, own_environ, start_node, stop_nodes  # noqa: F401 (own_environ: a fixture)

from study.tables import load_tables

S1 = "2026-01-01_10-00-00"


@pytest.mark.usefixtures("own_environ")
def test_the_tuner_retries_failed_trials_as_many_times_as_asked(tmp_path, monkeypatch):
    """``--max-failures`` reaches Tune's FailureConfig (it was 0: a lost node ended its trial as
    ERROR); a negative count is refused with one line, before anything is written."""
    from ray import tune

    from study.plan import plan_study
    from study.run import MAX_FAILURES, build_parser, main, make_tuner, set_ray_environment

    made = []
    monkeypatch.setattr(tune, "with_parameters", lambda fn, **kw: fn)  # ray.put: no Ray started here
    monkeypatch.setattr(tune, "Tuner", lambda *a, **kw: made.append(kw))
    set_ray_environment()
    for extra, want in (([], MAX_FAILURES), (["--max-failures", "5"], 5)):
        args = build_parser().parse_args([*SMOKE, "--results", str(tmp_path / f"r{want}"), "--no-report", *extra])
        plan = plan_study(args)
        plan.lock.close()
        make_tuner(plan, args, [])
        assert made.pop()["run_config"].failure_config.max_failures == want
    assert MAX_FAILURES >= 1
    assert main([*SMOKE, "--results", str(tmp_path / "bad"), "--max-failures", "-1"]) == 2
    assert not (tmp_path / "bad").exists()


def test_a_retried_trial_keeps_one_row_per_epoch(tmp_path):
    """The tables as :class:`study.results.ResultsCallback` keeps them through a retry: the lost
    attempt's epoch that waited for its checkpoint is dropped, and the epochs the retry reports again
    (from its last checkpoint) replace their rows instead of adding rows."""
    from test_tune_state import write_state

    from study.results import ResultsCallback

    staging = tmp_path / "staging"
    trial = SimpleNamespace(
        trial_id="t1",
        config={"epsilon": 0.0},
        path=None,
        storage=SimpleNamespace(experiment_driver_staging_path=str(staging)),
    )
    saves = iter(range(1, 100))

    def step_with_a_save(i: int) -> None:
        write_state(staging, S1, next(saves))
        for f in staging.iterdir():
            os.utime(f, ns=(f.stat().st_mtime_ns + 10**9 * i,) * 2)
        cb.on_step_end(i, [trial])

    def result(epoch: int, node: str, value: float) -> dict:
        return {"epoch": epoch, "val_nmse": value, "node_id": node, "should_checkpoint": True, "robustness_json": "[]"}

    study = tmp_path / "study"
    cb = ResultsCallback(study, record_processes=False)
    cb.on_trial_start(0, [trial], trial)
    for epoch in (1, 2):  # the first node: epochs 1 and 2, checkpointed
        cb.on_trial_result(epoch, [trial], trial, result(epoch, "lost", 0.5))
        cb.on_checkpoint(epoch, [trial], trial, checkpoint=None)
        step_with_a_save(epoch)
    cb.on_trial_result(3, [trial], trial, result(3, "lost", 0.4))  # its checkpoint never registered: node lost
    cb.on_trial_recover(3, [trial], trial)
    for epoch in (2, 3):  # the retry resumes from the checkpoint Tune holds (epoch 1, say), on another node
        cb.on_trial_result(epoch + 3, [trial], trial, result(epoch, "kept", 0.3))
        cb.on_checkpoint(epoch + 3, [trial], trial, checkpoint=None)
        step_with_a_save(epoch + 3)
    cb.on_trial_complete(7, [trial], trial)
    cb.on_experiment_end([trial])
    rows = load_tables(study)[0]
    assert list(rows["epoch"]) == [1, 2, 3] and not rows.duplicated(["trial_id", "epoch"]).any()
    assert list(rows["node_id"]) == ["lost", "kept", "kept"] and list(rows["val_nmse"]) == [0.5, 0.3, 0.3]
    assert set(rows["status"]) == {"TERMINATED"}


def raylet_pid(pgid: int) -> int:
    found = [int(p.split()[0]) for p in group_alive(pgid) if p.split()[1] == "raylet"]
    assert len(found) == 1, group_alive(pgid)
    return found[0]


@pytest.mark.slow
def test_a_trial_whose_node_is_lost_is_retried_from_its_checkpoint_on_another_node(tmp_path):
    """A head without CPUs (trials cannot run there) and one worker; the worker's raylet is killed
    after the trial's second checkpoint and a new worker joins: the trial resumes from a checkpoint on
    the new node, the study ends with exit status 0, one row per epoch, one Optuna trial."""
    temps = [Path(tempfile.mkdtemp(prefix=p, dir="/tmp")) for p in ("rh", "rw", "rn")]  # one per "machine"
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = driver_env(RAY_TMPDIR=str(temps[0]), PYTHONPATH=pythonpath, **auth)
    # the head's GCS declares a silent node dead after 3 missed checks 1 s apart (Ray's default: 5, 3 s apart)
    fast = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000"}
    fast["RAY_health_check_failure_threshold"] = "3"
    port = free_port()
    address = f"127.0.0.1:{port}"
    results = tmp_path / "results"
    nodes: list[subprocess.Popen] = []
    driver = None
    try:
        head = ["--head", "--port", str(port), "--num-cpus", "0", "--include-dashboard=false"]
        nodes.append(start_node(head, {**env, **fast}, tmp_path / "head.log"))
        worker = ["--address", address, "--num-cpus", "1", "--temp-dir"]
        nodes.append(start_node([*worker, str(temps[1])], env, tmp_path / "worker.log"))
        t0 = time.monotonic()
        study = [*SMOKE, "--num-samples", "1", "--max-epochs", "6", "--max-failures", "1", "--no-report"]
        with open(tmp_path / "driver.log", "w") as log:
            driver = subprocess.Popen(
                [*RUN, *study, "--results", str(results), "--address", address],
                env=driver_env(**auth),
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        # the trial's second checkpoint on disk: its first result, with the first checkpoint, has reached the
        # driver (a trial's report waits for the driver to take the previous one); the lost attempt's last
        # epochs are then reported again by the retry
        deadline = time.monotonic() + 120
        while not list(results.glob("eps_sweep/trial_*/checkpoint_000001")):
            assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "driver.log").read_text()[-4000:]
            time.sleep(0.1)
        os.kill(raylet_pid(nodes[1].pid), signal.SIGKILL)  # the node is lost mid-trial
        nodes.append(start_node([*worker, str(temps[2])], env, tmp_path / "new_worker.log"))
        driver.wait(timeout=180)
        text = (tmp_path / "driver.log").read_text()
        assert driver.returncode == 0, text[-4000:]
        elapsed = time.monotonic() - t0
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait()
        stop_nodes(nodes, temps)
    assert not [p for n in nodes for p in group_alive(n.pid)]

    rows = pd.read_parquet(results / "eps_sweep" / "trials.parquet")
    assert rows["trial_id"].nunique() == 1 and set(rows["status"]) == {"TERMINATED"}, rows
    assert sorted(rows["epoch"]) == [1, 2, 3, 4, 5, 6] and not rows.duplicated(["trial_id", "epoch"]).any()
    first, last = rows.sort_values("epoch").iloc[[0, -1]].to_dict("records")
    assert first["node_id"] != last["node_id"]  # the lost node, then the new one
    assert first["start_epoch"] == 0 and last["start_epoch"] >= 1  # the retry resumed from a checkpoint

    import optuna

    storage = f"sqlite:///{results / 'eps_sweep' / 'optuna.db'}"
    trials = optuna.load_study(study_name="eps_sweep", storage=storage).trials
    assert len(trials) == 1 and trials[0].state == optuna.trial.TrialState.COMPLETE
    assert trials[0].user_attrs["status"] == "TERMINATED" and trials[0].user_attrs["ray_trial_id"] in set(
        rows["trial_id"]
    )
    print(f"node-loss study: {elapsed:.0f} s")
