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


def test_in_a_tune_run_dominated_trials_stop_and_the_front_runs_to_the_end(tmp_path):
    """Four trials one at a time through Tune: the standard, a robust recipe and one better on both go
    to the last epoch; the recipe the standard dominates stops at the first rung (epoch 2)."""
    out = subprocess.run(
        [sys.executable, "-c", TUNE_RUN, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
        env={
            **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")},
            "RAY_DISABLE_USAGE_STATS": "1",
            "PYTHONPATH": str(REPO),
        },
    )
    assert out.returncode == 0, out.stderr[-3000:]
    epochs = json.loads(out.stdout.strip().splitlines()[-1])
    assert epochs == {"standard": 6, "robust": 6, "worse": 2, "both": 6}
