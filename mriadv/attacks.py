"""Perturbations of the reconstructor's input: applying them, bounding them, and attacks.

A perturbation lives in one of two domains:

* ``'image'``: real ``(B, 1, h, w)``, added to the normalised zero-filled image x~ (Algorithm 1);
* ``'kspace'``: complex ``(B, H, W)``, added to the normalised masked k-space before the inverse
  FFT (Algorithm 2); optionally restricted to the acquired columns.

Its size is the squared L2 norm per image, in normalised units; in k-space this equals the energy of
the full-FOV image perturbation (the transforms are orthonormal). A budget is either absolute (``budget``
= the largest ``||delta||^2``) or relative (``rel``: ``||delta|| <= rel * ||ref||`` per slice, with ``ref``
the sampled k-space ``y`` or the input image ``x~``, see :func:`relative_radius`), so that numbers
transfer across crops and data sets (Genzel, Macdonald & Maerz, TPAMI 2022, use relative noise levels).

Every attack is an :class:`Attack`: called with the model and a batch, it returns an
:class:`AttackOutput` (the perturbed network input and the perturbation's squared norms), so that
one :func:`mriadv.evaluate.evaluate` serves clean validation and every attack alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from mriadv.data.masks import volume_seed
from mriadv.data.transforms import Batch, image_from_normalized_kspace
from mriadv.runtime import Runtime

DOMAINS = ("image", "kspace")
RANDOM_STARTS = ("uniform", "gaussian")
OBJECTIVES = ("target", "deviation")  # ||f(x(delta)) - x||^2, or ||f(x(delta)) - f(x~)||^2 (Darestani et al.)


def squared_norm(delta: torch.Tensor) -> torch.Tensor:
    """Per-sample squared L2 norm ``(B,)`` of a real or complex perturbation ``(B, ...)``."""
    return delta.abs().pow(2).flatten(1).sum(1) if delta.is_complex() else delta.pow(2).flatten(1).sum(1)


def project_l2(delta: torch.Tensor, budget: float | torch.Tensor, scope: str = "image") -> torch.Tensor:
    """Scale ``delta`` onto the ball ``||delta||^2 <= budget`` (differentiable).

    ``budget``: one number, or one per sample ``(B,)``. ``scope='image'``: each sample's norm is bounded
    by its budget; ``'batch'``: the norm of the whole batch by the sum of the budgets (``B * budget``,
    the seed's code).
    """
    sq = squared_norm(delta)
    if scope == "batch":
        sq = sq.sum().expand_as(sq)
        budget = budget.sum() if isinstance(budget, torch.Tensor) else budget * delta.shape[0]
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


def _per_sample(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` with ``ndim`` dimensions, to scale a ``(B, ...)`` perturbation."""
    return x.view(-1, *([1] * (ndim - 1)))


def reference_norm(batch: Batch, domain: str) -> torch.Tensor:
    """The per-slice L2 norm ``(B,)`` that relative budgets are measured against, in the normalised
    units the batch carries.

    ``'image'``: ``||x~||`` of the network input ``batch.image`` ``(B, 1, h, w)``. ``'kspace'``:
    ``||y||`` of the sampled k-space ``batch.kspace`` ``(B, H, W)`` (masked k-space / std; columns
    outside ``batch.mask`` count as zero).
    """
    if domain == "image":
        return squared_norm(batch.image).sqrt()
    if domain == "kspace":
        if batch.kspace is None:
            raise ValueError("a k-space reference norm needs batches that carry k-space (keep_kspace=True)")
        kspace = batch.kspace if batch.mask is None else restrict(batch.kspace, batch, "kspace", True)
        return squared_norm(kspace).sqrt()
    raise ValueError(f"unknown perturbation domain {domain!r}; expected one of {DOMAINS}")


def relative_radius(batch: Batch, rel: float, domain: str) -> torch.Tensor:
    """The absolute L2 radius ``(B,)`` of a relative budget: ``rel * ||y||`` (``'kspace'``) or
    ``rel * ||x~||`` (``'image'``) per slice (:func:`reference_norm`); its square is the slice's
    ``||delta||^2`` budget."""
    if not (isinstance(rel, (int, float)) and math.isfinite(rel) and rel >= 0):
        raise ValueError(f"relative budget {rel!r}: must be a finite number >= 0")
    return rel * reference_norm(batch, domain)


def relative_size(delta: torch.Tensor, batch: Batch, domain: str) -> torch.Tensor:
    """``||delta|| / ||ref||`` per slice ``(B,)``: the size of a perturbation in ``domain`` relative to
    the norm that :func:`relative_radius` scales by."""
    return squared_norm(delta).sqrt() / reference_norm(batch, domain)


def _free_entries(batch: Batch, domain: str, sampled_only: bool) -> torch.Tensor:
    """Entries ``(B,)`` a perturbation may change: ``h w`` pixels, or ``H`` times the acquired columns
    (every column unless ``sampled_only``) of complex k-space."""
    b = len(batch)
    if domain == "image":
        return torch.full((b,), float(batch.image[0].numel()), device=batch.image.device)
    H, W = batch.kspace.shape[-2:]  # type: ignore[union-attr]
    if sampled_only and batch.mask is not None:
        return H * batch.mask.flatten(1).to(torch.float32).sum(1)
    return torch.full((b,), float(H * W), device=batch.kspace.device)  # type: ignore[union-attr]


def random_start(batch: Batch, domain: str, radius: float | torch.Tensor, kind: str, salt: int,
                 sampled_only: bool = True) -> torch.Tensor:
    """A random perturbation inside each slice's L2 ball of ``radius`` (a number or ``(B,)``), shaped
    like the domain (real ``(B, 1, h, w)`` or complex ``(B, H, W)``, zero outside the acquired columns
    when ``sampled_only``), on the batch's device.

    ``kind='uniform'``: uniform in the ball (a Gaussian direction, norm ``radius * u^(1/n)`` with ``u``
    uniform in [0, 1] and ``n`` the real dimension; Madry et al.'s random start). ``'gaussian'``:
    i.i.d. Gaussian entries of variance ``radius^2 / entries`` (so ``E||delta||^2 = radius^2``),
    projected onto the ball. Each slice draws from its own :func:`slice_generator` ``(file, slice,
    salt)``: the same start whatever its batch.
    """
    if kind not in RANDOM_STARTS:
        raise ValueError(f"random start {kind!r}: must be one of {RANDOM_STARTS}")
    shape = perturbation_shape(batch, domain)[1:]
    dtype = torch.complex64 if domain == "kspace" else torch.float32
    draws, uniforms = [], []
    for f, s in zip(batch.fnames, batch.slice_nums):
        g = slice_generator(f, int(s), salt)
        draws.append(torch.randn(shape, generator=g, dtype=dtype))
        uniforms.append(torch.rand((), generator=g))
    device = batch.image.device
    z = restrict(torch.stack(draws).to(device), batch, domain, sampled_only)
    radius = torch.as_tensor(radius, dtype=torch.float32, device=device).expand(len(batch))
    entries = _free_entries(batch, domain, sampled_only)
    if kind == "uniform":
        dims = entries * (2 if z.is_complex() else 1)
        norm = radius * torch.stack(uniforms).to(device).pow(1.0 / dims)
        return z * _per_sample(norm / squared_norm(z).sqrt().clamp_min(1e-30), z.ndim)
    return project_l2(z * _per_sample(radius / entries.sqrt(), z.ndim), radius.pow(2))


def check_pgd_options(steps: int, step_scale: float, random_start: str | None, restarts: int,
                      objective: str) -> None:
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
    """``inputs``: perturbed network input ``(B, 1, h, w)``; ``delta_sq``: ``(B,)`` squared norms;
    ``delta``: the perturbation itself, in the attack's domain; ``relative``: ``(B,)`` its size
    ``||delta|| / ||ref||`` relative to the sampled k-space (k-space attacks) or the input image (image
    attacks), see :func:`relative_size` (None where an attack does not compute it)."""

    inputs: torch.Tensor
    delta_sq: torch.Tensor
    delta: torch.Tensor
    relative: torch.Tensor | None = None


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

    The radius ``r``: ``sqrt(budget)`` (absolute), or with ``rel`` given (then ``budget`` is NaN)
    ``rel * ||y||`` (k-space) / ``rel * ||x~||`` (image) per slice (:func:`relative_radius`).

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
    steps: int = 10
    step_scale: float = 2.5
    domain: str = "image"
    sampled_only: bool = True
    clamp: float | None = 6.0
    rel: float | None = None
    random_start: str | None = None
    restarts: int = 1
    keep_best: bool = False
    objective: str = "target"
    salt: int = 104729
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

    def objective_of(self, model: nn.Module, batch: Batch, runtime: Runtime, delta: torch.Tensor,
                     reference: torch.Tensor) -> torch.Tensor:
        """The per-slice objective ``(B,)``: ``||f(x(delta)) - reference||^2`` (float32)."""
        with runtime.autocast():
            out = model(runtime.image(apply_perturbation(batch, delta, self.domain, self.clamp)))
        return (out.float() - reference).pow(2).flatten(1).sum(1)

    def __call__(self, model: nn.Module, batch: Batch, runtime: Runtime) -> AttackOutput:
        if self.rel is None:
            budget: float | torch.Tensor = self.budget
            radius: float | torch.Tensor = self.budget**0.5
            step: float | torch.Tensor = self.step_scale * radius / self.steps
        else:
            radius = relative_radius(batch, self.rel, self.domain)
            budget = radius.pow(2)
            step = _per_sample(self.step_scale * radius / self.steps, len(perturbation_shape(batch, self.domain)))
        shape = perturbation_shape(batch, self.domain)
        dtype = torch.complex64 if self.domain == "kspace" else torch.float32
        tracing = self.trace_first and self.trace is None
        # the objective's value is needed only to choose among iterates or restarts, or for the trace
        evaluate_end = tracing or self.keep_best or self.restarts > 1
        requires = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():  # gradients w.r.t. the input only
            p.requires_grad_(False)
        traces: list[list[torch.Tensor]] = []
        best: torch.Tensor | None = None
        best_obj: torch.Tensor | None = None
        try:
            if self.objective == "deviation":
                with torch.no_grad(), runtime.autocast():
                    reference = model(runtime.image(batch.image)).float()
            else:
                reference = batch.target
            for restart in range(self.restarts):
                if self.random_start is None:
                    delta = torch.zeros(shape, dtype=dtype, device=batch.image.device)
                else:
                    delta = random_start(batch, self.domain, radius, self.random_start, self.salt + restart,
                                         self.sampled_only)
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
                            gnorm = squared_norm(grad).sqrt().clamp_min(1e-12).view(-1, *([1] * (grad.ndim - 1)))
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
        finally:
            for p, r in zip(model.parameters(), requires):
                p.requires_grad_(r)
        if tracing:
            self.trace = [[float(v) for v in torch.stack(vals).tolist()] for vals in traces]
        delta = best  # type: ignore[assignment]
        return AttackOutput(apply_perturbation(batch, delta, self.domain, self.clamp), squared_norm(delta), delta,
                            relative_size(delta, batch, self.domain))


def _keep_larger(best: torch.Tensor | None, best_obj: torch.Tensor | None, cand: torch.Tensor,
                 cand_obj: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slice, the candidate perturbation where its objective ``(B,)`` is strictly larger."""
    if best is None or best_obj is None:
        return cand, cand_obj  # type: ignore[return-value]
    larger = cand_obj > best_obj  # type: ignore[operator]
    return torch.where(_per_sample(larger, cand.ndim), cand, best), torch.where(larger, cand_obj, best_obj)


@dataclass
class NoiseAttack:
    """Gaussian noise rescaled to exactly ``||delta||^2 = budget`` per image (a random direction);
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
    clamp: float | None = 6.0

    def __call__(self, model: nn.Module, batch: Batch, runtime: Runtime) -> AttackOutput:
        device = batch.image.device
        if self.domain == "image":
            noise = slice_noise(batch, salt=7919)
        else:
            shape = perturbation_shape(batch, self.domain)[1:]
            noise = torch.stack([torch.randn(shape, generator=slice_generator(f, int(s), 7919), dtype=torch.complex64)
                                 for f, s in zip(batch.fnames, batch.slice_nums)])
            noise = restrict(noise.to(device), batch, self.domain, self.sampled_only)
        target = self.budget if self.rel is None else relative_radius(batch, self.rel, self.domain).pow(2)
        if isinstance(target, torch.Tensor):
            target = target.to(noise.device)
        delta = (noise * _per_sample((target / squared_norm(noise)).sqrt(), noise.ndim)).to(device)
        return AttackOutput(apply_perturbation(batch, delta, self.domain, self.clamp), squared_norm(delta), delta,
                            relative_size(delta, batch, self.domain))


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
    rel: float | None = None  # exactly rel * ||ref|| per slice instead (budget NaN), see relative_radius

    def __call__(self, model: nn.Module, batch: Batch, runtime: Runtime) -> AttackOutput:
        with torch.no_grad():
            delta = self.perturb(batch).float() if self.domain == "image" else self.perturb(batch)
            budget = self.budget if self.rel is None else relative_radius(batch, self.rel, self.domain).pow(2)
            delta = delta * (budget / squared_norm(delta).clamp_min(1e-30)).sqrt().view(-1, *([1] * (delta.ndim - 1)))
        return AttackOutput(apply_perturbation(batch, delta, self.domain, self.clamp), squared_norm(delta), delta,
                            relative_size(delta, batch, self.domain))
