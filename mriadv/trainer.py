"""Min-max training of a robust reconstructor (Huang & Liang, Algorithms 1 and 2; after Raj et al.).

Per mini-batch (:meth:`Trainer.train_step`):

1. **generator step** (``f`` frozen: no gradient reaches theta) — ascend
   ``lambda1 * Loss(f(x~ + G(z)), x) - lambda2 * max(0, ||G(z)||^2 - epsilon)`` in phi;
2. **reconstructor step** — with ``delta = G(z)`` from the *updated* generator, detached, descend
   ``Loss(f(x~), x) + lambda1 * Loss(f(x~ + delta), x)`` in theta, the clean and perturbed inputs
   passed through ``f`` as one batch of 2B.

With ``adversary='pgd'``, ``'trades'``, ``'noise'`` or ``'smoothing'``, :mod:`mriadv.adversaries` makes
delta instead of a generator (TRADES's perturbed term is ``mean((f(x~ + delta) - f(x~))^2)``,
:func:`trades_penalty`; smoothing descends ``lambda1 Loss(f(x~ + n), x)`` alone, and every evaluation
runs :attr:`Trainer.predictor`, the mean of ``smooth_samples`` noisy passes).

With ``epsilon = 0`` there is no generator and the step is standard training. With
``perturbation='kspace'`` the perturbation is added to the normalised masked k-space before the
inverse FFT (Algorithm 2) and the generator is conditioned on the measurements (or on z).

The trainer holds the networks, their optimisers and its own random streams; :func:`mriadv.fit.fit`
runs it over epochs.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
from torch import nn

from mriadv.adversaries import GEN_HEADROOM, budget_scale, gaussian_perturbation, predictor, trades_penalty
from mriadv.adversaries import training_attack, training_noise_mode
from mriadv.attacks import GeneratorAttack, NoiseAttack, PGDAttack
from mriadv.config import CHOICES, ConfigError, TrainConfig
from mriadv.data.transforms import Batch, concat
from mriadv.losses import make_loss
from mriadv.models import ConditionalGenerator, ImageGenerator, MeasurementGenerator, UNet, as_complex, kspace_features
from mriadv.models.unrolled import UnrolledNet
from mriadv.models.utils import frozen, running_stats_kept
from mriadv.perturbations import budget_per_slice, hinge, project_l2, squared_norm
from mriadv.perturbations import perturbed_batch, reconstruct  # the reconstructor's (perturbed) input
from mriadv.runtime import Runtime

# The trainer's own random streams, seeded apart from torch's global one (model initialisation) and
# saved with its state, so that a resumed run draws what the uninterrupted run would have drawn.
LATENT_SEED_OFFSET = 1  # the generator game's latents z: seed + 1
NOISE_SEED_OFFSET = 2  # adversary='noise' (jittering) and 'smoothing': seed + 2
# One fixed latent for every evaluation of a latent-conditioned generator (its attack, the preview),
# the same in every epoch and every run, so that the generator's attack is comparable across epochs.
EVAL_LATENT_SEED = 12345


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or inf; training stops instead of going on."""


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def build_reconstructor(cfg: TrainConfig) -> nn.Module:
    """The U-Net on the zero-filled image, or (``arch='unrolled'``) the unrolled network on the measurements."""
    if cfg.arch == "unrolled":
        size = dict(cascades=cfg.unroll_cascades, chans=cfg.unroll_chans, num_pools=cfg.unroll_pools)
        layers = dict(activation=cfg.unet_activation, pooling=cfg.unet_pooling, norm=cfg.unet_norm)
        smug = dict(smooth_samples=cfg.unroll_smooth_samples, smooth_sigma=cfg.unroll_smooth_sigma)
        return UnrolledNet(**size, share=cfg.unroll_share, crop=cfg.crop_size, **layers, **smug)
    if cfg.arch != "unet":
        raise ValueError(f"unknown arch {cfg.arch!r}; expected one of {CHOICES['arch']}")
    return UNet(
        1, 1, cfg.unet_chans, cfg.unet_pools, cfg.unet_activation, cfg.unet_pooling, cfg.unet_norm, cfg.residual
    )


def build_generator(cfg: TrainConfig, kspace_shape: tuple[int, int] | None = None) -> nn.Module | None:
    """The perturbation generator for ``cfg`` (None unless the adversary is a generator)."""
    kind = cfg.adversary_kind
    if kind == "conditional":  # sees its input: the image (1 channel) or k-space features (3)
        image = cfg.perturbation == "image"
        return ConditionalGenerator(
            1 if image else 3, 1 if image else 2, cfg.latent_dim, cfg.cond_chans, max(1, cfg.unet_pools)
        )
    if kind != "generator":
        return None
    if cfg.perturbation == "image":
        return ImageGenerator((cfg.crop_size, cfg.crop_size), cfg.latent_dim, cfg.gen_chans, out_chans=1)
    if cfg.kspace_conditioning == "measurements":
        return MeasurementGenerator(channels=cfg.gen_chans)
    if kspace_shape is None:
        raise ConfigError("kspace_conditioning='latent' needs the k-space shape of the data")
    return ImageGenerator(kspace_shape, cfg.latent_dim, cfg.gen_chans, out_chans=2)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """The given modules (None skipped) in eval mode inside the block, their own modes restored after."""
    present = [m for m in modules if m is not None]
    modes = [m.training for m in present]
    for m in present:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(present, modes):
            m.train(mode)


# ---------------------------------------------------------------------------------------------
# one training step
# ---------------------------------------------------------------------------------------------
class Trainer:
    """Holds the two networks and their optimisers and performs the named steps of Algorithm 1/2.

    Args:
        cfg: the run's configuration.
        runtime: device and precision.
        kspace_shape: ``(H, W)`` of the data's k-space (only for a latent-conditioned k-space generator).
    """

    def __init__(self, cfg: TrainConfig, runtime: Runtime, kspace_shape: tuple[int, int] | None = None) -> None:
        self.cfg, self.runtime = cfg, runtime
        self.loss_fn = make_loss(cfg.loss, data_range=cfg.dssim_data_range) if cfg.loss == "dssim" else make_loss("mse")
        self.recon = runtime.prepare_model(build_reconstructor(cfg))
        self.opt_recon = torch.optim.AdamW(self.recon.parameters(), lr=cfg.lr_recon, weight_decay=cfg.weight_decay)
        gen = build_generator(cfg, kspace_shape)
        self.generator = runtime.prepare_model(gen) if gen is not None else None
        self.opt_gen = (
            torch.optim.AdamW(self.generator.parameters(), lr=cfg.lr_gen, weight_decay=cfg.weight_decay)
            if self.generator is not None
            else None
        )
        self.latent_rng = torch.Generator().manual_seed(cfg.seed + LATENT_SEED_OFFSET)
        self.noise_rng = torch.Generator().manual_seed(cfg.seed + NOISE_SEED_OFFSET)  # 'noise', 'smoothing'
        self.steps_done = 0  # optimiser steps so far (the schedule's clock; saved with the state)
        self.total_steps: int | None = None  # set by fit() for lr_schedule='cosine'

    @property
    def predictor(self) -> nn.Module:
        """What every evaluation runs (:func:`mriadv.adversaries.predictor`): the reconstructor, or for
        ``adversary='smoothing'`` its smoothed predictor on the same weights; the training steps use
        :attr:`recon`."""
        return predictor(self.cfg, self.recon)

    def lr_factor(self) -> float:
        """The schedule's multiplier of both base learning rates at the current step: 1 (constant), or
        cosine decay ``0.5 (1 + cos(pi t / T))`` from 1 at step 0 to 0 at ``T = total_steps``."""
        if self.cfg.lr_schedule == "constant" or not self.total_steps:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(self.steps_done, self.total_steps) / self.total_steps))

    def _set_learning_rates(self) -> None:
        factor = self.lr_factor()
        for opt, lr in ((self.opt_recon, self.cfg.lr_recon), (self.opt_gen, self.cfg.lr_gen)):
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = lr * factor

    # -- perturbation -------------------------------------------------------------------------
    @property
    def latent_conditioned(self) -> bool:
        """Whether the generator takes a latent ``z`` (G(z), and the conditional G(x, z))."""
        kind = self.cfg.adversary_kind
        return kind == "conditional" or (
            kind == "generator" and (self.cfg.perturbation == "image" or self.cfg.kspace_conditioning == "latent")
        )

    def draw_latent(self, batch_size: int) -> torch.Tensor | None:
        """z ~ N(0, latent_scale^2) ``(B, latent_dim)``, from the run's own generator (resumable)."""
        if self.generator is None or not self.latent_conditioned:
            return None
        z = torch.randn(batch_size, self.cfg.latent_dim, generator=self.latent_rng) * self.cfg.latent_scale
        return z.to(self.runtime.device)

    def perturbation(self, batch: Batch, z: torch.Tensor | None, training: bool = True) -> torch.Tensor:
        """``G(z)`` (image: ``(B, 1, h, w)``) or ``G(y)`` / ``G(z)`` (k-space: complex ``(B, H, W)``), fp32,
        restricted to acquired columns and projected onto the epsilon ball when configured. The generator
        runs under the training autocast when ``training``, else in the caller's precision (fp32 in
        evaluation)."""
        assert self.generator is not None
        cfg = self.cfg
        conditional = cfg.adversary_kind == "conditional"
        with self.runtime.autocast() if training else contextlib.nullcontext():
            if cfg.perturbation == "image":
                delta = (
                    self.generator(self.runtime.image(batch.image), z) if conditional else self.generator(z)
                ).float()
            else:
                if conditional:
                    raw = self.generator(kspace_features(batch.kspace, batch.mask), z)
                else:
                    raw = self.generator(z) if self.latent_conditioned else self.generator(batch.kspace, batch.mask)
                delta = as_complex(raw)
                if cfg.kspace_sampled_only:
                    delta = delta * batch.mask[:, None, :].to(delta.real.dtype)  # type: ignore[index]
        if cfg.gen_scale == "budget":
            delta = delta * self.output_scale(batch, delta)
        if cfg.project:  # k-space: per slice, (epsilon / (h w)) ||y||^2 (budget_per_slice)
            delta = project_l2(delta, budget_per_slice(batch, cfg.epsilon, cfg.perturbation), cfg.epsilon_scope)
        return delta

    def output_scale(self, batch: Batch, delta: torch.Tensor) -> torch.Tensor:
        """``gen_scale='budget'``'s factor ``(B, 1, ...)`` (:func:`mriadv.adversaries.budget_scale`)."""
        return budget_scale(self.cfg, batch, delta)

    def perturbed_batch(self, batch: Batch, delta: torch.Tensor) -> Batch:
        return perturbed_batch(batch, delta, self.cfg.perturbation, self.cfg.clamp)

    def _loss(self, inputs: Batch, target: torch.Tensor) -> torch.Tensor:
        with self.runtime.autocast():
            out = reconstruct(self.recon, self.runtime, inputs)
        return self.loss_fn(out.float(), target)

    # -- the named steps ----------------------------------------------------------------------
    def generator_step(self, batch: Batch, z: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One ascent step of phi on ``lambda1 Loss(f(x~ + G), x) - lambda2 hinge``; theta gets no gradient,
        and ``f`` runs in eval mode (as for PGD): its batch-norm statistics come from the reconstructor
        step's clean and perturbed batch only, never from a perturbed-only batch."""
        assert self.generator is not None and self.opt_gen is not None
        cfg = self.cfg
        with frozen(self.recon), eval_mode(self.recon):
            delta = self.perturbation(batch, z)
            adv = self._loss(self.perturbed_batch(batch, delta), batch.target)
            penalty = hinge(delta, budget_per_slice(batch, cfg.epsilon, cfg.perturbation), cfg.epsilon_scope)
            objective = cfg.lambda1 * adv - cfg.lambda2 * penalty
            self.opt_gen.zero_grad(set_to_none=True)
            (-objective).backward()  # ascent
            self.opt_gen.step()
        return {"gen_objective": objective.detach(), "hinge": penalty.detach(), "adv_loss": adv.detach()}

    def reconstructor_step(self, batch: Batch, delta: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One descent step of theta on ``Loss(f(x~), x) + lambda1 Loss(f(x~ + delta), x)`` (delta fixed),
        for ``adversary='trades'`` on ``Loss(f(x~), x) + lambda1 mean((f(x~ + delta) - f(x~))^2)`` (beta =
        lambda1; f(x~) not detached), for ``'smoothing'`` on ``lambda1 Loss(f(x~ + delta), x)`` alone (RS-E2E
        never sees a clean input: ``clean_loss`` is NaN); with ``delta=None``, standard training on ``Loss(f(x~), x)``."""
        if delta is None:
            total = clean = self._loss(batch, batch.target)
            pert = torch.zeros(())
        elif self.cfg.adversary_kind == "smoothing":
            pert = self._loss(self.perturbed_batch(batch, delta.detach()), batch.target)
            total, clean = self.cfg.lambda1 * pert, torch.full((), math.nan)
        else:
            n = len(batch)
            both = concat(batch, self.perturbed_batch(batch, delta.detach()))  # 2B: clean, then perturbed
            with self.runtime.autocast():
                out = reconstruct(self.recon, self.runtime, both).float()
            clean = self.loss_fn(out[:n], batch.target)
            if self.cfg.adversary_kind == "trades":
                pert = trades_penalty(out[n:], out[:n])
            else:
                pert = self.loss_fn(out[n:], batch.target)
            total = clean + self.cfg.lambda1 * pert
        self.opt_recon.zero_grad(set_to_none=True)
        total.backward()
        self.opt_recon.step()
        return {"recon_loss": total.detach(), "clean_loss": clean.detach(), "pert_loss": pert.detach()}

    def attack_perturbation(self, batch: Batch) -> torch.Tensor:
        """delta for ``adversary='pgd'`` or ``'trades'`` (:func:`mriadv.adversaries.training_attack`) against
        the current reconstructor (in eval mode, so batch-norm statistics see only the update's batch);
        part of the training step, so under the training autocast."""
        pgd = training_attack(self.cfg, self.steps_done)
        with eval_mode(self.recon), self.runtime.autocast():
            return pgd(self.recon, batch, self.runtime).delta

    def noise_perturbation(self, batch: Batch) -> torch.Tensor:
        """delta for ``adversary='noise'`` or ``'smoothing'`` (:func:`mriadv.adversaries.gaussian_perturbation`,
        in :func:`~mriadv.adversaries.training_noise_mode`), from the trainer's own seeded noise stream."""
        return gaussian_perturbation(self.cfg, batch, self.noise_rng, mode=training_noise_mode(self.cfg))

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One step of the configured adversarial training on one batch (Algorithm 1 or 2 for the
        generator kinds); returns plain numbers (one device sync)."""
        self._set_learning_rates()
        self.steps_done += 1
        self.recon.train()
        kind = self.cfg.adversary_kind
        if kind in ("pgd", "trades", "noise", "smoothing"):
            noisy = kind in ("noise", "smoothing")
            with torch.no_grad() if noisy else contextlib.nullcontext():
                delta = self.noise_perturbation(batch) if noisy else self.attack_perturbation(batch)
            stats = self.reconstructor_step(batch, delta.detach())
            sq = squared_norm(delta.detach())
            stats["delta_sq"] = sq.mean()
            budget = budget_per_slice(batch, self.cfg.epsilon, self.cfg.perturbation)  # a number, or (B,)
            stats["over_budget"] = (sq > budget * (1 + 1e-4)).float().mean()
            stats["delta_sq_budget"] = (sq / budget).mean()  # in k-space each slice's own budget
        elif self.generator is None:
            stats = self.reconstructor_step(batch, None)
        else:
            self.generator.train()
            z = self.draw_latent(len(batch))
            stats = self.generator_step(batch, z)
            # delta_T = G_T(z_T): the updated generator, in training mode as in its step, but its
            # batch-norm statistics were updated by that step already (once per training step)
            with torch.no_grad(), running_stats_kept(self.generator):
                delta = self.perturbation(batch, z)
            stats |= self.reconstructor_step(batch, delta)
            sq = squared_norm(delta)
            stats["delta_sq"] = sq.mean()
            # share of images outside the ball; a per-slice k-space budget is met only up to rounding
            budget = budget_per_slice(batch, self.cfg.epsilon, self.cfg.perturbation)
            projected = self.cfg.project or self.cfg.perturbation != "image"  # on the sphere up to rounding
            tol = 1 + 1e-4 if projected else 1.0
            stats["over_budget"] = (sq > budget * tol).float().mean()
            stats["delta_sq_budget"] = (sq / budget).mean()
        keys = list(stats)
        values = torch.stack([stats[k].float().to(self.runtime.device) for k in keys]).tolist()
        out = dict(zip(keys, values))
        # checked once per step, after the updates (one device sync): a non-finite loss leaves this
        # epoch's weights unusable, but the run stops here and the last checkpoint is untouched
        bad = [k for k in ("gen_objective", "recon_loss") if k in out and not math.isfinite(out[k])]
        if bad:
            raise NonFiniteLoss(", ".join(f"{k} is {out[k]}" for k in bad))
        return out

    # -- robustness evaluation ----------------------------------------------------------------
    def generator_perturb(self, batch: Batch) -> torch.Tensor:
        """The generator's raw perturbation for a batch, in eval mode and the caller's precision (for
        :class:`GeneratorAttack` and the preview: fp32 inside :meth:`Runtime.evaluating`)."""
        assert self.generator is not None
        was = self.generator.training
        self.generator.eval()
        try:
            z = None
            if self.latent_conditioned:  # fixed latent per evaluation: comparable across epochs
                g = torch.Generator().manual_seed(EVAL_LATENT_SEED)
                z = (torch.randn(len(batch), self.cfg.latent_dim, generator=g) * self.cfg.latent_scale).to(
                    self.runtime.device
                )
            with torch.no_grad():
                return self.perturbation(batch, z, training=False)
        finally:
            self.generator.train(was)

    def attacks(self) -> list:
        """The configured attacks at every budget of ``cfg.attack_budgets``."""
        cfg, out = self.cfg, []
        for budget in cfg.attack_budgets:
            for name in cfg.attacks:
                if name == "pgd":
                    out.append(PGDAttack(budget, cfg.pgd_steps, cfg.pgd_step_scale, "image", clamp=cfg.clamp))
                elif name == "pgd_kspace":
                    out.append(
                        PGDAttack(
                            budget, cfg.pgd_steps, cfg.pgd_step_scale, "kspace", cfg.kspace_sampled_only, cfg.clamp
                        )
                    )
                elif name == "noise":
                    out.append(NoiseAttack(budget))
                elif name == "generator" and self.generator is not None:
                    out.append(GeneratorAttack(budget, self.generator_perturb, cfg.perturbation, cfg.clamp))
        return out

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What resuming needs besides the networks (:meth:`networks`): the optimisers, the latent and
        noise random streams and the schedule's step count."""
        return {
            "opt_recon": self.opt_recon.state_dict(),
            "opt_gen": self.opt_gen.state_dict() if self.opt_gen is not None else None,
            "latent_rng": self.latent_rng.get_state(),
            "noise_rng": self.noise_rng.get_state(),
            "steps_done": self.steps_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt_recon.load_state_dict(state["opt_recon"])
        if self.opt_gen is not None:
            self.opt_gen.load_state_dict(state["opt_gen"])
        self.latent_rng.set_state(state["latent_rng"])
        self.steps_done = int(state.get("steps_done", 0))
        if "noise_rng" in state:
            self.noise_rng.set_state(state["noise_rng"])

    def networks(self, copy: bool = True) -> dict[str, Any]:
        """The two networks' weights, ``{'recon': ..., 'generator': ... or None}`` (a checkpoint's
        ``networks``); ``copy``: detached clones that later steps leave alone (the best epoch's)."""

        def weights(m: nn.Module) -> dict[str, torch.Tensor]:
            return {k: v.detach().clone() for k, v in m.state_dict().items()} if copy else m.state_dict()

        return {"recon": weights(self.recon), "generator": weights(self.generator) if self.generator else None}

    def load_networks(self, nets: dict[str, Any]) -> None:
        self.recon.load_state_dict(nets["recon"])
        if self.generator is not None and nets["generator"] is not None:
            self.generator.load_state_dict(nets["generator"])

    @contextlib.contextmanager
    def using(self, nets: dict[str, Any]) -> Iterator["Trainer"]:
        """Inside the block the trainer holds ``nets`` (e.g. the best epoch's); its own come back after."""
        current = self.networks()
        self.load_networks(nets)
        try:
            yield self
        finally:
            self.load_networks(current)


__all__ = [
    "EVAL_LATENT_SEED",
    "GEN_HEADROOM",
    "LATENT_SEED_OFFSET",
    "NOISE_SEED_OFFSET",
    "NonFiniteLoss",
    "Trainer",
    "build_generator",
    "build_reconstructor",
    "eval_mode",
]
