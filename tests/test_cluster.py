"""Where a study runs: bad requests fail fast, a local study owns its Ray, and a two-node cluster
(token authentication, as Ray 2.60 sets it up) runs a study on both nodes and survives it.

The cluster here is started by the test, in private temporary folders, and stopped by the process
groups of the ``ray start --block`` processes it started: never ``ray stop``, never by name.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from study.run import main

REPO = Path(__file__).resolve().parent.parent
RUN = [sys.executable, str(REPO / "study" / "run.py")]
RAY = str(Path(sys.executable).parent / "ray")
SMOKE = ["--space", "eps_sweep", "--profile", "smoke"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray turns the SIGTERM that ends a finished trial's worker into SystemExit(1); on a loaded machine it
# can land inside a weakref callback during garbage collection, and Python prints it as ignored.
# That worker had reported its last result: the noise is dropped, any other traceback still fails.
_SHUTDOWN_NOISE = re.compile(
    r"[^\n]*(?:Exception ignored in|Traceback \(most recent call last\))[^\n]*\n"
    r"(?:[^\n]*\n){0,24}?[^\n]*_weakrefset\.py[^\n]*\n(?:[^\n]*\n){0,8}?[^\n]*SystemExit: 1[^\n]*(?:\n|$)"
)


def shutdown_noise(text: str) -> str:
    """``text`` without the shutdown noise of a finished trial's worker (see above)."""
    return _SHUTDOWN_NOISE.sub("", text)


def driver_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    return {**env, **extra}


def run_study(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*RUN, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env or driver_env(), cwd=REPO
    )


@pytest.fixture
def own_environ():
    """main() sets Ray's environment variables in this process: put them back afterwards."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize(
    "option, value, names",
    [
        ("--num-samples", "0", "--num-samples"),
        ("--num-samples", "-1", "--num-samples"),  # Ray reads -1 as "sample forever"
        ("--max-concurrent", "0", "--max-concurrent"),
        ("--cpus-per-trial", "0", "--cpus-per-trial"),
        ("--gpus-per-trial", "-1", "--gpus-per-trial"),
        ("--gpus-per-trial", "1.5", "--gpus-per-trial"),
        ("--address", "127.0.0.1:1", "connection refused"),
        ("--address", "no-such-host.invalid:6379", "cannot resolve host"),
        ("--address", "somewhere", "HOST:PORT"),
        ("--address", "ray://head:10001", "Ray Client"),
    ],
)
def test_a_bad_request_fails_before_ray_with_one_line(option, value, names, tmp_path, capsys, own_environ):
    t0 = time.monotonic()
    code = main([*SMOKE, "--results", str(tmp_path / "results"), option, value])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and names in err, err
    assert option in err or option == "--address" and value in err
    assert not (tmp_path / "results").exists()  # nothing generated or written: it failed first
    assert time.monotonic() - t0 < 5


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible here")
def test_a_gpu_request_without_a_gpu_is_refused(tmp_path, capsys, own_environ):
    assert main([*SMOKE, "--results", str(tmp_path), "--gpus-per-trial", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--gpus-per-trial 1: no GPU is visible" in err


def test_the_cli_prints_one_line_and_no_traceback(tmp_path):
    t0 = time.monotonic()
    out = run_study(*SMOKE, "--results", tmp_path, "--address", "127.0.0.1:1", timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "127.0.0.1:1" in out.stderr and "Traceback" not in out.stderr
    assert time.monotonic() - t0 < 15


class SilentServer:
    """A TCP port that accepts connections and never says anything (not a Ray head)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.mark.slow
def test_an_address_that_is_not_a_ray_head_fails_within_15_s(tmp_path):
    """Ray's own retries against such a port ran for more than a minute."""
    server = SilentServer()
    try:
        t0 = time.monotonic()
        out = run_study(*SMOKE, "--results", tmp_path, "--address", f"127.0.0.1:{server.port}", timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        server.close()
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith(f"error: --address 127.0.0.1:{server.port}")
        and "Traceback" not in out.stderr
    )
    assert elapsed < 15 + 3  # 15 s, and the interpreter's start and the smoke data on 2 shared cores


@pytest.mark.slow
def test_a_local_study_starts_its_own_ray_whatever_was_left(tmp_path):
    """RAY_ADDRESS and a ray_current_cluster file of a stopped cluster made ray.init(num_cpus=...)
    fail with 'When connecting to an existing cluster, num_cpus and num_gpus must not be provided'."""
    temp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        (temp / "ray").mkdir()
        (temp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
        code = (
            "import ray; from study.cluster import start_ray; start_ray(None, cpus=1, gpus=0); "
            "print('CPU', ray.cluster_resources()['CPU']); ray.shutdown()"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=90,
            cwd=REPO,
            env=driver_env(RAY_ADDRESS="127.0.0.1:1", RAY_TMPDIR=str(temp)),
        )
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CPU 1.0" in out.stdout


# ---------------------------------------------------------------------------------------------
# a two-node cluster on this machine
# ---------------------------------------------------------------------------------------------
def stop_nodes(nodes: list, temps: list) -> None:
    """Stop the nodes a test started, last first, by process group, and remove their temporary folders
    (with the ray_current_cluster files the nodes wrote)."""
    for node in reversed(nodes):
        stop_group(node)
    for temp in temps:
        shutil.rmtree(temp, ignore_errors=True)


def stop_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Stop a ``ray start --block`` this test started, with every process of its group."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and group_alive(proc.pid):
            time.sleep(0.2)
        if not group_alive(proc.pid):
            break
    proc.wait(timeout=10)


def group_alive(pgid: int) -> list[str]:
    """Live (non-zombie) processes of process group ``pgid``: 'pid name cmdline'."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            out.append(f"{entry} {text[text.index('(') + 1 : text.rindex(')')]} {cmd[:200]}")
    return out


def start_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``ray start ARGS --block`` in a session of its own (stopped by :func:`stop_nodes`), once it has started."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [RAY, "start", *args, "--disable-usage-stats", "--block"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_for(log, "Ray runtime started", proc, 60)
    return proc


def wait_for(path: Path, text: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    raise AssertionError(f"'{text}' not in {path} after {timeout_s} s:\n{path.read_text(errors='replace')[-3000:]}")


@pytest.mark.slow
def test_a_study_on_a_two_node_cluster(tmp_path):
    """The README's recipe on one machine: a head and a second node, one CPU each, token
    authentication as Ray 2.60 sets it up; the study runs trials on both nodes, prints each trial
    line once, and leaves the cluster running and none of its trial processes behind."""
    token = secrets.token_hex(32)
    temps = [Path(tempfile.mkdtemp(prefix=p, dir="/tmp")) for p in ("rh", "rw")]  # one per "machine"
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # this checkout's code
    env = driver_env(RAY_TMPDIR=str(temps[0]), PYTHONPATH=pythonpath, **auth)
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes: list[subprocess.Popen] = []
    logs = [tmp_path / "head.log", tmp_path / "worker.log"]
    try:
        with open(logs[0], "w") as log:
            nodes.append(
                subprocess.Popen(
                    [
                        RAY,
                        "start",
                        "--head",
                        "--port",
                        str(port),
                        "--num-cpus",
                        "1",
                        "--include-dashboard=false",
                        "--disable-usage-stats",
                        "--block",
                    ],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        wait_for(logs[0], "Ray runtime started", nodes[0], 60)
        # two nodes on one machine need separate temporary folders: each node's log monitor
        # forwards every worker log in its folder, so a shared one sent each trial line twice
        with open(logs[1], "w") as log:
            nodes.append(
                subprocess.Popen(
                    [
                        RAY,
                        "start",
                        "--address",
                        address,
                        "--num-cpus",
                        "1",
                        "--temp-dir",
                        str(temps[1]),
                        "--disable-usage-stats",
                        "--block",
                    ],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        wait_for(logs[1], "Ray runtime started", nodes[1], 60)

        out = run_study(
            *SMOKE,
            "--results",
            tmp_path / "results",
            "--address",
            address,
            "--no-report",
            env=driver_env(**auth),
            timeout=150,
        )
        text = out.stdout + out.stderr
        assert out.returncode == 0, text[-4000:]
        trials = pd.read_parquet(tmp_path / "results" / "eps_sweep" / "trials.parquet")
        assert trials["trial_id"].nunique() == 6 and set(trials["status"]) == {"TERMINATED"}
        assert trials.groupby("trial_id")["node_id"].nunique().eq(1).all()
        assert trials["node_id"].nunique() == 2, trials.groupby("trial_id")["node_id"].first()
        for epoch in (1, 2):  # one line per trial event: none doubled, none folded by Ray's dedup
            assert text.count(f"epoch {epoch}: loss") == 6, text[-4000:]
        quiet = shutdown_noise(text)
        assert "across cluster" not in quiet and "Traceback" not in quiet and "SystemExit" not in quiet, quiet[-4000:]

        # the cluster is still up, and none of the study's trial processes outlive it
        assert all(n.poll() is None for n in nodes)
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        deadline = time.monotonic() + 15
        while (
            left := [p for n in nodes for p in group_alive(n.pid) if "ImplicitFunc" in p or "train_trial" in p]
        ) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, left

        # refused after connecting: a GPU request no node can satisfy; a driver without the token
        t0 = time.monotonic()
        out = run_study(
            *SMOKE,
            "--results",
            tmp_path / "r2",
            "--address",
            address,
            "--gpus-per-trial",
            "0.5",
            env=driver_env(**auth),
            timeout=60,
        )
        assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr[-3000:]
        assert "--gpus-per-trial 0.5: no node of the cluster" in out.stderr and time.monotonic() - t0 < 15
        t0 = time.monotonic()
        out = run_study(
            *SMOKE,
            "--results",
            tmp_path / "r3",
            "--address",
            address,
            timeout=60,
            env=driver_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32)),
        )
        assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr[-3000:]
        assert "refused this driver's authentication token" in out.stderr and time.monotonic() - t0 < 15 + 3
        assert all(n.poll() is None for n in nodes)
    finally:
        stop_nodes(nodes, temps)
    assert not [p for n in nodes for p in group_alive(n.pid)]
