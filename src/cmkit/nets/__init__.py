"""Network backbones."""

from cmkit.nets.unet import UNet, forward_mode

__all__ = ["UNet", "forward_mode"]
