"""Network backbones."""

from cmkit.nets.unet import UNet, math_attention

__all__ = ["UNet", "math_attention"]
