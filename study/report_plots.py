"""The report's figures from the result tables: ``robustness.png``, ``pareto.png``, ``curves.png``
and ``protocol_curves.png``, and :func:`save_png`, which every report figure is written through.

matplotlib's object API only (a :class:`~matplotlib.figure.Figure` on the Agg canvas, no pyplot
state), so drawing never touches a global figure.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from mriadv.units import REFERENCE_CROP  # the seed's crop; light (no torch)
from study.analysis import at_best_epochs, finished_trials, pareto_front
from study.report_data import (
    ATTACK_NAMES,
    METRIC_NAMES,
    METRICS,
    SPLIT_NAMES,
    StudyResults,
    attack_column,
    float_of,
    held_out,
    held_out_cell,
    held_out_split,
    param_symbol,
    reference_attack,
    zero_filled,
)

DEFENCE_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
DPI = 100


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.9 * i / max(1, n - 1)) for i in range(n)]


def save_png(fig: Figure, path: Path, grey: bool = False) -> None:
    """PNG at DPI, stored as 8-bit grey (``grey``) or a 256-colour palette: a few times smaller
    than matplotlib's RGBA, with no visible difference for line plots and grey images."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    image = Image.open(buffer).convert("RGB")
    image = image.convert("L") if grey else image.quantize(256)
    image.save(path, optimize=True)


def robustness_rows(res: StudyResults) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """``(trained, zero_filled, split)``: the rows the robustness figure and tables use: each trial's
    held-out evaluation of its best epoch where it exists, else (older studies) the per-epoch rows at
    the best epochs, with a clean row (budget 0) taken from the trials table."""
    rows = held_out(res)
    if len(rows):
        return rows, zero_filled(res), str(rows["split"].iloc[0])
    rob = at_best_epochs(res.best, res.robust)
    if "split" in rob:
        rob = rob[rob["split"] == "selection"]
    clean = [
        {
            "trial_id": b["trial_id"],
            "attack": "clean",
            "budget_ref": 0.0,
            **{m: float_of(b, f"val_{m}") for m in METRICS},
        }
        for _, b in res.best.iterrows()
    ]
    return pd.concat([rob, pd.DataFrame(clean)], ignore_index=True), rob.iloc[0:0], "selection"


def plot_robustness(res: StudyResults, path: Path) -> None:
    """NMSE and SSIM under PGD (solid: image PGD, or k-space PGD where the objectives name it) and
    equal-norm noise (dashed) versus the budget, with the zero-filled input (black) under the same attacks."""
    rob, zf, split = robustness_rows(res)
    if rob.empty:
        raise ValueError("no robustness results at the trials' best epochs")
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    curves = [
        (res.label(b["trial_id"]), color, rob[rob["trial_id"] == b["trial_id"]])
        for color, (_, b) in zip(_colors(len(res.best)), res.best.iterrows())
    ]
    if len(zf):
        curves.insert(0, ("zero-filled input", "k", zf))
    solid = (reference_attack(res) or ("pgd", 0.0))[0]
    solid = solid if solid.startswith("pgd") else "pgd"  # image PGD, or k-space PGD where that is the study's
    for label, color, mine in curves:
        clean = mine[mine["attack"] == "clean"]
        for attack, style in ((solid, "-"), ("noise", "--")):
            r = mine[mine["attack"] == attack].sort_values("budget_ref")
            if r.empty or clean.empty:
                continue
            for ax, m in zip(axes, ("nmse", "ssim")):
                x = [0.0, *r["budget_ref"]]
                y = [float(clean.iloc[0][m]), *r[m]]
                ax.plot(
                    x,
                    y,
                    style,
                    color=color,
                    marker="o" if attack == solid else None,
                    ms=4,
                    label=label if attack == solid else None,
                )
    ticks = [0.0, *res.budgets]
    for ax, m in zip(axes, ("nmse", "ssim")):
        ax.set_xticks(
            ticks, ["clean"] + [f"{b:g}\n({math.sqrt(b) / REFERENCE_CROP:.3f}/px)" for b in res.budgets], fontsize=8
        )
        ax.set_ylabel(f"{split}-split {METRIC_NAMES[m]}")
        ax.grid(alpha=0.3)
    axes[0].set_title("NMSE under attack (lower is better)", fontsize=10)
    axes[1].set_title("SSIM under attack (higher is better)", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    handles += [Line2D([], [], color="k", ls="-", marker="o", ms=4), Line2D([], [], color="k", ls="--")]
    labels += [f"{ATTACK_NAMES.get(solid, solid)} (worst case)", "random noise, same ‖δ‖²"]
    fig.legend(handles, labels, loc="outside right center", fontsize=8, title=_legend_title(res), title_fontsize=8)
    fig.supxlabel("attack budget ‖δ‖² in 320×320 units (per-pixel RMS in normalised units)", fontsize=9)
    fig.suptitle(
        f"{res.folder.name}: robustness of each trial's best epoch ({SPLIT_NAMES.get(split, split)})", fontsize=10
    )
    save_png(fig, path)


def _legend_title(res: StudyResults) -> str:
    return "trial" + (f" ({', '.join(param_symbol(p) for p in res.columns)})" if res.columns else "")


@dataclass
class ParetoPoints:
    """Clean validation NMSE (x, min) against an attacked metric (y) per trial at its best epoch:
    the second objective of a multi-objective study, else PGD NMSE at the largest budget. The front
    is taken over finished trials only (see :func:`study.analysis.finished_trials`)."""

    trial_ids: list[str]
    values: np.ndarray  # (n, 2): x, y
    finished: np.ndarray  # (n,) bool
    front: np.ndarray  # (n,) bool
    y_metric: str
    y_label: str
    errors: np.ndarray | None = None  # (n, 2): standard errors over volumes of x and y
    near: np.ndarray | None = None  # (n,) bool: off the front, but not dominated by more than 2 SEs

    def near_front(self) -> list[str]:
        """Finished trials off the front that no trial beats by more than two (unpaired) standard
        errors in both coordinates: their place off the front is within noise."""
        return [t for t, n in zip(self.trial_ids, self.near if self.near is not None else []) if n]


def within_noise(values: np.ndarray, errors: np.ndarray, finished: np.ndarray, front: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: finished points off the front (both coordinates minimised) that no finished point
    beats by more than two standard errors of the difference, ``2·sqrt(se_i² + se_j²)``, in both
    coordinates at once (NaN errors count as zero)."""
    se = np.nan_to_num(errors)
    out = np.zeros(len(values), dtype=bool)
    for i in np.flatnonzero(finished & ~front):
        margin = 2.0 * np.sqrt(se[i] ** 2 + se**2)  # (n, 2)
        clearly = finished & np.all(values + margin < values[i], axis=1)
        out[i] = not clearly.any()
    return out


def pareto_points(res: StudyResults, table: pd.DataFrame) -> ParetoPoints:
    """Clean NMSE against NMSE under the attack and budget the objectives name (else PGD at the largest,
    :func:`study.report_data.reference_attack`), both on the held-out split where the trials have it (the
    objectives the search used are selection-split numbers: not reported), with their standard errors
    over volumes. Image PGD is Table 1's column; another attack is read from the held-out rows."""
    found = reference_attack(res)
    if found is None:
        raise ValueError("no attacked metric to compare with (no attack budgets)")
    attack, top = found
    rep = table[(table["split"] == "Report") & (table["trial_id"] != "")].set_index("trial_id")
    best = res.best.copy()
    x_metric, y_metric = "report NMSE", attack_column(attack, top, "NMSE")
    if attack != "pgd":  # not in Table 1 (the seed's PGD): the held-out rows of that attack
        rows = held_out(res)
        mine = {t: rows[rows["trial_id"] == t] if len(rows) else rows for t in rep.index}
        for suffix, key in (("", "nmse"), (" SE", "nmse_se")):
            rep[y_metric + suffix] = [held_out_cell(mine[t], attack, top, key) for t in rep.index]
    for column, source in ((x_metric, "NMSE"), (y_metric, y_metric)):
        for suffix in ("", " SE"):
            found = source + suffix in rep
            best[column + suffix] = best["trial_id"].map(rep[source + suffix]) if len(rep) and found else math.nan
    split = held_out_split(res) or "report"
    y_label = f"{split}-split NMSE under {ATTACK_NAMES.get(attack, attack)}, ‖δ‖² = {top:g} (320²)"
    if not best[[x_metric, y_metric]].notna().all(axis=1).any():
        raise ValueError("no trial has a held-out evaluation yet")
    finished = best["trial_id"].isin(finished_trials(res.trials)).to_numpy()
    values = best[[x_metric, y_metric]].to_numpy(float)
    front = pareto_front(best, finished, [(x_metric, "min"), (y_metric, "min")])
    errors = best[[x_metric + " SE", y_metric + " SE"]].to_numpy(float)
    near = within_noise(values, errors, finished, front)
    return ParetoPoints(list(best["trial_id"]), values, finished, front, y_metric, y_label, errors, near)


def metric_label(metric: str) -> str:
    """Axis label of a reported metric: ``rob_pgd_e5000_nmse`` -> "NMSE under PGD, ‖δ‖² = 5000 (320²)"."""
    found = re.fullmatch(r"rob_(.+)_e([0-9p]+)_(d_)?(nmse|psnr|ssim)", metric)
    if found:
        attack, budget, delta, m = found.groups()
        return (
            f"{'degradation of ' if delta else ''}{METRIC_NAMES[m]} under {ATTACK_NAMES.get(attack, attack)}, "
            f"‖δ‖² = {budget.replace('p', '.')} (320²)"
        )
    return metric


def _defence_of(res: StudyResults, trial_ids: list[str]) -> list[str]:
    """Each trial's defence: its adversary kind (standard where epsilon is 0), or '' for studies that
    do not vary it."""
    if "adversary" not in res.trials and "epsilon" not in res.trials:
        return [""] * len(trial_ids)
    first = res.trials.drop_duplicates("trial_id").set_index("trial_id")
    out = []
    for t in trial_ids:
        row = first.loc[t] if t in first.index else {}
        eps = float_of(row, "epsilon")
        kind = str(row.get("adversary", "generator")) if "adversary" in first else "generator"
        out.append("standard" if eps == 0 or kind == "none" else kind)
    return out if len(set(out)) > 1 else [""] * len(trial_ids)


def plot_pareto(res: StudyResults, path: Path, points: ParetoPoints) -> None:
    """Clean validation NMSE against the attacked metric, front marked, unfinished trials hollow."""
    values, done, front = points.values, points.finished, points.front
    fig = Figure(figsize=(7.5, 5.2), layout="constrained")
    ax = fig.subplots()
    kinds = _defence_of(res, points.trial_ids)
    palette = dict(zip(dict.fromkeys(kinds), DEFENCE_COLORS))
    for kind, color in palette.items():
        mine = np.array([k == kind for k in kinds])
        name = f"{kind} (finished)" if kind else "trial (finished)"
        ax.scatter(values[done & mine, 0], values[done & mine, 1], s=40, color=color, label=name, zorder=2)
        if (~done & mine).any():
            ax.scatter(
                values[~done & mine, 0],
                values[~done & mine, 1],
                s=40,
                facecolors="none",
                edgecolors=color,
                label=f"{kind or 'trial'} (stopped by the scheduler, or running)",
                zorder=2,
            )
    if points.errors is not None and np.isfinite(points.errors).any():
        ax.errorbar(
            values[:, 0],
            values[:, 1],
            xerr=np.nan_to_num(points.errors[:, 0]),
            yerr=np.nan_to_num(points.errors[:, 1]),
            fmt="none",
            ecolor="0.6",
            lw=0.8,
            zorder=1,
            label="± SE over volumes",
        )
    if front.any():
        order = np.argsort(values[front, 0])
        ax.plot(values[front, 0][order], values[front, 1][order], "-", color="tab:red", lw=1, zorder=1)
        ax.scatter(
            values[front, 0],
            values[front, 1],
            s=110,
            facecolors="none",
            edgecolors="tab:red",
            lw=1.5,
            label="Pareto front",
            zorder=3,
        )
    names = [res.label(t) for t in points.trial_ids]
    numbered = max(map(len, names), default=0) > 24  # long labels: numbers on the plot, a key beside it
    at: dict[tuple[float, float], list[str]] = {}  # trials at the same point share one label
    for i, ((x, y), name) in enumerate(zip(values, names)):
        if np.isfinite(x) and np.isfinite(y):
            at.setdefault((float(f"{x:.6g}"), float(f"{y:.6g}")), []).append(str(i + 1) if numbered else name)
    for (x, y), labels in at.items():
        ax.annotate(
            (", " if numbered else "\n").join(labels),
            (x, y),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=7,
            va="bottom",
        )
    if numbered:
        fig.legend(
            [Line2D([], [], ls="")] * len(names),
            [f"{i + 1}: {n}" for i, n in enumerate(names)],
            loc="outside right center",
            fontsize=7,
            handlelength=0,
            title=_legend_title(res),
            title_fontsize=7,
        )
    ax.set_xlabel(f"clean NMSE ({held_out_split(res) or 'report'} split)")
    ax.set_ylabel(points.y_label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.margins(0.15)
    ax.set_title(f"{res.folder.name}: accuracy vs robustness (each trial's best epoch)", fontsize=10)
    save_png(fig, path)


def plot_protocol_curves(res: StudyResults, path: Path) -> None:
    """Robustness curves over a protocol's relative budget grid (``report_protocol``, held-out split):
    NMSE against ``||delta|| / ||y||`` for every trial's best epoch, coloured by defence, the zero-filled
    input in black; one panel per protocol and attack. The clean NMSE is drawn at relative budget 0."""
    panels = []
    for name in sorted(set(res.robust.get("protocol", pd.Series(dtype=str)).dropna()) - {""}):
        mine = held_out(res, "trained", name)
        mine = mine[mine["rel"].notna()] if "rel" in mine else mine.iloc[0:0]
        for attack in dict.fromkeys(mine["attack"]):
            panels.append((name, attack))
    if not panels:
        raise ValueError("no protocol with relative budgets in the held-out evaluation (report_protocol)")
    clean = held_out(res)
    clean = clean[clean["attack"] == "clean"]
    zf_clean = zero_filled(res)
    zf_clean = zf_clean[zf_clean["attack"] == "clean"].head(1)
    fig = Figure(figsize=(5.2 * len(panels) + 2.5, 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    trial_ids = list(res.best["trial_id"])
    kinds = _defence_of(res, trial_ids)
    palette = dict(zip(dict.fromkeys(kinds), DEFENCE_COLORS))
    styles = ("-", "--", ":", "-.")
    seen: dict[str, int] = {}
    lines = []
    for t, kind in zip(trial_ids, kinds):
        seen[kind] = seen.get(kind, -1) + 1
        lines.append((res.label(t), palette[kind], styles[seen[kind] % len(styles)], t))
    for ax, (name, attack) in zip(axes, panels):
        rows = held_out(res, "trained", name)
        zf = held_out(res, "zero_filled", name)
        zf = zf[zf["trial_id"] == zf["trial_id"].iloc[0]] if len(zf) else zf
        curves = [("zero-filled input", "k", "-", zf, zf_clean)]
        curves += [
            (label, color, style, rows[rows["trial_id"] == t], clean[clean["trial_id"] == t])
            for label, color, style, t in lines
        ]
        for label, color, style, r, c in curves:
            r = r[(r["attack"] == attack) & r["rel"].notna()].sort_values("rel")
            if r.empty:
                continue
            x = ([0.0] if len(c) else []) + list(r["rel"])
            y = ([float(c.iloc[0]["nmse"])] if len(c) else []) + list(r["nmse"])
            ax.plot(x, y, style, color=color, marker="o", ms=3, lw=1.2, label=label)
        ax.set_xlabel(
            "relative budget ‖δ‖ / ‖y‖ (sampled k-space)"
            if attack.endswith("_kspace")
            else "relative budget ‖δ‖ / ‖x̃‖ (input image)",
            fontsize=9,
        )
        ax.set_ylabel(f"{held_out_split(res) or 'report'}-split NMSE (lower is better)")
        ax.set_title(f"{ATTACK_NAMES.get(attack, attack)}, protocol {name}", fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    title = _legend_title(res) + (" · colour: defence" if any(kinds) else "")
    fig.legend(handles, labels, loc="outside right center", fontsize=7, title=title, title_fontsize=7)
    fig.suptitle(f"{res.folder.name}: robustness curves of each trial's best epoch", fontsize=10)
    save_png(fig, path)


def plot_curves(res: StudyResults, path: Path) -> None:
    """Validation NMSE / PSNR / SSIM and training loss per epoch, best epochs marked."""
    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    panels = (
        ("val_nmse", "validation NMSE"),
        ("val_psnr", "validation PSNR (dB)"),
        ("val_ssim", "validation SSIM"),
        ("train_loss", "training loss (reconstructor objective)"),
    )
    trials = res.trials[res.trials["epoch"] > 0] if "epoch" in res.trials else res.trials
    order = list(res.best["trial_id"]) + sorted(set(trials["trial_id"]) - set(res.best["trial_id"]))
    best_epoch = dict(zip(res.best["trial_id"], res.best["epoch"]))
    for color, trial_id in zip(_colors(len(order)), order):
        rows = trials[trials["trial_id"] == trial_id].sort_values("epoch")
        for ax, (key, _) in zip(axes, panels):
            if key not in rows:
                continue
            ax.plot(rows["epoch"], rows[key], "-o", ms=3, color=color, label=res.label(trial_id))
            hit = rows[rows["epoch"] == best_epoch.get(trial_id, -1)]
            ax.plot(hit["epoch"], hit[key], "*", ms=11, color=color, mec="k", mew=0.5)
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles, labels = axes[0].get_legend_handles_labels()
    handles.append(Line2D([], [], ls="", marker="*", ms=11, color="w", mec="k"))
    labels.append("best epoch (lowest val. loss)")
    fig.legend(handles, labels, loc="outside right center", fontsize=8, title=_legend_title(res), title_fontsize=8)
    fig.suptitle(f"{res.folder.name}: training curves", fontsize=11)
    save_png(fig, path)
