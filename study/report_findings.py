"""What a study found: the closing lines of a study and its report (:func:`findings`), each a
configuration chosen on the selection volumes and reported by its held-out figures beside the
zero-filled input's and the reference (standard) configuration's, with the intervals of
:func:`study.report_seeds.configuration_tables`."""

from __future__ import annotations

import math

import pandas as pd

from study.report_data import ATTACK_NAMES, StudyResults, held_out
from study.report_seeds import ConfigurationTables, _cell, _names, _verdict, configuration_tables

__all__ = ["PSNR_COST_DB", "findings"]


def _chosen(rows: pd.DataFrame, selection: str, held: str) -> tuple[pd.Series, str]:
    """The row with the lowest ``selection`` value, the selection split's, where every row has one, so that
    what a finding reports, the held-out figures, is not what chose it; else the row with the lowest
    held-out ``held``. With the phrase that says which split chose."""
    by, where = (selection, "selection") if selection in rows and rows[selection].notna().all() else (held, "held-out")
    return rows.loc[rows[by].idxmin()], f"chosen on the {where} volumes"


def findings(res: StudyResults, tables: ConfigurationTables | None = None) -> list[str]:
    """The lines a study ends with, what a user would paste into a message: the configuration with the
    best clean NMSE beside the zero-filled input's and the reference's, the one that cuts the
    degradation under the objectives' attack most against the reference, and the best recipe within
    :data:`PSNR_COST_DB` of the reference's clean PSNR. Each is chosen on the selection volumes (its
    trials' best epochs, as the search saw them) and reported on the held-out ones with the intervals of
    :func:`configuration_tables` (``tables``: those already computed for ``res``): the best of many
    configurations by its held-out figures would be flattered by the choice (the winner's curse)."""
    table, versus, reference, _, attack, budget = tables if tables is not None else configuration_tables(res)
    if table.empty or not table["NMSE"].notna().any():
        return []
    zf = held_out(res, "zero_filled")
    zf_nmse = float(zf.loc[zf["attack"] == "clean", "nmse"].mean()) if len(zf) else math.nan
    best, how = _chosen(table[table["NMSE"].notna()], "selection NMSE", "NMSE")
    seeds = int(best["seeds"])
    line = (
        f"found: best clean NMSE {best['configuration']} ({how}): held-out {_cell(best, 'NMSE', '.4f')} "
        + (f"({seeds} seeds, 95 % interval)" if seeds > 1 else "(1 seed: 95 % interval over volumes only)")
        + f"; zero-filled input {zf_nmse:.4f}"
    )
    if reference is not None and reference != best["configuration"]:
        ref = table.loc[table["configuration"] == reference].iloc[0]
        line += f"; {reference} {_cell(ref, 'NMSE', '.4f')}"
    out = [line]
    _, delta = _names(attack, budget)
    if not versus.empty and versus[delta].notna().any():
        top, how = _chosen(versus[versus[delta].notna()], "selection %", delta)
        out.append(
            f"found: against {reference} under {ATTACK_NAMES.get(attack, attack)}@{budget:g}, {top['configuration']} "
            f"({how}) changes the held-out degradation by {_cell(top, delta, '+.4f')} "
            f"({_cell(top, f'{delta} %', '+.1f')} %, {_verdict(top, delta, 'a gain', 'a loss')}) at a clean NMSE "
            f"change of {_cell(top, 'ΔNMSE', '+.4f')} ({_verdict(top, 'ΔNMSE', 'better', 'worse')})"
        )
        out += _within_psnr(versus, reference, delta, attack, budget)
    return out


PSNR_COST_DB = 0.5  # the clean PSNR a recipe may give up against the reference (issue 22's frontier)


def _within_psnr(versus: pd.DataFrame, reference: str, delta: str, attack: str, budget: float) -> list[str]:
    """The recipe that cuts the degradation most among those whose clean PSNR is within
    :data:`PSNR_COST_DB` of the reference's, or, where none is, the one that comes closest: chosen on the
    selection split (``selection ΔPSNR``, ``selection %``) where every configuration has its figures, else
    on the held-out point estimates, and reported by its held-out figures with their intervals."""
    if f"{delta} %" not in versus or "ΔPSNR" not in versus:
        return []
    rows = versus[versus[f"{delta} %"].notna() & versus["ΔPSNR"].notna()]
    if rows.empty:
        return []
    chosen = {"selection ΔPSNR", "selection %"} <= set(rows) and rows[
        ["selection ΔPSNR", "selection %"]
    ].notna().all().all()
    psnr, gain, where = (
        ("selection ΔPSNR", "selection %", "selection") if chosen else ("ΔPSNR", f"{delta} %", "held-out")
    )
    near = rows[rows[psnr] >= -PSNR_COST_DB]
    name = f"{ATTACK_NAMES.get(attack, attack)}@{budget:g}"
    if near.empty:
        top = rows.loc[rows[psnr].idxmax()]
        return [
            f"found: no configuration is within {PSNR_COST_DB:g} dB of {reference}'s clean PSNR on the {where} "
            f"volumes; the closest there, {top['configuration']}, at {_cell(top, 'ΔPSNR', '+.2f')} dB held-out, "
            f"changes the {name} degradation by {_cell(top, f'{delta} %', '+.1f')} %"
        ]
    top = near.loc[near[gain].idxmin()]
    return [
        f"found: within {PSNR_COST_DB:g} dB of {reference}'s clean PSNR on the {where} volumes, the best recipe "
        f"there is {top['configuration']}: held-out {name} degradation {_cell(top, f'{delta} %', '+.1f')} % "
        f"({_verdict(top, delta, 'a gain', 'a loss')}) at {_cell(top, 'ΔPSNR', '+.2f')} dB"
    ]
