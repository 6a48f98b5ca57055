"""Benchmark reference for `criss_cross`: mmcv's pure-PyTorch CrissCrossAttention (einsum form).

mmcv `mmcv/ops/cc_attention.py` (v1.3.13+, used by mmsegmentation's CCHead): energy_H with a -inf
diagonal, energy_W, concatenation to (B, H, W, H + W), softmax, two einsums with the value. Applied
`recurrence` times with the block's own (shared) convs and gamma, as the RCCA module does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def neg_inf_diag(n: int, device) -> torch.Tensor:
    return torch.diag(torch.tensor(float("-inf")).to(device).repeat(n), 0)


class EinsumCrissCross(nn.Module):
    """mmcv's CrissCrossAttention.forward, R times, reusing the block's parameters."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def step(self, x):
        blk = self.block
        _, _, h, _ = x.shape
        query, key, value = blk.query_conv(x), blk.key_conv(x), blk.value_conv(x)
        energy_h = torch.einsum("bchw,bciw->bwhi", query, key) + neg_inf_diag(h, query.device)
        energy_h = energy_h.transpose(1, 2)
        energy_w = torch.einsum("bchw,bchj->bhwj", query, key)
        attn = F.softmax(torch.cat([energy_h, energy_w], dim=-1), dim=-1)  # [B, H, W, H + W]
        out = torch.einsum("bciw,bhwi->bchw", value, attn[..., :h])
        out += torch.einsum("bchj,bhwj->bchw", value, attn[..., h:])
        return (blk.gamma * out + x).contiguous()

    def forward(self, x):
        for _ in range(self.block.recurrence):
            x = self.step(x)
        return x


REFERENCES = {"criss_cross": [("einsum (mmcv CrissCrossAttention, R times)", EinsumCrissCross)]}
