"""Planning a study before Ray starts: the options checked, the space loaded, the resources per
trial, and the base config of a new study (written to ``study.json``) or of the one being resumed.

Everything here can refuse to run (:class:`Refused`, reported by ``study/run.py`` as one ``error:``
line with exit status 2) and does so before any Ray process exists. No Ray at import.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mriadv.config import ConfigError, TrainConfig, get_profile
from mriadv.data.loading import data_lines, synthetic_data, validate_data
from mriadv.runtime import default_profile
from mriadv.units import budgets_at_crop, to_reference
from study.cluster import ClusterError, is_local, locate_cluster
from study.layout import STATE_FILE, TUNER_FILE
from study.run_summary import trial_statuses
from study.spaces import SpaceError, StudySpace, load_space, parse_space_yaml, space_from_dict
from study.tune_state import EXPERIMENT_STATE, newest, repair_state


class Refused(Exception):
    """A reason not to run the study, told to the user as it is (exit status 2)."""


@dataclass
class Plan:
    """A study as decided before Ray starts."""

    space: StudySpace
    name: str
    results: Path  # the results folder (absolute: Tune's storage_path)
    study_dir: Path  # results / name
    resuming: bool
    cluster: bool  # joining a Ray cluster (--address) rather than starting a Ray instance of its own
    res: dict[str, float]  # per trial: {"cpu": ..., "gpu": ...}
    cpus: int  # CPUs and GPUs here
    gpus: int
    base: dict[str, Any]  # the config every trial starts from (budgets in 320x320 units)
    num_samples: int
    max_epochs: int


def check_options(args: argparse.Namespace) -> str | None:
    """None if the numeric options are in range, else a message naming the first option as typed
    (checked before anything else, so that it is not reported as a problem of the space file)."""
    bounds = (
        ("--max-epochs", args.max_epochs, 1),
        ("--num-samples", args.num_samples, 1),
        ("--max-concurrent", args.max_concurrent, 1),
        ("--cpus-per-trial", args.cpus_per_trial, 1),
        ("--gpus-per-trial", args.gpus_per_trial, 0),
    )
    for option, value, low in bounds:
        if value is not None and value < low:
            return f"{option} must be >= {low}, got {value:g}"
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
    A new study's folder and ``study.json`` are written here; a resumed study's settings are read."""
    space = study_space(args)
    results = args.results.resolve()
    for folder in (results, *results.parents):  # a file where a folder must be: one line, not a traceback
        if folder.exists() and not folder.is_dir():
            raise Refused(f"--results {args.results}: {folder} is a file, not a folder")
    name = args.name or space.name
    study_dir = results / name
    resuming = (study_dir / TUNER_FILE).is_file() and (study_dir / STATE_FILE).is_file()
    cluster, located = not is_local(args.address), ""
    if cluster:  # before the data and Ray: an address nobody answers at fails in seconds
        try:
            located = locate_cluster(args.address)
        except ClusterError as exc:
            raise Refused(str(exc)) from None
    if args.resume and not resuming:
        raise Refused(f"--resume: there is no study to resume in {study_dir} (run without --resume to start it)")
    try:
        res, threads, cpus, gpus = resources(args, cluster)
    except ConfigError as exc:
        raise Refused(str(exc)) from None

    if resuming:
        base = _resumed_base(args, study_dir, name)
    else:
        base = _new_base(args, space, results, study_dir, threads if not res["gpu"] else None)
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
    print(
        f"resources: {res['cpu']} CPU, {res['gpu']:g} GPU per trial; {cpus} CPUs, {gpus} GPUs here"
        + (f"; cluster at {located}" if cluster else "")
    )
    return Plan(space, name, results, study_dir, resuming, cluster, res, cpus, gpus, base, num_samples, max_epochs)


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


def _new_base(
    args: argparse.Namespace, space: StudySpace, results: Path, study_dir: Path, threads: int | None
) -> dict[str, Any]:
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
        base = base_config(space, profile_name, data, args, threads, results / ".cache")
    except ConfigError as exc:
        raise Refused(f"{space.path}: {exc}") from None
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
    space: StudySpace, profile_name: str, data: Path, args: argparse.Namespace, threads: int | None, cache_dir: Path
) -> dict[str, Any]:
    """The config every trial starts from: profile, the space's fixed values, budgets, the run.

    Budgets (``epsilon``, ``attack_budgets``) stay in the space's 320x320 units here; each trial
    scales them to its own crop (:func:`mriadv.config.budgets_at_crop`), which a space may fix or
    search. Every grid point (or the base of a sampled space) must make a valid config before Ray starts."""
    profile = get_profile(profile_name)
    profile_crop = int(profile.overrides.get("crop_size", TrainConfig.crop_size))
    base = dict(profile.overrides)
    if "epsilon" in base:  # profiles give their default budget at their own crop
        base["epsilon"] = to_reference(float(base["epsilon"]), profile_crop)
    base.update(space.fixed)
    base.update(attack_budgets=tuple(space.attack_budgets), data=str(data), cache_dir=str(cache_dir))
    if args.max_epochs is not None:
        base["max_epochs"] = args.max_epochs
    if threads is not None:
        base["threads"] = threads
    TrainConfig.from_dict(budgets_at_crop(base))
    for point in space.grid_points():  # a grid's combinations or a list of points
        TrainConfig.from_dict(budgets_at_crop({**base, **point}))
    return base


def resources(args: argparse.Namespace, cluster: bool) -> tuple[dict[str, float], int | None, int, int]:
    """(per-trial resources, threads per trial, local CPUs, local GPUs)."""
    import torch

    cpus = len(os.sched_getaffinity(0))
    gpus = 0 if cluster else torch.cuda.device_count()
    gpu = (
        args.gpus_per_trial
        if args.gpus_per_trial is not None
        else (1.0 if gpus or cluster and torch.cuda.is_available() else 0.0)
    )
    if gpu < 0 or (gpu > 1 and gpu != int(gpu)):
        raise ConfigError(f"--gpus-per-trial {gpu:g}: a trial takes a fraction of one GPU or whole GPUs (Ray's rule)")
    if not cluster and gpu > gpus:  # Ray would keep such trials PENDING forever
        raise ConfigError(
            f"--gpus-per-trial {gpu:g}: {'no GPU is' if not gpus else f'only {gpus} GPUs are'} visible "
            "here (torch.cuda); use --gpus-per-trial 0, or --address a Ray cluster with GPUs"
        )
    cpu = args.cpus_per_trial if args.cpus_per_trial is not None else (max(1, cpus // max(1, gpus)) if gpu else 1)
    if cpu < 1 or (not cluster and cpu > cpus):
        raise ConfigError(f"--cpus-per-trial {cpu} is not between 1 and the {cpus} CPUs here")
    return {"cpu": cpu, "gpu": gpu}, cpu, cpus, gpus
