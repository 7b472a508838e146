"""Min-max training of a robust reconstructor (Huang & Liang, Algorithms 1 and 2; after Raj et al.).

Per mini-batch (:meth:`Trainer.train_step`):

1. **generator step** (``f`` frozen: no gradient reaches theta) — ascend
   ``lambda1 * Loss(f(x~ + G(z)), x) - lambda2 * max(0, ||G(z)||^2 - epsilon)`` in phi;
2. **reconstructor step** — with ``delta = G(z)`` from the *updated* generator, detached, descend
   ``Loss(f(x~), x) + lambda1 * Loss(f(x~ + delta), x)`` in theta, the clean and perturbed inputs
   passed through ``f`` as one batch of 2B.

With ``epsilon = 0`` there is no generator and the step is standard training. With
``perturbation='kspace'`` the perturbation is added to the normalised masked k-space before the
inverse FFT (Algorithm 2) and the generator is conditioned on the measurements (or on z).

:func:`fit` runs epochs, validates, evaluates robustness, stops early, checkpoints every epoch and
resumes from a checkpoint, reporting each epoch through a callback of plain numbers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from mriadv.attacks import (GeneratorAttack, NoiseAttack, PGDAttack, apply_perturbation, hinge, project_l2, restrict,
                            squared_norm)
from mriadv.config import ConfigError, TrainConfig, to_reference
from mriadv.data.files import (SPLITS, ShapeBucketSampler, SliceDataset, resolve_split_dir, seeded_slices,
                               split_for_report)
from mriadv.data.masks import make_mask_func
from mriadv.data.transforms import Batch, UnetTransform, collate
from mriadv.evaluate import RobustRow, evaluate, preview, robustness
from mriadv.instabilities import (SWEEP_ACCELERATIONS, FeatureSearch, FeatureSpec, NoTissue, feature_recovery,
                                  sampling_sweep)
from mriadv.losses import make_loss
from mriadv.models import (ConditionalGenerator, ImageGenerator, MeasurementGenerator, UNet, as_complex,
                           kspace_features)
from mriadv.protocols import get_protocol
from mriadv.runtime import Runtime, seed_everything

CHECKPOINT_FORMAT = 2  # 2: the U-Net's up path halves channels before concatenating (models/unet.py)
GEN_HEADROOM = 2.0  # gen_scale='budget': a saturated generator output has ||delta||^2 = GEN_HEADROOM * epsilon
CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
PREVIEW_NAME = "preview.npz"
STATUSES = ("running", "completed", "early_stopped", "nan")
# fields that may differ between a checkpoint's config and the config resuming it
RESUMABLE_CHANGES = {"max_epochs", "patience", "device", "precision", "num_workers", "threads", "cache_dir", "data",
                     "robust_every"}


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or inf; training stops instead of going on."""


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def build_reconstructor(cfg: TrainConfig) -> UNet:
    return UNet(1, 1, cfg.unet_chans, cfg.unet_pools, cfg.unet_activation, cfg.unet_pooling, cfg.unet_norm)


def build_generator(cfg: TrainConfig, kspace_shape: tuple[int, int] | None = None) -> nn.Module | None:
    """The perturbation generator for ``cfg`` (None unless the adversary is a generator)."""
    kind = cfg.adversary_kind
    if kind == "conditional":  # sees its input: the image (1 channel) or k-space features (3)
        image = cfg.perturbation == "image"
        return ConditionalGenerator(1 if image else 3, 1 if image else 2, cfg.latent_dim, cfg.cond_chans,
                                    max(1, cfg.unet_pools))
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
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of ``module`` get no gradients inside the block (input-only backward)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


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
        self.opt_gen = (torch.optim.AdamW(self.generator.parameters(), lr=cfg.lr_gen, weight_decay=cfg.weight_decay)
                        if self.generator is not None else None)
        self.latent_rng = torch.Generator().manual_seed(cfg.seed + 1)
        self.noise_rng = torch.Generator().manual_seed(cfg.seed + 2)  # adversary='noise'
        self.steps_done = 0  # optimiser steps so far (the schedule's clock; saved with the state)
        self.total_steps: int | None = None  # set by fit() for lr_schedule='cosine'

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
        return kind == "conditional" or (kind == "generator" and (
            self.cfg.perturbation == "image" or self.cfg.kspace_conditioning == "latent"))

    def draw_latent(self, batch_size: int) -> torch.Tensor | None:
        """z ~ N(0, latent_scale^2) ``(B, latent_dim)``, from the run's own generator (resumable)."""
        if self.generator is None or not self.latent_conditioned:
            return None
        z = torch.randn(batch_size, self.cfg.latent_dim, generator=self.latent_rng) * self.cfg.latent_scale
        return z.to(self.runtime.device)

    def perturbation(self, batch: Batch, z: torch.Tensor | None) -> torch.Tensor:
        """``G(z)`` (image: ``(B, 1, h, w)``) or ``G(y)`` / ``G(z)`` (k-space: complex ``(B, H, W)``), fp32,
        restricted to acquired columns and projected onto the epsilon ball when configured."""
        assert self.generator is not None
        cfg = self.cfg
        conditional = cfg.adversary_kind == "conditional"
        with self.runtime.autocast():
            if cfg.perturbation == "image":
                delta = (self.generator(self.runtime.image(batch.image), z) if conditional else self.generator(z)).float()
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
        if cfg.project:
            delta = project_l2(delta, cfg.epsilon, cfg.epsilon_scope)
        return delta

    def output_scale(self, batch: Batch, delta: torch.Tensor) -> torch.Tensor:
        """``gen_scale='budget'``: the factor ``a`` ``(B, 1, ...)`` that maps the generator's tanh output
        (each real component in [-1, 1]) to ``||delta||^2 <= GEN_HEADROOM * epsilon`` when saturated,
        ``a = sqrt(GEN_HEADROOM * epsilon / n)`` with ``n`` the real components it may fill (image:
        ``h * w``; k-space: ``2 * H * acquired columns`` of each slice, or ``2 * H * W``). A DCGAN's
        tanh starts near RMS 0.5, so ``||G(z)||^2`` starts near ``0.25 * 2 = 0.5`` epsilon: inside the
        budget, whatever the crop, instead of tens of times above it (the seed fixes no scale)."""
        b = delta.shape[0]
        if delta.is_complex():
            cols = (batch.mask.to(torch.float32).sum(1) if self.cfg.kspace_sampled_only and batch.mask is not None
                    else torch.full((b,), float(delta.shape[-1])))
            n = 2.0 * delta.shape[-2] * cols.to(delta.device)
        else:
            n = torch.full((b,), float(delta[0].numel()), device=delta.device)
        scale = torch.sqrt(GEN_HEADROOM * self.cfg.epsilon / n.clamp_min(1.0))
        return scale.view(-1, *([1] * (delta.ndim - 1))).to(delta.real.dtype)

    def perturbed_input(self, batch: Batch, delta: torch.Tensor) -> torch.Tensor:
        return apply_perturbation(batch, delta, self.cfg.perturbation, self.cfg.clamp)

    def _loss(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with self.runtime.autocast():
            out = self.recon(self.runtime.image(inputs))
        return self.loss_fn(out.float(), target)

    # -- the named steps ----------------------------------------------------------------------
    def generator_step(self, batch: Batch, z: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One ascent step of phi on ``lambda1 Loss(f(x~ + G), x) - lambda2 hinge``; theta gets no gradient."""
        assert self.generator is not None and self.opt_gen is not None
        cfg = self.cfg
        with frozen(self.recon):
            delta = self.perturbation(batch, z)
            adv = self._loss(self.perturbed_input(batch, delta), batch.target)
            penalty = hinge(delta, cfg.epsilon, cfg.epsilon_scope)
            objective = cfg.lambda1 * adv - cfg.lambda2 * penalty
            self.opt_gen.zero_grad(set_to_none=True)
            (-objective).backward()  # ascent
            self.opt_gen.step()
        return {"gen_objective": objective.detach(), "hinge": penalty.detach(), "adv_loss": adv.detach()}

    def reconstructor_step(self, batch: Batch, delta: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One descent step of theta on ``Loss(f(x~), x) + lambda1 Loss(f(x~ + delta), x)`` (delta fixed);
        with ``delta=None``, standard training on ``Loss(f(x~), x)``."""
        if delta is None:
            total = clean = self._loss(batch.image, batch.target)
            pert = torch.zeros(())
        else:
            n = len(batch)
            inputs = torch.cat([batch.image, self.perturbed_input(batch, delta.detach())])  # (2B, 1, h, w)
            with self.runtime.autocast():
                out = self.recon(self.runtime.image(inputs)).float()
            clean = self.loss_fn(out[:n], batch.target)
            pert = self.loss_fn(out[n:], batch.target)
            total = clean + self.cfg.lambda1 * pert
        self.opt_recon.zero_grad(set_to_none=True)
        total.backward()
        self.opt_recon.step()
        return {"recon_loss": total.detach(), "clean_loss": clean.detach(), "pert_loss": pert.detach()}

    def attack_perturbation(self, batch: Batch) -> torch.Tensor:
        """delta for ``adversary='pgd'``: ``adv_steps`` of L2 PGD at the training budget against the
        current reconstructor (in eval mode, so batch-norm statistics see only the update's batch),
        in the perturbation's domain (Madry et al. 2018)."""
        cfg = self.cfg
        pgd = PGDAttack(cfg.epsilon, cfg.adv_steps, cfg.pgd_step_scale, cfg.perturbation, cfg.kspace_sampled_only,
                        cfg.clamp)
        with eval_mode(self.recon):
            return pgd(self.recon, batch, self.runtime).delta

    def noise_perturbation(self, batch: Batch) -> torch.Tensor:
        """delta for ``adversary='noise'`` (jittering): Gaussian noise from the trainer's own seeded
        generator, per image on the sphere ``||delta||^2 = epsilon`` (``noise_mode='norm'``) or
        i.i.d. with ``sigma^2 = epsilon / n`` over the ``n`` real components it fills (``'sigma'``)."""
        cfg = self.cfg
        if cfg.perturbation == "image":
            delta = torch.randn(batch.image.shape, generator=self.noise_rng).to(batch.image.device)
        else:
            shape = tuple(batch.kspace.shape)  # type: ignore[union-attr]
            delta = torch.complex(torch.randn(shape, generator=self.noise_rng), torch.randn(shape, generator=self.noise_rng))
            delta = restrict(delta.to(batch.image.device), batch, "kspace", cfg.kspace_sampled_only)
        view = (-1, *([1] * (delta.ndim - 1)))
        if cfg.noise_mode == "norm":
            return delta * (cfg.epsilon / squared_norm(delta).clamp_min(1e-30)).sqrt().view(view).to(delta.real.dtype)
        return delta * (self.output_scale(batch, delta) / GEN_HEADROOM**0.5)  # sqrt(eps / n) per real component

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One step of the configured adversarial training on one batch (Algorithm 1 or 2 for the
        generator kinds); returns plain numbers (one device sync)."""
        self._set_learning_rates()
        self.steps_done += 1
        self.recon.train()
        kind = self.cfg.adversary_kind
        if kind in ("pgd", "noise"):
            with torch.no_grad() if kind == "noise" else contextlib.nullcontext():
                delta = self.attack_perturbation(batch) if kind == "pgd" else self.noise_perturbation(batch)
            stats = self.reconstructor_step(batch, delta.detach())
            sq = squared_norm(delta.detach())
            stats["delta_sq"] = sq.mean()
            stats["over_budget"] = (sq > self.cfg.epsilon * (1 + 1e-4)).float().mean()
        elif self.generator is None:
            stats = self.reconstructor_step(batch, None)
        else:
            self.generator.train()
            z = self.draw_latent(len(batch))
            stats = self.generator_step(batch, z)
            with torch.no_grad():
                delta = self.perturbation(batch, z)  # delta_T = G_T(z_T): the updated generator
            stats |= self.reconstructor_step(batch, delta)
            sq = squared_norm(delta)
            stats["delta_sq"] = sq.mean()
            stats["over_budget"] = (sq > self.cfg.epsilon).float().mean()  # share of images outside the ball
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
        """The generator's raw perturbation for a batch, in eval mode (for :class:`GeneratorAttack`)."""
        assert self.generator is not None
        was = self.generator.training
        self.generator.eval()
        try:
            z = None
            if self.latent_conditioned:  # fixed latent per evaluation: comparable across epochs
                g = torch.Generator().manual_seed(12345)
                z = (torch.randn(len(batch), self.cfg.latent_dim, generator=g) * self.cfg.latent_scale).to(self.runtime.device)
            with torch.no_grad():
                return self.perturbation(batch, z)
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
                    out.append(PGDAttack(budget, cfg.pgd_steps, cfg.pgd_step_scale, "kspace", cfg.kspace_sampled_only,
                                         cfg.clamp))
                elif name == "noise":
                    out.append(NoiseAttack(budget))
                elif name == "generator" and self.generator is not None:
                    out.append(GeneratorAttack(budget, self.generator_perturb, cfg.perturbation, cfg.clamp))
        return out

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "recon": self.recon.state_dict(),
            "generator": self.generator.state_dict() if self.generator is not None else None,
            "opt_recon": self.opt_recon.state_dict(),
            "opt_gen": self.opt_gen.state_dict() if self.opt_gen is not None else None,
            "latent_rng": self.latent_rng.get_state(),
            "noise_rng": self.noise_rng.get_state(),
            "steps_done": self.steps_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recon.load_state_dict(state["recon"])
        self.opt_recon.load_state_dict(state["opt_recon"])
        if self.generator is not None:
            self.generator.load_state_dict(state["generator"])
            self.opt_gen.load_state_dict(state["opt_gen"])  # type: ignore[union-attr]
        self.latent_rng.set_state(state["latent_rng"])
        self.steps_done = int(state.get("steps_done", 0))
        if "noise_rng" in state:
            self.noise_rng.set_state(state["noise_rng"])

    def networks(self) -> dict[str, Any]:
        """Copies of the two networks' weights (what ``best.pt`` holds)."""
        clone = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}  # noqa: E731
        return {"recon": clone(self.recon), "generator": clone(self.generator) if self.generator else None}

    def load_networks(self, nets: dict[str, Any]) -> None:
        self.recon.load_state_dict(nets["recon"])
        if self.generator is not None and nets.get("generator") is not None:
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


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
@dataclass
class Data:
    """The datasets of a run; loaders are made per epoch so that order depends only on (seed, epoch).

    ``val`` is the *selection* split (early stopping, ``best.pt``, the search); ``robust_val`` its
    fixed subset that the per-epoch attacks use; ``report`` the held-out split (``report_split``:
    ``'test'`` for a ``singlecoil_test/`` with targets, ``'report'`` for the validation volumes held
    out by name, ``'selection'`` when nothing is held out) that the best epoch is reported on."""

    train: SliceDataset
    val: SliceDataset
    train_eval: SliceDataset | None
    batch_size: int
    num_workers: int
    pin_memory: bool
    bucketed: bool
    seed: int
    report: SliceDataset | None = None
    report_split: str = "selection"
    robust_val: SliceDataset | None = None

    def loader(self, dataset: SliceDataset, shuffle: bool, epoch: int = 0) -> torch.utils.data.DataLoader:
        dataset.set_epoch(epoch)
        common = dict(num_workers=self.num_workers, pin_memory=self.pin_memory, collate_fn=collate)
        if self.bucketed:
            sampler = ShapeBucketSampler(dataset.kspace_shapes(), self.batch_size, shuffle, self.seed)
            sampler.set_epoch(epoch)
            return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **common)
        gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=gen,
                                           **common)

    def kspace_shape(self) -> tuple[int, int] | None:
        report = self.report.volumes if self.report is not None else []
        shapes = {v.kspace_shape for v in self.train.volumes + self.val.volumes + report}
        return next(iter(shapes)) if len(shapes) == 1 else None


def build_data(cfg: TrainConfig, runtime: Runtime, training: bool = True) -> Data:
    """The datasets and loader settings of ``cfg``.

    ``training=True`` (fit) refuses a folder whose two splits resolve to the same files (a flat folder
    of .h5 files), which would validate on the training volumes; ``training=False`` (assessing a saved
    model) accepts it, since only the validation split is used.
    """
    if cfg.data is None:
        raise ConfigError("config key 'data' is None: give a data folder (or use a profile's synthetic data)")
    root = Path(cfg.data)
    if training and resolve_split_dir(root, "train").resolve() == resolve_split_dir(root, "val").resolve():
        raise ConfigError(f"config key 'data': {root} has no sub-folders {SPLITS['train']}/ and {SPLITS['val']}/, "
                          "so training would validate on its training volumes; training needs both sub-folders")
    mask_func = make_mask_func(cfg.mask_type, cfg.center_fraction, cfg.acceleration)
    keep_k = (cfg.perturbation == "kspace" or "pgd_kspace" in cfg.attacks
              or (cfg.report_protocol is not None and get_protocol(cfg.report_protocol).needs_kspace))
    train_tf = UnetTransform(mask_func, cfg.crop_size, train=True, seed=cfg.seed, clamp=cfg.clamp, keep_kspace=keep_k)
    fixed_tf = UnetTransform(mask_func, cfg.crop_size, train=False, seed=cfg.seed, clamp=cfg.clamp, keep_kspace=keep_k)
    common = dict(target_key=cfg.target_key, crop_size=cfg.crop_size, seed=cfg.seed, cache_dir=cfg.cache_dir)
    train = SliceDataset(root, "train", train_tf, volume_fraction=cfg.train_fraction,
                         max_volumes=cfg.max_train_volumes, **common)
    val = SliceDataset(root, "val", fixed_tf, volume_fraction=cfg.val_fraction, max_volumes=cfg.max_val_volumes,
                       **common)
    report, report_split = None, "selection"
    if (root / SPLITS["test"]).is_dir():  # a test split with targets is the report split
        test = SliceDataset(root, "test", fixed_tf, **common)
        if all(v.target_shape is not None for v in test.volumes):
            report, report_split = test, "test"
    if report is None and cfg.report_fraction > 0:
        try:
            selection, held_out = split_for_report(val.volumes, cfg.report_fraction)
        except ValueError as exc:
            raise ConfigError(f"config key 'report_fraction' = {cfg.report_fraction}: {val.folder}: {exc}") from None
        val, report, report_split = val.restricted(selection, fixed_tf), val.restricted(held_out, fixed_tf), "report"
    robust_val = val.with_slices(seeded_slices(val.volumes, cfg.robust_slices_per_volume, cfg.seed))
    train_eval = train.restricted(train.volumes[: cfg.train_eval_volumes], fixed_tf) if cfg.train_eval_volumes else None
    workers = cfg.num_workers
    if workers is None:
        workers = min(8, len(os.sched_getaffinity(0))) if runtime.is_cuda else 0
    return Data(train, val, train_eval, cfg.batch_size, workers, runtime.is_cuda, keep_k, cfg.seed,
                report=report, report_split=report_split, robust_val=robust_val)


# ---------------------------------------------------------------------------------------------
# records, checkpoints, fit
# ---------------------------------------------------------------------------------------------
def robust_key(attack: str, budget_ref: float, metric: str) -> str:
    """Flat metric name, e.g. ``rob_pgd_e5000_nmse``: keyed by the 320x320-equivalent budget, so the
    same study space gives the same names on every profile."""
    return f"rob_{attack}_e{budget_ref:g}_{metric}".replace(".", "p").replace("+", "")


ROBUST_METRICS = ("nmse", "psnr", "ssim", "d_nmse", "d_psnr", "d_ssim")


def _robust_flat(prefix: str, rows: list[dict[str, Any]]) -> dict[str, float]:
    """``{prefix}rob_<attack>_e<budget>_<metric>`` for each row, with the standard errors beside;
    rows of a named protocol: ``{prefix}<protocol>_<attack>_r<relative budget>_<metric>``."""
    out: dict[str, float] = {}
    for row in rows:
        protocol, rel = row.get("protocol") or "", row.get("rel")
        for m in (*ROBUST_METRICS, "nmse_se", "d_nmse_se"):
            if m not in row:
                continue
            if protocol:
                budget = f"r{rel:g}" if rel is not None and math.isfinite(rel) else f"e{row['budget_ref']:g}"
                key = f"{protocol}_{row['attack']}_{budget}_{m}".replace(".", "p").replace("-", "_")
            else:
                key = robust_key(row["attack"], row["budget_ref"], m)
            out[prefix + key] = row[m]
    return out


def _instability_flat(rep: dict[str, Any]) -> dict[str, float]:
    """Flat keys of the held-out instability results: ``report_feature_<random|worst>_<stat>`` (and
    ``zf_report_...`` for the zero-filled input), ``report_sampling_r<R>_<metric>`` per acceleration
    and ``report_sampling_stagnant``, the number of steps to more samples that did not help."""
    out: dict[str, float] = {}
    feats = rep.get("features")
    if feats:
        for where, prefix in (("random", "report_"), ("worst", "report_"), ("zero_filled_random", "zf_report_"),
                              ("zero_filled_worst", "zf_report_")):
            kind = where.removeprefix("zero_filled_")
            for stat in ("fnr", "fnr_se", "error", "error_se", "contrast", "contrast_se"):
                out[f"{prefix}feature_{kind}_{stat}"] = feats[where][stat]
    rows = rep.get("sampling") or []
    for row in rows:
        r = f"{row['acceleration']:g}".replace(".", "p")
        for m in ("nmse", "nmse_se", "psnr", "ssim"):
            out[f"report_sampling_r{r}_{m}"] = row[m]
        out[f"zf_report_sampling_r{r}_nmse"] = row["zf_nmse"]
    if rows:
        out["report_sampling_stagnant"] = float(sum(bool(row["stagnant"]) for row in rows[1:]))
    return out


@dataclass
class EpochRecord:
    """Everything known after one epoch, as plain numbers (``robustness`` holds one row per attack
    and budget, measured on the fixed subset of selection slices). :meth:`flat` gives the scalar dict
    that a study forwards to its tuner.

    ``val_*`` are on the *selection* split (what early stopping and ``best.pt`` choose by). On the
    run's last epoch ``report`` holds the held-out evaluation of the best epoch's networks: clean and
    under every attack on every report-split slice, and the zero-filled input's own metrics beside
    them (see :func:`report_evaluation`)."""

    epoch: int  # 1-based: epochs completed
    status: str
    epsilon: float
    epsilon_rms: float
    epsilon_ref: float  # the same per-pixel RMS expressed at 320x320 (the seed's units)
    train_loss: float  # reconstructor objective (clean + lambda1 * perturbed)
    train_clean_loss: float
    train_pert_loss: float
    gen_objective: float
    hinge: float
    delta_sq: float  # mean ||G(z)||^2 seen in training
    steps: int
    val_loss: float
    val_nmse: float
    val_psnr: float
    val_ssim: float
    val_seed_nmse: float
    val_seed_psnr: float
    val_seed_ssim: float
    train_nmse: float
    train_psnr: float
    train_ssim: float
    train_seed_nmse: float
    train_seed_psnr: float
    train_seed_ssim: float
    best_epoch: int
    best_val_loss: float
    is_best: bool
    train_time_s: float
    eval_time_s: float
    robust_time_s: float
    epoch_time_s: float
    slices_per_s: float
    robustness: list[dict[str, Any]] = field(default_factory=list)
    over_budget: float = float("nan")  # share of training images with ||delta||^2 > epsilon
    lr_factor: float = 1.0  # the schedule's learning-rate multiplier at the epoch's end
    val_nmse_se: float = float("nan")
    val_psnr_se: float = float("nan")
    val_ssim_se: float = float("nan")
    report_time_s: float = 0.0
    message: str = ""
    report: dict[str, Any] | None = None
    feature_fnr: float = float("nan")  # small-feature false-negative rate on the attacked selection subset
    feature_error: float = float("nan")  # ... and the features' mean relative recovery error

    def flat(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("robustness", "status", "report")}
        out["epoch_status"] = self.status  # 'running' | 'completed' | 'early_stopped' | 'nan' after this epoch
        out.update(_robust_flat("", self.robustness))
        if self.report is not None:
            rep = self.report
            out.update(report_split=rep["split"], report_epoch=rep["epoch"], report_volumes=rep["clean"]["num_volumes"])
            for m in ("nmse", "psnr", "ssim", "nmse_se", "psnr_se", "ssim_se"):
                out[f"report_{m}"] = rep["clean"][m]
                out[f"zf_report_{m}"] = rep["zero_filled"][m]
            out.update(_robust_flat("report_", rep["robustness"]))
            out.update(_robust_flat("zf_report_", rep["zero_filled_robustness"]))
            out.update(_instability_flat(rep))
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EpochRecord":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def stopped(cls, epoch: int, cfg: TrainConfig, message: str, best_epoch: int, best_val_loss: float,
                **known: Any) -> "EpochRecord":
        """The record of an epoch that ended in a non-finite loss: status ``nan``, unknown values NaN."""
        nan = float("nan")
        values: dict[str, Any] = {f.name: nan for f in fields(cls) if f.type in ("float", float)}
        values.update(epoch=epoch, status="nan", epsilon=cfg.epsilon, epsilon_rms=cfg.epsilon_rms,
                      epsilon_ref=to_reference(cfg.epsilon, cfg.crop_size), steps=0, best_epoch=best_epoch,
                      best_val_loss=best_val_loss, is_best=False, message=message, robustness=[], report=None)
        values.update(known)
        return cls(**values)


@dataclass
class FitResult:
    status: str  # 'completed' | 'early_stopped' | 'nan'
    message: str
    history: list[EpochRecord]
    best_epoch: int
    checkpoint: Path | None
    best_checkpoint: Path | None


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically (temporary file, then rename): a kill never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`fit` (plain tensors and containers: ``weights_only=True``)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an mriadv checkpoint of format {CHECKPOINT_FORMAT} (format "
                         f"{payload.get('format')!r}; format 1 checkpoints hold the older U-Net layout: retrain)")
    return payload


def _check_resume_config(saved: dict[str, Any], cfg: TrainConfig) -> None:
    now = cfg.to_dict()
    diffs = sorted(k for k in now if k not in RESUMABLE_CHANGES and _norm(saved.get(k)) != _norm(now[k]))
    if diffs:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diffs)
        raise ConfigError(f"cannot resume: the checkpoint was trained with a different config ({details})")


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def _mean(sums: dict[str, float], key: str, n: int) -> float:
    return sums.get(key, 0.0) / n if n else float("nan")


def _rows(rows: list[RobustRow], crop_size: int, volumes: bool = False) -> list[dict[str, Any]]:
    """Rows as plain dicts with the budget in 320x320 units; per-volume NMSE (a JSON string, for
    paired comparisons) only where asked (the report split)."""
    out = []
    for r in rows:
        row = {**r.as_dict(), "budget_ref": to_reference(r.budget, crop_size)}
        row["volume_nmse"] = json.dumps(row["volume_nmse"]) if volumes else ""
        out.append(row)
    return out


def _clean(res: Any) -> dict[str, Any]:
    return {**res.as_dict(), "volume_nmse": json.dumps(res.volume_nmse)}


def report_evaluation(trainer: Trainer, data: Data, runtime: Runtime) -> dict[str, Any]:
    """The held-out evaluation of the networks the trainer holds (``fit`` passes the best epoch's):
    clean and every configured attack on every slice of the report split, and the same for the
    zero-filled input itself (an identity "reconstructor"), so that a report shows what the network
    adds and what an attack takes away. Per-volume NMSE is kept for paired comparisons."""
    cfg = trainer.cfg
    dataset = data.report if data.report is not None else data.val
    loader = data.loader(dataset, shuffle=False)
    clean = evaluate(trainer.recon, loader, trainer.loss_fn, runtime, clamp=cfg.clamp)
    identity = nn.Identity()
    zf = evaluate(identity, loader, trainer.loss_fn, runtime, clamp=cfg.clamp)
    groups = [("", trainer.attacks())]
    if cfg.report_protocol is not None:  # a published protocol beside the study's own attacks
        protocol = get_protocol(cfg.report_protocol)
        groups.append((protocol.name, protocol.build(
            cfg.crop_size, cfg.clamp, cfg.kspace_sampled_only, trainer.generator_perturb if trainer.generator else None,
            cfg.perturbation, trace=False)))
    rows: list[dict[str, Any]] = []
    zf_rows: list[dict[str, Any]] = []
    for name, attacks in groups:
        found = robustness(trainer.recon, loader, trainer.loss_fn, runtime, attacks, clean, cfg.clamp)
        rows += [{**r, "protocol": name} for r in _rows(found, cfg.crop_size, True)]
        zf_attacks = [a for a in attacks if a.name != "generator"]
        found = robustness(identity, loader, trainer.loss_fn, runtime, zf_attacks, zf, cfg.clamp)
        zf_rows += [{**r, "protocol": name} for r in _rows(found, cfg.crop_size, True)]
    out = {"split": data.report_split, "clean": _clean(clean), "robustness": rows, "zero_filled": _clean(zf),
           "zero_filled_robustness": zf_rows}
    if cfg.instabilities:  # the seed's types 2 and 3, on the same held-out slices
        out["features"] = _features(trainer, dataset, runtime)
        sweep = sampling_sweep(trainer.recon, dataset, runtime, SWEEP_ACCELERATIONS, cfg.center_fraction,
                               batch_size=cfg.batch_size, loss_fn=trainer.loss_fn)
        out["sampling"] = [{k: v for k, v in row.as_dict().items() if k != "volume_nmse"} for row in sweep]
    return out


def _features(trainer: Trainer, dataset: SliceDataset, runtime: Runtime) -> dict[str, Any] | None:
    """Small-feature recovery (:func:`mriadv.instabilities.feature_recovery`, default feature and
    search) as a plain dict, or None where no slice has tissue to put a feature in."""
    try:
        result = feature_recovery(trainer.recon, dataset, runtime, FeatureSpec(), FeatureSearch())
    except NoTissue:
        return None
    out = result.as_dict()
    for key in ("random", "worst", "zero_filled_random", "zero_filled_worst"):
        out[key].pop("volume_fnr", None)
    return out


def fit(
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    on_epoch: Callable[[EpochRecord, Path | None], None] | None = None,
    resume_from: str | Path | None = None,
    log: Callable[[str], None] | None = print,
) -> FitResult:
    """Train one model with Algorithm 1/2 and return its history.

    Each epoch: train; evaluate the selection split (early stopping and ``best.pt`` choose by its
    loss); attack a fixed subset of selection slices (every ``robust_every`` epochs, at every new
    best and at the last epoch). At the last epoch the best epoch's networks are evaluated on the
    held-out report split (:func:`report_evaluation`). A non-finite training or validation loss ends
    the run with status ``nan``, written to the checkpoint and reported as a last record.

    Args:
        cfg: the run's config (``cfg.data`` must point at a data root).
        out_dir: where ``checkpoint.pt`` (every epoch, everything needed to resume) and ``best.pt``
            (networks of the best selection epoch) are written; None: no files.
        on_epoch: called after each epoch with its record and the checkpoint path.
        resume_from: a checkpoint file or folder; training continues after its last epoch, and on
            CPU reproduces the uninterrupted run exactly.
        log: progress lines (None: silent).
    """
    cfg = cfg.validate()
    runtime = Runtime.resolve(cfg.device, cfg.precision, cfg.threads)
    say = log or (lambda _msg: None)
    seed_everything(cfg.seed)
    data = build_data(cfg, runtime)
    trainer = Trainer(cfg, runtime, kspace_shape=data.kspace_shape())
    steps_per_epoch = len(data.loader(data.train, shuffle=True))
    if cfg.max_train_batches is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_train_batches)
    trainer.total_steps = steps_per_epoch * cfg.max_epochs
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT_NAME if out else None
    best_path = out / BEST_NAME if out else None

    history: list[EpochRecord] = []
    best_loss, best_epoch, bad_epochs, start = math.inf, 0, 0, 0
    best_nets: dict[str, Any] | None = None
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        _check_resume_config(state["config"], cfg)
        trainer.load_state_dict(state["trainer"])
        history = [EpochRecord.from_dict(r) for r in state["history"]]
        es = state["early_stopping"]
        best_loss, best_epoch, bad_epochs = es["best_loss"], es["best_epoch"], es["bad_epochs"]
        best_nets = state.get("best")
        start = state["epoch"]
        torch.set_rng_state(state["torch_rng"])
        if state["status"] in ("early_stopped", "nan"):
            say(f"checkpoint is final ({state['status']}); nothing to resume")
            return FitResult(state["status"], "resumed a finished run", history, best_epoch, ckpt_path, best_path)
        say(f"resuming after epoch {start}")

    def save(record: EpochRecord, epoch: int) -> None:
        if out is None:
            return
        if record.is_best:
            save_checkpoint(best_path, {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "epoch": epoch,
                                        **(best_nets or {})})
        save_checkpoint(ckpt_path, {
            "format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "epoch": epoch, "status": record.status,
            "trainer": trainer.state_dict(), "torch_rng": torch.get_rng_state(),
            "early_stopping": {"best_loss": best_loss, "best_epoch": best_epoch, "bad_epochs": bad_epochs},
            "best": best_nets, "history": [asdict(r) for r in history],
        })

    def stop_on_nan(epoch: int, message: str, **known: Any) -> FitResult:
        say(f"stopped: {message}")
        record = EpochRecord.stopped(epoch, cfg, message, best_epoch, best_loss, **known)
        history.append(record)
        save(record, epoch)
        if on_epoch is not None:
            on_epoch(record, ckpt_path)
        return FitResult("nan", message, history, best_epoch, ckpt_path, best_path)

    status, message = "completed", f"ran {cfg.max_epochs} epochs"
    for epoch in range(start, cfg.max_epochs):
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        steps = slices = 0
        try:
            for i, batch in enumerate(data.loader(data.train, shuffle=True, epoch=epoch)):
                if cfg.max_train_batches is not None and i >= cfg.max_train_batches:
                    break
                for k, v in trainer.train_step(batch.to(runtime.device, non_blocking=True)).items():
                    sums[k] = sums.get(k, 0.0) + v
                steps += 1
                slices += len(batch)
        except NonFiniteLoss as exc:
            return stop_on_nan(epoch + 1, f"epoch {epoch + 1}, step {steps + 1}: {exc}; training stopped",
                               steps=steps)
        t_train = time.perf_counter() - t0

        t1 = time.perf_counter()
        val = evaluate(trainer.recon, data.loader(data.val, shuffle=False), trainer.loss_fn, runtime, clamp=cfg.clamp)
        if not math.isfinite(val.loss):
            return stop_on_nan(epoch + 1, f"epoch {epoch + 1}: validation loss is {val.loss}; training stopped",
                               steps=steps, train_loss=_mean(sums, "recon_loss", steps), val_loss=val.loss,
                               val_nmse=val.nmse, val_psnr=val.psnr, val_ssim=val.ssim)
        tr = (evaluate(trainer.recon, data.loader(data.train_eval, shuffle=False), trainer.loss_fn, runtime,
                       clamp=cfg.clamp) if data.train_eval is not None else None)
        t_eval = time.perf_counter() - t1

        improved = val.loss < best_loss
        if improved:
            best_loss, best_epoch, bad_epochs = val.loss, epoch + 1, 0
            best_nets = trainer.networks()
        else:
            bad_epochs += 1
        stopping = bad_epochs >= cfg.patience
        last = stopping or epoch + 1 == cfg.max_epochs

        t2 = time.perf_counter()
        rows: list[RobustRow] = []
        feats = None
        if (epoch + 1) % cfg.robust_every == 0 or improved or last:
            robust_loader = data.loader(data.robust_val or data.val, shuffle=False)
            robust_clean = evaluate(trainer.recon, robust_loader, trainer.loss_fn, runtime, clamp=cfg.clamp)
            rows = robustness(trainer.recon, robust_loader, trainer.loss_fn, runtime, trainer.attacks(), robust_clean,
                              cfg.clamp)
            feats = _features(trainer, data.robust_val or data.val, runtime) if cfg.instabilities else None
        t_rob = time.perf_counter() - t2

        t3 = time.perf_counter()
        report = None
        if last and best_nets is not None:
            with trainer.using(best_nets):
                report = {**report_evaluation(trainer, data, runtime), "epoch": best_epoch}
        t_report = time.perf_counter() - t3

        record = EpochRecord(
            epoch=epoch + 1, status="early_stopped" if stopping else ("completed" if last else "running"),
            epsilon=cfg.epsilon, epsilon_rms=cfg.epsilon_rms,
            epsilon_ref=to_reference(cfg.epsilon, cfg.crop_size),
            train_loss=_mean(sums, "recon_loss", steps), train_clean_loss=_mean(sums, "clean_loss", steps),
            train_pert_loss=_mean(sums, "pert_loss", steps), gen_objective=_mean(sums, "gen_objective", steps),
            hinge=_mean(sums, "hinge", steps), delta_sq=_mean(sums, "delta_sq", steps), steps=steps,
            val_loss=val.loss, val_nmse=val.nmse, val_psnr=val.psnr, val_ssim=val.ssim,
            val_seed_nmse=val.seed_nmse, val_seed_psnr=val.seed_psnr, val_seed_ssim=val.seed_ssim,
            train_nmse=tr.nmse if tr else float("nan"), train_psnr=tr.psnr if tr else float("nan"),
            train_ssim=tr.ssim if tr else float("nan"), train_seed_nmse=tr.seed_nmse if tr else float("nan"),
            train_seed_psnr=tr.seed_psnr if tr else float("nan"), train_seed_ssim=tr.seed_ssim if tr else float("nan"),
            best_epoch=best_epoch, best_val_loss=best_loss, is_best=improved,
            train_time_s=t_train, eval_time_s=t_eval, robust_time_s=t_rob,
            epoch_time_s=time.perf_counter() - t0, slices_per_s=slices / t_train if t_train > 0 else float("nan"),
            robustness=_rows(rows, cfg.crop_size),
            over_budget=_mean(sums, "over_budget", steps) if cfg.adversarial else float("nan"),
            lr_factor=trainer.lr_factor(), val_nmse_se=val.nmse_se, val_psnr_se=val.psnr_se, val_ssim_se=val.ssim_se,
            report_time_s=t_report, report=report,
            feature_fnr=feats["random"]["fnr"] if feats else float("nan"),
            feature_error=feats["random"]["error"] if feats else float("nan"),
        )
        history.append(record)
        if out is not None:
            write_preview(out / PREVIEW_NAME, trainer, data, runtime)
        save(record, epoch + 1)
        say(_progress_line(record))
        if on_epoch is not None:
            on_epoch(record, ckpt_path)
        if stopping:
            status = "early_stopped"
            message = f"no validation improvement for {cfg.patience} epochs (best epoch {best_epoch})"
            break
    return FitResult(status, message, history, best_epoch, ckpt_path, best_path)


def preview_batch(dataset: SliceDataset, count: int = 2) -> Batch:
    """A fixed batch for previews: the middle slice of the first ``count`` volumes that share the
    first volume's k-space shape (real fastMRI widths differ: 368, 372, ..., and batches that carry
    k-space cannot mix them)."""
    starts, i = [], 0
    shape = dataset.volumes[0].kspace_shape
    for v in dataset.volumes:
        if v.kspace_shape == shape:
            starts.append(i + v.num_slices // 2)
        i += v.num_slices
    return collate([dataset[j] for j in starts[:count]])


def write_preview(path: Path, trainer: Trainer, data: Data, runtime: Runtime) -> None:
    """``preview.npz``: clean input/target/reconstruction of two validation slices, and the same under
    PGD at the largest attack budget and under the trained generator (see :func:`evaluate.preview`).
    Both networks run in eval mode: a training-mode forward would update batch-norm statistics with
    validation slices and the saved model would differ from the evaluated one."""
    cfg = trainer.cfg
    batch = preview_batch(data.val).to(runtime.device)
    perturbed = {}
    with eval_mode(trainer.recon, trainer.generator):
        if cfg.attack_budgets:
            pgd = PGDAttack(max(cfg.attack_budgets), cfg.pgd_steps, cfg.pgd_step_scale, "image", clamp=cfg.clamp)
            perturbed["pgd"] = pgd(trainer.recon, batch, runtime).inputs
        if trainer.generator is not None:
            perturbed["generator"] = trainer.perturbed_input(batch, trainer.generator_perturb(batch))
        arrays = preview(trainer.recon, batch, runtime, perturbed)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, **{k: v.astype(np.float16) for k, v in arrays.items()})
    os.replace(tmp, path)


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


def _progress_line(r: EpochRecord) -> str:
    pgd = [row for row in r.robustness if row["attack"] == "pgd"]
    rob = " ".join(f"pgd@{row['budget']:g}: nmse {row['nmse']:.4f}" for row in pgd)
    return (f"epoch {r.epoch}: loss {r.train_loss:.4f} |delta|^2 {r.delta_sq:.1f} | val nmse {r.val_nmse:.4f} "
            f"psnr {r.val_psnr:.2f} ssim {r.val_ssim:.4f} {rob} | {r.epoch_time_s:.0f}s"
            + (" *" if r.is_best else ""))
