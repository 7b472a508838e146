"""Networks: the U-Net reconstructor and the perturbation generators."""

from mriadv.models.generators import ImageGenerator, MeasurementGenerator, as_complex
from mriadv.models.unet import UNet

__all__ = ["UNet", "ImageGenerator", "MeasurementGenerator", "as_complex"]
