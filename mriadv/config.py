"""The typed configuration of one training run, and the run profiles.

Every default is written once, here. :meth:`TrainConfig.from_dict` rejects unknown keys and
:meth:`TrainConfig.validate` out-of-range values, each with a message naming the key, so a
hyperparameter that a study searches provably reaches the trainer.

Perturbation budgets. ``epsilon`` and ``attack_budgets`` are squared L2 norms of the perturbation
of one image, in normalised (z-scored) image units at the run's crop size (the seed: 1e3 and 5e3
at 320x320). The same epsilon is a larger per-pixel perturbation on a smaller crop, so records
carry the per-pixel RMS budget ``sqrt(epsilon / (H W))`` beside it, and :mod:`mriadv.units`
converts the seed's 320x320 budgets to another crop at equal per-pixel RMS.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

# budgets_at_crop and to_reference: re-exported for study/run.py, which imports them from here
from mriadv import choices as allowed  # torch-free: the same tuples the models and data import
from mriadv.config_checks import (
    KSPACE_INSTEAD,
    UNROLLED,
    ConfigError,
    as_tuple,
    check_numbers,
    need,
    refuse_image_attacks,
)
from mriadv.units import REFERENCE_CROP, budgets_at_crop, epsilon_rms, scale_epsilon, to_reference

ATTACKS = ("pgd", "noise", "generator", "pgd_kspace")
# What produces the training perturbation delta (epsilon > 0): the seed's generator game G(z) (or G(y)
# in k-space), k-step PGD at the budget (Madry et al. 2018), Gaussian noise at the budget
# ("jittering", Krainovic et al. 2023), a generator that sees its input G(x, z) / G(y, z), TRADES (Zhang
# et al. 2019: PGD on the deviation f(x~ + delta) - f(x~), mriadv.adversaries), randomised smoothing (RS-E2E:
# trained on Gaussian noise only, predicting by the mean of smooth_samples noisy passes), or none.
ADVERSARIES = ("none", "generator", "pgd", "noise", "conditional", "trades", "smoothing")

# the named options and their allowed values (each tuple written once, in mriadv.choices)
CHOICES: dict[str, tuple[str, ...]] = {
    "arch": allowed.ARCHS,
    "loss": allowed.LOSSES,
    "epsilon_scope": allowed.EPSILON_SCOPES,
    "perturbation": allowed.DOMAINS,
    "kspace_conditioning": allowed.KSPACE_CONDITIONINGS,
    "unet_activation": allowed.ACTIVATIONS,
    "unet_pooling": allowed.POOLINGS,
    "unet_norm": allowed.NORMS,
    "mask_type": allowed.MASK_TYPES,
    "augment": allowed.AUGMENTATIONS,
    "target_key": allowed.TARGET_KEYS,
    "precision": allowed.PRECISIONS,
    "gen_scale": allowed.GEN_SCALES,
    "lr_schedule": allowed.LR_SCHEDULES,
    "adversary": ADVERSARIES,
    "noise_mode": allowed.NOISE_MODES,
}


@dataclass(frozen=True)
class TrainConfig:
    """One training run of the seed's Algorithm 1 (image) or Algorithm 2 (k-space).

    Defaults are the seed's report (Huang & Liang, Sec. 2-3): DSSIM loss, lambda1 = 1,
    lambda2 = 1 (its alpha2 = -1 inside the maximisation), AdamW with lr 1e-4 and weight decay 0.01
    for both nets, batch 8, at most 5 epochs, patience 3, latent dim 100, U-Net 64/5/PReLU/avg/
    instance norm, 320x320 crops, 4x random mask with 8% centre.
    """

    # --- objective -------------------------------------------------------------------------
    loss: str = "dssim"  # 'mse' | 'dssim'
    dssim_data_range: float | None = None  # None: from the target; 1.0: the seed's code's constants
    epsilon: float = 1e3  # squared-L2 budget per image; 0 = standard training (no adversary)
    adversary: str = "generator"  # what makes delta in training: see ADVERSARIES
    adv_steps: int = 3  # adversary='pgd' or 'trades': L2 PGD steps per training batch (Madry et al.)
    noise_mode: str = "norm"  # adversary='noise': 'norm' (||delta||^2 = eps) | 'sigma' (iid, E||delta||^2 = eps)
    lambda1: float = 1.0  # weight of the perturbed term; adversary='trades': TRADES's beta on the deviation
    smooth_samples: int = 8  # adversary='smoothing': N noisy passes whose mean is every evaluation's prediction
    lambda2: float = 1.0  # weight of the hinge penalty max(0, ||G(z)||^2 - epsilon)
    epsilon_scope: str = "image"  # 'image' (report) | 'batch' (seed code: ||batch||^2 vs B * epsilon)
    project: bool = False  # hard projection of G(z) onto the epsilon ball
    gen_scale: str = "budget"  # 'budget': tanh output times sqrt(2 eps / n) (starts inside eps) | 'unit': raw tanh
    perturbation: str = "image"  # 'image' (Algorithm 1) | 'kspace' (Algorithm 2)
    kspace_conditioning: str = "measurements"  # 'measurements' G(y) | 'latent' G(z), k-space only
    kspace_sampled_only: bool = True  # k-space perturbation only on acquired columns
    latent_dim: int = 100
    latent_scale: float = 1.0  # z ~ N(0, latent_scale^2); the seed's code used 1e-3
    # --- optimisation ----------------------------------------------------------------------
    lr_recon: float = 1e-4
    lr_gen: float = 1e-4
    weight_decay: float = 0.01
    lr_schedule: str = "constant"  # 'constant' (seed) | 'cosine': both learning rates decay to 0 over max_epochs
    batch_size: int = 8
    max_epochs: int = 5
    patience: int = 3  # stop after this many epochs without validation-loss improvement
    # optimiser steps per epoch: a smaller training set is cycled, a larger one sampled (each pass a new
    # order and new masks), so a profile gives the same number of updates on any folder; None: one pass
    steps_per_epoch: int | None = None
    max_train_batches: int | None = None  # cap per epoch (smoke runs)
    # --- models ----------------------------------------------------------------------------
    arch: str = "unet"  # 'unet' on the zero-filled image | 'unrolled': cascades with data consistency (unroll_*)
    unet_chans: int = 64
    unet_pools: int = 5
    unet_activation: str = "prelu"
    unet_pooling: str = "avg"
    unet_norm: str = "instance"
    residual: bool = False  # the U-Net predicts a correction to its input: x~ + f(x~) (starts at the zero-filled image)
    gen_chans: int = 64
    cond_chans: int = 32  # first-level width of the conditional generator's U-Net (half the reconstructor's)
    # arch='unrolled' (mriadv.models.unrolled): K cascades of a U-Net denoiser on the complex image (its
    # activation, pooling and norm: unet_*), each followed by data consistency with a learnt lambda >= 0
    unroll_cascades: int = 4
    unroll_chans: int = 8
    unroll_pools: int = 2
    unroll_share: bool = False  # one denoiser for every cascade
    # SMUG's smoothing inside the unroll (mriadv.models.unrolled): each denoiser step is the mean of N passes
    # on its input plus complex Gaussian noise of this sigma (normalised units: the zero-filled std is 1)
    unroll_smooth_samples: int = 0  # N; 0: no smoothing
    unroll_smooth_sigma: float = 0.0
    # --- data ------------------------------------------------------------------------------
    data: str | None = None  # root with singlecoil_train/ and singlecoil_val/
    crop_size: int = REFERENCE_CROP  # the seed's 320x320 crops
    mask_type: str = "random"
    # training slices: 'flip' flips the fully sampled image at random along each axis; 'auto': flips only
    # when an epoch's steps cycle the training set more than once (a small folder), so one pass is unchanged
    augment: str = "auto"
    center_fraction: float = 0.08
    acceleration: float = 4.0
    target_key: str = "reconstruction_esc"
    clamp: float | None = 6.0
    train_fraction: float = 1.0  # fraction of training volumes (seeded)
    val_fraction: float = 1.0
    max_train_volumes: int | None = None
    max_val_volumes: int | None = None
    train_eval_volumes: int = 8  # training volumes evaluated each epoch with fixed masks (Table 1)
    report_fraction: float = 0.5  # validation volumes held out for reporting (mriadv.data.split); 0: none
    num_workers: int | None = None  # data loader workers; None: auto (0 on CPU)
    cache_dir: str | None = None  # where the volume index is cached
    # --- robustness evaluation -------------------------------------------------------------
    attack_budgets: tuple[float, ...] = (1e3, 5e3)  # squared-L2 budgets, same units as epsilon
    attacks: tuple[str, ...] = ("pgd", "noise", "generator")  # + 'pgd_kspace'
    pgd_steps: int = 10
    pgd_step_scale: float = 2.5  # step = scale * radius / steps (Madry et al.)
    robust_every: int = 1  # evaluate attacks every n epochs (and at every new best and the last epoch)
    robust_slices_per_volume: int = 2  # per-epoch attacks on this many seeded slices per selection volume; 0: all
    report_protocol: str | None = None  # a named protocol (mriadv.protocols) added to the held-out evaluation
    instabilities: bool = True  # small-feature recovery each epoch and held out, and the held-out sampling sweep
    # --- run -------------------------------------------------------------------------------
    seed: int = 0
    device: str = "auto"  # 'auto' (CUDA if present) | 'cpu' | 'cuda' | 'cuda:N'
    precision: str = "auto"  # 'auto' (bf16 on CUDA, fp32 on CPU) | 'fp32' | 'bf16'
    threads: int | None = None  # torch intra-op threads on CPU; None: torch's default
    # deterministic kernels (cuDNN deterministic, no benchmarking, torch.use_deterministic_algorithms): a
    # GPU run that repeats and resumes exactly, slower; CPU runs are deterministic either way (runtime.py)
    deterministic: bool = False
    # fine-tuning: the reconstructor (only it) starts from this checkpoint's (best.pt, checkpoint.pt, or a
    # run folder's best.pt), then trains as configured; its model keys must match; a resumed run ignores it
    init_from: str | None = None

    # ------------------------------------------------------------------------------------------
    @property
    def adversarial(self) -> bool:
        return self.epsilon > 0 and self.adversary != "none"

    @property
    def adversary_kind(self) -> str:
        """The adversary actually used: ``'none'`` whenever epsilon is 0."""
        return self.adversary if self.adversarial else "none"

    @property
    def epsilon_rms(self) -> float:
        return epsilon_rms(self.epsilon, self.crop_size)

    @property
    def epsilon_ref(self) -> float:
        """``epsilon`` at 320x320 with the same per-pixel RMS (the seed's units)."""
        return to_reference(self.epsilon, self.crop_size)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], base: "TrainConfig | None" = None) -> "TrainConfig":
        """Build from a mapping; unknown keys raise :class:`ConfigError` naming them."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {sorted(names)}")
        tuples = {f.name: str(f.type) for f in fields(cls) if str(f.type).startswith("tuple[")}
        values = {k: as_tuple(k, v, numbers="str" not in tuples[k]) if k in tuples else v for k, v in values.items()}
        cfg = replace(base, **values) if base is not None else cls(**values)
        return cfg.validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> "TrainConfig":
        """Check every field; raises :class:`ConfigError` naming the first bad key."""
        self._check_choices()
        check_numbers(self)
        self._check_ranges()
        self._check_optional()
        self._check_attacks()
        self._check_architecture()
        self._check_device()
        return self

    def _need(self, ok: bool, key: str, why: str) -> None:
        """:class:`ConfigError` naming ``key``, its value and ``why``, unless ``ok``."""
        need(self, ok, key, why)

    def _check_choices(self) -> None:
        """The named options (:data:`CHOICES`)."""
        for key, values in CHOICES.items():
            self._need(getattr(self, key) in values, key, f"must be one of {values}")

    def _check_ranges(self) -> None:
        """The sampling mask, and the data and evaluation fractions and selections."""
        need = self._need
        need(0 < self.center_fraction < 1, "center_fraction", "must be in (0, 1)")
        need(self.acceleration > 1, "acceleration", "must be > 1")
        need(
            self.center_fraction * self.acceleration < 1,
            "center_fraction",
            f"times acceleration ({self.acceleration}) must be < 1",
        )
        for key in ("train_fraction", "val_fraction"):
            need(0 < getattr(self, key) <= 1, key, "must be in (0, 1]")
        need(
            isinstance(self.report_fraction, (int, float)) and 0 <= self.report_fraction < 1,
            "report_fraction",
            "must be in [0, 1)",
        )
        if self.report_protocol is not None:
            need(
                self.report_protocol in allowed.PROTOCOL_NAMES,
                "report_protocol",
                f"must be None or one of {sorted(allowed.PROTOCOL_NAMES)}",
            )
        need(
            isinstance(self.robust_slices_per_volume, int) and self.robust_slices_per_volume >= 0,
            "robust_slices_per_volume",
            "must be an integer >= 0 (0: every slice)",
        )

    def _check_optional(self) -> None:
        """Optional positive values, the PGD step scale, the fine-tuning checkpoint and the flags."""
        need = self._need
        need(self.clamp is None or self.clamp > 0, "clamp", "must be None or > 0")
        need(self.dssim_data_range is None or self.dssim_data_range > 0, "dssim_data_range", "must be None or > 0")
        need(self.pgd_step_scale > 0, "pgd_step_scale", "must be > 0")
        need(
            self.init_from is None or (isinstance(self.init_from, str) and self.init_from != ""),
            "init_from",
            "must be None or a checkpoint's path",
        )
        for key in ("deterministic", "unroll_share"):
            need(isinstance(getattr(self, key), bool), key, "must be true or false")

    def _check_attacks(self) -> None:
        """The evaluation's attack budgets and attack names."""
        for b in self.attack_budgets:
            if not (isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and b > 0):
                raise ConfigError(f"config key 'attack_budgets': {b!r} is not a finite number > 0")
        for a in self.attacks:
            if a not in ATTACKS:
                raise ConfigError(f"config key 'attacks': {a!r} is not one of {ATTACKS}")

    def _check_architecture(self) -> None:
        """What arch='unrolled' and the smoothing adversary refuse: perturbations their input never sees."""
        need = self._need
        if self.arch == "unrolled":  # no image-domain perturbation can reach it
            kspace = not self.adversarial or self.perturbation == "kspace"
            need(kspace, "perturbation", f"{UNROLLED}: its training perturbation must be in k-space ('kspace')")
            refuse_image_attacks(self.attacks, self.perturbation, "config key 'attacks'")
            image_protocol = self.report_protocol in allowed.IMAGE_PROTOCOLS
            need(not image_protocol, "report_protocol", f"{UNROLLED}: it attacks the image; use a k-space one")
            need(not self.residual, "residual", "is the U-Net's; arch=unrolled's cascades are residual already")
        smug = self.unroll_smooth_samples > 0
        need(not smug or self.arch == "unrolled", "unroll_smooth_samples", "smooths arch=unrolled's denoisers only")
        need(
            smug == (self.unroll_smooth_sigma > 0),
            "unroll_smooth_sigma",
            "and unroll_smooth_samples: set both > 0, or neither",
        )
        if self.adversary_kind == "smoothing":  # the U-Net's smoothed predictor sees only the image: train there too
            need(
                self.arch == "unrolled" or self.perturbation == "image",
                "perturbation",
                "adversary='smoothing' smooths the image the U-Net sees: use 'image' (k-space: arch='unrolled')",
            )

    def _check_device(self) -> None:
        """The device name."""
        self._need(
            isinstance(self.device, str)
            and (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")),
            "device",
            "must be 'auto', 'cpu', 'cuda' or 'cuda:N'",
        )


# Profiles: overrides of TrainConfig plus the synthetic dataset used when no --data is given.
# 'paper' is the seed's exact setting; 'demo' is sized for a 2-core CPU in minutes; 'smoke' for tests.
# The demo and smoke epsilons are the seed's 1e3 / 5e3 at 320x320 scaled to equal per-pixel RMS.
@dataclass(frozen=True)
class Profile:
    name: str
    overrides: dict[str, Any]
    synthetic: dict[str, int]  # SyntheticSpec fields
    description: str = ""

    def config(self, **more: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.overrides, **more})


def _budgets(crop: int) -> tuple[float, ...]:
    return tuple(scale_epsilon(e, crop) for e in (1e3, 5e3))


PROFILES: dict[str, Profile] = {
    "paper": Profile(
        "paper",
        {},
        dict(volumes=64, val_volumes=16, slices=16, size=320),
        "the seed's setting: 320x320, U-Net 64 channels / 5 pools, batch 8, 5 epochs (GPU)",
    ),
    "demo": Profile(
        "demo",
        dict(
            crop_size=96,
            unet_chans=16,
            unet_pools=3,
            gen_chans=16,
            cond_chans=8,
            epsilon=_budgets(96)[0],
            attack_budgets=_budgets(96),
            max_epochs=6,
            train_eval_volumes=4,
            pgd_steps=10,
            loss="mse",
            lr_recon=1e-3,
            lr_gen=1e-3,
            lr_schedule="cosine",
            batch_size=4,
            steps_per_epoch=120,
        ),
        dict(volumes=48, val_volumes=8, slices=10, size=96),
        "CPU-sized: 96x96, U-Net 16 channels / 3 pools, 6 epochs of 120 steps of batch 4 (720 updates on any "
        "folder: a smaller one is cycled, a larger one sampled); recipe by measurement (MSE, AdamW 1e-3 with "
        "cosine decay over the updates); minutes per model on 2 cores",
    ),
    "smoke": Profile(
        "smoke",
        dict(
            crop_size=64,
            unet_chans=4,
            unet_pools=2,
            gen_chans=4,
            cond_chans=4,
            epsilon=_budgets(64)[0],
            attack_budgets=_budgets(64),
            batch_size=4,
            max_epochs=2,
            patience=3,
            train_eval_volumes=1,
            pgd_steps=3,
            max_train_batches=4,
        ),
        dict(volumes=3, val_volumes=4, slices=4, size=64),
        "tiny: 64x64, a few slices, seconds; for tests",
    ),
}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}; expected one of {sorted(PROFILES)}")
    return PROFILES[name]


__all__ = [
    "ADVERSARIES",
    "CHOICES",
    "ATTACKS",
    "ConfigError",
    "KSPACE_INSTEAD",
    "PROFILES",
    "Profile",
    "TrainConfig",
    "budgets_at_crop",
    "get_profile",
    "refuse_image_attacks",
    "to_reference",
]
