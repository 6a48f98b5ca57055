"""EMANet: the Expectation-Maximization Attention unit (EMAU), as a plug-in block.

Expectation-Maximization Attention Networks for Semantic Segmentation (Li et al., ICCV 2019,
arXiv 1907.13426). Official code: XiaLiPKU/EMANet, `network.py` (`EMAU`) with the moving average of
the bases in `train.py` and the hyper-parameters in `settings.py`; mmsegmentation's `EMAModule` /
`EMAHead` (`mmseg/models/decode_heads/ema_head.py`) moves that moving average into the module with a
`reduce_mean` all-reduce, as here. Parameter and buffer names follow the official `EMAU` (`mu`,
`conv1`, `conv2.0`, `conv2.1`), so its state dicts load directly. The EMANet head (3x3 convs around
the unit, classifier) lives with the heads.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.amp import no_autocast
from ..registry import GLOBAL, register_attn
from ._utils import TimmInitHooks, check_channels, check_input, factory

_PAPER = "Expectation-Maximization Attention Networks for Semantic Segmentation (ICCV 2019, arXiv 1907.13426)"


def _l2norm(t: Tensor, dim: int, eps: float) -> Tensor:
    return t / (eps + t.norm(2, dim, True))


def em_iterations(feats: Tensor, mu: Tensor, iterations: int, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """`iterations` EM steps on feats (B, C, N) from bases mu (B, C, K), as the official EMAU.

    E-step z = softmax over the K bases of feats^T mu (no temperature); M-step mu = feats z_ with z_
    = z normalised over the N pixels (eps 1e-6), then L2-normalised over C. Returns the final bases
    (B, C, K) and the last E-step responsibilities z (B, N, K), computed from the previous bases.
    """
    if iterations < 1:
        raise ValueError("em_iterations: iterations must be >= 1")
    z = _e_step(feats, mu)
    for step in range(iterations):
        z_ = z / (eps + z.sum(dim=1, keepdim=True))                       # over the pixels
        mu = _l2norm(torch.bmm(feats, z_), 1, eps)                        # (B, C, K), unit columns
        if step + 1 < iterations:
            z = _e_step(feats, mu)
    return mu, z


def _e_step(feats: Tensor, mu: Tensor) -> Tensor:
    """(B, N, K) responsibilities: softmax over the bases of feats^T mu."""
    return torch.softmax(torch.bmm(feats.transpose(1, 2), mu), dim=2)


class FrozenConv2d(nn.Module):
    """A convolution whose `weight` and `bias` are buffers: frozen (no gradient, not in `parameters()`, so no
    optimizer or timm's every-parameter-gets-a-gradient check sees them), still in the state dict under
    nn.Conv2d's keys and moved by `.to()` / `.half()`. Built from an nn.Conv2d, whose hyper-parameters and
    values it takes; `reset_parameters` is nn.Conv2d's default init."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.register_buffer("weight", conv.weight.detach().clone())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.Conv2d.reset_parameters(self)  # kaiming-uniform weight, uniform bias: reads weight/bias/groups only

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"bias={self.bias is not None}, frozen")


@register_attn("ema", family="emanet", kind=GLOBAL, paper=_PAPER, year=2019,
               attends="K bases (EM)", cost="O(N C K T)")
class EMAUnit(TimmInitHooks, nn.Module):
    """Expectation-Maximization Attention unit (EMAU), from "Expectation-Maximization Attention Networks
    for Semantic Segmentation" (Li et al., ICCV 2019, arXiv 1907.13426), as the official `EMAU`:
    x' = conv1(x) (1x1 with bias); `iterations` (T = 3) EM steps from the bases `mu` (buffer (1, C, K),
    K = `num_bases` = 64, init N(0, sqrt(2/K)) then L2-normalised over C), see `em_iterations`;
    reconstruction mu z^T with the last E-step z, ReLU, conv2 (1x1, no bias) + BN, y = ReLU(conv2 + x).
    As in the official code the EM runs under no_grad, so conv1 never receives a gradient: it is frozen
    (as mmseg's `ema_mid_conv`, requires_grad=False there) as a `FrozenConv2d`, whose weight and bias are
    buffers under the usual keys (`conv1.weight`, `conv1.bias`: official and mmseg-converted state dicts
    load as before), so that every parameter of the block gets a gradient (timm's model tests require it);
    `no_grad_params` still names them. `em_grad=True` back-propagates through the EM and trains conv1, an
    nn.Conv2d then (the author reports it slightly worse, EMANet issue
    #14). In training mode the module itself updates `mu` (the official does it in train.py):
    mu <- momentum * mu + (1 - momentum) * mean over the batch of the final bases, averaged over all
    processes with an all-reduce when torch.distributed is initialised (the official DataParallel mean
    over the gathered batch, for equal per-rank batches; every rank must run the training forward), under
    no_grad; eval never changes it. `momentum=0.9` is the official EM_MOM (weight of the old bases);
    mmseg's `momentum=0.1` is the same update written as the weight of the new ones. The buffer is not
    re-normalised after the average (official); `norm_batch_bases=True` L2-normalises the batch-mean
    bases before it, as mmseg does. The EM and the reconstruction run in fp32 under autocast. The BN is
    a plain nn.BatchNorm2d with PyTorch's momentum (official: SyncBN, momentum 3e-4; use
    convert_sync_batchnorm). Official init (convs N(0, sqrt(2/C)), BN weight 1, bias 0), so not an
    identity at init; act_layer and rd_ratio are accepted and ignored (the two ReLUs are the method's;
    no reduction). Cost O(N C K T) time and O(N (C + K)) memory for the EM (N = H*W), plus the
    O(N C^2) 1x1 convs; no N x N tensor.
    """

    def __init__(self, channels: int, *, num_bases: int = 64, iterations: int = 3, momentum: float = 0.9,
                 norm_batch_bases: bool = False, em_grad: bool = False, eps: float = 1e-6, rd_ratio=None,
                 act_layer=None, device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        check_channels(name, channels)
        for what, v in (("num_bases", num_bases), ("iterations", iterations)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: {what} must be a positive integer, got {v!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{name}: momentum must be in [0, 1] (weight of the old bases), got {momentum!r}")
        dd = factory(device, dtype)
        self.channels, self.num_bases, self.iterations = channels, num_bases, iterations
        self.momentum, self.norm_batch_bases, self.em_grad, self.eps = momentum, norm_batch_bases, em_grad, eps

        mu = torch.empty(1, channels, num_bases, **dd).normal_(0, math.sqrt(2.0 / num_bases))
        self.register_buffer("mu", _l2norm(mu, 1, eps))
        self.conv1 = nn.Conv2d(channels, channels, 1, **dd)
        self.conv2 = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False, **dd), nn.BatchNorm2d(channels, **dd))
        for conv in (self.conv1, self.conv2[0]):
            nn.init.normal_(conv.weight, 0, math.sqrt(2.0 / channels))
        if not em_grad:
            self.conv1 = FrozenConv2d(self.conv1)
        # the frozen mid conv's tensors, which get no gradient by design (buffers: not in parameters())
        self.no_grad_params = () if em_grad else ("conv1.weight", "conv1.bias")

    def reset_parameters(self) -> None:
        """Official init: bases N(0, sqrt(2/K)) L2-normalised over C, both convs N(0, sqrt(2/C)) (conv1's bias
        PyTorch's default); the BN weight 1, bias 0."""
        with torch.no_grad():
            self.mu.normal_(0, math.sqrt(2.0 / self.num_bases))
            self.mu.copy_(_l2norm(self.mu, 1, self.eps))
            for conv in (self.conv1, self.conv2[0]):
                conv.weight.normal_(0, math.sqrt(2.0 / self.channels))

    @property
    def bases(self) -> Tensor:
        """The stored bases (1, C, K) (the official buffer name is `mu`)."""
        return self.mu

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_input(self, x, self.channels)
        if self.em_grad:
            recon, mu = self.reconstruct(x)
        else:
            with torch.no_grad():
                recon, mu = self.reconstruct(x)
        if self.training:
            if torch.jit.is_scripting():
                raise RuntimeError("EMAUnit: a TorchScript-compiled EMA unit runs in eval mode only (its bases "
                                   "update is Python: torch.distributed)")
            self._update_bases(mu.detach())
        # clamp_min == ReLU, but autograd keeps its input, not its output: timm's blocks add the shortcut
        # to the attention output in place, which a saved ReLU output would not survive
        return (self.conv2(F.relu(recon)) + x).clamp_min(0)

    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """conv1, the EM iterations (fp32 under autocast) and the reconstruction mu z^T: ((B, C, H, W), final
        bases (B, C, K))."""
        b, c, h, w = x.shape
        feats = self.conv1(x)
        with no_autocast(x.device):
            acc = torch.float32 if feats.dtype in (torch.float16, torch.bfloat16) else feats.dtype
            feats = feats.reshape(b, c, h * w).to(acc)
            # a copy: the in-place moving average must not touch a tensor saved for backward
            mu0 = self.mu.to(acc, copy=True).expand(b, -1, -1)
            mu, z = em_iterations(feats, mu0, self.iterations, self.eps)
            recon = torch.bmm(mu, z.transpose(1, 2)).reshape(b, c, h, w).to(x.dtype)
        return recon, mu

    @torch.compiler.disable
    @torch.no_grad()
    def _update_bases(self, mu: Tensor) -> None:
        """mu_buffer <- momentum * mu_buffer + (1 - momentum) * mean of the final bases over the global batch."""
        mean = mu.mean(dim=0, keepdim=True)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        if self.norm_batch_bases:
            mean = _l2norm(mean, 1, self.eps)
        self.mu.mul_(self.momentum).add_(mean.to(self.mu.dtype), alpha=1.0 - self.momentum)

    def extra_repr(self) -> str:
        return (f"num_bases={self.num_bases}, iterations={self.iterations}, momentum={self.momentum}, "
                f"norm_batch_bases={self.norm_batch_bases}, em_grad={self.em_grad}")
