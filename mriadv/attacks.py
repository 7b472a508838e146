"""Attacks on a reconstructor: PGD, noise and the trial's own generator, each at an absolute or a
relative budget.

Every attack is an :class:`Attack`: called with the model and a batch, it returns an
:class:`AttackOutput` (the perturbed batch and the perturbation's squared norms), so that
one :func:`mriadv.evaluate.evaluate` serves clean validation and every attack alike. The perturbation
domains, budgets and seeded draws they share are :mod:`mriadv.perturbations`.

Attacks run the model in the caller's precision and set none of their own: fp32 in evaluation
(:meth:`mriadv.runtime.Runtime.evaluating`), the training autocast when PGD makes a training
perturbation (:meth:`mriadv.trainer.Trainer.attack_perturbation`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from mriadv.choices import PGD_OBJECTIVES
from mriadv.config import TrainConfig
from mriadv.data.transforms import Batch
from mriadv.models.utils import frozen
from mriadv.perturbations import (
    DOMAINS,
    RANDOM_STARTS,
    broadcast_per_sample,
    budget_per_slice,
    perturbation_shape,
    perturbed_batch,
    project_l2,
    random_start,
    reconstruct,
    relative_radius,
    relative_size,
    restrict,
    slice_generator,
    slice_noise,
    squared_norm,
)
from mriadv.runtime import Runtime

OBJECTIVES = PGD_OBJECTIVES  # ||f(x(delta)) - x||^2, or ||f(x(delta)) - f(x~)||^2 (Darestani et al.)

# Salts of the per-slice generators (mriadv.perturbations.slice_generator). Two different primes, so
# that a slice's noise and its PGD random starts (salt + restart, with restarts far below the gap) are
# independent draws; fixed, so that every trial, epoch and process draws the same, and recorded
# results stay reproducible (changing one changes every noise and random-start number).
NOISE_SALT = 7919  # the 1,000th prime
PGD_START_SALT = 104729  # the 10,000th prime


def check_pgd_options(steps: int, step_scale: float, random_start: str | None, restarts: int, objective: str) -> None:
    """Raise ``ValueError`` naming the first PGD option that cannot be used."""
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"PGD steps {steps!r}: must be an integer >= 1")
    if not (isinstance(step_scale, (int, float)) and math.isfinite(step_scale) and step_scale > 0):
        raise ValueError(f"PGD step scale {step_scale!r}: must be a finite number > 0")
    if random_start is not None and random_start not in RANDOM_STARTS:
        raise ValueError(f"PGD random start {random_start!r}: must be None or one of {RANDOM_STARTS}")
    if not (isinstance(restarts, int) and not isinstance(restarts, bool) and restarts >= 1):
        raise ValueError(f"PGD restarts {restarts!r}: must be an integer >= 1")
    if restarts > 1 and random_start is None:
        raise ValueError("PGD restarts > 1 need a random start (from delta = 0 every restart is the same)")
    if objective not in OBJECTIVES:
        raise ValueError(f"PGD objective {objective!r}: must be one of {OBJECTIVES}")
    if objective == "deviation" and random_start is None:
        raise ValueError("the deviation objective has zero gradient at delta = 0: give a random start")


@dataclass
class AttackOutput:
    """``batch``: the perturbed batch (:func:`perturbed_batch`: its network input, and its measurements
    for a k-space attack), what :func:`reconstruct` takes; ``delta_sq``: ``(B,)`` squared norms;
    ``delta``: the perturbation itself, in the attack's domain; ``relative``: ``(B,)`` its size
    ``||delta|| / ||ref||`` relative to the sampled k-space (k-space attacks) or the input image (image
    attacks), see :func:`relative_size` (None where an attack does not compute it)."""

    batch: Batch
    delta_sq: torch.Tensor
    delta: torch.Tensor
    relative: torch.Tensor | None = None

    @property
    def inputs(self) -> torch.Tensor:
        """The perturbed zero-filled network input ``(B, 1, h, w)``."""
        return self.batch.image


class Attack(Protocol):
    name: str
    budget: float

    def __call__(self, model: nn.Module, batch: Batch, runtime: Runtime) -> AttackOutput: ...


@dataclass
class PGDAttack:
    """L2 projected gradient ascent on the reconstruction error (Madry et al. 2018).

    Maximises ``||f(x(delta)) - x||^2`` over ``||delta|| <= r`` per image: ``steps``
    normalised-gradient steps of length ``step_scale * r / steps``, each followed by projection onto
    the ball. ``domain='kspace'`` attacks the measurements instead (restricted to acquired columns
    when ``sampled_only``).

    The radius ``r``: ``sqrt(budget)`` (absolute, image), ``sqrt(budget / (h w)) * ||y||`` per slice
    (absolute, k-space: the same relative energy at every crop, :func:`budget_per_slice`), or with
    ``rel`` given (then ``budget`` is NaN) ``rel * ||y||`` (k-space) / ``rel * ||x~||`` (image) per slice
    (:func:`relative_radius`).

    Options, all off by default so that the default is the seed's deterministic attack (zero start,
    last iterate, error to the target) and every trial of a study faces the same procedure:

    * ``random_start``: ``'uniform'`` (in the ball) or ``'gaussian'`` (scaled into it), see
      :func:`random_start`; seeded per slice by ``(file, slice, salt + restart)``.
    * ``restarts``: independent runs (each from its own random start); each slice keeps the run
      with the largest objective. Run 1 equals the attack with ``restarts=1``.
    * ``keep_best``: return each slice's iterate with the largest objective over all steps (the
      worst case found), not the last one.
    * ``objective='deviation'``: maximise ``||f(x(delta)) - f(x~)||^2``, the change of the
      reconstruction (Darestani, Chaudhari & Heckel, ICML 2021), instead of the error to the target.
      Its gradient vanishes at ``delta = 0``, so it needs a random start.

    ``trace_first``: record ``trace`` on the first call: the mean objective over that batch at every
    iterate (``steps + 1`` values: the start, then after each step), one list per restart; it shows
    whether more steps would find more. Later calls leave it alone. Off by default: it costs one more
    forward pass of that batch, which an attack made anew every training step would pay every step.
    """

    budget: float
    steps: int = TrainConfig.pgd_steps
    step_scale: float = TrainConfig.pgd_step_scale
    domain: str = "image"
    sampled_only: bool = True
    clamp: float | None = TrainConfig.clamp
    rel: float | None = None
    random_start: str | None = None
    restarts: int = 1
    keep_best: bool = False
    objective: str = "target"
    salt: int = PGD_START_SALT
    trace_first: bool = False
    trace: list[list[float]] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_pgd_options(self.steps, self.step_scale, self.random_start, self.restarts, self.objective)
        if self.domain not in DOMAINS:
            raise ValueError(f"unknown perturbation domain {self.domain!r}; expected one of {DOMAINS}")
        if self.rel is not None and math.isfinite(self.budget):
            raise ValueError("give PGD an absolute budget or a relative one (rel, with budget NaN), not both")

    @property
    def name(self) -> str:
        return "pgd" if self.domain == "image" else "pgd_kspace"

    def objective_of(
        self, model: nn.Module, batch: Batch, runtime: Runtime, delta: torch.Tensor, reference: torch.Tensor
    ) -> torch.Tensor:
        """The per-slice objective ``(B,)``: ``||f(x(delta)) - reference||^2`` (float32)."""
        out = reconstruct(model, runtime, perturbed_batch(batch, delta, self.domain, self.clamp))
        return (out.float() - reference).pow(2).flatten(1).sum(1)

    def __call__(self, model: nn.Module, batch: Batch, runtime: Runtime) -> AttackOutput:
        shape = perturbation_shape(batch, self.domain)
        if self.rel is None:  # image: the number; k-space: (B,), the same relative energy at every crop
            budget: float | torch.Tensor = budget_per_slice(batch, self.budget, self.domain)
            radius: float | torch.Tensor = budget**0.5
        else:
            radius = relative_radius(batch, self.rel, self.domain)
            budget = radius.pow(2)
        if isinstance(radius, torch.Tensor):
            step: float | torch.Tensor = broadcast_per_sample(self.step_scale * radius / self.steps, len(shape))
        else:
            step = self.step_scale * radius / self.steps
        dtype = torch.complex64 if self.domain == "kspace" else torch.float32
        tracing = self.trace_first and self.trace is None
        # the objective's value is needed only to choose among iterates or restarts, or for the trace
        evaluate_end = tracing or self.keep_best or self.restarts > 1
        traces: list[list[torch.Tensor]] = []
        best: torch.Tensor | None = None
        best_obj: torch.Tensor | None = None
        with frozen(model):  # gradients w.r.t. the input only
            if self.objective == "deviation":
                with torch.no_grad():
                    reference = reconstruct(model, runtime, batch).float()
            else:
                reference = batch.target
            for restart in range(self.restarts):
                if self.random_start is None:
                    delta = torch.zeros(shape, dtype=dtype, device=batch.image.device)
                else:
                    delta = random_start(
                        batch, self.domain, radius, self.random_start, self.salt + restart, self.sampled_only
                    )
                run_best: torch.Tensor | None = None
                run_obj: torch.Tensor | None = None
                values: list[torch.Tensor] = []
                with torch.enable_grad():
                    for _ in range(self.steps):
                        delta.requires_grad_(True)
                        obj = self.objective_of(model, batch, runtime, delta, reference)
                        (grad,) = torch.autograd.grad(obj.sum(), delta)
                        with torch.no_grad():
                            if tracing:
                                values.append(obj.detach().mean())
                            if self.keep_best:
                                run_best, run_obj = _keep_larger(run_best, run_obj, delta.detach(), obj.detach())
                            grad = restrict(grad, batch, self.domain, self.sampled_only)
                            gnorm = broadcast_per_sample(squared_norm(grad).sqrt().clamp_min(1e-12), grad.ndim)
                            delta = project_l2(delta.detach() + step * grad / gnorm, budget)
                delta = delta.detach()
                obj = None
                if evaluate_end:
                    with torch.no_grad():
                        obj = self.objective_of(model, batch, runtime, delta, reference)
                    if tracing:
                        values.append(obj.mean())
                    if self.keep_best:
                        delta, obj = _keep_larger(run_best, run_obj, delta, obj)
                traces.append(values)
                best, best_obj = (delta, obj) if self.restarts == 1 else _keep_larger(best, best_obj, delta, obj)
        if tracing:
            self.trace = [[float(v) for v in torch.stack(vals).tolist()] for vals in traces]
        delta = best  # type: ignore[assignment]
        return AttackOutput(
            perturbed_batch(batch, delta, self.domain, self.clamp),
            squared_norm(delta),
            delta,
            relative_size(delta, batch, self.domain),
        )


def _keep_larger(
    best: torch.Tensor | None, best_obj: torch.Tensor | None, cand: torch.Tensor, cand_obj: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slice, the candidate perturbation where its objective ``(B,)`` is strictly larger."""
    if best is None or best_obj is None:
        return cand, cand_obj  # type: ignore[return-value]
    larger = cand_obj > best_obj  # type: ignore[operator]
    return torch.where(broadcast_per_sample(larger, cand.ndim), cand, best), torch.where(larger, cand_obj, best_obj)


@dataclass
class NoiseAttack:
    """Gaussian noise rescaled to exactly ``||delta||^2 = budget`` per image (a random direction; in
    k-space ``(budget / (h w)) ||y||^2`` per slice, :func:`budget_per_slice`);
    seeded per slice (:func:`slice_noise`), so every trial, epoch and batch composition gives a slice
    the same noise.

    ``rel``: exactly ``||delta|| = rel * ||ref||`` instead (then ``budget`` is NaN), see
    :func:`relative_radius`. ``domain='kspace'``: complex Gaussian noise on the acquired columns of
    the measurements (``sampled_only``), the statistical reference of a k-space attack at the same
    size; name it ``'noise_kspace'``."""

    budget: float
    name: str = "noise"
    rel: float | None = None
    domain: str = "image"
    sampled_only: bool = True
    clamp: float | None = TrainConfig.clamp

    def __call__(self, model: nn.Module, batch: Batch, runtime: Runtime) -> AttackOutput:
        device = batch.image.device
        if self.domain == "image":
            noise = slice_noise(batch, salt=NOISE_SALT)
        else:
            shape = perturbation_shape(batch, self.domain)[1:]
            noise = torch.stack(
                [
                    torch.randn(shape, generator=slice_generator(f, int(s), NOISE_SALT), dtype=torch.complex64)
                    for f, s in zip(batch.fnames, batch.slice_nums)
                ]
            )
            noise = restrict(noise.to(device), batch, self.domain, self.sampled_only)
        if self.rel is None:
            target = budget_per_slice(batch, self.budget, self.domain)
        else:
            target = relative_radius(batch, self.rel, self.domain).pow(2)
        if isinstance(target, torch.Tensor):
            target = target.to(noise.device)
        delta = (noise * broadcast_per_sample((target / squared_norm(noise)).sqrt(), noise.ndim)).to(device)
        return AttackOutput(
            perturbed_batch(batch, delta, self.domain, self.clamp),
            squared_norm(delta),
            delta,
            relative_size(delta, batch, self.domain),
        )


@dataclass
class GeneratorAttack:
    """The trial's own generator G_phi (in eval mode), its output rescaled to exactly the budget (in
    k-space: ``(budget / (h w)) ||y||^2`` per slice, :func:`budget_per_slice`), so the direction it
    learned is compared with PGD and noise at equal norm.

    ``perturb`` maps a batch to the raw generator perturbation in ``domain`` (built by the trainer,
    which knows how its generator is conditioned)."""

    budget: float
    perturb: Callable[[Batch], torch.Tensor]
    domain: str = "image"
    clamp: float | None = TrainConfig.clamp
    name: str = "generator"
    rel: float | None = None  # exactly rel * ||ref|| per slice instead (budget NaN), see relative_radius

    def __call__(self, model: nn.Module, batch: Batch, runtime: Runtime) -> AttackOutput:
        with torch.no_grad():
            delta = self.perturb(batch).float() if self.domain == "image" else self.perturb(batch)
            if self.rel is None:
                budget = budget_per_slice(batch, self.budget, self.domain)
            else:
                budget = relative_radius(batch, self.rel, self.domain).pow(2)
            delta = delta * broadcast_per_sample((budget / squared_norm(delta).clamp_min(1e-30)).sqrt(), delta.ndim)
        return AttackOutput(
            perturbed_batch(batch, delta, self.domain, self.clamp),
            squared_norm(delta),
            delta,
            relative_size(delta, batch, self.domain),
        )


__all__ = [
    "NOISE_SALT",
    "OBJECTIVES",
    "PGD_START_SALT",
    "Attack",
    "AttackOutput",
    "GeneratorAttack",
    "NoiseAttack",
    "PGDAttack",
    "check_pgd_options",
]
