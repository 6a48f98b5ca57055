"""GloRe: the Global Reasoning unit, as a plug-in block.

Graph-Based Global Reasoning Networks (Chen, Rohrbach, Yan, Yan, Feng, Kalantidis, CVPR 2019,
arXiv 1811.12814). Official code: facebookresearch/GloRe, `network/global_reasoning_unit.py`
(`GCN`, `GloRe_Unit`); the parameter names follow that file (`conv_state`, `conv_proj`,
`gcn.conv1`, `gcn.conv2`, `conv_extend`, `blocker`), so `GloRe_Unit_2D` state dicts load directly.

Placement in the paper / repo: ImageNet ResNet-50 with +3 GloRe units in res4 (78.4 top-1) or +2 in
res3 and +3 in res4 (78.2); the released video ResNet-50 (`resnet50_3d_gcn_x5.py`, "+2 / +3") inserts a unit after
the 1st and 3rd res3 blocks and after the 1st, 3rd and 5th res4 blocks (0-based block indices 0, 2 and
0, 2, 4; num_mid = C/4 there), *between* residual blocks, not inside one (the ImageNet code ships only
inside the model tarballs). Segmentation (Cityscapes): FCN with a single GloRe unit on the res5 output.
"""
from __future__ import annotations

from itertools import chain

import torch
import torch.nn.functional as F
from timm.layers import get_act_layer
from torch import Tensor, nn

from ..ops.amp import no_autocast
from ..registry import GLOBAL, register_attn
from ._utils import TimmInitHooks, check_channels, check_input, factory
from .non_local import _acc_dtype

_PAPER = "Graph-Based Global Reasoning Networks (CVPR 2019, arXiv 1811.12814)"


class GCN(nn.Module):
    """One graph convolution over a (B, S, Nn) node-state matrix V, as the official `GCN`: a Conv1d
    across the *node* axis (Nn -> Nn, with bias; the adjacency A_g), plus V (the "I" of (I - A_g),
    the sign absorbed into A_g), the activation, then a Conv1d across the *state* axis (S -> S, no
    bias; the state update W_g).
    """

    def __init__(self, num_state: int, num_node: int, act_layer=None, device=None, dtype=None):
        super().__init__()
        dd = factory(device, dtype)
        self.conv1 = nn.Conv1d(num_node, num_node, 1, **dd)
        self.act = get_act_layer(act_layer or "relu")()
        self.conv2 = nn.Conv1d(num_state, num_state, 1, bias=False, **dd)

    def forward(self, v: Tensor) -> Tensor:  # in v's dtype (fp32 for a half-precision unit)
        b1 = self.conv1.bias
        b1 = None if b1 is None else b1.to(v.dtype)
        h = F.conv1d(v.transpose(1, 2), self.conv1.weight.to(v.dtype), b1).transpose(1, 2) + v  # mixes nodes
        return F.conv1d(self.act(h), self.conv2.weight.to(v.dtype))                            # mixes states


def _norm(bn: nn.Module, y: Tensor) -> Tensor:
    """bn(y) in y's dtype, also for a half-precision bn: through wider copies of its parameters and
    statistics (the updated statistics are written back)."""
    state = dict(chain(bn.named_parameters(), bn.named_buffers()))
    if all(t.dtype == y.dtype for t in state.values() if t.is_floating_point()):
        return bn(y)
    wide = {k: t.to(y.dtype) if t.is_floating_point() else t for k, t in state.items()}
    out = torch.func.functional_call(bn, wide, (y,))
    with torch.no_grad():
        for k, t in bn.named_buffers():
            if t.is_floating_point():
                t.copy_(wide[k])
    return out


@register_attn("glore", family="glore", kind=GLOBAL, paper=_PAPER, year=2019,
               attends="Nn graph nodes (linear projection of all positions)", cost="O(N C^2)")
class GloReUnit(TimmInitHooks, nn.Module):
    """Global Reasoning unit, from "Graph-Based Global Reasoning Networks" (Chen et al., CVPR 2019,
    arXiv 1811.12814), as the official `GloRe_Unit_2D`: state X_s = conv_state(x) (1x1, C -> S = 2 *
    num_mid, bias), projection B = conv_proj(x) (1x1, C -> Nn = num_mid nodes, bias, no softmax), node
    features V = X_s B^T (B, S, Nn), optionally divided by L = H*W (`normalize`), one GCN (node-wise
    Conv1d + V, ReLU, state-wise Conv1d), reverse projection Y = GCN(V) B with the *same* B, and
    out = x + BN(conv_extend(Y)) (1x1 S -> C, no bias; BN eps 1e-4). num_mid defaults to
    C * rd_ratio = C/4 (state C/2), the official R50 setting. The BN weight is zero-initialised, so
    the unit starts as the identity (the official comment says so; its xavier initializer sets 1).
    `normalize=False` is the official default: the node features then grow with L, so train and test
    at one size, or set `normalize=True` (recommended when input sizes vary). Differs from the official
    code only in the order of the products: conv_state and conv_extend are applied on the Nn-column
    side (V = W_s (X B^T) + b_s (B 1)^T, out = (W_e GCN(V)) B), which is exact and halves the FLOPs:
    O(N C Nn) = O(N C^2 / 4) per product, 3 products, and no (B, S, N) tensor. The products grow as
    |x|^3 until the BN: for fp16/bf16 inputs they and the BN run in fp32 (half-precision BN statistics
    still overflow when var(Y) > 65504: keep `blocker` in fp32 for `.half()` inference). act_layer
    replaces the GCN's ReLU (default ReLU). Cost O(N C^2) time, O(N (C + Nn)) memory, N = H*W.
    """

    def __init__(self, channels: int, *, num_mid: int | None = None, normalize: bool = False,
                 rd_ratio: float = 1 / 4, act_layer=None, device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        check_channels(name, channels)
        if num_mid is None:
            if not rd_ratio > 0:
                raise ValueError(f"{name}: rd_ratio must be > 0, got {rd_ratio!r}")
            num_mid = max(1, int(channels * rd_ratio))
        if not isinstance(num_mid, int) or num_mid < 1:
            raise ValueError(f"{name}: num_mid must be a positive integer, got {num_mid!r}")
        dd = factory(device, dtype)
        self.channels, self.normalize = channels, bool(normalize)
        self.num_s, self.num_n = 2 * num_mid, num_mid
        self.conv_state = nn.Conv2d(channels, self.num_s, 1, **dd)
        self.conv_proj = nn.Conv2d(channels, self.num_n, 1, **dd)
        self.gcn = GCN(self.num_s, self.num_n, act_layer=act_layer, **dd)
        self.conv_extend = nn.Conv2d(self.num_s, channels, 1, bias=False, **dd)
        self.blocker = nn.BatchNorm2d(channels, eps=1e-4, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BN weight 0 (identity at init); the convs keep PyTorch's default init."""
        nn.init.zeros_(self.blocker.weight)

    def extra_repr(self) -> str:
        return f"num_state={self.num_s}, num_node={self.num_n}, normalize={self.normalize}"

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_input(self, x, self.channels)
        b, c, h, w = x.shape
        proj = self.conv_proj(x).flatten(2)                                   # B: (B, Nn, L)
        with no_autocast(x.device):   # products growing as |x|^3, until the BN: fp32
            acc = _acc_dtype(proj)
            proj = proj.to(acc)
            b_s = self.conv_state.bias
            assert b_s is not None  # conv_state is built with a bias (the assert narrows the type for TorchScript)
            w_s, b_s = self.conv_state.weight.flatten(1).to(acc), b_s.to(acc)
            w_e = self.conv_extend.weight.flatten(1).to(acc)
            x_nodes = torch.matmul(x.flatten(2).to(acc), proj.transpose(1, 2))   # X B^T: (B, C, Nn)
            v = torch.matmul(w_s, x_nodes)                                      # W_s X B^T: (B, S, Nn)
            v = v + b_s[:, None] * proj.sum(-1)[:, None, :]                     # + b_s (B 1)^T
            if self.normalize:
                v = v * (1.0 / (h * w))
            z = torch.matmul(w_e, self.gcn(v))                                  # W_e GCN(V): (B, C, Nn)
            y = torch.matmul(z, proj).view(b, c, h, w)                          # reverse projection, same B
            if torch.jit.is_scripting():  # (a scripted unit runs in one dtype)
                y = self.blocker(y)
            else:
                y = _norm(self.blocker, y)
        return x + y.to(x.dtype)
