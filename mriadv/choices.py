"""The allowed values of the configuration's named options, each list written once.

Torch-free, so that :meth:`mriadv.config.TrainConfig.validate` checks a value without importing the
modules that build from it; those modules import the same tuples and refuse anything else
(``tests/test_config.py`` builds each with every listed value and checks that an unlisted one is
refused). The comment above each tuple names the config key and the code that consumes it.
"""

from __future__ import annotations

# arch: mriadv.trainer.build_reconstructor: the U-Net on the zero-filled image, or the unrolled network
# that takes the measurements (mriadv.models.unrolled.UnrolledNet)
ARCHS = ("unet", "unrolled")

# unet_activation, unet_pooling, unet_norm: mriadv.models.unet.UNet
ACTIVATIONS = ("prelu", "relu", "leakyrelu")
POOLINGS = ("avg", "max")
NORMS = ("instance", "batch")

# mask_type: mriadv.data.masks.make_mask_func
MASK_TYPES = ("random", "equispaced")

# augment: mriadv.data.transforms.UnetTransform (training slices only): none, or a random flip of the
# fully sampled image along each axis before the mask is drawn (MRAugment's flips, Fabian, Heckel &
# Soltanolkotabi, ICML 2021); 'auto' (mriadv.data.loading.build_data): flips when an epoch cycles the
# training set more than once (a small folder), none otherwise
AUGMENTATIONS = ("auto", "none", "flip")

# target_key: mriadv.data.files (the reference reconstruction read from each file, or 'kspace':
# computed from the fully sampled k-space)
TARGET_KEYS = ("reconstruction_esc", "reconstruction_rss", "kspace")

# loss: mriadv.losses.make_loss
LOSSES = ("mse", "dssim")

# perturbation: where a perturbation lives (mriadv.attacks, mriadv.perturbations): the zero-filled
# image (Algorithm 1) or the measured k-space (Algorithm 2)
DOMAINS = ("image", "kspace")

# precision: mriadv.runtime.Runtime.resolve
PRECISIONS = ("auto", "fp32", "bf16")

# the training's options (mriadv.trainer, mriadv.fit)
EPSILON_SCOPES = ("image", "batch")  # epsilon_scope
KSPACE_CONDITIONINGS = ("measurements", "latent")  # kspace_conditioning
GEN_SCALES = ("budget", "unit")  # gen_scale
LR_SCHEDULES = ("constant", "cosine")  # lr_schedule
NOISE_MODES = ("norm", "sigma")  # noise_mode

# PGD's objective (mriadv.attacks.PGDAttack, assess --pgd-objective): the error to the target
# ||f(x(delta)) - x||^2, or the deviation from the clean reconstruction ||f(x(delta)) - f(x~)||^2
# (Darestani et al.)
PGD_OBJECTIVES = ("target", "deviation")

# report_protocol: the names of mriadv.protocols.PROTOCOLS (which imports torch and the attacks; it
# checks at import that its presets are exactly these)
PROTOCOL_NAMES = ("seed", "l2-kspace-100", "l2-kspace-curve", "l2-kspace-restarts", "deviation-kspace")
# those of them with an image-domain attack, which arch='unrolled' refuses (mriadv.protocols checks the list)
IMAGE_PROTOCOLS = ("seed",)

__all__ = [
    "ACTIVATIONS",
    "AUGMENTATIONS",
    "ARCHS",
    "DOMAINS",
    "EPSILON_SCOPES",
    "GEN_SCALES",
    "IMAGE_PROTOCOLS",
    "KSPACE_CONDITIONINGS",
    "LOSSES",
    "LR_SCHEDULES",
    "MASK_TYPES",
    "NOISE_MODES",
    "NORMS",
    "POOLINGS",
    "PRECISIONS",
    "PROTOCOL_NAMES",
    "TARGET_KEYS",
]
