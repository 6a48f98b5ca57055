"""Benchmark reference for `isa`: openseg.pytorch's `ISA_Block` / `ISA_Module` computation.

The input is padded, regrouped with view/permute into a (B * groups, C, ., .) batch and each stage runs
`SelfAttentionBlock2D.forward`: a materialised (B * groups, n, n) similarity map by matmul, softmax over
keys (as `lib/models/modules/isa_block.py`, and mmseg's `ISAHead`). The reference holds the block and
reuses its layers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def official_sa(sa, x):
    """openseg `SelfAttentionBlock2D.forward` on a batch of groups."""
    batch_size, h, w = x.size(0), x.size(2), x.size(3)
    value = sa.f_value(x).reshape(batch_size, sa.value_channels, -1).permute(0, 2, 1)
    query = sa.f_query(x).reshape(batch_size, sa.key_channels, -1).permute(0, 2, 1)
    key = sa.f_key(x).reshape(batch_size, sa.key_channels, -1)
    sim_map = F.softmax(torch.matmul(query, key) * sa.key_channels ** -0.5, dim=-1)
    context = torch.matmul(sim_map, value).permute(0, 2, 1).contiguous()
    return sa.W(context.reshape(batch_size, sa.value_channels, h, w))


class OfficialISA(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def isa_block(self, x):
        blk = self.block
        n, c, h, w = x.size()
        dh, dw = blk.down_factor
        out_h, out_w = math.ceil(h / dh), math.ceil(w / dw)
        pad_h, pad_w = out_h * dh - h, out_w * dw - w
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        feats = x.reshape(n, c, out_h, dh, out_w, dw)
        feats = feats.permute(0, 3, 5, 1, 2, 4).contiguous().reshape(-1, c, out_h, out_w)
        feats = official_sa(blk.long_range_sa, feats)
        c = blk.channels
        feats = feats.reshape(n, dh, dw, c, out_h, out_w)
        feats = feats.permute(0, 4, 5, 3, 1, 2).contiguous().reshape(-1, c, dh, dw)
        feats = official_sa(blk.short_range_sa, feats)
        feats = feats.reshape(n, out_h, out_w, c, dh, dw).permute(0, 3, 1, 4, 2, 5)
        feats = feats.contiguous().reshape(n, c, dh * out_h, dw * out_w)
        return feats[:, :, pad_h // 2:pad_h // 2 + h, pad_w // 2:pad_w // 2 + w]

    def forward(self, x):
        ctx = self.isa_block(x)
        return self.block.conv_bn(torch.cat([ctx, x] if self.block.context_first else [x, ctx], 1))


REFERENCES = {"isa": [("official code (per-group bmm)", OfficialISA)]}
