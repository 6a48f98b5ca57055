"""Benchmark reference for `glore`: facebookresearch/GloRe `network/global_reasoning_unit.py`.

`GloRe_Unit.forward` as written: conv_state and conv_proj on the full map, the projection
`matmul(x_state, x_proj^T)` (B, S, Nn), the `GCN` (permute, node Conv1d, permute, + V, ReLU, state Conv1d),
the reverse projection `matmul(x_n_rel, x_proj)` (B, S, L), then conv_extend and the BN on the full map.
The block computes the same products on the Nn-column side (no (B, S, L) tensor, half the FLOPs). The
reference holds the block and reuses its layers (official names). `reshape` stands for the official
`view` so that channels_last inputs work too.
"""
from __future__ import annotations

import torch
from torch import nn


class OfficialGloRe(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        blk = self.block
        n = x.size(0)
        x_state = blk.conv_state(x).reshape(n, blk.num_s, -1)
        x_proj = blk.conv_proj(x).reshape(n, blk.num_n, -1)
        x_n_state = torch.matmul(x_state, x_proj.permute(0, 2, 1))
        if blk.normalize:
            x_n_state = x_n_state * (1.0 / x_state.size(2))
        h = blk.gcn.conv1(x_n_state.permute(0, 2, 1).contiguous()).permute(0, 2, 1)     # GCN.forward
        x_n_rel = blk.gcn.conv2(blk.gcn.act(h + x_n_state))
        x_state = torch.matmul(x_n_rel, x_proj).reshape(n, blk.num_s, *x.size()[2:])
        return x + blk.blocker(blk.conv_extend(x_state))


REFERENCES = {"glore": [("official GloRe_Unit (conv_state on the map, matmul projections)", OfficialGloRe)]}
