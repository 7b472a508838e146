"""Run a hyperparameter study of robust MRI reconstruction on Ray Tune.

    python study/run.py --space eps_sweep [--profile smoke|demo|paper] [--data DIR] [--name NAME]
                        [--results DIR] [--num-samples N] [--max-epochs N] [--max-concurrent N]
                        [--gpus-per-trial G] [--cpus-per-trial C] [--address auto] [--resume]
    python study/run.py --list-spaces

Trials are :func:`mriadv.training.fit` runs, searched by Optuna (grid sampler for grid spaces, TPE
otherwise; multi-objective where the space names several objectives), stopped early by the
trainer's patience and, for sampled spaces, by ASHA. Everything lands in ``results/<name>/``:
Tune's trial folders (checkpoints every epoch, TensorBoard events), ``trials.parquet``,
``robustness.parquet``, ``optuna.db`` and the report. Re-running the same command on an interrupted
study resumes it. Exit status: 0 done, 1 some trials failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # `python study/run.py`: make the repository importable, here and in Ray's
    sys.path.insert(0, str(REPO))  # workers (which inherit PYTHONPATH on a local cluster)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

from mriadv.config import ConfigError, TrainConfig, budgets_at_crop, get_profile, to_reference  # noqa: E402
from mriadv.train import default_profile, synthetic_data, validate_data  # noqa: E402
from study.cluster import (ClusterError, cluster_problem, is_local, locate_cluster, start_ray,  # noqa: E402
                           trial_slots)
from study.analysis import (best_epochs, best_trials, failed_trials, finished_trials, pareto_front,  # noqa: E402
                            trial_status)
from study.layout import (OPTUNA_FILE, ROBUSTNESS_FILE, STATE_FILE, TRIALS_FILE, TUNER_FILE,  # noqa: E402
                          best_checkpoint, trial_dirname)
from study.procs import ProcessRecord  # noqa: E402
from study.spaces import EPSILON_KEYS, SpaceError, StudySpace, available_spaces, load_space  # noqa: E402
from study.tune_state import EXPERIMENT_STATE, newest, repair_state  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="study/run.py", description=__doc__.splitlines()[0])
    p.add_argument("--space", help="a search space name in search_spaces/ or a YAML path")
    p.add_argument("--list-spaces", action="store_true", help="list the available search spaces")
    p.add_argument("--name", help="study name (default: the space name)")
    p.add_argument("--data", type=Path, help="fastMRI-format root (default: the profile's synthetic data)")
    p.add_argument("--results", type=Path, default=Path("results"), help="results folder (default: results/)")
    p.add_argument("--profile", choices=("smoke", "demo", "paper"), help="default: paper with CUDA, else demo")
    p.add_argument("--num-samples", type=int, help="trials of a sampled space (default: the space's)")
    p.add_argument("--max-epochs", type=int, help="override the profile's max_epochs")
    p.add_argument("--max-concurrent", type=int, help="at most this many trials at once")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial (fractions share a GPU; default 1 with GPUs)")
    p.add_argument("--cpus-per-trial", type=int, help="CPUs per trial (default: 1 without GPUs, else CPUs/GPUs)")
    p.add_argument("--address", help="join a running Ray cluster ('auto' or HEAD:PORT); results must be on shared "
                   "storage (without it, the study starts a Ray instance of its own)")
    p.add_argument("--wait-for-resources", action="store_true",
                   help="with --address: start even if no node can run a trial yet (an autoscaling cluster)")
    p.add_argument("--resume", action="store_true", help="resume the study (also automatic when it exists)")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--verbose", action="store_true",
                   help="Ray's own detail too: every result, checkpoint lines, log messages")
    p.add_argument("--dashboard", action="store_true",
                   help="do not run: serve the study's TensorBoard (port 6006) and optuna-dashboard (port 8080) "
                   "on 127.0.0.1 until Ctrl-C")
    return p


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


class _NoResultFiles(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to fetch metrics for")


def quiet_driver(verbose: bool) -> None:
    """Keep the driver's console to what a person follows: Tune's warning that trial folders hold
    no ``result.json`` / ``progress.csv`` is dropped (its loggers are off on purpose, see main; the
    results are in ``trials.parquet``), and unless ``verbose`` Optuna's INFO lines too ("A new
    study created in RDB ..."). By logger name: no Ray import."""
    import optuna

    logging.getLogger("ray.tune.analysis.experiment_analysis").addFilter(_NoResultFiles())
    if not verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


def check_options(args: argparse.Namespace) -> str | None:
    """None if the numeric options are in range, else a message naming the first option as typed
    (checked before anything else, so that it is not reported as a problem of the space file)."""
    bounds = (("--max-epochs", args.max_epochs, 1), ("--num-samples", args.num_samples, 1),
              ("--max-concurrent", args.max_concurrent, 1), ("--cpus-per-trial", args.cpus_per_trial, 1),
              ("--gpus-per-trial", args.gpus_per_trial, 0))
    for option, value, low in bounds:
        if value is not None and value < low:
            return f"{option} must be >= {low}, got {value:g}"
    return None


# ---------------------------------------------------------------------------------------------
# configuration of a new study
# ---------------------------------------------------------------------------------------------
def base_config(space: StudySpace, profile_name: str, data: Path, args: argparse.Namespace, threads: int | None,
                cache_dir: Path) -> dict[str, Any]:
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


def param_space(space: StudySpace) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for p in space.params:
        if p.kind in ("grid", "choice"):
            out[p.name] = tune.choice(list(p.values))
        elif p.kind == "uniform":
            out[p.name] = tune.uniform(p.low, p.high)
        elif p.kind == "loguniform":
            out[p.name] = tune.loguniform(p.low, p.high)
        else:
            out[p.name] = tune.randint(int(p.low), int(p.high) + 1)
    return out


def searcher(space: StudySpace, study_dir: Path, name: str, seed: int):
    """Optuna through Ray (:class:`study.search.StudySearch`: named objectives, trials linked to
    their Ray trial and folder, per-epoch values of the first objective)."""
    import optuna

    from study.search import GridSampler, StudySearch

    if space.is_grid:
        sampler = GridSampler({p.name: list(p.values) for p in space.params}, seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, max(1, space.num_samples // 2)))
    storage = optuna.storages.RDBStorage(f"sqlite:///{study_dir / OPTUNA_FILE}")
    metrics = [searched_metric(o.metric) for o in space.objectives]
    modes = [o.mode for o in space.objectives]
    single = len(metrics) == 1
    return StudySearch(metric=metrics[0] if single else metrics, mode=modes[0] if single else modes,
                       sampler=sampler, storage=storage, study_name=name, study_dir=str(study_dir),
                       curve_metric=space.objectives[0].metric,
                       points_to_evaluate=space.grid_points() if space.points else None)


def searched_metric(metric: str) -> str:
    """What Optuna and ASHA are told for an objective: its value at the trial's best selection epoch
    so far (``best_<metric>``, see :class:`study.trainable.BestSoFar`), the epoch the study keeps."""
    return f"best_{metric}"


def scheduler(space: StudySpace, max_epochs: int):
    if space.scheduler.get("type") != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    obj = space.objectives[0]
    return ASHAScheduler(time_attr="training_iteration", metric=searched_metric(obj.metric), mode=obj.mode,
                         max_t=max_epochs,
                         grace_period=int(space.scheduler.get("grace_period", 1)),
                         reduction_factor=float(space.scheduler.get("reduction_factor", 2)))


def resources(args: argparse.Namespace, cluster: bool) -> tuple[dict[str, float], int | None, int, int]:
    """(per-trial resources, threads per trial, local CPUs, local GPUs)."""
    import torch

    cpus = len(os.sched_getaffinity(0))
    gpus = 0 if cluster else torch.cuda.device_count()
    gpu = args.gpus_per_trial if args.gpus_per_trial is not None else (1.0 if gpus or cluster and torch.cuda.is_available() else 0.0)
    if gpu < 0 or (gpu > 1 and gpu != int(gpu)):
        raise ConfigError(f"--gpus-per-trial {gpu:g}: a trial takes a fraction of one GPU or whole GPUs (Ray's rule)")
    if not cluster and gpu > gpus:  # Ray would keep such trials PENDING forever
        raise ConfigError(f"--gpus-per-trial {gpu:g}: {'no GPU is' if not gpus else f'only {gpus} GPUs are'} visible "
                          "here (torch.cuda); use --gpus-per-trial 0, or --address a Ray cluster with GPUs")
    cpu = args.cpus_per_trial if args.cpus_per_trial is not None else (max(1, cpus // max(1, gpus)) if gpu else 1)
    if cpu < 1 or (not cluster and cpu > cpus):
        raise ConfigError(f"--cpus-per-trial {cpu} is not between 1 and the {cpus} CPUs here")
    return {"cpu": cpu, "gpu": gpu}, cpu, cpus, gpus


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
def summarize(study_dir: Path, space: StudySpace) -> list[str]:
    """The lines printed at the end of a study: statuses, the best trial by each objective (at
    its best epoch), the Pareto front of finished trials, errors, and where everything is."""
    from study.tables import load_tables

    trials, _ = load_tables(study_dir)
    lines = [f"results: {_here(study_dir)}"]
    if trials.empty:
        return lines + ["no trial reported a result"]
    statuses = trial_status(trials).value_counts().to_dict()
    lines.append("trials: " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())))
    best = best_epochs(trials)
    objectives = [(o.metric, o.mode) for o in space.objectives]
    for metric, row in best_trials(best, objectives).items():
        params = ", ".join(f"{p.name}={_fmt(row.get('epsilon_ref' if p.name in EPSILON_KEYS else p.name))}"
                           for p in space.params)
        lines.append(f"best by {metric}: trial {row['trial_id']} ({params}), epoch {int(row['epoch'])}: "
                     f"{metric} {row[metric]:.5g}; val nmse {row['val_nmse']:.5f} psnr {row['val_psnr']:.2f} "
                     f"ssim {row['val_ssim']:.4f}; checkpoint "
                     f"{_here(best_checkpoint(study_dir, row['trial_id'])) or 'missing (no best.pt)'}")
    cols = [m for m, _ in objectives]
    if len(objectives) > 1 and all(c in best for c in cols):
        done = best["trial_id"].isin(finished_trials(trials)).to_numpy()
        if done.any():
            front = pareto_front(best, done, objectives)
            lines.append(f"Pareto front ({' vs '.join(cols)}): " + ", ".join(best.loc[front, "trial_id"]))
    for trial_id, message in failed_trials(trials).items():
        lines.append(f"trial {trial_id} failed: {message}")
    lines.append(f"tables: {_here(study_dir / TRIALS_FILE)}, {_here(study_dir / ROBUSTNESS_FILE)}")
    lines.append(f"TensorBoard: tensorboard --logdir {_here(study_dir)}")
    lines.append(f"Optuna: optuna-dashboard sqlite:///{_here(study_dir / OPTUNA_FILE)}")
    return lines


def _here(path: Path | None) -> str:
    """``path`` relative to the current directory where it lies below it (shorter lines, valid when
    copied), else as it is; '' for None."""
    if path is None:
        return ""
    cwd = Path.cwd().resolve()
    return str(path.relative_to(cwd)) if path.is_absolute() and path.is_relative_to(cwd) else str(path)


def _fmt(value: Any) -> str:
    """``10000``, not ``1e+04``: whole numbers as integers, others to four significant digits."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e7 else f"{value:.4g}"
    return str(value)


def trial_statuses(study_dir: Path) -> dict[str, str]:
    """Status of every trial in Tune's experiment state (no Ray needed)."""
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(str(study_dir))
    except Exception:  # noqa: BLE001 - no readable state yet
        return {}
    return {t.trial_id: t.status for t in analysis.trials}


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    # Ray reads these when it is imported (trial_statuses may import it before ray.init), so they are
    # set first and this module imports no Ray at its top
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "0"  # exact resume after SIGKILL (see RAY_NOTES)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic table, with our metric columns
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every trial's epoch lines, not "[repeated 2x]"
    # no Ray TBX/CSV/JSON loggers in the trial folders: their HParams entry took precedence over the
    # trials' own in TensorBoard (study/board.py); the tables and Tune's state hold the results
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    args = build_parser().parse_args(argv)
    quiet_driver(args.verbose)
    problem = check_options(args)
    if problem:
        return fail(problem)
    if args.list_spaces:
        for name in available_spaces():
            try:
                print(load_space(name).summary_line())
            except SpaceError as exc:
                print(f"{name:<14} INVALID: {exc}")
        return 0
    if args.dashboard and args.name and not args.space:
        from study.dashboard import serve

        return serve(args.results.resolve() / args.name)
    if not args.space:
        return fail("give --space NAME (see --list-spaces)")
    try:
        space = load_space(args.space)
    except SpaceError as exc:
        return fail(str(exc))

    results = args.results.resolve()
    name = args.name or space.name
    study_dir = results / name
    if args.dashboard:
        from study.dashboard import serve

        return serve(study_dir)
    state_file = study_dir / STATE_FILE
    resuming = (study_dir / TUNER_FILE).is_file() and state_file.is_file()
    cluster, located = not is_local(args.address), ""
    if cluster:  # before the data and Ray: an address nobody answers at fails in seconds
        try:
            located = locate_cluster(args.address)
        except ClusterError as exc:
            return fail(str(exc))
    if args.resume and not resuming:
        return fail(f"--resume: there is no study to resume in {study_dir} (run without --resume to start it)")
    try:
        res, threads, cpus, gpus = resources(args, cluster)
    except ConfigError as exc:
        return fail(str(exc))

    if resuming:
        state = json.loads(state_file.read_text())
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
            return fail(f"cannot resume study '{name}': Tune's experiment state in {study_dir} is missing or "
                        "truncated and no complete copy was kept (the driver stopped before its first result); "
                        "nothing was deleted: start the study under another --name, or remove the folder")
        ignored = [flag for flag, given, saved in (("--profile", args.profile, profile_name),
                                                    ("--data", args.data and str(args.data.resolve()), base["data"]),
                                                    ("--max-epochs", args.max_epochs, base["max_epochs"]))
                   if given is not None and given != saved]
        statuses = trial_statuses(study_dir)
        unfinished = [t for t, s in statuses.items() if s not in ("TERMINATED", "ERROR")]
        print(f"resuming study '{name}' in {study_dir}: {len(statuses) - len(unfinished)} of {len(statuses)} "
              f"started trials finished; profile {profile_name} (as started)")
        if ignored:
            print(f"note: {', '.join(ignored)} ignored: a resumed study keeps the settings it started with")
        if Path(state["space_path"]).is_file() and Path(state["space_path"]).read_text() != state["space_yaml"]:
            print(f"note: {state['space_path']} changed since the study started; Tune resumes the original space")
        problem = validate_data(base["data"], int(base.get("crop_size", TrainConfig.crop_size)),
                                base.get("cache_dir"))
        if problem:
            return fail(f"data folder {base['data']}: {problem}")
    else:
        profile_name = args.profile or default_profile()
        profile = get_profile(profile_name)
        print(f"profile: {profile_name} ({profile.description})")
        if args.data is not None:
            crop = int(profile.overrides.get("crop_size", TrainConfig.crop_size))
            problem = validate_data(args.data, crop, results / ".cache")
            if problem:
                return fail(f"data folder {args.data}: {problem}")
            data = args.data.resolve()
        else:
            data = synthetic_data(profile, results)
            print(f"data: synthetic fastMRI-format set {data}")
        try:
            base = base_config(space, profile_name, data, args, threads if not res["gpu"] else None,
                               results / ".cache")
        except ConfigError as exc:
            return fail(f"{space.path}: {exc}")
        study_dir.mkdir(parents=True, exist_ok=True)
        state = {"space": space.name, "space_path": str(space.path), "space_yaml": space.path.read_text(),
                 "profile": profile_name, "base": base, "budget_units": "320",
                 "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        state_file.write_text(json.dumps(state, indent=2))
    if args.num_samples is not None and (space.is_grid or space.points) and args.num_samples != space.trial_count():
        print(f"note: {space.name} is a grid of {space.trial_count()} points; --num-samples {args.num_samples} "
              f"runs {min(args.num_samples, space.trial_count())} of them")
    max_epochs = int(base.get("max_epochs", TrainConfig.max_epochs))
    num_samples = args.num_samples or space.trial_count()
    if space.is_grid or space.points:
        num_samples = min(num_samples, space.trial_count())
    print(f"space: {space.summary_line()}")
    print(f"resources: {res['cpu']} CPU, {res['gpu']:g} GPU per trial; {cpus} CPUs, {gpus} GPUs here"
          + (f"; cluster at {located}" if cluster else ""))

    import ray
    from ray import tune

    from study.console import StudyReporter
    from study.results import ResultsCallback
    from study.trainable import StudyContext, train_trial

    procs = ProcessRecord(study_dir)
    if not cluster:
        killed = procs.kill_leftovers()
        if killed:
            print(f"stopped {len(killed)} Ray processes left behind by an earlier, interrupted run")
    try:
        start_ray(args.address, cpus, gpus)
    except ClusterError as exc:
        return fail(str(exc))
    problem = cluster_problem(res, args.address) if cluster and not args.wait_for_resources else None
    if problem:
        ray.shutdown()  # disconnects this driver; the cluster keeps running
        return fail(problem)
    if cluster:  # with a searcher, Tune creates a trial only when none is pending: let it fill every node at once
        slots = min(trial_slots(res), args.max_concurrent or num_samples)
        os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(max(1, slots)))
    exit_code = 0
    try:
        if not cluster:
            procs.update()
        budgets_ref = space.attack_budgets
        ctx = StudyContext(base=base, epsilon_keys=tuple(k for k in EPSILON_KEYS if k in {p.name for p in space.params}),
                           study_dir=str(study_dir), attack_budgets_ref=budgets_ref,
                           objective_metrics=tuple(o.metric for o in space.objectives), verbose=args.verbose)
        trainable = tune.with_resources(tune.with_parameters(train_trial, ctx=ctx), res)
        metric_cols = ["val_nmse", "val_ssim"] + [searched_metric(o.metric) for o in space.objectives]
        reporter = StudyReporter(name, [p.name for p in space.params], metric_cols, max_epochs, num_samples)
        if resuming:
            tuner = tune.Tuner.restore(str(study_dir), trainable, resume_unfinished=True, resume_errored=False)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(space),
                tune_config=tune.TuneConfig(search_alg=searcher(space, study_dir, name, int(base.get("seed", 0))),
                                            scheduler=scheduler(space, max_epochs), num_samples=num_samples,
                                            max_concurrent_trials=args.max_concurrent, reuse_actors=True,
                                            trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(
                    name=name, storage_path=str(results),
                    callbacks=[ResultsCallback(study_dir, record_processes=not cluster)],
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    failure_config=tune.FailureConfig(max_failures=0),
                    progress_reporter=reporter, verbose=2 if args.verbose else 1,
                ),
            )
        grid = tuner.fit()
        errored = [r for r in grid if r.error is not None]
        if errored:
            exit_code = 1
    finally:
        ray.shutdown()
        if not cluster:
            procs.kill_remaining()
    print()
    for line in summarize(study_dir, space):
        print(line)
    if not args.no_report:
        try:
            from study.report import write_report

            folder = write_report(study_dir)
            print(f"report: {_here(folder)}")
        except ImportError:
            pass
    statuses = trial_statuses(study_dir)
    if statuses and any(s not in ("TERMINATED", "ERROR") for s in statuses.values()):
        print("the study was interrupted; run the same command again to resume it")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
