"""Benchmark reference for `dgmn`: lzrobots/dgmn `maskrcnn_benchmark/layers/dynamic_weight.py`.

`DynamicWeightsCat11.forward` as written: per dilation the filter/offset/modulation conv, the filter
softmax on a (B*G*H*W, 9) matrix, the neighbours gathered to (B, C'*9, H*W) (`nn.Unfold`, or the CUDA
`DeformUnfold` in the deformable modes, here its DCN v1 im2col written out with floor / four-corner
gathers), multiplied by the sigmoid modulation, permuted to (B*G*H*W, R, 9) and reduced by `bmm` with
the filters, then concat -> scale2 -> scale3 + x. The block uses grid_sample and one einsum instead.
The reference holds the block and reuses its layers (official names); it follows the block in reading
the offsets after the 9 * group filter logits (the official 'deform' mode slices 9, i.e. group 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dcn_v1_unfold(x, offset, d):
    """DCN v1 deformable im2col, kernel 3, padding = dilation = d: (B, C, H, W) -> (B, C*9, H*W)."""
    b, c, h, w = x.shape
    off = offset.reshape(b, 9, 2, h, w)
    k = torch.arange(9, device=x.device)
    py = torch.arange(h, device=x.device).view(1, 1, h, 1) + ((k // 3 - 1) * d).view(1, 9, 1, 1) + off[:, :, 0]
    px = torch.arange(w, device=x.device).view(1, 1, 1, w) + ((k % 3 - 1) * d).view(1, 9, 1, 1) + off[:, :, 1]
    inside = (py > -1) & (px > -1) & (py < h) & (px < w)
    y0, x0 = py.floor(), px.floor()
    ly, lx = py - y0, px - x0
    flat = x.reshape(b, c, h * w)
    cols = 0
    for yy, xx, wt in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
                       (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
        ok = inside & (yy >= 0) & (yy <= h - 1) & (xx >= 0) & (xx <= w - 1)
        idx = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).long().reshape(b, 1, 9 * h * w).expand(b, c, -1)
        cols = cols + flat.gather(2, idx).reshape(b, c, 9, h * w) * (wt * ok).reshape(b, 1, 9, h * w)
    return cols.reshape(b, c * 9, h * w)


class OfficialDGMN(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        blk = self.block
        xd = blk.scale1(x)
        n, c, h, w = xd.size()
        g, k = blk.group, 9
        r = c // g
        outs = [xd]
        for i, d in enumerate(blk.dilations):
            pred = getattr(blk, f"cat{chr(97 + i)}")(xd)
            filt = pred[:, :k * g]
            filt = torch.softmax(filt.reshape(n, g, k, -1).permute(0, 1, 3, 2).contiguous().reshape(-1, k), dim=-1)
            if blk.mode == "none":
                cols = F.unfold(xd, 3, dilation=d, padding=d)
            else:
                cols = dcn_v1_unfold(xd, pred[:, k * g:k * g + 18], d)
            cols = cols.reshape(n, c, k, h * w)
            if blk.mode == "deformatt":
                cols = cols * pred[:, -k:].reshape(n, 1, k, h * w).sigmoid()
            cols = cols.permute(0, 1, 3, 2).contiguous().reshape(n, g, r, h * w, k).permute(0, 1, 3, 2, 4)
            cols = cols.contiguous().reshape(n * g * h * w, r, k)                  # (BGHW, R, K)
            out = torch.bmm(cols, filt.unsqueeze(2))
            outs.append(out.reshape(n, g, h * w, r).permute(0, 1, 3, 2).contiguous().reshape(n, g * r, h, w))
        return blk.scale3(blk.scale2(torch.cat(outs, 1))) + x


REFERENCES = {"dgmn": [("official DynamicWeightsCat11 (unfold / DCN im2col + permutes + bmm)", OfficialDGMN)]}
