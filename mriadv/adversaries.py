"""The training adversaries that are not networks: what makes the training perturbation delta for
``adversary='pgd'``, ``'trades'``, ``'noise'`` and ``'smoothing'``, TRADES's penalty, the budget scale
that the generator's output shares with the noise, and the model every evaluation runs
(:func:`predictor`: the smoothed one for ``'smoothing'``).

* ``pgd`` (Madry et al., ICLR 2018): ``adv_steps`` of L2 PGD at the training budget on the error to
  the target; the reconstructor then descends ``Loss(f(x~), x) + lambda1 Loss(f(x~ + delta), x)``.
* ``trades`` (Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, "Theoretically principled trade-off between
  robustness and accuracy", ICML 2019): the same PGD on the *deviation* ``||f(x~ + delta) - f(x~)||^2``
  (the reconstruction's change, not its error; Darestani et al. 2021's objective), from a Gaussian
  random start because its gradient vanishes at ``delta = 0``; the reconstructor then descends
  ``Loss(f(x~), x) + beta * mean((f(x~ + delta) - f(x~))^2)`` with ``beta = lambda1``
  (:func:`trades_penalty`), ``f(x~)`` not detached in the penalty: both terms train.
* ``noise`` (jittering, Krainovic, Soltanolkotabi & Heckel 2023): Gaussian noise at the budget.
* ``smoothing`` (randomised smoothing end to end, RS-E2E, the baseline of SMUG, Li et al., ICASSP 2023):
  i.i.d. Gaussian noise with ``sigma^2 = epsilon / n`` (``noise_mode='sigma'`` whatever the config says);
  the reconstructor descends ``lambda1 Loss(f(x~ + n), x)`` only (no clean term), and every evaluation
  predicts by the mean of ``smooth_samples`` noisy passes (:func:`predictor`,
  :class:`mriadv.models.smoothing.Smoothed`).

Each is a function of the config, the batch and (noise) a seeded ``torch.Generator``; the
:class:`~mriadv.trainer.Trainer` holds the networks and the random streams and calls them.
"""

from __future__ import annotations

import torch
from torch import nn

from mriadv.attacks import PGDAttack
from mriadv.choices import NOISE_MODES
from mriadv.config import TrainConfig
from mriadv.data.transforms import Batch
from mriadv.losses import mse_loss
from mriadv.models.smoothing import Smoothed
from mriadv.perturbations import budget_per_slice, restrict, squared_norm

GEN_HEADROOM = 2.0  # gen_scale='budget': a saturated generator output has ||delta||^2 = GEN_HEADROOM * epsilon
# Salt of TRADES's per-slice random starts (mriadv.perturbations.slice_generator), plus the trainer's
# step count: a new start every step, the same in a resumed run. The 100,000th prime, far from the
# evaluation's noise and PGD salts (mriadv.attacks), so training starts never repeat evaluation draws.
TRADES_START_SALT = 1299709


def training_attack(cfg: TrainConfig, step: int = 0) -> PGDAttack:
    """The PGD that makes delta for ``adversary='pgd'`` or ``'trades'``: ``adv_steps`` L2 steps of
    ``pgd_step_scale * r / adv_steps`` at the training budget (in k-space per slice,
    :func:`budget_per_slice`) in the perturbation's domain. ``'pgd'`` maximises the error to the target
    from ``delta = 0``; ``'trades'`` the deviation ``||f(x~ + delta) - f(x~)||^2`` from a Gaussian start
    (i.i.d. entries with ``E||delta||^2 = epsilon``, projected onto the ball; seeded per slice and by
    ``step``, the trainer's step count)."""
    args = (cfg.epsilon, cfg.adv_steps, cfg.pgd_step_scale, cfg.perturbation, cfg.kspace_sampled_only, cfg.clamp)
    if cfg.adversary_kind == "trades":
        return PGDAttack(*args, random_start="gaussian", objective="deviation", salt=TRADES_START_SALT + step)
    return PGDAttack(*args)


def trades_penalty(perturbed: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """TRADES's robustness term for a reconstructor: ``mean((f(x~ + delta) - f(x~))^2)`` over the
    batch and every pixel, a scalar; ``perturbed``, ``clean``: reconstructions ``(B, 1, h, w)``.

    The mean (not the sum) is the MSE loss's reduction (:func:`mriadv.losses.mse_loss`), so with
    ``loss='mse'`` beta weighs two terms on one scale, as ``lambda1`` does for ``adversary='pgd'``.
    Zhang et al.'s classifier penalty is a KL divergence between class distributions; for a
    reconstructor (a regression) the squared deviation takes its place. Gradients flow into both
    arguments."""
    return mse_loss(perturbed, clean)


def budget_scale(cfg: TrainConfig, batch: Batch, delta: torch.Tensor) -> torch.Tensor:
    """``gen_scale='budget'``: the factor ``a`` ``(B, 1, ...)`` that maps the generator's tanh output
    (each real component in [-1, 1]) to ``||delta||^2 <= GEN_HEADROOM * epsilon`` when saturated,
    ``a = sqrt(GEN_HEADROOM * epsilon / n)`` with ``n`` the real components it may fill (image:
    ``h * w``; k-space: ``2 * H * acquired columns`` of each slice, or ``2 * H * W``). A DCGAN's
    tanh starts near RMS 0.5, so ``||G(z)||^2`` starts near ``0.25 * 2 = 0.5`` epsilon: inside the
    budget, whatever the crop, instead of tens of times above it (the seed fixes no scale). In k-space
    ``epsilon`` is each slice's budget ``(epsilon / (h w)) ||y||^2`` (:func:`budget_per_slice`)."""
    b = delta.shape[0]
    if delta.is_complex():
        cols = (
            batch.mask.to(torch.float32).sum(1)
            if cfg.kspace_sampled_only and batch.mask is not None
            else torch.full((b,), float(delta.shape[-1]))
        )
        n = 2.0 * delta.shape[-2] * cols.to(delta.device)
    else:
        n = torch.full((b,), float(delta[0].numel()), device=delta.device)
    budget = budget_per_slice(batch, cfg.epsilon, cfg.perturbation)  # a number, or (B,) in k-space
    scale = torch.sqrt(GEN_HEADROOM * budget / n.clamp_min(1.0))
    return scale.view(-1, *([1] * (delta.ndim - 1))).to(delta.real.dtype)


def gaussian_perturbation(cfg: TrainConfig, batch: Batch, rng: torch.Generator, *, mode: str) -> torch.Tensor:
    """Gaussian delta drawn from ``rng``: per image on the sphere ``||delta||^2 = epsilon``
    (``mode='norm'``) or i.i.d. with ``sigma^2 = epsilon / n`` over the ``n`` real components it fills
    (``'sigma'``); in k-space ``epsilon`` is each slice's ``(epsilon / (h w)) ||y||^2``
    (:func:`budget_per_slice`). Image: ``(B, 1, h, w)``; k-space: complex ``(B, H, W)``. The caller
    names the mode (:func:`training_noise_mode`): ``adversary='noise'`` its ``noise_mode``,
    ``'smoothing'`` always ``'sigma'``, the sigma of its predictor (:class:`mriadv.models.smoothing.Smoothed`)."""
    if mode not in NOISE_MODES:
        raise ValueError(f"gaussian_perturbation: mode must be one of {NOISE_MODES}, not {mode!r}")
    if cfg.perturbation == "image":
        delta = torch.randn(batch.image.shape, generator=rng).to(batch.image.device)
    else:
        shape = tuple(batch.kspace.shape)  # type: ignore[union-attr]
        delta = torch.complex(torch.randn(shape, generator=rng), torch.randn(shape, generator=rng))
        delta = restrict(delta.to(batch.image.device), batch, "kspace", cfg.kspace_sampled_only)
    view = (-1, *([1] * (delta.ndim - 1)))
    if mode == "norm":
        budget = budget_per_slice(batch, cfg.epsilon, cfg.perturbation)
        return delta * (budget / squared_norm(delta).clamp_min(1e-30)).sqrt().view(view).to(delta.real.dtype)
    return delta * (budget_scale(cfg, batch, delta) / GEN_HEADROOM**0.5)  # sqrt(eps / n) per real component


def training_noise_mode(cfg: TrainConfig) -> str:
    """The :func:`gaussian_perturbation` mode of the training noise: ``cfg.noise_mode`` for
    ``adversary='noise'`` (jittering); ``'sigma'`` for ``'smoothing'``, whatever the config says (the
    i.i.d. noise of its smoothed predictor)."""
    return "sigma" if cfg.adversary_kind == "smoothing" else cfg.noise_mode


def predictor(cfg: TrainConfig, net: nn.Module) -> nn.Module:
    """The model every evaluation of ``net`` runs (validation, attacks, the held-out report, previews,
    ``assess``, the instabilities, the study's figures): ``net`` itself, or for ``adversary='smoothing'``
    its smoothed predictor, the mean of ``cfg.smooth_samples`` passes with the training's sigma (on the
    image for the U-Net, on the measurements for ``arch='unrolled'``), sharing ``net``'s weights. An
    attack on it differentiates through the mean of its samples (expectation over transformation)."""
    if cfg.adversary_kind != "smoothing":
        return net
    crop = (cfg.crop_size, cfg.crop_size)
    return Smoothed(net, cfg.smooth_samples, cfg.epsilon, crop, cfg.kspace_sampled_only)


__all__ = [
    "GEN_HEADROOM",
    "TRADES_START_SALT",
    "budget_scale",
    "gaussian_perturbation",
    "predictor",
    "trades_penalty",
    "training_attack",
    "training_noise_mode",
]
