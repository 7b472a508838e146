"""The seed's Figure 6 (Huang & Liang) for a study: worst-case perturbations and what they do.

For one held-out (report-split) validation slice and each adversarially trained trial (epsilon >
0), the worst-case (PGD) perturbation at the trial's epsilon and the reconstructions of the
adversarially trained and the standard (epsilon = 0) model under their own worst cases, with the
error maps. Drawn by
:func:`study.report.write_report` as ``report/figure6.png``; this module loads the networks (torch),
so the report imports it only when the figure is drawn.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from mriadv.adversaries import predictor
from mriadv.attacks import PGDAttack
from mriadv.checkpoint import load_checkpoint
from mriadv.config import TrainConfig, to_reference
from mriadv.data.loading import build_data, preview_batch
from mriadv.data.transforms import denormalize
from mriadv.evaluate import preview
from mriadv.metrics import nmse
from mriadv.runtime import Runtime
from mriadv.trainer import build_reconstructor
from study.report_data import StudyResults, format_value
from study.report_plots import save_png

FIGURE6_MAX_ROWS = 8
FIGURE6_COLUMNS = (
    "ground truth",
    "adv. model,\nclean input",
    "worst-case δ\n(PGD)",
    "perturbed input",
    "adv. model,\nperturbed input",
    "std. model, its own\nworst-case input",
    "|error| adv. model,\nperturbed",
    "|error| std. model,\nits worst case",
)


@dataclass
class _Panel:
    """One image of Figure 6 (``(h, w)``, normalised units), or, without an image, a note."""

    detail: str
    image: np.ndarray | None = None
    kind: str = "image"  # 'image' | 'delta' | 'error'


class _Row(NamedTuple):
    """One row of Figure 6: its label, its panels (one per :data:`FIGURE6_COLUMNS`) and the slice drawn."""

    label: str
    panels: list[_Panel]
    slice_name: str


def figure6(res: StudyResults, path: Path) -> list[str]:
    """Draw Figure 6 (see the module docstring) into ``path``; returns notes on what could not be drawn.

    One row per adversarial trial (epsilon > 0, at most :data:`FIGURE6_MAX_ROWS`), for the middle
    slice of the first volume of the held-out report split. PGD (:class:`mriadv.attacks.PGDAttack`, deterministic)
    runs at the trial's epsilon with its ``pgd_steps``, in its perturbation domain, against the
    adversarially trained model and, separately, against the standard model (each meets its own
    worst case). NMSEs are of the slice, fastMRI's definition (de-normalised images).
    """
    notes: list[str] = []
    nets = _Networks(res, Runtime.resolve("cuda" if torch.cuda.is_available() else "cpu", "fp32"))
    adversarial, standard = _adversarial_and_standard(res)
    other = [c for c in res.columns.values() if c != "epsilon_ref"]  # the searched values beside epsilon
    adversarial = _at_most_max_rows(adversarial, notes)
    _note_a_missing_side(adversarial, standard, notes)
    with _threads_of_the_trials(res, nets.runtime):
        rows = [
            _adversarial_row(res, nets, row, _standard_for(row, standard, other), other, notes)
            for _, row in adversarial.iterrows()
        ]
        if adversarial.empty and not standard.empty:
            rows.append(_standard_only_row(res, nets, standard.iloc[0]["trial_id"]))
    drawn = [r for r in rows if r is not None]  # trials without a best.pt are left out
    if not drawn:
        raise ValueError("no trial with a best.pt to draw")
    _draw_rows(drawn, _title(res, nets, adversarial, drawn[-1].slice_name), path)
    return notes


class _Networks:
    """The study's reconstructors (each trial's ``best.pt``) and their held-out preview slices, each
    loaded once, and PGD against them."""

    def __init__(self, res: StudyResults, runtime: Runtime):
        self.res, self.runtime = res, runtime
        self.models: dict[str, tuple[Any, Any] | None] = {}  # trial id -> (TrainConfig, model), None: no best.pt
        self.batches: dict[tuple, Any] = {}

    def load(self, trial_id: str) -> tuple[Any, Any] | None:
        """``(config, model)`` of a trial, in eval mode on the runtime's device (the model its evaluation ran,
        :func:`mriadv.adversaries.predictor`: smoothed for ``adversary='smoothing'``); None without a ``best.pt``."""
        if trial_id not in self.models:
            ckpt = self.res.best_pt(trial_id)
            if ckpt is None:  # already noted by the report (study.report._check_partial)
                self.models[trial_id] = None
            else:
                payload = load_checkpoint(ckpt)
                cfg = TrainConfig.from_dict(payload["config"])
                model = build_reconstructor(cfg)
                model.load_state_dict(payload["networks"]["recon"])
                self.models[trial_id] = (cfg, predictor(cfg, self.runtime.prepare_model(model)).eval())
        return self.models[trial_id]

    def batch_for(self, cfg):
        """The preview batch (one slice) of the held-out split a trial with ``cfg`` was evaluated on."""
        key = (
            cfg.data,
            cfg.crop_size,
            cfg.mask_type,
            cfg.center_fraction,
            cfg.acceleration,
            cfg.seed,
            cfg.clamp,
            cfg.target_key,
            cfg.perturbation,
            cfg.arch,
            tuple(cfg.attacks),
        )
        if key not in self.batches:
            if cfg.data is None or not Path(cfg.data).is_dir():
                raise FileNotFoundError(f"the data folder {cfg.data} is gone")
            data = build_data(cfg, self.runtime, training=False)
            held_out = data.report if data.report is not None else data.val  # a slice nothing was selected on
            self.batches[key] = preview_batch(held_out, 1).to(self.runtime.device)
        return self.batches[key]

    def attacked(self, model, cfg, budget, batch) -> dict[str, np.ndarray]:
        """preview() of the model on the clean and the PGD-perturbed slice: (h, w) arrays."""
        domain = "kspace" if cfg.arch == "unrolled" else cfg.perturbation  # it takes the measurements
        attack = PGDAttack(budget, cfg.pgd_steps, cfg.pgd_step_scale, domain, cfg.kspace_sampled_only, cfg.clamp)
        with self.runtime.evaluating():  # fp32 with TF32 off, as every evaluation
            x = attack(model, batch, self.runtime).batch
        return {k: v[0] for k, v in preview(model, batch, self.runtime, {"pgd": x}).items()}

    def pgd_steps(self) -> list[int]:
        """The PGD steps of every loaded model, sorted."""
        return sorted({m[0].pgd_steps for m in self.models.values() if m is not None})


def _slice_nmse(batch, image: np.ndarray) -> float:
    """NMSE of a normalised ``(h, w)`` image against the slice's target, both de-normalised."""
    mean, std = float(batch.mean[0]), float(batch.std[0])
    gt = denormalize(batch.target[0, 0].cpu().numpy().astype(np.float64), mean, std)
    return nmse(gt[None], denormalize(image.astype(np.float64), mean, std)[None])


def _slice_name(batch) -> str:
    return f"{batch.fnames[0]} slice {int(batch.slice_nums[0])}"


def _adversarial_and_standard(res: StudyResults) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The best rows of the adversarially trained (epsilon > 0) and of the standard (epsilon = 0) trials."""
    best = res.best
    eps = best["epsilon"].astype(float) if "epsilon" in best else pd.Series(np.nan, index=best.index)
    return best[eps > 0], best[eps == 0]


def _at_most_max_rows(adversarial: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    """At most :data:`FIGURE6_MAX_ROWS` adversarial trials, evenly over their order (epsilon first)."""
    if len(adversarial) > FIGURE6_MAX_ROWS:
        keep = np.unique(np.linspace(0, len(adversarial) - 1, FIGURE6_MAX_ROWS).round().astype(int))
        notes.append(f"figure 6 shows {len(keep)} of the {len(adversarial)} adversarial trials (evenly over ε)")
        adversarial = adversarial.iloc[keep]
    return adversarial


def _note_a_missing_side(adversarial: pd.DataFrame, standard: pd.DataFrame, notes: list[str]) -> None:
    """Say which columns stay empty where the study has no standard or no adversarial trial."""
    if standard.empty:
        notes.append(
            "figure 6: the study has no standard-training (ε = 0) trial, so the standard model's columns are empty"
        )
    if adversarial.empty:
        notes.append(
            "figure 6: the study has no adversarially trained (ε > 0) trial; it shows the standard "
            "model under PGD at the largest attack budget only"
        )


def _standard_for(row: pd.Series, standard: pd.DataFrame, other: list[str]) -> str | None:
    """The epsilon-0 trial with the same other searched values (else the first one)."""
    same = standard
    for c in other:
        if c in standard and c in row:
            same = same[same[c].astype(str) == str(row[c])]
    pick = same if not same.empty else standard
    return pick.iloc[0]["trial_id"] if not pick.empty else None


@contextmanager
def _threads_of_the_trials(res: StudyResults, runtime: Runtime) -> Iterator[None]:
    """On the CPU, as many torch threads as the trials had (a report shares the machine too); the
    process's own number again afterwards."""
    base = (res.state or {}).get("base") or {}
    threads = torch.get_num_threads()
    if runtime.device.type == "cpu":
        torch.set_num_threads(int(base.get("threads") or min(threads, 4)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _adversarial_row(
    res: StudyResults, nets: _Networks, row: pd.Series, std_id: str | None, other: list[str], notes: list[str]
) -> _Row | None:
    """The row of one adversarial trial: its model clean and under its own worst case at its epsilon,
    then the standard trial ``std_id`` under its own worst case at that epsilon; None without a ``best.pt``."""
    loaded = nets.load(row["trial_id"])
    if loaded is None:
        return None
    cfg, model = loaded
    batch = nets.batch_for(cfg)
    a = nets.attacked(model, cfg, cfg.epsilon, batch)
    n_clean, n_adv = _slice_nmse(batch, a["recon"]), _slice_nmse(batch, a["pgd_recon"])
    panels = [
        _Panel("", a["target"]),
        _Panel(f"NMSE {n_clean:.4f}", a["recon"]),
        _Panel(
            f"vs adv. model, ‖δ‖²≤{to_reference(cfg.epsilon, cfg.crop_size):.3g} (320²)",
            a["pgd_delta"],
            "delta",
        ),
        _Panel("", a["pgd_input"]),
        _Panel(f"NMSE {n_adv:.4f}", a["pgd_recon"]),
    ]
    panels += _standard_columns(nets, std_id, cfg, batch, a, n_adv, notes)
    label = "\n".join(
        [
            f"ε={format_value(row['epsilon_ref'])} (320²)",
            f"RMS {cfg.epsilon_rms:.3f}/px",
            *(f"{p}={format_value(row[c])}" for p, c in res.columns.items() if c in other),
        ]
    )
    return _Row(label, panels, _slice_name(batch))


def _standard_columns(
    nets: _Networks, std_id: str | None, cfg, batch, a: dict[str, np.ndarray], n_adv: float, notes: list[str]
) -> list[_Panel]:
    """The last three panels of an adversarial row (``a``: its model's preview, ``n_adv``: its NMSE
    under PGD): the standard model under its own worst case at ``cfg.epsilon`` (the reason instead
    where there is none to compare) and the two error maps."""
    std = nets.load(std_id) if std_id is not None else None
    if std is not None and std[0].crop_size != cfg.crop_size:
        notes.append(f"figure 6: standard trial {std_id} has another crop size; not compared")
        std = None
    err_adv = _Panel(f"NMSE {n_adv:.4f}", np.abs(a["pgd_recon"] - a["target"]), "error")
    if std is None:
        why = "no standard\n(ε = 0) trial" if std_id is None else f"standard trial\n{std_id}:\nno best.pt"
        return [_Panel(why), err_adv, _Panel("")]
    s = nets.attacked(std[1], cfg, cfg.epsilon, batch)
    n_std = _slice_nmse(batch, s["pgd_recon"])
    return [
        _Panel(f"NMSE {n_std:.4f}", s["pgd_recon"]),
        err_adv,
        _Panel(f"NMSE {n_std:.4f}", np.abs(s["pgd_recon"] - s["target"]), "error"),
    ]


def _standard_only_row(res: StudyResults, nets: _Networks, std_id: str) -> _Row | None:
    """Without an adversarial trial: the standard model under PGD at the largest attack budget, in
    the columns that hold the perturbation and its own worst case; None without a ``best.pt``."""
    loaded = nets.load(std_id)
    if loaded is None:
        return None
    cfg, model = loaded
    batch = nets.batch_for(cfg)
    budget = max(cfg.attack_budgets)
    s = nets.attacked(model, cfg, budget, batch)
    n_clean, n_std = _slice_nmse(batch, s["recon"]), _slice_nmse(batch, s["pgd_recon"])
    panels = [
        _Panel("", s["target"]),
        _Panel(f"no adversarially\ntrained (ε > 0) trial\n\n(std. model, clean:\nNMSE {n_clean:.4f})"),
        _Panel(f"vs std. model, ‖δ‖²≤{to_reference(budget, cfg.crop_size):.3g} (320²)", s["pgd_delta"], "delta"),
        _Panel("", s["pgd_input"]),
        _Panel(""),
        _Panel(f"NMSE {n_std:.4f}", s["pgd_recon"]),
        _Panel(""),
        _Panel(f"NMSE {n_std:.4f}", np.abs(s["pgd_recon"] - s["target"]), "error"),
    ]
    label = f"{res.label(std_id)}\nattacked at\n{max(res.budgets or [0]):g} (320²)"
    return _Row(label, panels, _slice_name(batch))


def _title(res: StudyResults, nets: _Networks, adversarial: pd.DataFrame, slice_name: str) -> str:
    """The figure's title: the study, the slice, the PGD steps of the models drawn and the budget."""
    where = (
        "at each row's training budget ε"
        if not adversarial.empty
        else f"at the largest attack budget ({max(res.budgets or [0]):g} at 320²): the study has no ε > 0 trial"
    )
    return (
        f"{res.folder.name} — Figure 6 after Huang & Liang: held-out {slice_name}; worst case = L2 PGD "
        f"({'/'.join(map(str, nets.pgd_steps()))} steps) {where}; normalised units"
    )


def _draw_rows(rows: list[_Row], title: str, path: Path) -> None:
    """Grey images: in each row, images share the ground truth's range and the two error maps a
    common [0, max] range; the perturbation, much smaller, has its own symmetric range."""
    ncols = len(FIGURE6_COLUMNS)
    fig = Figure(figsize=(1.45 * ncols + 0.8, 1.7 * len(rows) + 0.8), layout="constrained")
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, (row_label, panels, _) in enumerate(rows):
        target = panels[0].image
        lo, hi = float(np.min(target)), float(np.max(target))
        errors = [p.image for p in panels if p.kind == "error" and p.image is not None]
        emax = max(float(np.max(e)) for e in errors) if errors else 1.0
        for c, (ax, p) in enumerate(zip(axes[r], panels)):
            ax.set_xticks([])
            ax.set_yticks([])
            header = FIGURE6_COLUMNS[c] + "\n" if r == 0 else ""
            if p.image is None:
                ax.imshow(np.full_like(target, np.nan), cmap="gray")  # the same box as its neighbours
                for side in ax.spines.values():
                    side.set_visible(False)
                ax.text(0.5, 0.5, p.detail, ha="center", va="center", fontsize=7, color="0.35", transform=ax.transAxes)
                ax.set_title(header, fontsize=7)
                continue
            detail = p.detail
            if p.kind == "delta":
                m = float(np.max(np.abs(p.image))) or 1.0
                ax.imshow(p.image, cmap="gray", vmin=-m, vmax=m, interpolation="nearest")
                detail = f"{p.detail}\nshown ±{m:.2g}"
            else:
                vmin, vmax = (0.0, emax) if p.kind == "error" else (lo, hi)
                ax.imshow(p.image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(header + detail, fontsize=7)
        axes[r, 0].set_ylabel(f"{row_label}\nimages [{lo:.2g}, {hi:.2g}]\nerrors [0, {emax:.2g}]", fontsize=7)
    fig.suptitle(title, fontsize=8)
    save_png(fig, path, grey=True)
