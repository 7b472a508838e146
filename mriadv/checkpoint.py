"""What a run's checkpoint files hold, and writing and reading them.

:func:`mriadv.fit.fit` writes two files of one shape, :class:`Checkpoint`: ``checkpoint.pt`` after
every epoch (the last epoch's networks and everything needed to resume) and ``best.pt`` at every new
best epoch (that epoch's networks; the resume-only fields empty). So a reader takes the networks of
either file from ``payload["networks"]``.

Which config may resume a checkpoint (:func:`check_resume_config`), and the reconstructor weights a
fine-tuning run starts from (:func:`init_weights`, ``TrainConfig.init_from``), are read here too.

Only the standard library is imported at module level (torch when a file is written or read), so
the study's layout and report share the file names without loading torch.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, TypedDict

from mriadv.atomic import atomic_write

if TYPE_CHECKING:
    from mriadv.config import TrainConfig

CHECKPOINT_FORMAT = 2  # 2: the U-Net's up path halves channels before concatenating (models/unet.py)
CHECKPOINT_NAME = "checkpoint.pt"  # every epoch: resumable
BEST_NAME = "best.pt"  # the networks of the best selection epoch
# fields that may differ between a checkpoint's config and the config resuming it
RESUMABLE_CHANGES = {
    "max_epochs",
    "patience",
    "device",
    "precision",
    "num_workers",
    "threads",
    "deterministic",
    "cache_dir",
    "data",
    "robust_every",
}


class Checkpoint(TypedDict):
    """The payload of ``checkpoint.pt`` and ``best.pt`` (plain tensors and containers, loadable with
    ``weights_only=True``)."""

    format: int  # CHECKPOINT_FORMAT
    config: dict[str, Any]  # TrainConfig.to_dict()
    epoch: int  # epochs completed when these networks were saved (best.pt: the best epoch)
    status: str  # the record's status after that epoch: 'running' | 'completed' | 'early_stopped' | 'nan'
    networks: dict[str, Any]  # {'recon': state dict, 'generator': state dict or None} (Trainer.networks)
    early_stopping: dict[str, Any] | None  # fit.EarlyStopping fields after that epoch
    # what resuming needs: in checkpoint.pt only (None / empty in best.pt)
    trainer: dict[str, Any] | None  # optimisers, latent and noise RNG streams, step count (Trainer.state_dict)
    torch_rng: Any  # torch's global RNG state (a ByteTensor)
    best: dict[str, Any] | None  # the best epoch's networks, for the held-out evaluation at the end
    history: list[dict[str, Any]]  # one EpochRecord dict per epoch so far


def make_checkpoint(
    config: dict[str, Any],
    epoch: int,
    status: str,
    networks: dict[str, Any],
    early_stopping: dict[str, Any] | None,
    *,
    trainer: dict[str, Any] | None = None,
    torch_rng: Any = None,
    best: dict[str, Any] | None = None,
    history: Sequence[dict[str, Any]] = (),
) -> Checkpoint:
    """A :class:`Checkpoint`; without the keyword arguments, the shape of ``best.pt``."""
    return Checkpoint(
        format=CHECKPOINT_FORMAT,
        config=config,
        epoch=epoch,
        status=status,
        networks=networks,
        early_stopping=early_stopping,
        trainer=trainer,
        torch_rng=torch_rng,
        best=best,
        history=list(history),
    )


def save_checkpoint(path: Path, payload: Checkpoint) -> None:
    """Write atomically (temporary file, then rename): a kill never leaves half a checkpoint."""
    import torch

    with atomic_write(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> Checkpoint:
    """A checkpoint written by :func:`mriadv.fit.fit` (a file, or a folder's ``checkpoint.pt``),
    always in the shape of :class:`Checkpoint`. Raises ``ValueError`` for another format."""
    import torch

    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path}: not an mriadv checkpoint of format {CHECKPOINT_FORMAT} (format "
            f"{payload.get('format')!r}; format 1 checkpoints hold the older U-Net layout: retrain)"
        )
    payload = payload if "networks" in payload else _one_shape(payload)
    for key, fill in FIELDS_ADDED.items():  # configs saved before a field existed: what it was then
        if key not in payload["config"]:
            payload["config"][key] = fill(payload["config"])
    return payload


def check_resume_config(saved: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse (:class:`~mriadv.config_checks.ConfigError`) to resume with a config that differs from the
    checkpoint's in anything but :data:`RESUMABLE_CHANGES`; a field the checkpoint predates counts as
    its default. ``init_from`` must match too, though a resumed run does not read it (its weights are
    the checkpoint's): a run's config names what it started from."""
    from mriadv.config_checks import ConfigError

    now = cfg.to_dict()
    saved = {**_defaults(), **saved}
    diffs = sorted(k for k in now if k not in RESUMABLE_CHANGES and _norm(saved.get(k)) != _norm(now[k]))
    if diffs:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diffs)
        raise ConfigError(f"cannot resume: the checkpoint was trained with a different config ({details})")


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def _defaults() -> dict[str, Any]:
    """Every TrainConfig field's default (what a checkpoint saved before the field existed was run with)."""
    from mriadv.config import TrainConfig

    return {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}


def init_weights(init_from: str | Path, config: dict[str, Any]) -> tuple[Path, dict[str, Any], int]:
    """For fine-tuning (``TrainConfig.init_from``): the reconstructor's weights in ``init_from`` (a
    ``best.pt`` or ``checkpoint.pt``, or a run or trial folder: its ``best.pt``, else its
    ``checkpoint.pt``), the file they came from and the epoch they were saved after.

    Raises :class:`~mriadv.config_checks.ConfigError`, one line naming the key and the file, when the
    file is missing or not a checkpoint, or when the reconstructor it holds differs from the one
    ``config`` (a ``TrainConfig.to_dict()``) builds (:func:`~mriadv.config_checks.model_differences`;
    a field the checkpoint predates counts as its default)."""
    from mriadv.config_checks import ConfigError, model_differences

    path = Path(init_from)
    if path.is_dir():
        path = path / BEST_NAME if (path / BEST_NAME).is_file() else path / CHECKPOINT_NAME
    if not path.is_file():
        raise ConfigError(f"config key 'init_from': {path} does not exist")
    try:
        payload = load_checkpoint(path)
    except Exception as exc:  # torch.load's errors vary with what the file holds
        raise ConfigError(f"config key 'init_from': {path} is not an mriadv checkpoint ({exc})") from None
    diffs = model_differences({**_defaults(), **payload["config"]}, config)
    if diffs:
        raise ConfigError(f"config key 'init_from': {path} holds another reconstructor ({', '.join(diffs)})")
    return path, payload["networks"]["recon"], int(payload["epoch"])


# config fields added while checkpoints stayed format 2, and the value an older checkpoint's model
# was built with (the conditional generator's U-Net was gen_chans wide before cond_chans existed)
FIELDS_ADDED = {"cond_chans": lambda config: config.get("gen_chans")}


def _one_shape(old: dict[str, Any]) -> Checkpoint:
    """A format-2 file from before both files shared one shape: ``best.pt`` held the networks at its
    top level, ``checkpoint.pt`` inside ``trainer``. Same tensors, moved; what a file lacked is empty."""
    trainer = old.get("trainer")
    holder = trainer if trainer is not None else old
    networks = {"recon": holder["recon"], "generator": holder.get("generator")}
    if trainer is not None:
        trainer = {k: v for k, v in trainer.items() if k not in networks}
    return make_checkpoint(
        old["config"],
        old["epoch"],
        old.get("status", ""),
        networks,
        old.get("early_stopping"),
        trainer=trainer,
        torch_rng=old.get("torch_rng"),
        best=old.get("best"),
        history=old.get("history", ()),
    )


__all__ = [
    "BEST_NAME",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "RESUMABLE_CHANGES",
    "Checkpoint",
    "check_resume_config",
    "init_weights",
    "load_checkpoint",
    "make_checkpoint",
    "save_checkpoint",
]
