"""Networks: the reconstructors (the U-Net, the unrolled network), randomised smoothing's predictor
around either, and the perturbation generators."""

from mriadv.models.generators import (
    ConditionalGenerator,
    ImageGenerator,
    MeasurementGenerator,
    as_complex,
    kspace_features,
)
from mriadv.models.smoothing import Smoothed
from mriadv.models.unet import UNet
from mriadv.models.unrolled import UnrolledNet

__all__ = [
    "Smoothed",
    "UNet",
    "UnrolledNet",
    "ConditionalGenerator",
    "ImageGenerator",
    "MeasurementGenerator",
    "as_complex",
    "kspace_features",
]
