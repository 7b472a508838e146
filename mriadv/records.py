"""What a run records: one :class:`EpochRecord` per epoch (plain numbers, and the flat scalar dict
a study forwards to its tuner), the :class:`FitResult` of a whole run, and the attack rows as plain
dicts. No torch: the study's callbacks and tables read these without loading the networks."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mriadv.units import instability_flat, robust_flat, to_reference
from mriadv.verdict import VersusInput, flat as versus_flat

if TYPE_CHECKING:
    from mriadv.config import TrainConfig
    from mriadv.evaluate import EvalResult, RobustRow

STATUSES = ("running", "completed", "early_stopped", "nan")  # of an epoch's record (and of a checkpoint)


@dataclass
class EpochRecord:
    """Everything known after one epoch, as plain numbers (``robustness`` holds one row per attack
    and budget, measured on the fixed subset of selection slices). :meth:`flat` gives the scalar dict
    that a study forwards to its tuner.

    ``val_*`` are on the *selection* split (what early stopping and ``best.pt`` choose by). On the
    run's last epoch ``report`` holds the held-out evaluation of the best epoch's networks: clean and
    under every attack on every report-split slice, and the zero-filled input's own metrics beside
    them (see :func:`mriadv.fit.report_evaluation`)."""

    epoch: int  # 1-based: epochs completed
    status: str  # one of STATUSES
    epsilon: float
    epsilon_rms: float
    epsilon_ref: float  # the same per-pixel RMS expressed at 320x320 (the seed's units)
    train_loss: float  # reconstructor objective (clean + lambda1 * perturbed)
    train_clean_loss: float
    train_pert_loss: float
    gen_objective: float
    hinge: float
    delta_sq: float  # mean ||G(z)||^2 seen in training
    steps: int
    val_loss: float
    val_nmse: float
    val_psnr: float
    val_ssim: float
    val_seed_nmse: float
    val_seed_psnr: float
    val_seed_ssim: float
    train_nmse: float
    train_psnr: float
    train_ssim: float
    train_seed_nmse: float
    train_seed_psnr: float
    train_seed_ssim: float
    best_epoch: int
    best_val_loss: float
    is_best: bool
    train_time_s: float
    eval_time_s: float
    robust_time_s: float
    epoch_time_s: float
    slices_per_s: float
    robustness: list[dict[str, Any]] = field(default_factory=list)
    over_budget: float = float("nan")  # share of training images with ||delta||^2 > epsilon
    # mean ||delta||^2 / budget over training slices: epsilon in the image, each slice's budget in k-space
    # (relative to its measurements, mriadv.perturbations.budget_per_slice), so 1 is at the budget in both
    delta_sq_budget: float = float("nan")
    lr_factor: float = 1.0  # the schedule's learning-rate multiplier at the epoch's end
    val_nmse_se: float = float("nan")
    val_psnr_se: float = float("nan")
    val_ssim_se: float = float("nan")
    report_time_s: float = 0.0
    message: str = ""
    report: dict[str, Any] | None = None
    feature_fnr: float = float("nan")  # small-feature false-negative rate on the attacked selection subset
    feature_error: float = float("nan")  # ... and the features' mean relative recovery error
    init_from: str = ""  # fine-tuning: the checkpoint file the reconstructor started from; "": from scratch

    def flat(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("robustness", "status", "report")}
        out["epoch_status"] = self.status  # 'running' | 'completed' | 'early_stopped' | 'nan' after this epoch
        out.update(robust_flat("", self.robustness))
        if self.report is not None:
            rep = self.report
            out.update(report_split=rep["split"], report_epoch=rep["epoch"], report_volumes=rep["clean"]["num_volumes"])
            for m in ("nmse", "psnr", "ssim", "nmse_se", "psnr_se", "ssim_se"):
                out[f"report_{m}"] = rep["clean"][m]
                out[f"zf_report_{m}"] = rep["zero_filled"][m]
            out.update(robust_flat("report_", rep["robustness"]))
            out.update(robust_flat("zf_report_", rep["zero_filled_robustness"]))
            out.update(instability_flat(rep))
            out.update(versus_flat(self.versus_input))
        return out

    @property
    def versus_input(self) -> VersusInput | None:
        """The held-out model against its zero-filled input (:mod:`mriadv.verdict`), on the last record."""
        stored = (self.report or {}).get("vs_input")  # None for a report written before the verdict
        return VersusInput(**stored) if stored else None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EpochRecord":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def stopped(
        cls, epoch: int, cfg: TrainConfig, message: str, best_epoch: int, best_val_loss: float, **known: Any
    ) -> "EpochRecord":
        """The record of an epoch that ended in a non-finite loss: status ``nan``, unknown values NaN."""
        nan = float("nan")
        values: dict[str, Any] = {f.name: nan for f in fields(cls) if f.type in ("float", float)}
        values.update(
            epoch=epoch,
            status="nan",
            epsilon=cfg.epsilon,
            epsilon_rms=cfg.epsilon_rms,
            epsilon_ref=cfg.epsilon_ref,
            steps=0,
            best_epoch=best_epoch,
            best_val_loss=best_val_loss,
            is_best=False,
            message=message,
            robustness=[],
            report=None,
        )
        values.update(known)
        return cls(**values)


@dataclass
class FitResult:
    status: str  # 'completed' | 'early_stopped' | 'nan'
    message: str
    history: list[EpochRecord]
    best_epoch: int
    checkpoint: Path | None
    best_checkpoint: Path | None


def robust_rows(rows: list[RobustRow], crop_size: int, volumes: bool = False) -> list[dict[str, Any]]:
    """Rows as plain dicts with the budget in 320x320 units; per-volume NMSE (a JSON string, for
    paired comparisons) only where asked (the report split)."""
    out = []
    for r in rows:
        row = {**r.as_dict(), "budget_ref": to_reference(r.budget, crop_size)}
        row["volume_nmse"] = json.dumps(row["volume_nmse"]) if volumes else ""
        out.append(row)
    return out


def clean_row(res: EvalResult) -> dict[str, Any]:
    return {**res.as_dict(), "volume_nmse": json.dumps(res.volume_nmse), "volume_ssim": json.dumps(res.volume_ssim)}


__all__ = ["STATUSES", "EpochRecord", "FitResult", "clean_row", "robust_rows"]
