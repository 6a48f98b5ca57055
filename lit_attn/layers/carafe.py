"""CARAFE: a content-aware upsampler; each output pixel is a softmax-weighted sum of the k_up x k_up
input window around its source pixel, with weights predicted from the input.

Wang, Chen, Xu, Liu, Loy, Lin, "CARAFE: Content-Aware ReAssembly of FEatures", ICCV 2019,
arXiv 1905.02188. Official code: myownskyW7/CARAFE `carafe/carafe.py` (`CARAFEPack`, CUDA op),
identical to mmcv's `mmcv.ops.CARAFEPack`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.local import local_aggregate
from ..registry import UPSAMPLE, register_attn
from ._utils import check_channels, check_input, factory

__all__ = ["CARAFE"]


@register_attn("carafe", family="carafe", kind=UPSAMPLE,
               paper="CARAFE: Content-Aware ReAssembly of FEatures (ICCV 2019, arXiv 1905.02188)", year=2019,
               attends="k_up x k_up input window of each output pixel",
               cost="O(s^2 N (C k_up^2 + 64 k_enc^2 G k_up^2)) time, O(s^2 N (C + G k_up^2)) memory")
class CARAFE(nn.Module):
    """CARAFE upsampler (Wang et al., "CARAFE: Content-Aware ReAssembly of FEatures", ICCV 2019, arXiv
    1905.02188), as the official `CARAFEPack`: (B, C, H, W) -> (B, C, sH, sW). A 1x1 channel compressor
    C -> `compressed_channels` (64), a k_enc x k_enc content encoder (3x3, `encoder_dilation`) to
    G k_up^2 s^2 channels (G = `up_group`), `pixel_shuffle(s)` to (G k_up^2, sH, sW) (channel
    (g k_up^2 + t) s^2 + sy s + sx before the shuffle, the official layout), softmax over the k_up^2 taps
    of each group; output pixel (i, j) of channel c is the weighted sum of the k_up x k_up window
    (k_up = 5) of input pixel (i // s, j // s) in channel c (group c // (C / G)), zero-padded at the
    borders (the weights are not renormalised there, as the CUDA op). Init as the official code: xavier
    uniform weights, zero biases, content encoder N(0, 0.001), so the kernels start near-uniform
    (output ~ k_up x k_up box filter of a nearest upsample). Same maths as the official op (no
    deviation); the reassembly runs in the memory-lean `local_aggregate` (no (C, k_up^2, s^2 N) tensor;
    the official CUDA op has no CPU path). Cost with N = H W: O(s^2 N C k_up^2) for the reassembly plus
    O(N 64 k_enc^2 G k_up^2 s^2) for the encoder; memory O(s^2 N (C + G k_up^2)).
    """

    def __init__(self, channels: int, *, scale_factor: int = 2, up_kernel: int = 5, up_group: int = 1,
                 encoder_kernel: int = 3, encoder_dilation: int = 1, compressed_channels: int = 64,
                 device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        for what, v in (("scale_factor", scale_factor), ("up_kernel", up_kernel), ("up_group", up_group),
                        ("encoder_kernel", encoder_kernel), ("encoder_dilation", encoder_dilation)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: {what} must be a positive int, got {v!r}")
        if up_kernel % 2 == 0 or encoder_kernel % 2 == 0:
            raise ValueError(f"{name}: up_kernel and encoder_kernel must be odd, got {up_kernel}, {encoder_kernel}")
        check_channels(name, channels, up_group=up_group)
        check_channels(name, compressed_channels)
        dd = factory(device, dtype)
        self.channels, self.scale_factor = channels, scale_factor
        self.up_kernel, self.up_group = up_kernel, up_group
        self.channel_compressor = nn.Conv2d(channels, compressed_channels, 1, **dd)
        self.content_encoder = nn.Conv2d(compressed_channels, up_group * up_kernel ** 2 * scale_factor ** 2,
                                         encoder_kernel, padding=(encoder_kernel - 1) * encoder_dilation // 2,
                                         dilation=encoder_dilation, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in (self.channel_compressor, self.content_encoder):
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.content_encoder.weight, std=0.001)

    def kernels(self, x: Tensor) -> Tensor:
        """(B, G, k_up^2, sH, sW) reassembly kernels, softmax-normalised over the taps."""
        mask = F.pixel_shuffle(self.content_encoder(self.channel_compressor(x)), self.scale_factor)
        return mask.unflatten(1, (self.up_group, self.up_kernel ** 2)).softmax(2)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_input(self, x, self.channels)
        return local_aggregate(x, self.kernels(x), self.up_kernel, scale=self.scale_factor)

    def extra_repr(self) -> str:
        return (f"{self.channels}, scale_factor={self.scale_factor}, up_kernel={self.up_kernel}, "
                f"up_group={self.up_group}")
