"""Where a study's trials run: a local Ray instance of the study's own, or a running Ray cluster.

A local study always starts a fresh Ray (``ray.init(address="local")``), whatever ``RAY_ADDRESS``
or a ``ray_current_cluster`` file left by an earlier ``ray start`` says. A study given ``--address``
joins that cluster and fails within :data:`CONNECT_TIMEOUT_S` seconds, with one line naming the
address and the likely cause, when nothing answers there, something that is not a Ray head answers,
or the head refuses the driver's authentication token (token authentication is on by default in
Ray 2.60). Once connected it refuses a per-trial request that no node can satisfy, rather than
leaving every trial PENDING, and a cluster whose nodes do not all see the study folder and the data
folder at the driver's paths (:func:`storage_problem`): without shared storage a trial failed only
after its first epoch. Ray is imported inside the functions only: the runner sets Ray's
environment variables before anything imports it.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from study.storage import first_line

if TYPE_CHECKING:
    from study.storage import RemoteStudy

STORAGE_TIMEOUT_S = 30.0  # the storage check's tasks, one per node (a worker starts on each)
DATA_SPLITS = ("singlecoil_train", "singlecoil_val")
CONNECT_TIMEOUT_S = 10.0  # ray.init joining a cluster (after the TCP probe): handshake, token, registration
PROBE_TIMEOUT_S = 5.0  # the TCP connect to the head's port
TOKEN_HELP = (
    "a Ray 2.60 cluster with token authentication needs RAY_AUTH_MODE=token and the head's token "
    "(~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) in the driver's environment too"
)


class ClusterError(Exception):
    """Ray could not be reached or cannot run the study's trials; the message is one line."""


def is_local(address: str | None) -> bool:
    """True for no ``--address`` (or Ray's own word for a fresh instance, ``local``)."""
    return address in (None, "", "local")


def locate_cluster(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> str:
    """The ``host:port`` that ``address`` (``auto`` or ``HOST:PORT``) names, after checking that
    something accepts a TCP connection there. Raises :class:`ClusterError` naming the address,
    where an ``auto`` address came from, and the likely cause. Starts nothing."""
    source = ""
    if address.startswith("ray://"):
        raise ClusterError(
            f"--address {address}: Ray Client addresses are not supported; run the study on a node "
            "of the cluster with --address auto or --address HEAD:6379"
        )
    if address == "auto":
        from ray._common.utils import get_ray_address_file
        from ray._private.services import canonicalize_bootstrap_address

        address_file = get_ray_address_file(None)
        try:
            resolved = canonicalize_bootstrap_address("auto")
        except (ConnectionError, ValueError) as exc:
            raise ClusterError(
                f"--address auto: no running Ray cluster found on this machine ({first_line(exc)}); "
                "start one with `ray start --head`, or give --address HEAD:PORT"
            ) from None
        if os.environ.get("RAY_ADDRESS"):
            source = " (from RAY_ADDRESS)"
        elif os.path.isfile(address_file):
            source = f" (from {address_file}, which the last `ray start` on this machine wrote)"
        address = resolved or ""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterError(
            f"--address {address}: give HOST:PORT (the head's GCS port, 6379 unless "
            "`ray start --head --port` chose another) or 'auto'"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except socket.gaierror:
        raise ClusterError(f"--address {address}{source}: cannot resolve host '{host}'") from None
    except ConnectionRefusedError:
        raise ClusterError(
            f"--address {address}{source}: connection refused: no Ray head is running there, or it "
            "is the wrong port (the head's GCS port is 6379 unless `ray start --head --port` chose "
            "another)"
        ) from None
    except (socket.timeout, TimeoutError):
        raise ClusterError(
            f"--address {address}{source}: no answer within {timeout_s:g} s: the host is down, a "
            "firewall drops the connection, or the address is wrong"
        ) from None
    except OSError as exc:
        raise ClusterError(f"--address {address}{source}: cannot connect ({exc.strerror or exc})") from None
    return f"{host}:{port}"


def start_ray(address: str | None, cpus: int, gpus: int, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Start the study's own local Ray with ``cpus`` CPUs and ``gpus`` GPUs (``address`` None or
    ``local``), or connect to the running cluster at ``address`` (``auto`` or ``HOST:PORT``).

    Local: ``RAY_ADDRESS`` is dropped from this process's environment and Ray is told
    ``address="local"``, so neither it nor a stale ``ray_current_cluster`` file can redirect the
    study to another instance. Cluster: the connection must complete within ``timeout_s`` seconds,
    or this process prints one ``error:`` line and exits with status 2 (Ray's own retries run for
    more than a minute and cannot be interrupted); Ray's messages while connecting are held back
    and printed only on success. Raises :class:`ClusterError` for a connection Ray itself gives up.
    """
    import ray

    if is_local(address):
        os.environ.pop("RAY_ADDRESS", None)
        ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False, configure_logging=False)
        return
    assert address is not None
    done = threading.Event()
    saved_stderr = os.dup(2)
    log = tempfile.TemporaryFile()

    def held_back() -> str:
        return os.pread(log.fileno(), os.fstat(log.fileno()).st_size, 0).decode(errors="replace")

    def give_up() -> None:  # watchdog thread: Ray is still retrying
        if done.is_set():
            return
        os.dup2(saved_stderr, 2)
        print(f"error: {_connect_failure(address, held_back(), None, timeout_s)}", file=sys.stderr, flush=True)
        os._exit(2)

    # a driver only connects (it starts no Ray process), so nothing is left behind by the exit above;
    # Ray's own connection loop is shortened too, so that a refused token usually ends in an exception
    wait_var = "RAY_gcs_server_port_wait_time_s"
    wait_before = os.environ.get(wait_var)
    os.environ.setdefault(wait_var, str(max(1, int(timeout_s * 0.6))))
    timer = threading.Timer(timeout_s, give_up)
    timer.daemon = True
    error: Exception | None = None
    sys.stderr.flush()
    os.dup2(log.fileno(), 2)
    timer.start()
    try:
        ray.init(address=address, include_dashboard=False, configure_logging=False)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is reported as one line
        error = exc
    finally:
        done.set()
        timer.cancel()
        sys.stderr.flush()
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        if wait_before is None:
            os.environ.pop(wait_var, None)
    text = held_back()
    log.close()
    if error is not None:
        raise ClusterError(_connect_failure(address, text, error, timeout_s))
    sys.stderr.write(text)


def _connect_failure(address: str, text: str, error: Exception | None, timeout_s: float) -> str:
    """One line saying why the connection to ``address`` failed, from Ray's held-back messages."""
    message = f"{text}\n{error or ''}"
    if any(
        s in message for s in ("InvalidAuthToken", "Unauthenticated", "authentication token", "AuthenticationError")
    ):
        if "no authentication token was found" in message:
            here = "RAY_AUTH_MODE=token here, but no token"
        elif os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            here = "RAY_AUTH_MODE is not 'token' here"
        else:
            here = "the token here is not the head's"
        return f"--address {address}: the cluster refused this driver's authentication token ({here}); {TOKEN_HELP}"
    if error is None:
        return (
            f"--address {address}: no Ray cluster answered within {timeout_s:g} s (the port is open: is it the "
            "head's GCS port, 6379 by default?)"
        )
    return (
        f"--address {address}: cannot connect to the Ray cluster: {first_line(error)} (something accepts "
        "connections there: is it a Ray head's GCS port, 6379 by default?)"
    )


def cluster_problem(request: dict[str, float], address: str) -> str | None:
    """None if some live node of the connected cluster can run one trial's ``request``
    (``{"cpu": c, "gpu": g}``), else one line naming the option (trials would stay PENDING forever)."""
    nodes = alive_nodes()
    for key, option in (("GPU", "--gpus-per-trial"), ("CPU", "--cpus-per-trial")):
        need = float(request[key.lower()])
        if need <= 0:
            continue
        largest = max((float(n.get(key, 0)) for n in nodes), default=0.0)
        if largest < need:
            total = sum(float(n.get(key, 0)) for n in nodes)
            return (
                f"{option} {need:g}: no node of the cluster at {address} has {need:g} {key}s "
                f"(largest node: {largest:g}, {len(nodes)} nodes: {total:g} in all), so every trial would wait "
                "forever; ask for less, or pass --wait-for-resources if the cluster scales up"
            )
    return None


def storage_problem(
    study_dir: Path, data_dir: Path, timeout_s: float = STORAGE_TIMEOUT_S, remote: RemoteStudy | None = None
) -> str | None:
    """None if every live node of the connected cluster sees ``study_dir`` and ``data_dir`` as this
    driver does, else one line naming the first node that does not (its IP and node id) and the path.

    Both directions are checked: the driver writes a marker of random content into ``study_dir``;
    one task pinned to each live node reads it there, compares the names and sizes of the files in
    ``data_dir``'s split folders with the driver's, and writes a reply beside the marker, which the
    driver then reads. The markers are removed afterwards. A node that does not answer within
    ``timeout_s`` seconds is named too. Nodes that join later are not checked. With object storage
    (``remote``) the marker and the replies are objects of the study there: every node must reach it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = secrets.token_hex(8)
    marker = study_dir / f".storage_check_{token}"
    where = str(study_dir) if remote is None else remote.shown
    advice = (
        "--results and --data must be on storage mounted at the same path on every node of the cluster "
        "(docs/clusters.md)"
        if remote is None
        else "--data must be on storage mounted at the same path on every node, and every node must reach "
        "--results with the credentials in its environment (docs/clusters.md)"
    )
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    check = ray.remote(num_cpus=0, max_retries=0, max_calls=1)(node_sees)  # its worker exits after it
    try:
        _write(marker, token, remote)
    except OSError as exc:
        return f"this driver cannot write into the study folder {where}: {first_line(exc)}"
    try:
        expected = data_listing(str(data_dir))
        refs = [
            check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                str(marker), token, str(data_dir), expected, n["NodeID"], remote
            )
            for n in nodes
        ]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for ref in pending:
            ray.cancel(ref, force=True)
        for node, ref in zip(nodes, refs, strict=True):
            name = f"node {node.get('NodeManagerAddress', '?')} (id {node['NodeID'][:12]})"
            if ref not in ready:
                return (
                    f"{name} did not answer the shared-storage check within {timeout_s:g} s (a check of "
                    f"{where} and {data_dir}: can it start a Ray worker?); {advice}"
                )
            try:
                problem = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - the node's failure, in one line
                return f"{name}: the shared-storage check of {where} failed there: {first_line(exc)}; {advice}"
            reply = f"{marker.name}_{node['NodeID']}"
            seen = _read(study_dir / reply) if remote is None else _read_object(remote, reply)
            if problem is None and seen != node["NodeID"]:
                problem = f"wrote into the study folder {where}, but this driver does not see what it wrote"
            if problem is not None:
                return f"{name} {problem}; {advice}"
        return None
    finally:
        if remote is None:
            for f in study_dir.glob(f"{marker.name}*"):
                f.unlink(missing_ok=True)
        else:
            try:
                for rel, is_dir in remote.listing():
                    if not is_dir and rel.startswith(marker.name):
                        remote.fs.delete_file(remote.remote(rel))
            except OSError:
                pass  # a marker left on the URI is harmless; the check's answer stands


def node_sees(
    marker: str,
    token: str,
    data: str,
    expected: dict[str, list | None],
    node_id: str,
    remote: RemoteStudy | None = None,
) -> str | None:
    """The task of :func:`storage_problem` on node ``node_id``: None if the driver's ``marker`` holds
    ``token`` here and the data folder lists as ``expected``, after writing the reply
    ``<marker>_<node_id>``; else what this node sees wrong, naming the path. Standard library only,
    but for object storage (``remote``: the marker and the reply are objects of the study there)."""
    study = os.path.dirname(marker) if remote is None else remote.shown
    reply = Path(f"{marker}_{node_id}")
    if remote is None:
        seen = _read(Path(marker))
        if seen is None:
            why = (
                "the folder is missing" if not os.path.isdir(study) else "the marker the driver wrote there is missing"
            )
            return f"does not see the study folder {study} ({why} on that node)"
    else:
        try:
            seen = remote.read_bytes(Path(marker).name)
        except Exception as exc:  # noqa: BLE001 - the storage's error, in one line
            return f"cannot read the object storage {study} ({first_line(exc)})"
        if seen is None:
            return f"does not see the object storage {study} as this driver does (the driver's marker is missing there)"
        seen = seen.decode()
    if seen != token:
        return f"sees another folder at the study folder's path {study} (the driver's marker differs there)"
    listing = data_listing(data)
    for split in DATA_SPLITS:
        there, here = listing[split], expected[split]
        if there == here:
            continue
        if there is None:
            return f"does not see the data folder {data} ({os.path.join(data, split)} is missing on that node)"
        names = {n for n, _ in there} ^ {n for n, _ in here}
        if names:
            return (
                f"sees another data folder at {data} ({split}/ lists {len(there)} files there, {len(here)} here; "
                f"{min(names)} is in one only)"
            )
        name, size, ours = next((n, s, t) for (n, s), (_, t) in zip(there, here, strict=True) if s != t)
        return f"sees another data folder at {data} ({split}/{name}: {size} bytes there, {ours} here)"
    try:
        _write(reply, node_id, remote)
    except OSError as exc:
        return f"cannot write into the study folder {study} ({exc.strerror or first_line(exc)})"
    return None


def data_listing(data: str) -> dict[str, list | None]:
    """Per split folder of ``data``: its files as sorted ``[name, size]`` pairs, or None where it is missing."""
    out: dict[str, list | None] = {}
    for split in DATA_SPLITS:
        try:
            with os.scandir(os.path.join(data, split)) as entries:
                out[split] = sorted([e.name, e.stat().st_size] for e in entries if e.is_file())
        except OSError:
            out[split] = None
    return out


def _write(path: Path, text: str, remote: RemoteStudy | None) -> None:
    """``text`` into the file ``path``, or with object storage into the study's object of that name."""
    if remote is None:
        path.write_text(text)
    else:
        remote.write_bytes(path.name, text.encode())


def _read_object(remote: RemoteStudy, rel: str) -> str | None:
    try:
        data = remote.read_bytes(rel)
    except OSError:
        return None
    return data.decode() if data is not None else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def alive_nodes() -> list[dict[str, float]]:
    """The resources of each live node of the connected cluster, as Ray names them (``CPU``, ``GPU``, ...)."""
    import ray

    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
