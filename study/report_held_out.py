"""The report's held-out tables that follow Table 1: one per named attack protocol
(``report_protocol``) and the seed's instabilities of types 2 and 3."""

from __future__ import annotations

import math

import pandas as pd

from study.report_data import StudyResults, float_of, format_number, held_out, markdown_table, plus_minus


def instability_tables(res: StudyResults) -> list[str]:
    """The seed's instabilities of types 2 and 3 on the held-out split (the last epoch's row of each
    trial holds its best epoch's evaluation): small-feature false-negative rates at a random and at
    the worst of several positions, recovered contrast, and NMSE over accelerations with nested masks
    (*: more samples did not lower NMSE by more than its paired standard error)."""
    t = res.trials
    if t.empty or "report_feature_random_fnr" not in t and "report_sampling_r4_nmse" not in t:
        return []
    last = t[t["epoch"] > 0].sort_values("epoch").groupby("trial_id").last()
    rates = sorted(
        {
            float(c[len("report_sampling_r") : -len("_nmse")].replace("p", "."))
            for c in t
            if c.startswith("report_sampling_r")
            and c.endswith("_nmse")
            and not c.endswith("_se")
            and "stagnant" not in c
        },
        reverse=True,
    )

    def line(label: str, row: pd.Series, prefix: str) -> list[str]:
        cells = [label]
        for kind in ("random", "worst"):
            cells.append(
                plus_minus(
                    float_of(row, f"{prefix}feature_{kind}_fnr"), float_of(row, f"{prefix}feature_{kind}_fnr_se"), ".2f"
                )
            )
        cells.append(
            plus_minus(
                float_of(row, f"{prefix}feature_random_contrast"),
                float_of(row, f"{prefix}feature_random_contrast_se"),
                ".2f",
            )
        )
        previous = math.nan
        for r in rates:
            key = f"{prefix}sampling_r{format(r, 'g').replace('.', 'p')}_nmse"
            value = float_of(row, key)
            flag = " *" if prefix == "report_" and math.isfinite(previous) and not value < previous else ""
            cells.append(format_number(value, ".4f") + flag)
            previous = value
        return cells

    rows = []
    first = next(
        (
            r
            for _, r in last.iterrows()
            if math.isfinite(float_of(r, "zf_report_feature_random_fnr"))
            or math.isfinite(
                float_of(r, f"zf_report_sampling_r{format(rates[0], 'g').replace('.', 'p')}_nmse") if rates else False
            )
        ),
        None,
    )
    if first is not None:
        rows.append(line("zero-filled input", first, "zf_report_"))
    for _, b in res.best.iterrows():
        if b["trial_id"] in last.index:
            rows.append(line(res.label(b["trial_id"]), last.loc[b["trial_id"]], "report_"))
    headers = [
        "model",
        "feature FNR (random position)",
        "feature FNR (worst of 8)",
        "recovered contrast",
        *(f"NMSE at {r:g}×" for r in rates),
    ]
    return [
        "## Instabilities of types 2 and 3 (held-out split)",
        "",
        "Type 2, small features (after FNAF, Cheng et al. 2020): a 10-pixel disc of +50 % local contrast is "
        "inserted into the *data* (k-space of the target), measured through the volume's own mask, and "
        "reconstructed; it counts as lost when the relative error inside it exceeds 0.5 (our threshold). "
        "FNR: share of slices whose feature is lost, at the first random tissue position and at the worst of 8. "
        "Type 3, more samples: NMSE with nested per-volume masks from 8× to 2× (centre fraction as trained); "
        "* marks a step to more samples that did not lower NMSE (flagged by more than its standard error "
        "in `trials.parquet`: `report_sampling_stagnant`).",
        "",
        markdown_table(headers, rows),
        "",
    ]


def protocol_tables(res: StudyResults) -> list[str]:
    """One table per named protocol of the held-out evaluation (``report_protocol``): each trial and
    the zero-filled input under each of its attacks and budgets, *NMSE (ΔNMSE ± SE)*."""
    rob = res.robust
    if rob.empty or "protocol" not in rob:
        return []
    out = []
    for name in sorted(set(rob["protocol"].dropna()) - {""}):
        rows = {"zero-filled input": held_out(res, "zero_filled", name)}
        for _, b in res.best.iterrows():
            rows[res.label(b["trial_id"])] = held_out(res, "trained", name).query("trial_id == @b.trial_id")
        if name in rows["zero-filled input"].get("protocol", pd.Series(dtype=str)).values:
            zf = rows["zero-filled input"]  # evaluated once per trial, the same each time: the first
            rows["zero-filled input"] = zf[zf["trial_id"] == zf["trial_id"].iloc[0]]
        first = next((r for r in rows.values() if len(r)), None)
        if first is None:
            continue
        grid = list(dict.fromkeys(first[["attack", "rel", "budget_ref"]].itertuples(index=False, name=None)))
        headers = ["model"] + [
            f"{a} @ {'rel ' + format(r, '.3g') if pd.notna(r) else format(e, 'g')}" for a, r, e in grid
        ]
        cells = []
        for label, mine in rows.items():
            line = [label]
            for a, r, e in grid:
                hit = mine[(mine["attack"] == a) & ((mine["rel"] == r) if pd.notna(r) else (mine["budget_ref"] == e))]
                line.append(
                    "–"
                    if hit.empty
                    else f"{format_number(hit.iloc[0]['nmse'], '.4f')} "
                    f"({format_number(hit.iloc[0]['d_nmse'], '+.4f')} "
                    f"± {format_number(hit.iloc[0]['d_nmse_se'], '.4f')})"
                )
            cells.append(line)
        out += [
            f"## Protocol `{name}` (held-out split)",
            "",
            "NMSE under each attack of the protocol (`python -m mriadv.assess --list-protocols` gives its source "
            "and settings); *rel*: ‖δ‖/‖y‖ of the sampled k-space (‖δ‖/‖x̃‖ for image attacks).",
            "",
            markdown_table(headers, cells),
            "",
        ]
    return out
