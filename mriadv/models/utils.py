"""Helpers that act on any network's parameters."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of ``module`` get no gradients inside the block (input-only backward); each
    parameter's ``requires_grad`` is restored afterwards, also when the block raises."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


@contextlib.contextmanager
def running_stats_kept(module: nn.Module) -> Iterator[None]:
    """Batch-norm layers of ``module`` leave their running statistics and ``num_batches_tracked``
    alone inside the block; in training mode they still normalise with the batch's own statistics,
    so the output is the training-mode output. Restored afterwards, also when the block raises."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False  # training mode then passes no running buffers to F.batch_norm
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


__all__ = ["frozen", "running_stats_kept"]
