"""Planning a study before Ray starts: the options checked, the space loaded, the resources per
trial, and the base config of a new study (written to ``study.json``) or of the one being resumed.

The resource rule (:func:`trial_resources`, :func:`concurrent_trials`) is a pure function of the
nodes' resources: the local machine's for a local study, here; the live nodes' once a study given
``--address`` has joined its cluster (:func:`settle_resources`, called by ``study/run.py``).

Everything here can refuse to run (:class:`Refused`, reported by ``study/run.py`` as one ``error:``
line with exit status 2) and does so before any Ray process exists. No Ray at import.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from mriadv.checkpoint import init_weights
from mriadv.config import ConfigError, TrainConfig, get_profile
from mriadv.data.loading import data_lines, synthetic_data, validate_data
from mriadv.runtime import default_profile
from mriadv.units import budgets_at_crop, to_reference
from study.cluster import ClusterError, is_local, locate_cluster
from study.layout import STATE_FILE, TUNER_FILE
from study.lease import Held, Lease, StudyLeased
from study.lock import StudyBusy, lock_study
from study.run_summary import trial_statuses
from study.spaces import SpaceError, StudySpace, load_space, parse_space_yaml, space_from_dict
from study.storage import RemoteStudy, StorageError, first_line, is_uri, study_uri
from study.tune_state import EXPERIMENT_STATE, newest, newest_set, repair_state


class Refused(Exception):
    """A reason not to run the study, told to the user as it is (exit status 2)."""


@dataclass
class Plan:
    """A study as decided before Ray starts."""

    space: StudySpace
    name: str
    results: Path  # the results folder (absolute: Tune's storage_path); with object storage, the local
    # folder of the synthetic data and caches (results/)
    study_dir: Path  # results / name; with object storage, the driver's working copy (study/storage.py)
    resuming: bool
    cluster: bool  # joining a Ray cluster (--address) rather than starting a Ray instance of its own
    res: dict[str, float]  # per trial: {"cpu": ..., "gpu": ...}; a cluster's once it is joined (settle_resources)
    cpus: int  # CPUs and GPUs here
    gpus: int
    base: dict[str, Any]  # the config every trial starts from (budgets in 320x320 units)
    num_samples: int
    max_epochs: int
    located: str = ""  # the cluster's host:port
    remote: RemoteStudy | None = None  # --results URI: the study on object storage
    lock: Any = None  # the study's lock file (study/lock.py; with the lease on object storage, study/lease.py)


def check_options(args: argparse.Namespace) -> str | None:
    """None if the numeric options are in range, else a message naming the first option as typed
    (checked before anything else, so that it is not reported as a problem of the space file)."""
    bounds = (
        ("--max-epochs", args.max_epochs, 1),
        ("--num-samples", args.num_samples, 1),
        ("--max-concurrent", args.max_concurrent, 1),
        ("--cpus-per-trial", args.cpus_per_trial, 1),
        ("--gpus-per-trial", args.gpus_per_trial, 0),
        ("--max-failures", getattr(args, "max_failures", None), 0),
    )
    for option, value, low in bounds:
        if value is not None and value < low:
            return f"{option} must be >= {low}, got {value:g}"
    gpu = args.gpus_per_trial
    if gpu is not None and gpu > 1 and gpu != int(gpu):
        return f"--gpus-per-trial {gpu:g}: a trial takes a fraction of one GPU or whole GPUs (Ray's rule)"
    return None


def study_space(args: argparse.Namespace) -> StudySpace:
    """The space named by ``--space``, with ``--seeds`` training seeds per configuration when given."""
    if not args.space:
        raise Refused("give --space NAME (see --list-spaces)")
    try:
        space = load_space(args.space)
        if getattr(args, "seeds", None) is not None:
            raw = parse_space_yaml(space.path.read_text(), space.path)
            space = space_from_dict({**raw, "seeds": args.seeds}, space.name, space.path)
    except SpaceError as exc:
        raise Refused(str(exc).replace(": seeds:", ": seeds (--seeds):", 1)) from None
    return space


def space_text(space: StudySpace) -> str:
    """The space's YAML as the study runs it (its file, with ``seeds`` as ``--seeds`` set it)."""
    text = space.path.read_text()
    if space.seeds == parse_space_yaml(text, space.path).get("seeds", 1):
        return text
    return yaml.safe_dump({**parse_space_yaml(text, space.path), "seeds": space.seeds}, sort_keys=False)


def plan_study(args: argparse.Namespace) -> Plan:
    """Check everything that can be checked without Ray, print what will run, and return the plan.
    The study's lock is taken first (:mod:`study.lock`; a second driver of a live study is refused
    here, before the folder is read), and ``plan.lock`` keeps it. A new study's folder and
    ``study.json`` are written here; a resumed study's settings are read."""
    space = study_space(args)
    name = args.name or space.name
    remote = RemoteStudy(study_uri(str(args.results), name)) if is_uri(args.results) else None
    results = Path("results").resolve() if remote is not None else Path(args.results).resolve()
    for folder in (results, *results.parents):  # a file where a folder must be: one line, not a traceback
        if folder.exists() and not folder.is_dir():
            raise Refused(f"--results {args.results}: {folder} is a file, not a folder")
    study_dir = remote.local if remote is not None else results / name
    resuming = (study_dir / TUNER_FILE).is_file() and (study_dir / STATE_FILE).is_file()
    cluster, located = not is_local(args.address), ""
    if cluster:  # before the data and Ray: an address nobody answers at fails in seconds
        try:
            located = locate_cluster(args.address)
        except ClusterError as exc:
            raise Refused(str(exc)) from None
    if args.resume and not resuming and remote is None:
        raise Refused(f"--resume: there is no study to resume in {study_dir} (run without --resume to start it)")
    here = local_node()
    res: dict[str, float] = {}
    if not cluster:  # a cluster's resources are known once it is joined
        res = trial_resources([here], args.gpus_per_trial, args.cpus_per_trial)
        problem = local_problem(res, int(here["CPU"]), int(here["GPU"]))
        if problem:
            raise Refused(problem)
    try:  # before anything in the folder is read, repaired or written: one driver per study
        lock = lock_study(study_dir)
    except StudyBusy as exc:
        raise Refused(str(exc)) from None
    except OSError as exc:
        raise Refused(f"--results {args.results}: cannot lock the study folder {study_dir}: {exc.strerror}") from None
    try:
        if remote is not None:  # one driver per study there too; the URI is the truth: the copy becomes it
            lock = _lease(remote, lock)
            _pull(remote, args)
        plan = _plan_locked(args, space, results, name, cluster, here, res, remote)
    except BaseException:
        lock.close()
        raise
    plan.located, plan.lock = located, lock
    return plan


def _lease(remote: RemoteStudy, lock: IO[str]) -> Held:
    """Check that the object storage can be written and take the study's lease there
    (:mod:`study.lease`): the working copy's lock and the lease, held together."""
    try:
        remote.check()
        lease = Lease(remote)
        lease.claim()
    except (StorageError, StudyLeased) as exc:
        raise Refused(str(exc)) from None
    except OSError as exc:
        raise Refused(f"--results {remote.shown}: cannot take the study's lease there: {first_line(exc)}") from None
    return Held(lock, lease)


def _pull(remote: RemoteStudy, args: argparse.Namespace) -> None:
    """Replace the working copy with the driver's files of the study on the URI (none for a new study)."""
    try:
        found = remote.pull_driver()
    except StorageError as exc:
        raise Refused(str(exc)) from None
    except OSError as exc:
        raise Refused(f"--results {remote.shown}: cannot read the study there: {first_line(exc)}") from None
    if found:
        print(f"study on object storage: {remote.shown} (working copy {remote.local})")
    elif args.resume:
        raise Refused(f"--resume: there is no study to resume at {remote.shown} (run without --resume to start it)")


def _plan_locked(
    args: argparse.Namespace,
    space: StudySpace,
    results: Path,
    name: str,
    cluster: bool,
    here: dict[str, float],
    res: dict[str, float],
    remote: RemoteStudy | None = None,
) -> Plan:
    """The rest of :func:`plan_study`, once this driver holds the study's lock."""
    study_dir = remote.local if remote is not None else results / name
    resuming = (study_dir / TUNER_FILE).is_file() and (study_dir / STATE_FILE).is_file()  # again, under the lock
    cpus, gpus = int(here["CPU"]), int(here["GPU"])
    if resuming:
        base = _resumed_base(args, study_dir, name)
    else:
        base = _new_base(args, space, results, study_dir)
    if remote is not None:  # a new study's settings; a resumed one's repaired state, which Tune restores from there
        try:
            if resuming:
                remote.publish_state([f.name for f in newest_set(study_dir) or []])
            else:
                remote.push(STATE_FILE, force=True)
        except (StorageError, OSError) as exc:
            raise Refused(f"--results {remote.shown}: cannot write the study there: {first_line(exc)}") from None
    if args.num_samples is not None and (space.is_grid or space.points) and args.num_samples != space.trial_count():
        print(
            f"note: {space.name} is a grid of {space.trial_count()} points; --num-samples {args.num_samples} "
            f"runs {min(args.num_samples, space.trial_count())} of them"
        )
    max_epochs = int(base.get("max_epochs", TrainConfig.max_epochs))
    num_samples = args.num_samples or space.trial_count()
    if space.is_grid or space.points:
        num_samples = min(num_samples, space.trial_count())
    print(f"space: {space.summary_line()}")
    plan = Plan(space, name, results, study_dir, resuming, cluster, res, cpus, gpus, base, num_samples, max_epochs)
    plan.remote = remote
    if not cluster:
        settle_resources(plan, args, [here])
    return plan


def _resumed_base(args: argparse.Namespace, study_dir: Path, name: str) -> dict[str, Any]:
    """The base config the study in ``study_dir`` started with (budgets in 320x320 units), after
    repairing Tune's state; prints what resuming ignores or cannot take over."""
    state = json.loads((study_dir / STATE_FILE).read_text())
    profile_name, base = state["profile"], state["base"]
    if state.get("budget_units") != "320":  # a study started before budgets were kept at 320x320
        crop = int(base.get("crop_size", TrainConfig.crop_size))
        base = dict(base)
        if "epsilon" in base:
            base["epsilon"] = to_reference(float(base["epsilon"]), crop)
        if "attack_budgets" in base:
            base["attack_budgets"] = [to_reference(float(b), crop) for b in base["attack_budgets"]]
    for note in repair_state(study_dir):
        print(f"note: {note}")
    if newest(study_dir, EXPERIMENT_STATE) is None:
        raise Refused(
            f"cannot resume study '{name}': Tune's experiment state in {study_dir} is missing or "
            "truncated and no complete copy was kept (the driver stopped before its first result); "
            "nothing was deleted: start the study under another --name, or remove the folder"
        )
    ignored = [
        flag
        for flag, given, saved in (
            ("--profile", args.profile, profile_name),
            ("--data", args.data and str(args.data.resolve()), base["data"]),
            ("--max-epochs", args.max_epochs, base["max_epochs"]),
            (
                "--seeds",
                getattr(args, "seeds", None),
                parse_space_yaml(state["space_yaml"], STATE_FILE).get("seeds", 1),
            ),
        )
        if given is not None and given != saved
    ]
    statuses = trial_statuses(study_dir)
    unfinished = [t for t, s in statuses.items() if s not in ("TERMINATED", "ERROR")]
    print(
        f"resuming study '{name}' in {study_dir}: {len(statuses) - len(unfinished)} of {len(statuses)} "
        f"started trials finished; profile {profile_name} (as started)"
    )
    if ignored:
        print(f"note: {', '.join(ignored)} ignored: a resumed study keeps the settings it started with")
    if Path(state["space_path"]).is_file() and _without_seeds(Path(state["space_path"]).read_text()) != _without_seeds(
        state["space_yaml"]
    ):
        print(f"note: {state['space_path']} changed since the study started; Tune resumes the original space")
    problem = validate_data(base["data"], int(base.get("crop_size", TrainConfig.crop_size)), base.get("cache_dir"))
    if problem:
        raise Refused(f"data folder {base['data']}: {problem}")
    return base


def _without_seeds(text: str) -> Any:
    """A space's YAML as data without ``seeds`` (which ``--seeds`` may have set at the start)."""
    raw = parse_space_yaml(text, STATE_FILE)
    return {k: v for k, v in raw.items() if k != "seeds"} if isinstance(raw, dict) else raw


def _new_base(args: argparse.Namespace, space: StudySpace, results: Path, study_dir: Path) -> dict[str, Any]:
    """The base config of a new study, on the given or the profile's synthetic data; writes the
    study folder and its ``study.json``."""
    profile_name = args.profile or default_profile()
    profile = get_profile(profile_name)
    print(f"profile: {profile_name} ({profile.description})")
    if args.data is not None:
        crop = int(profile.overrides.get("crop_size", TrainConfig.crop_size))
        problem = validate_data(args.data, crop, results / ".cache")
        if problem:
            raise Refused(f"data folder {args.data}: {problem}")
        data = args.data.resolve()
    else:
        data = synthetic_data(profile, results)
        print(f"data: synthetic fastMRI-format set {data}")
    try:
        base = base_config(space, profile_name, data, args, results / ".cache")
    except ConfigError as exc:
        raise Refused(f"{space.path}: {exc}") from None
    if is_uri(args.results):  # no folder of the driver's on other nodes: each trial reads its data uncached
        base["cache_dir"] = None
    print("\n".join(data_lines(TrainConfig.from_dict(budgets_at_crop(base)))))  # the updates, the split
    study_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "space": space.name,
        "space_path": str(space.path),
        "space_yaml": space_text(space),
        "profile": profile_name,
        "base": base,
        "budget_units": "320",
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (study_dir / STATE_FILE).write_text(json.dumps(state, indent=2))
    return base


def base_config(
    space: StudySpace, profile_name: str, data: Path, args: argparse.Namespace, cache_dir: Path
) -> dict[str, Any]:
    """The config every trial starts from: profile, the space's fixed values, budgets, the run
    (not ``threads``: each trial takes its own from its allocation, :func:`study.trainable.trial_allocation`).

    Budgets (``epsilon``, ``attack_budgets``) stay in the space's 320x320 units here; each trial
    scales them to its own crop (:func:`mriadv.config.budgets_at_crop`), which a space may fix or
    search. Every grid point (or the base of a sampled space) must make a valid config before Ray starts,
    and a checkpoint it fine-tunes (``init_from``) must exist and hold its reconstructor."""
    profile = get_profile(profile_name)
    profile_crop = int(profile.overrides.get("crop_size", TrainConfig.crop_size))
    base = dict(profile.overrides)
    if "epsilon" in base:  # profiles give their default budget at their own crop
        base["epsilon"] = to_reference(float(base["epsilon"]), profile_crop)
    base.update(space.fixed)
    base.update(attack_budgets=tuple(space.attack_budgets), data=str(data), cache_dir=str(cache_dir))
    if args.max_epochs is not None:
        base["max_epochs"] = args.max_epochs
    for point in ({}, *space.grid_points()):  # the base, then a grid's combinations or a list of points
        cfg = TrainConfig.from_dict(budgets_at_crop({**base, **point}))
        if cfg.init_from is not None:
            init_weights(cfg.init_from, cfg.to_dict())
    return base


def local_node() -> dict[str, float]:
    """This machine's resources as Ray names them: the CPUs this process may run on, the CUDA devices."""
    import torch

    return {"CPU": float(len(os.sched_getaffinity(0))), "GPU": float(torch.cuda.device_count())}


def trial_resources(
    nodes: list[dict[str, float]], gpus_per_trial: float | None = None, cpus_per_trial: int | None = None
) -> dict[str, float]:
    """What one trial asks Ray for, ``{"cpu": c, "gpu": g}``, on nodes with the given resources (as
    Ray names them: ``[{"CPU": 64.0, "GPU": 8.0}, {"CPU": 4.0}]``).

    GPUs: ``gpus_per_trial``, by default 1 where some node has a GPU, else 0. CPUs: ``cpus_per_trial``,
    by default 1 for a trial without GPU and, for one with ``g`` GPUs, ``floor(g * CPU/GPU)`` (at least
    1) at the smallest CPU-to-GPU ratio among the nodes that have GPUs: CPUs follow the GPU share, so
    GPU-sharing trials pack (0.25 GPU on a node of 1 GPU and 16 CPUs: 4 CPUs, four trials), and every
    GPU of every GPU node can take its share. Nodes without GPUs do not count for a GPU trial."""
    ratios = [n.get("CPU", 0.0) / n["GPU"] for n in nodes if n.get("GPU", 0.0) > 0]
    gpu = float(gpus_per_trial) if gpus_per_trial is not None else (1.0 if ratios else 0.0)
    cpu = 1
    if gpu > 0 and ratios:
        cpu = max(1, math.floor(gpu * min(ratios) + 1e-9))
    if cpus_per_trial is not None:
        cpu = cpus_per_trial
    return {"cpu": cpu, "gpu": gpu}


def concurrent_trials(nodes: list[dict[str, float]], res: dict[str, float]) -> int:
    """How many trials of ``res`` (``{"cpu": c, "gpu": g}``) the nodes can run at once, each trial on
    one node: per node the fewest of floor(CPU / c) and floor(GPU / g), summed."""
    total = 0
    for node in nodes:
        fits = [
            math.floor(float(node.get(key, 0.0)) / float(res[key.lower()]) + 1e-9)
            for key in ("CPU", "GPU")
            if float(res[key.lower()]) > 0
        ]
        total += min(fits) if fits else 0
    return total


def local_problem(res: dict[str, float], cpus: int, gpus: int) -> str | None:
    """None if this machine can run one trial of ``res``, else one line naming the option (Ray would
    keep such trials PENDING forever)."""
    if res["gpu"] > gpus:
        where = "no GPU is" if not gpus else f"only {gpus} GPUs are"
        return (
            f"--gpus-per-trial {res['gpu']:g}: {where} visible here (torch.cuda); use --gpus-per-trial 0, "
            "or --address a Ray cluster with GPUs"
        )
    if res["cpu"] > cpus:
        return f"--cpus-per-trial {res['cpu']} is not between 1 and the {cpus} CPUs here"
    return None


def settle_resources(plan: Plan, args: argparse.Namespace, nodes: list[dict[str, float]]) -> int:
    """Decide ``plan.res`` from ``nodes`` (this machine's, or the live nodes of the joined cluster),
    print the study's resources line, and return how many trials can run at once (at most
    ``--max-concurrent`` and the number of trials)."""
    plan.res = res = trial_resources(nodes, args.gpus_per_trial, args.cpus_per_trial)
    fit = concurrent_trials(nodes, res)
    cap = min(args.max_concurrent or plan.num_samples, plan.num_samples)
    cpus, gpus = (sum(float(n.get(k, 0.0)) for n in nodes) for k in ("CPU", "GPU"))
    where = f"on {len(nodes)} nodes of the cluster at {plan.located}" if plan.cluster else "here"
    print(
        f"resources: {res['cpu']} CPU, {res['gpu']:g} GPU per trial, {fit} at once"
        + (f" ({cap} with --max-concurrent {args.max_concurrent})" if args.max_concurrent and cap < fit else "")
        + f"; {cpus:g} CPUs, {gpus:g} GPUs {where}"
    )
    return min(fit, cap)
