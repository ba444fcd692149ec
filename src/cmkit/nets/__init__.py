"""Network backbones."""

from cmkit.nets.unet import UNet

__all__ = ["UNet"]
