"""mmseg's PSAHead formulation of `psanet` (open-mmlab/mmsegmentation `decode_heads/psa_head.py` with
mmcv's `PSAMask`): each branch's over-complete mask is scattered into the dense (B, H*W, H, W) map that
mmcv's compiled kernel writes (here one loop-free index_put from precomputed (source, destination) pairs,
the same positions the kernel loops over), then softmax over dim 1 and torch.bmm, as in mmseg. Shares the
block's convolutions; differs from the block only in how the attention map is formed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def psamask_dense(mask: torch.Tensor, psa_type: str, mask_h: int, mask_w: int) -> torch.Tensor:
    """mmcv's PSAMask forward: (B, mask_h*mask_w, H, W) -> (B, H*W, H, W), zeros outside the mask window."""
    b, _, h, w = mask.shape
    n = h * w
    half_h, half_w = (mask_h - 1) // 2, (mask_w - 1) // 2
    dev = mask.device
    hidx = torch.arange(mask_h, device=dev).view(-1, 1, 1, 1)
    widx = torch.arange(mask_w, device=dev).view(1, -1, 1, 1)
    hp, wp = torch.arange(h, device=dev).view(1, 1, -1, 1), torch.arange(w, device=dev).view(1, 1, 1, -1)
    # feature position (th, tw) reached from pixel (hp, wp) by mask index (hidx, widx), all (mask_h, mask_w, H, W)
    th, tw, pix = torch.broadcast_tensors(hidx + hp - half_h, widx + wp - half_w, hp * w + wp)
    valid = (th >= 0) & (th < h) & (tw >= 0) & (tw < w)
    pos = th * w + tw
    dst = (pos * n + pix) if psa_type == "collect" else (pix * n + pos)
    src = torch.arange(mask_h * mask_w * n, device=dev).view(mask_h, mask_w, h, w)
    out = mask.new_zeros(b, n * n)
    out[:, dst[valid]] = mask.reshape(b, -1)[:, src[valid]]
    return out.view(b, n, h, w)


class MMSegPSAHead(nn.Module):
    """mmseg PSAHead.forward (bi-direction / collect / distribute, compact=False) on the block's modules."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        blk = self.block
        identity = x
        n, _, h, w = x.shape
        s = blk.shrink_factor
        align_corners = False
        if s != 1:
            if h % s and w % s:
                h, w, align_corners = (h - 1) // s + 1, (w - 1) // s + 1, True
            else:
                h, w = max(1, h // s), max(1, w // s)
        if blk.psa_type == "bi-direction":
            branches = [(blk.reduce, blk.attention, "collect"), (blk.reduce_p, blk.attention_p, "distribute")]
        else:
            branches = [(blk.reduce, blk.attention, blk.psa_type)]
        outs = []
        for reduce, attention, psa_type in branches:
            feat = reduce(x)
            c = feat.shape[1]
            if s != 1:
                feat = F.interpolate(feat, size=(h, w), mode="bilinear", align_corners=align_corners)
            y = psamask_dense(attention(feat), psa_type, *blk.mask_size)
            if blk.psa_softmax:
                y = F.softmax(y, dim=1)
            outs.append(torch.bmm(feat.reshape(n, c, h * w), y.view(n, h * w, h * w)).view(n, c, h, w)
                        * (1.0 / blk.normalization_factor))
        out = blk.proj(torch.cat(outs, 1))
        out = F.interpolate(out, size=identity.shape[2:], mode="bilinear", align_corners=align_corners)
        return blk.act(blk.bottleneck(torch.cat((identity, out), dim=1)))


REFERENCES = {"psanet": [("mmseg PSAHead (dense PSAMask scatter + bmm)", MMSegPSAHead)]}
