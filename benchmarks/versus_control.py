"""Every finished trial of one study against the one trial of another, paired per held-out volume.

Made for the ``frontier`` reproduction (issue 22): its fine-tuned trials start from the reference's
``best.pt`` and run the whole schedule again, so against the reference they hold twice its training.
The fair baseline for them is the standard model fine-tuned the same way without a perturbation, a
one-point study of its own::

    python study/run.py --space CONTROL.yaml --name frontier_control   # adversary none, init_from: <best.pt>
    python benchmarks/versus_control.py results/frontier results/frontier_control

For each finished trial of the first study: its held-out clean NMSE and PSNR, and its NMSE increase
under PGD at ``--budget`` (320² units), each against the control's on the same volumes (the two studies
must share data, split and seed): the clean NMSE difference with its 95 % t-interval over volumes, the
degradation's change as a ratio of means with the ratio's linearised interval
(:func:`mriadv.intervals.ratio_interval`), and the PSNR difference (per run: no interval with one seed).
Sorted by the degradation. Reads only the studies' Parquet tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mriadv.intervals import interval, ratio_interval  # noqa: E402


def held_out(folder: Path, budget: float) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """trial id -> (clean NMSE per volume, PGD NMSE increase per volume, clean PSNR), volumes sorted by
    name, from the trial's last held-out (report split) evaluation."""
    rows = pd.read_parquet(folder / "robustness.parquet")
    rows = rows[(rows["split"] == "report") & (rows["model"] == "trained")]
    out = {}
    for trial, mine in rows.groupby("trial_id"):
        clean = mine[mine["attack"] == "clean"]
        pgd = mine[(mine["attack"] == "pgd") & (mine["budget_ref"] == budget)]
        if clean.empty or pgd.empty:
            continue
        c, a = json.loads(clean.iloc[-1]["volume_nmse"]), json.loads(pgd.iloc[-1]["volume_nmse"])
        volumes = sorted(c)
        out[str(trial)] = (
            np.array([c[v] for v in volumes]),
            np.array([a[v] - c[v] for v in volumes]),
            float(clean.iloc[-1]["psnr"]),
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study", type=Path, help="the study whose trials are compared")
    p.add_argument("control", type=Path, help="a study of one trial, the control")
    p.add_argument("--budget", type=float, default=5000.0, help="the PGD budget, 320² units (default 5000)")
    args = p.parse_args(argv)
    trials, control = held_out(args.study, args.budget), held_out(args.control, args.budget)
    if len(control) != 1:
        p.error(
            f"{args.control}: expected one trial with a held-out PGD@{args.budget:g} evaluation, found {len(control)}"
        )
    (ref_clean, ref_worse, ref_psnr), *_ = control.values()
    names = pd.read_parquet(args.study / "trials.parquet").groupby("trial_id").last()
    print(
        f"control: clean NMSE {ref_clean.mean():.4f}, PGD@{args.budget:g} dNMSE {ref_worse.mean():+.4f}, PSNR {ref_psnr:.2f}"
    )
    for trial, (clean, worse, psnr) in sorted(trials.items(), key=lambda kv: kv[1][1].mean()):
        if clean.shape != ref_clean.shape:
            print(f"{trial}: other volumes than the control's; left out")
            continue
        row = names.loc[trial]
        keys = [k for k in ("adversary", "epsilon_ref", "lambda1", "init_from") if k in row]
        what = ", ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys)
        d_clean, rel = interval((clean - ref_clean)[None]), ratio_interval(worse[None], ref_worse[None])
        print(
            f"{trial} ({what}): clean NMSE {clean.mean():.4f} ({d_clean.mean:+.4f} ± {d_clean.half:.4f}), "
            f"PSNR {psnr:.2f} ({psnr - ref_psnr:+.2f} dB), PGD dNMSE {worse.mean():+.4f} "
            f"({100 * (rel.mean - 1):+.1f} ± {100 * rel.half:.1f} %)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
