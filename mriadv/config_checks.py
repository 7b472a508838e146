"""What a configuration value may be, beside :class:`mriadv.config.TrainConfig`'s own range checks:
the error every refusal raises, how tuple fields are read from strings, the numeric fields' checks, which
attacks ``arch='unrolled'`` refuses, and which fields define the reconstructor (what fine-tuning must
match, ``init_from``).

No torch: the study's space loader and the command line use these before any network exists.
"""

from __future__ import annotations

import math
from typing import Any, Sequence


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message names the key."""


# arch='unrolled' reconstructs from the measurements: an attack on the zero-filled image has no input to
# perturb, and what to use instead
UNROLLED = "arch=unrolled reconstructs from the measurements"
KSPACE_INSTEAD = {
    "pgd": "use 'pgd_kspace'",
    "noise": "drop it (Gaussian noise on the measurements: protocol 'l2-kspace-restarts', noise_kspace)",
    "generator": "train with perturbation='kspace', or drop it",
}

# The fields that shape each architecture's reconstructor (mriadv.trainer.build_reconstructor): weights
# trained under one value do not load, or do not mean the same, under another. The crop is not one of
# them: the U-Net is fully convolutional and the unrolled network's crop only cuts its output.
MODEL_KEYS: dict[str, tuple[str, ...]] = {
    "unet": ("unet_chans", "unet_pools", "unet_activation", "unet_pooling", "unet_norm", "residual"),
    "unrolled": (
        "unroll_cascades",
        "unroll_chans",
        "unroll_pools",
        "unroll_share",
        "unet_activation",
        "unet_pooling",
        "unet_norm",
    ),
}


def model_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``'key: saved -> now'`` for each reconstructor field (``arch``, then :data:`MODEL_KEYS` of
    ``now``'s arch) where two config dicts differ; empty when weights of one fit the other."""
    if saved.get("arch") != now.get("arch"):
        return [f"arch: {saved.get('arch')!r} -> {now.get('arch')!r}"]
    keys = MODEL_KEYS.get(now.get("arch", ""), ())
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def refuse_image_attacks(attacks: Sequence[str], perturbation: str, where: str) -> None:
    """For ``arch='unrolled'``: :class:`ConfigError` (``where``: the key or protocol) at the first of
    ``attacks`` that perturbs the image (``'pgd'``, ``'noise'``; ``'generator'`` when ``perturbation`` is)."""
    for a in attacks:
        if a in ("pgd", "noise") or (a == "generator" and perturbation == "image"):
            raise ConfigError(f"{where}: {UNROLLED}: attack {a!r} perturbs the image; {KSPACE_INSTEAD[a]}")


def as_tuple(key: str, value: Any, numbers: bool) -> tuple[Any, ...]:
    """A tuple field's value from a list or tuple, a single value, or a comma-separated string
    (``'pgd,noise'``, ``'1000,5000'``, as ``--set`` and YAML give them); ``numbers``: string items are
    parsed as floats. Raises :class:`ConfigError` naming the key and the item that is not a number."""
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, str):
        items = [item.strip() for item in value.split(",")] if value.strip() else []
    else:
        items = [value]
    if numbers:
        for i, item in enumerate(items):
            if isinstance(item, str):
                try:
                    items[i] = float(item)
                except ValueError:
                    raise ConfigError(f"config key {key!r}: {item!r} is not a number") from None
    return tuple(items)


def need(cfg: Any, ok: bool, key: str, why: str) -> None:
    """Unless ``ok``: :class:`ConfigError` naming ``key``, its value in ``cfg`` and ``why``."""
    if not ok:
        raise ConfigError(f"config key '{key}' = {getattr(cfg, key)!r}: {why}")


def check_numbers(cfg: Any) -> None:
    """:meth:`TrainConfig.validate <mriadv.config.TrainConfig.validate>`'s plain numbers and counts, in order:
    finite, at least 0 or 1, or None where optional; :class:`ConfigError` at the first that is not."""
    for key in ("epsilon", "lambda1", "lambda2", "weight_decay", "unroll_smooth_sigma"):
        value = getattr(cfg, key)
        need(
            cfg,
            isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
            key,
            "must be a finite number >= 0",
        )
    for key in ("lr_recon", "lr_gen", "latent_scale"):
        value = getattr(cfg, key)
        need(
            cfg,
            isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
            key,
            "must be a finite number > 0",
        )
    for key in (
        "batch_size",
        "max_epochs",
        "patience",
        "latent_dim",
        "unet_chans",
        "gen_chans",
        "cond_chans",
        "crop_size",
        "pgd_steps",
        "robust_every",
        "adv_steps",
        "smooth_samples",
        "unroll_cascades",
        "unroll_chans",
    ):
        value = getattr(cfg, key)
        need(cfg, isinstance(value, int) and not isinstance(value, bool) and value >= 1, key, "must be an integer >= 1")
    for key in ("unet_pools", "unroll_pools", "unroll_smooth_samples"):
        value = getattr(cfg, key)
        need(cfg, isinstance(value, int) and not isinstance(value, bool) and value >= 0, key, "must be an integer >= 0")
    need(
        cfg,
        isinstance(cfg.train_eval_volumes, int) and cfg.train_eval_volumes >= 0,
        "train_eval_volumes",
        "must be an integer >= 0",
    )
    for key in ("steps_per_epoch", "max_train_batches", "max_train_volumes", "max_val_volumes", "threads"):
        value = getattr(cfg, key)
        need(cfg, value is None or (isinstance(value, int) and value >= 1), key, "must be None or an integer >= 1")
    need(
        cfg,
        cfg.num_workers is None or (isinstance(cfg.num_workers, int) and cfg.num_workers >= 0),
        "num_workers",
        "must be None or an integer >= 0",
    )


__all__ = [
    "KSPACE_INSTEAD",
    "MODEL_KEYS",
    "UNROLLED",
    "ConfigError",
    "as_tuple",
    "check_numbers",
    "model_differences",
    "need",
    "refuse_image_attacks",
]
