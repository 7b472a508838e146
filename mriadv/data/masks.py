"""Cartesian column (phase-encode) under-sampling masks.

A mask function draws, for ``num_cols`` phase-encode columns, a boolean vector ``(W,)`` that keeps
a fully sampled centre of ``round(W * center_fraction)`` columns plus further columns chosen so that
about ``W / acceleration`` columns are kept in all (fastMRI's ``subsample.py`` conventions).

Randomness is owned by the caller: :meth:`MaskFunc.__call__` takes a ``numpy.random.Generator`` or
an integer seed. Training draws a new mask per sample from the loader's generator; validation seeds
the mask from the file name (:func:`volume_seed`), so every trial sees the same validation inputs.
Subclasses override one method, :meth:`MaskFunc.outer_columns`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from mriadv.choices import MASK_TYPES


def volume_seed(name: str) -> int:
    """A seed derived from a file name, stable across processes and Python versions (CRC-32)."""
    return zlib.crc32(name.encode("utf-8"))


@dataclass(frozen=True)
class MaskFunc:
    """Base class: fully sampled centre plus ``outer_columns`` chosen by the subclass.

    Args:
        center_fraction: fraction of columns in the fully sampled centre, in (0, 1).
        acceleration: the under-sampling factor R > 1; about ``W / R`` columns are kept.
    """

    center_fraction: float = 0.08
    acceleration: float = 4.0

    def __post_init__(self) -> None:
        if not 0.0 < self.center_fraction < 1.0:
            raise ValueError(f"center_fraction must be in (0, 1), got {self.center_fraction}")
        if not self.acceleration > 1.0:
            raise ValueError(f"acceleration must be > 1, got {self.acceleration}")
        if self.center_fraction * self.acceleration >= 1.0:
            raise ValueError(
                f"center_fraction={self.center_fraction} with acceleration={self.acceleration} keeps the "
                "whole centre beyond W/acceleration columns; lower one of them"
            )

    def num_low_freqs(self, num_cols: int) -> int:
        return int(round(num_cols * self.center_fraction))

    def center_slice(self, num_cols: int) -> slice:
        """Columns of the fully sampled centre (fastMRI: ``pad = (W - n_low + 1) // 2``)."""
        n_low = self.num_low_freqs(num_cols)
        pad = (num_cols - n_low + 1) // 2
        return slice(pad, pad + n_low)

    def outer_columns(self, num_cols: int, rng: np.random.Generator) -> np.ndarray:
        """Boolean ``(W,)``: the columns kept outside the centre (centre entries are ignored)."""
        raise NotImplementedError

    def __call__(self, num_cols: int, rng: np.random.Generator | int) -> np.ndarray:
        """Draw a mask. Returns boolean ``(num_cols,)``; ``rng`` is a Generator or a seed."""
        if num_cols < 2:
            raise ValueError(f"num_cols must be >= 2, got {num_cols}")
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        mask = self.outer_columns(num_cols, rng).astype(bool, copy=True)
        mask[self.center_slice(num_cols)] = True
        return mask


class RandomMaskFunc(MaskFunc):
    """Outer columns drawn independently with ``p = (W/R - n_low) / (W - n_low)``.

    The expected number of kept columns is then exactly ``W / R`` (the seed paper, Sec. 4).
    """

    def outer_columns(self, num_cols: int, rng: np.random.Generator) -> np.ndarray:
        n_low = self.num_low_freqs(num_cols)
        prob = (num_cols / self.acceleration - n_low) / (num_cols - n_low)
        return rng.uniform(size=num_cols) < prob


class EquispacedMaskFunc(MaskFunc):
    """Outer columns on a regular grid with a random offset.

    The spacing is adjusted (fastMRI's ``EquispacedMaskFractionFunc``) so that centre plus grid keep
    about ``W / R`` columns: ``spacing = R (n_low - W) / (n_low R - W)``.
    """

    def outer_columns(self, num_cols: int, rng: np.random.Generator) -> np.ndarray:
        n_low = self.num_low_freqs(num_cols)
        spacing = self.acceleration * (n_low - num_cols) / (n_low * self.acceleration - num_cols)
        offset = rng.integers(0, max(1, int(round(spacing))))
        positions = np.round(np.arange(offset, num_cols - 1, spacing)).astype(int)
        mask = np.zeros(num_cols, dtype=bool)
        mask[positions[positions < num_cols]] = True
        return mask


class NestedMaskFunc(MaskFunc):
    """Outer columns taken as a prefix of one random ranking of all columns.

    Keeps exactly ``round(W / R)`` columns, centre included (``MaskFunc`` guarantees that this is at
    least the centre's width). The ranking is ``rng.permutation(W)`` whatever the acceleration, so for
    one generator state (validation: the volume's seed, :func:`volume_seed`) and one centre fraction,
    masks at any accelerations are nested: more samples are a superset of fewer. Used by the sampling
    sweep of :mod:`mriadv.instabilities.sampling`.
    """

    def outer_columns(self, num_cols: int, rng: np.random.Generator) -> np.ndarray:
        centre = self.center_slice(num_cols)
        order = rng.permutation(num_cols)
        outer = order[(order < centre.start) | (order >= centre.stop)]
        count = max(0, int(round(num_cols / self.acceleration)) - self.num_low_freqs(num_cols))
        mask = np.zeros(num_cols, dtype=bool)
        mask[outer[:count]] = True
        return mask


def make_mask_func(mask_type: str, center_fraction: float, acceleration: float) -> MaskFunc:
    """Build a mask function by name (``'random'`` or ``'equispaced'``)."""
    classes = {"random": RandomMaskFunc, "equispaced": EquispacedMaskFunc}
    if mask_type not in classes:
        raise ValueError(f"unknown mask type {mask_type!r}; expected one of {MASK_TYPES}")
    return classes[mask_type](center_fraction=center_fraction, acceleration=acceleration)
