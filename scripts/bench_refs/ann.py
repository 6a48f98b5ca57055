"""Benchmark references for ANN's APNB / AFNB: the official code's formulation (MendelXu/ANN,
`models/seg/utils/apnb.py`, `afnb.py`): PSPModule pooling, the (N, S) similarity map materialised
with torch.matmul, softmax over S, and the shared query/key projection called twice as the official
forward does. Each reference holds the block and reuses its layers (same parameters and outputs)."""
import torch
import torch.nn.functional as F
from torch import nn


def psp(feats, sizes):
    """The official PSPModule: adaptive average pools, viewed (n, c, -1) and concatenated."""
    n, c = feats.shape[:2]
    return torch.cat([F.adaptive_avg_pool2d(feats, s).view(n, c, -1) for s in sizes], -1)


def official_attention(blk, query_feats, key_feats):
    """_SelfAttentionBlock.forward: matmul, scale, softmax over the S anchors, matmul, W."""
    b, h, w = query_feats.shape[0], query_feats.shape[2], query_feats.shape[3]
    value = psp(blk.value_project(key_feats), blk.pool_sizes).permute(0, 2, 1)
    query = blk.query_project(query_feats).view(b, blk.key_channels, -1).permute(0, 2, 1)
    key = psp(blk.key_project(key_feats), blk.pool_sizes)
    sim_map = F.softmax((blk.key_channels ** -.5) * torch.matmul(query, key), dim=-1)
    context = torch.matmul(sim_map, value).permute(0, 2, 1).contiguous()
    return blk.out_project(context.view(b, blk.value_channels, h, w))


class OfficialAPNB(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        blk = self.block
        return blk.dropout(blk.bottleneck(torch.cat([official_attention(blk, x, x), x], 1)))


class OfficialAFNB(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, low, high):
        blk = self.block
        return blk.dropout(blk.bottleneck(torch.cat([official_attention(blk, high, low), high], 1)))


REFERENCES = {
    "apnb": [("official code (matmul, N x S map)", OfficialAPNB)],
    "afnb": [("official code (matmul, N x S map)", OfficialAFNB)],
}
INPUTS = {"afnb": lambda b, c, h, w: (torch.randn(b, c // 2, h, w), torch.randn(b, c, h, w))}
