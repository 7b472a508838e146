"""The report's tables: the seed's Table 1 (``table1.csv``, ``table1.md``) with the protocol and
instability tables that follow it, and the Markdown helpers the summary shares.

Table 1 (Huang & Liang) has a Training, a Selection and a Report row per trial at its best epoch and
one row for the zero-filled input; the seed's own metric definitions are a separate, labelled column
set (:data:`METRIC_DEFINITIONS`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from study.report_data import (
    METRIC_NAMES,
    METRICS,
    SPLIT_NAMES,
    StudyResults,
    float_of,
    format_number,
    format_value,
    held_out,
    held_out_cell,
    held_out_split,
    markdown_cell,
    markdown_table,
    plus_minus,
    versus_cell,
    zero_filled,
)
from study.report_held_out import instability_tables, protocol_tables

__all__ = ["markdown_cell", "markdown_table", "plus_minus", "pgd_column", "table1", "table1_markdown", "write_table1"]

# The seed's Table 1 (Huang & Liang), its own metric definitions, fastMRI single-coil knee, 320x320.
SEED_TABLE1 = (
    ("0", "Training-S", 0.21083, 25.64586, 0.64354),
    ("0", "Validation-S", 0.23234, 25.35955, 0.62848),
    ("1000", "Training-A", 0.19351, 25.87200, 0.63597),
    ("1000", "Validation-A", 0.21883, 25.19485, 0.60633),
    ("5000", "Training-A", 0.22061, 25.10864, 0.61624),
    ("5000", "Validation-A", 0.23862, 24.87306, 0.60115),
)
METRIC_DEFINITIONS = (
    "NMSE, PSNR and SSIM are fastMRI's definitions: computed per volume on de-normalised magnitude images "
    "(PSNR and SSIM with the volume's maximum as data range) and averaged over volumes. The columns marked "
    '"(seed def.)" repeat the seed\'s published evaluation instead: per mini-batch, on the normalised and '
    "clamped network tensors, with prediction and reference swapped (NMSE divided by the prediction's energy, "
    "PSNR's peak and SSIM's range taken from the prediction), averaged over batches. Only the \"(seed def.)\" "
    "numbers can be set beside the seed's Table 1, and the two sets cannot be compared with each other."
)


def pgd_column(budget_ref: float, metric: str) -> str:
    """Column of table1.csv: PGD at ``budget_ref`` (320x320 units); ``metric`` like ``nmse`` or ``d_nmse``."""
    name = ("d" + METRIC_NAMES[metric[2:]]) if metric.startswith("d_") else METRIC_NAMES[metric]
    return f"PGD@{budget_ref:g} {name}"


def table1(res: StudyResults) -> pd.DataFrame:
    """Per trial at its best epoch: a Training row (the fixed training-evaluation volumes), a
    Selection row (the validation volumes early stopping chose by) and a Report row (the held-out
    split, clean and under PGD, with standard errors over volumes); and one Zero-filled row, the
    network's input itself on the report split. PGD columns only on held-out rows."""
    report = held_out(res)
    pgd_cols = [pgd_column(b, m) for b in res.budgets for m in (*METRICS, *(f"d_{m}" for m in METRICS))]
    pgd_se = [f"PGD@{b:g} NMSE SE" for b in res.budgets] + [f"PGD@{b:g} dNMSE SE" for b in res.budgets]
    params = [p for p in res.columns if res.columns[p] != "epsilon_ref"]
    last = (
        res.trials[res.trials["epoch"] > 0].sort_values("epoch").groupby("trial_id").last() if len(res.trials) else None
    )

    def held_out_row(rows: pd.DataFrame) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for m in METRICS:
            row[METRIC_NAMES[m]] = held_out_cell(rows, "clean", 0.0, m)
            row[f"{METRIC_NAMES[m]} SE"] = held_out_cell(rows, "clean", 0.0, f"{m}_se")
        for b in res.budgets:
            for m in (*METRICS, *(f"d_{m}" for m in METRICS)):
                row[pgd_column(b, m)] = held_out_cell(rows, "pgd", b, m)
            row[f"PGD@{b:g} NMSE SE"] = held_out_cell(rows, "pgd", b, "nmse_se")
            row[f"PGD@{b:g} dNMSE SE"] = held_out_cell(rows, "pgd", b, "d_nmse_se")
        row["volumes"] = held_out_cell(rows, "clean", 0.0, "num_volumes") if "num_volumes" in rows else math.nan
        return row

    rows = []
    zf = zero_filled(res)
    if len(zf):
        rows.append({"trial_id": "", "model": "zero-filled input", "split": "Report", **held_out_row(zf)})
    for _, b in res.best.iterrows():
        eps = float_of(b, "epsilon")
        common: dict[str, Any] = {
            "trial_id": b["trial_id"],
            "epsilon_ref": float_of(b, "epsilon_ref"),
            "epsilon_rms": float_of(b, "epsilon_rms"),
        }
        common |= {p: b.get(p) for p in params}
        common |= {
            "model": "standard" if eps == 0 else ("adversarial" if eps > 0 else "?"),
            "best_epoch": int(b["epoch"]),
            "status": b.get("status", ""),
        }
        if last is not None and b["trial_id"] in last.index and eps > 0:
            end = last.loc[b["trial_id"]]
            common |= {
                "last_delta_sq_over_eps": float_of(end, "delta_sq") / eps,
                "last_over_budget": float_of(end, "over_budget"),
            }
        for split, prefix in (("Training", "train"), ("Selection", "val")):
            row = {**common, "split": split}
            for m in METRICS:
                row[METRIC_NAMES[m]] = float_of(b, f"{prefix}_{m}")
                row[f"{METRIC_NAMES[m]} SE"] = float_of(b, f"{prefix}_{m}_se")
            for m in METRICS:
                row[f"{METRIC_NAMES[m]} (seed def.)"] = float_of(b, f"{prefix}_seed_{m}")
            rows.append(row)
        mine = report[report["trial_id"] == b["trial_id"]] if len(report) else report
        versus = {}
        if last is not None and b["trial_id"] in last.index:  # the held-out verdict is on the last epoch's row
            end = last.loc[b["trial_id"]]
            versus = {
                "NMSE / input": float_of(end, "report_vs_input_ratio"),
                "NMSE / input SE": float_of(end, "report_vs_input_ratio_se"),
                "vs input": end.get("report_vs_input") if isinstance(end.get("report_vs_input"), str) else "",
            }
        rows.append({**common, "split": "Report", **held_out_row(mine), **versus})
    columns = (
        [
            "trial_id",
            "epsilon_ref",
            "epsilon_rms",
            *params,
            "model",
            "split",
            "best_epoch",
            "status",
            "last_delta_sq_over_eps",
            "last_over_budget",
            "volumes",
            "NMSE / input",
            "NMSE / input SE",
            "vs input",
        ]
        + [METRIC_NAMES[m] for m in METRICS]
        + [f"{METRIC_NAMES[m]} SE" for m in METRICS]
        + [f"{METRIC_NAMES[m]} (seed def.)" for m in METRICS]
        + pgd_cols
        + pgd_se
    )
    return pd.DataFrame(rows, columns=columns)


def write_table1(res: StudyResults, out: Path) -> pd.DataFrame:
    """``table1.csv`` (every number) and ``table1.md`` (the seed's layout) in ``out``."""
    table = table1(res)
    table.to_csv(out / "table1.csv", index=False)
    (out / "table1.md").write_text(table1_markdown(res, table))
    return table


def _process(row: pd.Series) -> str:
    suffix = {"standard": "-S", "adversarial": "-A"}.get(row["model"], "")
    return {"Selection": "Validation"}.get(row["split"], row["split"]) + suffix


def table1_markdown(res: StudyResults, table: pd.DataFrame) -> str:
    out = [f"# Table 1 — {res.folder.name}", ""]
    if table.empty:
        out += ["No trial has a finished epoch yet: nothing to tabulate.", ""]
        return "\n".join(out)
    params = [p for p in res.columns if res.columns[p] != "epsilon_ref"]
    crop = res.crop
    split = held_out_split(res)
    rep = table[table["split"] == "Report"]
    out += [
        f"**Numbers from the {SPLIT_NAMES.get(split or '', 'report split')}**"
        + (f", {int(rep['volumes'].max())} volumes" if rep["volumes"].notna().any() else "")
        + ". "
        "Each trial's best epoch (lowest loss on the *selection* split; the networks saved as its `best.pt`), "
        "evaluated once on the held-out split. ε is the training budget ‖δ‖² in the seed's units (320×320 images); "
        "*RMS/px* is the same budget as a per-pixel RMS in normalised units"
        f"{f' (the runs used {crop}×{crop} crops)' if crop else ''}. *-S*: standard training (ε = 0), *-A*: "
        "adversarial training; *zero-filled*: the network's input itself, |F⁻¹P(y)|, what every model must beat. "
        "PGD columns: L2 PGD of budget ‖δ‖² = b (320×320 units), each cell *attacked value (attacked − clean)*. "
        "± is the standard error over volumes (of the paired per-volume differences for the degradation). "
        "*NMSE / input*: the model's NMSE over its zero-filled input's on the same volumes (± paired SE), and "
        "**worse than its input** where its NMSE is higher or its SSIM lower by more than two paired SEs "
        "(*≈ input*: within them; such a model's robustness numbers say little). "
        "*‖δ‖²/ε*: the generator's mean training perturbation at the last epoch relative to the budget "
        "(*over*: the share of training images outside the ε-ball).",
        "",
    ]
    if split is None:
        out += [
            "No trial has a held-out evaluation yet (it runs at a trial's last epoch): the Report rows are "
            "empty; see the Selection rows below, which early stopping chose by.",
            "",
        ]
    headers = ["ε (320²)", "RMS/px", *params, "Process", "epoch", "‖δ‖²/ε (over)", "NMSE", "PSNR", "SSIM"]
    headers += ["NMSE / input"]
    for b in res.budgets:
        headers += [f"PGD@{b:g} NMSE", f"PGD@{b:g} PSNR", f"PGD@{b:g} SSIM"]
    rows = []
    for _, r in rep.iterrows():
        zf = r["model"] == "zero-filled input"
        ratio = (
            ""
            if zf or not math.isfinite(float_of(r, "last_delta_sq_over_eps"))
            else f"{format_number(r['last_delta_sq_over_eps'], '.2f')} ({format_number(r['last_over_budget'], '.0%')})"
        )
        cells = (
            ["–", "–", *("" for _ in params), "Zero-filled", "–", ""]
            if zf
            else [
                format_number(r["epsilon_ref"], "g"),
                format_number(r["epsilon_rms"], ".3f"),
                *(format_value(r[p]) for p in params),
                _process(r),
                format_number(r["best_epoch"], ".0f"),
                ratio,
            ]
        )
        cells += [
            plus_minus(r["NMSE"], r["NMSE SE"], ".4f"),
            plus_minus(r["PSNR"], r["PSNR SE"], ".2f"),
            plus_minus(r["SSIM"], r["SSIM SE"], ".4f"),
            "1" if zf else versus_cell(r.get("NMSE / input"), r.get("NMSE / input SE"), r.get("vs input")),
        ]
        for b in res.budgets:
            for m, spec in (("nmse", ".4f"), ("psnr", ".2f"), ("ssim", ".4f")):
                value, delta = r[pgd_column(b, m)], r[pgd_column(b, "d_" + m)]
                extra = (
                    f" ± {format_number(r[f'PGD@{b:g} dNMSE SE'], spec)}"
                    if m == "nmse" and format_number(r[f"PGD@{b:g} dNMSE SE"], spec) != "–"
                    else ""
                )
                cells.append(f"{format_number(value, spec)} ({format_number(delta, '+' + spec)}{extra})")
        rows.append(cells)
    out += [markdown_table(headers, rows), ""]

    out += protocol_tables(res)
    out += instability_tables(res)
    out += [
        "## Selection and training volumes",
        "",
        "The same best epochs on the volumes they were chosen by (*Selection*: the validation volumes of early "
        "stopping, `best.pt` and the search) and on the fixed training-evaluation volumes (*Training*). The epoch "
        "was chosen on the selection volumes, so their numbers tend to flatter it (by how much depends on the "
        "volumes: the two parts are exchangeable, not equal); report the held-out table above.",
        "",
    ]
    sel = table[table["split"].isin(["Training", "Selection"])]
    rows = [
        [
            format_number(r["epsilon_ref"], "g"),
            *(format_value(r[p]) for p in params),
            _process(r),
            format_number(r["best_epoch"], ".0f"),
            plus_minus(r["NMSE"], r["NMSE SE"], ".4f"),
            plus_minus(r["PSNR"], r["PSNR SE"], ".2f"),
            plus_minus(r["SSIM"], r["SSIM SE"], ".4f"),
        ]
        for _, r in sel.iterrows()
    ]
    out += [markdown_table(["ε (320²)", *params, "Process", "epoch", "NMSE", "PSNR", "SSIM"], rows), ""]

    out += ["## The seed's metric definitions", "", METRIC_DEFINITIONS, ""]
    seed_cols = [f"{METRIC_NAMES[m]} (seed def.)" for m in METRICS]
    rows = [
        [
            format_number(r["epsilon_ref"], "g"),
            *(format_value(r[p]) for p in params),
            _process(r),
            *(format_number(r[c], ".5f") for c in seed_cols),
        ]
        for _, r in sel.iterrows()
    ]
    out += [markdown_table(["ε (320²)", *params, "Process", *seed_cols], rows), ""]
    if table.loc[table["split"] == "Training", seed_cols].isna().all().all():
        out += ["(No seed-definition numbers were recorded for the Training rows.)", ""]
    out += [
        "For reference, the seed's published Table 1 (fastMRI single-coil knee, 320×320, its definitions):",
        "",
        markdown_table(
            ["ε", "Process", "NMSE", "PSNR", "SSIM"],
            [[e, p, f"{n:.5f}", f"{q:.5f}", f"{s:.5f}"] for e, p, n, q, s in SEED_TABLE1],
        ),
        "",
    ]
    return "\n".join(out)
