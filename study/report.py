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

The work is split by concept: :mod:`study.report_data` reads the study folder,
:mod:`study.report_tables` writes Table 1, :mod:`study.report_plots` the figures from the tables,
:mod:`study.report_summary` ``summary.md``; this module writes them all and is the command line.
Only pandas and matplotlib (object API, Agg canvas, no pyplot state) are imported here; Figure 6 and
the feature figure, which load the networks with torch, are imported when they are drawn.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from study.analysis import failed_trials, identical_trials, trial_messages, trial_status
from study.layout import REPORT_DIR
from study.report_data import NotAStudyFolder, StudyResults, held_out, load_results
from study.report_plots import pareto_points, plot_curves, plot_pareto, plot_protocol_curves, plot_robustness
from study.report_findings import findings
from study.report_seeds import configuration_tables, write_configuration_tables
from study.report_summary import summary_markdown
from study.report_tables import markdown_cell, write_table1

REPORT_FILES = (
    "summary.md",
    "table1.md",
    "table1.csv",
    "configurations.csv",
    "versus_reference.csv",
    "figure6.png",
    "features.png",
    "robustness.png",
    "pareto.png",
    "curves.png",
    "protocol_curves.png",
)


def write_report(study_dir: Path, found: list[str] | None = None) -> Path:
    """Write ``<study_dir>/report/`` and return its path; raises :class:`NotAStudyFolder` for a
    folder that is not a study. Anything missing or broken inside a study becomes a note. ``found``,
    when given, receives the study's closing lines (:func:`study.report_findings.findings`), from the
    same tables as the report."""
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
    tables = attempt("configurations.csv", lambda: configuration_tables(res))
    over_seeds = (
        (attempt("configurations.csv", lambda: write_configuration_tables(tables, out)) or []) if tables else []
    )
    if found is not None and tables is not None:
        found.extend(attempt("findings", lambda: findings(res, tables)) or [])
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
    (out / "summary.md").write_text(summary_markdown(res, written, points, over_seeds))
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
        res.notes.append(
            f"{len(running)} trial(s) still RUNNING: the study is running or was interrupted (run the "
            "same study command again to resume it); this report shows the epochs reported so far"
        )
    for t, message in failed_trials(res.trials).items():
        res.notes.append(f"trial {t} ({res.label(t)}) failed: {markdown_cell(message) or 'no message'}")
    messages = trial_messages(res.trials)
    for t in statuses[statuses == "nan"].index:
        res.notes.append(
            f"trial {t} ({res.label(t)}) stopped on a non-finite loss: {markdown_cell(messages.get(t, ''))}"
        )
    no_best = set(statuses.index) - set(res.best["trial_id"] if not res.best.empty else [])
    for t in sorted(no_best - set(statuses[statuses == "ERROR"].index)):
        res.notes.append(f"trial {t} ({res.label(t)}) has no epoch with a finite validation loss: not in the tables")
    for t in res.best["trial_id"] if not res.best.empty else []:
        if res.best_pt(t) is None:
            res.notes.append(
                f"trial {t} ({res.label(t)}) has no best.pt"
                + ("" if res.trial_folder(t) else " (no trial folder)")
                + ": left out of figure 6"
            )
    shown = list(res.best["trial_id"]) if not res.best.empty else []
    for group in identical_trials(res.trials):
        group = sorted(group, key=lambda t: shown.index(t) if t in shown else len(shown))
        res.notes.append(
            f"trials {', '.join(f'{t} ({res.label(t)})' for t in group)} have the same validation loss "
            "at every epoch: in these runs their differing hyperparameters made no difference"
        )
    if not res.best.empty and not {"train_seed_nmse", "train_seed_psnr", "train_seed_ssim"} <= set(res.trials):
        res.notes.append(
            "trials.parquet has no train_seed_* columns (an older table): Training rows lack the "
            "seed-definition numbers"
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="study/report.py", description=__doc__.splitlines()[0])
    p.add_argument(
        "study_dir",
        help="a study folder, results/<name>, or a study on object storage, s3://bucket/prefix/<name>[?options]",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from study.storage import is_uri

    if is_uri(args.study_dir):
        return _remote_report(args.study_dir)
    try:
        folder = write_report(Path(args.study_dir))
    except NotAStudyFolder as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {folder}")
    return 0


def _remote_report(uri: str) -> int:
    """The report of a study on object storage: its driver's files and trial folders (without the
    checkpoints) downloaded into the working copy (:meth:`study.storage.RemoteStudy.reading`), the
    report written there and pushed beside them."""
    from study.storage import RemoteStudy, StorageError, first_line

    remote = RemoteStudy(uri)
    try:
        with remote.reading() as found:
            if not found:
                print(f"error: {remote.shown}: no study there (no study.json)", file=sys.stderr)
                return 2
            folder = write_report(remote.local)
            remote.push_tree(folder.name)
    except (StorageError, OSError) as exc:
        print(f"error: {remote.shown}: {first_line(exc)}", file=sys.stderr)
        return 2
    except NotAStudyFolder as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {remote.shown}/{folder.name}/ (written in {folder})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
