"""Local Relation layer (LR-Net): a k x k spatial aggregation whose weights come from the appearance
relation of each pixel pair, -(q_i - k_j)^2, plus a learned geometry prior on their offset.

Hu, Zhang, Xie, Lin, "Local Relation Networks for Image Recognition", ICCV 2019, arXiv 1904.11491.
The ICCV code was not released; the LR-Net branch of microsoft/Swin-Transformer ("LR-Net V2",
`ops/local_relation`, CUDA kernels) is the official later implementation read for the window,
grouping, stride and border conventions.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.local import local_aggregate, local_correlation, local_out_size, local_valid_mask
from ..registry import CONV, register_attn
from ._utils import check_channels, check_input, factory

__all__ = ["LocalRelation2d"]


@register_attn("local_relation", family="local_relation", kind=CONV,
               paper="Local Relation Networks for Image Recognition (ICCV 2019, arXiv 1904.11491)", year=2019,
               attends="k x k window (appearance relation + geometry prior)",
               cost="O(N C k^2) time, O(N (C + C/m k^2)) memory")
class LocalRelation2d(nn.Module):
    """Local relation layer (Hu et al., "Local Relation Networks for Image Recognition", ICCV 2019, arXiv
    1904.11491), a replacement for a k x k convolution. The input channels form G = in_channels / m
    aggregation groups of m channels (channel sharing, m = `channels_per_group` = 8); 1x1 convs give a
    query and a key map with `key_channels` channels (default G: one per group); for output pixel i and
    each pixel j of its k x k window (k = 7), group g's weight is softmax_j(-sum_{c in g} (q_ic - k_jc)^2
    + geo_g(j - i)), where the geometry prior geo is an MLP 2 -> `geometry_channels` (default
    max(4, G / 2)) -> G with ReLU on the offset (dy, dx) (in taps); the output is the weighted sum of
    the input (the values are x itself, as in the paper). As the official LR-Net V2 kernel: window taps
    outside the image are excluded from the softmax (the kernel gives them logit -100), groups are
    contiguous channel blocks, and a strided
    layer centres its windows at (s i, s j) (subsampled queries; output (H - 1) // s + 1). Not in the
    paper: when out_channels != in_channels a 1x1 conv maps the aggregated in_channels to out_channels
    (none otherwise; LR-Net's bottleneck supplies its own 1x1 convs). Implementation: -(q - k)^2 is
    computed as 2 q.k - |k|^2 (the dropped -|q|^2 is constant over the window, so the softmax is
    unchanged) with the memory-lean `local_correlation`, and the aggregation with `local_aggregate`;
    no (C, k^2, N) unfolded tensor is built. Cost: O(N k^2 (C + key_channels)) time, O(N (C + G k^2))
    memory (the weights are G k^2 per position, as the official kernel).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, kernel_size: int = 7, stride: int = 1,
                 *, channels_per_group: int = 8, key_channels: int | None = None,
                 geometry_channels: int | None = None, dilation: int = 1, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        out_channels = in_channels if out_channels is None else out_channels
        check_channels(name, in_channels, channels_per_group=channels_per_group)
        check_channels(name, out_channels)
        for what, v in (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: {what} must be a positive int, got {v!r}")
        if kernel_size % 2 == 0:
            raise ValueError(f"{name}: kernel_size must be odd (centred window), got {kernel_size}")
        groups = in_channels // channels_per_group
        key_channels = groups if key_channels is None else key_channels
        if not isinstance(key_channels, int) or key_channels < 1 or key_channels % groups:
            raise ValueError(f"{name}: key_channels={key_channels!r} must be a positive multiple of the "
                             f"{groups} aggregation groups (in_channels / channels_per_group)")
        geometry_channels = max(4, groups // 2) if geometry_channels is None else geometry_channels
        check_channels(name, geometry_channels)
        dd = factory(device, dtype)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.groups, self.key_channels = groups, key_channels
        self.query = nn.Conv2d(in_channels, key_channels, 1, bias=bias, **dd)
        self.key = nn.Conv2d(in_channels, key_channels, 1, bias=bias, **dd)
        self.geometry = nn.Sequential(nn.Linear(2, geometry_channels, **dd), nn.ReLU(),
                                      nn.Linear(geometry_channels, groups, **dd))
        r = torch.arange(kernel_size, device=device) - kernel_size // 2
        offsets = torch.stack(torch.meshgrid(r, r, indexing="ij"), -1).flatten(0, 1)  # (k*k, 2): (dy, dx)
        self.register_buffer("offsets", offsets.to(dtype or torch.get_default_dtype()), persistent=False)
        self.proj = nn.Conv2d(in_channels, out_channels, 1, bias=bias, **dd) if out_channels != in_channels else None

    def geometry_prior(self) -> Tensor:
        """(G, k*k) geometry logits of the window offsets."""
        return self.geometry(self.offsets).t()

    def relation_logits(self, x: Tensor) -> Tensor:
        """(B, G, k*k, Ho, Wo) logits: appearance 2 q.k - |k|^2 per group + geometry; -inf outside the image."""
        s, g = self.stride, self.groups
        q = self.query(x[:, :, ::s, ::s] if s > 1 else x)
        k = self.key(x)
        acc = torch.promote_types(q.dtype, torch.float32)  # the relation in fp32 under autocast
        q, k = q.to(acc).unflatten(1, (g, -1)), k.to(acc).unflatten(1, (g, -1))
        # sum_c (2 q_c k_c - k_c^2) as one correlation: [2q, -1] . [k, k^2] per group
        qa = torch.cat([2 * q, -torch.ones_like(q)], 2).flatten(1, 2)
        ka = torch.cat([k, k * k], 2).flatten(1, 2)
        logits = local_correlation(qa, ka, g, self.kernel_size, self.dilation, stride=s)
        logits.add_(self.geometry_prior().to(logits.dtype)[None, :, :, None, None])  # in place: one (B, G, k^2, N)
        valid = local_valid_mask(x.shape[-2:], self.kernel_size, self.dilation, stride=s, device=x.device)
        return logits.masked_fill_(~valid, float("-inf"))

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_input(self, x, self.in_channels)
        weights = self.relation_logits(x).softmax(2)
        out = local_aggregate(x, weights, self.kernel_size, self.dilation, stride=self.stride)
        return out if self.proj is None else self.proj(out)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return local_out_size(height, self.stride), local_out_size(width, self.stride)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"dilation={self.dilation}, groups={self.groups}, key_channels={self.key_channels}")
