"""The report of a finished (or running, or broken) study: the seed's Table 1 and Figure 6, and more.

    python study/report.py results/<name>        (or: mriadv-report results/<name>)

writes ``results/<name>/report/``:

* ``table1.md``, ``table1.csv`` — Huang & Liang's Table 1 for this study: a Training and a
  Validation row per trial at its best epoch (lowest validation loss, the networks in ``best.pt``),
  with fastMRI's NMSE / PSNR / SSIM, the same under PGD at each attack budget and the degradation
  (validation only), and the seed's own metric definitions as a separate, labelled column set;
* ``figure6.png`` — the seed's Figure 6 (:mod:`study.figure6`): for one validation slice and each
  adversarially trained trial, the worst-case (PGD) perturbation at the trial's epsilon and the
  reconstructions of the adversarially trained and the standard (epsilon = 0) model under their own
  worst cases;
* ``robustness.png`` — NMSE and SSIM versus attack budget (PGD, and random noise of equal norm);
* ``pareto.png`` — clean versus attacked NMSE over the trials, Pareto front marked;
* ``curves.png`` — validation metrics and training loss per epoch;
* ``summary.md`` — the study, its best trials and their checkpoints, trial statuses and errors; it
  names files relative to the study folder, so a copied or committed report stays valid.

Whatever is missing (a study still running, errored trials, lost checkpoints) gives a report of
what exists, with a note in ``summary.md`` and on stdout. Exit status: 0 report written (possibly
partial), 2 the folder does not exist or is not a study folder. Budgets are shown in the seed's
units, squared L2 norms for 320x320 images (``epsilon_ref``, ``budget_ref``), beside the per-pixel
RMS in normalised units.

Only pandas and matplotlib (object API, Agg canvas, no pyplot state) are imported here; Figure 6,
which loads the networks with torch, is imported when it is drawn.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # `python study/report.py`: make the repository importable
    sys.path.insert(0, str(REPO))

from mriadv.config import REFERENCE_CROP  # noqa: E402 - the seed's crop; light (no torch)
from study.analysis import (at_best_epochs, best_epochs, best_trials, failed_trials, finished_trials,  # noqa: E402
                            identical_trials, pareto_front, trial_messages, trial_status)
from study.tables import load_tables  # noqa: E402
from study.layout import (HPARAM_KEYS, REPORT_DIR, ROBUSTNESS_FILE, STATE_FILE, TRIALS_FILE, TUNER_FILE,  # noqa: E402
                          best_checkpoint, trial_folder)

REPORT_FILES = ("summary.md", "table1.md", "table1.csv", "figure6.png", "features.png", "robustness.png", "pareto.png",
                "curves.png", "protocol_curves.png")
METRICS = ("nmse", "psnr", "ssim")
DEFENCE_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
METRIC_NAMES = {"nmse": "NMSE", "psnr": "PSNR", "ssim": "SSIM"}
ATTACK_NAMES = {"pgd": "PGD", "pgd_kspace": "k-space PGD", "noise": "random noise",
                "generator": "the trial's generator"}
STATUS_ORDER = ("TERMINATED", "early_stopped", "nan", "ERROR", "RUNNING")
DPI = 100
# The seed's Table 1 (Huang & Liang), its own metric definitions, fastMRI single-coil knee, 320x320.
SEED_TABLE1 = (
    ("0", "Training-S", 0.21083, 25.64586, 0.64354), ("0", "Validation-S", 0.23234, 25.35955, 0.62848),
    ("1000", "Training-A", 0.19351, 25.87200, 0.63597), ("1000", "Validation-A", 0.21883, 25.19485, 0.60633),
    ("5000", "Training-A", 0.22061, 25.10864, 0.61624), ("5000", "Validation-A", 0.23862, 24.87306, 0.60115),
)
METRIC_DEFINITIONS = (
    "NMSE, PSNR and SSIM are fastMRI's definitions: computed per volume on de-normalised magnitude images "
    "(PSNR and SSIM with the volume's maximum as data range) and averaged over volumes. The columns marked "
    "\"(seed def.)\" repeat the seed's published evaluation instead: per mini-batch, on the normalised and "
    "clamped network tensors, with prediction and reference swapped (NMSE divided by the prediction's energy, "
    "PSNR's peak and SSIM's range taken from the prediction), averaged over batches. Only the \"(seed def.)\" "
    "numbers can be set beside the seed's Table 1, and the two sets cannot be compared with each other."
)


class NotAStudyFolder(ValueError):
    """The folder does not exist or holds no study (no study.json, trials.parquet or Tune state)."""


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
@dataclass
class StudyResults:
    """What a study folder holds, read once. ``best``: one row per trial at its best epoch, in
    display order (searched parameters, epsilon first); ``columns``: searched parameter -> the
    column that shows it (``epsilon`` -> ``epsilon_ref``, the seed's units)."""

    folder: Path
    state: dict[str, Any] | None
    trials: pd.DataFrame
    robust: pd.DataFrame
    best: pd.DataFrame
    columns: dict[str, str]
    objectives: list[tuple[str, str]]
    budgets: list[float]  # attack budgets, 320x320 units
    labels: dict[str, str]  # trial id -> "ε=1000" or "lambda1=3, lambda2=0.1"
    description: str = ""
    notes: list[str] = field(default_factory=list)

    def trial_folder(self, trial_id: str) -> Path | None:
        return trial_folder(self.folder, trial_id)

    def best_pt(self, trial_id: str) -> Path | None:
        return best_checkpoint(self.folder, trial_id)

    def label(self, trial_id: str) -> str:
        return self.labels.get(trial_id, trial_id)

    def shown(self, path: str | Path) -> str:
        """A path as the report names it, so that a copied or committed report stays valid: relative
        to the study folder if it lies in the results folder that holds the study (trial files,
        the synthetic data in ``results/.data``), relative to the repository if it lies there (a
        search space), else as given (data the user pointed at)."""
        path = Path(path)
        if not path.is_absolute():
            return str(path)
        if path.is_relative_to(self.folder.parent):
            return os.path.relpath(path, self.folder)
        if path.is_relative_to(REPO):
            return str(path.relative_to(REPO))
        return str(path)

    def shown_text(self, text: str) -> str:
        """Free text (a note, an error message) with every absolute path in the study folder or
        beside it written relative to the study folder, as :meth:`shown` does."""
        for prefix, inside, itself in ((self.folder, "", "."), (self.folder.parent, "../", "..")):  # longest first
            text = text.replace(f"{prefix}/", inside)
            text = re.sub(re.escape(str(prefix)) + r"(?![\w.\-])", itself, text)
        return text


def is_study_folder(folder: Path) -> bool:
    return folder.is_dir() and (any((folder / name).is_file() for name in (STATE_FILE, TRIALS_FILE, TUNER_FILE))
                                or any(folder.glob("experiment_state-*.json")))


def load_results(study_dir: str | Path) -> StudyResults:
    """Read ``study.json``, the two tables and the search space; problems become notes."""
    folder = Path(study_dir).resolve()
    if not folder.is_dir():
        raise NotAStudyFolder(f"{folder}: no such folder")
    if not is_study_folder(folder):
        raise NotAStudyFolder(f"{folder}: not a study folder (no {STATE_FILE}, {TRIALS_FILE} or Tune state); "
                              "give results/<name> as written by study/run.py")
    notes: list[str] = []
    state = None
    if (folder / STATE_FILE).is_file():
        try:
            state = json.loads((folder / STATE_FILE).read_text())
        except (OSError, ValueError) as exc:
            notes.append(f"{STATE_FILE} is unreadable ({exc}); study settings unknown")
    else:
        notes.append(f"no {STATE_FILE}: study settings (space, profile, data) unknown")
    trials, robust = _read_tables(folder, notes)

    from study.spaces import EPSILON_KEYS  # imports torch: only here, not at module import

    space = _load_space(state, notes)
    if space is not None:
        params = [p.name for p in space.params]
        objectives = [(o.metric, o.mode) for o in space.objectives]
        description = space.description
    else:
        params = _varying_config_keys(trials)
        objectives = [("val_nmse", "min")]
        description = ""
        notes.append("the study's search space could not be read: objective taken as val_nmse (min), "
                     f"searched parameters guessed from the table ({', '.join(params) or 'none'})")
    columns = {p: ("epsilon_ref" if p in EPSILON_KEYS else p) for p in params}
    attacked = robust[robust["budget_ref"] > 0] if "budget_ref" in robust else robust  # not clean, not type 2/3
    budgets = sorted(float(b) for b in attacked["budget_ref"].unique()) if "budget_ref" in attacked else []
    if not budgets and space is not None:
        budgets = list(space.attack_budgets)
    best = _order(best_epochs(trials), columns)
    labels = _labels(trials, columns)
    return StudyResults(folder, state, trials, robust, best, columns, objectives, budgets, labels, description, notes)


def _read_tables(folder: Path, notes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    try:
        trials, robust = load_tables(folder)
    except Exception as exc:  # noqa: BLE001 - any unreadable table is reported, not raised
        notes.append(f"the result tables are unreadable: {type(exc).__name__}: {exc}")
        return pd.DataFrame(), pd.DataFrame()
    if trials.empty:
        notes.append(f"no trial has reported a result yet (no {TRIALS_FILE})")
    elif robust.empty:
        notes.append(f"no robustness results yet (no {ROBUSTNESS_FILE})")
    return trials, robust


def _load_space(state: dict[str, Any] | None, notes: list[str]):
    """The space the study ran: the YAML saved in study.json, else the file it came from."""
    from study.spaces import SpaceError, load_space

    if state is None:
        return None
    if state.get("space_yaml"):
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / f"{state.get('space', 'space')}.yaml"
            path.write_text(state["space_yaml"])
            try:
                return load_space(str(path))
            except SpaceError as exc:
                notes.append(f"the space saved in {STATE_FILE} is invalid now: {exc}")
    path = state.get("space_path")
    if path and Path(path).is_file():
        try:
            return load_space(path)
        except SpaceError as exc:
            notes.append(f"search space {path}: {exc}")
    return None


def _varying_config_keys(trials: pd.DataFrame) -> list[str]:
    from mriadv.config import TrainConfig

    if trials.empty:
        return []
    keys = [k for k in TrainConfig.__dataclass_fields__ if k in trials]
    return [k for k in keys if trials.groupby("trial_id")[k].first().astype(str).nunique() > 1]


def _order(rows: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """Sort trials by their searched values, epsilon first (standard training leads), then id."""
    keys = sorted(columns.values(), key=lambda c: c != "epsilon_ref")
    keys = [k for k in keys if k in rows] + ["trial_id"]
    return rows.sort_values(keys, kind="stable").reset_index(drop=True) if not rows.empty else rows


def _labels(trials: pd.DataFrame, columns: dict[str, str]) -> dict[str, str]:
    if trials.empty:
        return {}
    first = trials.groupby("trial_id").first()
    labels = {}
    for trial_id, row in first.iterrows():
        # a trial that failed before its first epoch has only its sampled values (the space's units)
        values = {p: row[c] if c in row and _present(row[c]) else row.get(p) for p, c in columns.items()}
        parts = [f"{_symbol(p)}={format_value(v)}" for p, v in values.items() if _present(v)]
        labels[str(trial_id)] = ", ".join(parts) or str(trial_id)
    counts = pd.Series(list(labels.values())).value_counts()
    return {t: (f"{lab} ({t})" if counts[lab] > 1 else lab) for t, lab in labels.items()}


def _symbol(param: str) -> str:
    return "ε" if param == "epsilon" else param


def _present(value: Any) -> bool:
    return not (value is None or (isinstance(value, float) and math.isnan(value)))


def format_value(value: Any, digits: int = 4) -> str:
    """Short display of a hyperparameter value: ``10000``, ``0.0001``, ``dssim``."""
    if isinstance(value, (float, np.floating)):
        if float(value).is_integer() and abs(value) < 1e7:
            return str(int(value))
        return f"{value:.{digits}g}"
    return str(value)


def _num(value: Any, spec: str) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "–"
    return format(value, spec) if math.isfinite(value) else "–"


def _get(row: pd.Series | dict, key: str) -> float:
    value = row.get(key, math.nan)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# ---------------------------------------------------------------------------------------------
# Table 1
# ---------------------------------------------------------------------------------------------
def pgd_column(budget_ref: float, metric: str) -> str:
    """Column of table1.csv: PGD at ``budget_ref`` (320x320 units); ``metric`` like ``nmse`` or ``d_nmse``."""
    name = ("d" + METRIC_NAMES[metric[2:]]) if metric.startswith("d_") else METRIC_NAMES[metric]
    return f"PGD@{budget_ref:g} {name}"


HELD_OUT_SPLITS = ("report", "test")
SPLIT_NAMES = {"report": "report split (validation volumes held out by name; nothing was selected on them)",
               "test": "test split (singlecoil_test/ with targets; nothing was selected on it)",
               "selection": "selection split (the validation volumes early stopping and the search chose by)"}


def held_out(res: StudyResults, model: str = "trained", protocol: str = "") -> pd.DataFrame:
    """The rows of ``robustness.parquet`` from each trial's final held-out evaluation of its best
    epoch (``split`` report or test): ``attack`` 'clean' (budget 0) and every attack and budget, for
    the trained model or the zero-filled input (``model='zero_filled'``); the study's own attacks, or
    those of a named protocol (``report_protocol``). Empty for studies written before the report
    split existed, and for trials that never reached their last epoch."""
    rob = res.robust
    if rob.empty or "split" not in rob:
        return rob.iloc[0:0]
    own = rob["protocol"].fillna("") == protocol if "protocol" in rob else protocol == ""
    return rob[rob["split"].isin(HELD_OUT_SPLITS) & (rob["model"] == model) & own].reset_index(drop=True)


def held_out_split(res: StudyResults) -> str | None:
    rows = held_out(res)
    return str(rows["split"].iloc[0]) if len(rows) else None


def zero_filled(res: StudyResults) -> pd.DataFrame:
    """The zero-filled input's held-out rows (the same for every trial: taken from the first)."""
    rows = held_out(res, "zero_filled")
    return rows[rows["trial_id"] == rows["trial_id"].iloc[0]].reset_index(drop=True) if len(rows) else rows


def _cell(rows: pd.DataFrame, attack: str, budget: float, key: str) -> float:
    hit = rows[(rows["attack"] == attack) & (rows["budget_ref"] == budget)] if len(rows) else rows
    return float(hit.iloc[0][key]) if len(hit) and key in hit and pd.notna(hit.iloc[0][key]) else math.nan


def table1(res: StudyResults) -> pd.DataFrame:
    """Per trial at its best epoch: a Training row (the fixed training-evaluation volumes), a
    Selection row (the validation volumes early stopping chose by) and a Report row (the held-out
    split, clean and under PGD, with standard errors over volumes); and one Zero-filled row, the
    network's input itself on the report split. PGD columns only on held-out rows."""
    report = held_out(res)
    pgd_cols = [pgd_column(b, m) for b in res.budgets for m in (*METRICS, *(f"d_{m}" for m in METRICS))]
    pgd_se = [f"PGD@{b:g} NMSE SE" for b in res.budgets] + [f"PGD@{b:g} dNMSE SE" for b in res.budgets]
    params = [p for p in res.columns if res.columns[p] != "epsilon_ref"]
    last = res.trials[res.trials["epoch"] > 0].sort_values("epoch").groupby("trial_id").last() if len(res.trials) else None

    def held_out_row(rows: pd.DataFrame) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for m in METRICS:
            row[METRIC_NAMES[m]] = _cell(rows, "clean", 0.0, m)
            row[f"{METRIC_NAMES[m]} SE"] = _cell(rows, "clean", 0.0, f"{m}_se")
        for b in res.budgets:
            for m in (*METRICS, *(f"d_{m}" for m in METRICS)):
                row[pgd_column(b, m)] = _cell(rows, "pgd", b, m)
            row[f"PGD@{b:g} NMSE SE"] = _cell(rows, "pgd", b, "nmse_se")
            row[f"PGD@{b:g} dNMSE SE"] = _cell(rows, "pgd", b, "d_nmse_se")
        row["volumes"] = _cell(rows, "clean", 0.0, "num_volumes") if "num_volumes" in rows else math.nan
        return row

    rows = []
    zf = zero_filled(res)
    if len(zf):
        rows.append({"trial_id": "", "model": "zero-filled input", "split": "Report", **held_out_row(zf)})
    for _, b in res.best.iterrows():
        eps = _get(b, "epsilon")
        common: dict[str, Any] = {"trial_id": b["trial_id"], "epsilon_ref": _get(b, "epsilon_ref"),
                                  "epsilon_rms": _get(b, "epsilon_rms")}
        common |= {p: b.get(p) for p in params}
        common |= {"model": "standard" if eps == 0 else ("adversarial" if eps > 0 else "?"),
                   "best_epoch": int(b["epoch"]), "status": b.get("status", "")}
        if last is not None and b["trial_id"] in last.index and eps > 0:
            end = last.loc[b["trial_id"]]
            common |= {"last_delta_sq_over_eps": _get(end, "delta_sq") / eps, "last_over_budget": _get(end, "over_budget")}
        for split, prefix in (("Training", "train"), ("Selection", "val")):
            row = {**common, "split": split}
            for m in METRICS:
                row[METRIC_NAMES[m]] = _get(b, f"{prefix}_{m}")
                row[f"{METRIC_NAMES[m]} SE"] = _get(b, f"{prefix}_{m}_se")
            for m in METRICS:
                row[f"{METRIC_NAMES[m]} (seed def.)"] = _get(b, f"{prefix}_seed_{m}")
            rows.append(row)
        mine = report[report["trial_id"] == b["trial_id"]] if len(report) else report
        rows.append({**common, "split": "Report", **held_out_row(mine)})
    columns = (["trial_id", "epsilon_ref", "epsilon_rms", *params, "model", "split", "best_epoch", "status",
                "last_delta_sq_over_eps", "last_over_budget", "volumes"]
               + [METRIC_NAMES[m] for m in METRICS] + [f"{METRIC_NAMES[m]} SE" for m in METRICS]
               + [f"{METRIC_NAMES[m]} (seed def.)" for m in METRICS] + pgd_cols + pgd_se)
    return pd.DataFrame(rows, columns=columns)


def write_table1(res: StudyResults, out: Path) -> pd.DataFrame:
    """``table1.csv`` (every number) and ``table1.md`` (the seed's layout) in ``out``."""
    table = table1(res)
    table.to_csv(out / "table1.csv", index=False)
    (out / "table1.md").write_text(table1_markdown(res, table))
    return table


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def _process(row: pd.Series) -> str:
    suffix = {"standard": "-S", "adversarial": "-A"}.get(row["model"], "")
    return {"Selection": "Validation"}.get(row["split"], row["split"]) + suffix


def _pm(value: Any, se: Any, spec: str) -> str:
    """``value ± se`` (the standard error over volumes), or just the value where it has none."""
    text = _num(value, spec)
    return f"{text} ± {_num(se, spec)}" if _num(se, spec) != "–" and text != "–" else text


def table1_markdown(res: StudyResults, table: pd.DataFrame) -> str:
    out = [f"# Table 1 — {res.folder.name}", ""]
    if table.empty:
        out += ["No trial has a finished epoch yet: nothing to tabulate.", ""]
        return "\n".join(out)
    params = [p for p in res.columns if res.columns[p] != "epsilon_ref"]
    crop = _crop(res)
    split = held_out_split(res)
    rep = table[table["split"] == "Report"]
    out += [
        f"**Numbers from the {SPLIT_NAMES.get(split or '', 'report split')}**"
        + (f", {int(rep['volumes'].max())} volumes" if rep["volumes"].notna().any() else "") + ". "
        "Each trial's best epoch (lowest loss on the *selection* split; the networks saved as its `best.pt`), "
        "evaluated once on the held-out split. ε is the training budget ‖δ‖² in the seed's units (320×320 images); "
        "*RMS/px* is the same budget as a per-pixel RMS in normalised units"
        f"{f' (the runs used {crop}×{crop} crops)' if crop else ''}. *-S*: standard training (ε = 0), *-A*: "
        "adversarial training; *zero-filled*: the network's input itself, |F⁻¹P(y)|, what every model must beat. "
        "PGD columns: L2 PGD of budget ‖δ‖² = b (320×320 units), each cell *attacked value (attacked − clean)*. "
        "± is the standard error over volumes (of the paired per-volume differences for the degradation). "
        "*‖δ‖²/ε*: the generator's mean training perturbation at the last epoch relative to the budget "
        "(*over*: the share of training images outside the ε-ball).", "",
    ]
    if split is None:
        out += ["No trial has a held-out evaluation yet (it runs at a trial's last epoch): the Report rows are "
                "empty; see the Selection rows below, which early stopping chose by.", ""]
    headers = ["ε (320²)", "RMS/px", *params, "Process", "epoch", "‖δ‖²/ε (over)", "NMSE", "PSNR", "SSIM"]
    for b in res.budgets:
        headers += [f"PGD@{b:g} NMSE", f"PGD@{b:g} PSNR", f"PGD@{b:g} SSIM"]
    rows = []
    for _, r in rep.iterrows():
        zf = r["model"] == "zero-filled input"
        ratio = ("" if zf or not math.isfinite(_get(r, "last_delta_sq_over_eps"))
                 else f"{_num(r['last_delta_sq_over_eps'], '.2f')} ({_num(r['last_over_budget'], '.0%')})")
        cells = (["–", "–", *("" for _ in params), "Zero-filled", "–", ""] if zf else
                 [_num(r["epsilon_ref"], "g"), _num(r["epsilon_rms"], ".3f"), *(format_value(r[p]) for p in params),
                  _process(r), _num(r["best_epoch"], ".0f"), ratio])
        cells += [_pm(r["NMSE"], r["NMSE SE"], ".4f"), _pm(r["PSNR"], r["PSNR SE"], ".2f"),
                  _pm(r["SSIM"], r["SSIM SE"], ".4f")]
        for b in res.budgets:
            for m, spec in (("nmse", ".4f"), ("psnr", ".2f"), ("ssim", ".4f")):
                value, delta = r[pgd_column(b, m)], r[pgd_column(b, "d_" + m)]
                extra = f" ± {_num(r[f'PGD@{b:g} dNMSE SE'], spec)}" if m == "nmse" and _num(
                    r[f"PGD@{b:g} dNMSE SE"], spec) != "–" else ""
                cells.append(f"{_num(value, spec)} ({_num(delta, '+' + spec)}{extra})")
        rows.append(cells)
    out += [_md_table(headers, rows), ""]

    out += _protocol_tables(res)
    out += _instability_tables(res)
    out += ["## Selection and training volumes", "",
            "The same best epochs on the volumes they were chosen by (*Selection*: the validation volumes of early "
            "stopping, `best.pt` and the search) and on the fixed training-evaluation volumes (*Training*). These "
            "numbers are optimistic by construction; report the table above.", ""]
    sel = table[table["split"].isin(["Training", "Selection"])]
    rows = [[_num(r["epsilon_ref"], "g"), *(format_value(r[p]) for p in params), _process(r), _num(r["best_epoch"], ".0f"),
             _pm(r["NMSE"], r["NMSE SE"], ".4f"), _pm(r["PSNR"], r["PSNR SE"], ".2f"),
             _pm(r["SSIM"], r["SSIM SE"], ".4f")] for _, r in sel.iterrows()]
    out += [_md_table(["ε (320²)", *params, "Process", "epoch", "NMSE", "PSNR", "SSIM"], rows), ""]

    out += ["## The seed's metric definitions", "", METRIC_DEFINITIONS, ""]
    seed_cols = [f"{METRIC_NAMES[m]} (seed def.)" for m in METRICS]
    rows = [[_num(r["epsilon_ref"], "g"), *(format_value(r[p]) for p in params), _process(r),
             *(_num(r[c], ".5f") for c in seed_cols)] for _, r in sel.iterrows()]
    out += [_md_table(["ε (320²)", *params, "Process", *seed_cols], rows), ""]
    if table.loc[table["split"] == "Training", seed_cols].isna().all().all():
        out += ["(No seed-definition numbers were recorded for the Training rows.)", ""]
    out += ["For reference, the seed's published Table 1 (fastMRI single-coil knee, 320×320, its definitions):", "",
            _md_table(["ε", "Process", "NMSE", "PSNR", "SSIM"],
                      [[e, p, f"{n:.5f}", f"{q:.5f}", f"{s:.5f}"] for e, p, n, q, s in SEED_TABLE1]), ""]
    return "\n".join(out)


def _instability_tables(res: StudyResults) -> list[str]:
    """The seed's instabilities of types 2 and 3 on the held-out split (the last epoch's row of each
    trial holds its best epoch's evaluation): small-feature false-negative rates at a random and at
    the worst of several positions, recovered contrast, and NMSE over accelerations with nested masks
    (*: more samples did not lower NMSE by more than its paired standard error)."""
    t = res.trials
    if t.empty or "report_feature_random_fnr" not in t and "report_sampling_r4_nmse" not in t:
        return []
    last = t[t["epoch"] > 0].sort_values("epoch").groupby("trial_id").last()
    rates = sorted({float(c[len("report_sampling_r"):-len("_nmse")].replace("p", ".")) for c in t
                    if c.startswith("report_sampling_r") and c.endswith("_nmse") and not c.endswith("_se")
                    and "stagnant" not in c}, reverse=True)

    def line(label: str, row: pd.Series, prefix: str) -> list[str]:
        cells = [label]
        for kind in ("random", "worst"):
            cells.append(_pm(_get(row, f"{prefix}feature_{kind}_fnr"), _get(row, f"{prefix}feature_{kind}_fnr_se"),
                             ".2f"))
        cells.append(_pm(_get(row, f"{prefix}feature_random_contrast"),
                         _get(row, f"{prefix}feature_random_contrast_se"), ".2f"))
        previous = math.nan
        for r in rates:
            key = f"{prefix}sampling_r{format(r, 'g').replace('.', 'p')}_nmse"
            value = _get(row, key)
            flag = " *" if prefix == "report_" and math.isfinite(previous) and not value < previous else ""
            cells.append(_num(value, ".4f") + flag)
            previous = value
        return cells

    rows = []
    first = next((r for _, r in last.iterrows() if math.isfinite(_get(r, "zf_report_feature_random_fnr"))
                  or math.isfinite(_get(r, f"zf_report_sampling_r{format(rates[0], 'g').replace('.', 'p')}_nmse")
                                   if rates else False)), None)
    if first is not None:
        rows.append(line("zero-filled input", first, "zf_report_"))
    for _, b in res.best.iterrows():
        if b["trial_id"] in last.index:
            rows.append(line(res.label(b["trial_id"]), last.loc[b["trial_id"]], "report_"))
    headers = ["model", "feature FNR (random position)", "feature FNR (worst of 8)", "recovered contrast",
               *(f"NMSE at {r:g}×" for r in rates)]
    return ["## Instabilities of types 2 and 3 (held-out split)", "",
            "Type 2, small features (after FNAF, Cheng et al. 2020): a 10-pixel disc of +50 % local contrast is "
            "inserted into the *data* (k-space of the target), measured through the volume's own mask, and "
            "reconstructed; it counts as lost when the relative error inside it exceeds 0.5 (our threshold). "
            "FNR: share of slices whose feature is lost, at the first random tissue position and at the worst of 8. "
            "Type 3, more samples: NMSE with nested per-volume masks from 8× to 2× (centre fraction as trained); "
            "* marks a step to more samples that did not lower NMSE (flagged by more than its standard error "
            "in `trials.parquet`: `report_sampling_stagnant`).", "",
            _md_table(headers, rows), ""]


def _protocol_tables(res: StudyResults) -> list[str]:
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
        first = next((r for r in rows.values() if len(r)), None)
        if first is None:
            continue
        if name in rows["zero-filled input"].get("protocol", pd.Series(dtype=str)).values:
            zf = rows["zero-filled input"]
            rows["zero-filled input"] = zf[zf["trial_id"] == zf["trial_id"].iloc[0]]
        grid = [(a, r, e) for a, r, e in first[["attack", "rel", "budget_ref"]].itertuples(index=False)]
        headers = ["model"] + [f"{a} @ {'rel ' + format(r, 'g') if pd.notna(r) else format(e, 'g')}" for a, r, e in grid]
        cells = []
        for label, mine in rows.items():
            line = [label]
            for a, r, e in grid:
                hit = mine[(mine["attack"] == a) & ((mine["rel"] == r) if pd.notna(r) else (mine["budget_ref"] == e))]
                line.append("–" if hit.empty else f"{_num(hit.iloc[0]['nmse'], '.4f')} "
                            f"({_num(hit.iloc[0]['d_nmse'], '+.4f')} ± {_num(hit.iloc[0]['d_nmse_se'], '.4f')})")
            cells.append(line)
        out += [f"## Protocol `{name}` (held-out split)", "",
                "NMSE under each attack of the protocol (`python -m mriadv.assess --list-protocols` gives its source "
                "and settings); *rel*: ‖δ‖/‖y‖ of the sampled k-space (‖δ‖/‖x̃‖ for image attacks).", "",
                _md_table(headers, cells), ""]
    return out


def _crop(res: StudyResults) -> int | None:
    base = (res.state or {}).get("base") or {}
    crop = base.get("crop_size")
    return int(crop) if isinstance(crop, (int, float)) else None


# ---------------------------------------------------------------------------------------------
# plots from the tables
# ---------------------------------------------------------------------------------------------
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
    clean = [{"trial_id": b["trial_id"], "attack": "clean", "budget_ref": 0.0,
              **{m: _get(b, f"val_{m}") for m in METRICS}} for _, b in res.best.iterrows()]
    return pd.concat([rob, pd.DataFrame(clean)], ignore_index=True), rob.iloc[0:0], "selection"


def plot_robustness(res: StudyResults, path: Path) -> None:
    """NMSE and SSIM under PGD (solid) and equal-norm noise (dashed) versus the budget, with the
    zero-filled input (black) under the same attacks."""
    rob, zf, split = robustness_rows(res)
    if rob.empty:
        raise ValueError("no robustness results at the trials' best epochs")
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    curves = [(res.label(b["trial_id"]), color, rob[rob["trial_id"] == b["trial_id"]])
              for color, (_, b) in zip(_colors(len(res.best)), res.best.iterrows())]
    if len(zf):
        curves.insert(0, ("zero-filled input", "k", zf))
    for label, color, mine in curves:
        clean = mine[mine["attack"] == "clean"]
        for attack, style in (("pgd", "-"), ("noise", "--")):
            r = mine[mine["attack"] == attack].sort_values("budget_ref")
            if r.empty or clean.empty:
                continue
            for ax, m in zip(axes, ("nmse", "ssim")):
                x = [0.0, *r["budget_ref"]]
                y = [float(clean.iloc[0][m]), *r[m]]
                ax.plot(x, y, style, color=color, marker="o" if attack == "pgd" else None, ms=4,
                        label=label if attack == "pgd" else None)
    ticks = [0.0, *res.budgets]
    for ax, m in zip(axes, ("nmse", "ssim")):
        ax.set_xticks(ticks, ["clean"] + [f"{b:g}\n({math.sqrt(b) / REFERENCE_CROP:.3f}/px)" for b in res.budgets],
                      fontsize=8)
        ax.set_ylabel(f"{split}-split {METRIC_NAMES[m]}")
        ax.grid(alpha=0.3)
    axes[0].set_title("NMSE under attack (lower is better)", fontsize=10)
    axes[1].set_title("SSIM under attack (higher is better)", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    handles += [Line2D([], [], color="k", ls="-", marker="o", ms=4), Line2D([], [], color="k", ls="--")]
    labels += ["PGD (worst case)", "random noise, same ‖δ‖²"]
    fig.legend(handles, labels, loc="outside right center", fontsize=8, title=_legend_title(res), title_fontsize=8)
    fig.supxlabel("attack budget ‖δ‖² in 320×320 units (per-pixel RMS in normalised units)", fontsize=9)
    fig.suptitle(f"{res.folder.name}: robustness of each trial's best epoch ({SPLIT_NAMES.get(split, split)})",
                 fontsize=10)
    save_png(fig, path)


def _legend_title(res: StudyResults) -> str:
    return "trial" + (f" ({', '.join(_symbol(p) for p in res.columns)})" if res.columns else "")


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


def pareto_points(res: StudyResults, table: pd.DataFrame) -> ParetoPoints:
    """Clean NMSE against NMSE under PGD at the largest budget, both on the held-out split where the
    trials have it (the objectives the search used are selection-split numbers: not reported)."""
    if not res.budgets:
        raise ValueError("no attacked metric to compare with (no attack budgets)")
    top = max(res.budgets)
    rep = table[(table["split"] == "Report") & (table["trial_id"] != "")].set_index("trial_id")
    best = res.best.copy()
    x_metric, y_metric = "report NMSE", pgd_column(top, "nmse")
    best[x_metric] = best["trial_id"].map(rep["NMSE"]) if len(rep) else math.nan
    best[y_metric] = best["trial_id"].map(rep[y_metric]) if len(rep) else math.nan
    split = held_out_split(res) or "report"
    y_label = f"{split}-split NMSE under PGD, ‖δ‖² = {top:g} (320²)"
    if not best[[x_metric, y_metric]].notna().all(axis=1).any():
        raise ValueError("no trial has a held-out evaluation yet")
    finished = best["trial_id"].isin(finished_trials(res.trials)).to_numpy()
    values = best[[x_metric, y_metric]].to_numpy(float)
    front = pareto_front(best, finished, [(x_metric, "min"), (y_metric, "min")])
    return ParetoPoints(list(best["trial_id"]), values, finished, front, y_metric, y_label)


def metric_label(metric: str) -> str:
    """Axis label of a reported metric: ``rob_pgd_e5000_nmse`` -> "NMSE under PGD, ‖δ‖² = 5000 (320²)"."""
    found = re.fullmatch(r"rob_(.+)_e([0-9p]+)_(d_)?(nmse|psnr|ssim)", metric)
    if found:
        attack, budget, delta, m = found.groups()
        return (f"{'degradation of ' if delta else ''}{METRIC_NAMES[m]} under {ATTACK_NAMES.get(attack, attack)}, "
                f"‖δ‖² = {budget.replace('p', '.')} (320²)")
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
        eps = _get(row, "epsilon")
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
            ax.scatter(values[~done & mine, 0], values[~done & mine, 1], s=40, facecolors="none", edgecolors=color,
                       label=f"{kind or 'trial'} (stopped by the scheduler, or running)", zorder=2)
    if front.any():
        order = np.argsort(values[front, 0])
        ax.plot(values[front, 0][order], values[front, 1][order], "-", color="tab:red", lw=1, zorder=1)
        ax.scatter(values[front, 0], values[front, 1], s=110, facecolors="none", edgecolors="tab:red", lw=1.5,
                   label="Pareto front", zorder=3)
    names = [res.label(t) for t in points.trial_ids]
    numbered = max(map(len, names), default=0) > 24  # long labels: numbers on the plot, a key beside it
    at: dict[tuple[float, float], list[str]] = {}  # trials at the same point share one label
    for i, ((x, y), name) in enumerate(zip(values, names)):
        if np.isfinite(x) and np.isfinite(y):
            at.setdefault((float(f"{x:.6g}"), float(f"{y:.6g}")), []).append(str(i + 1) if numbered else name)
    for (x, y), labels in at.items():
        ax.annotate((", " if numbered else "\n").join(labels), (x, y), textcoords="offset points", xytext=(6, 4),
                    fontsize=7, va="bottom")
    if numbered:
        fig.legend([Line2D([], [], ls="")] * len(names), [f"{i + 1}: {n}" for i, n in enumerate(names)],
                   loc="outside right center", fontsize=7, handlelength=0, title=_legend_title(res), title_fontsize=7)
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
        curves += [(label, color, style, rows[rows["trial_id"] == t], clean[clean["trial_id"] == t])
                   for label, color, style, t in lines]
        for label, color, style, r, c in curves:
            r = r[(r["attack"] == attack) & r["rel"].notna()].sort_values("rel")
            if r.empty:
                continue
            x = ([0.0] if len(c) else []) + list(r["rel"])
            y = ([float(c.iloc[0]["nmse"])] if len(c) else []) + list(r["nmse"])
            ax.plot(x, y, style, color=color, marker="o", ms=3, lw=1.2, label=label)
        ax.set_xlabel("relative budget ‖δ‖ / ‖y‖ (sampled k-space)" if attack.endswith("_kspace")
                      else "relative budget ‖δ‖ / ‖x̃‖ (input image)", fontsize=9)
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
    panels = (("val_nmse", "validation NMSE"), ("val_psnr", "validation PSNR (dB)"), ("val_ssim", "validation SSIM"),
              ("train_loss", "training loss (reconstructor objective)"))
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


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
def summary_markdown(res: StudyResults, written: list[str], points: ParetoPoints | None) -> str:
    return "\n".join([*_summary_head(res), *_summary_best(res, points), *_summary_trials(res),
                      *_summary_files(res, written)])


def _summary_head(res: StudyResults) -> list[str]:
    st = res.state or {}
    base = st.get("base") or {}
    out = [f"# Study report: {res.folder.name}", "",
           f"- folder: `{res.folder.name}/`, the study folder (the paths below are relative to it)"]
    if st:
        budgets = ", ".join(f"{b:g}" for b in res.budgets) or "–"
        space = res.shown(st["space_path"]) if st.get("space_path") else "?"
        space = Path(space).name if Path(space).is_absolute() else space  # elsewhere: its text is in study.json
        out += [f"- space: {st.get('space', '?')} (`{space}`)"
                + (f": {res.description}" if res.description else ""),
                f"- searched: {', '.join(res.columns) or '–'}; objectives: "
                + ", ".join(f"{m} ({mode})" for m, mode in res.objectives),
                f"- profile: {st.get('profile', '?')}; data: `{res.shown(base['data']) if base.get('data') else '?'}`; "
                f"crop {base.get('crop_size', '?')}; attack budgets (320² units): {budgets}",
                f"- started: {st.get('created', '?')}"]
    counts = trial_status(res.trials).value_counts().to_dict()
    order = [s for s in STATUS_ORDER if s in counts] + sorted(set(counts) - set(STATUS_ORDER))
    out += [f"- trials: {sum(counts.values())}"
            + (" (" + ", ".join(f"{counts[s]} {s or 'unknown'}" for s in order) + ")" if counts else ""), ""]
    if res.notes:
        out += ["## Notes", "", *(f"- {res.shown_text(n)}" for n in res.notes), ""]
    return out


def _summary_best(res: StudyResults, points: ParetoPoints | None) -> list[str]:
    out = ["## Best trials", ""]
    if res.best.empty:
        return out + ["No trial has a finished epoch yet.", ""]
    split = held_out_split(res)
    out += ["Chosen by each objective on the *selection* split (every trial's best epoch: lowest selection loss, "
            "the epoch in `best.pt`); the metrics beside are that epoch's held-out "
            f"{split or 'report'}-split evaluation (± standard error over volumes), which nothing was chosen by.", ""]
    report = held_out(res)
    top = max(res.budgets) if res.budgets else None
    by_id = res.best.sort_values("trial_id").reset_index(drop=True)  # ties: the runner's summary's pick
    picks = best_trials(by_id, res.objectives)
    rows = []
    for metric, row in picks.items():
        ckpt = res.best_pt(row["trial_id"])
        tied = by_id.loc[(by_id[metric] == row[metric]) & (by_id["trial_id"] != row["trial_id"]), "trial_id"]
        mine = report[report["trial_id"] == row["trial_id"]] if len(report) else report
        rows.append([f"{metric} ({dict(res.objectives)[metric]})",
                     row["trial_id"] + (f" (tied with {', '.join(tied)})" if len(tied) else ""),
                     res.label(row["trial_id"]), str(int(row["epoch"])), _num(row[metric], ".5g"),
                     _pm(_cell(mine, "clean", 0.0, "nmse"), _cell(mine, "clean", 0.0, "nmse_se"), ".4f"),
                     _pm(_cell(mine, "clean", 0.0, "psnr"), _cell(mine, "clean", 0.0, "psnr_se"), ".2f"),
                     _pm(_cell(mine, "clean", 0.0, "ssim"), _cell(mine, "clean", 0.0, "ssim_se"), ".4f"),
                     _pm(_cell(mine, "pgd", top, "nmse"), _cell(mine, "pgd", top, "nmse_se"), ".4f") if top else "–",
                     f"`{res.shown(ckpt)}`" if ckpt else "missing (no best.pt)"])
    zf = zero_filled(res)
    if len(zf):
        rows.insert(0, ["(baseline)", "zero-filled input", "–", "–", "–",
                        _pm(_cell(zf, "clean", 0.0, "nmse"), _cell(zf, "clean", 0.0, "nmse_se"), ".4f"),
                        _pm(_cell(zf, "clean", 0.0, "psnr"), _cell(zf, "clean", 0.0, "psnr_se"), ".2f"),
                        _pm(_cell(zf, "clean", 0.0, "ssim"), _cell(zf, "clean", 0.0, "ssim_se"), ".4f"),
                        _pm(_cell(zf, "pgd", top, "nmse"), _cell(zf, "pgd", top, "nmse_se"), ".4f") if top else "–",
                        "–"])
    out += [_md_table(["objective", "trial", "searched values", "best epoch", "selection value", "NMSE", "PSNR",
                       "SSIM", f"PGD@{top:g} NMSE" if top else "PGD NMSE", "checkpoint"], rows), ""]
    keys = list(dict.fromkeys([*HPARAM_KEYS, *(c for c in res.columns.values() if c != "epsilon_ref")]))
    for trial_id in dict.fromkeys(row["trial_id"] for row in picks.values()):
        row = by_id[by_id["trial_id"] == trial_id].iloc[0]
        values = ", ".join(f"{k}={format_value(row[k])}" for k in keys if k in row and _present(row[k]))
        out += [f"- {trial_id} hyperparameters: {values} (its full config is stored in its best.pt)"]
    missing = [m for m, _ in res.objectives if m not in picks]
    out += [""] + ([f"No trial has a value for {', '.join(missing)}.", ""] if missing else [])
    if points is not None:
        front = [t for t, on in zip(points.trial_ids, points.front) if on]
        out += [f"Pareto front of held-out clean NMSE vs {points.y_metric} (finished trials only): "
                + (", ".join(f"{t} ({res.label(t)})" for t in front) or "none"), ""]
    return out


def _summary_trials(res: StudyResults) -> list[str]:
    statuses = trial_status(res.trials)
    out = ["## Trials", ""]
    if statuses.empty:
        return out + ["None reported.", ""]
    best = res.best.set_index("trial_id") if not res.best.empty else res.best
    epochs = res.trials[res.trials["epoch"] > 0].groupby("trial_id")["epoch"].max()
    cost = (res.trials[res.trials["epoch"] > 0].groupby("trial_id")["train_time_s"].mean()
            if "train_time_s" in res.trials else {})
    ids = list(res.best["trial_id"] if not res.best.empty else []) + sorted(set(statuses.index) - set(best.index))
    rob = held_out(res)
    top = max(res.budgets) if res.budgets else None
    pgd = rob[(rob["attack"] == "pgd") & (rob["budget_ref"] == top)].set_index("trial_id")["nmse"] if len(rob) else {}
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
        rows.append([t, res.label(t), status, str(int(epochs.get(t, 0))), _num(cost.get(t), ".1f"), _num(b.get("epoch"), ".0f"),
                     _num(b.get("val_nmse"), ".4f"), _num(clean.get(t), ".4f"), _num(pgd.get(t), ".4f"),
                     f"`{res.shown(ckpt)}`" if ckpt else "missing", _markdown_cell(res.shown_text(messages.get(t, "")))])
    headers = ["trial", "searched values", "status", "epochs", "train s/epoch", "best epoch", "selection NMSE", "report NMSE",
               f"report PGD@{top:g} NMSE" if top else "report PGD NMSE", "best.pt", "message"]
    return out + [_md_table(headers, rows), ""]


def _summary_files(res: StudyResults, written: list[str]) -> list[str]:
    describe = {"table1.md": "the seed's Table 1 for this study (and the seed's metric definitions)",
                "table1.csv": "the same, every number", "figure6.png": "the seed's Figure 6 (worst-case perturbations)",
                "features.png": "a small feature inserted into the data, and what each model makes of it",
                "robustness.png": "NMSE / SSIM versus attack budget", "pareto.png": "clean versus attacked NMSE",
                "curves.png": "metrics per epoch"}
    return ["## Files", "", *(f"- [{name}]({name}): {text}" for name, text in describe.items() if name in written),
            f"- tables: `{TRIALS_FILE}`, `{ROBUSTNESS_FILE}`",
            "- TensorBoard, in the study folder: `tensorboard --logdir .`", ""]


def _markdown_cell(text: str) -> str:
    """A message as one Markdown table cell: no pipes, no line breaks, at most 300 characters."""
    return text.replace("|", "\\|").replace("\n", " ")[:300]


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------
def write_report(study_dir: Path) -> Path:
    """Write ``<study_dir>/report/`` and return its path; raises :class:`NotAStudyFolder` for a
    folder that is not a study. Anything missing or broken inside a study becomes a note."""
    res = load_results(study_dir)
    out = res.folder / REPORT_DIR
    out.mkdir(exist_ok=True)
    for name in REPORT_FILES:  # no stale file from an earlier report may survive
        (out / name).unlink(missing_ok=True)
    _check_partial(res)

    def attempt(name: str, make: Callable[[], Any]) -> Any:
        try:
            return make()
        except Exception as exc:  # noqa: BLE001 - a report of what exists, never a traceback
            res.notes.append(f"{name} not written: {type(exc).__name__}: {exc}")
            return None

    table = attempt("table1", lambda: write_table1(res, out))
    points = None
    if not res.best.empty:
        res.notes.extend(attempt("figure6.png", lambda: _figure6(res, out / "figure6.png")) or [])
        if len(held_out(res)):
            res.notes.extend(attempt("features.png", lambda: _features_figure(res, out / "features.png")) or [])
        attempt("robustness.png", lambda: plot_robustness(res, out / "robustness.png"))
        points = attempt("pareto.png", lambda: pareto_points(res, table)) if table is not None else None
        if points is not None:
            attempt("pareto.png", lambda: plot_pareto(res, out / "pareto.png", points))
        attempt("curves.png", lambda: plot_curves(res, out / "curves.png"))
        if "protocol" in res.robust and (res.robust["protocol"].fillna("") != "").any():
            attempt("protocol_curves.png", lambda: plot_protocol_curves(res, out / "protocol_curves.png"))
    else:
        res.notes.append("no figures: no trial has a finished epoch")
    written = [name for name in REPORT_FILES if (out / name).is_file()]
    (out / "summary.md").write_text(summary_markdown(res, written, points))
    for note in res.notes:
        print(f"note: {note}")
    return out


def _features_figure(res: StudyResults, path: Path) -> list[str]:
    from study.figure_features import features_figure  # torch and the networks: only when drawn

    return features_figure(res, path)


def _figure6(res: StudyResults, path: Path) -> list[str]:
    from study.figure6 import figure6  # torch and the networks: only when the figure is drawn

    return figure6(res, path)


def _check_partial(res: StudyResults) -> None:
    """Notes on running, errored, diverged and checkpoint-less trials."""
    statuses = trial_status(res.trials)
    running = statuses[statuses == "RUNNING"]
    if len(running):
        res.notes.append(f"{len(running)} trial(s) still RUNNING: the study is running or was interrupted (run the "
                         "same study command again to resume it); this report shows the epochs reported so far")
    for t, message in failed_trials(res.trials).items():
        res.notes.append(f"trial {t} ({res.label(t)}) failed: {_markdown_cell(message) or 'no message'}")
    messages = trial_messages(res.trials)
    for t in statuses[statuses == "nan"].index:
        res.notes.append(f"trial {t} ({res.label(t)}) stopped on a non-finite loss: "
                         f"{_markdown_cell(messages.get(t, ''))}")
    no_best = set(statuses.index) - set(res.best["trial_id"] if not res.best.empty else [])
    for t in sorted(no_best - set(statuses[statuses == "ERROR"].index)):
        res.notes.append(f"trial {t} ({res.label(t)}) has no epoch with a finite validation loss: not in the tables")
    for t in (res.best["trial_id"] if not res.best.empty else []):
        if res.best_pt(t) is None:
            res.notes.append(f"trial {t} ({res.label(t)}) has no best.pt"
                             + ("" if res.trial_folder(t) else " (no trial folder)") + ": left out of figure 6")
    shown = list(res.best["trial_id"]) if not res.best.empty else []
    for group in identical_trials(res.trials):
        group = sorted(group, key=lambda t: shown.index(t) if t in shown else len(shown))
        res.notes.append(f"trials {', '.join(f'{t} ({res.label(t)})' for t in group)} have the same validation loss "
                         "at every epoch: in these runs their differing hyperparameters made no difference")
    if not res.best.empty and not {"train_seed_nmse", "train_seed_psnr", "train_seed_ssim"} <= set(res.trials):
        res.notes.append("trials.parquet has no train_seed_* columns (an older table): Training rows lack the "
                         "seed-definition numbers")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="study/report.py", description=__doc__.splitlines()[0])
    p.add_argument("study_dir", type=Path, help="a study folder, results/<name>")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        folder = write_report(args.study_dir)
    except NotAStudyFolder as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
