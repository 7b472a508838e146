"""Perturbations of the reconstructor's input: applying them, bounding them, and attacks.

A perturbation lives in one of two domains:

* ``'image'``: real ``(B, 1, h, w)``, added to the normalised zero-filled image x~ (Algorithm 1);
* ``'kspace'``: complex ``(B, H, W)``, added to the normalised masked k-space before the inverse
  FFT (Algorithm 2); optionally restricted to the acquired columns.

Its size is the squared L2 norm per image, in normalised units; in k-space this equals the energy of
the full-FOV image perturbation (the transforms are orthonormal).

Every attack is an :class:`Attack`: called with the model and a batch, it returns an
:class:`AttackOutput` (the perturbed network input and the perturbation's squared norms), so that
one :func:`mriadv.evaluate.evaluate` serves clean validation and every attack alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from mriadv.data.masks import volume_seed
from mriadv.data.transforms import Batch, image_from_normalized_kspace
from mriadv.runtime import Runtime

DOMAINS = ("image", "kspace")


def squared_norm(delta: torch.Tensor) -> torch.Tensor:
    """Per-sample squared L2 norm ``(B,)`` of a real or complex perturbation ``(B, ...)``."""
    return delta.abs().pow(2).flatten(1).sum(1) if delta.is_complex() else delta.pow(2).flatten(1).sum(1)


def project_l2(delta: torch.Tensor, budget: float, scope: str = "image") -> torch.Tensor:
    """Scale ``delta`` onto the ball ``||delta||^2 <= budget`` (differentiable).

    ``scope='image'``: each sample's norm is bounded by ``budget``; ``'batch'``: the norm of the whole
    batch by ``B * budget`` (the seed's code).
    """
    sq = squared_norm(delta)
    if scope == "batch":
        sq = sq.sum().expand_as(sq)
        budget = budget * delta.shape[0]
    scale = torch.clamp(torch.sqrt(budget / sq.clamp_min(1e-30)), max=1.0)
    return delta * scale.view(-1, *([1] * (delta.ndim - 1))).to(delta.dtype)


def hinge(delta: torch.Tensor, epsilon: float, scope: str = "image") -> torch.Tensor:
    """The seed's penalty ``max(0, ||delta||^2 - epsilon)``: mean over the batch (``scope='image'``),
    or ``max(0, ||batch||^2 - B epsilon)`` (``'batch'``, the seed's code). Returns a scalar."""
    sq = squared_norm(delta)
    if scope == "batch":
        return torch.relu(sq.sum() - epsilon * delta.shape[0])
    return torch.relu(sq - epsilon).mean()


def restrict(delta: torch.Tensor, batch: Batch, domain: str, sampled_only: bool) -> torch.Tensor:
    """Zero the k-space perturbation outside the acquired columns (when ``sampled_only``)."""
    if domain == "kspace" and sampled_only:
        return delta * batch.mask[:, None, :].to(delta.real.dtype)  # type: ignore[index]
    return delta


def apply_perturbation(batch: Batch, delta: torch.Tensor | None, domain: str, clamp: float | None) -> torch.Tensor:
    """The network input ``(B, 1, h, w)`` for a batch perturbed by ``delta`` in ``domain``.

    Image: ``x~ + delta`` (as the seed, not re-clamped). k-space: the zero-filled image of
    ``P(y)/std + delta``, normalised with the clean statistics and clamped like the clean input.
    """
    if delta is None:
        return batch.image
    if domain == "image":
        return batch.image + delta
    if domain == "kspace":
        if batch.kspace is None:
            raise ValueError("a k-space perturbation needs batches that carry k-space (keep_kspace=True)")
        return image_from_normalized_kspace(batch.kspace + delta, batch.mean, batch.std, batch.crop, clamp)
    raise ValueError(f"unknown perturbation domain {domain!r}; expected one of {DOMAINS}")


def perturbation_shape(batch: Batch, domain: str) -> tuple[int, ...]:
    return tuple(batch.image.shape) if domain == "image" else tuple(batch.kspace.shape)  # type: ignore[union-attr]


def slice_generator(fname: str, slice_num: int, salt: int) -> torch.Generator:
    """A CPU generator seeded by one slice's (file, slice) and ``salt``: the same in every trial,
    epoch and process."""
    return torch.Generator().manual_seed((volume_seed(f"{fname}:{int(slice_num)}") + salt) % (2**63))


def slice_noise(batch: Batch, salt: int) -> torch.Tensor:
    """Standard normal noise shaped like ``batch.image`` ``(B, 1, h, w)``, on the CPU; each slice's
    draw comes from its own :func:`slice_generator`, so a slice gets the same noise whatever its
    batch-mates, their order or the batch size."""
    shape = tuple(batch.image.shape[1:])
    return torch.stack([torch.randn(shape, generator=slice_generator(f, int(s), salt))
                        for f, s in zip(batch.fnames, batch.slice_nums)])


@dataclass
class AttackOutput:
    """``inputs``: perturbed network input ``(B, 1, h, w)``; ``delta_sq``: ``(B,)`` squared norms;
    ``delta``: the perturbation itself, in the attack's domain."""

    inputs: torch.Tensor
    delta_sq: torch.Tensor
    delta: torch.Tensor


class Attack(Protocol):
    name: str
    budget: float

    def __call__(self, model: nn.Module, batch: Batch, runtime: Runtime) -> AttackOutput: ...


@dataclass
class PGDAttack:
    """L2 projected gradient ascent on the reconstruction error (Madry et al. 2018).

    Maximises ``||f(x(delta)) - x||^2`` over ``||delta||^2 <= budget`` per image: ``steps``
    normalised-gradient steps of length ``step_scale * sqrt(budget) / steps`` from ``delta = 0``,
    each followed by projection onto the ball. Deterministic (no random start), so every trial of a
    study faces the same procedure. ``domain='kspace'`` attacks the measurements instead (restricted
    to acquired columns when ``sampled_only``).
    """

    budget: float
    steps: int = 10
    step_scale: float = 2.5
    domain: str = "image"
    sampled_only: bool = True
    clamp: float | None = 6.0

    @property
    def name(self) -> str:
        return "pgd" if self.domain == "image" else "pgd_kspace"

    def __call__(self, model: nn.Module, batch: Batch, runtime: Runtime) -> AttackOutput:
        radius = self.budget**0.5
        step = self.step_scale * radius / self.steps
        shape = perturbation_shape(batch, self.domain)
        dtype = torch.complex64 if self.domain == "kspace" else torch.float32
        delta = torch.zeros(shape, dtype=dtype, device=batch.image.device)
        requires = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():  # gradients w.r.t. the input only
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                for _ in range(self.steps):
                    delta.requires_grad_(True)
                    with runtime.autocast():
                        out = model(runtime.image(apply_perturbation(batch, delta, self.domain, self.clamp)))
                    err = (out.float() - batch.target).pow(2).sum()
                    (grad,) = torch.autograd.grad(err, delta)
                    with torch.no_grad():
                        grad = restrict(grad, batch, self.domain, self.sampled_only)
                        gnorm = squared_norm(grad).sqrt().clamp_min(1e-12).view(-1, *([1] * (grad.ndim - 1)))
                        delta = project_l2(delta.detach() + step * grad / gnorm, self.budget)
        finally:
            for p, r in zip(model.parameters(), requires):
                p.requires_grad_(r)
        delta = delta.detach()
        return AttackOutput(apply_perturbation(batch, delta, self.domain, self.clamp), squared_norm(delta), delta)


@dataclass
class NoiseAttack:
    """Gaussian noise rescaled to exactly ``||delta||^2 = budget`` per image (a random direction);
    seeded per slice (:func:`slice_noise`), so every trial, epoch and batch composition gives a slice
    the same noise."""

    budget: float
    name: str = "noise"

    def __call__(self, model: nn.Module, batch: Batch, runtime: Runtime) -> AttackOutput:
        noise = slice_noise(batch, salt=7919)
        delta = (noise * (self.budget / squared_norm(noise)).sqrt().view(-1, 1, 1, 1)).to(batch.image.device)
        return AttackOutput(batch.image + delta, squared_norm(delta), delta)


@dataclass
class GeneratorAttack:
    """The trial's own generator G_phi (in eval mode), its output rescaled to exactly the budget, so
    the direction it learned is compared with PGD and noise at equal norm.

    ``perturb`` maps a batch to the raw generator perturbation in ``domain`` (built by the trainer,
    which knows how its generator is conditioned)."""

    budget: float
    perturb: Callable[[Batch], torch.Tensor]
    domain: str = "image"
    clamp: float | None = 6.0
    name: str = "generator"

    def __call__(self, model: nn.Module, batch: Batch, runtime: Runtime) -> AttackOutput:
        with torch.no_grad():
            delta = self.perturb(batch).float() if self.domain == "image" else self.perturb(batch)
            delta = delta * (self.budget / squared_norm(delta).clamp_min(1e-30)).sqrt().view(-1, *([1] * (delta.ndim - 1)))
        return AttackOutput(apply_perturbation(batch, delta, self.domain, self.clamp), squared_norm(delta), delta)
