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
    ATTACK_COLUMNS,
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
    reference_attack,
    versus_cell,
    zero_filled,
)
from study.report_held_out import instability_tables, protocol_tables

__all__ = [
    "markdown_cell",
    "markdown_table",
    "pgd_column",
    "plus_minus",
    "table1",
    "table1_attack",
    "table1_markdown",
    "write_table1",
]

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


def pgd_column(budget_ref: float, metric: str, prefix: str = "PGD") -> str:
    """Column of table1.csv: PGD at ``budget_ref`` (320x320 units); ``metric`` like ``nmse`` or ``d_nmse``;
    ``prefix``: the attack's name (:func:`table1_attack`)."""
    name = ("d" + METRIC_NAMES[metric[2:]]) if metric.startswith("d_") else METRIC_NAMES[metric]
    return f"{prefix}@{budget_ref:g} {name}"


def table1_attack(res: StudyResults) -> tuple[str, str]:
    """The attack Table 1's PGD columns hold and their name: the PGD the objectives name (image PGD,
    ``PGD``, or k-space PGD, ``PGD-k``: the unrolled network takes no image attack), as in the
    configuration tables (:func:`study.report_data.reference_attack`); image PGD otherwise."""
    found = reference_attack(res)
    attack = found[0] if found is not None and found[0] in ("pgd", "pgd_kspace") else "pgd"
    return attack, ATTACK_COLUMNS[attack]


def table1(res: StudyResults) -> pd.DataFrame:
    """Per trial at its best epoch: a Training row (the fixed training-evaluation volumes), a
    Selection row (the validation volumes early stopping chose by) and a Report row (the held-out
    split, clean and under PGD, with standard errors over volumes); and one Zero-filled row, the
    network's input itself on the report split. PGD columns only on held-out rows."""
    report = held_out(res)
    params = [p for p in res.columns if res.columns[p] != "epsilon_ref"]
    last = _last_epochs(res)
    rows = []
    zf = zero_filled(res)
    attack = table1_attack(res)
    if len(zf):
        rows.append({"trial_id": "", "model": "zero-filled input", "split": "Report", **_held_out_row(res, zf, attack)})
    for _, b in res.best.iterrows():
        common = _trial_columns(b, params, last)
        for split, prefix in (("Training", "train"), ("Selection", "val")):
            rows.append(_training_or_selection_row(b, common, split, prefix))
        mine = report[report["trial_id"] == b["trial_id"]] if len(report) else report
        rows.append({**common, "split": "Report", **_held_out_row(res, mine, attack), **_versus_input(b, last)})
    return pd.DataFrame(rows, columns=_table1_columns(res, params, attack[1]))


def _last_epochs(res: StudyResults) -> pd.DataFrame | None:
    """Each trial's row of its last epoch (None for an empty table)."""
    if not len(res.trials):
        return None
    return res.trials[res.trials["epoch"] > 0].sort_values("epoch").groupby("trial_id").last()


def _trial_columns(b: pd.Series, params: list[str], last: pd.DataFrame | None) -> dict[str, Any]:
    """The columns every row of trial ``b`` (its best epoch) shares: its budget, searched values, model,
    epoch and status, and an adversarial trial's training perturbation at its last epoch."""
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
            "last_delta_sq_over_eps": _delta_sq_over_budget(end, eps),
            "last_over_budget": float_of(end, "over_budget"),
        }
    return common


def _training_or_selection_row(b: pd.Series, common: dict[str, Any], split: str, prefix: str) -> dict[str, Any]:
    """The Training or Selection row of trial ``b``: its best epoch's ``<prefix>_*`` metrics, fastMRI's
    with their SEs and the seed's definitions."""
    row = {**common, "split": split}
    for m in METRICS:
        row[METRIC_NAMES[m]] = float_of(b, f"{prefix}_{m}")
        row[f"{METRIC_NAMES[m]} SE"] = float_of(b, f"{prefix}_{m}_se")
    for m in METRICS:
        row[f"{METRIC_NAMES[m]} (seed def.)"] = float_of(b, f"{prefix}_seed_{m}")
    return row


def _held_out_row(res: StudyResults, rows: pd.DataFrame, attack: tuple[str, str]) -> dict[str, Any]:
    """The held-out cells of a Report row from its ``robustness`` rows: clean and PGD (``attack``: its
    key and name) at every budget, with SEs over volumes, and the number of volumes."""
    key, name = attack
    row: dict[str, Any] = {}
    for m in METRICS:
        row[METRIC_NAMES[m]] = held_out_cell(rows, "clean", 0.0, m)
        row[f"{METRIC_NAMES[m]} SE"] = held_out_cell(rows, "clean", 0.0, f"{m}_se")
    for b in res.budgets:
        for m in (*METRICS, *(f"d_{m}" for m in METRICS)):
            row[pgd_column(b, m, name)] = held_out_cell(rows, key, b, m)
        row[f"{name}@{b:g} NMSE SE"] = held_out_cell(rows, key, b, "nmse_se")
        row[f"{name}@{b:g} dNMSE SE"] = held_out_cell(rows, key, b, "d_nmse_se")
    row["volumes"] = held_out_cell(rows, "clean", 0.0, "num_volumes") if "num_volumes" in rows else math.nan
    return row


def _versus_input(b: pd.Series, last: pd.DataFrame | None) -> dict[str, Any]:
    """Trial ``b`` against its zero-filled input: the held-out verdict, on the last epoch's row."""
    if last is None or b["trial_id"] not in last.index:
        return {}
    end = last.loc[b["trial_id"]]
    return {
        "NMSE / input": float_of(end, "report_vs_input_ratio"),
        "NMSE / input SE": float_of(end, "report_vs_input_ratio_se"),
        "vs input": end.get("report_vs_input") if isinstance(end.get("report_vs_input"), str) else "",
    }


def _table1_columns(res: StudyResults, params: list[str], name: str) -> list[str]:
    """table1.csv's columns, in order: the trial, its metrics, PGD (``name``) at each budget and their SEs."""
    pgd_cols = [pgd_column(b, m, name) for b in res.budgets for m in (*METRICS, *(f"d_{m}" for m in METRICS))]
    pgd_se = [f"{name}@{b:g} NMSE SE" for b in res.budgets] + [f"{name}@{b:g} dNMSE SE" for b in res.budgets]
    return (
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
    """``table1.md`` from :func:`table1`'s ``table``: the held-out numbers in the seed's layout, the
    protocol and instability tables, the selection and training volumes, and the seed's metric
    definitions beside its published Table 1."""
    out = [f"# Table 1 — {res.folder.name}", ""]
    if table.empty:
        out += ["No trial has a finished epoch yet: nothing to tabulate.", ""]
        return "\n".join(out)
    params = [p for p in res.columns if res.columns[p] != "epsilon_ref"]
    split = held_out_split(res)
    rep = table[table["split"] == "Report"]
    out += _held_out_intro(res, split, rep)
    out += [_held_out_table(res, rep, params), ""]
    out += protocol_tables(res)
    out += instability_tables(res)
    sel = table[table["split"].isin(["Training", "Selection"])]
    out += _selection_section(sel, params)
    out += _seed_definitions_section(table, sel, params)
    return "\n".join(out)


def _held_out_intro(res: StudyResults, split: str | None, rep: pd.DataFrame) -> list[str]:
    """The paragraph that says what the held-out table shows (and, before any held-out evaluation,
    that its rows are empty)."""
    crop = res.crop
    out = [
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
        "*‖δ‖²/ε*: the mean training perturbation at the last epoch relative to its budget (in k-space, each "
        "slice's budget, relative to its measurements) (*over*: the share of training images outside the ball).",
        "",
    ]
    if split is None:
        out += [
            (
                "No trial has a held-out evaluation yet (it runs at a trial's last epoch): the Report rows are "
                "empty; see the Selection rows below, which early stopping chose by."
            ),
            "",
        ]
    return out


def _held_out_table(res: StudyResults, rep: pd.DataFrame, params: list[str]) -> str:
    """The held-out (Report) rows in the seed's layout, the zero-filled input first."""
    headers = ["ε (320²)", "RMS/px", *params, "Process", "epoch", "‖δ‖²/ε (over)", "NMSE", "PSNR", "SSIM"]
    headers += ["NMSE / input"]
    name = table1_attack(res)[1]
    for b in res.budgets:
        headers += [f"{name}@{b:g} NMSE", f"{name}@{b:g} PSNR", f"{name}@{b:g} SSIM"]
    return markdown_table(headers, [_held_out_cells(res, r, params, name) for _, r in rep.iterrows()])


def _held_out_cells(res: StudyResults, r: pd.Series, params: list[str], name: str) -> list[str]:
    """One row of the held-out table: the trial, its clean numbers ± SE, its ratio to the input and,
    at each budget, PGD's attacked value (and its change from clean)."""
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
            value, delta = r[pgd_column(b, m, name)], r[pgd_column(b, "d_" + m, name)]
            extra = (
                f" ± {format_number(r[f'{name}@{b:g} dNMSE SE'], spec)}"
                if m == "nmse" and format_number(r[f"{name}@{b:g} dNMSE SE"], spec) != "–"
                else ""
            )
            cells.append(f"{format_number(value, spec)} ({format_number(delta, '+' + spec)}{extra})")
    return cells


def _selection_section(sel: pd.DataFrame, params: list[str]) -> list[str]:
    """The same best epochs on the Selection and Training volumes (``sel``), with a word on why the
    held-out table is the one to report."""
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
    return [
        "## Selection and training volumes",
        "",
        (
            "The same best epochs on the volumes they were chosen by (*Selection*: the validation volumes of early "
            "stopping, `best.pt` and the search) and on the fixed training-evaluation volumes (*Training*). The "
            "epoch was chosen on the selection volumes, so their numbers tend to flatter it (by how much depends "
            "on the volumes: the two parts are exchangeable, not equal); report the held-out table above."
        ),
        "",
        markdown_table(["ε (320²)", *params, "Process", "epoch", "NMSE", "PSNR", "SSIM"], rows),
        "",
    ]


def _seed_definitions_section(table: pd.DataFrame, sel: pd.DataFrame, params: list[str]) -> list[str]:
    """The Selection and Training rows (``sel``) in the seed's own metric definitions, and the seed's
    published Table 1 for reference."""
    out = ["## The seed's metric definitions", "", METRIC_DEFINITIONS, ""]
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
    return out


def _delta_sq_over_budget(end: pd.Series, eps: float) -> float:
    """The training perturbation's mean ``||delta||^2`` over its budget: the record's own ratio, which in
    k-space is over each slice's budget; ``delta_sq / epsilon`` for records written before it (exact in
    the image, not in k-space, whose budget is relative to each slice's measurements)."""
    ratio = float_of(end, "delta_sq_budget")
    return ratio if math.isfinite(ratio) else float_of(end, "delta_sq") / eps
