"""Early stopping of multi-objective studies (study.schedulers.ParetoASHA): the fronts against a
brute-force sort, the rung rule against its statement, the bookkeeping against Ray's ASHA, and a
Tune run in which the robust end of a front survives."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from study.schedulers import ParetoASHA, continues, for_space, fronts
from study.spaces import load_space

REPO = Path(__file__).resolve().parents[1]
CONTINUE, STOP = "CONTINUE", "STOP"


def _brute_fronts(points: list[tuple[float, ...]]) -> list[int]:
    """Front index by its definition: a point's front is one more than the highest front of the points
    that dominate it (0 when none does), computed by recursion over dominance."""

    def dominates(a, b):
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    memo: dict[int, int] = {}

    def front(i: int) -> int:
        if i not in memo:
            above = [front(j) for j in range(len(points)) if dominates(points[j], points[i])]
            memo[i] = 1 + max(above) if above else 0
        return memo[i]

    return [front(i) for i in range(len(points))]


def test_fronts_are_the_non_dominated_sorting():
    rng = np.random.default_rng(0)
    for n, k in [(1, 2), (7, 2), (20, 2), (15, 3), (12, 1)]:
        points = np.round(rng.uniform(0, 1, (n, k)), 1)  # rounded: ties and duplicates too
        assert fronts(points).tolist() == _brute_fronts([tuple(p) for p in points])
    # a closed form: (1,4) (2,3) (4,1) are one front; (3,4) is dominated by (2,3); (5,5) by all
    assert fronts(np.array([[1, 4], [2, 3], [4, 1], [3, 4], [5, 5]])).tolist() == [0, 0, 0, 1, 2]


def test_a_trial_goes_on_when_fewer_than_n_over_eta_trials_are_on_better_fronts():
    """The rule as stated: of n trials at a rung (the new one included), the new one goes on when fewer
    than ceil(n / eta) of them lie on fronts better than its own."""
    rng = np.random.default_rng(1)
    for _ in range(300):
        m, eta = int(rng.integers(0, 7)), float(rng.choice([2, 3, 4]))
        pts = np.round(rng.uniform(0, 1, (m + 1, 2)), 1)
        ranks = _brute_fronts([tuple(p) for p in pts])
        better = sum(r < ranks[-1] for r in ranks[:-1])
        assert continues(pts[:-1], pts[-1], eta) == (m == 0 or better < math.ceil((m + 1) / eta))


def test_the_robust_end_of_the_front_is_kept_where_halving_by_one_objective_stops_it():
    """At a rung holding the standard model (clean 0.05, attacked 0.40): a robust recipe (0.08, 0.20)
    goes on, a recipe worse on both (0.09, 0.45) stops; ASHA on clean NMSE alone stops both."""
    from ray.tune.schedulers import ASHAScheduler

    pareto = ParetoASHA(["c", "r"], ["min", "min"], max_t=6, grace_period=2, reduction_factor=2)
    asha = ASHAScheduler(metric="c", mode="min", max_t=6, grace_period=2, reduction_factor=2)
    got = {}
    for name, (c, r) in {"standard": (0.05, 0.40), "robust": (0.08, 0.20), "worse": (0.09, 0.45)}.items():
        trial = SimpleNamespace(trial_id=name)
        asha.on_trial_add(None, trial)
        result = {"training_iteration": 2, "c": c, "r": r}
        got[name] = (pareto.on_trial_result(None, trial, result), asha.on_trial_result(None, trial, result))
    assert got == {"standard": (CONTINUE, CONTINUE), "robust": (CONTINUE, STOP), "worse": (STOP, STOP)}


def test_rungs_and_bookkeeping_follow_rays_asha():
    """Milestones grace * eta^k below max_t (2 and 4 for 6 epochs), one judgement per trial and rung,
    the highest rung reached judged, STOP at max_t; with one objective, the same decisions as Ray's
    ASHA wherever its interpolated cutoff and the rank rule agree (distinct values, 0, 1 or 3 recorded)."""
    from ray.tune.schedulers import ASHAScheduler

    pareto = ParetoASHA(["c"], ["max"], max_t=6, grace_period=2, reduction_factor=2)
    assert [m for m, _ in pareto.rungs] == [4, 2]
    asha = ASHAScheduler(metric="c", mode="max", max_t=6, grace_period=2, reduction_factor=2)
    values = [0.3, 0.9, 0.5, 0.1, 0.7, 0.6, 0.2]
    for i, v in enumerate(values):  # 0, 1, 2, 3, ... recorded before each: compare where the rules agree
        trial = SimpleNamespace(trial_id=f"t{i}")
        asha.on_trial_add(None, trial)
        mine, ray = (s.on_trial_result(None, trial, {"training_iteration": 2, "c": v}) for s in (pareto, asha))
        if i in (0, 1, 3):
            assert mine == ray, (i, v)
        assert pareto.on_trial_result(None, trial, {"training_iteration": 3, "c": v}) == CONTINUE  # judged
    trial = SimpleNamespace(trial_id="late")
    assert pareto.on_trial_result(None, trial, {"training_iteration": 5, "c": 1.0}) == CONTINUE
    assert "late" in pareto.rungs[0][1] and "late" not in pareto.rungs[1][1]  # its highest rung only
    assert pareto.on_trial_result(None, trial, {"training_iteration": 6, "c": 1.0}) == STOP  # max_t
    assert pareto.on_trial_result(None, trial, {"training_iteration": 2, "c": math.nan}) == CONTINUE
    with pytest.raises(ValueError, match="one mode per metric"):
        ParetoASHA(["a", "b"], ["min"], max_t=6)


def test_a_space_with_several_objectives_gets_the_pareto_scheduler():
    from ray.tune.schedulers import ASHAScheduler

    frontier = for_space(load_space("frontier"), 6)
    assert isinstance(frontier, ParetoASHA) and frontier.metrics == ["best_val_nmse", "best_rob_pgd_e5000_nmse"]
    assert frontier.group == "init_from"  # the frontier searches fine-tuning against training from scratch
    assert isinstance(for_space(load_space("lr_sweep"), 6), ASHAScheduler)
    assert for_space(load_space("eps_sweep"), 6) is None


TUNE_RUN = """
import json, sys
from ray import tune
from study.cluster import start_ray
from study.schedulers import ParetoASHA

POINTS = {"standard": (0.05, 0.40), "robust": (0.08, 0.20), "worse": (0.09, 0.45), "both": (0.04, 0.30)}

def trainable(config):
    c, r = POINTS[config["kind"]]
    for epoch in range(1, 7):
        tune.report({"c": c + 0.01 / epoch, "r": r + 0.01 / epoch})

start_ray(None, cpus=1, gpus=0)
tuner = tune.Tuner(
    trainable,
    param_space={"kind": tune.grid_search(list(POINTS))},
    tune_config=tune.TuneConfig(
        scheduler=ParetoASHA(["c", "r"], ["min", "min"], max_t=6, grace_period=2), max_concurrent_trials=1
    ),
    run_config=tune.RunConfig(storage_path=sys.argv[1], name="pareto", verbose=0),
)
grid = tuner.fit()
print(json.dumps({r.config["kind"]: r.metrics["training_iteration"] for r in grid}))
"""


def _tune_env() -> dict[str, str]:
    """This process's environment for a plain Tune run: without a cluster address or token, and without
    the ``TUNE_*`` settings a study's driver puts in ``os.environ`` when a test runs it in-process (its
    ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS`` leaves a plain run's results without metrics)."""
    drop = ("RAY_ADDRESS", "RAY_AUTH", "TUNE_")
    keep = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**keep, "RAY_DISABLE_USAGE_STATS": "1", "PYTHONPATH": str(REPO)}


def _run_tune(script: str, tmp_path: Path) -> dict:
    """Run a plain Tune ``script`` (argument: ``tmp_path``) in a process of its own; its last line, JSON."""
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
        env=_tune_env(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_in_a_tune_run_dominated_trials_stop_and_the_front_runs_to_the_end(tmp_path):
    """Four trials one at a time through Tune: the standard, a robust recipe and one better on both go
    to the last epoch; the recipe the standard dominates stops at the first rung (epoch 2)."""
    epochs = _run_tune(TUNE_RUN, tmp_path)
    assert epochs == {"standard": 6, "robust": 6, "worse": 2, "both": 6}


# ---------------------------------------------------------------------------------------------------
# Resume: the rungs refilled from the study's tables


def _rows(records: dict[str, list[tuple[float, float]]]) -> list[dict]:
    return [
        {"trial_id": t, "epoch": e, "c": c, "r": r}
        for t, values in records.items()
        for e, (c, r) in enumerate(values, 1)
    ]


def test_the_rungs_are_refilled_from_the_tables_once_after_unpickling(tmp_path, capsys):
    """A scheduler unpickled (as Tune restores it) records, before its first trial, each trial's values
    at each milestone epoch of trials.parquet; a trial recorded there is not judged again, a new one is
    judged against them. Both Ray's ASHA (one objective) and ParetoASHA."""
    import pickle

    import pandas as pd

    from study.schedulers import StudyASHA, recorded_epochs, refill, study_tables

    assert recorded_epochs(study_tables(tmp_path), ["c"]) == [] and study_tables(None).empty  # a new study: none
    # ASHA's recording, replayed: each epoch at the highest milestone <= it unless one holds the trial
    # (so at the first epoch >= each milestone), held values kept, None (no metrics) not recorded
    rungs = [(4.0, {}), (2.25, {"B": 9.9}), (1.5, {})]
    records = [("A", e, float(e)) for e in (5, 4, 3, 2, 1)] + [
        ("B", 3, 7.0),
        ("B", 2, 2.0),
        ("C", 2, None),
        ("C", 3, 5.0),
    ]
    assert refill(rungs, records) == 5
    assert rungs == [(4.0, {"A": 4.0}), (2.25, {"B": 9.9, "A": 3.0, "C": 5.0}), (1.5, {"A": 2.0, "B": 2.0})]

    pareto = ParetoASHA(["c", "r"], ["min", "min"], max_t=6, grace_period=1, study_dir=tmp_path)
    asha = StudyASHA(metric="c", mode="min", max_t=6, grace_period=1, reduction_factor=2, study_dir=tmp_path)
    saved = {name: pickle.dumps(s) for name, s in (("pareto", pareto), ("asha", asha))}  # tuner.pkl, at the start
    for fresh in (pareto, asha):
        fresh.on_trial_add(None, SimpleNamespace(trial_id="A"))
        assert fresh.refilled == 0  # a new study: no tables yet
    # then the study ran: A 6 epochs at (0.05, 0.40); B was at epoch 3 when the driver stopped
    pd.DataFrame(_rows({"A": [(0.05, 0.40)] * 6, "B": [(0.04, 0.20)] * 3})).to_parquet(tmp_path / "trials.parquet")
    assert recorded_epochs(study_tables(tmp_path), ["c", "r"])[:2] == [("A", 1, [0.05, 0.40]), ("A", 2, [0.05, 0.40])]
    for name, state in saved.items():
        restored = pickle.loads(state)
        new, b = SimpleNamespace(trial_id="C"), SimpleNamespace(trial_id="B")
        restored.on_trial_add(None, b)
        restored.on_trial_add(None, new)  # refilled once, before the first
        assert restored.refilled == 5  # A at 1, 2 and 4; B at 1 and 2
        rungs = restored.rungs if name == "pareto" else restored._brackets[0]._rungs
        assert {m: sorted(r) for m, r in rungs} == {4.0: ["A"], 2.0: ["A", "B"], 1.0: ["A", "B"]}
        if name == "asha":
            assert rungs[0][1]["A"] == -0.05  # as Ray records it: metric_op * value
        # B, recorded at rung 2, is not judged there again; C, worse than A at rung 4, stops
        assert restored.on_trial_result(None, b, {"training_iteration": 3, "c": 0.9, "r": 0.9}) == CONTINUE
        assert restored.on_trial_result(None, new, {"training_iteration": 4, "c": 0.09, "r": 0.45}) == STOP
        # unpickled again (a second resume), it reads the tables again: what came since is added
        again = pickle.loads(pickle.dumps(restored))
        more = _rows({"A": [(0.05, 0.40)] * 6, "B": [(0.04, 0.20)] * 3 + [(0.09, 0.45)]})
        pd.DataFrame(more).to_parquet(tmp_path / "trials.parquet")
        again.on_trial_add(None, b)
        assert again.refilled == 1 and "B" in (again.rungs if name == "pareto" else again._brackets[0]._rungs)[0][1]
        pd.DataFrame(_rows({"A": [(0.05, 0.40)] * 6, "B": [(0.04, 0.20)] * 3})).to_parquet(tmp_path / "trials.parquet")
        # without the tables C would be the first at rung 4, and go on
        empty = pickle.loads(state)
        empty.study_dir = str(tmp_path / "elsewhere")
        empty.on_trial_add(None, new)
        assert empty.on_trial_result(None, new, {"training_iteration": 4, "c": 0.09, "r": 0.45}) == CONTINUE
    # tables it cannot read: a warning, empty rungs, and the resume goes on
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "trials.parquet").write_text("not a Parquet file")
    broken = pickle.loads(saved["pareto"])
    broken.study_dir = str(tmp_path / "bad")
    capsys.readouterr()
    broken.on_trial_add(None, SimpleNamespace(trial_id="C"))
    assert "warning: ASHA's rungs start empty" in capsys.readouterr().out and broken.refilled == 0


RESUME_RUN = """
import json, sys
from pathlib import Path
import pandas as pd
from ray import tune
from study.cluster import start_ray
from study.schedulers import ParetoASHA, StudyASHA

root, marker = Path(sys.argv[1]), Path(sys.argv[1]) / "fail_b"
EARLY, LATE = {"a": (0.05, 0.40), "b": (0.04, 0.20)}, {"a": (0.05, 0.40), "b": (0.09, 0.45)}

def trainable(config):
    for epoch in range(1, 7):
        if config["kind"] == "b" and epoch == 3 and marker.exists():
            raise RuntimeError("the driver stops here")
        c, r = (EARLY if epoch < 4 else LATE)[config["kind"]]
        tune.report({"c": c, "r": r, "trial_id_": tune.get_context().get_trial_id()})

start_ray(None, cpus=1, gpus=0)
out = {}
for name in ("pareto", "asha"):
    study = root / name
    study.mkdir()
    marker.touch()
    scheduler = (
        ParetoASHA(["c", "r"], ["min", "min"], max_t=6, grace_period=1, study_dir=study)
        if name == "pareto"
        else StudyASHA(metric="c", mode="min", max_t=6, grace_period=1, reduction_factor=2, study_dir=study)
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"kind": tune.grid_search(["a", "b"])},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=1),
        run_config=tune.RunConfig(storage_path=str(root / "tune"), name=name, verbose=0),
    )
    grid = tuner.fit()
    rows = [  # what the study's tables hold when the driver stops: every reported epoch
        {"trial_id": r.metrics["trial_id_"], "epoch": int(e), "c": c, "r": rr}
        for r in grid
        for e, c, rr in r.metrics_dataframe[["training_iteration", "c", "r"]].itertuples(index=False)
    ]
    pd.DataFrame(rows).to_parquet(study / "trials.parquet")
    first = {r.config["kind"]: (r.metrics["training_iteration"], r.error is not None) for r in grid}
    marker.unlink()
    grid = tune.Tuner.restore(str(root / "tune" / name), trainable, resume_errored=True).fit()
    out[name] = {"first": first, "resumed": {r.config["kind"]: r.metrics["training_iteration"] for r in grid}}
print(json.dumps(out))
"""


def test_a_resumed_tune_run_judges_a_restored_trial_against_the_trials_before_the_stop(tmp_path):
    """Through Tune's own restore: trial b passes rungs 1 and 2 (better than a), fails at epoch 3 and is
    resumed from scratch; at rung 4, worse than a on both, it stops there, which it does only because
    the rungs were refilled from the tables (an empty rung 4 would let it run to epoch 6)."""
    got = _run_tune(RESUME_RUN, tmp_path)
    for name in ("pareto", "asha"):
        assert got[name]["first"] == {"a": [6, False], "b": [2, True]}, got
        assert got[name]["resumed"] == {"a": 6, "b": 4}, got


def test_fine_tuned_trials_and_trials_from_scratch_are_ranked_in_rungs_of_their_own(tmp_path):
    """At epoch 2 a trial fine-tuning the reference has had the reference's epochs too, and dominates a
    trial from scratch. Ranked together (the frontier run before groups) the scratch trial stops at the
    first rung; with rungs per init_from it is ranked against scratch trials only: the first goes on,
    one it dominates stops. The tables' init_from ('scratch', 'reference') refill the matching rungs."""
    import pandas as pd

    from study.schedulers import group_name, study_tables, trial_groups

    def run(scheduler):
        out = {}
        for name, init, c, r in [
            ("tuned", "reference", 0.05, 0.30),
            ("scratch1", None, 0.08, 0.45),
            ("scratch2", None, 0.09, 0.50),  # dominated by scratch1
            ("tuned2", "reference", 0.06, 0.35),  # dominated by tuned
        ]:
            trial = SimpleNamespace(trial_id=name, config={"init_from": init, "x": 1})
            out[name] = scheduler.on_trial_result(None, trial, {"training_iteration": 2, "c": c, "r": r})
        return out

    together = ParetoASHA(["c", "r"], ["min", "min"], max_t=6, grace_period=2)
    # together, of 4 at the rung the best 2 go on: tuned (front 0) and tuned2 (front 1), never a scratch trial
    assert run(together) == {"tuned": CONTINUE, "scratch1": STOP, "scratch2": STOP, "tuned2": CONTINUE}
    apart = ParetoASHA(["c", "r"], ["min", "min"], max_t=6, grace_period=2, group="init_from")
    assert run(apart) == {"tuned": CONTINUE, "scratch1": CONTINUE, "scratch2": STOP, "tuned2": STOP}  # 1 of 2 each
    assert sorted(apart.rungs_of("reference")[1][1]) == ["tuned", "tuned2"] and apart.rungs[1][1] == {}
    assert "2: 4 recorded" in apart.debug_string()

    assert [group_name(v) for v in (None, "scratch", "", "reference")] == ["scratch", "scratch", "scratch", "reference"]
    rows = [
        {"trial_id": t, "epoch": e, "init_from": init, "c": c, "r": 0.4}
        for t, init, c in [("A", "reference", 0.05), ("B", "scratch", 0.08)]
        for e in (1, 2)
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "trials.parquet")
    assert trial_groups(study_tables(tmp_path), "init_from") == {"A": "reference", "B": "scratch"}
    resumed = ParetoASHA(["c", "r"], ["min", "min"], max_t=6, grace_period=2, study_dir=tmp_path, group="init_from")
    resumed.on_trial_add(None, SimpleNamespace(trial_id="C", config={"init_from": None}))
    assert resumed.refilled == 2
    assert list(resumed.rungs_of(None)[1][1]) == ["B"] and list(resumed.rungs_of("reference")[1][1]) == ["A"]
    # C from scratch, worse than B on both, stops; it would go on if ranked against A's group alone
    late = SimpleNamespace(trial_id="C", config={"init_from": None})
    assert resumed.on_trial_result(None, late, {"training_iteration": 2, "c": 0.09, "r": 0.5}) == STOP
