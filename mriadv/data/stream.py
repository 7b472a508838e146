"""Training length in updates, not passes: the training batches of a run as one endless stream of
passes over the training set, cut into epochs of a fixed number of optimiser steps.

Pass ``p`` is one shuffled pass over every training slice (its order drawn with
``seed * EPOCH_SEED_STRIDE + p``, masks drawn anew with ``p`` as their epoch), and pass after pass
the batches form one stream. Epoch ``e`` of a run with ``steps`` steps per epoch takes the stream's
batches ``e * steps ... (e + 1) * steps - 1``: a training set smaller than an epoch is cycled (each
pass a new order and new masks), a larger one is sampled (the next epoch continues where the last one
stopped, so every slice is seen before any is seen twice). Which batch a step gets is a pure function
of ``(seed, epoch, step)``, so a resumed run sees what the uninterrupted run would have. With
``steps=None`` an epoch is exactly one pass, batch for batch the loader that
:meth:`mriadv.data.loading.Data.loader` makes (the seed's full pass per epoch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from mriadv.data.files import ShapeBucketSampler, SliceDataset

# The shuffled order of pass p is drawn with seed * EPOCH_SEED_STRIDE + p: a prime stride larger than
# any pass count, so no two (seed, pass) pairs of a study share an order (seed + p would: seed 0 in
# pass 1 would replay seed 1 in pass 0).
EPOCH_SEED_STRIDE = 100003


def pass_batches(
    num_slices: int, batch_size: int, seed: int, pass_index: int, shapes: Sequence[tuple[int, int]] | None = None
) -> list[list[int]]:
    """The batches (lists of slice indices) of pass ``pass_index``: a seeded permutation cut into
    batches of ``batch_size`` (the last may be smaller), or, when ``shapes`` (each slice's k-space
    shape) is given, batches that share one shape (:class:`ShapeBucketSampler`). Equal to the batches
    of a shuffling ``DataLoader`` with ``torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + p)``."""
    if shapes is not None:
        sampler = ShapeBucketSampler(shapes, batch_size, shuffle=True, seed=seed)
        sampler.set_epoch(pass_index)
        return list(sampler)
    gen = torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + pass_index)
    torch.empty((), dtype=torch.int64).random_(generator=gen)  # a DataLoader draws its workers' base seed first
    order = torch.randperm(num_slices, generator=gen).tolist()
    return [order[i : i + batch_size] for i in range(0, num_slices, batch_size)]


@dataclass(frozen=True)
class TrainingClock:
    """How many updates a run makes on a training set: ``steps_per_epoch`` steps of ``batch_size``
    per epoch over ``slices`` training slices (``pass_steps`` batches make one pass)."""

    slices: int
    volumes: int
    batch_size: int
    pass_steps: int
    steps_per_epoch: int
    max_epochs: int
    augment: str = "none"  # what the training slices get: 'none' or 'flip'

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.max_epochs

    @property
    def passes_per_epoch(self) -> float:
        return self.steps_per_epoch / self.pass_steps

    def describe(self) -> str:
        """One line: the folder's training slices, the steps per epoch and the total, as they are."""
        if self.steps_per_epoch == self.pass_steps:
            per = "one pass"
        elif self.passes_per_epoch > 1:
            per = f"{self.passes_per_epoch:.2g} passes, cycled"
        else:
            per = f"{self.passes_per_epoch:.2g} of a pass, sampled"
        flips = "; random flips of the training images (augment)" if self.augment == "flip" else ""
        return (
            f"training: {self.slices} slices in {self.volumes} volumes; {self.steps_per_epoch} steps of batch "
            f"{self.batch_size} per epoch ({per}), {self.max_epochs} epochs: {self.total_steps} updates{flips}"
        )


class StreamDataset(torch.utils.data.Dataset):
    """Item ``p * len(base) + i`` is slice ``i`` of ``base`` as pass ``p`` sees it (its masks drawn
    with ``p`` as the epoch). Picklable, so loader workers build the same samples."""

    def __init__(self, base: SliceDataset) -> None:
        self.base = base

    def __len__(self) -> int:  # one pass; the stream's items beyond it are valid too
        return len(self.base)

    def __getitem__(self, k: int):
        pass_index, i = divmod(int(k), len(self.base))
        return self.base.transform(self.base.read(i), pass_index)


class EpochBatches(torch.utils.data.Sampler[list[int]]):
    """The batch sampler of one epoch: ``steps`` batches of the stream from ``epoch * steps`` on, as
    :class:`StreamDataset` indices."""

    def __init__(
        self,
        num_slices: int,
        batch_size: int,
        seed: int,
        epoch: int,
        steps: int | None,
        shapes: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        if num_slices < 1:
            raise ValueError("the training set is empty")
        self.num_slices, self.batch_size, self.seed, self.shapes = num_slices, batch_size, seed, shapes
        self.pass_steps = len(pass_batches(num_slices, batch_size, seed, 0, shapes))
        self.steps = self.pass_steps if steps is None else steps
        self.start = epoch * self.steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        cached: tuple[int, list[list[int]]] | None = None
        for g in range(self.start, self.start + self.steps):
            pass_index, j = divmod(g, self.pass_steps)
            if cached is None or cached[0] != pass_index:
                cached = (
                    pass_index,
                    pass_batches(self.num_slices, self.batch_size, self.seed, pass_index, self.shapes),
                )
            yield [pass_index * self.num_slices + i for i in cached[1][j]]


__all__ = ["EPOCH_SEED_STRIDE", "EpochBatches", "StreamDataset", "TrainingClock", "pass_batches"]
