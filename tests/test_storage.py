"""A study on a cluster refuses to start where a node does not see the study folder or the data
folder at the driver's paths (issue 21, item 2, first point): without shared storage a trial failed
only after its first epoch, with Ray's traceback.

The node's side of the check (:func:`study.cluster.node_sees`) on folders of this machine; then a
two-node cluster of this machine whose worker runs in a mount namespace of its own (``unshare
--mount``) with a tmpfs over the driver's results folder, as a machine without the shared disk would.
Its nodes are started in private temporary folders and stopped by the process groups of the ``ray
start --block`` processes (helpers of ``test_cluster``); the tmpfs goes with the namespace.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_cluster import (
    RAY,
    REPO,
    SMOKE,
    driver_env,
    free_port,
    group_alive,
    run_study,
    stop_nodes,
    wait_for,
)

from study.cluster import data_listing, node_sees


def make_data(root: Path, files: dict[str, bytes]) -> Path:
    for split in ("singlecoil_train", "singlecoil_val"):
        (root / split).mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (root / name).write_bytes(content)
    return root


def test_what_a_node_sees(tmp_path):
    study = tmp_path / "results" / "s"
    study.mkdir(parents=True)
    data = make_data(tmp_path / "data", {"singlecoil_train/a.h5": b"12", "singlecoil_val/b.h5": b"1"})
    marker = study / ".storage_check_t0"
    marker.write_text("t0")
    expected = data_listing(str(data))
    assert expected == {"singlecoil_train": [["a.h5", 2]], "singlecoil_val": [["b.h5", 1]]}

    assert node_sees(str(marker), "t0", str(data), expected, "n1") is None
    assert (study / ".storage_check_t0_n1").read_text() == "n1"  # the reply the driver reads

    missing = node_sees(str(study / ".storage_check_t1"), "t1", str(data), expected, "n1")
    assert (
        missing == f"does not see the study folder {study} (the marker the driver wrote there is missing on that node)"
    )
    gone = node_sees(str(tmp_path / "nowhere" / ".storage_check_t0"), "t0", str(data), expected, "n1")
    assert "(the folder is missing on that node)" in gone
    assert "sees another folder" in node_sees(str(marker), "t9", str(data), expected, "n1")

    other = make_data(tmp_path / "other", {"singlecoil_train/a.h5": b"12"})
    assert node_sees(str(marker), "t0", str(other), expected, "n1") == (
        f"sees another data folder at {other} (singlecoil_val/ lists 0 files there, 1 here; b.h5 is in one only)"
    )
    (other / "singlecoil_val" / "b.h5").write_bytes(b"123")
    assert node_sees(str(marker), "t0", str(other), expected, "n1") == (
        f"sees another data folder at {other} (singlecoil_val/b.h5: 3 bytes there, 1 here)"
    )
    shutil.rmtree(other / "singlecoil_val")
    assert node_sees(str(marker), "t0", str(other), expected, "n1") == (
        f"does not see the data folder {other} ({other / 'singlecoil_val'} is missing on that node)"
    )
    study.chmod(0o500)  # readable, not writable (root writes anyway: then only the message is not checked)
    try:
        reply = node_sees(str(marker), "t0", str(data), expected, "n2")
        assert reply is None or reply == f"cannot write into the study folder {study} (Permission denied)"
    finally:
        study.chmod(0o700)


def unshare_prefix() -> list[str] | None:
    """``unshare`` arguments for a private mount namespace in which this user may mount a tmpfs, or None."""
    prefix = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(
        [*prefix, "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True, timeout=10, check=False
    )
    return prefix if probe.returncode == 0 else None


def start_hidden_cluster(
    nodes: list[subprocess.Popen], temps: list[Path], logs: list[Path], env: dict[str, str], hidden: list[Path]
) -> tuple[str, str]:
    """A head and a second node of one CPU each, the second in a mount namespace of its own with an empty
    tmpfs over each of ``hidden`` (as a machine without the shared disk); ``nodes`` is filled as they
    start (the caller stops them, :func:`test_cluster.stop_nodes`). Returns the head's address and the
    second node's id."""
    prefix = unshare_prefix()
    assert prefix is not None
    port = free_port()
    address = f"127.0.0.1:{port}"
    start = [RAY, "start", "--num-cpus", "1", "--disable-usage-stats", "--block"]
    hide = " && ".join(f"mount -t tmpfs tmpfs {shlex.quote(str(p))}" for p in hidden) + ' && exec "$@"'
    with open(logs[0], "w") as log:
        head = [*start, "--head", "--port", str(port), "--include-dashboard=false"]
        nodes.append(subprocess.Popen(head, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    wait_for(logs[0], "Ray runtime started", nodes[0], 60)
    worker = [*start, "--address", address, "--temp-dir", str(temps[1])]
    with open(logs[1], "w") as log:
        nodes.append(
            subprocess.Popen(
                [*prefix, "sh", "-c", hide, "sh", *worker],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    wait_for(logs[1], "Ray runtime started", nodes[1], 60)
    raylet = (temps[1] / "session_latest" / "logs" / "raylet.out").read_text()
    return address, re.search(r"Setting node ID node_id=([0-9a-f]+)", raylet).group(1)


# the driver side on the same cluster, directly: a shared folder passes; a data folder whose split the
# worker sees empty is named
CHECKS = r"""
import sys
from pathlib import Path
from study.cluster import start_ray, storage_problem

start_ray(sys.argv[1], 0, 0)
for study, data in zip(sys.argv[2::2], sys.argv[3::2]):
    print("CHECK", storage_problem(Path(study), Path(data)), flush=True)
"""


@pytest.mark.slow
def test_a_node_without_the_shared_folder_is_refused(tmp_path, synthetic_root):
    if unshare_prefix() is None:
        pytest.skip("mount namespaces are not permitted here (unshare --mount with a tmpfs)")
    results = tmp_path / "results"  # the worker gets an empty tmpfs of its own over this
    results.mkdir()
    partial = make_data(tmp_path / "partial", {"singlecoil_train/a.h5": b"12", "singlecoil_val/b.h5": b"1"})
    shared = tmp_path / "shared" / "s"  # both nodes see this one
    shared.mkdir(parents=True)
    token = secrets.token_hex(32)
    temps = [Path(tempfile.mkdtemp(prefix=p, dir="/tmp")) for p in ("rh", "rw")]  # one per "machine"
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = driver_env(RAY_TMPDIR=str(temps[0]), PYTHONPATH=pythonpath, **auth)
    nodes: list[subprocess.Popen] = []
    logs = [tmp_path / "head.log", tmp_path / "worker.log"]
    try:
        address, worker_id = start_hidden_cluster(nodes, temps, logs, env, [results, partial / "singlecoil_val"])

        t0 = time.monotonic()
        out = run_study(
            *SMOKE, "--results", results, "--data", synthetic_root, "--address", address, env=driver_env(**auth)
        )
        elapsed = time.monotonic() - t0
        study_dir = results / "eps_sweep"
        assert out.returncode == 2, (out.stdout + out.stderr)[-4000:]
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert re.match(rf"error: node [\d.]+ \(id {worker_id[:12]}\) does not see the study folder ", lines[0]), lines
        assert f"{study_dir} (the folder is missing on that node)" in lines[0], lines[0]
        assert elapsed < 30, elapsed
        # nothing trained, and the driver's markers are gone
        assert "epoch 1" not in out.stdout and not (study_dir / "tuner.pkl").exists()
        assert sorted(p.name for p in study_dir.iterdir()) == ["driver.lock", "study.json"]

        checks = subprocess.run(
            [sys.executable, "-c", CHECKS, address, shared, synthetic_root, shared, partial],
            check=False,
            capture_output=True,
            text=True,
            timeout=90,
            env=driver_env(**auth),
            cwd=REPO,
        )
        found = [ln for ln in checks.stdout.splitlines() if ln.startswith("CHECK ")]
        assert len(found) == 2, (checks.stdout + checks.stderr)[-3000:]
        assert found[0] == "CHECK None"
        assert re.match(rf"CHECK node [\d.]+ \(id {worker_id[:12]}\) sees another data folder at {partial} ", found[1])
        assert "(singlecoil_val/ lists 0 files there, 1 here; b.h5 is in one only)" in found[1]
        assert not list(shared.iterdir())  # markers and replies removed
        assert all(n.poll() is None for n in nodes)
    finally:
        stop_nodes(nodes, temps)
    assert not [p for n in nodes for p in group_alive(n.pid)]
