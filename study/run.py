"""Run a hyperparameter study of robust MRI reconstruction on Ray Tune.

    python study/run.py --space eps_sweep [--profile smoke|demo|paper] [--data DIR] [--name NAME]
                        [--results DIR] [--num-samples N] [--max-epochs N] [--seeds N] [--max-concurrent N]
                        [--gpus-per-trial G] [--cpus-per-trial C] [--address auto] [--max-failures N] [--resume]
                        [--track mlflow[=URI]] [--track wandb]
    python study/run.py --list-spaces

Trials are :func:`mriadv.fit.fit` runs, searched by Optuna (grid sampler for grid spaces, TPE
otherwise; multi-objective where the space names several objectives), stopped early by the
trainer's patience and, for sampled spaces, by ASHA. Everything lands in ``results/<name>/``:
Tune's trial folders (checkpoints every epoch, TensorBoard events), ``trials.parquet``,
``robustness.parquet``, ``optuna.db`` and the report (or at ``<uri>/<name>/`` with ``--results s3://...``:
:mod:`study.storage`). Re-running the same command on an interrupted
study resumes it; while its driver is alive, another is refused (:mod:`study.lock`). Exit status: 0 done, 1 some
trials failed, 2 bad input, another live driver, or a cluster node without the shared folders.

:func:`main` plans the study without Ray (:mod:`study.plan`: options, space, resources, the base
config in ``study.json``), launches it on Ray Tune (:func:`launch`) and summarises it
(:mod:`study.run_summary`, then the report, :mod:`study.report`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from study.cluster import ClusterError, alive_nodes, cluster_problem, start_ray, storage_problem
from study.layout import OPTUNA_FILE, searched_metric, trial_dirname
from study.plan import Plan, Refused, check_options, plan_study, settle_resources, study_space
from study.procs import ProcessRecord
from study.run_summary import here, summary_and_warning, trial_statuses
from study.spaces import EPSILON_KEYS, SpaceError, StudySpace, available_spaces, load_space
from study.storage import StorageError, first_line, is_uri
from study.tracking import Tracker, parse_track, settle_tracking, tracking_problem

MAX_FAILURES = 2  # retries of a failed trial (a lost node: docs/clusters.md); an error in a trial's code repeats


def results_folder(text: str) -> Path | str:
    """``--results``: a folder, or object storage as a URI (``s3://bucket/prefix?endpoint_override=...``,
    kept as text; :mod:`study.storage`)."""
    return text if is_uri(text) else Path(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="study/run.py", description=__doc__.splitlines()[0])
    p.add_argument("--space", help="a search space name in search_spaces/ or a YAML path")
    p.add_argument("--list-spaces", action="store_true", help="list the available search spaces")
    p.add_argument("--name", help="study name (default: the space name)")
    p.add_argument("--data", type=Path, help="fastMRI-format root (default: the profile's synthetic data)")
    p.add_argument(
        "--results",
        type=results_folder,
        default=Path("results"),
        help="results folder (default: results/), or object storage: s3://bucket/prefix (docs/clusters.md)",
    )
    p.add_argument("--profile", choices=("smoke", "demo", "paper"), help="default: paper with CUDA, else demo")
    p.add_argument("--num-samples", type=int, help="trials of a sampled space (default: the space's)")
    p.add_argument("--max-epochs", type=int, help="override the profile's max_epochs")
    p.add_argument("--seeds", type=int, help="training seeds per configuration (replicates; default: the space's)")
    p.add_argument("--max-concurrent", type=int, help="at most this many trials at once")
    p.add_argument(
        "--gpus-per-trial", type=float, help="GPUs per trial (fractions share a GPU; default 1 where nodes have GPUs)"
    )
    p.add_argument(
        "--cpus-per-trial",
        type=int,
        help="CPUs per trial (default: 1 without GPUs, else the trial's GPU share times the GPU nodes' CPUs per GPU)",
    )
    p.add_argument(
        "--address",
        help="join a running Ray cluster ('auto' or HEAD:PORT); results must be on shared "
        "storage (without it, the study starts a Ray instance of its own)",
    )
    p.add_argument(
        "--wait-for-resources",
        action="store_true",
        help="with --address: start even if no node can run a trial yet (an autoscaling cluster)",
    )
    p.add_argument(
        "--max-failures",
        type=int,
        default=MAX_FAILURES,
        help=f"times a failed trial is retried from its last checkpoint, on any node (a node lost, or an error "
        f"in the trial; Tune's FailureConfig; default {MAX_FAILURES}; fixed when the study starts)",
    )
    p.add_argument("--resume", action="store_true", help="resume the study (also automatic when it exists)")
    p.add_argument(
        "--track",
        action="append",
        metavar="mlflow[=URI]|wandb",
        help="also log every trial to MLflow (default URI: sqlite:///<study>/mlflow.db) or W&B (mode from "
        'WANDB_MODE); repeat for both; needs pip install -e ".[track]"',
    )
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument(
        "--verbose", action="store_true", help="Ray's own detail too: every result, checkpoint lines, log messages"
    )
    p.add_argument(
        "--dashboard",
        action="store_true",
        help="do not run: serve the study's TensorBoard (port 6006) and optuna-dashboard (port 8080) "
        "on 127.0.0.1 until Ctrl-C",
    )
    return p


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


class _NoResultFiles(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to fetch metrics for")


def quiet_driver(verbose: bool) -> None:
    """Keep the driver's console to what a person follows: Tune's warning that trial folders hold
    no ``result.json`` / ``progress.csv`` is dropped (its loggers are off on purpose, see
    :func:`set_ray_environment`; the results are in ``trials.parquet``), and unless ``verbose``
    Optuna's INFO lines too ("A new study created in RDB ..."). By logger name: no Ray import."""
    import optuna

    logging.getLogger("ray.tune.analysis.experiment_analysis").addFilter(_NoResultFiles())
    if not verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


def set_ray_environment() -> None:
    """Settings Ray reads when it is imported (:func:`trial_statuses` may import it before
    ``ray.init``), so they are set first and this module imports no Ray at its top."""
    # Tune otherwise snapshots the experiment at most every 10 s: after a SIGKILL of the driver a
    # finished trial ran again, a running one went back 4 epochs and one started since was lost; with
    # 0 the resume was exact, at 5-8 ms per reported result (measured on Ray 2.60)
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "0"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic table, with our metric columns
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every trial's epoch lines, not "[repeated 2x]"
    # no Ray TBX/CSV/JSON loggers in the trial folders: their HParams entry took precedence over the
    # trials' own in TensorBoard (study/board.py); the tables and Tune's state hold the results
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"


# ---------------------------------------------------------------------------------------------
# the Tune objects of a study
# ---------------------------------------------------------------------------------------------
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

    from study.search import GridSampler, StudySearch, StudyStorage

    if space.is_grid:
        sampler = GridSampler({p.name: list(p.values) for p in space.params}, seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, max(1, space.num_samples // 2)))
    storage = StudyStorage(f"sqlite:///{study_dir / OPTUNA_FILE}")  # follows the study to another folder
    metrics = [searched_metric(o.metric) for o in space.objectives]
    modes = [o.mode for o in space.objectives]
    single = len(metrics) == 1
    return StudySearch(
        metric=metrics[0] if single else metrics,
        mode=modes[0] if single else modes,
        sampler=sampler,
        storage=storage,
        study_name=name,
        study_dir=str(study_dir),
        curve_metric=space.objectives[0].metric,
        points_to_evaluate=space.grid_points() if space.points else None,
        reference=space.reference,
        reference_first=space.fine_tunes_reference,
    )


def make_tuner(plan: Plan, args: argparse.Namespace, trackers: list[Tracker]):
    """The study's Tuner: restored from its folder when resuming (with the same resource-wrapped
    trainable, or pending trials would lose their GPU request, and the callbacks it started with),
    else new, with the callbacks of ``trackers``."""
    from ray import tune

    from study.console import StudyReporter
    from study.home import set_home
    from study.results import ResultsCallback
    from study.schedulers import for_space
    from study.trackers import tracking_callbacks
    from study.trainable import StudyContext, train_trial
    from study.tune_state import CHECKPOINTS_KEPT, install_state_saving

    install_state_saving()  # a save when one cannot wait, else every few seconds; see tune_state.py
    set_home(plan.study_dir, plan.remote)  # what Tune restores writes here, wherever it was saved (study/home.py)
    space, base = plan.space, plan.base
    ctx = StudyContext(
        base=base,
        epsilon_keys=tuple(k for k in EPSILON_KEYS if k in {p.name for p in space.params}),
        study_dir=str(plan.study_dir),
        attack_budgets_ref=space.attack_budgets,
        objective_metrics=tuple(o.metric for o in space.objectives),
        verbose=args.verbose,
        remote=plan.remote,
    )
    trainable = tune.with_resources(tune.with_parameters(train_trial, ctx=ctx), plan.res)
    metric_cols = ["val_nmse", "val_ssim"] + [searched_metric(o.metric) for o in space.objectives]
    reporter = StudyReporter(plan.name, [p.name for p in space.params], metric_cols, plan.max_epochs, plan.num_samples)
    storage: dict[str, Any] = {"storage_path": str(plan.results)}
    if plan.remote is not None:  # Tune's state and checkpoints on the URI, the trials' files as artifacts
        fs, prefix, _ = plan.remote.tune_storage()
        storage = {"storage_path": prefix, "storage_filesystem": fs}
    if plan.resuming:
        where = f"{storage['storage_path']}/{plan.name}" if plan.remote is not None else str(plan.study_dir)
        return tune.Tuner.restore(
            where,
            trainable,
            resume_unfinished=True,
            resume_errored=False,
            storage_filesystem=storage.get("storage_filesystem"),
        )
    return tune.Tuner(
        trainable,
        param_space=param_space(space),
        tune_config=tune.TuneConfig(
            search_alg=searcher(space, plan.study_dir, plan.name, int(base.get("seed", 0))),
            scheduler=for_space(space, plan.max_epochs, plan.study_dir),
            num_samples=plan.num_samples,
            max_concurrent_trials=args.max_concurrent,
            reuse_actors=True,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            **storage,
            sync_config=tune.SyncConfig(sync_artifacts=plan.remote is not None),
            callbacks=[
                ResultsCallback(plan.study_dir, record_processes=not plan.cluster, remote=plan.remote),
                *tracking_callbacks(trackers, plan.name, str(plan.study_dir), ctx),
            ],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            failure_config=tune.FailureConfig(max_failures=args.max_failures),  # from the last checkpoint
            progress_reporter=reporter,
            verbose=2 if args.verbose else 1,
        ),
    )


# ---------------------------------------------------------------------------------------------
# main: plan, launch, summarise
# ---------------------------------------------------------------------------------------------
def launch(plan: Plan, args: argparse.Namespace, trackers: list[Tracker]) -> int:
    """Start Ray (or join the cluster), run the study to its end or an interrupt, and stop Ray and
    every process it left; 1 if a trial errored, else 0."""
    import ray

    procs = ProcessRecord(plan.study_dir)
    if not plan.cluster:
        killed = procs.kill_leftovers()
        if killed:
            print(f"stopped {len(killed)} Ray processes left behind by an earlier, interrupted run")
    try:
        start_ray(args.address, plan.cpus, plan.gpus)
    except ClusterError as exc:
        raise Refused(str(exc)) from None
    if plan.cluster:  # the resources per trial follow the cluster's nodes, not this machine's
        slots = settle_resources(plan, args, alive_nodes())
        problem = None if args.wait_for_resources else cluster_problem(plan.res, args.address)
        # every live node must see the study and data folders at this driver's paths (no shared storage: a
        # trial failed only after its first epoch); within STORAGE_TIMEOUT_S seconds
        problem = problem or storage_problem(plan.study_dir, Path(plan.base["data"]), remote=plan.remote)
        if problem:
            ray.shutdown()  # disconnects this driver; the cluster keeps running
            raise Refused(problem)
        # with a searcher, Tune creates a trial only when none is pending: let it fill every node at once
        os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(max(1, slots)))
    try:
        if not plan.cluster:
            procs.update()
        grid = make_tuner(plan, args, trackers).fit()
        return 1 if any(r.error is not None for r in grid) else 0
    finally:
        ray.shutdown()
        if not plan.cluster:
            procs.kill_remaining()


def summarise(plan: Plan, report: bool) -> None:
    """Print the study's summary, write its report (``report``), and say whether it was interrupted."""
    print()
    if plan.remote is not None:  # the trials' files (TensorBoard runs; best.pt for a report) are on the URI
        try:
            plan.remote.pull_trials(models=report)
        except (StorageError, OSError) as exc:
            print(f"warning: could not download the trials' files from {plan.remote.shown}: {first_line(exc)}")
    lines, warning = summary_and_warning(plan.study_dir, plan.space)  # one read of the tables for both
    for line in lines:
        print(line)
    if report:
        try:
            from study.report import write_report

            found: list[str] = []
            folder = write_report(plan.study_dir, found)
        except ImportError as exc:  # a package the report draws with (matplotlib, Pillow) is missing
            print(f"note: report not written: {type(exc).__name__}: {exc}")
        else:
            for line in found:
                print(line)
            print(f"report: {here(folder)}")
            if plan.remote is not None:
                try:
                    plan.remote.push_tree(folder.name)
                    print(f"report on object storage: {plan.remote.shown}/{folder.name}/")
                except (StorageError, OSError) as exc:
                    print(f"warning: the report was not pushed to {plan.remote.shown}: {first_line(exc)}")
    statuses = trial_statuses(plan.study_dir)
    if statuses and any(s not in ("TERMINATED", "ERROR") for s in statuses.values()):
        print("the study was interrupted; run the same command again to resume it")
    if warning:  # the last line: models that add nothing to their input make robustness numbers moot
        print(warning)


def list_spaces() -> int:
    for name in available_spaces():
        try:
            print(load_space(name).summary_line())
        except SpaceError as exc:
            print(f"{name:<14} INVALID: {exc}")
    return 0


def serve_dashboard(args: argparse.Namespace) -> int:
    """--dashboard: serve the study named by --name, or by the space's name (:mod:`study.dashboard`)."""
    from study.dashboard import serve_study

    name = args.name if args.name and not args.space else args.name or study_space(args).name
    return serve_study(args.results, name)


def main(argv: list[str] | None = None) -> int:
    set_ray_environment()
    args = build_parser().parse_args(argv)
    quiet_driver(args.verbose)
    problem = check_options(args) or tracking_problem(args.track)  # before the study folder or Ray
    if problem:
        return fail(problem)
    if args.list_spaces:
        return list_spaces()
    try:
        if args.dashboard:
            return serve_dashboard(args)
        plan = plan_study(args)
    except Refused as exc:
        return fail(str(exc))
    with plan.lock:  # the study's lock (study/lock.py), held until its summary and report are written
        try:
            trackers = settle_tracking(parse_track(args.track), plan.study_dir, plan.name, plan.resuming)
            exit_code = launch(plan, args, trackers)
        except Refused as exc:
            return fail(str(exc))
        summarise(plan, report=not args.no_report)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
