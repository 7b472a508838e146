"""What each reported result costs the study's driver, as the number of trials grows.

Runs Tune in this process the way ``study/run.py`` does (``TUNE_GLOBAL_CHECKPOINT_S=0``, a checkpoint
with every result, the study's own searcher (:func:`study.run.searcher`: Optuna on SQLite with the
study's grid sampler), the study's :class:`ResultsCallback`, its Tune state saving
(:func:`study.tune_state.install_state_saving`), Ray's own loggers off, ``reuse_actors``), with N
trivial trials of E epochs each whose results carry as many metric columns as a real trial's, and
times, in the driver, the three things the driver does per result:

* ``tune save``: Tune's experiment-state save (``TuneController.checkpoint``, called every step);
* ``study callback``: :class:`study.results.ResultsCallback` (the journal, the copy of Tune's
  state, the Parquet rewrite of ``trials.parquet`` and ``robustness.parquet``, the process record);
* ``optuna``: the searcher's ``on_trial_result`` / ``on_trial_complete`` (SQLite writes, Optuna's
  ``tell``).

For each N it prints the driver's cost per result over all results and over the last tenth (when
the tables and Tune's state are largest), in wall-clock ms and in the driver thread's CPU ms (CPU
time is what the driver itself spent, whatever else the machine runs). Target (issue 11): the
added cost per result stays <= 20 ms up to 300 trials.

Measured here (2 cores, quiet; 3 epochs per trial), driver CPU ms per result over the last tenth
of the results (wall ms in brackets), all three parts, at 10 / 100 / 300 trials:

* the study before this change (Tune saving whenever a trial changed, ~2.7 saves per result here,
  each re-encoding every trial through the pure-Python ``json.dump``; the searcher's pickle holding
  every Optuna trial twice; the state copied after every step): 22.8 / 57.0 / 111.9
  (27.5 / 71.3 / 151.5);
* now, three runs: 12.0 / 12.6 / 19.2 (15.7 / 15.3 / 29.2), 13.5 / 12.2 / 20.0 (19.8 / 15.0 / 25.8)
  and 14.0 / 13.2 / 19.0 (17.0 / 16.5 / 24.4) (the first two with Optuna's INFO log on, which the
  study turns off); in the last, at 300 trials, Tune's save 7.0 ms wall, the study's callback 7.0,
  Optuna 10.4;
* now, but with ``--plain-tune`` (Tune's own saves; measured before the saves of failed trials and
  the third kept checkpoint): 22.2 / 39.2 / 103.5 (30.6 / 58.3 / 135.4).

So the driver's CPU per result no longer grows much with the study, and at 300 trials it sits at
the target (19-20 ms), not under it with a margin; in wall time it is 24-29 ms there. Optuna is now
the largest part and barely grows: one SQLite write per result, plus per trial Optuna's own ask and
``tell`` (two reads of the trial and a write, ~10 ms) and two attribute writes, spread here over
only three results. (The first version of this benchmark used Optuna's plain ``GridSampler``,
whose ``after_trial`` compares every trial's copy of the grid with its own, O(trials x grid
points): it reported 35 ms of Optuna per result at 300 trials that the study, with its own sampler,
never paid.) ``--unpacked`` measures the trainable's earlier reporting (every metric a Tune key).

    python benchmarks/driver_scale.py [--trials 10,100,300] [--epochs 3] [--unpacked] [--plain-tune]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "0"  # as study/run.py: before Ray is imported
os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

from mriadv.checkpoint import CHECKPOINT_NAME  # noqa: E402 - standard library only at import

METRIC_COLUMNS = 80  # a real trial's row has ~100 columns (hyperparameters, losses, metrics, attacks)
TARGET_MS = 20.0


class Clock:
    """Wall and thread-CPU seconds of each timed call, with the number of results so far."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, float, float]] = []  # (what, results so far, wall s, cpu s)
        self.results = 0

    def wrap(self, what: str, fn):
        def timed(*args, **kwargs):
            w0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.events.append((what, self.results, time.perf_counter() - w0, time.thread_time() - c0))

        return timed


def trivial(config: dict) -> None:
    """E epochs of nothing: a result with METRIC_COLUMNS metrics and a 1 kB checkpoint per epoch,
    reported as the study's trainable reports (:func:`study.trainable.tune_result`: the metrics Tune
    does not read packed into one string), or every metric as its own key (``unpacked``). The grid
    parameter is ``seed`` (any TrainConfig field would do)."""
    import random

    from ray import tune

    from study.trainable import tune_result

    rng = random.Random(config["seed"])
    best = float("inf")
    for epoch in range(1, config["epochs"] + 1):
        metrics = {f"m{i:02d}": rng.random() for i in range(METRIC_COLUMNS)}
        metrics.update(val_nmse=rng.random(), epoch=epoch)
        best = min(best, metrics["val_nmse"])
        metrics["best_val_nmse"] = best
        if not config["unpacked"]:
            metrics = tune_result(metrics, ("val_nmse",))
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / CHECKPOINT_NAME).write_bytes(b"\0" * 1024)
            tune.report({**metrics, "robustness_json": "[]"}, checkpoint=tune.Checkpoint.from_directory(d))


def run(n_trials: int, epochs: int, folder: Path, unpacked: bool = False, plain_tune: bool = False) -> dict[str, float]:
    """One study of ``n_trials`` grid points, with the study's own searcher (:func:`study.run.searcher`:
    Optuna on SQLite, the study's grid sampler) and callback, and Tune's state saving as the study
    installs it (``plain_tune``: as Tune 2.60 does it by itself)."""
    from ray import tune
    from ray.tune.execution.tune_controller import TuneController

    from study.results import ResultsCallback
    from study.run import param_space, searcher
    from study.search import StudySearch
    from study.spaces import space_from_dict
    from study.tune_state import CHECKPOINTS_KEPT, install_state_saving

    if not plain_tune:
        install_state_saving()  # as study/run.py does
    clock = Clock()

    class TimedCallback(ResultsCallback):
        pass

    for name in (
        "on_trial_result",
        "on_checkpoint",
        "on_trial_complete",
        "on_step_end",
        "on_trial_start",
        "on_experiment_end",
    ):
        setattr(TimedCallback, name, clock.wrap("study callback", getattr(ResultsCallback, name)))

    def counted(fn):
        def on_result(self, trial_id, result):
            clock.results += 1
            return fn(self, trial_id, result)

        return on_result

    originals = {
        (TuneController, "checkpoint"): TuneController.checkpoint,
        (StudySearch, "on_trial_result"): StudySearch.on_trial_result,
        (StudySearch, "on_trial_complete"): StudySearch.on_trial_complete,
    }
    TuneController.checkpoint = clock.wrap("tune save", TuneController.checkpoint)
    StudySearch.on_trial_result = counted(clock.wrap("optuna", StudySearch.on_trial_result))
    StudySearch.on_trial_complete = clock.wrap("optuna", StudySearch.on_trial_complete)
    try:
        name = f"scale{n_trials}"
        study_dir = folder / name
        study_dir.mkdir(parents=True)
        raw = {
            "description": "driver scale",
            "parameters": {"seed": {"grid": list(range(n_trials))}},
            "objectives": [{"metric": "val_nmse", "mode": "min"}],
            "scheduler": "none",
        }
        space = space_from_dict(raw, name, __file__)
        tuner = tune.Tuner(
            tune.with_resources(trivial, {"cpu": 1}),
            param_space={**param_space(space), "epochs": epochs, "unpacked": unpacked},
            tune_config=tune.TuneConfig(
                search_alg=searcher(space, study_dir, name, seed=0), num_samples=n_trials, reuse_actors=True
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(folder),
                verbose=0,
                callbacks=[TimedCallback(study_dir, record_processes=True)],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            ),
        )
        t0 = time.perf_counter()
        tuner.fit()
        wall = time.perf_counter() - t0
    finally:
        for (owner, attr), fn in originals.items():
            setattr(owner, attr, fn)

    results = max(1, clock.results)
    last = [e for e in clock.events if e[1] > 0.9 * results]
    last_n = max(1, results - int(0.9 * results))
    out = {"trials": n_trials, "results": results, "wall_s": wall}
    for what in ("tune save", "study callback", "optuna"):
        out[f"{what} ms"] = 1e3 * sum(e[2] for e in clock.events if e[0] == what) / results
        out[f"{what} cpu ms"] = 1e3 * sum(e[3] for e in clock.events if e[0] == what) / results
        out[f"{what} last ms"] = 1e3 * sum(e[2] for e in last if e[0] == what) / last_n
        out[f"{what} last cpu ms"] = 1e3 * sum(e[3] for e in last if e[0] == what) / last_n
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", default="10,100,300", help="comma-separated trial counts (default: 10,100,300)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument(
        "--unpacked",
        action="store_true",
        help="report every metric as its own key, as the trainable did before record_json",
    )
    p.add_argument(
        "--plain-tune",
        action="store_true",
        help="let Tune save its state as it does by itself (every step, every trial re-encoded), "
        "without study.tune_state.install_state_saving",
    )
    args = p.parse_args()
    counts = [int(n) for n in args.trials.split(",")]

    import logging

    import optuna
    import ray

    from study.cluster import start_ray

    logging.getLogger("ray.tune").setLevel(logging.ERROR)  # "could not fetch metrics": Ray's loggers are off
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # as study/run.py (its INFO line queries the best trial)

    start_ray(None, cpus=2, gpus=0)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="mriadv-driver-scale-") as tmp:
            for n in counts:
                rows.append(run(n, args.epochs, Path(tmp), args.unpacked, args.plain_tune))
                r = rows[-1]
                print(f"{n} trials x {args.epochs} epochs: {r['results']} results in {r['wall_s']:.0f} s", flush=True)
    finally:
        ray.shutdown()

    parts = ("tune save", "study callback", "optuna")
    print("\ndriver cost per result, ms wall (driver-thread CPU); 'last': the last tenth of the results")
    print(f"{'trials':>6s}  " + "  ".join(f"{p:>22s}" for p in parts) + f"  {'sum':>14s}  {'sum, last':>14s}")
    for r in rows:
        cells = [f"{r[f'{p} ms']:6.1f} ({r[f'{p} cpu ms']:5.1f}) last {r[f'{p} last ms']:5.1f}" for p in parts]
        total = sum(r[f"{p} ms"] for p in parts)
        total_cpu = sum(r[f"{p} cpu ms"] for p in parts)
        last = sum(r[f"{p} last ms"] for p in parts)
        last_cpu = sum(r[f"{p} last cpu ms"] for p in parts)
        print(
            f"{r['trials']:6d}  "
            + "  ".join(f"{c:>22s}" for c in cells)
            + f"  {total:6.1f} ({total_cpu:5.1f})  {last:6.1f} ({last_cpu:5.1f})"
        )
    worst = max(sum(r[f"{p} last cpu ms"] for p in parts) for r in rows)
    print(
        f"target: <= {TARGET_MS:g} ms per result (driver CPU, last tenth) up to {max(counts)} trials: "
        f"{'met' if worst <= TARGET_MS else 'NOT met'}"
    )
    print(f"worst_ms_per_result: {worst:.1f}")


if __name__ == "__main__":
    main()
