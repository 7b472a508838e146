"""What :func:`mriadv.assess.assess` is asked for, settled before any data is read: the checkpoint
(:func:`resolve_checkpoint`, :func:`read_checkpoint`), the attack budgets at the model's crop
(:func:`budgets_at_crop`), the config the networks are evaluated under (the saved one with the
caller's overrides, :func:`assessed_config`) and, from the command line of ``python -m
mriadv.assess``, the instability measurements asked for (:func:`instability_options`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from mriadv.checkpoint import BEST_NAME, CHECKPOINT_NAME, load_checkpoint
from mriadv.config import ConfigError, TrainConfig
from mriadv.units import scale_epsilon

CHECKPOINT_NAMES = (BEST_NAME, CHECKPOINT_NAME)  # in a folder: best.pt preferred
SPLIT_CHOICES = ("report", "selection", "robust", "all")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the ``best.pt`` (else ``checkpoint.pt``) of a folder."""
    path = Path(path)
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        raise ConfigError(f"{path}: holds no {' or '.join(CHECKPOINT_NAMES)}")
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint")
    return path


def read_checkpoint(checkpoint: str | Path) -> tuple[Path, dict[str, Any]]:
    """The file :func:`resolve_checkpoint` finds and what it holds (:func:`mriadv.checkpoint.load_checkpoint`);
    a file that is not a readable checkpoint is a :class:`ConfigError` naming it."""
    path = resolve_checkpoint(checkpoint)
    try:
        return path, load_checkpoint(path)
    except Exception as exc:  # noqa: BLE001 - not a checkpoint, a truncated file, a foreign pickle
        first = (str(exc).strip().splitlines() or [""])[0]  # an empty file raises an EOFError without a message
        raise ConfigError(
            f"{path}: not a readable mriadv checkpoint ({type(exc).__name__}: {first or 'empty'})"
        ) from exc


def budgets_at_crop(
    saved: dict[str, Any], budgets: Sequence[float] | None, budgets_ref: Sequence[float] | None
) -> Sequence[float] | None:
    """The squared-L2 budgets at the crop of the saved config ``saved``: ``budgets`` as given, or
    ``budgets_ref`` (at 320x320) scaled to it at equal per-pixel RMS; None when neither is given."""
    if budgets is not None and budgets_ref is not None:
        raise ConfigError("give attack budgets at the crop or at 320x320 (budgets_ref), not both")
    if budgets_ref is not None:
        return [scale_epsilon(b, int(saved["crop_size"])) for b in budgets_ref]
    return budgets


def assessed_config(saved: dict[str, Any], device: str, split: str, given: dict[str, Any]) -> TrainConfig:
    """The saved config ``saved`` as :func:`mriadv.assess.assess` evaluates it: on ``device`` in fp32
    (whatever the training's precision), with no evaluation of training volumes, every volume in the
    selection part for ``split='all'``, and each option of ``given`` (config field: value) that is not
    None in place of the saved one. Raises :class:`ConfigError` naming a bad value."""
    overrides = {
        "device": device,
        "precision": "fp32",  # assess only evaluates, and evaluation is fp32 whatever the training's
        "threads": None,
        "train_eval_volumes": 0,
        **({"report_fraction": 0.0} if split == "all" else {}),
        **{k: v for k, v in given.items() if v is not None},
    }
    return TrainConfig.from_dict({**saved, **overrides})  # lists become tuples there


def instability_options(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`mriadv.assess.assess`'s ``features``, ``feature_search``, ``sampling`` and
    ``sampling_center_fraction`` from the command line; the defaults are the dataclasses' own. Raises
    :class:`ConfigError`."""
    from mriadv.instabilities import SWEEP_ACCELERATIONS, FeatureSearch, FeatureSpec

    spec = {
        k: v
        for k, v in dict(size=args.feature_size, shape=args.feature_shape, contrast=args.feature_contrast).items()
        if v is not None
    }
    search = {
        k: v for k, v in dict(restarts=args.feature_restarts, threshold=args.feature_threshold).items() if v is not None
    }
    sampling = args.sampling
    if args.instabilities or sampling == []:
        sampling = sampling or SWEEP_ACCELERATIONS
    try:
        features = FeatureSpec(**spec) if args.features or args.instabilities or spec or search else None
        return {
            "features": features,
            "feature_search": FeatureSearch(**search) if features else None,
            "sampling": sampling,
            "sampling_center_fraction": args.sampling_center_fraction,
        }
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
