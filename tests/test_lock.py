"""One driver per study folder (issue 21, item 3): a second driver of a live study is refused in one
line naming the live driver's PID and host, before it reads or writes anything in the folder, and
a SIGKILLed driver leaves no stuck lock.

The live driver is a helper process that only takes the study's lock (:func:`study.lock.lock_study`,
as ``study/run.py`` does first) and sleeps: no study needs to run. The helpers are stopped by PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_cluster import SMOKE, own_environ, run_study  # noqa: F401 - own_environ: a fixture, used below

from study.layout import LOCK_FILE, STATE_FILE, TUNER_FILE
from study.lock import lock_study
from study.run import main

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("own_environ")  # main() sets Ray's variables in this process
HOLDER = (
    "import sys, time; from pathlib import Path; from study.lock import lock_study; "
    "lock = lock_study(Path(sys.argv[1])); print('locked', flush=True); time.sleep(300)"
)


@contextmanager
def live_driver(study_dir: Path):
    """A process holding ``study_dir``'s lock, as a running driver does; yields it, and kills it
    (by PID) at the end if it is still alive."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(study_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_a_second_driver_is_refused_naming_the_live_one(tmp_path, capsys):
    results = tmp_path / "results"
    study_dir = results / "eps_sweep"
    with live_driver(study_dir) as holder:
        t0 = time.monotonic()
        out = run_study(*SMOKE, "--results", results, timeout=60)  # the command line, as a user re-runs it
        elapsed = time.monotonic() - t0
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
        assert f"pid {holder.pid} on host {socket.gethostname()}" in lines[0] and str(study_dir) in lines[0]
        assert elapsed < 20, elapsed  # the interpreter and torch's import on 2 busy cores; no Ray
        # nothing was touched: no study.json, no synthetic data, the holder's line intact
        assert sorted(p.name for p in study_dir.iterdir()) == [LOCK_FILE]
        assert not (results / ".data").exists()
        assert (study_dir / LOCK_FILE).read_text().startswith(f"pid {holder.pid} ")

        # a study that looks resumable: refused before its state is read or repaired (garbage here)
        for name in (STATE_FILE, TUNER_FILE):
            (study_dir / name).write_text("not what a driver wrote")
        assert main([*SMOKE, "--results", str(results)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"pid {holder.pid}" in err, err
        assert (study_dir / STATE_FILE).read_text() == "not what a driver wrote"
        assert holder.poll() is None  # the live driver is unaffected


def test_a_sigkilled_driver_leaves_no_stuck_lock(tmp_path, capsys):
    results = tmp_path / "results"
    study_dir = results / "eps_sweep"
    with live_driver(study_dir) as holder:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
    assert (study_dir / LOCK_FILE).read_text().startswith(f"pid {holder.pid} ")  # the dead driver's line stays
    # a driver starts: past the lock, it stops at the next check (no such data folder), not at the lock
    t0 = time.monotonic()
    assert main([*SMOKE, "--results", str(results), "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "in use by another driver" not in err, err
    assert time.monotonic() - t0 < 10
    # and the driver's own lock went with it: the next one takes it at once
    lock = lock_study(study_dir)
    try:
        assert (study_dir / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on host ")
        assert not os.get_inheritable(lock.fileno())  # the Ray processes a driver starts do not hold it
    finally:
        lock.close()
