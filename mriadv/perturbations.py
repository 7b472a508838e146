"""Perturbations of the reconstructor's input: applying them, bounding them, measuring them, and
drawing them at random, one seeded generator per slice. Pure functions of tensors and batches, and
:func:`reconstruct`, the one call that runs a reconstructor on a (perturbed) batch; the attacks that
search for a perturbation are :mod:`mriadv.attacks`.

A perturbation lives in one of two domains (:data:`mriadv.choices.DOMAINS`):

* ``'image'``: real ``(B, 1, h, w)``, added to the normalised zero-filled image x~ (Algorithm 1);
* ``'kspace'``: complex ``(B, H, W)``, added to the normalised masked k-space before the inverse
  FFT (Algorithm 2); optionally restricted to the acquired columns.

Its size is the squared L2 norm per image, in normalised units; in k-space this equals the energy of
the full-FOV image perturbation (the transforms are orthonormal). A budget is either absolute or
relative. An absolute budget ``epsilon`` (at the run's crop ``h x w``, :mod:`mriadv.units`) bounds an
image perturbation by ``||delta||^2 <= epsilon`` and a k-space one by the same relative energy of the
slice's sampled k-space ``y``: ``||delta||^2 <= (epsilon / (h w)) ||y||^2`` per slice, i.e.
``||delta|| / ||y|| <= sqrt(epsilon / (h w))`` (the config's ``epsilon_rms``), the same on every crop
and data set (:func:`budget_per_slice`). A relative budget (``rel``: ``||delta|| <= rel * ||ref||`` per
slice, with ``ref`` the sampled k-space ``y`` or the input image ``x~``, see :func:`relative_radius`)
gives the radius directly (Genzel, Macdonald & Maerz, TPAMI 2022, use relative noise levels).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from mriadv.choices import DOMAINS
from mriadv.data.masks import volume_seed
from mriadv.data.transforms import Batch, image_from_normalized_kspace
from mriadv.runtime import Runtime
from mriadv.units import relative_energy

RANDOM_STARTS = ("uniform", "gaussian")


def squared_norm(delta: torch.Tensor) -> torch.Tensor:
    """Per-sample squared L2 norm ``(B,)`` of a real or complex perturbation ``(B, ...)``."""
    return delta.abs().pow(2).flatten(1).sum(1) if delta.is_complex() else delta.pow(2).flatten(1).sum(1)


def broadcast_per_sample(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` with ``ndim`` dimensions, to scale a ``(B, ...)`` perturbation."""
    return x.view(-1, *([1] * (ndim - 1)))


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
    return delta * broadcast_per_sample(scale, delta.ndim).to(delta.dtype)


def hinge(delta: torch.Tensor, epsilon: float | torch.Tensor, scope: str = "image") -> torch.Tensor:
    """The seed's penalty ``max(0, ||delta||^2 - epsilon)``: mean over the batch (``scope='image'``),
    or ``max(0, ||batch||^2 - B epsilon)`` (``'batch'``, the seed's code). ``epsilon``: one number, or
    one per sample ``(B,)`` (then ``'batch'`` compares with their sum). Returns a scalar."""
    sq = squared_norm(delta)
    if scope == "batch":
        total = epsilon.sum() if isinstance(epsilon, torch.Tensor) else epsilon * delta.shape[0]
        return torch.relu(sq.sum() - total)
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


def perturbed_batch(batch: Batch, delta: torch.Tensor | None, domain: str, clamp: float | None) -> Batch:
    """``batch`` perturbed by ``delta`` in ``domain``: ``image`` the network input of
    :func:`apply_perturbation`; ``kspace`` the perturbed measurements ``y + delta`` (k-space), or None for
    an image perturbation, which has no measurements: a reconstructor that takes them then refuses the
    batch (:func:`reconstruct`) instead of silently reading the clean ones. ``delta=None``: ``batch``."""
    if delta is None:
        return batch
    image = apply_perturbation(batch, delta, domain, clamp)  # raises for k-space without batch.kspace
    kspace = batch.kspace + delta if domain == "kspace" else None  # type: ignore[operator]
    return replace(batch, image=image, kspace=kspace)


def takes_measurements(model: nn.Module) -> bool:
    """Whether ``model`` reconstructs from the measurements, ``model(kspace, mask, mean, std)``
    (:class:`mriadv.models.unrolled.UnrolledNet`), rather than from the zero-filled image."""
    return bool(getattr(model, "takes_measurements", False))


def reconstruct(model: nn.Module, runtime: Runtime, batch: Batch) -> torch.Tensor:
    """The reconstruction ``(B, 1, h, w)`` of a (perturbed) batch, in the model's output dtype: every
    forward pass of a reconstructor goes through here. A model that takes the measurements gets
    ``batch.kspace``, ``mask``, ``mean``, ``std``; any other the zero-filled input ``batch.image`` in the
    run's memory format. Raises ``ValueError`` for a measurement model and a batch without k-space."""
    if takes_measurements(model):
        if batch.kspace is None or batch.mask is None:
            raise ValueError(
                "this reconstructor takes the measurements, and the batch carries none (an image-domain "
                "perturbation, or data loaded without k-space)"
            )
        return model(batch.kspace, batch.mask, batch.mean, batch.std)
    return model(runtime.image(batch.image))


def perturbation_shape(batch: Batch, domain: str) -> tuple[int, ...]:
    return tuple(batch.image.shape) if domain == "image" else tuple(batch.kspace.shape)  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------
# relative budgets
# ---------------------------------------------------------------------------------------------
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


def budget_per_slice(batch: Batch, budget: float, domain: str) -> float | torch.Tensor:
    """The largest ``||delta||^2`` an absolute budget ``budget`` (at the batch's crop ``(h, w)``) allows.

    ``'image'``: ``budget`` itself, the number (so the image path computes exactly what it did).
    ``'kspace'``: ``(budget / (h w)) * ||y||^2`` per slice ``(B,)``, on the k-space's device, with ``y``
    the sampled k-space (:func:`reference_norm`): the relative energy ``||delta||^2 / ||y||^2 = budget
    / (h w)`` (:func:`mriadv.units.relative_energy`), which neither the crop nor the normalisation
    changes for a budget scaled from 320x320 by :func:`mriadv.units.scale_epsilon`.
    """
    if domain == "image":
        return budget
    if domain == "kspace":
        return relative_energy(budget, batch.crop) * reference_norm(batch, domain).pow(2)
    raise ValueError(f"unknown perturbation domain {domain!r}; expected one of {DOMAINS}")


def relative_size(delta: torch.Tensor, batch: Batch, domain: str) -> torch.Tensor:
    """``||delta|| / ||ref||`` per slice ``(B,)``: the size of a perturbation in ``domain`` relative to
    the norm that :func:`relative_radius` scales by."""
    return squared_norm(delta).sqrt() / reference_norm(batch, domain)


# ---------------------------------------------------------------------------------------------
# random draws, one generator per slice
# ---------------------------------------------------------------------------------------------
def slice_generator(fname: str, slice_num: int, salt: int) -> torch.Generator:
    """A CPU generator seeded by one slice's (file, slice) and ``salt``: the same in every trial,
    epoch and process."""
    return torch.Generator().manual_seed((volume_seed(f"{fname}:{int(slice_num)}") + salt) % (2**63))


def slice_noise(batch: Batch, salt: int) -> torch.Tensor:
    """Standard normal noise shaped like ``batch.image`` ``(B, 1, h, w)``, on the CPU; each slice's
    draw comes from its own :func:`slice_generator`, so a slice gets the same noise whatever its
    batch-mates, their order or the batch size."""
    shape = tuple(batch.image.shape[1:])
    return torch.stack(
        [torch.randn(shape, generator=slice_generator(f, int(s), salt)) for f, s in zip(batch.fnames, batch.slice_nums)]
    )


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


def random_start(
    batch: Batch, domain: str, radius: float | torch.Tensor, kind: str, salt: int, sampled_only: bool = True
) -> torch.Tensor:
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
        return z * broadcast_per_sample(norm / squared_norm(z).sqrt().clamp_min(1e-30), z.ndim)
    return project_l2(z * broadcast_per_sample(radius / entries.sqrt(), z.ndim), radius.pow(2))


__all__ = [
    "DOMAINS",
    "RANDOM_STARTS",
    "apply_perturbation",
    "broadcast_per_sample",
    "budget_per_slice",
    "hinge",
    "perturbation_shape",
    "perturbed_batch",
    "project_l2",
    "random_start",
    "reconstruct",
    "reference_norm",
    "relative_radius",
    "relative_size",
    "restrict",
    "slice_generator",
    "slice_noise",
    "squared_norm",
    "takes_measurements",
]
