"""Benchmark reference for APCNet's ACM: mmsegmentation's formulation (`apc_head.py`, `ACM.forward`):
permuted, contiguous (B, s^2, C') region features, the (B, N, s^2) affinity built through a permute and
reshape, the global term resized to the map, torch.matmul, permute back. Holds the block and reuses its
layers (same parameters and outputs)."""
import torch
import torch.nn.functional as F
from torch import nn


class MMSegACM(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        blk = self.block
        s, c = blk.pool_scale, blk.out_channels
        pooled_x = F.adaptive_avg_pool2d(x, s)
        x = blk.input_redu_conv(x)
        pooled_x = blk.pooled_redu_conv(pooled_x)
        b = x.size(0)
        pooled_x = pooled_x.view(b, c, -1).permute(0, 2, 1).contiguous()
        glob = F.interpolate(blk.global_info(F.adaptive_avg_pool2d(x, 1)), size=x.shape[2:], mode="bilinear",
                             align_corners=False)
        affinity = blk.gla(x + glob).permute(0, 2, 3, 1).reshape(b, -1, s ** 2)
        z = torch.matmul(torch.sigmoid(affinity), pooled_x).permute(0, 2, 1).contiguous()
        z = blk.residual_conv(z.view(b, c, x.size(2), x.size(3)))
        z = F.relu(z + x)
        return blk.fusion_conv(z) if blk.fusion else z


REFERENCES = {"acm": [("mmseg code (permute + matmul)", MMSegACM)]}
