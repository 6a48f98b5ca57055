"""Attention Augmented Convolution (AA-Conv): a k x k convolution whose output channels are
concatenated with multi-head self-attention over all positions, with 2-D relative logits.

Bello, Zoph, Vaswani, Shlens, Le, "Attention Augmented Convolutional Networks", ICCV 2019,
arXiv 1904.09925. The official code is the TensorFlow listing in the paper's appendix
(`augmented_conv2d`, `self_attention_2d`, `relative_logits`, `relative_logits_1d`, `rel_to_abs`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import make_divisible, to_2tuple
from torch import Tensor, nn

from ..ops import global_attention, map_to_tokens, tokens_to_map
from ..registry import CONV, register_attn
from ._utils import check_channels, check_input, factory

__all__ = ["AugmentedConv2d", "relative_index", "DEFAULT_FEAT_SIZE"]

DEFAULT_FEAT_SIZE = (32, 32)


def relative_index(length: int, table_length: int, device: torch.device | None = None) -> Tensor:
    """(length, length) rows of a (2 * table_length - 1)-row relative table for (query, key) pairs.

    Row `key - query + table_length - 1`, clipped to the table: offsets within +-(table_length - 1)
    get their own embedding, farther ones share the outermost one (Shaw et al. 2018 clipping).
    """
    pos = torch.arange(length, device=device)
    return (pos[None, :] - pos[:, None] + (table_length - 1)).clamp_(0, 2 * table_length - 2)


@register_attn("aa_conv", family="aa_conv", kind=CONV,
               paper="Attention Augmented Convolutional Networks (ICCV 2019, arXiv 1904.09925)", year=2019,
               attends="positions (multi-head, 2-D relative logits)", cost="O(N^2 dk + N C k^2) time, O(N C) memory")
class AugmentedConv2d(nn.Module):
    """Attention Augmented Convolution (Bello et al., "Attention Augmented Convolutional Networks", ICCV
    2019, arXiv 1904.09925): concat([Conv_kxk(x) with out - dv channels, W_O MHA(x) with dv channels]).
    As the paper's TF listing: one 1x1 conv gives [k, q, v] (dk, dk, dv); q is scaled by dkh^-0.5 before
    both the content and the relative logits; relative logits q_i . (r_height[y' - y] + r_width[x' - x])
    use two tables (2H-1, dkh), (2W-1, dkh) shared across heads; softmax over keys; 1x1 output projection
    dv -> dv; every conv has a bias (`bias=True`, the TF default). Defaults follow the paper's
    experiments: Nh = 8, kappa = dk / out = 0.2 and upsilon = dv / out = 0.1 (kappa = 2 upsilon = 0.2)
    with at least `min_dkh` = 20 key dims per head; dk, dv are rounded to multiples of Nh (explicit
    `dk`/`dv` override kappa/upsilon; dv == out gives the fully attentional layer). Differences from the
    listing, which builds the tables for the one input size it sees and has no stride: (1) the tables are
    built for `feat_size` (the attention grid, = the output size; default 32x32); a smaller grid uses
    the tables' central rows (exactly the listing's layer with those rows), a larger one clips offsets
    beyond +-(feat_size - 1) to the outermost rows (Shaw et al. 2018), keeping translation
    equivariance; (2) tables are initialised N(0, dkh^-0.5) (the listing passes dkh^-0.5 positionally
    to `tf.random_normal_initializer`, i.e. as its *mean*, with std 1); (3) a strided layer attends on
    the input average-pooled 3x3 with that stride (the paper's downsampling op), whose grid equals the
    conv output; `attn_downsample=True` is the paper's memory option (attention on a 3x3/2 average-pooled
    input, bilinearly upsampled to the conv output). No N x N matrix is built (`global_attention` with
    decomposed relative logits). Cost: O(N^2 dk + N Fin Fout k^2) time, O(N (dk + dv + H + W)) memory.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, kernel_size: int = 3, stride: int = 1,
                 *, dk: int | None = None, dv: int | None = None, num_heads: int = 8, kappa: float = 0.2,
                 upsilon: float = 0.1, min_dkh: int = 20, relative: bool = True,
                 feat_size: int | tuple[int, int] | None = None, attn_downsample: bool = False,
                 dilation: int = 1, bias: bool = True, device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        out_channels = in_channels if out_channels is None else out_channels
        check_channels(name, in_channels)
        check_channels(name, out_channels)
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"{name}: num_heads must be a positive int, got {num_heads!r}")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"{name}: kernel_size must be a positive odd int ('same' padding), got {kernel_size!r}")
        if not isinstance(stride, int) or stride < 1 or not isinstance(dilation, int) or dilation < 1:
            raise ValueError(f"{name}: stride and dilation must be positive ints, got {stride!r}, {dilation!r}")
        if dk is None:
            dk = max(make_divisible(kappa * out_channels, num_heads), num_heads * min_dkh)
        if dv is None:
            dv = make_divisible(upsilon * out_channels, num_heads)
        for what, d in (("dk", dk), ("dv", dv)):
            if not isinstance(d, int) or d < num_heads or d % num_heads:
                raise ValueError(f"{name}: {what}={d!r} must be a positive multiple of num_heads={num_heads}")
        if dv > out_channels:
            raise ValueError(f"{name}: dv={dv} attention channels exceed out_channels={out_channels}")
        dd = factory(device, dtype)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.dk, self.dv, self.num_heads = dk, dv, num_heads
        self.dkh = dk // num_heads
        self.relative = relative
        self.attn_downsample = attn_downsample
        # conv branch (absent in the fully attentional case dv == out_channels)
        self.conv = nn.Conv2d(in_channels, out_channels - dv, kernel_size, stride, dilation * (kernel_size // 2),
                              dilation, bias=bias, **dd) if dv < out_channels else None
        # attention branch: input pooling for strided layers / the paper's memory-saving downsampling
        pool_stride = stride * (2 if attn_downsample else 1)
        self.pool = nn.AvgPool2d(3, pool_stride, padding=1, count_include_pad=False) if pool_stride > 1 else None
        self.qkv = nn.Conv2d(in_channels, 2 * dk + dv, 1, bias=bias, **dd)
        self.proj = nn.Conv2d(dv, dv, 1, bias=bias, **dd)
        if relative:
            fh, fw = to_2tuple(DEFAULT_FEAT_SIZE if feat_size is None else feat_size)
            if attn_downsample:  # the tables index the pooled grid
                fh, fw = (fh + 1) // 2, (fw + 1) // 2
            self.feat_size = (int(fh), int(fw))
            self.r_height = nn.Parameter(torch.empty(2 * self.feat_size[0] - 1, self.dkh, **dd))
            self.r_width = nn.Parameter(torch.empty(2 * self.feat_size[1] - 1, self.dkh, **dd))
        else:
            self.feat_size = None
            self.register_parameter("r_height", None)
            self.register_parameter("r_width", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.relative:
            nn.init.normal_(self.r_height, std=self.dkh ** -0.5)
            nn.init.normal_(self.r_width, std=self.dkh ** -0.5)

    def relative_logits(self, q: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
        """Decomposed relative logits of scaled queries q (B, Nh, H*W, dkh) on an (H, W) key grid.

        Returns rel_h (B, Nh, N, H) and rel_w (B, Nh, N, W): rel_h[i, y'] = q_i . r_height[y' - y_i + Ht - 1],
        rel_w[i, x'] = q_i . r_width[x' - x_i + Wt - 1] (indices clipped to the tables).
        """
        q = q.unflatten(-2, (height, width))
        r_height, r_width, table = self.r_height, self.r_width, self.feat_size
        assert r_height is not None and r_width is not None and table is not None  # relative=True (narrows types)
        r_h = r_height[relative_index(height, table[0], q.device)].to(q.dtype)  # (H, H', dkh)
        r_w = r_width[relative_index(width, table[1], q.device)].to(q.dtype)  # (W, W', dkh)
        rel_h = torch.einsum("bnyxd,ykd->bnyxk", q, r_h).flatten(2, 3)
        rel_w = torch.einsum("bnyxd,xkd->bnyxk", q, r_w).flatten(2, 3)
        return rel_h, rel_w

    def attention(self, x: Tensor) -> Tensor:
        """The attention branch (before any upsampling): (B, Fin, H, W) -> (B, dv, H', W')."""
        if self.pool is not None:
            x = self.pool(x)
        height, width = x.shape[-2:]
        k, q, v = self.qkv(x).split([self.dk, self.dk, self.dv], 1)  # official order [k, q, v]
        q = map_to_tokens(q, self.num_heads) * self.dkh ** -0.5
        k, v = map_to_tokens(k, self.num_heads), map_to_tokens(v, self.num_heads)
        if self.relative:
            rel_h, rel_w = self.relative_logits(q, height, width)
            out = global_attention(q, k, v, scale=1.0, rel_h=rel_h, rel_w=rel_w)
        else:
            out = global_attention(q, k, v, scale=1.0)
        return self.proj(tokens_to_map(out, height, width))

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_input(self, x, self.in_channels)
        attn = self.attention(x)
        if self.conv is None:
            size = [(x.shape[-2] - 1) // self.stride + 1, (x.shape[-1] - 1) // self.stride + 1]
            if list(attn.shape[-2:]) == size:
                return attn
            return F.interpolate(attn, size, mode="bilinear", align_corners=False)
        conv = self.conv(x)
        if attn.shape[-2:] != conv.shape[-2:]:
            attn = F.interpolate(attn, conv.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([conv, attn.to(conv.dtype)], 1)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"dk={self.dk}, dv={self.dv}, num_heads={self.num_heads}, relative={self.relative}, "
                f"feat_size={self.feat_size}, attn_downsample={self.attn_downsample}")

