"""Benchmark reference for A2-Net's double attention: the A (B^T V) association, which materialises
the (B, N, N) matrix B^T V (the common but wasteful form; the authors released no code). Holds the
block and reuses its convs (same parameters and outputs); the block computes (A B^T) V instead,
O(N (m + n)) memory.
"""
import torch
from torch import nn


class NaiveDoubleAttention(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        blk = self.block
        b, _, h, w = x.shape
        a = blk.conv_a(x).flatten(2)                                  # (B, m, N)
        gather = torch.softmax(blk.conv_b(x).flatten(2), dim=2)       # (B, n, N), over positions
        distribute = torch.softmax(blk.conv_v(x).flatten(2), dim=1)   # (B, n, N), over descriptors
        att = torch.bmm(gather.transpose(1, 2), distribute)           # (B, N, N)
        z = torch.bmm(a, att).reshape(b, -1, h, w)
        return x + blk.conv_out(z)


REFERENCES = {"a2": [("naive A (B^T V), N x N", NaiveDoubleAttention)]}
