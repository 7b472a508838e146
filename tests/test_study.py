"""End-to-end studies through Ray Tune (subprocesses, smoke profile, 2 CPUs).

These start Ray; each driver is shut down by the runner, and the kill test checks that no Ray
process outlives it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from test_board import hparams_route, session_groups

from study.tables import load_tables

REPO = Path(__file__).resolve().parent.parent
RUN = [sys.executable, str(REPO / "study" / "run.py")]
REQUIRED_COLUMNS = {
    "trial_id",
    "epoch",
    "epsilon",
    "lambda1",
    "lambda2",
    "loss",
    "lr_recon",
    "lr_gen",
    "train_loss",
    "val_nmse",
    "val_psnr",
    "val_ssim",
    "time_s",
    "status",
}

pytestmark = pytest.mark.slow


def run_study(*args, cwd, timeout=600, **kw):
    return subprocess.run([*RUN, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout, **kw)


def processes_in_session(sid: int) -> list[str]:
    """Live (non-zombie) processes whose session id is ``sid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] not in "ZX":
            out.append(f"{entry} {text[text.index('(') + 1 : text.rindex(')')]}")
    return out


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    """The README's main command on the smoke profile: eps_sweep, 6 trials."""
    work = tmp_path_factory.mktemp("study")
    out = run_study("--space", "eps_sweep", "--profile", "smoke", "--results", work / "results", cwd=work)
    return work / "results" / "eps_sweep", out


def test_smoke_study_writes_tables(smoke_study):
    folder, out = smoke_study
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "profile: smoke" in out.stdout and "best by val_nmse" in out.stdout
    assert "across cluster" not in out.stdout + out.stderr  # every trial's lines, none folded by Ray's dedup
    trials = pd.read_parquet(folder / "trials.parquet")
    assert REQUIRED_COLUMNS <= set(trials.columns)
    assert trials["trial_id"].nunique() == 6
    assert not trials.duplicated(["trial_id", "epoch"]).any()
    assert (trials.groupby("trial_id")["epoch"].apply(sorted).apply(list) == [[1, 2]] * 6).all()
    assert set(trials["status"]) == {"TERMINATED"}
    assert sorted(trials.groupby("trial_id")["epsilon_ref"].first()) == [0, 250, 1000, 2500, 5000, 10000]
    robust = pd.read_parquet(folder / "robustness.parquet")
    assert {"trial_id", "epoch", "attack", "budget", "budget_ref", "nmse", "psnr", "ssim", "split", "model"} <= set(
        robust.columns
    )
    standard = trials.loc[trials["epsilon"] == 0, "trial_id"].iloc[0]
    per_epoch = robust[robust["split"] == "selection"]
    assert set(per_epoch.loc[per_epoch["trial_id"] == standard, "attack"]) == {"pgd", "noise"}  # no generator
    assert set(per_epoch["budget_ref"]) == {1000.0, 5000.0}
    # the attacked NMSE in the trials table is the robustness table's number
    row = trials[(trials["trial_id"] == standard) & (trials["epoch"] == 2)].iloc[0]
    rob = per_epoch[
        (per_epoch["trial_id"] == standard)
        & (per_epoch["epoch"] == 2)
        & (per_epoch["attack"] == "pgd")
        & (per_epoch["budget_ref"] == 5000.0)
    ].iloc[0]
    assert row["rob_pgd_e5000_nmse"] == rob["nmse"] and rob["d_nmse"] > 0
    # every trial's last epoch carries the held-out evaluation of its best epoch, and the zero-filled input's
    held = robust[robust["split"] == "report"]
    assert set(held["trial_id"]) == set(trials["trial_id"]) and set(held["model"]) == {"trained", "zero_filled"}
    last = trials[trials["epoch"] == 2].set_index("trial_id")
    for trial_id, rows in held[held["model"] == "trained"].groupby("trial_id"):
        clean = rows[rows["attack"] == "clean"].iloc[0]
        assert clean["nmse"] == last.loc[trial_id, "report_nmse"]
        assert rows["eval_epoch"].iloc[0] == last.loc[trial_id, "best_epoch"]
    # the seed's other instabilities, held out, under their own attack names (trained and zero-filled)
    assert {"feature_random", "feature_worst", "sampling"} <= set(held["attack"])
    sweep = held[(held["attack"] == "sampling") & (held["model"] == "zero_filled")]
    assert sorted(set(sweep["acceleration"])) == [2.0, 3.0, 4.0, 6.0, 8.0]
    assert held.loc[held["attack"] == "feature_random", "fnr"].between(0, 1).all()
    # Optuna and ASHA are told the objective at the best epoch so far, present in every result
    assert trials["best_val_nmse"].notna().all() and trials["best_rob_pgd_e5000_nmse"].notna().all()
    # trials that differ only in epsilon train against different perturbations (the budget binds)
    adv = last[last["epsilon"] > 0]
    assert adv["delta_sq"].nunique() == len(adv) and (adv["delta_sq"] <= 2.0 * adv["epsilon"]).all()


def test_smoke_study_tensorboard(smoke_study):
    """One TensorBoard run per trial (its folder), read with TensorBoard's own backend: the same
    scalar tags everywhere, images, and an HParams table with every trial, its searched value in
    the space's units, its objectives and report-split metrics, and its end status."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    folder, out = smoke_study
    assert out.returncode == 0
    trials = pd.read_parquet(folder / "trials.parquet")
    mux = EventMultiplexer(size_guidance={"images": 0, "scalars": 0}).AddRunsFromDirectory(str(folder)).Reload()
    runs = sorted(mux.Runs())
    assert len(runs) == 6 and all("/" not in r for r in runs)  # no Ray logger runs, no sub-runs
    for trial_id, eps in trials.groupby("trial_id")["epsilon_ref"].first().items():
        assert f"trial_{trial_id}_epsilon={eps:g}" in runs
    tags = {r: set(mux.GetAccumulator(r).Tags()["scalars"]) for r in runs}
    common = set.intersection(*tags.values())
    assert {
        "val/nmse",
        "train/loss",
        "best/val_nmse",
        "best/rob_pgd_e5000_nmse",
        "report/nmse",
        "report/rob_pgd_e5000_nmse",
        "report_zero_filled/nmse",
        "rob/pgd_e5000_nmse",
    } <= common
    assert all("generator" in t for t in set.union(*tags.values()) - common)  # epsilon = 0 has no generator
    assert not any(t.startswith("ray/") for t in set.union(*tags.values()))
    for r in runs:
        acc = mux.GetAccumulator(r)
        assert [e.step for e in acc.Scalars("val/nmse")] == [1, 2] and [e.step for e in acc.Scalars("report/nmse")] == [
            2
        ]
        assert {"images/input", "images/recon", "images/pgd_delta"} <= set(acc.Tags()["images"])

    experiment = hparams_route(folder, "/experiment", {"experimentName": ""})
    hparams = {h["name"]: h for h in experiment["hparamInfos"]}
    assert hparams["epsilon_ref"]["differs"] and not hparams["lambda1"].get("differs")
    assert experiment["hparamInfos"][0]["name"] == "epsilon_ref"  # listed, and ticked, first
    metrics = [m["name"]["tag"] for m in experiment["metricInfos"]]
    assert metrics[:5] == [
        "best/val_nmse",
        "best/rob_pgd_e5000_nmse",
        "report/nmse",
        "report/rob_pgd_e5000_nmse",
        "report/ssim",
    ]  # TensorBoard ticks the first five
    groups = list(session_groups(folder).values())
    assert len(groups) == 6
    assert sorted(g["hparams"]["epsilon_ref"] for g in groups) == [0, 250, 1000, 2500, 5000, 10000]
    last = trials[trials["epoch"] == 2].set_index("epsilon_ref")
    for g in groups:
        (session,) = g["sessions"]
        assert session["status"] == "STATUS_SUCCESS"  # written by the driver when the trial ended
        values = {m["name"]["tag"]: m["value"] for m in session["metricValues"]}
        assert set(values) == set(metrics), set(metrics) - set(values)  # every metric has a value
        row = last.loc[g["hparams"]["epsilon_ref"]]
        assert values["best/val_nmse"] == pytest.approx(row["best_val_nmse"], rel=1e-6)
        assert values["report/rob_pgd_e5000_nmse"] == pytest.approx(row["report_rob_pgd_e5000_nmse"], rel=1e-6)


def test_smoke_study_optuna(smoke_study):
    """optuna.db: named objectives, each trial linked to its Ray trial and folder, with its status
    and per-epoch values (optuna-dashboard's learning curves)."""
    import optuna

    folder, out = smoke_study
    assert out.returncode == 0
    trials = pd.read_parquet(folder / "trials.parquet")
    study = optuna.load_study(study_name="eps_sweep", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert study.metric_names == ["best_val_nmse", "best_rob_pgd_e5000_nmse"]
    assert len(study.trials) == 6 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert sorted(t.user_attrs["ray_trial_id"] for t in study.trials) == sorted(trials["trial_id"].unique())
    for t in study.trials:
        rows = trials[trials["trial_id"] == t.user_attrs["ray_trial_id"]].set_index("epoch")
        assert t.user_attrs["status"] == "TERMINATED"
        assert (folder / t.user_attrs["folder"] / "best.pt").is_file()
        assert t.user_attrs["folder"] == f"trial_{t.user_attrs['ray_trial_id']}_epsilon={t.params['epsilon']}"
        assert t.intermediate_values == {e: pytest.approx(rows.loc[e, "val_nmse"]) for e in (1, 2)}
        assert t.values == [
            pytest.approx(rows.loc[2, "best_val_nmse"]),
            pytest.approx(rows.loc[2, "best_rob_pgd_e5000_nmse"]),
        ]


def test_smoke_study_console(smoke_study):
    """Every epoch line names its trial; Ray's chatter is gone; one table with progress."""
    folder, out = smoke_study
    assert out.returncode == 0
    console = out.stdout + out.stderr
    epoch_lines = [line for line in console.splitlines() if re.search(r"epoch [12]: loss", line)]
    assert len(epoch_lines) == 12
    assert all(re.search(r"\[epsilon=\d+ [0-9a-f]{8}\] epoch [12]: ", line) for line in epoch_lines), epoch_lines
    for noise in (
        "Checkpoint successfully created",
        "Result logdir",
        "Study.stop",
        "Failed to fetch metrics",
        "A new study created",
    ):
        assert noise not in console, noise
    assert re.search(r"== study eps_sweep: 6 trials \(6 TERMINATED\) \| \d+:\d\d:\d\d elapsed, done ==", console)
    assert re.search(r"[0-9a-f]{8} +10000 +TERMINATED +2/2 ", console)
    # each finished trial's held-out verdict against its zero-filled input, and the closing warning
    trials = pd.read_parquet(folder / "trials.parquet")
    verdicts = trials.sort_values("epoch").groupby("trial_id").last()["report_vs_input"]
    table = console[console.rindex("== study eps_sweep") :]
    assert "vs input" in table.splitlines()[1]
    for trial_id, verdict in verdicts.items():
        line = next(ln for ln in table.splitlines() if ln.startswith(trial_id))
        assert re.search({"beats": r"beats \d", "worse": r"WORSE \d", "unclear": r"~input \d"}[verdict], line), line
    warned = out.stdout.strip().splitlines()[-1].startswith("WARNING: no model of this study beats")
    assert warned == all(v != "beats" for v in verdicts)
    # the closing lines, from the report's own tables, just before where the report is
    lines = out.stdout.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("report: "))
    assert lines[at - 3].startswith("found: best clean NMSE ") and lines[at - 2].startswith("found: against ")
    assert lines[at - 1].startswith(("found: within 0.5 dB of ε=0", "found: no configuration is within 0.5 dB"))
    assert all("(chosen on the selection volumes)" in x for x in lines[at - 3 : at - 1])


def test_runner_imports_ray_only_when_it_starts_it():
    """Ray reads RAY_DEDUP_LOGS when it is imported: the runner sets it first, so importing the
    runner must not import Ray."""
    code = "import sys; import study.run; print(any(m.split('.')[0] == 'ray' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_results_that_is_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    for results in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        out = run_study("--space", "eps_sweep", "--profile", "smoke", "--results", results, cwd=tmp_path)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.strip() == f"error: --results {results}: {tmp_path / 'afile'} is a file, not a folder"


def test_missing_or_corrupt_data_fails_before_ray(tmp_path):
    t0 = time.monotonic()
    out = run_study(
        "--space",
        "eps_sweep",
        "--profile",
        "smoke",
        "--data",
        tmp_path / "nope",
        "--results",
        tmp_path / "results",
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "nope" in out.stderr and "no such folder" in out.stderr
    bad = tmp_path / "bad"
    (bad / "singlecoil_train").mkdir(parents=True)
    (bad / "singlecoil_val").mkdir()
    (bad / "singlecoil_train" / "file1.h5").write_bytes(b"\x89HDF\r\n\x1a\n garbage")
    out = run_study(
        "--space", "eps_sweep", "--profile", "smoke", "--data", bad, "--results", tmp_path / "results", cwd=tmp_path
    )
    assert out.returncode == 2
    assert "file1.h5" in out.stderr and "not a readable HDF5" in out.stderr and "singlecoil_val" in out.stderr
    assert "Traceback" not in out.stderr and "ray" not in out.stdout.lower()  # Ray never started
    assert time.monotonic() - t0 < 60


def test_an_erroring_trial_does_not_stop_the_study(tmp_path):
    space = tmp_path / "crops.yaml"
    space.write_text(
        "description: one trial asks for a crop larger than the data\n"
        "parameters:\n  crop_size: {grid: [32, 96]}\nattack_budgets: [1000]\n"
    )
    out = run_study(
        "--space", space, "--profile", "smoke", "--results", tmp_path / "results", "--no-report", cwd=tmp_path
    )
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    trials = pd.read_parquet(tmp_path / "results" / "crops" / "trials.parquet")
    status = trials.groupby("trial_id")["status"].last()
    assert sorted(status) == ["ERROR", "TERMINATED"]
    failed = trials[trials["status"] == "ERROR"].iloc[0]
    assert "crop size 96" in failed["message"] and failed["crop_size"] == 96
    assert "failed: " in out.stdout and "crop size 96" in out.stdout
    # the dashboards say so too: TensorBoard's HParams status and the Optuna trial's
    import optuna

    folder = tmp_path / "results" / "crops"
    ended = {name.split("_")[1]: g["sessions"][0]["status"] for name, g in session_groups(folder).items()}
    assert ended == {
        failed["trial_id"]: "STATUS_FAILURE",
        **{t: "STATUS_SUCCESS" for t in status.index if t != failed["trial_id"]},
    }
    study = optuna.load_study(study_name="crops", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert sorted(t.user_attrs["status"] for t in study.trials) == ["ERROR", "TERMINATED"]


def test_sigkill_and_resume(tmp_path):
    """Kill the driver while one trial is finished and another mid-way; the same command resumes."""
    space = tmp_path / "kill.yaml"
    space.write_text(
        "description: kill test\nparameters:\n  epsilon: {grid: [0, 1000, 5000]}\n"
        "objectives: [{metric: val_nmse, mode: min}]\nattack_budgets: [1000]\n"
    )
    args = [
        "--space",
        space,
        "--profile",
        "smoke",
        "--results",
        tmp_path / "results",
        "--max-epochs",
        6,
        "--max-concurrent",
        1,
        "--no-report",
    ]
    table = tmp_path / "results" / "kill" / "trials.parquet"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(
        [*RUN, *map(str, args)], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    killed_at = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.1)
        try:
            t = load_tables(table.parent)[0]  # the Parquet file and the journal of what came since
        except Exception:  # noqa: BLE001 - not written yet, or mid-rename
            continue
        if t.empty:
            continue
        g = t.groupby("trial_id").agg(epochs=("epoch", "max"), status=("status", "last"))
        mid = g[(g["status"] == "RUNNING") & (g["epochs"] >= 2) & (g["epochs"] < 6)]
        if (g["status"] == "TERMINATED").sum() >= 1 and len(mid) == 1:
            killed_at = mid.iloc[0]["epochs"], mid.index[0]
            os.kill(first.pid, signal.SIGKILL)
            break
    first.wait()
    assert killed_at is not None, (tmp_path / "first.log").read_text()[-3000:]
    epochs_done, interrupted = killed_at

    second = subprocess.Popen(
        [*RUN, *map(str, args)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    stdout, _ = second.communicate(timeout=600)
    (tmp_path / "second.log").write_text(stdout)  # kept by pytest for a post-mortem
    assert second.returncode == 0, stdout[-3000:]
    assert "resuming study 'kill'" in stdout

    t = pd.read_parquet(table)
    assert not t.duplicated(["trial_id", "epoch"]).any()
    assert t["trial_id"].nunique() == 3
    for trial_id, rows in t.groupby("trial_id"):
        assert sorted(rows["epoch"]) == list(range(1, 7)), trial_id  # every trial completed once, nothing lost
        assert set(rows["status"]) == {"TERMINATED"}
    resumed = t[t["trial_id"] == interrupted].sort_values("epoch")
    # epochs after the kill ran in a process that started from the checkpoint, not from epoch 0
    after = resumed[resumed["epoch"] > epochs_done]
    assert (after["start_epoch"] >= epochs_done).all() and (after["start_epoch"] > 0).all()
    assert set(pd.read_parquet(table.parent / "robustness.parquet").groupby("trial_id")["epoch"].max()) == {6}
    # Optuna's database went on from the restored searcher: each trial told once, nothing left running
    import optuna

    study = optuna.load_study(study_name="kill", storage=f"sqlite:///{table.parent / 'optuna.db'}")
    assert sorted(t.user_attrs["ray_trial_id"] for t in study.trials) == sorted(t["trial_id"].unique())
    assert {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE}
    assert {t.user_attrs["status"] for t in study.trials} == {"TERMINATED"}
    assert sorted(t.params["epsilon"] for t in study.trials) == [0, 1000, 5000]
    last = t.sort_values("epoch").groupby("trial_id").last()  # what the tables say each trial ended at
    told = {tr.user_attrs["ray_trial_id"]: tr.values[0] for tr in study.trials}
    assert told == pytest.approx(last["best_val_nmse"].to_dict(), rel=0, abs=0)
    time.sleep(1.0)
    assert processes_in_session(first.pid) == []
    assert processes_in_session(second.pid) == []
