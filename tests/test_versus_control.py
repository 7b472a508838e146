"""benchmarks/versus_control.py against the pairing written out by hand on two made-up studies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

REPO = Path(__file__).resolve().parent.parent


def _study(folder: Path, trials: dict[str, tuple[list[float], list[float], float]]) -> None:
    folder.mkdir()
    rows = []
    for trial, (clean, attacked, psnr) in trials.items():
        vols = [f"file{i}.h5" for i in range(len(clean))]
        for attack, budget, values in (("clean", 0.0, clean), ("pgd", 5000.0, attacked)):
            rows.append(
                {
                    "trial_id": trial,
                    "split": "report",
                    "model": "trained",
                    "attack": attack,
                    "budget_ref": budget,
                    "volume_nmse": json.dumps(dict(zip(vols, values))),
                    "psnr": psnr,
                }
            )
    pd.DataFrame(rows).to_parquet(folder / "robustness.parquet")
    names = [{"trial_id": t, "epoch": 1, "adversary": "trades", "epsilon_ref": 100.0} for t in trials]
    pd.DataFrame(names).to_parquet(folder / "trials.parquet")


def test_each_trial_against_the_control_per_volume(tmp_path):
    ctrl_clean, ctrl_attacked = [0.02, 0.03, 0.04, 0.05], [0.30, 0.35, 0.33, 0.40]
    mine_clean, mine_attacked = [0.025, 0.032, 0.047, 0.052], [0.22, 0.30, 0.25, 0.31]
    _study(tmp_path / "a", {"t1": (mine_clean, mine_attacked, 25.0)})
    _study(tmp_path / "c", {"ctrl": (ctrl_clean, ctrl_attacked, 26.0)})
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "versus_control.py"), str(tmp_path / "a"), str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    a, b = np.subtract(mine_attacked, mine_clean), np.subtract(ctrl_attacked, ctrl_clean)
    r = a.mean() / b.mean()  # the ratio of means; its interval by linearisation, written out
    half = stats.t.ppf(0.975, 3) * np.std(a - r * b, ddof=1) / 2 / b.mean()
    d = np.subtract(mine_clean, ctrl_clean)
    assert f"PGD dNMSE {a.mean():+.4f} ({100 * (r - 1):+.1f} ± {100 * half:.1f} %)" in out
    assert f"({d.mean():+.4f} ± {stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2:.4f})" in out
    assert "PSNR 25.00 (-1.00 dB)" in out and "epsilon_ref=100" in out


def test_a_control_with_other_than_one_trial_is_refused(tmp_path):
    _study(tmp_path / "a", {"t1": ([0.1], [0.2], 20.0)})
    _study(tmp_path / "c", {"x": ([0.1], [0.2], 20.0), "y": ([0.1], [0.2], 20.0)})
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "versus_control.py"), str(tmp_path / "a"), str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "expected one trial" in out.stderr
