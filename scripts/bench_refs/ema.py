"""Benchmark reference for EMANet's EM attention unit: the official formulation (XiaLiPKU/EMANet,
`network.py`, `EMAU.forward`): conv1, bases repeated over the batch, the EM loop under torch.no_grad
with torch.bmm and an explicit (B, N, C) permute of the features, reconstruction by matmul, ReLU,
conv2 + BN, ReLU of the residual sum. Holds the block and reuses its conv1, conv2 and bases `mu`
(same parameters and outputs in eval mode).

It never writes the block's `mu`: the official unit only returns the final bases and leaves the
moving average to `train.py`, and this reference calls the block's layers, not `block.forward`, so
benchmarking it in eval (or train) mode leaves the buffer untouched. (The block itself updates `mu`
in train mode only; the omitted moving average is a C x K operation, negligible in the timings.)
"""
import torch
import torch.nn.functional as F
from torch import nn


class OfficialEMAU(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    @staticmethod
    def _l2norm(inp, dim):
        return inp / (1e-6 + inp.norm(dim=dim, keepdim=True))

    def forward(self, x):
        blk = self.block
        idn = x
        x = blk.conv1(x)
        b, c, h, w = x.size()
        x = x.reshape(b, c, h * w)                   # the official .view, which channels_last would reject
        mu = blk.mu.repeat(b, 1, 1)
        with torch.no_grad():
            for _ in range(blk.iterations):
                x_t = x.permute(0, 2, 1)             # b * n * c
                z = torch.bmm(x_t, mu)               # b * n * k
                z = F.softmax(z, dim=2)
                z_ = z / (1e-6 + z.sum(dim=1, keepdim=True))
                mu = torch.bmm(x, z_)                # b * c * k
                mu = self._l2norm(mu, dim=1)
        x = mu.matmul(z.permute(0, 2, 1)).view(b, c, h, w)
        x = F.relu(x, inplace=True)
        x = blk.conv2(x)
        return F.relu(x + idn, inplace=True)


REFERENCES = {"ema": [("official code (bmm)", OfficialEMAU)]}
