"""Networks: the U-Net reconstructor and the perturbation generators."""

from mriadv.models.generators import (
    ConditionalGenerator,
    ImageGenerator,
    MeasurementGenerator,
    as_complex,
    kspace_features,
)
from mriadv.models.unet import UNet

__all__ = ["UNet", "ConditionalGenerator", "ImageGenerator", "MeasurementGenerator", "as_complex", "kspace_features"]
