"""The report's ``summary.md``: the study, its best trials and their checkpoints, every trial's
status and message, and the files written. Paths are relative to the study folder
(:meth:`study.report_data.StudyResults.shown`), so a copied or committed report stays valid.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mriadv.verdict import study_warning
from study.analysis import behind_input, best_trials, finished_trials, input_verdicts, trial_messages, trial_status
from study.layout import HPARAM_KEYS, REFERENCE_INIT, ROBUSTNESS_FILE, TRIALS_FILE
from study.reference import reference_trial_id
from study.report_data import (
    StudyResults,
    attack_column,
    format_number,
    format_value,
    held_out,
    held_out_cell,
    held_out_split,
    is_present,
    reference_attack,
    versus_cell,
    zero_filled,
)
from study.report_plots import ParetoPoints
from study.report_tables import markdown_cell, markdown_table, plus_minus

STATUS_ORDER = ("TERMINATED", "early_stopped", "nan", "ERROR", "RUNNING")


def summary_markdown(
    res: StudyResults, written: list[str], points: ParetoPoints | None, over_seeds: list[str] | None = None
) -> str:
    """``over_seeds``: the configurations' section (:mod:`study.report_seeds`), after the best trials."""
    return "\n".join(
        [
            *_summary_head(res),
            *_summary_best(res, points),
            *(over_seeds or []),
            *_summary_trials(res),
            *_summary_files(res, written),
        ]
    )


def _summary_head(res: StudyResults) -> list[str]:
    st = res.state or {}
    base = st.get("base") or {}
    out = [
        f"# Study report: {res.folder.name}",
        "",
        f"- folder: `{res.folder.name}/`, the study folder (the paths below are relative to it)",
    ]
    if st:
        budgets = ", ".join(f"{b:g}" for b in res.budgets) or "–"
        space = res.shown(st["space_path"]) if st.get("space_path") else "?"
        space = Path(space).name if Path(space).is_absolute() else space  # elsewhere: its text is in study.json
        out += [
            f"- space: {st.get('space', '?')} (`{space}`)" + (f": {res.description}" if res.description else ""),
            f"- searched: {', '.join(res.columns) or '–'}; objectives: "
            + ", ".join(f"{m} ({mode})" for m, mode in res.objectives),
            f"- profile: {st.get('profile', '?')}; data: `{res.shown(base['data']) if base.get('data') else '?'}`; "
            f"crop {base.get('crop_size', '?')}; attack budgets (320² units): {budgets}",
            f"- started: {st.get('created', '?')}",
        ]
    counts = trial_status(res.trials).value_counts().to_dict()
    order = [s for s in STATUS_ORDER if s in counts] + sorted(set(counts) - set(STATUS_ORDER))
    out += [
        f"- trials: {sum(counts.values())}"
        + (" (" + ", ".join(f"{counts[s]} {s or 'unknown'}" for s in order) + ")" if counts else ""),
        "",
    ]
    if res.notes:
        out += ["## Notes", "", *(f"- {res.shown_text(n)}" for n in res.notes), ""]
    return out


def _summary_best(res: StudyResults, points: ParetoPoints | None) -> list[str]:
    out = ["## Best trials", ""]
    if res.best.empty:
        return out + ["No trial has a finished epoch yet.", ""]
    split = held_out_split(res)
    out += [
        "Chosen by each objective on the *selection* split (every trial's best epoch: lowest selection loss, "
        "the epoch in `best.pt`); the metrics beside are that epoch's held-out "
        f"{split or 'report'}-split evaluation (± standard error over volumes), which nothing was chosen by.",
        "",
    ]
    report = held_out(res)
    versus = input_verdicts(res.trials)
    attack, top = _attack(res)
    by_id = res.best.sort_values("trial_id").reset_index(drop=True)  # ties: the runner's summary's pick
    picks = best_trials(by_id, res.objectives)
    rows = []
    for metric, row in picks.items():
        ckpt = res.best_pt(row["trial_id"])
        tied = by_id.loc[(by_id[metric] == row[metric]) & (by_id["trial_id"] != row["trial_id"]), "trial_id"]
        mine = report[report["trial_id"] == row["trial_id"]] if len(report) else report
        rows.append(
            [
                f"{metric} ({dict(res.objectives)[metric]})",
                row["trial_id"] + (f" (tied with {', '.join(tied)})" if len(tied) else ""),
                res.label(row["trial_id"]),
                str(int(row["epoch"])),
                format_number(row[metric], ".5g"),
                _measured(mine, "clean", 0.0, "nmse", ".4f"),
                _measured(mine, "clean", 0.0, "psnr", ".2f"),
                _measured(mine, "clean", 0.0, "ssim", ".4f"),
                _measured(mine, attack, top, "nmse", ".4f") if top else "–",
                versus_cell(*versus.loc[row["trial_id"], ["ratio", "ratio_se", "verdict"]])
                if row["trial_id"] in versus.index
                else "–",
                f"`{res.shown(ckpt)}`" if ckpt else "missing (no best.pt)",
            ]
        )
    zf = zero_filled(res)
    if len(zf):
        rows.insert(
            0,
            [
                "(baseline)",
                "zero-filled input",
                "–",
                "–",
                "–",
                _measured(zf, "clean", 0.0, "nmse", ".4f"),
                _measured(zf, "clean", 0.0, "psnr", ".2f"),
                _measured(zf, "clean", 0.0, "ssim", ".4f"),
                _measured(zf, attack, top, "nmse", ".4f") if top else "–",
                "1",
                "–",
            ],
        )
    out += [
        markdown_table(
            [
                "objective",
                "trial",
                "searched values",
                "best epoch",
                "selection value",
                "NMSE",
                "PSNR",
                "SSIM",
                attack_column(attack, top, "NMSE"),
                "NMSE / input",
                "checkpoint",
            ],
            rows,
        ),
        "",
    ]
    out += _versus_notes(versus)
    keys = list(dict.fromkeys([*HPARAM_KEYS, *(c for c in res.columns.values() if c != "epsilon_ref")]))
    for trial_id in dict.fromkeys(row["trial_id"] for row in picks.values()):
        row = by_id[by_id["trial_id"] == trial_id].iloc[0]
        values = ", ".join(f"{k}={format_value(row[k])}" for k in keys if k in row and is_present(row[k]))
        out += [f"- {trial_id} hyperparameters: {values} (its full config is stored in its best.pt)"]
    missing = [m for m, _ in res.objectives if m not in picks]
    out += [""] + ([f"No trial has a value for {', '.join(missing)}.", ""] if missing else [])
    if points is not None:
        front = [t for t, on in zip(points.trial_ids, points.front) if on]
        near = points.near_front()
        out += [
            f"Pareto front of held-out clean NMSE vs {points.y_metric} (finished trials only): "
            + (", ".join(f"{t} ({res.label(t)})" for t in front) or "none")
            + (
                "; off it, but beaten by no trial by more than two standard errors in both coordinates (membership "
                "within noise): " + ", ".join(f"{t} ({res.label(t)})" for t in near)
                if near
                else ""
            ),
            "",
        ]
    return out


def _attack(res: StudyResults) -> tuple[str, float | None]:
    """The attack of the summary's attacked column, the one the objectives name (image PGD unless they
    name another: :func:`study.report_data.reference_attack`), at the largest budget."""
    found = reference_attack(res)
    return (found[0] if found else "pgd"), (max(res.budgets) if res.budgets else None)


def _measured(rows, attack: str, budget: float | None, metric: str, spec: str) -> str:
    """``value ± se`` of ``metric`` in the held-out ``rows`` under ``attack`` at ``budget``."""
    return plus_minus(
        held_out_cell(rows, attack, budget, metric), held_out_cell(rows, attack, budget, f"{metric}_se"), spec
    )


def _summary_trials(res: StudyResults) -> list[str]:
    statuses = trial_status(res.trials)
    out = ["## Trials", ""]
    if statuses.empty:
        return out + ["None reported.", ""]
    best = res.best.set_index("trial_id") if not res.best.empty else res.best
    epochs = res.trials[res.trials["epoch"] > 0].groupby("trial_id")["epoch"].max()
    cost = (
        res.trials[res.trials["epoch"] > 0].groupby("trial_id")["train_time_s"].mean()
        if "train_time_s" in res.trials
        else {}
    )
    minutes = _minutes(res)
    ids = list(res.best["trial_id"] if not res.best.empty else []) + sorted(set(statuses.index) - set(best.index))
    rob = held_out(res)
    attack, top = _attack(res)
    pgd = rob[(rob["attack"] == attack) & (rob["budget_ref"] == top)].set_index("trial_id")["nmse"] if len(rob) else {}
    clean = rob[rob["attack"] == "clean"].set_index("trial_id")["nmse"] if len(rob) else {}
    finished = finished_trials(res.trials)
    messages = trial_messages(res.trials)
    rows = []
    for t in ids:
        status = statuses.get(t, "?")
        if status == "TERMINATED" and t not in finished:
            status += " (stopped by the scheduler)"
        ckpt = res.best_pt(t)
        b = best.loc[t] if t in best.index else {}
        rows.append(
            [
                t,
                res.label(t),
                status,
                str(int(epochs.get(t, 0))),
                format_number(cost.get(t), ".1f"),
                minutes.get(t, "–"),
                format_number(b.get("epoch"), ".0f"),
                format_number(b.get("val_nmse"), ".4f"),
                format_number(clean.get(t), ".4f"),
                format_number(pgd.get(t), ".4f"),
                f"`{res.shown(ckpt)}`" if ckpt else "missing",
                markdown_cell(res.shown_text(messages.get(t, ""))),
            ]
        )
    headers = [
        "trial",
        "searched values",
        "status",
        "epochs",
        "train s/epoch",
        "minutes",
        "best epoch",
        "selection NMSE",
        "report NMSE",
        "report " + attack_column(attack, top, "NMSE"),
        "best.pt",
        "message",
    ]
    return out + [markdown_table(headers, rows), ""]


def _minutes(res: StudyResults) -> dict[str, str]:
    """Each trial's cost in minutes (its epochs' times: training, evaluation, attacks, the held-out
    report); a trial that fine-tuned the space's reference (``init_from: reference``) also cost the
    reference's minutes, shown added (once for all of them)."""
    if "epoch_time_s" not in res.trials:
        return {}
    rows = res.trials[res.trials["epoch"] > 0]
    own = rows.groupby("trial_id")["epoch_time_s"].sum() / 60.0
    out = {t: format_number(m, ".1f") for t, m in own.items()}
    ref = reference_trial_id(res.folder)  # the driver's record of the space's reference trial
    if ref in own and "init_from" in rows:
        for t in rows.loc[rows["init_from"] == REFERENCE_INIT, "trial_id"].unique():
            out[t] = f"{own[t]:.1f} + {own[ref]:.1f} (reference)"
    return out


def _summary_files(res: StudyResults, written: list[str]) -> list[str]:
    describe = {
        "table1.md": "the seed's Table 1 for this study (and the seed's metric definitions)",
        "table1.csv": "the same, every number",
        "figure6.png": "the seed's Figure 6 (worst-case perturbations)",
        "features.png": "a small feature inserted into the data, and what each model makes of it",
        "robustness.png": "NMSE / SSIM versus attack budget",
        "pareto.png": "clean versus attacked NMSE",
        "curves.png": "metrics per epoch",
    }
    return [
        "## Files",
        "",
        *(f"- [{name}]({name}): {text}" for name, text in describe.items() if name in written),
        f"- tables: `{TRIALS_FILE}`, `{ROBUSTNESS_FILE}`",
        "- TensorBoard, in the study folder: `tensorboard --logdir .`",
        "",
    ]


def _versus_notes(versus: pd.DataFrame) -> list[str]:
    """Every trial whose model does not beat its input, and the study's warning when none does."""
    out = []
    behind = behind_input(versus)
    if behind:
        count, listing = behind
        out += [
            f"**{count} models do not beat their own zero-filled input** on the held-out volumes (NMSE lower "
            f"and SSIM higher, each by more than two paired SEs): {listing}. Their robustness numbers describe "
            "models that add nothing to their input.",
            "",
        ]
    warning = study_warning(list(versus["verdict"]))
    return out + ([f"> {warning}", ""] if warning else [])
