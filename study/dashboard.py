"""Serve a study's two comparison surfaces, bound to 127.0.0.1: TensorBoard (every trial's curves,
images and the HParams table) and optuna-dashboard (the search: objectives, Pareto front, trials
with their Ray trial id and folder, per-epoch values).

    python study/run.py --space eps_sweep --dashboard [--results DIR] [--name NAME]

Both run until Ctrl-C. On a remote machine, forward the ports (``ssh -L 6006:127.0.0.1:6006 -L
8080:127.0.0.1:8080 host``) rather than binding them to every interface.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from study.layout import OPTUNA_FILE

HOST = "127.0.0.1"


def commands(study_dir: Path, tensorboard_port: int = 6006, optuna_port: int = 8080) -> dict[str, list[str]]:
    """The command lines of both servers (the executables of this Python environment)."""
    here = Path(sys.executable).parent
    optuna_dashboard = shutil.which("optuna-dashboard", path=str(here)) or shutil.which("optuna-dashboard")
    if optuna_dashboard is None:
        raise FileNotFoundError("optuna-dashboard is not installed (pip install optuna-dashboard)")
    return {
        f"TensorBoard       http://{HOST}:{tensorboard_port}/": [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(study_dir),
            "--host",
            HOST,
            "--port",
            str(tensorboard_port),
        ],
        f"optuna-dashboard  http://{HOST}:{optuna_port}/": [
            optuna_dashboard,
            f"sqlite:///{study_dir / OPTUNA_FILE}",
            "--host",
            HOST,
            "--port",
            str(optuna_port),
            "--quiet",
        ],
    }


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve_study(results: str | Path, name: str) -> int:
    """Serve the study ``name`` of ``--results``. A study on object storage is served from its working
    copy: the driver's files downloaded first unless this machine's driver runs it (its copy is current;
    the working copy's lock tells), the trials' files in either case."""
    from study.storage import RemoteStudy, StorageError, first_line, is_uri, study_uri

    if not is_uri(results):
        return serve(Path(results).resolve() / name)
    remote = RemoteStudy(study_uri(str(results), name))
    try:
        with remote.reading() as found:  # the lock is released before serving: a driver may start meanwhile
            if not found:
                print(f"error: --results {remote.shown}: no study there (no study.json)", file=sys.stderr)
                return 2
    except (StorageError, OSError) as exc:
        print(f"error: --results {remote.shown}: {first_line(exc)}", file=sys.stderr)
        return 2
    return serve(remote.local)


def serve(study_dir: Path, tensorboard_port: int = 6006, optuna_port: int = 8080) -> int:
    """Start both servers, print their addresses, wait for Ctrl-C or SIGTERM (or for one to exit),
    stop both."""
    if not (study_dir / OPTUNA_FILE).is_file():
        print(f"error: no study in {study_dir} (no {OPTUNA_FILE}); run it first", file=sys.stderr)
        return 2
    try:
        todo = commands(study_dir, tensorboard_port, optuna_port)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logs = {name: tempfile.TemporaryFile(mode="w+") for name in todo}  # a pipe left unread could fill and block
    servers = {
        name: subprocess.Popen(cmd, stdout=logs[name], stderr=subprocess.STDOUT, text=True)
        for name, cmd in todo.items()
    }
    for name in servers:
        print(name)
    print("Ctrl-C stops both")
    signal.signal(signal.SIGTERM, _interrupt)
    code = 0
    try:
        while all(p.poll() is None for p in servers.values()):
            time.sleep(0.5)
        for name, p in servers.items():
            if p.poll() is not None:  # a port in use, a bad storage: say why
                logs[name].seek(0)
                message = logs[name].read().strip().splitlines()
                print(
                    f"error: {name.split()[0]} stopped: {message[-1] if message else f'exit {p.returncode}'}",
                    file=sys.stderr,
                )
                code = 1
    except KeyboardInterrupt:
        pass
    finally:
        for p in servers.values():
            if p.poll() is None:
                p.terminate()
        for p in servers.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs.values():
            log.close()
    return code
