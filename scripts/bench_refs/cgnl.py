"""Benchmark reference for `cgnl` / `cgnl_gaussian`: KaiyuYue/cgnl-network.pytorch `model/resnet.py`.

`SpatialCGNL.forward` / `SpatialCGNLx.forward` as written: theta/phi/g split into groups with
`torch.split`, each group flattened to (b, 1, c*h*w) and its kernel computed with `bmm` (the Gaussian
kernel concatenates the scaled Taylor powers of theta and phi, order+1 rows, then two `bmm`), groups
concatenated, grouped conv z, GroupNorm and the residual. The reference holds the block and reuses its
layers (`t`, `p`, `g`, `z`, `gn` are the official names). `reshape` stands for the official `view` so
that channels_last inputs work too.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class OfficialCGNL(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def kernel(self, t, p, g, b, c, h, w):
        blk = self.block
        t = t.reshape(b, 1, c * h * w)
        p = p.reshape(b, 1, c * h * w)
        g = g.reshape(b, c * h * w, 1)
        if blk.kernel == "dot":                                   # SpatialCGNL.kernel
            att = torch.bmm(p, g)
            if blk.use_scale:
                att = att.div((c * h * w) ** 0.5)
            return torch.bmm(att, t).reshape(b, c, h, w)
        gamma = torch.full((1,), blk.gamma, dtype=t.dtype, device=t.device)   # SpatialCGNLx.kernel
        beta = torch.exp(-2 * gamma)
        t_taylor, p_taylor = [], []
        for order in range(blk.order + 1):
            alpha = torch.sqrt(torch.mul(torch.div(torch.pow(2 * gamma, order), math.factorial(order)), beta))
            t_taylor.append(t.pow(order).mul(alpha))
            p_taylor.append(p.pow(order).mul(alpha))
        t_taylor = torch.cat(t_taylor, dim=1)
        p_taylor = torch.cat(p_taylor, dim=1)
        att = torch.bmm(p_taylor, g)
        if blk.use_scale:
            att = att.div((c * h * w) ** 0.5)
        att = att.reshape(b, 1, blk.order + 1)
        return torch.bmm(att, t_taylor).reshape(b, c, h, w)

    def forward(self, x):
        blk = self.block
        residual = x
        t, p, g = blk.t(x), blk.p(x), blk.g(x)
        b, c, h, w = t.size()
        _c = c // blk.groups
        ts = torch.split(t, _c, dim=1)
        ps = torch.split(p, _c, dim=1)
        gs = torch.split(g, _c, dim=1)
        x = torch.cat([self.kernel(ts[i], ps[i], gs[i], b, _c, h, w) for i in range(blk.groups)], dim=1)
        return blk.gn(blk.z(x)) + residual


REFERENCES = {
    "cgnl": [("official SpatialCGNL (split + view/bmm per group)", OfficialCGNL)],
    "cgnl_gaussian": [("official SpatialCGNLx (split + Taylor cat + bmm per group)", OfficialCGNL)],
}
