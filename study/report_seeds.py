"""The report's configurations over their training seeds, and every configuration against the
reference (standard) one: ``configurations.md`` / ``configurations.csv`` / ``versus_reference.csv``.

A *configuration* is a trial's searched values without ``seed``; a space with ``seeds: N`` trains each
N times (:mod:`study.spaces`). Every number is a mean over seeds and held-out volumes with a 95 %
Student-t interval that holds both the seed-to-seed and the volume-to-volume variation
(:func:`mriadv.intervals.interval`); differences against the reference configuration are paired by seed
(the same data order and masks) and by volume. NMSE and its degradation under PGD are per volume
(``volume_nmse`` of ``robustness.parquet``); PSNR, SSIM and the NMSE ratio to the zero-filled input are
per trial, so their intervals are over seeds only (none with one seed). With one seed the intervals
are the paired t-intervals over volumes: what they leave out, run-to-run variation, is said in the
caption.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mriadv.intervals import LEVEL, Interval, interval
from study.analysis import finished_trials
from study.report_data import (
    StudyResults,
    float_of,
    format_value,
    held_out,
    markdown_table,
    param_symbol,
    reference_budget,
)

__all__ = [
    "configuration_tables",
    "findings",
    "configurations",
    "configurations_markdown",
    "write_configuration_tables",
]


def configurations(res: StudyResults) -> dict[str, dict[int, str]]:
    """Finished trials grouped by configuration: its label (searched values without ``seed``) ->
    {seed: trial id}, in the report's trial order."""
    if res.best.empty:
        return {}
    done = finished_trials(res.trials)
    params = [p for p in res.columns if p != "seed"]
    out: dict[str, dict[int, str]] = {}
    for _, row in res.best.iterrows():
        if row["trial_id"] not in done:
            continue
        label = ", ".join(f"{param_symbol(p)}={format_value(row.get(res.columns[p]))}" for p in params) or "all"
        seed = int(row["seed"]) if "seed" in row and pd.notna(row["seed"]) else 0
        out.setdefault(label, {})[seed] = str(row["trial_id"])
    return out


def _per_volume(res: StudyResults, budget: float | None) -> dict[str, dict[str, dict[str, float]]]:
    """trial id -> {'clean': {volume: NMSE}, 'input': {...}, 'pgd': {volume: attacked - clean NMSE}}."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for model, kind in (("trained", "clean"), ("zero_filled", "input")):
        rows = held_out(res, model)
        for _, r in rows[rows["attack"] == "clean"].iterrows() if len(rows) else []:
            out.setdefault(str(r["trial_id"]), {})[kind] = json.loads(r["volume_nmse"] or "{}")
    rows = held_out(res)
    if budget is not None and len(rows):
        for _, r in rows[(rows["attack"] == "pgd") & (rows["budget_ref"] == budget)].iterrows():
            mine = out.get(str(r["trial_id"]), {})
            attacked = json.loads(r["volume_nmse"] or "{}")
            if "clean" in mine:
                mine["pgd"] = {v: attacked[v] - mine["clean"][v] for v in attacked if v in mine["clean"]}
    return out


def _table(per: dict[str, dict[str, dict[str, float]]], trials: list[str], kind: str) -> np.ndarray | None:
    """``(seeds, volumes)`` of ``kind`` for ``trials`` on the volumes they share; None where missing."""
    if not trials or any(kind not in per.get(t, {}) for t in trials):
        return None
    volumes = sorted(set.intersection(*(set(per[t][kind]) for t in trials)))
    return np.array([[per[t][kind][v] for v in volumes] for t in trials]) if volumes else None


def _by_seed(res: StudyResults, trials: list[str], key: str) -> np.ndarray | None:
    """``(seeds, 1)`` of a per-trial held-out value (``report_psnr``, ...) at the trial's last record."""
    last = res.trials[res.trials["epoch"] > 0].sort_values("epoch").groupby("trial_id").last()
    values = [float_of(last.loc[t], key) if t in last.index else math.nan for t in trials]
    return np.array(values)[:, None] if values and all(math.isfinite(v) for v in values) else None


def _interval(table: np.ndarray | None) -> Interval | None:
    return interval(table) if table is not None else None


def configuration_tables(res: StudyResults) -> tuple[pd.DataFrame, pd.DataFrame, str | None, float | None]:
    """(one row per configuration over its seeds, one row per configuration against the reference,
    the reference's label, the PGD budget). The reference is the one configuration trained with
    ε = 0; without a single one, the second table is empty."""
    groups = configurations(res)
    budget = reference_budget(res)
    per = _per_volume(res, budget)
    rows = []
    for label, seeds in groups.items():
        trials = [seeds[s] for s in sorted(seeds)]
        clean, pgd = _table(per, trials, "clean"), _table(per, trials, "pgd")
        row: dict[str, Any] = {"configuration": label, "seeds": len(trials)}
        for name, found in (
            ("NMSE", _interval(clean)),
            ("PSNR", _interval(_by_seed(res, trials, "report_psnr"))),
            ("SSIM", _interval(_by_seed(res, trials, "report_ssim"))),
            ("NMSE / input", _interval(_by_seed(res, trials, "report_vs_input_ratio"))),
            (f"PGD@{budget:g} dNMSE" if budget else "PGD dNMSE", _interval(pgd)),
        ):
            row[name] = found.mean if found else math.nan
            row[f"{name} ±"] = found.half if found else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    reference = _reference(res, groups)
    versus = []
    if reference is not None:
        ref = groups[reference]
        for label, seeds in groups.items():
            common = sorted(set(seeds) & set(ref))
            if label == reference or not common:
                continue
            mine, theirs = [seeds[s] for s in common], [ref[s] for s in common]
            row = {"configuration": label, "seeds": len(common)}
            for name, kind, spec in (
                ("ΔNMSE", "clean", None),
                ("Δ PGD dNMSE", "pgd", None),
                ("ΔPSNR", None, "report_psnr"),
            ):
                a = _table(per, mine, kind) if kind else _by_seed(res, mine, spec)
                b = _table(per, theirs, kind) if kind else _by_seed(res, theirs, spec)
                found = interval(a - b) if a is not None and b is not None and a.shape == b.shape else None
                row[name] = found.mean if found else math.nan
                row[f"{name} ±"] = found.half if found else math.nan
                row[f"{name} df"] = found.df if found else math.nan
                if kind == "pgd" and found and b is not None:
                    row["Δ PGD dNMSE %"] = 100.0 * found.mean / float(b.mean())
                    row["Δ PGD dNMSE % ±"] = 100.0 * found.half / float(b.mean())
            versus.append(row)
    return table, pd.DataFrame(versus), reference, budget


def _reference(res: StudyResults, groups: dict[str, dict[int, str]]) -> str | None:
    zero = [
        label
        for label, seeds in groups.items()
        if all(float_of(res.best.loc[res.best["trial_id"] == t].iloc[0], "epsilon_ref") == 0 for t in seeds.values())
    ]
    return zero[0] if len(zero) == 1 else None


def _cell(row: pd.Series, name: str, spec: str) -> str:
    value, half = float_of(row, name), float_of(row, f"{name} ±")
    if not math.isfinite(value):
        return "–"
    return format(value, spec) + (f" ± {format(half, spec.lstrip('+'))}" if math.isfinite(half) else "")


def _verdict(row: pd.Series, name: str, lower: str, higher: str) -> str:
    value, half = float_of(row, name), float_of(row, f"{name} ±")
    if not (math.isfinite(value) and math.isfinite(half)):
        return ""
    return lower if value + half < 0 else higher if value - half > 0 else "within noise"


def configurations_markdown(
    table: pd.DataFrame, versus: pd.DataFrame, reference: str | None, budget: float | None
) -> list[str]:
    """The tables of :func:`configuration_tables` as Markdown, with what their intervals hold; []
    without finished trials."""
    if table.empty:
        return []
    seeds = int(table["seeds"].max())
    pgd = f"PGD@{budget:g} dNMSE" if budget else "PGD dNMSE"
    over = (
        f"over {seeds} training seeds and the held-out volumes"
        if seeds > 1
        else "over the held-out volumes of one training run each: run-to-run variation is **not** in them "
        "(give the space `seeds: 3` to include it)"
    )
    out = [
        "## Configurations over their seeds (held-out split)",
        "",
        (
            f"Mean ± half-width of the {LEVEL:.0%} Student-t interval, {over}. NMSE and the PGD degradation "
            "are paired per volume; PSNR, SSIM and NMSE / input are per run (no interval with one seed)."
        ),
        "",
        markdown_table(
            ["configuration", "seeds", "NMSE", "PSNR", "SSIM", "NMSE / input", pgd],
            [
                [
                    r["configuration"],
                    str(r["seeds"]),
                    _cell(r, "NMSE", ".4f"),
                    _cell(r, "PSNR", ".2f"),
                    _cell(r, "SSIM", ".4f"),
                    _cell(r, "NMSE / input", ".3f"),
                    _cell(r, pgd, "+.4f"),
                ]
                for _, r in table.iterrows()
            ],
        ),
        "",
    ]
    if versus.empty:
        return out
    out += [
        f"## Against {reference} (held-out split, paired by seed and volume)",
        "",
        (
            f"Each configuration minus {reference}, trained with the same seeds and evaluated on the same "
            f"volumes: mean ± half-width of the {LEVEL:.0%} t-interval (degrees of freedom by Welch–Satterthwaite "
            f"over the seed and volume components); *%*: of {reference}'s own degradation. A difference whose "
            "interval holds zero is marked *within noise*."
        ),
        "",
        markdown_table(
            ["configuration", "seeds", "Δ clean NMSE", f"Δ {pgd}", "%", "df", "Δ PSNR (dB)", "reading"],
            [
                [
                    r["configuration"],
                    str(r["seeds"]),
                    _cell(r, "ΔNMSE", "+.4f"),
                    _cell(r, "Δ PGD dNMSE", "+.4f"),
                    _cell(r, "Δ PGD dNMSE %", "+.1f"),
                    format(float_of(r, "Δ PGD dNMSE df"), ".1f")
                    if math.isfinite(float_of(r, "Δ PGD dNMSE df"))
                    else "–",
                    _cell(r, "ΔPSNR", "+.2f"),
                    "; ".join(
                        x
                        for x in (
                            "robustness: " + _verdict(r, "Δ PGD dNMSE", "gain", "loss"),
                            "clean: " + _verdict(r, "ΔNMSE", "better", "worse"),
                        )
                        if not x.endswith(": ")
                    ),
                ]
                for _, r in versus.iterrows()
            ],
        ),
        "",
    ]
    return out


def write_configuration_tables(res: StudyResults, out: Path) -> list[str]:
    """Write ``configurations.csv`` and ``versus_reference.csv``; return the Markdown section."""
    table, versus, reference, budget = configuration_tables(res)
    if table.empty:
        return []
    table.to_csv(out / "configurations.csv", index=False)
    if not versus.empty:
        versus.to_csv(out / "versus_reference.csv", index=False)
    return configurations_markdown(table, versus, reference, budget)


def findings(res: StudyResults) -> list[str]:
    """The lines a study ends with, what a user would paste into a message: the best configuration on
    held-out NMSE beside the zero-filled input's and the reference's, and the configuration that cuts
    the PGD degradation most against the reference, with the intervals of :func:`configuration_tables`."""
    table, versus, reference, budget = configuration_tables(res)
    if table.empty or not table["NMSE"].notna().any():
        return []
    zf = held_out(res, "zero_filled")
    zf_nmse = float(zf.loc[zf["attack"] == "clean", "nmse"].mean()) if len(zf) else math.nan
    best = table.loc[table["NMSE"].idxmin()]
    seeds = int(best["seeds"])
    line = (
        f"found: best held-out NMSE {best['configuration']}: {_cell(best, 'NMSE', '.4f')} "
        + (f"({seeds} seeds, 95 % interval)" if seeds > 1 else "(1 seed: 95 % interval over volumes only)")
        + f"; zero-filled input {zf_nmse:.4f}"
    )
    if reference is not None and reference != best["configuration"]:
        ref = table.loc[table["configuration"] == reference].iloc[0]
        line += f"; {reference} {_cell(ref, 'NMSE', '.4f')}"
    out = [line]
    if not versus.empty and versus["Δ PGD dNMSE"].notna().any():
        top = versus.loc[versus["Δ PGD dNMSE"].idxmin()]
        out.append(
            f"found: against {reference} under PGD@{budget:g}, {top['configuration']} changes the degradation by "
            f"{_cell(top, 'Δ PGD dNMSE', '+.4f')} ({_cell(top, 'Δ PGD dNMSE %', '+.1f')} %, "
            f"{_verdict(top, 'Δ PGD dNMSE', 'a gain', 'a loss')}) at a clean NMSE change of {_cell(top, 'ΔNMSE', '+.4f')} "
            f"({_verdict(top, 'ΔNMSE', 'better', 'worse')})"
        )
    return out
