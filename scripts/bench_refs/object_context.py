"""Benchmark references for `base_oc` and `ocr`: the openseg.pytorch computations, with materialised maps.

`base_oc`: `_SelfAttentionBlock.forward` of `lib/models/modules/base_oc_block.py`, the dense (B, N, N)
similarity map by bmm, softmax over keys, then `BaseOC_Module`'s concat fusion. `ocr`:
`SpatialGather_Module` (softmax over pixels, bmm) and `_ObjectAttentionBlock` (the (B, N, K) pixel-region
similarity by bmm) + `SpatialOCR_Module`'s fusion. Each reference holds the block and reuses its layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def official_self_attention(sa, query_feats, key_feats=None):
    """openseg `_SelfAttentionBlock` / `_ObjectAttentionBlock` attention with the explicit similarity map."""
    key_feats = query_feats if key_feats is None else key_feats
    b, h, w = query_feats.size(0), query_feats.size(2), query_feats.size(3)
    value = sa.f_value(key_feats).reshape(b, sa.value_channels, -1).permute(0, 2, 1)
    query = sa.f_query(query_feats).reshape(b, sa.key_channels, -1).permute(0, 2, 1)
    key = sa.f_key(key_feats).reshape(b, sa.key_channels, -1)
    sim_map = torch.matmul(query, key) * sa.key_channels ** -0.5          # (B, N, N) or (B, N, K)
    sim_map = F.softmax(sim_map, dim=-1)
    context = torch.matmul(sim_map, value).permute(0, 2, 1).contiguous()
    return sa.W(context.reshape(b, sa.value_channels, h, w))


class OfficialBaseOC(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        blk = self.block
        h, w = x.shape[-2:]
        if blk.scale > 1:  # official nn.MaxPool2d(scale) (floor mode); ceil mode here as the block
            ctx = official_self_attention(blk.attn, F.max_pool2d(x, blk.scale, blk.scale, ceil_mode=True))
            ctx = F.interpolate(ctx, size=(h, w), mode="bilinear", align_corners=True)
        else:
            ctx = official_self_attention(blk.attn, x)
        return blk.conv_bn_dropout(torch.cat([ctx, x], 1))


class OfficialOCR(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, feats, probs):
        blk = self.block
        b, k = probs.size(0), probs.size(1)
        probs = F.softmax(blk.scale * probs.reshape(b, k, -1), dim=2)      # (B, K, N), over pixels
        proxy = torch.matmul(probs, feats.reshape(b, feats.size(1), -1).permute(0, 2, 1))
        proxy = proxy.permute(0, 2, 1).unsqueeze(3)                         # (B, C, K, 1)
        context = official_self_attention(blk.object_context_block, feats, proxy)
        return blk.conv_bn_dropout(torch.cat([context, feats], 1))


def ocr_inputs(b, c, h, w):
    """Features and 19-class (Cityscapes) region logits at the same resolution."""
    return torch.randn(b, c, h, w), torch.randn(b, 19, h, w)


REFERENCES = {
    "base_oc": [("official code (dense bmm)", OfficialBaseOC)],
    "ocr": [("official code (bmm, N x K map)", OfficialOCR)],
}
INPUTS = {"ocr": ocr_inputs}
