"""Loading a study folder for its report: :class:`StudyResults` and the rows the tables and figures share.

:func:`load_results` reads ``study.json``, the two result tables (through
:func:`study.tables.load_tables`) and the search space, turning whatever is missing or broken into
notes; :func:`held_out` and its companions select the held-out evaluation rows. The short value
formatters used by every part of the report live here too. pandas and no plotting: the figures
(:mod:`study.report_plots`, :mod:`study.figure6`, :mod:`study.figure_features`) build on this module.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mriadv.config import ATTACKS, TrainConfig
from study.analysis import best_epochs
from study.layout import ROBUSTNESS_FILE, STATE_FILE, TRIALS_FILE, TUNER_FILE, best_checkpoint, trial_folder
from study.spaces import EPSILON_KEYS, SpaceError, load_space, parse_space_yaml, space_from_dict
from study.tables import load_tables, read_parquet

REPO = Path(__file__).resolve().parent.parent
METRICS = ("nmse", "psnr", "ssim")
METRIC_NAMES = {"nmse": "NMSE", "psnr": "PSNR", "ssim": "SSIM"}
HELD_OUT_SPLITS = ("report", "test")
SPLIT_NAMES = {
    "report": "report split (validation volumes held out by name, stratified by acquisition; nothing was selected on them)",
    "test": "test split (singlecoil_test/ with targets; nothing was selected on it)",
    "selection": "selection split (the validation volumes early stopping and the search chose by)",
}


class NotAStudyFolder(ValueError):
    """The folder does not exist or holds no study (no study.json, trials.parquet or Tune state)."""


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

    @property
    def crop(self) -> int | None:
        """The crop the study's trials ran at (its base config), or None where unknown."""
        crop = ((self.state or {}).get("base") or {}).get("crop_size")
        return int(crop) if isinstance(crop, (int, float)) else None

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
    return folder.is_dir() and (
        any((folder / name).is_file() for name in (STATE_FILE, TRIALS_FILE, TUNER_FILE))
        or any(folder.glob("experiment_state-*.json"))
    )


def load_results(study_dir: str | Path) -> StudyResults:
    """Read ``study.json``, the two tables and the search space; problems become notes."""
    folder = Path(study_dir).resolve()
    if not folder.is_dir():
        raise NotAStudyFolder(f"{folder}: no such folder")
    if not is_study_folder(folder):
        raise NotAStudyFolder(
            f"{folder}: not a study folder (no {STATE_FILE}, {TRIALS_FILE} or Tune state); "
            "give results/<name> as written by study/run.py"
        )
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

    space = _load_space(state, folder / STATE_FILE, notes)
    if space is not None:
        params = [p.name for p in space.params]
        objectives = [(o.metric, o.mode) for o in space.objectives]
        description = space.description
    else:
        params = _varying_config_keys(trials)
        objectives = [("val_nmse", "min")]
        description = ""
        notes.append(
            "the study's search space could not be read: objective taken as val_nmse (min), "
            f"searched parameters guessed from the table ({', '.join(params) or 'none'})"
        )
    columns = {p: ("epsilon_ref" if p in EPSILON_KEYS else p) for p in params}
    attacked = robust[robust["budget_ref"] > 0] if "budget_ref" in robust else robust  # not clean, not type 2/3
    budgets = sorted(float(b) for b in attacked["budget_ref"].unique()) if "budget_ref" in attacked else []
    if not budgets and space is not None:
        budgets = list(space.attack_budgets)
    best = _order(best_epochs(trials), columns)
    labels = _labels(trials, columns)
    return StudyResults(folder, state, trials, robust, best, columns, objectives, budgets, labels, description, notes)


def _read_tables(folder: Path, notes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two tables as they stand (Parquet and journal, :func:`study.tables.load_tables`); a
    missing or unreadable table becomes a note and an empty frame."""
    try:
        trials, robust = load_tables(folder)
    except Exception as exc:  # noqa: BLE001 - any unreadable table is reported, not raised
        notes.append(f"the result tables with their journal are unreadable: {type(exc).__name__}: {exc}")
        trials, robust = (_read_alone(folder / name, notes) for name in (TRIALS_FILE, ROBUSTNESS_FILE))
    if trials.empty:
        notes.append(f"no trial has reported a result yet (no {TRIALS_FILE})")
    elif robust.empty:
        notes.append(f"no robustness results yet (no {ROBUSTNESS_FILE})")
    return trials, robust


def _read_alone(path: Path, notes: list[str]) -> pd.DataFrame:
    """One Parquet table without the journal (when reading both with it failed), or a note."""
    try:
        return read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable table is reported, not raised
        notes.append(f"{path.name} is unreadable: {type(exc).__name__}: {exc}")
        return pd.DataFrame()


def _load_space(state: dict[str, Any] | None, state_file: Path, notes: list[str]):
    """The space the study ran: the YAML saved in study.json (``state_file``), else the file it came from."""
    if state is None:
        return None
    if state.get("space_yaml"):
        try:
            raw = parse_space_yaml(state["space_yaml"], state_file)
            return space_from_dict(raw, state.get("space", "space"), state_file)
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
        values = {p: row[c] if c in row and is_present(row[c]) else row.get(p) for p, c in columns.items()}
        parts = [f"{param_symbol(p)}={format_value(v)}" for p, v in values.items() if is_present(v)]
        labels[str(trial_id)] = ", ".join(parts) or str(trial_id)
    counts = pd.Series(list(labels.values())).value_counts()
    return {t: (f"{lab} ({t})" if counts[lab] > 1 else lab) for t, lab in labels.items()}


def param_symbol(param: str) -> str:
    return "ε" if param == "epsilon" else param


def is_present(value: Any) -> bool:
    return not (value is None or (isinstance(value, float) and math.isnan(value)))


def format_value(value: Any, digits: int = 4) -> str:
    """Short display of a hyperparameter value: ``10000``, ``0.0001``, ``dssim``."""
    if isinstance(value, (float, np.floating)):
        if float(value).is_integer() and abs(value) < 1e7:
            return str(int(value))
        return f"{value:.{digits}g}"
    return str(value)


def format_number(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec``; '–' where it is missing, not a number or not finite."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "–"
    return format(value, spec) if math.isfinite(value) else "–"


def float_of(row: pd.Series | dict, key: str) -> float:
    """``row[key]`` as a float; NaN where the row has no such key or its value is no number."""
    value = row.get(key, math.nan)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# How a column names an attack: ``PGD@5000 dNMSE`` (image PGD, the seed's), ``PGD-k@5000 dNMSE`` (k-space PGD)
ATTACK_COLUMNS = {"pgd": "PGD", "pgd_kspace": "PGD-k", "noise": "noise", "generator": "generator"}
ATTACK_NAMES = {
    "pgd": "PGD",
    "pgd_kspace": "k-space PGD",
    "noise": "random noise",
    "generator": "the trial's generator",
}


def reference_attack(res: StudyResults) -> tuple[str, float] | None:
    """The attack and budget (320² units) the study's objectives name (``rob_pgd_e5000_nmse`` -> ('pgd',
    5000), ``rob_pgd_kspace_e5000_nmse`` -> ('pgd_kspace', 5000)) at one of the study's budgets, else
    PGD at the largest budget: image PGD, or k-space PGD for a study whose held-out rows hold only that
    (the unrolled network takes no image attack). None without a budget."""
    rows = res.robust["attack"] if "attack" in res.robust else pd.Series(dtype=str)
    attacks = {*ATTACKS, *rows.dropna().astype(str)} - {"clean"}
    for metric, _ in res.objectives:
        for attack in sorted(attacks, key=len, reverse=True):  # pgd_kspace is not read as pgd
            hit = re.fullmatch(rf"rob_{re.escape(attack)}_e([0-9p.e+]+)_\w+", metric)
            if hit and float(hit.group(1).replace("p", ".")) in res.budgets:
                return attack, float(hit.group(1).replace("p", "."))
    if not res.budgets:
        return None
    image = rows.empty or (rows == "pgd").any() or not (rows == "pgd_kspace").any()
    return ("pgd" if image else "pgd_kspace"), max(res.budgets)


def reference_budget(res: StudyResults) -> float | None:
    """The budget of :func:`reference_attack`; None without one."""
    found = reference_attack(res)
    return found[1] if found else None


def attack_column(attack: str, budget: float | None, name: str) -> str:
    """A column of an attacked metric: ``PGD@5000 dNMSE`` (``attack_column('pgd', 5000, 'dNMSE')``),
    ``PGD-k@5000 dNMSE`` for k-space PGD; without a budget ``PGD dNMSE``."""
    short = ATTACK_COLUMNS.get(attack, attack)
    return f"{short}@{budget:g} {name}" if budget else f"{short} {name}"


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


def held_out_cell(rows: pd.DataFrame, attack: str, budget: float, key: str) -> float:
    """``key`` of the first of ``rows`` under ``attack`` at ``budget`` (320x320 units); NaN if none."""
    hit = rows[(rows["attack"] == attack) & (rows["budget_ref"] == budget)] if len(rows) else rows
    return float(hit.iloc[0][key]) if len(hit) and key in hit and pd.notna(hit.iloc[0][key]) else math.nan


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def markdown_cell(text: str) -> str:
    """A message as one Markdown table cell: no pipes, no line breaks, at most 300 characters."""
    return text.replace("|", "\\|").replace("\n", " ")[:300]


def plus_minus(value: Any, se: Any, spec: str) -> str:
    """``value ± se`` (the standard error over volumes), or just the value where it has none."""
    text = format_number(value, spec)
    return f"{text} ± {format_number(se, spec)}" if format_number(se, spec) != "–" and text != "–" else text


def versus_cell(ratio: Any, se: Any, verdict: Any) -> str:
    """An *NMSE / input* cell (Table 1, ``summary.md``): the ratio ± its paired SE, and the verdict
    where the model does not beat its zero-filled input (:mod:`mriadv.verdict`); '–' without one."""
    cell = plus_minus(ratio, se, ".2f")
    if cell == "–":
        return cell
    cell = cell.replace(" ±", "× ±", 1) if "±" in cell else cell + "×"
    return cell + {"worse": " **worse than its input**", "unclear": " (≈ input)"}.get(verdict or "", "")
