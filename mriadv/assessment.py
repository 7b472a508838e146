"""The outcome of :func:`mriadv.assess.assess` and how it reads: :class:`Assessment` (plain dicts,
written as JSON by ``--out``) and :func:`format_assessment` (the lines the command prints); and the
two option resolvers ``assess`` uses: :func:`resolve_protocol` (which protocol and budget grid) and
:func:`instabilities` (the type-2 and type-3 measurements asked for)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Sequence

from mriadv.config import ConfigError, TrainConfig, refuse_image_attacks
from mriadv.units import to_reference
from mriadv.verdict import VersusInput

if TYPE_CHECKING:
    from torch import nn

    from mriadv.data.files import SliceDataset
    from mriadv.instabilities import FeatureSearch, FeatureSpec
    from mriadv.runtime import Runtime

RANDOM_START_CHOICES = ("none", "uniform", "gaussian")  # --pgd-random-start ('none': from zero)


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
    versus_input: dict[str, Any] | None = None  # mriadv.verdict.VersusInput: the model against its zero-filled input

    def as_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "epoch": self.epoch,
            "split": self.split,
            "config": self.config,
            "protocol": self.protocol,
            "clean": self.clean,
            "robustness": self.rows,
            "pgd_trace": self.pgd_trace,
            "features": self.features,
            "sampling": self.sampling,
            "versus_input": self.versus_input,
        }


def format_assessment(a: Assessment) -> list[str]:
    """Human-readable lines: the protocol, the clean metrics, one line per attack and budget (its size
    also relative: ``‖δ‖/‖y‖`` for k-space attacks, ``‖δ‖/‖x̃‖`` for image attacks), then each PGD
    attack's objective per step on the first batch."""
    c = a.clean
    lines = [
        f"{a.checkpoint} (epoch {a.epoch}, epsilon {a.config['epsilon']:g} at {a.config['crop_size']}^2): "
        f"{a.split} split: {c['num_volumes']} validation volumes, {c['num_slices']} slices"
    ]
    if a.protocol is not None:
        lines.append(f"protocol {a.protocol['name']}: {a.protocol['source']}")
    lines.append(f"{'clean':<26} nmse {c['nmse']:.4f}  psnr {c['psnr']:6.2f}  ssim {c['ssim']:.4f}")
    for r in a.rows:
        name = f"{r['attack']} @ {_budget_label(r['budget_ref'], r.get('rel', float('nan')))}"
        lines.append(
            f"{name:<26} nmse {r['nmse']:.4f}  psnr {r['psnr']:6.2f}  ssim {r['ssim']:.4f}  "
            f"(Δnmse {r['d_nmse']:+.4f}, Δpsnr {r['d_psnr']:+.2f}, Δssim {r['d_ssim']:+.4f}; "
            f"‖δ‖² {r['delta_sq']:.4g}, {_ref_name(r['attack'])} {r.get('delta_rel', float('nan')):.4g})"
        )
    for t in a.pgd_trace:
        budget_ref = to_reference(t["budget"], int(a.config["crop_size"]))
        runs = t["trace"]
        spread = (
            f"; {len(runs)} runs end at {min(r[-1] for r in runs):.4g} to {max(r[-1] for r in runs):.4g}"
            if len(runs) > 1
            else ""
        )
        lines.append(f"  {t['attack']} @ {_budget_label(budget_ref, t['rel'])}: {_trace_summary(runs[0])}{spread}")
    if a.features is not None or a.sampling is not None:
        from mriadv.instabilities import format_features, format_sampling  # torch: only when these are printed

        lines += format_features(a.features) if a.features is not None else []
        lines += format_sampling(a.sampling) if a.sampling is not None else []
    if a.versus_input is not None:  # the last line, as a training run's: does the model beat its input?
        lines.append(VersusInput(**a.versus_input).line())
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
    return (
        "objective per step (first batch, mean) "
        + " → ".join(f"{trace[i]:.4g}" for i in marks)
        + f"; the last {last} of {n} steps found {share:.0%} of the increase"
    )


__all__ = ["Assessment", "format_assessment"]


def instabilities(
    model: nn.Module,
    dataset: SliceDataset,
    runtime: Runtime,
    batch_size: int,
    num_workers: int,
    features: FeatureSpec | None,
    feature_search: FeatureSearch | None,
    sampling: Sequence[float] | None,
    center_fraction: float | None,
) -> tuple[dict[str, Any] | None, list[dict[str, Any]] | None]:
    """The type-2 and type-3 results :func:`assess` adds (None where not asked for), as dicts."""
    from mriadv.instabilities import FeatureSearch, NoTissue, feature_recovery, nested_masks, sampling_sweep

    if sampling is not None:
        cf = dataset.transform.mask_func.center_fraction if center_fraction is None else center_fraction
        try:
            nested_masks(sampling, cf)
        except ValueError as exc:
            raise ConfigError(f"sampling sweep: {exc}") from exc
    try:
        feats = (
            None
            if features is None
            else feature_recovery(model, dataset, runtime, features, feature_search or FeatureSearch()).as_dict()
        )
    except NoTissue as exc:
        raise ConfigError(str(exc)) from exc
    rows = (
        None
        if sampling is None
        else [
            r.as_dict()
            for r in sampling_sweep(
                model, dataset, runtime, sampling, center_fraction, batch_size=batch_size, num_workers=num_workers
            )
        ]
    )
    return feats, rows


def resolve_protocol(
    name: str | None,
    cfg: TrainConfig,
    budgets_given: bool,
    rel_budgets: Sequence[float] | None,
    options: dict[str, Any],
) -> tuple[Any, tuple[float, ...] | None]:
    """The protocol :func:`assess` evaluates with, and the absolute budgets at the crop it runs at
    (None: the protocol's own ``budgets_ref``); ``(None, None)`` for the training's own attacks.

    ``name``: a preset, or None for the training's attacks and PGD settings (used only when
    ``rel_budgets`` or a PGD option is given). ``options``: PGD fields of the protocol, None where not
    given (``random_start='none'``: from zero). ``budgets_given`` (``cfg.attack_budgets`` holds them)
    or ``rel_budgets``: a grid that replaces the protocol's whole grid."""
    from mriadv.protocols import Protocol, get_protocol

    options = {k: v for k, v in options.items() if v is not None}
    if options.get("random_start") == "none":
        options["random_start"] = None
    elif "random_start" in options and options["random_start"] not in RANDOM_START_CHOICES:
        raise ConfigError(f"PGD random start {options['random_start']!r}: must be one of {RANDOM_START_CHOICES}")
    pgd_options = {k: v for k, v in options.items() if k not in ("steps", "step_scale")}
    if name is None and rel_budgets is None and not pgd_options:
        return None, None
    grid_given = budgets_given or rel_budgets is not None
    rels = tuple(float(r) for r in rel_budgets) if rel_budgets is not None else ()
    if name is None:  # cfg already holds any steps / step scale / budgets given
        base = Protocol(
            "trained",
            tuple(cfg.attacks),
            steps=cfg.pgd_steps,
            step_scale=cfg.pgd_step_scale,
            source="the run's own attacks and PGD settings (TrainConfig attacks, pgd_steps, "
            "pgd_step_scale, attack_budgets)",
            differences="none",
        )
        options = pgd_options
        grid_given = True
        budgets = tuple(cfg.attack_budgets) if budgets_given or rel_budgets is None else ()
    else:
        base = get_protocol(name)
        budgets = tuple(cfg.attack_budgets) if budgets_given else ()
    changes: dict[str, Any] = dict(options)
    if grid_given:
        changes |= {"budgets_ref": (), "rel_budgets": rels}
    proto = replace(base, **changes)  # validates: ConfigError naming the bad option
    if cfg.arch == "unrolled":  # it reconstructs from the measurements: no image-domain attack reaches it
        refuse_image_attacks(proto.attacks, cfg.perturbation, f"protocol {proto.name!r}")
    return proto, (budgets if grid_given else None)
