"""The small-feature figure of a study (the seed's instability of type 2, after FNAF).

For one held-out (report-split) slice, a small feature (the default
:class:`mriadv.instabilities.FeatureSpec`) is inserted into the data at the worst of the search's
positions for each model, and one row per model shows: the target with the feature, the zero-filled
input with it, the reconstruction, what the feature changed in the reconstruction (with minus
without), and the error inside the feature's neighbourhood. Rows: the zero-filled input itself, the
standard model (epsilon = 0) and the most robust model (lowest held-out NMSE under PGD at the
largest budget). Drawn by :func:`study.report.write_report` as ``report/features.png``; this module
loads the networks (torch), so the report imports it only when the figure is drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from mriadv.adversaries import predictor
from mriadv.config import TrainConfig
from mriadv.instabilities import FeatureSearch, FeatureSpec, feature_example
from mriadv.runtime import Runtime
from mriadv.checkpoint import load_checkpoint
from mriadv.data.loading import build_data
from mriadv.trainer import build_reconstructor
from study.report_data import StudyResults, held_out
from study.report_plots import save_png

COLUMNS = (
    "target with feature",
    "zero-filled input",
    "reconstruction",
    "feature's effect\n(with − without)",
    "|error| with feature",
)


def chosen_models(res: StudyResults) -> list[tuple[str, str]]:
    """``(label, trial_id)``: the first standard trial and the most robust trial by held-out PGD
    NMSE at the largest budget (if it is another one)."""
    out = []
    best = res.best
    if "epsilon" in best:
        standard = best[best["epsilon"].astype(float) == 0]
        if len(standard):
            out.append(("standard", standard.iloc[0]["trial_id"]))
    rows = held_out(res)
    if len(rows) and res.budgets:
        pgd = rows[(rows["attack"] == "pgd") & (rows["budget_ref"] == max(res.budgets))]
        if len(pgd):
            robust = pgd.sort_values("nmse").iloc[0]["trial_id"]
            if robust not in [t for _, t in out]:
                out.append((f"most robust ({res.label(robust)})", robust))
    return out


def features_figure(res: StudyResults, path: Path) -> list[str]:
    """Draw the figure into ``path``; returns notes on what could not be drawn."""
    runtime = Runtime.resolve("cuda" if torch.cuda.is_available() else "cpu", "fp32")
    models = chosen_models(res)
    if not models:
        return ["features.png not drawn: no standard trial and no held-out PGD results"]
    rows, notes, where = [], [], ""
    for label, trial_id in models:
        ckpt = res.best_pt(trial_id)
        if ckpt is None:
            notes.append(f"features.png: {label} trial {trial_id} has no best.pt")
            continue
        payload = load_checkpoint(ckpt)
        cfg = TrainConfig.from_dict(payload["config"])
        model = build_reconstructor(cfg)
        model.load_state_dict(payload["networks"]["recon"])
        model = predictor(cfg, runtime.prepare_model(model)).eval()  # smoothed for adversary='smoothing'
        data = build_data(cfg, runtime, training=False)
        dataset = data.report if data.report is not None else data.val
        index = dataset.volumes[0].num_slices // 2  # the middle slice of the first held-out volume
        where = f"{dataset.volumes[0].name} slice {index}"
        if not rows:  # the zero-filled input first, at its own worst position
            rows.append(
                (
                    "zero-filled input",
                    feature_example(torch.nn.Identity(), dataset, runtime, index, FeatureSpec(), FeatureSearch()),
                )
            )
        rows.append((label, feature_example(model, dataset, runtime, index, FeatureSpec(), FeatureSearch())))
    if not rows:
        return notes
    _draw(
        rows,
        f"{res.folder.name}: a {FeatureSpec().size}-pixel feature inserted into the data of held-out "
        f"{where} at each model's worst position (normalised units)",
        path,
    )
    return notes


def _draw(rows: list[tuple[str, dict[str, np.ndarray]]], title: str, path: Path) -> None:
    fig = Figure(figsize=(1.7 * len(COLUMNS) + 0.8, 1.8 * len(rows) + 0.7), layout="constrained")
    axes = fig.subplots(len(rows), len(COLUMNS), squeeze=False)
    for r, (label, im) in enumerate(rows):
        lo, hi = float(im["target"].min()), float(im["target"].max())
        ys, xs = np.nonzero(im["mask"])
        cy, cx = (int(ys.mean()), int(xs.mean())) if len(ys) else (im["mask"].shape[0] // 2, im["mask"].shape[1] // 2)
        effect = im["difference"]
        m = float(np.abs(im["feature"]).max()) or 1.0
        panels = [
            (im["target"], lo, hi),
            (im["input"], lo, hi),
            (im["recon"], lo, hi),
            (effect, -m, m),
            (np.abs(im["recon"] - im["target"]), 0.0, m),
        ]
        for c, (ax, (image, vmin, vmax)) in enumerate(zip(axes[r], panels)):
            ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.contour(im["mask"], levels=[0.5], colors="red", linewidths=0.6)
            half = 12
            ax.set_xlim(cx - half, cx + half)
            ax.set_ylim(cy + half, cy - half)  # a zoom on the feature: it is only a few pixels wide
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(COLUMNS[c], fontsize=7)
        inside = im["mask"] > 0
        recovered = float(effect[inside].mean() / im["feature"][inside].mean()) if inside.any() else float("nan")
        axes[r, 0].set_ylabel(f"{label}\nrecovered contrast {recovered:.2f}", fontsize=7)
    fig.suptitle(title, fontsize=8)
    save_png(fig, path, grey=True)
