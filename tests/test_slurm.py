"""The Slurm recipe, ``examples/slurm/study.sbatch``, run for real (issue 23).

The test starts a Slurm cluster of two nodes on this machine (Debian's Slurm is built with
multiple-slurmd support): munged with a key of its own, slurmctld and one slurmd per node, each in
the foreground, configured in a private temporary folder through ``SLURM_CONF``, on free ports,
without accounting; and stops them by their PIDs at the end. It then submits the recipe with
``sbatch`` as the README says: a two-trial smoke study on the shared synthetic data folder, on a
Ray head in the first node's step and a Ray worker in the second's, joined with the job's token.
The study's tables must show trials on both nodes; the job's exit status must be the driver's,
also when the driver refuses the request; and no Ray process or temporary folder of the job may be
left. Skipped, saying why, where Slurm or munge is not installed (``.ci/run`` installs them) or
the test does not run as root (slurmd launches jobs as root).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from test_cluster import driver_env, free_port, shutdown_noise

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "examples" / "slurm" / "study.sbatch"
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
BINARIES = ("mungekey", "munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "srun", "scancel")
NODES = ("n1", "n2")
SPACE = "description: two trials for the Slurm recipe's test\nparameters:\n  epsilon: {grid: [0, 1000]}\n"
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED"}

pytestmark = pytest.mark.slow


def binary(name: str) -> str | None:
    return shutil.which(name, path=SBIN)


def skip_reason() -> str | None:
    missing = [b for b in BINARIES if binary(b) is None]
    if missing:
        return f"Slurm or munge not installed ({', '.join(missing)} not found); apt-get install -y slurm-wlm munge"
    if os.geteuid() != 0:
        return "slurmd must run as root to launch jobs"
    return None


def slurm_conf(root: Path, ctld_port: int, node_ports: list[int]) -> str:
    """A minimal Slurm of two one-CPU nodes on this machine: no accounting, no cgroups."""
    nodes = "\n".join(
        f"NodeName={n} NodeHostname=localhost Port={p} CPUs=1 State=UNKNOWN" for n, p in zip(NODES, node_ports)
    )
    return f"""ClusterName=mriadvtest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
{nodes}
PartitionName=test Nodes={",".join(NODES)} Default=YES MaxTime=10 State=UP
"""


class Slurm:
    """munged, slurmctld and a slurmd per node, started in ``root`` and stopped by PID."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # none of a surrounding Slurm job's settings (a test run inside an allocation)
        env = {k: v for k, v in driver_env().items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        self.env = {**env, "SLURM_CONF": str(root / "slurm.conf"), "PATH": SBIN}
        self.daemons: list[subprocess.Popen] = []

    def start(self) -> None:
        root = self.root
        for sub in ("munge", "state", "log", *(f"spool/{n}" for n in NODES)):
            (root / sub).mkdir(parents=True)
        munge = root / "munge"
        munge.chmod(0o755)  # munged wants its socket's folder open to all, and nothing else writable
        self.run(binary("mungekey"), "--create", f"--keyfile={munge / 'key'}")
        self.spawn(
            "munged",
            [
                binary("munged"),
                "--foreground",
                f"--key-file={munge / 'key'}",
                f"--socket={munge / 'socket'}",
                f"--pid-file={munge / 'pid'}",
                f"--log-file={munge / 'log'}",
                f"--seed-file={munge / 'seed'}",
            ],
        )
        self.wait(lambda: (munge / "socket").exists(), "munged's socket", 20)
        (root / "slurm.conf").write_text(slurm_conf(root, free_port(), [free_port() for _ in NODES]))
        self.spawn("slurmctld", [binary("slurmctld"), "-D", "-i"])
        for node in NODES:
            self.spawn(f"slurmd-{node}", [binary("slurmd"), "-D", "-N", node])
        self.wait(lambda: self.run("sinfo", "-h", "-N", "-o", "%N %t").split() == ["n1", "idle", "n2", "idle"], "", 40)

    def spawn(self, name: str, cmd: list) -> None:
        with open(self.root / "log" / f"{name}.out", "w") as log:
            self.daemons.append(
                subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )

    def run(self, *cmd) -> str:
        out = subprocess.run(list(map(str, cmd)), check=False, env=self.env, capture_output=True, text=True, timeout=30)
        if out.returncode:
            raise AssertionError(f"{cmd} failed ({out.returncode}): {out.stderr}")
        return out.stdout

    def wait(self, ready, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if ready():
                    return
            except AssertionError:
                pass
            if any(d.poll() is not None for d in self.daemons):
                break
            time.sleep(0.5)
        raise AssertionError(f"Slurm did not come up ({what or 'both nodes idle'}):\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in (self.root / "log").iterdir())

    def job(self, job_id: str) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def finish(self, job_id: str, timeout_s: float) -> dict[str, str]:
        """The job's record once it has ended, or scancel it and fail after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (info := self.job(job_id))["JobState"] in ACTIVE:
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job_id], check=False, env=self.env, timeout=30)
                raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout_s} s")
            time.sleep(1)
        return info

    def stop(self) -> None:
        """End any job still there, then the daemons, last started first, by PID."""
        if len(self.daemons) > 1 and self.daemons[1].poll() is None:  # slurmctld is up
            subprocess.run(["scancel", "--full", "--partition=test"], env=self.env, timeout=30, check=False)
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                out = subprocess.run(
                    ["squeue", "-h"], check=False, env=self.env, capture_output=True, text=True, timeout=30
                )
                if out.returncode or not out.stdout.strip():
                    break
                time.sleep(1)
        for daemon in reversed(self.daemons):
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait(timeout=10)


def processes_mentioning(text: str) -> list[str]:
    """Live (non-zombie) processes whose command line contains ``text``: 'pid cmdline'."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and stat[stat.rindex(")") + 2] not in "ZX":
            out.append(f"{entry} {cmd[:200]}")
    return out


@pytest.fixture
def slurm():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    # short (Ray's socket paths live under the jobs' Ray folders here) and open to all (munged)
    root = Path(tempfile.mkdtemp(prefix="sl", dir="/tmp"))
    root.chmod(0o755)
    cluster = Slurm(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        for line in processes_mentioning(f"{root}/ray-"):  # Ray processes of a job cut short: ours, by PID
            os.kill(int(line.split()[0]), signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def submit(slurm: Slurm, *study_args, nodes: int = 2) -> tuple[str, dict[str, str], str]:
    """sbatch the recipe as the README does (overriding its #SBATCH size), wait for the job's end;
    its id, its record and its output."""
    python_dirs = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), slurm.env["PATH"]]))
    env = {
        **slurm.env,
        "PATH": python_dirs,  # this test's Python and ray, where sys.prefix is no virtual environment
        "MRIADV_VENV": sys.prefix,
        "MRIADV_DIR": str(REPO),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "RAY_PORT": str(free_port()),
        "RAY_TMP_PARENT": str(slurm.root),
        "RAY_NODE_WAIT_S": "60",
    }
    sbatch = [
        "sbatch",
        "--parsable",
        f"--nodes={nodes}",
        "--cpus-per-task=1",
        "--gpus-per-task=0",
        "--time=5",
        f"--output={slurm.root / 'job-%j.out'}",
        str(RECIPE),
        *map(str, study_args),
    ]
    out = subprocess.run(sbatch, check=False, env=env, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    info = slurm.finish(job_id, timeout_s=240)  # 60-110 s on 2 idle cores
    return job_id, info, (slurm.root / f"job-{job_id}.out").read_text(errors="replace")


def assert_ray_gone(slurm: Slurm, job_id: str) -> None:
    """No Ray process of the job is alive, and its nodes' Ray folders are removed."""
    left = processes_mentioning(f"{slurm.root}/ray-{job_id}-")  # Ray's processes name their folder
    assert not left, left
    assert not list(slurm.root.glob(f"ray-{job_id}-*")), list(slurm.root.glob(f"ray-{job_id}-*"))


def test_the_slurm_recipe_runs_a_study_on_two_nodes(slurm, tmp_path, synthetic_root):
    (tmp_path / "two.yaml").write_text(SPACE)
    results = tmp_path / "results"
    args = ["--space", tmp_path / "two.yaml", "--profile", "smoke", "--data", synthetic_root]
    job_id, info, text = submit(slurm, *args, "--results", results)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text[-4000:] + slurm.logs()
    assert "Ray head on n1 at " in text and "1 worker node(s); 1 CPUs, 0 GPUs per node" in text
    assert "Ray cluster up: 2 node(s)" in text
    # the per-trial resources come from the cluster, which has the allocation's CPUs: one per node
    assert "resources: 1 CPU, 0 GPU per trial, 2 at once; 2 CPUs, 0 GPUs on 2 nodes of the cluster" in text, text
    trials = pd.read_parquet(results / "two" / "trials.parquet")
    assert sorted(trials["epsilon_ref"].unique()) == [0, 1000]
    assert set(trials["status"]) == {"TERMINATED"} and sorted(trials["epoch"].unique()) == [1, 2]
    assert trials["node_id"].nunique() == 2, trials[["trial_id", "node_id"]]  # the worker joined, with the token
    report = results / "two" / "report"
    table1 = (report / "table1.md").read_text()
    assert table1.startswith("# Table 1 — two") and "| Report-S |" in table1 and "| Report-A |" in table1, table1
    assert "- trials: 2 (2 TERMINATED)" in (report / "summary.md").read_text()
    assert "Traceback" not in shutdown_noise(text), text[-4000:]
    assert_ray_gone(slurm, job_id)

    # the driver's exit status is the job's: a request no node of the cluster can run is refused
    job_id, info, text = submit(slurm, *args, "--results", tmp_path / "r2", "--gpus-per-trial", "1", nodes=1)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), text[-4000:]
    assert "error: --gpus-per-trial 1: no node of the cluster" in text, text[-4000:]
    assert_ray_gone(slurm, job_id)
