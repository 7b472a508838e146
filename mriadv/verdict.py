"""Never silently worse than the input: a trained reconstructor against its own zero-filled input
|F^-1 P(y)| on the same held-out volumes, with paired standard errors and a verdict in words.

Standard library only (no torch): the run's records, ``assess``, the study's tables, its report and
its console all read the same numbers and the same words from here.

The ratio is ``R = mean_v(model NMSE_v) / mean_v(zero-filled NMSE_v)`` (the ratio of the two numbers a
table shows), and its standard error the ratio estimator's linearisation over volumes, paired:
``SE(R) = sd_v(a_v - R b_v) / (sqrt(n) * mean_v(b_v))``. The model *beats its input* when its NMSE is
lower and its SSIM higher, each by more than :data:`SE_MULTIPLE` paired standard errors of the
per-volume differences; it is *worse than its input* when its NMSE is higher or its SSIM lower by
more than that; otherwise the difference is within noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

SE_MULTIPLE = 2.0  # a difference counts when it exceeds this many paired standard errors
VERDICTS = ("beats", "worse", "unclear")
VERDICT_WORDS = {
    "beats": "beats its input",
    "worse": "worse than its input",
    "unclear": "not distinguishable from its input",
}


def _mean(xs: list[float]) -> float:
    return math.fsum(xs) / len(xs)


def _se(xs: list[float]) -> float:
    """Standard error of the mean of ``xs`` (NaN for fewer than two)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    m = _mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1) / n)


@dataclass(frozen=True)
class VersusInput:
    """A model against its zero-filled input on the same volumes. ``ratio``: mean NMSE over mean
    zero-filled NMSE, ``ratio_se`` its paired standard error; ``d_nmse`` / ``d_ssim``: mean of the
    per-volume differences model minus input, with their paired standard errors; ``verdict``: one of
    :data:`VERDICTS`."""

    nmse: float
    zf_nmse: float
    ssim: float
    zf_ssim: float
    ratio: float
    ratio_se: float
    d_nmse: float
    d_nmse_se: float
    d_ssim: float
    d_ssim_se: float
    volumes: int
    verdict: str

    @property
    def beats(self) -> bool:
        return self.verdict == "beats"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def words(self) -> str:
        return VERDICT_WORDS[self.verdict]

    def line(self, updates: int | None = None) -> str:
        """The sentence a run ends with, e.g. ``held-out NMSE 0.0355 vs zero-filled 0.0175 (2.03x ±
        0.10): worse than its input - 96 updates; try more steps``."""
        text = (
            f"held-out NMSE {self.nmse:.4f} vs zero-filled {self.zf_nmse:.4f} "
            f"({self.ratio:.2f}x ± {self.ratio_se:.2f}), SSIM {self.ssim:.3f} vs {self.zf_ssim:.3f}: {self.words()}"
        )
        if not self.beats:
            hint = "try more steps (steps_per_epoch, max_epochs) or a residual U-Net (residual=true)"
            text += f" — {updates} updates; {hint}" if updates is not None else f" — {hint}"
        return text


def versus_input(
    nmse: Mapping[str, float], zf_nmse: Mapping[str, float], ssim: Mapping[str, float], zf_ssim: Mapping[str, float]
) -> VersusInput:
    """Compare per-volume metrics (``{file name: value}``) of a model and of its zero-filled input,
    paired over the volumes all four hold. Raises ``ValueError`` when they share no volume."""
    names = sorted(set(nmse) & set(zf_nmse) & set(ssim) & set(zf_ssim))
    if not names:
        raise ValueError("versus_input: the model and the zero-filled input share no volume")
    a, b = [nmse[v] for v in names], [zf_nmse[v] for v in names]
    s, t = [ssim[v] for v in names], [zf_ssim[v] for v in names]
    ratio = _mean(a) / _mean(b) if _mean(b) > 0 else float("nan")
    ratio_se = _se([x - ratio * y for x, y in zip(a, b)]) / _mean(b) if _mean(b) > 0 else float("nan")
    d_nmse, d_nmse_se = _mean([x - y for x, y in zip(a, b)]), _se([x - y for x, y in zip(a, b)])
    d_ssim, d_ssim_se = _mean([x - y for x, y in zip(s, t)]), _se([x - y for x, y in zip(s, t)])
    margin_n = SE_MULTIPLE * (d_nmse_se if math.isfinite(d_nmse_se) else 0.0)
    margin_s = SE_MULTIPLE * (d_ssim_se if math.isfinite(d_ssim_se) else 0.0)
    if d_nmse < -margin_n and d_ssim > margin_s:
        verdict = "beats"
    elif d_nmse > margin_n or d_ssim < -margin_s:
        verdict = "worse"
    else:
        verdict = "unclear"
    return VersusInput(
        _mean(a),
        _mean(b),
        _mean(s),
        _mean(t),
        ratio,
        ratio_se,
        d_nmse,
        d_nmse_se,
        d_ssim,
        d_ssim_se,
        len(names),
        verdict,
    )


def compare(model: Any, zero_filled: Any) -> VersusInput:
    """:func:`versus_input` of two evaluations of the same volumes (objects with ``volume_nmse`` and
    ``volume_ssim``, such as :class:`mriadv.evaluate.EvalResult`): the model and its zero-filled input."""
    return versus_input(model.volume_nmse, zero_filled.volume_nmse, model.volume_ssim, zero_filled.volume_ssim)


def flat(comparison: VersusInput | None, prefix: str = "report_") -> dict[str, Any]:
    """Flat columns for a record or a table: ``report_vs_input_ratio`` (and ``_se``),
    ``report_vs_input_d_nmse`` / ``_d_ssim`` (and ``_se``), ``report_vs_input`` (the verdict) and
    ``report_beats_input`` (1.0 or 0.0)."""
    if comparison is None:
        return {}
    c = comparison
    out = {f"{prefix}vs_input_{k}": getattr(c, k) for k in ("ratio", "ratio_se", "d_nmse", "d_nmse_se")}
    out |= {f"{prefix}vs_input_{k}": getattr(c, k) for k in ("d_ssim", "d_ssim_se")}
    out[f"{prefix}vs_input"] = c.verdict
    out[f"{prefix}beats_input"] = 1.0 if c.beats else 0.0
    return out


def study_warning(verdicts: list[str]) -> str | None:
    """One warning line when no trial of a study beats its input (None otherwise, or without verdicts)."""
    if not verdicts or any(v == "beats" for v in verdicts):
        return None
    worse = sum(v == "worse" for v in verdicts)
    return (
        f"WARNING: no model of this study beats its own zero-filled input on the held-out volumes "
        f"({worse} of {len(verdicts)} worse, the rest within noise): the robustness numbers compare models "
        "that add nothing to their input. Likely cause: too few updates for this folder's recipe (the "
        "profile's steps_per_epoch x max_epochs; the cosine schedule ends at the last one) or a learning rate "
        "that does not suit the data; train a standard model with more steps, or residual=true, and check "
        "its verdict first."
    )


__all__ = [
    "SE_MULTIPLE",
    "VERDICTS",
    "VERDICT_WORDS",
    "VersusInput",
    "flat",
    "compare",
    "study_warning",
    "versus_input",
]
