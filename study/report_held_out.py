"""The report's held-out tables that follow Table 1: one per named attack protocol
(``report_protocol``) and the seed's instabilities of types 2 and 3."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from mriadv.intervals import LEVEL, interval
from study.report_data import StudyResults, float_of, format_number, held_out, markdown_table, plus_minus
from study.report_seeds import configurations, standard_configurations

FEATURE_ATTACKS = ("feature_random", "feature_worst")  # a small feature at a random tissue position; worst of 8


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

    flags = _stagnant_flags(res)

    def line(label: str, row: pd.Series, prefix: str, trial: str | None = None) -> list[str]:
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
        for r in rates:
            key = f"{prefix}sampling_r{format(r, 'g').replace('.', 'p')}_nmse"
            flag = " *" if flags.get((trial, "trained" if prefix == "report_" else "zero_filled", r)) else ""
            cells.append(format_number(float_of(row, key), ".4f") + flag)
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
        rows.append(line("zero-filled input", first, "zf_report_", str(first.name)))
    for _, b in res.best.iterrows():
        if b["trial_id"] in last.index:
            rows.append(line(res.label(b["trial_id"]), last.loc[b["trial_id"]], "report_", b["trial_id"]))
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
        "* marks a step to more samples that did not lower NMSE by more than its paired standard error over "
        "volumes (each step's difference and SE: `d_nmse`, `d_nmse_se` of the `sampling` rows of "
        "`robustness.parquet`).",
        "",
        markdown_table(headers, rows),
        "",
        *_fnr_notes(res),
    ]


def _stagnant_flags(res: StudyResults) -> dict[tuple[str, str, float], bool]:
    """``(trial id, model, acceleration) -> stagnant``: the step to this acceleration from the next
    fewer samples did not lower NMSE by more than its paired SE (stored per held-out sampling row)."""
    rob = res.robust
    if rob.empty or "stagnant" not in rob or "acceleration" not in rob:
        return {}
    rows = rob[(rob["attack"] == "sampling") & rob["split"].isin(("report", "test"))]
    return {
        (str(r.trial_id), str(r.model), float(r.acceleration)): bool(r.stagnant)
        for r in rows.itertuples()
        if pd.notna(r.stagnant)
    }


def _fnr_notes(res: StudyResults) -> list[str]:
    """Feature FNRs of each configuration against the reference (standard) one, paired by training seed
    and volume (``volume_fnr``): the mean difference with its 95 % t-interval over seeds and volumes
    (:func:`mriadv.intervals.interval`; over the volumes alone with one seed); and a note where the
    worst-position FNR is the same for every model."""
    rob = res.robust
    if rob.empty or "fnr" not in rob:
        return []
    rows = rob[rob["attack"].isin(FEATURE_ATTACKS) & (rob["model"] == "trained")]
    rows = rows[rows["split"].isin(("report", "test"))]
    out = []
    worst = rows[rows["attack"] == "feature_worst"]["fnr"]
    if len(worst) > 1 and worst.nunique() == 1:
        out.append(
            f"- The worst-of-8 FNR is {float(worst.iloc[0]):.2f} for every model: at this contrast and size the "
            "search finds a lost feature in every slice, so this column cannot rank the models."
        )
    groups = configurations(res)
    standard = standard_configurations(res, groups)
    if not standard or "volume_fnr" not in rows:  # per-volume rates: recorded since issue 20
        return out + ([""] if out else [])
    rows = rows[rows["volume_fnr"].fillna("").ne("")]
    rates = {(str(t), a): json.loads(v) for t, a, v in rows[["trial_id", "attack", "volume_fnr"]].values}
    ref, lines = groups[standard[0]], []
    for label, seeds in groups.items():
        pairs = [(seeds[s], ref[s]) for s in sorted(set(seeds) & set(ref))]
        if label == standard[0] or not pairs:
            continue
        cells = []
        for kind in FEATURE_ATTACKS:
            if not all((a, kind) in rates and (b, kind) in rates for a, b in pairs):
                continue
            volumes = sorted(set.intersection(*(set(rates[(a, kind)]) & set(rates[(b, kind)]) for a, b in pairs)))
            if volumes:
                d = np.array([[rates[(a, kind)][v] - rates[(b, kind)][v] for v in volumes] for a, b in pairs])
                cells.append(f"{kind.removeprefix('feature_')} {interval(d).text('+.2f')}")
        if cells:
            lines.append(f"- {label} ({len(pairs)} seed{'s' if len(pairs) > 1 else ''}): " + "; ".join(cells))
    if lines:
        out += [
            f"Feature FNR minus the standard configuration's ({standard[0]}), paired by training seed and volume: "
            f"mean ± half-width of the {LEVEL:.0%} t-interval over seeds and volumes (over the volumes alone "
            "with one seed):",
            "",
            *lines,
        ]
    return out + ([""] if out else [])


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
