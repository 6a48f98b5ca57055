"""Polarized Self-Attention (PSA): a channel-only and a spatial-only gate, in parallel or in sequence.

Liu, Liu, Fan, Huang, "Polarized Self-Attention: Towards High-quality Pixel-wise Regression",
arXiv 2107.00782 (2021). Official code: DeLightCMU/PSA, `semantic-segmentation/network/PSA.py`
(`PSA_p`, `PSA_s`), where the block sits inside the residual branch of every HRNet basic block.

Paper equations (`formulation="paper"`, the default), with X (C, N), N = H*W, C' = C * rd_ratio:
- channel-only A_ch(X) = sigmoid(LN(W_z (W_v X) softmax_N(W_q X))), W_q: C -> 1, W_v: C -> C',
  W_z: C' -> C, LN over the (C, 1, 1) vector; Z_ch = A_ch(X) * X.
- spatial-only A_sp(X) = sigmoid(softmax_C'(GAP(W_q X))^T (W_v X)), W_q, W_v: C -> C'; Z_sp = A_sp(X) * X.
- parallel: Z_ch + Z_sp; sequential: A_sp(Z_ch) * Z_ch. No residual, no gamma.

What the official code computes instead (`formulation="official"`), METHODS.md pitfalls 1-6:
1. LayerNorm: PSA_p has none (W_z is one bias-free conv); PSA_s puts it inside a bottleneck
   C' -> C'/4 (bias) -> LN([C'/4, 1, 1]) -> ReLU -> C (bias) in place of W_z. Spatial softmax: PSA_p
   does not softmax the pooled query but softmaxes the (1, N) map over N; PSA_s softmaxes the value
   W_v X over N per channel.
2. PSA_p's spatial mask is sigmoid(softmax_N(.)), in (0.5, 0.73) and ~0.5 for large N: nearly constant.
3. Outputs are x scaled by masks in (0, 1) (PSA_p: by m_ch + m_sp); no identity is added here either.
4. Sequential order is channel first; the spatial gate is computed on the channel-refined features.
5. GAP(W_q X) = W_q GAP(X) only because the convs are bias-free: they are, in both formulations.
6. LayerNorm's normalized_shape is (C, 1, 1) (paper) / (C'/4, 1, 1) (PSA_s): per sample, not GroupNorm.
The official code also swaps the names: its `spatial_pool` is the channel-only branch, its `channel_pool`
the spatial-only one. Parameters keep the official names (conv_q_right, conv_v_right, conv_up,
conv_q_left, conv_v_left) and init (kaiming-normal fan_in on the bias-free q/v convs) in both
formulations, so a released PSA_p / PSA_s state dict loads strictly with `formulation="official"`.

Cost: the 1x1 convs are reassociated with the pooling (X softmax(W_q X) is pooled before W_v; W_v^T q
is formed before touching X), so no N x N and no (C', N) map: O(N C + C^2) time, O(N) extra memory.
The exception is official PSA_s's spatial branch, whose per-channel softmax over N needs W_v X: O(N C^2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import get_act_layer
from torch import Tensor, nn

from ..registry import GATE, register_attn
from ._utils import TimmInitHooks, check_channels, check_input, factory

LAYOUTS = ("parallel", "sequential", "channel", "spatial")
FORMULATIONS = ("paper", "official")


class PolarizedSelfAttention(TimmInitHooks, nn.Module):
    """Polarized Self-Attention (Liu et al., "Polarized Self-Attention: Towards High-quality Pixel-wise
    Regression", arXiv 2107.00782, 2021): `layout` picks the channel-only gate, the spatial-only gate,
    their parallel sum (PSA_p) or their sequence (PSA_s: spatial gate on the channel-refined tensor).
    `formulation="paper"` (default) follows the paper's equations: it is the only one defining the
    channel-only / spatial-only blocks, is the same pair of branches in both layouts, and avoids the code's
    nearly constant sigmoid(softmax) spatial mask; `formulation="official"` reproduces DeLightCMU/PSA's
    `PSA_p` / `PSA_s` (no LayerNorm and softmax over N after the product in PSA_p; C'/4 LN-ReLU bottleneck
    and softmax over N on the value in PSA_s; for the single-branch layouts, PSA_p's branch) with the
    official parameter names and init, so its checkpoints load. Cost O(N C + C^2) (O(N C^2) for official
    PSA_s), never N x N; see the module docstring for the full list of paper/code differences.

    Args:
        channels: input and output channels C.
        layout: "parallel" (Z_ch + Z_sp), "sequential" (A_sp(Z_ch) * Z_ch), "channel" or "spatial".
        formulation: "paper" or "official".
        rd_ratio: inner width C' = int(C * rd_ratio) of W_v and of the spatial W_q (1/2 in the paper).
        act_layer: activation of official PSA_s's bottleneck (default ReLU); ignored otherwise
            (the paper's branches have no activation besides softmax / sigmoid).
    """

    def __init__(self, channels: int, *, layout: str = "parallel", formulation: str = "paper",
                 rd_ratio: float = 0.5, act_layer=None, device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        check_channels(name, channels)
        if layout not in LAYOUTS:
            raise ValueError(f"{name}: layout must be one of {LAYOUTS}, got {layout!r}")
        if formulation not in FORMULATIONS:
            raise ValueError(f"{name}: formulation must be one of {FORMULATIONS}, got {formulation!r}")
        if not rd_ratio > 0:
            raise ValueError(f"{name}: rd_ratio must be > 0, got {rd_ratio!r}")
        fk = factory(device, dtype)
        self.channels, self.layout, self.formulation = channels, layout, formulation
        self.inter_channels = inter = max(1, int(channels * rd_ratio))
        # branch variant: the paper's, or the official PSA_s / PSA_p code's
        self.variant = formulation if formulation == "paper" else (
            "official_s" if layout == "sequential" else "official_p")

        if layout != "spatial":  # channel-only branch (`spatial_pool` in the official code)
            self.conv_q_right = nn.Conv2d(channels, 1, 1, bias=False, **fk)
            self.conv_v_right = nn.Conv2d(channels, inter, 1, bias=False, **fk)
            if self.variant == "official_s":
                mid = max(1, inter // 4)
                act = get_act_layer(act_layer or "relu")
                self.conv_up = nn.Sequential(
                    nn.Conv2d(inter, mid, 1, **fk), nn.LayerNorm([mid, 1, 1], **fk), act(),
                    nn.Conv2d(mid, channels, 1, **fk))
            else:
                self.conv_up = nn.Conv2d(inter, channels, 1, bias=False, **fk)
            self.norm = nn.LayerNorm([channels, 1, 1], **fk) if self.variant == "paper" else nn.Identity()
        if layout != "channel":  # spatial-only branch (`channel_pool` in the official code)
            self.conv_q_left = nn.Conv2d(channels, inter, 1, bias=False, **fk)
            self.conv_v_left = nn.Conv2d(channels, inter, 1, bias=False, **fk)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: kaiming-normal (fan_in, ReLU gain) q/v convs; PyTorch defaults elsewhere."""
        for n in ("conv_q_right", "conv_v_right", "conv_q_left", "conv_v_left"):
            if hasattr(self, n):
                nn.init.kaiming_normal_(getattr(self, n).weight, mode="fan_in", nonlinearity="relu")
        for m in (getattr(self, "conv_up", None), getattr(self, "norm", None)):
            for sub in m.modules() if m is not None else ():
                if isinstance(sub, (nn.Conv2d, nn.LayerNorm)):
                    sub.reset_parameters()

    def channel_mask(self, x: Tensor) -> Tensor:
        """A_ch(x): the (B, C, 1, 1) channel gate."""
        p = self.conv_q_right(x).flatten(2).softmax(-1)                 # (B, 1, N), softmax over N
        pooled = torch.matmul(x.flatten(2), p.transpose(1, 2))          # (B, C, 1) = X softmax(W_q X)
        z = torch.matmul(self.conv_v_right.weight.flatten(1), pooled)   # (B, C', 1) = (W_v X) softmax(.)
        return torch.sigmoid(self.norm(self.conv_up(z.unsqueeze(-1))))

    def spatial_mask(self, x: Tensor) -> Tensor:
        """A_sp(x): the (B, 1, H, W) spatial gate."""
        b, _, h, w = x.shape
        q = F.linear(x.mean((2, 3)), self.conv_q_left.weight.flatten(1))    # (B, C') = GAP(W_q X)
        if self.variant == "official_s":
            v = self.conv_v_left(x).flatten(2).softmax(-1)                   # (B, C', N), softmax over N
            s = torch.matmul(q.unsqueeze(1), v)
        else:
            if self.variant == "paper":
                q = q.softmax(-1)                                            # softmax over the C' channels
            u = torch.matmul(q, self.conv_v_left.weight.flatten(1))          # (B, C) = W_v^T q
            s = torch.matmul(u.unsqueeze(1), x.flatten(2))                   # (B, 1, N) = q^T W_v X
            if self.variant == "official_p":
                s = s.softmax(-1)                                            # code: softmax over N
        return torch.sigmoid(s.reshape(b, 1, h, w))

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_input(self, x, self.channels)
        # the single-branch layouts lack the other branch's convs (`hasattr` is resolved when TorchScript compiles)
        if not hasattr(self, "conv_q_left"):   # layout "channel"
            return x * self.channel_mask(x)
        if not hasattr(self, "conv_q_right"):  # layout "spatial"
            return x * self.spatial_mask(x)
        if self.layout == "parallel":
            return x * self.channel_mask(x) + x * self.spatial_mask(x)
        y = x * self.channel_mask(x)
        return y * self.spatial_mask(y)

    def extra_repr(self) -> str:
        return (f"{self.channels}, layout={self.layout!r}, formulation={self.formulation!r}, "
                f"inter_channels={self.inter_channels}")


_PAPER = "Polarized Self-Attention: Towards High-quality Pixel-wise Regression (arXiv 2107.00782, 2021)"
for _name, _layout, _attends in (
        ("psa_channel", "channel", "channels (positions softmax-pooled)"),
        ("psa_spatial", "spatial", "positions (channels pooled)"),
        ("psa_p", "parallel", "channels + positions, in parallel"),
        ("psa_s", "sequential", "channels, then positions")):
    register_attn(_name, family="psa", kind=GATE, paper=_PAPER, year=2021, attends=_attends,
                  cost="O(N C + C^2)", cls=PolarizedSelfAttention, layout=_layout)
