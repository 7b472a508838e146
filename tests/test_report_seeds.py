"""Replicates: a space with ``seeds: 2`` trains each configuration twice, and the report's
configuration tables are recomputed here from the Parquet rows with SciPy's t quantile."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from study import report

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("seeds")
    space = work / "twice.yaml"
    space.write_text(
        "description: standard vs adversarial, two seeds each\nparameters:\n  epsilon: {grid: [0, 5000]}\n"
        "seeds: 2\nobjectives:\n  - {metric: val_nmse, mode: min}\n  - {metric: rob_pgd_e5000_nmse, mode: min}\n"
        "attack_budgets: [1000, 5000]\n"
    )
    out = subprocess.run(
        [sys.executable, str(REPO / "study" / "run.py"), "--space", str(space), "--profile", "smoke"]
        + ["--results", str(work / "results"), "--no-report"],
        capture_output=True,
        text=True,
        cwd=work,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "each configuration with 2 training seeds" in out.stdout
    folder = work / "results" / "twice"
    assert report.main([str(folder)]) == 0
    return folder


def _table(robust: pd.DataFrame, trials: list[str], model: str, attack: str, budget: float) -> np.ndarray:
    rows = robust[(robust["split"] == "report") & (robust["model"] == model) & (robust["attack"] == attack)]
    rows = rows[rows["budget_ref"] == budget]
    per = [json.loads(rows[rows["trial_id"] == t].iloc[0]["volume_nmse"]) for t in trials]
    return np.array([[p[v] for v in sorted(per[0])] for p in per])


def _expected(d: np.ndarray) -> tuple[float, float, float]:
    """mean, half-width, df of the seed-and-volume interval, written out independently."""
    s, v = d.shape
    a, b = d.mean(axis=1).var(ddof=1) / s, d.mean(axis=0).var(ddof=1) / v
    df = (a + b) ** 2 / (a**2 / (s - 1) + b**2 / (v - 1))
    return d.mean(), stats.t.ppf(0.975, df) * math.sqrt(a + b), df


def test_each_configuration_runs_once_per_seed_and_the_tables_are_the_parquet_rows(study):
    trials = pd.read_parquet(study / "trials.parquet").groupby("trial_id").last()
    robust = pd.read_parquet(study / "robustness.parquet")
    seeds = {eps: sorted(trials.loc[trials["epsilon_ref"] == eps, "seed"]) for eps in (0.0, 5000.0)}
    assert seeds == {0.0: [0, 1], 5000.0: [0, 1]}
    by = {(e, s): t for t, e, s in zip(trials.index, trials["epsilon_ref"], trials["seed"])}
    std, adv = [by[(0.0, s)] for s in (0, 1)], [by[(5000.0, s)] for s in (0, 1)]

    table = pd.read_csv(study / "report" / "configurations.csv")
    assert list(table["configuration"]) == ["ε=0", "ε=5000"] and list(table["seeds"]) == [2, 2]
    for label, ids in (("ε=0", std), ("ε=5000", adv)):
        row = table[table["configuration"] == label].iloc[0]
        clean = _table(robust, ids, "trained", "clean", 0.0)
        mean, half, _ = _expected(clean)
        assert row["NMSE"] == pytest.approx(mean, rel=1e-9) and row["NMSE ±"] == pytest.approx(half, rel=1e-6)
        pgd = _table(robust, ids, "trained", "pgd", 5000.0) - clean
        mean, half, _ = _expected(pgd)
        assert row["PGD@5000 dNMSE"] == pytest.approx(mean, rel=1e-9)
        assert row["PGD@5000 dNMSE ±"] == pytest.approx(half, rel=1e-6)
        psnr = trials.loc[ids, "report_psnr"].to_numpy()  # per run: an interval over the two seeds
        assert row["PSNR"] == pytest.approx(psnr.mean()) and row["PSNR ±"] == pytest.approx(
            stats.t.ppf(0.975, 1) * psnr.std(ddof=1) / math.sqrt(2), rel=1e-6
        )

    versus = pd.read_csv(study / "report" / "versus_reference.csv")
    assert list(versus["configuration"]) == ["ε=5000"]
    paired = (_table(robust, adv, "trained", "pgd", 5000.0) - _table(robust, adv, "trained", "clean", 0.0)) - (
        _table(robust, std, "trained", "pgd", 5000.0) - _table(robust, std, "trained", "clean", 0.0)
    )
    mean, half, df = _expected(paired)
    row = versus.iloc[0]
    assert row["Δ PGD dNMSE"] == pytest.approx(mean, rel=1e-6, abs=1e-12)
    assert row["Δ PGD dNMSE ±"] == pytest.approx(half, rel=1e-6) and row["Δ PGD dNMSE df"] == pytest.approx(df)

    summary = (study / "report" / "summary.md").read_text()
    assert "## Configurations over their seeds" in summary and "over 2 training seeds" in summary
    assert "## Against ε=0 (held-out split, paired by seed and volume)" in summary


def test_seeds_on_the_command_line_are_checked_like_the_spaces_own(tmp_path):
    for args, why in (
        (["--space", "eps_sweep", "--seeds", "0"], "seeds (--seeds): must be a positive integer"),
        (["--space", "full", "--seeds", "2"], "seeds (--seeds): replicates need the configurations listed"),
    ):
        out = subprocess.run(
            [sys.executable, str(REPO / "study" / "run.py"), *args, "--profile", "smoke", "--results", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 2 and why in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


def test_a_study_started_with_seeds_keeps_them_in_its_saved_space(tmp_path):
    import argparse

    from study.plan import space_text, study_space
    from study.spaces import parse_space_yaml

    space = study_space(argparse.Namespace(space="eps_sweep", seeds=3))
    assert space.seeds == 3 and space.trial_count() == 18
    saved = parse_space_yaml(space_text(space), "study.json")
    assert saved["seeds"] == 3 and saved["parameters"] == parse_space_yaml(space.path.read_text(), "x")["parameters"]
    plain = study_space(argparse.Namespace(space="eps_sweep", seeds=None))
    assert space_text(plain) == plain.path.read_text()


def test_pareto_membership_within_noise_is_two_standard_errors_in_both_coordinates():
    from study.report_plots import within_noise

    values = np.array([[1.0, 1.0], [1.05, 1.05], [2.0, 2.0], [0.5, 3.0]])
    errors = np.full((4, 2), 0.02)
    finished = np.ones(4, dtype=bool)
    front = np.array([True, False, False, True])
    # (1.05, 1.05) is beaten by (1, 1) by 0.05 < 2 * sqrt(2) * 0.02 = 0.057 in each: within noise;
    # (2, 2) is beaten by 1.0 in both: clearly off the front; front members are never marked
    assert within_noise(values, errors, finished, front).tolist() == [False, True, False, False]
    assert within_noise(values, errors / 4, finished, front).tolist() == [False, False, False, False]


def test_the_pareto_figure_uses_the_budget_the_objectives_name(study):
    from study.report_data import load_results, reference_budget
    from study.report_plots import pareto_points
    from study.report_tables import table1

    res = load_results(study)
    assert res.budgets == [1000.0, 5000.0] and reference_budget(res) == 5000.0
    points = pareto_points(res, table1(res))
    assert points.y_metric == "PGD@5000 NMSE" and points.errors is not None and np.isfinite(points.errors).all()
    res.objectives = [("val_nmse", "min"), ("rob_pgd_e1000_nmse", "min")]
    assert reference_budget(res) == 1000.0 and pareto_points(res, table1(res)).y_metric == "PGD@1000 NMSE"


def test_a_study_ends_with_what_it_found(study):
    """Each finding is chosen on the selection volumes (the trials' best epochs, from trials.parquet) and
    reported by its held-out figures (the report's tables)."""
    from study.report_data import load_results
    from study.report_findings import findings

    table = pd.read_csv(study / "report" / "configurations.csv").set_index("configuration")
    versus = pd.read_csv(study / "report" / "versus_reference.csv").iloc[0]
    robust = pd.read_parquet(study / "robustness.parquet")
    zf = robust[(robust["split"] == "report") & (robust["model"] == "zero_filled") & (robust["attack"] == "clean")]
    trials = pd.read_parquet(study / "trials.parquet")
    at_best = trials[trials["epoch"] > 0].sort_values("val_loss").groupby("trial_id").head(1)  # early stopping's pick
    by_eps = at_best.groupby("epsilon_ref")
    chosen = f"ε={by_eps['val_nmse'].mean().idxmin():g}"
    lines = findings(load_results(study))
    assert len(lines) == 3
    assert lines[0].startswith(
        f"found: best clean NMSE {chosen} (chosen on the selection volumes): held-out {table.loc[chosen, 'NMSE']:.4f} ± "
    )
    assert f"zero-filled input {zf['nmse'].mean():.4f}" in lines[0]
    assert (
        f"against ε=0 under PGD@5000, ε=5000 (chosen on the selection volumes) changes the held-out degradation by "
        f"{versus['Δ PGD dNMSE']:+.4f} ± " in lines[1]
    )
    # the selection split's own comparison, written out: mean PSNR difference, ratio of mean degradations
    psnr = by_eps["val_psnr"].mean()
    worse = at_best.groupby("epsilon_ref")["rob_pgd_e5000_d_nmse"].mean()  # attacked minus clean, same slices
    assert versus["selection ΔPSNR"] == pytest.approx(psnr[5000.0] - psnr[0.0], rel=1e-9)
    assert versus["selection %"] == pytest.approx(100 * (worse[5000.0] / worse[0.0] - 1), rel=1e-9)
    within = psnr[5000.0] - psnr[0.0] >= -0.5  # the one other configuration: the best recipe, or the closest
    assert (" the best recipe there is ε=5000: held-out " if within else "the closest there, ε=5000, at ") in lines[2]
    assert f"{versus['ΔPSNR']:+.2f} ± " in lines[2] and "on the selection volumes" in lines[2]


# ---------------------------------------------------------------------------------------------------
# Synthetic study folders (no training): the architectures question, U-Net vs unrolled, standard vs
# k-space PGD training, three seeds, judged under k-space PGD; image PGD rows beside them as a decoy.
# ---------------------------------------------------------------------------------------------------
ARCHITECTURES = (("unet", "none", 0.0), ("unrolled", "none", 0.0), ("unet", "pgd", 1000.0), ("unrolled", "pgd", 1000.0))
VOLUMES = ("file_a", "file_b", "file_c", "file_d")


def _synthetic_study(folder: Path, configs=ARCHITECTURES, seeds: int = 3, features: bool = False) -> Path:
    """trials.parquet and robustness.parquet of a finished study (one epoch per trial, held-out rows
    of the trained model and the zero-filled input; per-volume NMSE clean, under image PGD and k-space
    PGD at 1000 and 5000; with ``features``, the trained model's per-volume feature FNRs), random but
    seeded."""
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    trials, robust = [], []
    for i, (arch, adversary, eps) in enumerate(configs):
        for seed in range(seeds):
            trial = f"t{i}{seed}"
            trials.append(
                {
                    "trial_id": trial,
                    "epoch": 1,
                    "arch": arch,
                    "adversary": adversary,
                    "epsilon": eps * 96**2 / 320**2,
                    "epsilon_ref": eps,
                    "seed": seed,
                    "val_loss": rng.uniform(0.1, 0.2),
                    "val_nmse": rng.uniform(0.03, 0.05),
                    "report_psnr": rng.uniform(28, 30),
                    "report_ssim": rng.uniform(0.7, 0.8),
                    "report_vs_input_ratio": rng.uniform(0.3, 0.5),
                    "epoch_status": "completed",
                    "status": "TERMINATED",
                }
            )
            clean = dict(zip(VOLUMES, rng.uniform(0.02, 0.06, len(VOLUMES))))
            cells = [("clean", 0.0, clean)]
            for attack, scale in (("pgd", 0.5), ("pgd_kspace", 0.1 if arch == "unrolled" else 0.3)):
                for budget in (1000.0, 5000.0):
                    grow = scale * budget / 5000 * rng.uniform(0.5, 1.5, len(VOLUMES))
                    cells.append((attack, budget, {v: clean[v] + g for v, g in zip(VOLUMES, grow)}))
            for model, factor in (("trained", 1.0), ("zero_filled", 2.5)):
                for attack, budget, per in cells:
                    per = {v: factor * x for v, x in per.items()}
                    robust.append(
                        {
                            "trial_id": trial,
                            "epoch": 1,
                            "split": "report",
                            "model": model,
                            "protocol": "",
                            "attack": attack,
                            "budget_ref": budget,
                            "nmse": float(np.mean(list(per.values()))),
                            "nmse_se": float(np.std(list(per.values()), ddof=1) / 2),
                            "psnr": 30.0 - 10 * float(np.mean(list(per.values()))),
                            "ssim": 0.8 - float(np.mean(list(per.values()))),
                            "volume_nmse": json.dumps(per),
                        }
                    )
            for attack in ("feature_random", "feature_worst") if features else ():
                rates = {v: float(rng.integers(0, 11)) / 10 for v in VOLUMES}  # share of 10 slices
                robust.append(
                    {
                        "trial_id": trial,
                        "epoch": 1,
                        "split": "report",
                        "model": "trained",
                        "protocol": "",
                        "attack": attack,
                        "budget_ref": 0.0,
                        "fnr": float(np.mean(list(rates.values()))),
                        "volume_fnr": json.dumps(rates),
                    }
                )
    pd.DataFrame(trials).to_parquet(folder / "trials.parquet", index=False)
    pd.DataFrame(robust).to_parquet(folder / "robustness.parquet", index=False)
    return folder


def _load(folder: Path, objective: str):
    from study.report_data import load_results

    res = load_results(folder)  # no study.json: the searched keys are those that vary (epsilon, adversary, arch, seed)
    res.objectives = [("val_nmse", "min"), (objective, "min")]
    return res


def _ids(folder: Path, arch: str, adversary: str) -> list[str]:
    trials = pd.read_parquet(folder / "trials.parquet")
    mine = trials[(trials["arch"] == arch) & (trials["adversary"] == adversary)].sort_values("seed")
    return list(mine["trial_id"])


def _degradation(robust: pd.DataFrame, trials: list[str], attack: str) -> np.ndarray:
    return _table(robust, trials, "trained", attack, 5000.0) - _table(robust, trials, "trained", "clean", 0.0)


def test_a_kspace_objective_measures_the_degradation_under_kspace_pgd(tmp_path):
    from study.report_data import reference_attack, reference_budget
    from study.report_findings import findings
    from study.report_seeds import configuration_tables, configurations_markdown

    folder = _synthetic_study(tmp_path / "architectures")
    robust = pd.read_parquet(folder / "robustness.parquet")
    res = _load(folder, "rob_pgd_kspace_e5000_nmse")
    assert reference_attack(res) == ("pgd_kspace", 5000.0) and reference_budget(res) == 5000.0
    tables = configuration_tables(res)
    assert tables.attack == "pgd_kspace" and tables.budget == 5000.0
    table = tables.table.set_index("configuration")
    unrolled = "ε=0, adversary=none, arch=unrolled"
    assert list(table.index) == [
        "ε=0, adversary=none, arch=unet",
        unrolled,
        "ε=1000, adversary=pgd, arch=unet",
        "ε=1000, adversary=pgd, arch=unrolled",
    ]
    assert "PGD-k@5000 dNMSE" in table and "PGD@5000 dNMSE" not in table
    mean, half, _ = _expected(_degradation(robust, _ids(folder, "unrolled", "none"), "pgd_kspace"))
    assert table.loc[unrolled, "PGD-k@5000 dNMSE"] == pytest.approx(mean, rel=1e-9)
    assert table.loc[unrolled, "PGD-k@5000 dNMSE ±"] == pytest.approx(half, rel=1e-6)
    image, _, _ = _expected(_degradation(robust, _ids(folder, "unrolled", "none"), "pgd"))
    assert image != pytest.approx(mean, rel=1e-3)  # the image PGD rows (a decoy here) are not what is read

    markdown = "\n".join(configurations_markdown(tables))
    assert "| PGD-k@5000 dNMSE |" in markdown and "Δ PGD-k@5000 dNMSE" in markdown
    assert "PGD-k: k-space PGD, the attack the objectives name" in markdown
    lines = findings(res)
    assert len(lines) == 3 and "under k-space PGD@5000" in lines[1] and "k-space PGD@5000 degradation" in lines[2]
    # Table 1 holds the same attack: k-space PGD's columns, the objectives' (issue 22), not the image decoy's
    from study.report_tables import table1, table1_markdown

    t1 = table1(res)
    first = _ids(folder, "unrolled", "none")[0]
    mine = robust[(robust["trial_id"] == first) & (robust["model"] == "trained")].set_index(["attack", "budget_ref"])
    row = t1[(t1["trial_id"] == first) & (t1["split"] == "Report")].iloc[0]
    assert "PGD@5000 NMSE" not in t1 and row["PGD-k@5000 NMSE"] == mine.loc[("pgd_kspace", 5000.0), "nmse"]
    assert "| PGD-k@5000 NMSE |" in table1_markdown(res, t1)

    # the same study judged by its image-PGD objective reads the image rows, under the usual names
    res = _load(folder, "rob_pgd_e5000_nmse")
    tables = configuration_tables(res)
    assert reference_attack(res) == ("pgd", 5000.0) and "PGD@5000 dNMSE" in tables.table
    assert "Δ PGD dNMSE" in tables.versus and "Δ PGD-k dNMSE" not in tables.versus
    row = tables.table.set_index("configuration").loc[unrolled]
    assert row["PGD@5000 dNMSE"] == pytest.approx(image, rel=1e-9)
    assert "PGD@5000 NMSE" in table1(res) and "PGD-k@5000 NMSE" not in table1(res)


def test_with_two_standard_configurations_the_first_is_the_reference(tmp_path):
    from study.report_seeds import configuration_tables, configurations_markdown

    folder = _synthetic_study(tmp_path / "architectures")
    robust = pd.read_parquet(folder / "robustness.parquet")
    tables = configuration_tables(_load(folder, "rob_pgd_kspace_e5000_nmse"))
    reference = "ε=0, adversary=none, arch=unet"
    assert tables.reference == reference
    assert tables.standard == [reference, "ε=0, adversary=none, arch=unrolled"]
    versus = tables.versus.set_index("configuration")
    assert list(versus.index) == [
        "ε=0, adversary=none, arch=unrolled",
        "ε=1000, adversary=pgd, arch=unet",
        "ε=1000, adversary=pgd, arch=unrolled",
    ]
    assert (versus["seeds"] == 3).all()
    unet = _ids(folder, "unet", "none")
    for arch, adversary in (("unrolled", "none"), ("unrolled", "pgd"), ("unet", "pgd")):
        mine = _ids(folder, arch, adversary)
        label = f"ε={0 if adversary == 'none' else 1000}, adversary={adversary}, arch={arch}"
        paired = _degradation(robust, mine, "pgd_kspace") - _degradation(robust, unet, "pgd_kspace")
        mean, half, df = _expected(paired)  # paired by seed (rows) and volume (columns)
        assert versus.loc[label, "Δ PGD-k dNMSE"] == pytest.approx(mean, rel=1e-9, abs=1e-12)
        assert versus.loc[label, "Δ PGD-k dNMSE ±"] == pytest.approx(half, rel=1e-6)
        assert versus.loc[label, "Δ PGD-k dNMSE df"] == pytest.approx(df)
        theirs = _degradation(robust, unet, "pgd_kspace")
        own = theirs.mean()
        assert versus.loc[label, "Δ PGD-k dNMSE %"] == pytest.approx(100 * mean / own, rel=1e-9)
        # its interval: the ratio of means linearised, mine - R * theirs, over seeds and volumes, / own
        ratio = _degradation(robust, mine, "pgd_kspace").mean() / own
        _, half_r, _ = _expected(_degradation(robust, mine, "pgd_kspace") - ratio * theirs)
        assert versus.loc[label, "Δ PGD-k dNMSE % ±"] == pytest.approx(100 * half_r / own, rel=1e-6)
        clean = _table(robust, mine, "trained", "clean", 0.0) - _table(robust, unet, "trained", "clean", 0.0)
        assert versus.loc[label, "ΔNMSE"] == pytest.approx(_expected(clean)[0], rel=1e-9, abs=1e-12)
    markdown = "\n".join(configurations_markdown(tables))
    assert f"## Against {reference} (held-out split, paired by seed and volume)" in markdown
    assert f"{reference} is the reference: the first of the 2 configurations trained with ε = 0" in markdown

    # one standard configuration: it is the reference and the caption says nothing more
    one = configuration_tables(_load(_synthetic_study(tmp_path / "one", ARCHITECTURES[1:]), "rob_pgd_e5000_nmse"))
    assert one.reference == "ε=0, adversary=none, arch=unrolled" and len(one.versus) == 2
    assert "is the reference: the first of" not in "\n".join(configurations_markdown(one))


def test_the_pareto_figure_and_the_summary_name_the_kspace_attack(tmp_path):
    from study.report_plots import pareto_points
    from study.report_summary import summary_markdown
    from study.report_tables import table1

    folder = _synthetic_study(tmp_path / "architectures")
    robust = pd.read_parquet(folder / "robustness.parquet")
    res = _load(folder, "rob_pgd_kspace_e5000_nmse")
    points = pareto_points(res, table1(res))
    assert points.y_metric == "PGD-k@5000 NMSE" and "under k-space PGD" in points.y_label
    rows = robust[(robust["model"] == "trained") & (robust["attack"] == "pgd_kspace") & (robust["budget_ref"] == 5000)]
    expected = rows.set_index("trial_id").loc[points.trial_ids]
    assert points.values[:, 1] == pytest.approx(expected["nmse"].to_numpy())
    assert points.errors[:, 1] == pytest.approx(expected["nmse_se"].to_numpy())
    summary = summary_markdown(res, [], points)
    assert "| PGD-k@5000 NMSE |" in summary and "report PGD-k@5000 NMSE" in summary
    assert "Pareto front of held-out clean NMSE vs PGD-k@5000 NMSE" in summary
    image = _load(folder, "rob_pgd_e5000_nmse")
    assert pareto_points(image, table1(image)).y_metric == "PGD@5000 NMSE"
    assert "| PGD@5000 NMSE |" in summary_markdown(image, [], None)


def test_feature_fnrs_are_compared_with_the_standard_configuration_paired_by_seed_and_volume(tmp_path):
    from study.report_held_out import _fnr_notes

    folder = _synthetic_study(tmp_path / "features", features=True)
    robust = pd.read_parquet(folder / "robustness.parquet")
    notes = "\n".join(_fnr_notes(_load(folder, "rob_pgd_e5000_nmse")))
    reference = "ε=0, adversary=none, arch=unet"
    assert f"Feature FNR minus the standard configuration's ({reference}), paired by training seed and volume" in notes

    def rates(trials, attack):  # (seeds, volumes), written out from the rows
        rows = robust[robust["attack"] == attack].set_index("trial_id")
        return np.array([[json.loads(rows.loc[t, "volume_fnr"])[v] for v in VOLUMES] for t in trials])

    unet = _ids(folder, "unet", "none")
    for arch, adversary, eps in ARCHITECTURES[1:]:
        mine = _ids(folder, arch, adversary)
        cells = []
        for attack in ("feature_random", "feature_worst"):
            mean, half, _ = _expected(rates(mine, attack) - rates(unet, attack))
            cells.append(f"{attack.removeprefix('feature_')} {mean:+.2f} ± {half:.2f}")
        label = f"ε={eps:g}, adversary={adversary}, arch={arch}"
        assert f"- {label} (3 seeds): " + "; ".join(cells) in notes
