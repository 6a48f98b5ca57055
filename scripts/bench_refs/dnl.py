"""Benchmark reference for `dnl` / `dnl_mmseg`: the dense formulations of the official code and of mmseg.

- `dnl` (mode "official"): yinmh17/DNL-Semantic-Segmentation `model/seg/ops/nonlocal_block.py`,
  `_NonLocalNd_bn.forward` with whiten_type "channel", `with_gc=True`, `use_out=False`, `out_bn=False`, no
  downsampling: a materialised (B, N, N) `sim_map` by `bmm`, divided by sqrt(planes) and the temperature,
  softmax over keys, gamma on the pairwise term, the unary (`conv_mask`) term added ungated.
- `dnl_mmseg` (mode "mmseg"): open-mmlab/mmsegmentation `mmseg/models/decode_heads/dnl_head.py`,
  `DisentangledNonLocal2d.forward`: (B, N, N) `pairwise_weight` by `matmul`, then x + conv_out(y + unary).

The reference holds the block and reuses its convs (mmseg's module names in both modes).
"""
from __future__ import annotations

import torch
from torch import nn


class DenseDNL(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def official(self, x):
        blk = self.block
        residual = x
        query = blk.theta(x)
        key = blk.phi(x)
        value = blk.g(x)
        query = query.view(query.size(0), query.size(1), -1)
        key = key.view(key.size(0), key.size(1), -1)
        value = value.view(value.size(0), value.size(1), -1)
        key = key - key.mean(2).unsqueeze(2)                       # whiten_type "channel"
        query = query - query.mean(2).unsqueeze(2)
        sim_map = torch.bmm(query.transpose(1, 2), key)           # (B, N, N)
        if blk.use_scale:
            sim_map = sim_map / query.size(1) ** 0.5
        sim_map = sim_map / blk.temperature
        sim_map = torch.softmax(sim_map, dim=2)
        out_sim = torch.bmm(sim_map, value.transpose(1, 2)).transpose(1, 2)
        out_sim = out_sim.reshape(out_sim.size(0), out_sim.size(1), *x.size()[2:])
        out_sim = blk.gamma * out_sim
        mask = blk.conv_mask(x)
        mask = torch.softmax(mask.view(mask.size(0), mask.size(1), -1), dim=2)
        out_gc = torch.bmm(value, mask.permute(0, 2, 1)).unsqueeze(-1)
        return out_sim + out_gc + residual

    def mmseg(self, x):
        blk = self.block
        n = x.size(0)
        g_x = blk.g(x).view(n, blk.inter, -1).permute(0, 2, 1)
        theta_x = blk.theta(x).view(n, blk.inter, -1).permute(0, 2, 1)
        phi_x = blk.phi(x).view(n, blk.inter, -1)
        theta_x = theta_x - theta_x.mean(dim=-2, keepdim=True)
        phi_x = phi_x - phi_x.mean(dim=-1, keepdim=True)
        pairwise_weight = torch.matmul(theta_x, phi_x)            # (B, N, N)
        if blk.use_scale:
            pairwise_weight = pairwise_weight / theta_x.shape[-1] ** 0.5
        pairwise_weight = (pairwise_weight / blk.temperature).softmax(dim=-1)
        y = torch.matmul(pairwise_weight, g_x)
        y = y.permute(0, 2, 1).contiguous().reshape(n, blk.inter, *x.size()[2:])
        unary_mask = blk.conv_mask(x).view(n, 1, -1).softmax(dim=-1)
        unary_x = torch.matmul(unary_mask, g_x).permute(0, 2, 1).contiguous().reshape(n, blk.inter, 1, 1)
        return x + blk.conv_out(y + unary_x)

    def forward(self, x):
        return self.official(x) if self.block.mode == "official" else self.mmseg(x)


REFERENCES = {
    "dnl": [("official code (bmm, N x N sim_map)", DenseDNL)],
    "dnl_mmseg": [("mmseg DisentangledNonLocal2d (matmul, N x N)", DenseDNL)],
}
