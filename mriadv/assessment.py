"""The outcome of :func:`mriadv.assess.assess` and how it reads: :class:`Assessment` (plain dicts,
written as JSON by ``--out``) and :func:`format_assessment` (the lines the command prints)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mriadv.units import to_reference


@dataclass
class Assessment:
    """The outcome of :func:`mriadv.assess.assess`: ``clean`` and ``rows`` as :class:`mriadv.evaluate.EvalResult`
    / :class:`mriadv.evaluate.RobustRow` dicts, budgets also in 320x320 units (``budget_ref``);
    ``protocol``: the :class:`mriadv.protocols.Protocol` evaluated with (as a dict, with the grid that
    ran), or None for the training's own attacks; ``pgd_trace``: per PGD attack, its mean objective
    at every iterate on the first batch (``trace``: one list per restart)."""

    checkpoint: str
    epoch: int
    config: dict[str, Any]
    clean: dict[str, Any]
    rows: list[dict[str, Any]]
    split: str = "report"
    protocol: dict[str, Any] | None = None
    pgd_trace: list[dict[str, Any]] = field(default_factory=list)
    features: dict[str, Any] | None = None  # mriadv.instabilities.FeatureResult.as_dict(), when asked for
    sampling: list[dict[str, Any]] | None = None  # mriadv.instabilities.SamplingRow dicts, when asked for

    def as_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "epoch": self.epoch, "split": self.split, "config": self.config,
                "protocol": self.protocol, "clean": self.clean, "robustness": self.rows, "pgd_trace": self.pgd_trace,
                "features": self.features, "sampling": self.sampling}


def format_assessment(a: Assessment) -> list[str]:
    """Human-readable lines: the protocol, the clean metrics, one line per attack and budget (its size
    also relative: ``‖δ‖/‖y‖`` for k-space attacks, ``‖δ‖/‖x̃‖`` for image attacks), then each PGD
    attack's objective per step on the first batch."""
    c = a.clean
    lines = [f"{a.checkpoint} (epoch {a.epoch}, epsilon {a.config['epsilon']:g} at {a.config['crop_size']}^2): "
             f"{a.split} split: {c['num_volumes']} validation volumes, {c['num_slices']} slices"]
    if a.protocol is not None:
        lines.append(f"protocol {a.protocol['name']}: {a.protocol['source']}")
    lines.append(f"{'clean':<26} nmse {c['nmse']:.4f}  psnr {c['psnr']:6.2f}  ssim {c['ssim']:.4f}")
    for r in a.rows:
        name = f"{r['attack']} @ {_budget_label(r['budget_ref'], r.get('rel', float('nan')))}"
        lines.append(f"{name:<26} nmse {r['nmse']:.4f}  psnr {r['psnr']:6.2f}  ssim {r['ssim']:.4f}  "
                     f"(Δnmse {r['d_nmse']:+.4f}, Δpsnr {r['d_psnr']:+.2f}, Δssim {r['d_ssim']:+.4f}; "
                     f"‖δ‖² {r['delta_sq']:.4g}, {_ref_name(r['attack'])} {r.get('delta_rel', float('nan')):.4g})")
    for t in a.pgd_trace:
        budget_ref = to_reference(t["budget"], int(a.config["crop_size"]))
        runs = t["trace"]
        spread = (f"; {len(runs)} runs end at {min(r[-1] for r in runs):.4g} to {max(r[-1] for r in runs):.4g}"
                  if len(runs) > 1 else "")
        lines.append(f"  {t['attack']} @ {_budget_label(budget_ref, t['rel'])}: {_trace_summary(runs[0])}{spread}")
    if a.features is not None or a.sampling is not None:
        from mriadv.instabilities import format_features, format_sampling  # torch: only when these are printed

        lines += (format_features(a.features) if a.features is not None else [])
        lines += (format_sampling(a.sampling) if a.sampling is not None else [])
    return lines


def _budget_label(budget_ref: float, rel: float) -> str:
    return f"rel {rel:g}" if rel == rel else f"{budget_ref:g} (320²)"  # rel is NaN for absolute budgets


def _ref_name(attack: str) -> str:
    return "‖δ‖/‖y‖" if attack.endswith("kspace") else "‖δ‖/‖x̃‖"


def _trace_summary(trace: list[float]) -> str:
    """The objective at the start, at quarters of the run and at the end, and the share of the whole
    increase that the last tenth of the steps found (near 0: more steps would find little more)."""
    n = len(trace) - 1
    marks = sorted({0, n // 4, n // 2, 3 * n // 4, n})
    last = max(1, n // 10)
    total = trace[-1] - trace[0]
    share = (trace[-1] - trace[n - last]) / total if total > 0 else float("nan")
    return ("objective per step (first batch, mean) " + " → ".join(f"{trace[i]:.4g}" for i in marks)
            + f"; the last {last} of {n} steps found {share:.0%} of the increase")


__all__ = ["Assessment", "format_assessment"]
