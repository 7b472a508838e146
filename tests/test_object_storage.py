"""A study on object storage, ``--results s3://bucket/prefix`` (issue 21, item 2, second point):
against an S3-compatible server this test starts itself (moto in server mode, on 127.0.0.1, stopped
by its PID).

The pieces without Ray: the study's URI and working copy, Tune's state copy pushed as one set (a push
cut short leaves the previous set), a pull that makes the working copy the URI's, the reference
trial's record and ``best.pt`` read there, bad storage refused in one line. Then end to end on a
two-node cluster whose second node cannot see the driver's folder (a tmpfs over it, as in
``test_storage``): the study completes with trials on both nodes, resumes after a SIGKILL of the
driver from the URI alone (the working copy deleted) with every (trial, epoch) once and Optuna told
each trial once, and ``study/report.py <uri>`` builds the report from the URI.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from test_cluster import REPO, driver_env, free_port, group_alive, stop_nodes
from test_storage import start_hidden_cluster, unshare_prefix

from study.layout import BEST_CHECKPOINT, REFERENCE_FILE, STATE_FILE, TUNE_STATE_DIR
from study.reference import record_reference, resolve_sampled
from study.storage import RemoteStudy, is_uri, shown, study_uri, working_copy
from study.tables import load_tables
from study.tune_state import backup_state, saved_set

RUN = [sys.executable, str(REPO / "study" / "run.py")]
REPORT = [sys.executable, str(REPO / "study" / "report.py")]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A local S3-compatible server with the bucket ``bkt``; ``s3.uri(prefix)`` names a prefix in it."""
    server = Path(sys.executable).parent / "moto_server"
    if not server.is_file():
        pytest.skip('moto[server] is not installed (pip install -e ".[test]")')
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.2)
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True).create_dir(
            "bkt"
        )
        yield SimpleNamespace(
            port=port, uri=lambda prefix: f"s3://bkt/{prefix}?endpoint_override=127.0.0.1:{port}&scheme=http"
        )
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_uri_names():
    uri = "s3://bkt/runs/?endpoint_override=h:9000&scheme=http"
    assert is_uri(uri) and is_uri("gs://b") and not is_uri("results") and not is_uri("/abs/s3:/x")
    assert study_uri(uri, "eps_sweep") == "s3://bkt/runs/eps_sweep?endpoint_override=h:9000&scheme=http"
    assert shown(study_uri(uri, "eps_sweep")) == "s3://bkt/runs/eps_sweep"
    root = Path("/tmp/copies")
    assert working_copy(study_uri(uri, "eps_sweep"), root) == root / "s3" / "bkt" / "runs" / "eps_sweep"


def _state_files(staging: Path, session: str, n: int) -> None:
    """Three state files of one save of Tune's, with ``n`` in each (JSON, and two pickles)."""
    staging.mkdir(parents=True, exist_ok=True)
    (staging / f"experiment_state-{session}.json").write_text(json.dumps({"save": n}))
    (staging / f"search_gen_state-{session}.json").write_bytes(pickle.dumps({"save": n}))
    (staging / f"searcher-state-{session}.pkl").write_bytes(pickle.dumps(["searcher", n]))


def _saves_in(folder: Path) -> set[int]:
    files = saved_set(folder / TUNE_STATE_DIR)
    assert files is not None
    return {
        json.loads(files[0].read_text())["save"],
        pickle.loads(files[1].read_bytes())["save"],
        pickle.loads(files[2].read_bytes())[1],
    }


def test_the_state_copy_is_pushed_as_one_set(s3, tmp_path):
    uri = study_uri(s3.uri("sets"), "s")
    driver = RemoteStudy(uri, tmp_path / "driver")
    driver.local.mkdir(parents=True)
    (driver.local / STATE_FILE).write_text("{}")
    driver.push(STATE_FILE)
    staging = tmp_path / "staging"
    _state_files(staging, "2026-01-01_00-00-00", 1)
    state = driver.local / TUNE_STATE_DIR
    assert backup_state(staging, driver.local) and driver.push_state(saved_set(state))
    assert not driver.push_state(saved_set(state))  # unchanged: not pushed again

    _state_files(staging, "2026-01-01_00-00-00", 2)
    assert backup_state(staging, driver.local)
    first = saved_set(driver.local / TUNE_STATE_DIR)[0]  # a push of save 2 cut short after its first file
    driver.write_bytes(f"{TUNE_STATE_DIR}/2/{first.name}", first.read_bytes())

    fresh = RemoteStudy(uri, tmp_path / "elsewhere")  # another machine, from the URI alone
    assert fresh.pull_driver()
    assert _saves_in(fresh.local) == {1}  # the last complete set, all three of one save

    assert driver.push_state(saved_set(state))
    assert fresh.pull_driver() and _saves_in(fresh.local) == {2}
    assert [r for r, is_dir in driver.listing(TUNE_STATE_DIR) if is_dir] == [
        f"{TUNE_STATE_DIR}/2"
    ]  # the cut one redone; set 1 gone


def test_a_pull_makes_the_working_copy_the_uris(s3, tmp_path):
    uri = study_uri(s3.uri("pull"), "s")
    RemoteStudy(uri).write_bytes(STATE_FILE, b'{"from": "uri"}')
    local = tmp_path / "copy"
    (local / "trial_x_").mkdir(parents=True)
    (local / "trials.parquet").write_text("stale")
    (local / "driver.lock").write_text("pid 1")
    remote = RemoteStudy(uri, local)
    assert remote.pull_driver()
    assert sorted(p.name for p in local.iterdir()) == ["driver.lock", STATE_FILE]
    assert (local / STATE_FILE).read_text() == '{"from": "uri"}'
    assert not RemoteStudy(study_uri(s3.uri("pull"), "none"), tmp_path / "none").pull_driver()


def test_the_dashboard_and_a_reader_take_the_study_from_the_uri(s3, tmp_path, monkeypatch):
    from study import dashboard

    uri = study_uri(s3.uri("dash"), "s")
    there = RemoteStudy(uri)
    there.write_bytes(STATE_FILE, b"{}")
    there.write_bytes("optuna.db", b"db")
    there.write_bytes("trial_a_x=1/best.pt", b"w1")
    there.write_bytes("trial_a_x=1/checkpoint_000001/checkpoint.pt", b"big")  # not needed to read a study
    served = []
    monkeypatch.setattr(dashboard, "serve", lambda folder: served.append(folder) or 0)
    monkeypatch.chdir(tmp_path)
    assert dashboard.serve_study(s3.uri("dash"), "s") == 0
    local = tmp_path / "results" / ".object_storage" / "s3" / "bkt" / "dash" / "s"
    assert served == [local] and (local / "optuna.db").read_bytes() == b"db"
    assert (local / "trial_a_x=1" / "best.pt").read_bytes() == b"w1" and not (
        local / "trial_a_x=1" / "checkpoint_000001"
    ).exists()
    time.sleep(1.1)  # an object store's modification times are in seconds
    there.write_bytes("trial_a_x=1/best.pt", b"w2")  # the same size, a newer file: downloaded again
    assert RemoteStudy(uri, local).pull_trials() == 1 and (local / "trial_a_x=1" / "best.pt").read_bytes() == b"w2"
    there.write_bytes("trial_b_x=2/best.pt", b"w3")  # the end of a study without a report leaves models there
    assert RemoteStudy(uri, local).pull_trials(models=False) == 0 and not (local / "trial_b_x=2").exists()
    assert dashboard.serve_study(s3.uri("none"), "s") == 2


def test_one_driver_per_study_on_object_storage(s3, tmp_path):
    """The lease (study/lease.py): another host's fresh lease refuses, a stale one is taken over; on
    this host a live holder refuses and a dead one is taken over at once; the CLI says it in one line."""
    from study.lease import LEASE_FILE, Lease, StudyLeased

    uri = study_uri(s3.uri("lease"), "s")
    remote = RemoteStudy(uri, tmp_path / "copy")
    remote.write_bytes(LEASE_FILE, json.dumps({"host": "login9", "pid": 4242}).encode())
    with pytest.raises(StudyLeased, match=r"in use by another driver \(pid 4242 on host login9, its lease renewed"):
        Lease(remote, lease_s=60).claim()
    time.sleep(1.2)  # the store's clock counts whole seconds
    lease = Lease(remote, lease_s=1.0)
    lease.claim()  # stale: a killed driver's
    assert json.loads(remote.read_bytes(LEASE_FILE))["pid"] == os.getpid()
    lease.close()
    assert remote.read_bytes(LEASE_FILE) is None

    holder = subprocess.Popen(["sleep", "60"])  # a live process of this host
    try:
        remote.write_bytes(LEASE_FILE, json.dumps({"host": socket.gethostname(), "pid": holder.pid}).encode())
        with pytest.raises(StudyLeased, match=rf"pid {holder.pid} on host"):
            Lease(remote).claim()
        out, lines = _refused(tmp_path, s3.uri("lease"), "--name", "s")
        assert f"pid {holder.pid}" in lines[0], lines
    finally:
        holder.kill()
        holder.wait()
    lease = Lease(remote)
    lease.claim()  # its holder is dead: at once
    lease.close()


def test_a_fine_tuned_trial_reads_the_reference_there(s3, tmp_path):
    uri = study_uri(s3.uri("ref"), "s")
    driver = RemoteStudy(uri, tmp_path / "driver")
    folder = driver.local / "trial_ref_"
    driver.local.mkdir(parents=True)
    driver.write_bytes(f"trial_ref_/{BEST_CHECKPOINT}", b"weights")  # uploaded by Tune from the trial's node
    record_reference(driver.local, "ref", folder, "TERMINATED", driver)
    on_node = json.loads(driver.read_bytes(REFERENCE_FILE))
    assert on_node["best_rel"] == f"trial_ref_/{BEST_CHECKPOINT}" and on_node["best"].startswith("s3://bkt/ref/s/")

    work = tmp_path / "work"
    work.mkdir()
    worker = pickle.loads(pickle.dumps(RemoteStudy(uri, tmp_path / "unused")))  # as Ray ships it
    values = resolve_sampled({"init_from": "reference", "epsilon": 1.0}, tmp_path / "unused", print, worker, work)
    assert Path(values["init_from"]).parent == work and Path(values["init_from"]).read_bytes() == b"weights"

    record_reference(driver.local, "ref", tmp_path / "driver" / "trial_gone_", "ERROR", driver)
    with pytest.raises(RuntimeError, match="ended ERROR without a best.pt"):
        resolve_sampled({"init_from": "reference"}, tmp_path / "unused", print, worker, work)


def test_what_tune_restores_follows_the_study_to_another_folder(tmp_path):
    """The searcher's Optuna database and the results callback, pickled in one folder (as Tune pickles
    them into tuner.pkl), restored by a driver that runs the study in another (a working copy pulled
    elsewhere): both take the new folder."""
    from optuna.storages import RDBStorage

    from study import home
    from study.results import ResultsCallback
    from study.search import StudyStorage

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    own = RDBStorage(f"sqlite:///{tmp_path / 'mine.db'}")  # a user's own: stays where it is
    saved = pickle.dumps(
        {"study": StudyStorage(f"sqlite:///{old / 'optuna.db'}"), "own": own, "callback": ResultsCallback(old)}
    )
    shutil.rmtree(old)  # the first driver's working copy is gone (another machine)
    home.set_home(new, None)
    try:
        restored = pickle.loads(saved)
    finally:
        home._home.clear()
    assert type(restored["study"]) is StudyStorage
    assert restored["study"].url == f"sqlite:///{new / 'optuna.db'}" and (new / "optuna.db").is_file()
    assert restored["own"].url == own.url
    assert restored["callback"].folder == new and restored["callback"].remote is None


@pytest.mark.parametrize(
    "where, says",
    [
        (
            "s3://missing/p?endpoint_override=127.0.0.1:{port}&scheme=http",
            r"cannot write there: .*bucket does not exist",
        ),
        ("s3://bkt/p?endpoint_override=127.0.0.1:{port}&nonsense=1", r"cannot open it: .*'nonsense'"),
    ],
)
def test_storage_that_cannot_be_used_is_one_line(s3, tmp_path, where, says):
    t0 = time.monotonic()
    out, lines = _refused(tmp_path, where.format(port=s3.port))
    assert re.match(rf"error: --results s3://\w+/p/eps_sweep: {says}", lines[0]), lines[0]
    assert time.monotonic() - t0 < 30 and "ray" not in out.stdout.lower()
    assert not (tmp_path / "s3:").exists()  # a URI was once taken for a folder named 's3:'


def _refused(cwd: Path, results: str, *extra: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The smoke study at ``results``, which must end with exit status 2 and one line on stderr."""
    out = subprocess.run(
        [*RUN, "--space", "eps_sweep", "--profile", "smoke", "--results", results, *extra],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=driver_env(**CREDENTIALS),
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    return out, lines


def _table(remote: RemoteStudy, name: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(remote.read_bytes(name)))


@pytest.mark.slow
def test_a_study_on_object_storage_without_a_shared_folder(s3, tmp_path, synthetic_root):
    if unshare_prefix() is None:
        pytest.skip("mount namespaces are not permitted here (unshare --mount with a tmpfs)")
    results = tmp_path / "results"  # the driver's working copies are under it; the worker gets a tmpfs over it
    results.mkdir()
    space = tmp_path / "s3space.yaml"
    space.write_text(
        "description: object storage\nparameters:\n  epsilon: {grid: [0, 1000, 5000]}\n"
        "objectives: [{metric: val_nmse, mode: min}]\nattack_budgets: [1000]\n"
    )
    token = secrets.token_hex(32)
    temps = [Path(tempfile.mkdtemp(prefix=p, dir="/tmp")) for p in ("rh", "rw")]
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, **CREDENTIALS}
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = driver_env(RAY_TMPDIR=str(temps[0]), PYTHONPATH=pythonpath, **auth)
    nodes: list[subprocess.Popen] = []
    logs = [tmp_path / "head.log", tmp_path / "worker.log"]
    uri = s3.uri("studies")
    remote = RemoteStudy(study_uri(uri, "s3space"))
    try:
        address, _ = start_hidden_cluster(nodes, temps, logs, env, [results])
        args = [*RUN, "--space", space, "--profile", "smoke", "--max-epochs", 5, "--data", synthetic_root]
        args += ["--results", uri, "--address", address, "--no-report"]

        # the driver is killed with one trial finished and another part-way
        copy = results / ".object_storage" / "s3" / "bkt" / "studies" / "s3space"
        with open(tmp_path / "first.log", "w") as log:
            first = subprocess.Popen(
                list(map(str, args)),
                cwd=tmp_path,
                env=driver_env(**auth),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            killed_at = None
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and first.poll() is None:
                time.sleep(0.1)
                try:
                    t = load_tables(copy)[0]
                except Exception:  # noqa: BLE001 - not written yet, or mid-rename
                    continue
                if t.empty:
                    continue
                g = t.groupby("trial_id").agg(epochs=("epoch", "max"), status=("status", "last"))
                mid = g[(g["status"] == "RUNNING") & (g["epochs"] >= 1) & (g["epochs"] < 5)]
                if (g["status"] == "TERMINATED").sum() >= 1 and len(mid) >= 1:
                    killed_at = mid.index[0]  # what the URI holds may be a save behind this copy
                    os.kill(first.pid, signal.SIGKILL)
                    break
            first.wait()
        assert killed_at is not None, (tmp_path / "first.log").read_text()[-4000:]

        shutil.rmtree(results / ".object_storage")  # the resume has nothing but the URI,
        elsewhere = results / "elsewhere"  # and runs in another directory (hidden from the worker too)
        elsewhere.mkdir()
        second = subprocess.run(
            list(map(str, args)), cwd=elsewhere, env=driver_env(**auth), capture_output=True, text=True, timeout=300
        )
        text = second.stdout + second.stderr
        (tmp_path / "second.log").write_text(text)
        assert second.returncode == 0, text[-4000:]
        assert "resuming study 's3space'" in second.stdout

        t = _table(remote, "trials.parquet")
        assert not t.duplicated(["trial_id", "epoch"]).any()
        assert t["trial_id"].nunique() == 3
        for trial_id, rows in t.groupby("trial_id"):
            assert sorted(rows["epoch"]) == [1, 2, 3, 4, 5], trial_id
            assert set(rows["status"]) == {"TERMINATED"}
        assert t["node_id"].nunique() == 2  # the node without the driver's folder ran trials too
        assert (t["start_epoch"] > 0).any()  # a trial went on from its checkpoint on the URI
        assert "the study was interrupted" not in second.stdout
        assert not (copy / "trials.parquet").exists()  # the restored callback wrote into the new copy, not the old path
        assert (
            elsewhere / "results" / ".object_storage" / "s3" / "bkt" / "studies" / "s3space" / "optuna.db"
        ).is_file()

        import optuna

        db = tmp_path / "optuna.db"
        db.write_bytes(remote.read_bytes("optuna.db"))
        study = optuna.load_study(study_name="s3space", storage=f"sqlite:///{db}")
        last = t.sort_values("epoch").groupby("trial_id").last()
        told = {tr.user_attrs["ray_trial_id"]: tr.values[0] for tr in study.trials}
        assert told == pytest.approx(last["best_val_nmse"].to_dict(), rel=0, abs=0)
        assert {tr.state for tr in study.trials} == {optuna.trial.TrialState.COMPLETE}
        for trial_id in t["trial_id"].unique():  # each trial's files came through Tune's storage
            folder = [r for r, d in remote.listing() if d and r.startswith(f"trial_{trial_id}_")]
            files = {r.rpartition("/")[2] for r, _ in remote.listing(folder[0])}
            assert BEST_CHECKPOINT in files and any(f.startswith("events.out.tfevents") for f in files), files

        shutil.rmtree(elsewhere / "results" / ".object_storage")
        report = subprocess.run(
            [*REPORT, study_uri(uri, "s3space")],
            cwd=tmp_path,
            env=driver_env(**CREDENTIALS),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert report.returncode == 0, (report.stdout + report.stderr)[-3000:]
        assert "report: s3://bkt/studies/s3space/report/" in report.stdout
        table1 = remote.read_bytes("report/table1.md").decode()
        assert all(f"| {eps} | " in table1 for eps in (0, 1000, 5000)), table1[:3000]  # a row per trial
        assert remote.exists("report/summary.md")
        assert all(n.poll() is None for n in nodes)
    finally:
        stop_nodes(nodes, temps)
    assert not [p for n in nodes for p in group_alive(n.pid)]
