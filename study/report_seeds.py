"""The report's configurations over their training seeds, and every configuration against the
reference (standard) one: ``configurations.md`` / ``configurations.csv`` / ``versus_reference.csv``.
The reference is the first configuration trained with ε = 0 in the report's order; the degradation is
under the attack and budget the objectives name (:func:`study.report_data.reference_attack`: image PGD,
or k-space PGD for a study of the unrolled network, whose columns read ``PGD-k@5000 dNMSE``).

A *configuration* is a trial's searched values without ``seed``; a space with ``seeds: N`` trains each
N times (:mod:`study.spaces`). Every number is a mean over seeds and held-out volumes with a 95 %
Student-t interval that holds both the seed-to-seed and the volume-to-volume variation
(:func:`mriadv.intervals.interval`); differences against the reference configuration are paired by seed
(the same data order and masks) and by volume; a change relative to the reference's degradation is a
ratio of means with the ratio's linearised interval (:func:`mriadv.intervals.ratio_interval`). NMSE
and its degradation under attack are per volume (``volume_nmse`` of ``robustness.parquet``); PSNR,
SSIM and the NMSE ratio to the zero-filled input are per trial, so their intervals are over seeds only (none with one seed). With one seed the intervals
are the paired t-intervals over volumes: what they leave out, run-to-run variation, is said in the
caption.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from mriadv.intervals import LEVEL, Interval, interval, ratio_interval
from mriadv.units import robust_key
from study.analysis import finished_trials
from study.report_data import (
    ATTACK_COLUMNS,
    ATTACK_NAMES,
    StudyResults,
    attack_column,
    float_of,
    format_value,
    held_out,
    markdown_table,
    param_symbol,
    reference_attack,
)

__all__ = [
    "configuration_tables",
    "configurations",
    "configurations_markdown",
    "standard_configurations",
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


def _per_volume(res: StudyResults, attack: str, budget: float | None) -> dict[str, dict[str, dict[str, float]]]:
    """trial id -> {'clean': {volume: NMSE}, 'input': {...}, 'attacked': {volume: attacked - clean NMSE}}
    under ``attack`` at ``budget``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for model, kind in (("trained", "clean"), ("zero_filled", "input")):
        rows = held_out(res, model)
        for _, r in rows[rows["attack"] == "clean"].iterrows() if len(rows) else []:
            out.setdefault(str(r["trial_id"]), {})[kind] = json.loads(r["volume_nmse"] or "{}")
    rows = held_out(res)
    if budget is not None and len(rows):
        for _, r in rows[(rows["attack"] == attack) & (rows["budget_ref"] == budget)].iterrows():
            mine = out.get(str(r["trial_id"]), {})
            attacked = json.loads(r["volume_nmse"] or "{}")
            if "clean" in mine:
                mine["attacked"] = {v: attacked[v] - mine["clean"][v] for v in attacked if v in mine["clean"]}
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


def _selection(res: StudyResults, trials: list[str], key: str | None) -> np.ndarray | None:
    """``(seeds,)`` of a selection-split value (``val_nmse``, ``val_psnr``, ``rob_pgd_e5000_nmse``) at each
    trial's best epoch: what early stopping and the search chose on, never what the report reports."""
    best = res.best.set_index("trial_id")
    values = [float_of(best.loc[t], key) if key and t in best.index else math.nan for t in trials]
    return np.array(values) if values and all(math.isfinite(v) for v in values) else None


def _selection_degradation(
    res: StudyResults, trials: list[str], attack: str, budget: float | None
) -> np.ndarray | None:
    """``(seeds,)`` of the selection split's NMSE increase under ``attack`` at ``budget`` at each trial's
    best epoch (``rob_<attack>_e<budget>_d_nmse``: attacked minus clean on the same slices, the attack's
    subset of the selection volumes); None where a trial has no such figure."""
    return _selection(res, trials, robust_key(attack, budget, "d_nmse")) if budget is not None else None


class ConfigurationTables(NamedTuple):
    """What :func:`configuration_tables` gives: ``table`` (one row per configuration over its seeds),
    ``versus`` (one row per configuration against ``reference``; empty without one), ``reference``
    (its label), ``standard`` (every configuration trained with ε = 0, in the report's order), and the
    ``attack`` and ``budget`` the degradation is measured under (:func:`study.report_data.reference_attack`)."""

    table: pd.DataFrame
    versus: pd.DataFrame
    reference: str | None
    standard: list[str]
    attack: str
    budget: float | None


def _names(attack: str, budget: float | None) -> tuple[str, str]:
    """The columns of the degradation under ``attack`` at ``budget`` and of its difference against the
    reference: ``PGD@5000 dNMSE`` and ``Δ PGD dNMSE`` (image PGD), ``PGD-k@5000 dNMSE`` and ``Δ PGD-k dNMSE``."""
    return attack_column(attack, budget, "dNMSE"), f"Δ {ATTACK_COLUMNS.get(attack, attack)} dNMSE"


def configuration_tables(res: StudyResults) -> ConfigurationTables:
    """The configurations over their seeds and against the reference: the first configuration trained
    with ε = 0 in the report's order (:func:`standard_configurations`); without one, ``versus`` is
    empty. The degradation is under the attack and budget the objectives name (image PGD at the largest budget
    where they name none)."""
    groups = configurations(res)
    attack, budget = reference_attack(res) or ("pgd", None)
    per = _per_volume(res, attack, budget)
    degradation, delta = _names(attack, budget)
    rows = []
    for label, seeds in groups.items():
        trials = [seeds[s] for s in sorted(seeds)]
        clean, attacked = _table(per, trials, "clean"), _table(per, trials, "attacked")
        row: dict[str, Any] = {"configuration": label, "seeds": len(trials)}
        for name, found in (
            ("NMSE", _interval(clean)),
            ("PSNR", _interval(_by_seed(res, trials, "report_psnr"))),
            ("SSIM", _interval(_by_seed(res, trials, "report_ssim"))),
            ("NMSE / input", _interval(_by_seed(res, trials, "report_vs_input_ratio"))),
            (degradation, _interval(attacked)),
        ):
            row[name] = found.mean if found else math.nan
            row[f"{name} ±"] = found.half if found else math.nan
        nmse = _selection(res, trials, "val_nmse")
        row["selection NMSE"] = float(nmse.mean()) if nmse is not None else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    standard = standard_configurations(res, groups)
    reference = standard[0] if standard else None
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
                (delta, "attacked", None),
                ("ΔPSNR", None, "report_psnr"),
            ):
                a = _table(per, mine, kind) if kind else _by_seed(res, mine, spec)
                b = _table(per, theirs, kind) if kind else _by_seed(res, theirs, spec)
                found = interval(a - b) if a is not None and b is not None and a.shape == b.shape else None
                row[name] = found.mean if found else math.nan
                row[f"{name} ±"] = found.half if found else math.nan
                row[f"{name} df"] = found.df if found else math.nan
                if kind == "attacked" and found and float(b.mean()) > 0:
                    relative = ratio_interval(a, b)  # the denominator's own variation counted
                    row[f"{delta} %"] = 100.0 * (relative.mean - 1.0)
                    row[f"{delta} % ±"] = 100.0 * relative.half
            # the same comparison on the selection split, which the findings choose by (point estimates)
            psnr = [_selection(res, t, "val_psnr") for t in (mine, theirs)]
            worse = [_selection_degradation(res, t, attack, budget) for t in (mine, theirs)]
            have = [all(x is not None for x in pair) for pair in (psnr, worse)]
            row["selection ΔPSNR"] = float((psnr[0] - psnr[1]).mean()) if have[0] else math.nan
            ok = have[1] and float(worse[1].mean()) > 0
            row["selection %"] = 100.0 * (float(worse[0].mean()) / float(worse[1].mean()) - 1.0) if ok else math.nan
            versus.append(row)
    return ConfigurationTables(table, pd.DataFrame(versus), reference, standard, attack, budget)


def standard_configurations(res: StudyResults, groups: dict[str, dict[int, str]]) -> list[str]:
    """The configurations trained with ε = 0 (every seed), in the report's order; the first is the
    reference (in the ``architectures`` space the U-Net's, which the unrolled network is set against)."""
    return [
        label
        for label, seeds in groups.items()
        if all(float_of(res.best.loc[res.best["trial_id"] == t].iloc[0], "epsilon_ref") == 0 for t in seeds.values())
    ]


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


def configurations_markdown(tables: ConfigurationTables) -> list[str]:
    """The tables of :func:`configuration_tables` as Markdown, with what their intervals hold and which
    configuration is the reference; [] without finished trials."""
    table, versus, reference, standard, attack, budget = tables
    if table.empty:
        return []
    seeds = int(table["seeds"].max())
    pgd, delta = _names(attack, budget)
    over = (
        f"over {seeds} training seeds and the held-out volumes"
        if seeds > 1
        else "over the held-out volumes of one training run each: run-to-run variation is **not** in them "
        "(give the space `seeds: 3` to include it)"
    )
    named = (
        f" {ATTACK_COLUMNS.get(attack, attack)}: {ATTACK_NAMES.get(attack, attack)}, the attack the objectives name."
        if attack != "pgd"
        else ""
    )
    out = [
        "## Configurations over their seeds (held-out split)",
        "",
        (
            f"Mean ± half-width of the {LEVEL:.0%} Student-t interval, {over}. NMSE and the "
            f"{ATTACK_NAMES.get(attack, attack)} degradation are paired per volume; PSNR, SSIM and NMSE / input "
            f"are per run (no interval with one seed).{named}"
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
    others = [s for s in standard if s != reference]
    which = (
        f" {reference} is the reference: the first of the {len(standard)} configurations trained with ε = 0, in "
        f"the report's order; {', '.join(others)} {'are' if len(others) > 1 else 'is'} set against it like the rest."
        if others
        else ""
    )
    tuned = sum("init_from=" in c and "init_from=scratch" not in c for c in versus["configuration"])
    if tuned:  # their clean figures hold more training than the reference's, not only their defence
        which += (
            f" The {tuned} configuration{'s' if tuned > 1 else ''} with an `init_from` other than scratch started "
            f"from a trained model and "
            f"then ran their own schedule: they have had its updates and as many again, so their clean "
            f"differences against {reference} hold that extra training as well as their defence."
        )
    out += [
        f"## Against {reference} (held-out split, paired by seed and volume)",
        "",
        (
            f"Each configuration minus {reference}, trained with the same seeds and evaluated on the same "
            f"volumes: mean ± half-width of the {LEVEL:.0%} t-interval (degrees of freedom by Welch–Satterthwaite "
            f"over the seed and volume components); *%*: of {reference}'s own degradation (the ratio of the mean "
            f"degradations minus one; its interval by the ratio's linearisation, so the reference's own variation "
            f"counts: `mriadv.intervals.ratio_interval`). A difference whose "
            f"interval holds zero is marked *within noise*.{which}"
        ),
        "",
        markdown_table(
            ["configuration", "seeds", "Δ clean NMSE", f"Δ {pgd}", "%", "df", "Δ PSNR (dB)", "reading"],
            [
                [
                    r["configuration"],
                    str(r["seeds"]),
                    _cell(r, "ΔNMSE", "+.4f"),
                    _cell(r, delta, "+.4f"),
                    _cell(r, f"{delta} %", "+.1f"),
                    format(float_of(r, f"{delta} df"), ".1f") if math.isfinite(float_of(r, f"{delta} df")) else "–",
                    _cell(r, "ΔPSNR", "+.2f"),
                    "; ".join(
                        x
                        for x in (
                            "robustness: " + _verdict(r, delta, "gain", "loss"),
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


def write_configuration_tables(tables: ConfigurationTables, out: Path) -> list[str]:
    """Write ``configurations.csv`` and ``versus_reference.csv`` of :func:`configuration_tables`; return
    the Markdown section."""
    if tables.table.empty:
        return []
    tables.table.to_csv(out / "configurations.csv", index=False)
    if not tables.versus.empty:
        tables.versus.to_csv(out / "versus_reference.csv", index=False)
    return configurations_markdown(tables)
