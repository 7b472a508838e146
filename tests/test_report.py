"""The study report (study/report.py) on a real smoke study: epsilon in {0, 5000}, 2 epochs.

Table 1 is checked against an independent reading of the Parquet tables; partial and broken
studies (errored trials, lost checkpoints, no results yet, older tables) must still give a report
with a note, and a folder that is no study must give exit status 2.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from study import layout, report

REPO = Path(__file__).resolve().parent.parent
PNGS = ("figure6.png", "robustness.png", "pareto.png", "curves.png", "protocol_curves.png")
slow = pytest.mark.slow  # these use a Ray study (module fixture)


def run_report(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "study" / "report.py"), str(folder)], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A finished two-trial study: standard training and adversarial training at epsilon = 5000."""
    work = tmp_path_factory.mktemp("report")
    space = work / "pair.yaml"
    space.write_text(
        "description: standard vs adversarial\nparameters:\n  epsilon: {grid: [0, 5000]}\n"
        "fixed: {report_protocol: l2-kspace-curve}\n"
        "objectives:\n  - {metric: val_nmse, mode: min}\n  - {metric: rob_pgd_e5000_nmse, mode: min}\n"
        "attack_budgets: [1000, 5000]\n"
    )
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "study" / "run.py"),
            "--space",
            str(space),
            "--profile",
            "smoke",
            "--results",
            str(work / "results"),
            "--no-report",
        ],
        capture_output=True,
        text=True,
        cwd=work,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return work / "results" / "pair"


@pytest.fixture(scope="module")
def written(study) -> tuple[Path, int, str]:
    """The report of the intact study, through main(): (report folder, exit status, stdout)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = report.main([str(study)])
    return study / "report", status, stdout.getvalue()


def copy_study(study: Path, dest: Path) -> Path:
    """A copy of the study folder (its trial folders hold only small checkpoints)."""
    target = dest / study.name
    shutil.copytree(study, target, ignore=shutil.ignore_patterns("report"))
    # best.pt configs point at the data folder, which stays where it is: figure 6 still works
    return target


def png_shape(path: Path) -> tuple[int, ...]:
    import matplotlib.image

    return matplotlib.image.imread(path).shape


def best_rows(trials: pd.DataFrame) -> pd.DataFrame:
    """Independently of study.analysis: per trial the row with the lowest val_loss."""
    rows = [g.loc[g["val_loss"].astype(float).idxmin()] for _, g in trials[trials["epoch"] > 0].groupby("trial_id")]
    return pd.DataFrame(rows).set_index("trial_id")


def test_trial_folder_matches_the_whole_trial_id(tmp_path):
    """Tune names a trial's folder <trainable>_<trial id>_<n>_<values>_<date>; the runner's summary
    and the report find a trial's folder and best.pt by its whole id (study.layout)."""
    first = tmp_path / "train_trial_058de77b_1_epsilon=0_2026-11-24_14-24-33"
    other = tmp_path / "train_trial_058de77c_2_epsilon=1000_2026-11-24_14-24-36"
    first.mkdir()
    other.mkdir()
    (other / "best.pt").write_bytes(b"")
    assert layout.trial_folder(tmp_path, "058de77b") == first
    assert layout.trial_folder(tmp_path, "058de77") is None  # a piece of an id is no trial's id
    assert layout.best_checkpoint(tmp_path, "058de77b") is None  # its folder has no best.pt
    assert layout.best_checkpoint(tmp_path, "058de77c") == other / "best.pt"
    assert layout.trial_folder(tmp_path / "gone", "058de77b") is None


def test_import_is_light():
    heavy = ("torch", "ray", "matplotlib.pyplot")
    code = f"import sys, study.report; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_study_modules_import_one_another_without_a_cycle():
    """No module of study/ imports (directly or through others, at its top or inside a function) a
    module that imports it back: the report's parts and the figures import loading and plotting
    pieces, never the report's entry point."""
    import ast

    graph = {}
    for path in (REPO / "study").glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "study":
                names |= {f"study.{a.name}" for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("study."):
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names if a.name.startswith("study.")}
        graph[f"study.{path.stem}"] = names

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for name in graph.get(start, ()):
            if name == goal or (name not in seen and not seen.add(name) and reaches(name, goal, seen)):
                return True
        return False

    assert graph["study.figure6"] and "study.report" not in graph["study.figure6"]
    assert [m for m in sorted(graph) if reaches(m, m, set())] == []


@slow
def test_report_files_exist_and_images_are_valid(written):
    folder, status, stdout = written
    assert status == 0 and f"report: {folder}" in stdout
    for name in report.REPORT_FILES:
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, name
    for name in PNGS:
        shape = png_shape(folder / name)
        assert len(shape) >= 2 and shape[0] > 100 and shape[1] > 100, (name, shape)
        assert (folder / name).stat().st_size < 1_000_000, name


@slow
def test_table1_numbers_are_the_parquet_rows(study, written):
    folder, _, _ = written
    table = pd.read_csv(folder / "table1.csv", keep_default_na=False, na_values=[""])
    trials = pd.read_parquet(study / "trials.parquet")
    robust = pd.read_parquet(study / "robustness.parquet")
    best = best_rows(trials)
    held = robust[robust["split"] == "report"]
    # the zero-filled input first, then per trial (standard first, as in the seed's table) three rows
    assert table["trial_id"].isna().iloc[0] and table["model"].iloc[0] == "zero-filled input"
    rows = table.iloc[1:]
    assert list(rows["trial_id"]) == [t for t in best.sort_values("epsilon_ref").index for _ in range(3)]
    assert list(rows["epsilon_ref"]) == [0] * 3 + [5000] * 3
    assert list(rows["split"]) == ["Training", "Selection", "Report"] * 2
    assert sorted(held.loc[held["attack"] == "pgd", "budget_ref"].unique()) == [1000.0, 5000.0]
    for _, row in table.iterrows():
        if row["split"] in ("Training", "Selection"):
            b = best.loc[row["trial_id"]]
            prefix = "train" if row["split"] == "Training" else "val"
            assert row["best_epoch"] == b["epoch"]
            assert math.isclose(
                row["epsilon_rms"], math.sqrt(5000 / 320**2) if row["epsilon_ref"] else 0.0, rel_tol=1e-6
            )
            for metric in ("nmse", "psnr", "ssim"):
                assert math.isclose(row[metric.upper()], b[f"{prefix}_{metric}"], rel_tol=1e-9), (prefix, metric)
                assert math.isclose(row[f"{metric.upper()} (seed def.)"], b[f"{prefix}_seed_{metric}"], rel_tol=1e-9)
                assert np.isnan(row[f"PGD@5000 {metric.upper()}"])  # attacks: held-out rows only
            continue
        # Report rows: the best epoch's held-out evaluation (the zero-filled input's for its row)
        if isinstance(row["trial_id"], str):
            mine = held[(held["trial_id"] == row["trial_id"]) & (held["model"] == "trained")]
            assert set(mine["eval_epoch"]) == {best.loc[row["trial_id"], "epoch"]}
        else:
            mine = held[held["model"] == "zero_filled"]
            mine = mine[mine["trial_id"] == mine["trial_id"].iloc[0]]
        clean = mine[mine["attack"] == "clean"].iloc[0]
        for metric in ("nmse", "psnr", "ssim"):
            assert math.isclose(row[metric.upper()], clean[metric], rel_tol=1e-9)
            for budget in (1000.0, 5000.0):
                r = mine[(mine["attack"] == "pgd") & (mine["budget_ref"] == budget)]
                assert len(r) == 1
                attacked = row[f"PGD@{budget:g} {metric.upper()}"]
                assert math.isclose(attacked, r.iloc[0][metric], rel_tol=1e-9)
                assert math.isclose(
                    row[f"PGD@{budget:g} d{metric.upper()}"], attacked - clean[metric], rel_tol=1e-6, abs_tol=1e-9
                )
        assert row["PGD@5000 NMSE"] > row["NMSE"]  # the worst case is worse than clean
        # the paired standard error of the degradation, recomputed from the per-volume NMSEs
        r = mine[(mine["attack"] == "pgd") & (mine["budget_ref"] == 5000.0)].iloc[0]
        after, before = json.loads(r["volume_nmse"]), json.loads(clean["volume_nmse"])
        diffs = np.array([after[v] - before[v] for v in before])
        assert len(diffs) == row["volumes"] and diffs.mean() == pytest.approx(row["PGD@5000 dNMSE"], rel=1e-6)
        expected_se = diffs.std(ddof=1) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
        assert row["PGD@5000 dNMSE SE"] == pytest.approx(expected_se, rel=1e-6, nan_ok=True)
    # the held-out volumes are none of the selection volumes
    sel = robust[(robust["split"] == "selection")]
    assert set(sel["volume_nmse"].unique()) == {""}  # per-volume values are kept for held-out rows only
    report_volumes = set(json.loads(held.iloc[0]["volume_nmse"]))
    assert report_volumes and all(v.endswith(".h5") for v in report_volumes)


@slow
def test_protocol_table_shows_the_relative_grid_of_every_model(study, written):
    """The space's report_protocol (l2-kspace-curve: 5 relative k-space budgets) gives one held-out
    table with the zero-filled input and both trials at every budget, the numbers those of the Parquet
    rows; protocol_curves.png draws them."""
    import math as m

    from mriadv.protocols import get_protocol

    folder, _, _ = written
    grid = get_protocol("l2-kspace-curve").rel_budgets
    assert grid == pytest.approx([m.sqrt(0.006 * i) for i in range(1, 6)], rel=1e-5)
    robust = pd.read_parquet(study / "robustness.parquet")
    rows = robust[(robust["protocol"] == "l2-kspace-curve") & (robust["attack"] == "pgd_kspace")]
    trained = rows[rows["model"] == "trained"]
    assert sorted(trained["trial_id"].unique()) == sorted(best_rows(pd.read_parquet(study / "trials.parquet")).index)
    for _, mine in trained.groupby("trial_id"):
        assert sorted(mine["rel"]) == pytest.approx(sorted(grid))
        assert (mine.sort_values("rel")["nmse"].diff().dropna() > -1e-3).all()  # a larger ball finds no less
    md = (folder / "summary.md").read_text() + (folder / "table1.md").read_text()
    assert "## Protocol `l2-kspace-curve` (held-out split)" in md
    section = md.split("## Protocol `l2-kspace-curve`")[1].split("\n## ")[0]
    header = next(ln for ln in section.splitlines() if "@ rel" in ln)
    assert header.count("@ rel") == len(grid)  # each budget once (the zero-filled input is evaluated per trial)
    lines = [ln for ln in section.splitlines() if ln.startswith("| ") and "@ rel" not in ln and "---" not in ln]
    assert lines[0].startswith("| zero-filled input") and len(lines) == 3
    assert all(ln.count(" | ") == len(grid) for ln in lines)
    first = trained.sort_values("rel").iloc[0]
    assert f"{first['nmse']:.4f}" in section
    assert png_shape(folder / "protocol_curves.png")[0] > 100


@slow
def test_table1_markdown_has_the_seed_layout(written):
    folder, _, _ = written
    text = (folder / "table1.md").read_text()
    table = pd.read_csv(folder / "table1.csv", keep_default_na=False, na_values=[""])
    for process in ("Report-S", "Report-A", "Zero-filled", "Training-S", "Validation-S", "Training-A", "Validation-A"):
        assert f"| {process} |" in text
    assert "report split" in text and "nothing was selected on them" in text
    assert "NMSE (seed def.)" in text and "prediction and reference swapped" in text and "fastMRI" in text
    assert "PGD@1000 NMSE" in text and "PGD@5000 SSIM" in text
    rep = table[(table["split"] == "Report") & (table["epsilon_ref"] == 5000)].iloc[0]
    assert f"{rep['NMSE']:.4f}" in text and f"({rep['PGD@5000 dNMSE']:+.4f}" in text


@slow
def test_summary_names_the_best_trial_and_its_checkpoint(study, written):
    folder, _, _ = written
    text = (folder / "summary.md").read_text()
    best = best_rows(pd.read_parquet(study / "trials.parquet"))
    winner = best["val_nmse"].astype(float).idxmin()
    checkpoint = next(p for p in study.iterdir() if p.is_dir() and f"_{winner}_" in p.name) / "best.pt"
    assert checkpoint.is_file()
    line = next(ln for ln in text.splitlines() if ln.startswith("| val_nmse (min) |"))
    assert f"| {winner}" in line and f"`{checkpoint.relative_to(study)}`" in line  # relative to the study folder
    assert "profile: smoke" in text and "trials: 2 (2 TERMINATED)" in text
    for name in ("table1.md", "figure6.png", "robustness.png", "pareto.png", "curves.png"):
        assert f"]({name})" in text


@slow
def test_every_report_surface_marks_a_model_that_does_not_beat_its_input(study, written):
    """trials.parquet carries each trial's held-out verdict; Table 1 and summary.md mark the models that
    do not beat their zero-filled input, and warn when none does (the smoke models train 2 x 3 steps)."""
    folder, _, _ = written
    trials = pd.read_parquet(study / "trials.parquet")
    last = trials.sort_values("epoch").groupby("trial_id").last()
    assert {"report_vs_input", "report_vs_input_ratio", "report_vs_input_ratio_se", "report_beats_input"} <= set(trials)
    for trial_id, row in last.iterrows():  # the ratio is the held-out clean NMSE over the input's, per trial
        assert row["report_vs_input_ratio"] == pytest.approx(row["report_nmse"] / row["zf_report_nmse"], rel=1e-9)
        assert row["report_beats_input"] == float(row["report_vs_input"] == "beats")
    table = pd.read_csv(folder / "table1.csv", keep_default_na=False, na_values=[""])
    rep = table[(table["split"] == "Report") & (table["model"] != "zero-filled input")]
    assert sorted(rep["vs input"]) == sorted(last["report_vs_input"])
    md, summary = (folder / "table1.md").read_text(), (folder / "summary.md").read_text()
    behind = int((last["report_vs_input"] != "beats").sum())
    worse = int((last["report_vs_input"] == "worse").sum())
    assert sum("**worse than its input**" in ln for ln in md.splitlines() if ln.startswith("| ")) == worse
    assert (f"{behind} of 2 models do not beat their own zero-filled input" in summary) == (behind > 0)
    assert ("WARNING: no model of this study beats" in summary) == (behind == 2)


def test_not_a_study_folder_exits_2(tmp_path):
    missing = run_report(tmp_path / "nope")
    assert missing.returncode == 2 and "no such folder" in missing.stderr
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert not (tmp_path / "empty" / "report").exists()


@slow
def test_study_without_results_gives_a_note(study, tmp_path):
    folder = tmp_path / "fresh"
    folder.mkdir()
    shutil.copy2(study / "study.json", folder / "study.json")  # started, nothing reported yet
    assert report.main([str(folder)]) == 0
    text = (folder / "report" / "summary.md").read_text()
    assert "no trial has reported a result yet" in text and "No trial has a finished epoch yet" in text
    assert (folder / "report" / "table1.md").is_file()
    assert not (folder / "report" / "figure6.png").exists()


@slow
def test_errored_trial_and_missing_checkpoint(study, tmp_path, capsys):
    folder = copy_study(study, tmp_path)
    trials = pd.read_parquet(folder / "trials.parquet")
    standard = trials.loc[trials["epsilon"] == 0, "trial_id"].iloc[0]
    adversarial = trials.loc[trials["epsilon"] > 0, "trial_id"].iloc[0]
    # the adversarial trial failed after its epochs (results.py marks every row), a third failed at once
    trials.loc[trials["trial_id"] == adversarial, ["status", "message"]] = ["ERROR", "RuntimeError: disk on fire"]
    failed = pd.DataFrame(
        [
            {
                "trial_id": "deadbeef",
                "epoch": 0,
                "status": "ERROR",
                "epsilon": 1000.0,
                "message": "ValueError: crop size 96 too large",
            }
        ]
    )
    pd.concat([trials, failed], ignore_index=True).to_parquet(folder / "trials.parquet", index=False)
    lost = next(p for p in folder.iterdir() if p.is_dir() and f"_{standard}_" in p.name) / "best.pt"
    lost.unlink()

    out = report.write_report(folder)
    stdout = capsys.readouterr().out
    summary = (out / "summary.md").read_text()
    for text in (summary, stdout):
        assert f"trial {adversarial}" in text and "disk on fire" in text
        assert "trial deadbeef (ε=1000) failed" in text and "crop size 96 too large" in text
        assert f"trial {standard} (ε=0) has no best.pt" in text
    assert "1 TERMINATED, 2 ERROR" in summary
    assert "no standard" not in summary  # the standard trial exists, only its checkpoint is lost
    trial_rows = [ln for ln in summary.splitlines() if ln.startswith(f"| {standard} |")]
    assert trial_rows and "| missing |" in trial_rows[0]
    table = pd.read_csv(out / "table1.csv")
    assert set(table["trial_id"].dropna()) == {standard, adversarial}  # the errored trial's epochs still count
    for name in PNGS:  # figure 6 draws the adversarial row without the standard model's columns
        assert png_shape(out / name)[0] > 100, name


@slow
def test_one_sided_studies_and_old_tables(study, tmp_path):
    """Only standard training (figure 6 says so), an older table without train_seed_* columns, and a
    trial still running."""
    folder = copy_study(study, tmp_path)
    trials = pd.read_parquet(folder / "trials.parquet")
    trials = trials[trials["epsilon"] == 0].drop(columns=["train_seed_nmse", "train_seed_psnr", "train_seed_ssim"])
    trials["status"] = "RUNNING"
    trials.to_parquet(folder / "trials.parquet", index=False)
    assert report.main([str(folder)]) == 0
    summary = (folder / "report" / "summary.md").read_text()
    assert "no adversarially trained (ε > 0) trial" in summary
    assert "still RUNNING" in summary and "no train_seed_* columns" in summary
    table = pd.read_csv(folder / "report" / "table1.csv")
    assert len(table) == 4 and table.loc[table["split"] == "Training", "NMSE (seed def.)"].isna().all()
    assert table.loc[table["split"] == "Selection", "NMSE (seed def.)"].notna().all()
    assert png_shape(folder / "report" / "figure6.png")[0] > 100


def fake_study(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A study folder written by hand (no Ray): two trials of two epochs, the second failed with a
    message naming a file of its trial folder; its data under ``results/.data`` as the runner keeps
    it. Returns the folder and each trial's folder name."""
    results = tmp_path / "results"
    folder, data = results / "fake", results / ".data" / "synthetic_64px"
    data.mkdir(parents=True)
    folder.mkdir()
    space = (
        "parameters:\n  epsilon: {grid: [0, 5000]}\nobjectives:\n  - {metric: val_nmse, mode: min}\n"
        "attack_budgets: [1000, 5000]\n"
    )
    state = {
        "space": "fake",
        "space_path": str(REPO / "search_spaces" / "fake.yaml"),
        "space_yaml": space,
        "profile": "smoke",
        "base": {"data": str(data), "crop_size": 64, "max_epochs": 2},
        "created": "2026-01-01 00:00:00",
    }
    (folder / layout.STATE_FILE).write_text(json.dumps(state))
    names = {
        "aaaa1111": "train_trial_aaaa1111_1_epsilon=0_2026-01-01_00-00-00",
        "bbbb2222": "train_trial_bbbb2222_2_epsilon=5000_2026-01-01_00-00-01",
    }
    for name in names.values():
        (folder / name).mkdir()
        (folder / name / "best.pt").write_bytes(b"not a checkpoint")
    broken = folder / names["bbbb2222"] / "checkpoint.pt"
    rows = []
    for trial_id, eps, status, message, nmse in (
        ("aaaa1111", 0.0, "TERMINATED", "", 0.10),
        ("bbbb2222", 5000.0, "ERROR", f"OSError: cannot write {broken}", 0.12),
    ):
        for epoch in (1, 2):
            rows.append(
                {
                    "trial_id": trial_id,
                    "epoch": epoch,
                    "status": status,
                    "epoch_status": "running",
                    "message": message,
                    "epsilon": eps * 64**2 / 320**2,
                    "epsilon_ref": eps,
                    "val_loss": nmse / epoch,
                    "val_nmse": nmse / epoch,
                    "val_psnr": 20.0 + epoch,
                    "val_ssim": 0.5 + epoch / 10,
                }
            )
    pd.DataFrame(rows).to_parquet(folder / layout.TRIALS_FILE, index=False)
    return folder, names


def test_summary_names_files_relative_to_the_study_folder(tmp_path):
    folder, names = fake_study(tmp_path)
    out = report.write_report(folder)
    text = (out / "summary.md").read_text()
    for absolute in {str(tmp_path), str(tmp_path.resolve()), str(REPO)}:
        assert absolute not in text, [ln for ln in text.splitlines() if absolute in ln]
    best = next(ln for ln in text.splitlines() if ln.startswith("| val_nmse (min) |"))
    assert "| aaaa1111" in best and f"`{names['aaaa1111']}/best.pt`" in best
    assert f"`{names['bbbb2222']}/best.pt`" in text  # the trials table
    assert "data: `../.data/synthetic_64px`" in text  # the data folder beside the study, in results/
    assert "space: fake (`search_spaces/fake.yaml`)" in text  # relative to the repository
    assert f"cannot write {names['bbbb2222']}/checkpoint.pt" in text  # notes and messages too


def test_runner_summary_names_files_relative_to_the_current_folder(tmp_path, monkeypatch):
    from study import run_summary
    from study.spaces import load_space

    folder, names = fake_study(tmp_path)
    space_file = tmp_path / "fake.yaml"
    space_file.write_text(json.loads((folder / layout.STATE_FILE).read_text())["space_yaml"])
    monkeypatch.chdir(tmp_path)
    lines = run_summary.summarize(folder, load_space(str(space_file)))
    text = "\n".join(ln for ln in lines if " failed: " not in ln)  # error messages are quoted as they are
    assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text
    assert f"checkpoint results/fake/{names['aaaa1111']}/best.pt" in text
    assert "results: results/fake" in lines and "TensorBoard: tensorboard --logdir results/fake" in lines
    monkeypatch.chdir(tmp_path / "results" / ".data")  # not above the study: paths stay as they are
    assert f"checkpoint {folder / names['aaaa1111'] / 'best.pt'}" in "\n".join(
        run_summary.summarize(folder, load_space(str(space_file)))
    )


@slow
def test_type_3_marks_and_paired_fnr_are_the_stored_per_volume_numbers(study, written):
    """Table 1's * marks a step to more samples whose NMSE did not fall by more than its paired SE, as
    stored per step (d_nmse, d_nmse_se) in robustness.parquet; feature FNRs against the standard model
    are paired by volume from the stored per-volume rates."""
    folder, _, _ = written
    robust = pd.read_parquet(study / "robustness.parquet")
    sampling = robust[(robust["attack"] == "sampling") & (robust["split"] == "report")]
    assert {"d_nmse", "d_nmse_se", "stagnant"} <= set(sampling.columns)
    for _, mine in sampling[sampling["model"] == "trained"].groupby("trial_id"):
        mine = mine.sort_values("acceleration", ascending=False)
        nmse = mine["nmse"].to_numpy()
        assert np.isnan(mine["d_nmse"].iloc[0])
        assert mine["d_nmse"].iloc[1:].to_numpy() == pytest.approx(np.diff(nmse), rel=1e-6, abs=1e-9)
        d, se = mine["d_nmse"].iloc[1:], mine["d_nmse_se"].iloc[1:]
        assert list(mine["stagnant"].iloc[1:]) == [not (x < -s) for x, s in zip(d, se)]
    text = (folder / "table1.md").read_text()
    section = text.split("## Instabilities of types 2 and 3")[1].split("\n## ")[0]
    trials = best_rows(pd.read_parquet(study / "trials.parquet"))
    table_rows = [ln for ln in section.splitlines() if ln.startswith("| ε=")]
    assert len(table_rows) == 2
    for line, (trial_id, row) in zip(table_rows, trials.sort_values("epsilon_ref").iterrows()):
        mine = sampling[(sampling["trial_id"] == trial_id) & (sampling["model"] == "trained")]
        marks = [c.strip().endswith("*") for c in line.strip("|").split("|")[4:]]
        assert marks == list(mine.sort_values("acceleration", ascending=False)["stagnant"]), line
    feats = robust[
        (robust["attack"] == "feature_random") & (robust["split"] == "report") & (robust["model"] == "trained")
    ]
    per = {r.trial_id: json.loads(r.volume_fnr) for r in feats.itertuples()}
    std_id, adv_id = trials.sort_values("epsilon_ref").index
    d = np.array([per[adv_id][v] - per[std_id][v] for v in sorted(per[std_id])])
    assert "paired by training seed and volume" in section
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))  # one seed: over the volumes
    assert f"random {d.mean():+.2f} ± {half:.2f}" in section
