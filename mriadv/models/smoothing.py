"""Randomised smoothing's predictor (``adversary='smoothing'``, RS-E2E): the Monte-Carlo mean of a
reconstructor over Gaussian perturbations of its input, ``g(x) = (1/N) sum_i f(x + sigma n_i)``.

Randomised smoothing (Cohen, Rosenfeld & Kolter, ICML 2019, for classifiers) applied to the whole
reconstructor end to end: "RS-E2E", the vanilla baseline of SMUG (Li, Jia, Liang, Yao, Ravishankar &
Liu, ICASSP 2023). The base network is trained on noisy inputs of the same sigma
(:mod:`mriadv.adversaries`) and predicts by the mean of ``N`` noisy passes. SMUG's own method smooths
the denoiser inside each unroll (``unroll_smooth_samples``, :mod:`mriadv.models.unrolled`); this is not
that: the noise is added once, to the network's input.

:class:`Smoothed` shares the base network's weights and looks to
:func:`mriadv.perturbations.reconstruct` exactly as the base does (the zero-filled image for the U-Net,
the measurements for the unrolled network). Its ``N`` noise draws come from a generator seeded with
:data:`SMOOTHING_SEED` at every call (common random numbers): evaluation is deterministic, and an
attack's gradient is the exact gradient of one fixed function (expectation over transformation with
``N`` samples), including the path through sigma where sigma depends on the measurements.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mriadv.units import relative_energy

# The smoothing noise's seed, the same at every call and in every run (the 1,000th prime; apart from the
# training noise stream, seed + 2, and the attacks' salts): the predictor is a function of the weights.
SMOOTHING_SEED = 7919


def image_sigma(epsilon: float, image: torch.Tensor) -> float:
    """sigma of i.i.d. noise on a real ``(B, 1, h, w)`` image with ``E||n||^2 = epsilon`` per image:
    ``sqrt(epsilon / (h w))`` (``adversary='noise'`` with ``noise_mode='sigma'``)."""
    return math.sqrt(epsilon / image[0].numel())


def kspace_sigma(
    epsilon: float, kspace: torch.Tensor, mask: torch.Tensor, crop: tuple[int, int], sampled_only: bool = True
) -> torch.Tensor:
    """sigma ``(B,)`` of i.i.d. noise per real component of complex k-space ``(B, H, W)`` whose expected
    energy is each slice's k-space budget ``(epsilon / (h w)) ||M y||^2``
    (:func:`mriadv.perturbations.budget_per_slice`), spread over the ``2 H C`` real components it fills
    (``C``: the acquired columns of ``mask`` ``(B, W)`` when ``sampled_only``, else every column).
    Differentiable in ``kspace``."""
    m = mask.to(kspace.real.dtype)[:, None, :]
    energy = (kspace * m).abs().pow(2).flatten(1).sum(1)  # ||M y||^2
    cols = mask.to(torch.float32).sum(1) if sampled_only else torch.full_like(energy, float(kspace.shape[-1]))
    n = 2.0 * kspace.shape[-2] * cols.to(energy)
    return (relative_energy(epsilon, crop) * energy / n.clamp_min(1.0)).sqrt()


class Smoothed(nn.Module):
    """``g(x) = (1/N) sum_i f(x + sigma n_i)``, ``n_i`` standard normal, drawn from one generator
    seeded with ``seed`` at every call.

    Args:
        base: the reconstructor ``f`` (its weights are shared, not copied).
        samples: ``N >= 1``.
        epsilon: the expected ``||sigma n||^2`` per image, at the crop (k-space: each slice's budget,
            :func:`kspace_sigma`).
        crop: the run's ``(h, w)`` (k-space budgets are relative to it).
        sampled_only: k-space noise only on the acquired columns (``kspace_sampled_only``).

    A base that takes the measurements is called ``g(kspace, mask, mean, std)`` and its noise is complex
    on the k-space (:func:`kspace_sigma`); any other ``g(x)`` on the image ``(B, 1, h, w)``
    (:func:`image_sigma`). Its mode follows the base's when built, so ``evaluate``'s restore leaves the
    base as it found it.
    """

    def __init__(
        self,
        base: nn.Module,
        samples: int,
        epsilon: float,
        crop: tuple[int, int],
        sampled_only: bool = True,
        seed: int = SMOOTHING_SEED,
    ) -> None:
        super().__init__()
        if not (isinstance(samples, int) and samples >= 1):
            raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
        self.base, self.samples, self.epsilon = base, samples, float(epsilon)
        self.crop, self.sampled_only, self.seed = crop, sampled_only, seed
        self.train(base.training)

    @property
    def takes_measurements(self) -> bool:
        return bool(getattr(self.base, "takes_measurements", False))

    def noise(self, shape: tuple[int, ...], complex_: bool, rng: torch.Generator) -> torch.Tensor:
        """One standard normal draw (CPU): real, or complex with real and imaginary parts drawn in turn."""
        if complex_:
            return torch.complex(torch.randn(shape, generator=rng), torch.randn(shape, generator=rng))
        return torch.randn(shape, generator=rng)

    def forward(self, *inputs: torch.Tensor, **kw) -> torch.Tensor:
        rng = torch.Generator().manual_seed(self.seed)
        total = None
        if self.takes_measurements:
            kspace, mask, *rest = inputs
            sigma = kspace_sigma(self.epsilon, kspace, mask, self.crop, self.sampled_only)[:, None, None]
            keep = mask.to(kspace.real.dtype)[:, None, :] if self.sampled_only else 1.0
            for _ in range(self.samples):
                n = self.noise(tuple(kspace.shape), True, rng).to(kspace.device) * keep
                out = self.base(kspace + sigma * n, mask, *rest, **kw)
                total = out if total is None else total + out
        else:
            (x,) = inputs
            sigma_x = image_sigma(self.epsilon, x)
            for _ in range(self.samples):
                out = self.base(x + sigma_x * self.noise(tuple(x.shape), False, rng).to(x), **kw)
                total = out if total is None else total + out
        return total / self.samples  # type: ignore[operator]


__all__ = ["SMOOTHING_SEED", "Smoothed", "image_sigma", "kspace_sigma"]
