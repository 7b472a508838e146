"""What a trial asks Ray for (issue 21, item 1): the rule of :mod:`study.plan` on closed-form nodes,
then on a two-node cluster of this machine whose worker has two logical GPUs and a driver without
CUDA: trials ask for what the rule says, as many run at once as it predicts, each sees its own
``CUDA_VISIBLE_DEVICES`` and sets torch's threads from its own CPUs, and a real study's trial with a
logical GPU runs on CPU.

The cluster is started by the test in private temporary folders and stopped by the process groups
of the ``ray start --block`` processes it started (helpers of ``test_cluster``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_cluster import (
    REPO,
    SMOKE,
    driver_env,
    free_port,
    group_alive,
    run_study,
    start_node,
    stop_nodes,
)

from study.plan import concurrent_trials, settle_resources, trial_resources


@pytest.mark.parametrize(
    "nodes, gpus, cpus, want, at_once",
    [
        ([{"CPU": 64.0, "GPU": 8.0}], None, None, {"cpu": 8, "gpu": 1.0}, 8),  # one GPU each, the node's ratio
        ([{"CPU": 64.0, "GPU": 8.0}] * 3, None, None, {"cpu": 8, "gpu": 1.0}, 24),  # 8 on each node
        ([{"CPU": 16.0, "GPU": 1.0}], 0.25, None, {"cpu": 4, "gpu": 0.25}, 4),  # CPUs follow the GPU share
        ([{"CPU": 16.0, "GPU": 1.0}], 0.5, None, {"cpu": 8, "gpu": 0.5}, 2),  # the README's "packs two per GPU"
        ([{"CPU": 16.0, "GPU": 1.0}], 0.3, None, {"cpu": 4, "gpu": 0.3}, 3),  # floor(4.8); 3 shares fit a GPU
        ([{"CPU": 64.0, "GPU": 8.0}], 2, None, {"cpu": 16, "gpu": 2.0}, 4),  # whole GPUs: their CPUs
        ([{"CPU": 2.0, "GPU": 4.0}], 0.25, None, {"cpu": 1, "gpu": 0.25}, 2),  # at least one CPU
        ([{"CPU": 16.0}, {"CPU": 4.0}], None, None, {"cpu": 1, "gpu": 0.0}, 20),  # no GPU: one CPU each
        ([{"CPU": 2.0, "GPU": 0.0}], None, None, {"cpu": 1, "gpu": 0.0}, 2),  # a laptop: as before
        ([{"CPU": 16.0, "GPU": 1.0}], 0, None, {"cpu": 1, "gpu": 0.0}, 16),  # asked for no GPU: the CPU rule
        # mixed: a driver-like head without GPUs does not dilute the ratio; the smallest GPU ratio wins
        ([{"CPU": 4.0}, {"CPU": 64.0, "GPU": 8.0}, {"CPU": 48.0, "GPU": 8.0}], None, None, {"cpu": 6, "gpu": 1.0}, 16),
        ([{"CPU": 4.0}, {"CPU": 16.0, "GPU": 1.0}], 0.25, None, {"cpu": 4, "gpu": 0.25}, 4),
        ([{"CPU": 64.0, "GPU": 8.0}], None, 2, {"cpu": 2, "gpu": 1.0}, 8),  # --cpus-per-trial wins
        ([{"CPU": 16.0, "GPU": 1.0}], 0.25, 8, {"cpu": 8, "gpu": 0.25}, 2),
        ([{"CPU": 16.0}, {"CPU": 4.0}], None, 4, {"cpu": 4, "gpu": 0.0}, 5),
        ([{"CPU": 8.0}], 0.5, None, {"cpu": 1, "gpu": 0.5}, 0),  # GPUs asked where none is: nothing fits
    ],
)
def test_the_resource_rule(nodes, gpus, cpus, want, at_once):
    res = trial_resources(nodes, gpus, cpus)
    assert res == want and isinstance(res["cpu"], int)
    assert concurrent_trials(nodes, res) == at_once


def test_the_start_line_says_what_each_trial_gets_and_how_many_run_at_once(capsys):
    nodes = [{"CPU": 1.0}, {"CPU": 16.0, "GPU": 1.0}]
    args = SimpleNamespace(gpus_per_trial=0.25, cpus_per_trial=None, max_concurrent=None)
    plan = SimpleNamespace(res={}, num_samples=32, cluster=True, located="head:6379")
    assert settle_resources(plan, args, nodes) == 4 and plan.res == {"cpu": 4, "gpu": 0.25}
    line = capsys.readouterr().out.strip()
    assert (
        line
        == "resources: 4 CPU, 0.25 GPU per trial, 4 at once; 17 CPUs, 1 GPUs on 2 nodes of the cluster at head:6379"
    )
    args.max_concurrent = 2
    assert settle_resources(plan, args, nodes) == 2
    assert "4 at once (2 with --max-concurrent 2)" in capsys.readouterr().out
    plan = SimpleNamespace(res={}, num_samples=3, cluster=False, located="")
    assert (
        settle_resources(
            plan,
            SimpleNamespace(gpus_per_trial=None, cpus_per_trial=None, max_concurrent=None),
            [{"CPU": 2.0, "GPU": 0.0}],
        )
        == 2
    )
    assert capsys.readouterr().out.strip() == "resources: 1 CPU, 0 GPU per trial, 2 at once; 2 CPUs, 0 GPUs here"


# ---------------------------------------------------------------------------------------------
# a head without GPUs and a worker with two logical GPUs, on this machine
# ---------------------------------------------------------------------------------------------
WORKER = {"CPU": 8, "GPU": 2}  # logical: Ray schedules by these counts, this machine has neither

# the driver: joins the cluster as run.py does, takes the rule's request from the live nodes
# (settle_resources, as run.py's launch does), and runs one trial more than it predicts fit at once
# of a tiny trainable that reads its allocation as the study's trainable does (trial_allocation)
DRIVER = r"""
import json, os, sys, time
from types import SimpleNamespace
from pathlib import Path

from study.cluster import alive_nodes, start_ray
from study.plan import settle_resources

address, work = sys.argv[1], Path(sys.argv[2])
start_ray(address, 0, 0)
from ray import tune

def tiny(config):
    import ray, torch
    from mriadv.runtime import Runtime
    from study.trainable import trial_allocation

    given = trial_allocation()
    t0 = time.time()
    started = Path(config["started"])
    (started / tune.get_context().get_trial_id()).touch()
    while len(list(started.iterdir())) < config["slots"] and time.time() - t0 < 30:  # until all that fit have started
        time.sleep(0.1)
    time.sleep(0.5)
    tune.report({"start": t0, "end": time.time(), "given": json.dumps(given), "torch_threads": torch.get_num_threads(),
                 "node": ray.get_runtime_context().get_node_id(), "device": Runtime.resolve("auto").device.type})

for gpus in map(float, sys.argv[3:]):
    plan = SimpleNamespace(res={}, num_samples=99, cluster=True, located=address)
    args = SimpleNamespace(gpus_per_trial=gpus, cpus_per_trial=None, max_concurrent=None)
    slots = settle_resources(plan, args, alive_nodes())
    started = work / f"started{gpus:g}"
    started.mkdir(parents=True)
    grid = tune.Tuner(
        tune.with_resources(tiny, plan.res),
        param_space={"slots": slots, "started": str(started)},
        tune_config=tune.TuneConfig(num_samples=slots + 1, reuse_actors=True),
        run_config=tune.RunConfig(name=f"g{gpus:g}", storage_path=str(work / "tune"), verbose=0),
    ).fit()
    rows = [{**r.metrics, "given": json.loads(r.metrics["given"])} for r in grid if r.error is None]
    errors = sum(r.error is not None for r in grid)
    print(f"RESULT {gpus:g} " + json.dumps({"res": plan.res, "slots": slots, "rows": rows, "errors": errors}), flush=True)
"""


def most_at_once(rows: list[dict]) -> int:
    events = sorted([(r["start"], 1) for r in rows] + [(r["end"], -1) for r in rows], key=lambda e: (e[0], e[1]))
    now = top = 0
    for _, step in events:
        now += step
        top = max(top, now)
    return top


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory):
    """A head with 1 CPU and no GPU and a worker with ``WORKER``'s logical CPUs and GPUs, token
    authentication on: ``(address, the driver's environment without the node's own settings)``."""
    logs = tmp_path_factory.mktemp("nodes")
    temps = [Path(tempfile.mkdtemp(prefix=p, dir="/tmp")) for p in ("rh", "rw")]  # one per "machine"
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = driver_env(RAY_TMPDIR=str(temps[0]), PYTHONPATH=pythonpath, **auth)
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes: list[subprocess.Popen] = []
    try:
        head = ["--head", "--port", str(port), "--num-cpus", "1", "--num-gpus", "0", "--include-dashboard=false"]
        nodes.append(start_node(head, env, logs / "head.log"))
        worker = ["--address", address, "--num-cpus", str(WORKER["CPU"]), "--num-gpus", str(WORKER["GPU"])]
        nodes.append(start_node([*worker, "--temp-dir", str(temps[1])], env, logs / "worker.log"))
        yield address, driver_env(PYTHONPATH=pythonpath, **auth)
    finally:
        stop_nodes(nodes, temps)
    assert not [p for n in nodes for p in group_alive(n.pid)]


@pytest.mark.slow
def test_trials_on_a_cluster_with_gpus_get_the_rules_share(gpu_cluster, tmp_path):
    """A tiny trainable through the study's resource path, whole GPUs and halves: what each trial
    asks for and is given, how many run at once, its devices, threads, and its device (CPU)."""
    address, env = gpu_cluster
    driver = {**env, "CUDA_VISIBLE_DEVICES": ""}  # a driver without CUDA
    cases = ((1, {"cpu": 4, "gpu": 1.0}, 2), (0.5, {"cpu": 2, "gpu": 0.5}, 4))  # whole GPUs, then halves
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, address, str(tmp_path), *(str(c[0]) for c in cases)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=driver,
        cwd=REPO,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("resources:")]
    for (gpus, want, slots), line in zip(cases, lines, strict=True):
        found = json.loads(out.stdout.split(f"RESULT {gpus:g} ", 1)[1].splitlines()[0])
        assert found["res"] == want and found["slots"] == slots, line
        assert line.startswith(f"resources: {want['cpu']} CPU, {gpus:g} GPU per trial, {slots} at once"), line
        rows = found["rows"]
        assert found["errors"] == 0 and len(rows) == slots + 1
        assert most_at_once(rows) == slots, rows  # as many as predicted, and no more
        for row in rows:
            assert row["given"]["cpu"] == want["cpu"] and row["given"]["gpu"] == want["gpu"]
            assert row["given"]["threads"] == row["torch_threads"] == want["cpu"]
            assert row["device"] == "cpu"  # a logical GPU on a machine without CUDA: the trial runs on CPU
        assert len({r["node"] for r in rows}) == 1  # the worker: the head has no GPU
        first = sorted(rows, key=lambda r: r["start"])[:slots]  # the trials that ran together
        devices = Counter(r["given"]["cuda_visible_devices"] for r in first)
        assert devices == Counter({"0": slots // 2, "1": slots // 2}), devices  # each its own share of a GPU


@pytest.mark.slow
def test_a_study_on_gpu_nodes_without_cuda(gpu_cluster, tmp_path):
    """The study itself on this cluster: its start line, and a trial given a logical GPU runs on CPU."""
    address, env = gpu_cluster
    out = run_study(
        *SMOKE,
        "--results",
        tmp_path / "results",
        "--address",
        address,
        "--gpus-per-trial",
        "0.5",
        "--num-samples",
        "1",
        "--max-epochs",
        "1",
        "--no-report",
        env=env,
        timeout=150,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "resources: 2 CPU, 0.5 GPU per trial, 4 at once; 9 CPUs, 2 GPUs on 2 nodes" in out.stdout, text[-4000:]
    assert re.search(r"2 CPU, 0.5 GPU \(CUDA_VISIBLE_DEVICES=[01]\), 2 torch threads", text), text[-4000:]
