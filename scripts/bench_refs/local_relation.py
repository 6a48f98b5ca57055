"""Reference for `local_relation`: the unfold formulation of the local relation layer (as the public
PyTorch re-implementations of LR-Net: F.unfold of keys and values, explicit -(q - k)^2, softmax over
the window), sharing the block's weights; out-of-image taps are masked as in the official kernel."""
import torch
import torch.nn.functional as F
from torch import nn


class UnfoldLocalRelation(nn.Module):
    """Local relation layer on materialised (B, C, k^2, N) unfolded keys and values."""

    def __init__(self, block):
        super().__init__()
        self.b = block

    def forward(self, x):
        blk = self.b
        b, c, h, w = x.shape
        k, d, s, g = blk.kernel_size, blk.dilation, blk.stride, blk.groups
        pad = d * (k // 2)
        ho, wo = (h - 1) // s + 1, (w - 1) // s + 1

        def unfold(t):  # (B, C', H, W) -> (B, C', k*k, Ho, Wo)
            return F.unfold(t, k, dilation=d, padding=pad, stride=s).view(t.shape[0], t.shape[1], k * k, ho, wo)

        q = blk.query(x[:, :, ::s, ::s]).view(b, g, -1, 1, ho, wo)
        keys = unfold(blk.key(x)).view(b, g, -1, k * k, ho, wo)
        logits = -(q - keys).square().sum(2) + blk.geometry_prior()[None, :, :, None, None]
        inside = unfold(torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device)) > 0
        weights = logits.masked_fill(~inside.view(1, 1, k * k, ho, wo), float("-inf")).softmax(2)
        out = (unfold(x).view(b, g, c // g, k * k, ho, wo) * weights[:, :, None]).sum(3).view(b, c, ho, wo)
        return out if blk.proj is None else blk.proj(out)


REFERENCES = {"local_relation": [("unfold (naive PyTorch LR layer)", UnfoldLocalRelation)]}
