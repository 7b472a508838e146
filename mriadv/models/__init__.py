"""Networks: the reconstructors (the U-Net, the unrolled network) and the perturbation generators."""

from mriadv.models.generators import (
    ConditionalGenerator,
    ImageGenerator,
    MeasurementGenerator,
    as_complex,
    kspace_features,
)
from mriadv.models.unet import UNet
from mriadv.models.unrolled import UnrolledNet

__all__ = [
    "UNet",
    "UnrolledNet",
    "ConditionalGenerator",
    "ImageGenerator",
    "MeasurementGenerator",
    "as_complex",
    "kspace_features",
]
