"""Reference for `carafe`: the unfold formulation of CARAFE's reassembly (the pure-PyTorch form of the
official CUDA op: F.unfold of the k_up x k_up windows, nearest-upsampled to the output grid, times the
kernels), sharing the block's compressor and encoder."""
import torch.nn.functional as F
from torch import nn


class UnfoldCARAFE(nn.Module):
    """CARAFEPack with the reassembly done on a materialised (B, C, k_up^2, sH, sW) tensor."""

    def __init__(self, block):
        super().__init__()
        self.b = block

    def forward(self, x):
        blk = self.b
        b, c, h, w = x.shape
        k, s, g = blk.up_kernel, blk.scale_factor, blk.up_group
        mask = F.pixel_shuffle(blk.content_encoder(blk.channel_compressor(x)), s)
        mask = F.softmax(mask.view(b, g, k * k, h * s, w * s), dim=2)                  # official kernel_normalizer
        windows = F.unfold(x, k, padding=k // 2).view(b, c, k * k, h, w)
        windows = F.interpolate(windows.view(b, c * k * k, h, w), scale_factor=s, mode="nearest")
        windows = windows.view(b, g, c // g, k * k, h * s, w * s)
        return (windows * mask[:, :, None]).sum(3).view(b, c, h * s, w * s)


REFERENCES = {"carafe": [("unfold + nearest (pure-PyTorch CARAFE)", UnfoldCARAFE)]}
