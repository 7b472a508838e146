"""Assess a trained model from its checkpoint: clean metrics and robustness at any budgets and
attack strength, after training is over.

    python -m mriadv.assess CHECKPOINT [--data DIR] [--budgets-ref 1000 5000 20000]
                            [--attacks pgd noise generator pgd_kspace] [--pgd-steps 50]
                            [--pgd-step-scale 2.5] [--max-volumes N] [--device auto] [--out FILE.json]
    python -m mriadv.assess CHECKPOINT --protocol l2-kspace-100 [--rel-budgets 0.05 0.1]
                            [--pgd-restarts 5 --pgd-random-start uniform] [--pgd-keep-best]
                            [--pgd-objective deviation]
    python -m mriadv.assess --list-protocols
    python -m mriadv.assess CHECKPOINT --instabilities     # or --features / --sampling 8 6 4 3 2

``CHECKPOINT`` is a ``best.pt`` or ``checkpoint.pt`` written by :func:`mriadv.fit.fit` (in a
``python -m mriadv.train`` output folder, or a study's trial folder), or a folder holding one
(``best.pt`` preferred: the networks of the best selection epoch, as in Table 1). The model is
evaluated on the held-out report split of its own data (``--split``; or ``--data``), with the fixed
per-volume validation masks, by the same :func:`mriadv.evaluate.evaluate` that training used, so
with the training's attack settings the numbers equal the run's final report-split record (and
``--split selection`` / ``robust`` an epoch's ``val_*`` / ``robustness``).

Why: a study judges every trial with a fixed, affordable attack (10 PGD steps by default). A
robustness claim should survive a stronger one: more steps, larger budgets, k-space PGD. Budgets
are given in the seed's units (squared L2 norm at 320x320, ``--budgets-ref``) and scaled to the
model's crop at equal per-pixel RMS, or at the crop itself (``--budgets``).

``--protocol NAME`` evaluates with a named protocol of :mod:`mriadv.protocols` (its attacks, PGD
settings and budget grid, e.g. relative k-space budgets ``||delta|| / ||y||``) instead of the
training's attacks; ``--rel-budgets`` and the ``--pgd-*`` options change a protocol (without
``--protocol``: the training's attacks). A budget grid given on the command line replaces the
protocol's whole grid. The mean objective per PGD step on the first batch is printed and written
(``"pgd_trace"``), so that one sees whether more steps would find more. Exit status: 0 done, 2 bad
input.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from mriadv.assess_options import CHECKPOINT_NAMES, SPLIT_CHOICES, assessed_config, budgets_at_crop
from mriadv.assess_options import instability_options, read_checkpoint, resolve_checkpoint
from mriadv.assessment import RANDOM_START_CHOICES, Assessment, format_assessment, instabilities, resolve_protocol
from mriadv.choices import PGD_OBJECTIVES
from mriadv.config import ATTACKS, ConfigError, TrainConfig
from mriadv.units import to_reference
from mriadv.verdict import compare

if TYPE_CHECKING:
    from torch import nn

    from mriadv.data.files import SliceDataset
    from mriadv.data.loading import Data
    from mriadv.evaluate import EvalResult, RobustRow
    from mriadv.instabilities import FeatureSearch, FeatureSpec
    from mriadv.protocols import Protocol
    from mriadv.runtime import Runtime
    from mriadv.trainer import Trainer
    from mriadv.verdict import VersusInput


@dataclass
class _Loaded:
    """A checkpoint's networks ready to evaluate: the config they run under (the saved one with the
    caller's overrides), its runtime and data, and the trainer holding the networks."""

    cfg: TrainConfig
    runtime: Runtime
    data: Data
    trainer: Trainer


def assess(
    checkpoint: str | Path,
    data: str | Path | None = None,
    budgets: Sequence[float] | None = None,
    budgets_ref: Sequence[float] | None = None,
    attacks: Sequence[str] | None = None,
    pgd_steps: int | None = None,
    pgd_step_scale: float | None = None,
    max_volumes: int | None = None,
    device: str = "auto",
    split: str = "report",
    *,
    protocol: str | None = None,
    rel_budgets: Sequence[float] | None = None,
    pgd_restarts: int | None = None,
    pgd_random_start: str | None = None,
    pgd_keep_best: bool | None = None,
    pgd_objective: str | None = None,
    features: FeatureSpec | None = None,
    feature_search: FeatureSearch | None = None,
    sampling: Sequence[float] | None = None,
    sampling_center_fraction: float | None = None,
) -> Assessment:
    """Evaluate the networks of ``checkpoint`` clean and under ``attacks`` at ``budgets``.

    Args:
        checkpoint: see :func:`resolve_checkpoint`.
        data: a fastMRI-format root or folder of .h5 files (default: the data the model trained on).
        budgets: squared-L2 attack budgets at the model's crop (default: the training's).
        budgets_ref: the same at 320x320 (the seed's units), scaled to the crop; not with ``budgets``.
        attacks: names from :data:`mriadv.config.ATTACKS` (default: the training's).
        pgd_steps, pgd_step_scale: PGD strength (default: the training's).
        max_volumes: evaluate a seeded subset of this many validation volumes.
        device: ``'auto'``, ``'cpu'``, ``'cuda'`` or ``'cuda:N'``. Evaluation is fp32 with TF32 off on
            every device (:meth:`mriadv.runtime.Runtime.evaluating`), so a GPU and a CPU give the same
            figures up to fp32 rounding, whatever precision the model trained in.
        split: which validation slices (see :data:`SPLIT_CHOICES`): ``'report'`` the held-out split
            the study reports on (reproduces the last record's ``report``); ``'selection'`` the
            selection split (reproduces an epoch's ``val_*``); ``'robust'`` its per-epoch attack
            subset (reproduces an epoch's ``robustness``); ``'all'`` every validation volume.
        protocol: a name from :data:`mriadv.protocols.PROTOCOLS`: evaluate with its attacks, PGD
            settings and budget grid instead of the training's (``attacks`` is then ignored).
        rel_budgets: relative budgets ``||delta|| / ||ref||`` (the sampled k-space for k-space
            attacks, the input image for image attacks); a grid given here or in ``budgets`` /
            ``budgets_ref`` replaces the protocol's whole grid.
        pgd_restarts, pgd_random_start (``'none'``, ``'uniform'``, ``'gaussian'``), pgd_keep_best,
        pgd_objective (``'target'``, ``'deviation'``): PGD options of
            :class:`mriadv.attacks.PGDAttack`, overriding the protocol's.
        features: a :class:`mriadv.instabilities.FeatureSpec`: also measure small-feature recovery
            (type 2) on the split, with ``feature_search`` (a ``FeatureSearch``; default its defaults).
        sampling: accelerations: also run the sampling sweep (type 3) on the split with nested masks
            at ``sampling_center_fraction`` (default: the training's centre fraction).
    """
    if split not in SPLIT_CHOICES:
        raise ConfigError(f"split {split!r}: must be one of {SPLIT_CHOICES}")
    path, payload = read_checkpoint(checkpoint)
    budgets = budgets_at_crop(payload["config"], budgets, budgets_ref)
    given = {
        "data": data and str(data),
        "max_val_volumes": max_volumes,
        "attack_budgets": budgets,
        "attacks": attacks,
        "pgd_steps": pgd_steps,
        "pgd_step_scale": pgd_step_scale,
    }
    cfg = assessed_config(payload["config"], device, split, given)
    if protocol is not None and attacks is not None:
        raise ConfigError("give attacks or a protocol (which names its own attacks), not both")
    pgd = dict(
        restarts=pgd_restarts,
        random_start=pgd_random_start,
        keep_best=pgd_keep_best,
        objective=pgd_objective,
        steps=pgd_steps,
        step_scale=pgd_step_scale,
    )
    proto, proto_budgets = resolve_protocol(protocol, cfg, budgets is not None, rel_budgets, pgd)
    loaded = _load(cfg, proto, payload["networks"])
    attack_list = _attacks(loaded, proto, proto_budgets)
    dataset = _split_dataset(loaded.data, split)
    model = loaded.trainer.predictor  # what training evaluated: the smoothed predictor for adversary='smoothing'
    clean, versus, rows = _evaluate(loaded, model, dataset, attack_list)
    traces = _pgd_traces(attack_list)
    used = _protocol_ran(proto, proto_budgets, cfg.crop_size)
    features_out, sampling_out = instabilities(
        model,
        dataset,
        loaded.runtime,
        cfg.batch_size,
        loaded.data.num_workers,
        features,
        feature_search,
        sampling,
        sampling_center_fraction,
    )
    return Assessment(
        checkpoint=str(path),
        epoch=int(payload["epoch"]),
        config=cfg.to_dict(),
        clean=clean.as_dict(),
        rows=[{**r.as_dict(), "budget_ref": to_reference(r.budget, cfg.crop_size)} for r in rows],
        split=split,
        protocol=used,
        pgd_trace=traces,
        features=features_out,
        sampling=sampling_out,
        versus_input=versus.as_dict(),
    )


def _load(cfg: TrainConfig, proto: Protocol | None, networks: dict[str, Any]) -> _Loaded:
    """The runtime, the validation data (its batches carrying k-space when ``proto`` attacks it) and
    a trainer holding the checkpoint's ``networks``."""
    from mriadv.data.files import DataError
    from mriadv.data.loading import build_data
    from mriadv.runtime import Runtime
    from mriadv.trainer import Trainer

    data_cfg = cfg
    if proto is not None and proto.needs_kspace and "pgd_kspace" not in cfg.attacks:
        data_cfg = replace(cfg, attacks=(*cfg.attacks, "pgd_kspace"))  # only so that batches carry k-space
    runtime = Runtime.resolve(cfg.device, cfg.precision, cfg.threads, cfg.deterministic)
    try:
        data = build_data(data_cfg, runtime, training=False)  # a flat folder of validation volumes is fine here
    except DataError as exc:
        raise ConfigError(f"data folder {cfg.data}: {exc} (give --data)") from exc
    trainer = Trainer(cfg, runtime, kspace_shape=data.kspace_shape())
    trainer.load_networks(networks)
    return _Loaded(cfg, runtime, data, trainer)


def _attacks(loaded: _Loaded, proto: Protocol | None, proto_budgets: Sequence[float] | None) -> list[Any]:
    """The attacks to run: the training's own (``proto`` None), PGD recording its objective per step
    on the first batch; or ``proto``'s at ``proto_budgets`` (None: its own grid)."""
    from mriadv.attacks import PGDAttack

    cfg, trainer = loaded.cfg, loaded.trainer
    if proto is None:
        return [replace(a, trace_first=True) if isinstance(a, PGDAttack) else a for a in trainer.attacks()]
    generator = trainer.generator_perturb if trainer.generator is not None else None
    return proto.build(
        cfg.crop_size, cfg.clamp, cfg.kspace_sampled_only, generator, cfg.perturbation, budgets=proto_budgets
    )


def _split_dataset(data: Data, split: str) -> SliceDataset:
    """The validation slices of ``split`` (see :data:`SPLIT_CHOICES`)."""
    return {
        "report": data.report or data.val,
        "selection": data.val,
        "all": data.val,
        "robust": data.robust_val or data.val,
    }[split]


def _evaluate(
    loaded: _Loaded, model: nn.Module, dataset: SliceDataset, attack_list: list[Any]
) -> tuple[EvalResult, VersusInput, list[RobustRow]]:
    """``model`` on ``dataset`` clean, its verdict against the zero-filled input itself, and its
    robustness row under each attack of ``attack_list``."""
    import torch

    from mriadv.evaluate import evaluate, robustness

    cfg, runtime, loss_fn = loaded.cfg, loaded.runtime, loaded.trainer.loss_fn
    loader = loaded.data.loader(dataset, shuffle=False)
    clean = evaluate(model, loader, loss_fn, runtime, clamp=cfg.clamp)
    zf = evaluate(torch.nn.Identity(), loader, loss_fn, runtime, clamp=cfg.clamp)  # the input itself
    versus = compare(clean, zf)
    rows = robustness(model, loader, loss_fn, runtime, attack_list, clean, cfg.clamp)
    return clean, versus, rows


def _pgd_traces(attack_list: list[Any]) -> list[dict[str, Any]]:
    """Each PGD attack's mean objective per step on the first batch (``Assessment.pgd_trace``)."""
    from mriadv.attacks import PGDAttack

    return [
        {
            "attack": a.name,
            "budget": float(a.budget),
            "rel": float("nan") if a.rel is None else float(a.rel),
            "trace": a.trace,
        }
        for a in attack_list
        if isinstance(a, PGDAttack) and a.trace is not None
    ]


def _protocol_ran(proto: Protocol | None, proto_budgets: Sequence[float] | None, crop: int) -> dict[str, Any] | None:
    """``proto`` as a dict with the absolute grid that ran, at the crop (None: the training's attacks)."""
    if proto is None:
        return None
    ran = proto.budgets_at(crop) if proto_budgets is None else proto_budgets
    return {**proto.as_dict(), "budgets": [float(b) for b in ran]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mriadv.assess", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, nargs="?", help="best.pt / checkpoint.pt, or a folder holding one")
    p.add_argument("--data", type=Path, help="data root (default: the data the model trained on)")
    budgets = p.add_mutually_exclusive_group()
    budgets.add_argument(
        "--budgets-ref",
        type=float,
        nargs="+",
        metavar="B",
        help="attack budgets ||delta||^2 at 320x320 (the seed's units), scaled to the crop",
    )
    budgets.add_argument("--budgets", type=float, nargs="+", metavar="B", help="attack budgets at the model's crop")
    p.add_argument(
        "--rel-budgets",
        type=float,
        nargs="+",
        metavar="R",
        help="relative budgets ||delta|| / ||ref|| (ref: the sampled k-space for k-space attacks, "
        "the input image for image attacks)",
    )
    p.add_argument("--attacks", nargs="+", choices=ATTACKS, help="default: the training's")
    p.add_argument(
        "--protocol",
        metavar="NAME",
        help="a named attack protocol (its attacks, PGD settings and budgets; see --list-protocols)",
    )
    p.add_argument("--list-protocols", action="store_true", help="print the attack protocols and their sources")
    p.add_argument("--pgd-steps", type=int, help="default: the training's (or the protocol's)")
    p.add_argument(
        "--pgd-step-scale", type=float, help="step = scale * radius / steps (default: the training's or the protocol's)"
    )
    p.add_argument(
        "--pgd-restarts", type=int, metavar="N", help="runs per slice, the worst kept (needs a random start)"
    )
    p.add_argument(
        "--pgd-random-start",
        choices=RANDOM_START_CHOICES,
        help="none (delta = 0), uniform (in the ball) or gaussian (scaled into it); seeded per slice",
    )
    p.add_argument(
        "--pgd-keep-best",
        action="store_true",
        default=None,
        help="return the worst case found over all steps, not the last iterate",
    )
    p.add_argument(
        "--pgd-objective",
        choices=PGD_OBJECTIVES,
        help="target: ||f(x+d) - x||^2; deviation: ||f(x+d) - f(x)||^2 (Darestani et al. 2021)",
    )
    p.add_argument("--max-volumes", type=int, help="only this many validation volumes")
    p.add_argument(
        "--split",
        choices=SPLIT_CHOICES,
        default="report",
        help="report: the held-out split the study reports on (default); selection: the volumes "
        "early stopping chose by; robust: the per-epoch attack subset; all: every volume",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (evaluation is fp32 on every device)")
    p.add_argument("--out", type=Path, help="also write the assessment as JSON here")
    inst = p.add_argument_group(
        "instabilities (the seed's types 2 and 3, mriadv.instabilities; defaults: its FeatureSpec and FeatureSearch)"
    )
    inst.add_argument("--instabilities", action="store_true", help="--features and --sampling at their defaults")
    inst.add_argument("--features", action="store_true", help="small-feature recovery: error, contrast, misses")
    inst.add_argument(
        "--sampling",
        type=float,
        nargs="*",
        metavar="R",
        help="sampling sweep at these accelerations with nested masks (no value: SWEEP_ACCELERATIONS)",
    )
    inst.add_argument("--sampling-center-fraction", type=float, metavar="F", help="default: the training's")
    inst.add_argument("--feature-size", type=int, metavar="PX", help="feature area in pixels")
    inst.add_argument("--feature-shape", choices=("disc", "square"))
    inst.add_argument("--feature-contrast", type=float, help="what the feature adds, relative to the local tissue")
    inst.add_argument("--feature-restarts", type=int, metavar="N", help="positions per slice, the worst kept")
    inst.add_argument("--feature-threshold", type=float, help="a feature is lost when its relative error exceeds this")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_protocols:
        from mriadv.protocols import PROTOCOLS, describe

        for proto in PROTOCOLS.values():
            print("\n".join(describe(proto)))
        return 0
    if args.checkpoint is None:
        parser.error("the following arguments are required: checkpoint")
    try:
        result = assess(
            args.checkpoint,
            args.data,
            args.budgets,
            args.budgets_ref,
            args.attacks,
            args.pgd_steps,
            args.pgd_step_scale,
            args.max_volumes,
            args.device,
            args.split,
            protocol=args.protocol,
            rel_budgets=args.rel_budgets,
            pgd_restarts=args.pgd_restarts,
            pgd_random_start=args.pgd_random_start,
            pgd_keep_best=args.pgd_keep_best,
            pgd_objective=args.pgd_objective,
            **instability_options(args),
        )
    except (ConfigError, RuntimeError) as exc:  # RuntimeError: e.g. CUDA asked for but absent
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in format_assessment(result):
        print(line)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result.as_dict(), indent=2))
        print(f"written: {args.out}")
    return 0


__all__ = [
    "CHECKPOINT_NAMES",
    "SPLIT_CHOICES",
    "assess",
    "build_parser",
    "instability_options",
    "main",
    "resolve_checkpoint",
]


if __name__ == "__main__":
    sys.exit(main())
