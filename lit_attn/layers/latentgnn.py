"""LatentGNN: non-local relations through a small latent graph, as a plug-in block.

LatentGNN: Learning Efficient Non-local Relations for Visual Recognition (Zhang, Yan, He, ICML 2019,
arXiv 1905.11634). Official code: latentgnn/LatentGNN-V1-PyTorch, `lib/latentgnn_v1.py`
(`LatentGNNV1`, `LatentGNN_Kernel`); the parameter names follow that file (`down_channel_v2l`,
`down_channel_l2v`, `LatentGNN_Kernel_<i>.psi_v2l` / `psi_l2v`, `up_channel`, `gamma`), so its state
dicts load directly.

Placement (detection code latentgnn/maskrcnn-benchmark-latentgnn, `resnet_aug.py`): one LatentGNN
module after the *last block* of a ResNet stage ("C3", "C4", "C5" = after res3 / res4 / res5, or all
three "C345"); COCO Mask R-CNN R-50-FPN box AP 37.8 -> 39.0 (C4), 39.5 (C345) [LatentGNN_MODEL_ZOO.md].
Its defaults there: latent nodes (150, 150, 100, 50) for res2..res5, channel stride 8 (4 in the run
scripts), one kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import get_act_layer
from torch import Tensor, nn

from ..ops.amp import no_autocast
from ..registry import GLOBAL, register_attn
from ._utils import TimmInitHooks, check_channels, check_input, factory
from .non_local import _acc_dtype

_PAPER = "LatentGNN: Learning Efficient Non-local Relations for Visual Recognition (ICML 2019, arXiv 1905.11634)"
_MODES = ("asymmetric", "symmetric")


def _normalize(t: Tensor, dim: int) -> Tensor:
    """F.normalize in fp32 for fp16/bf16 inputs (its eps 1e-12 is 0 in fp16: a zero vector would give 0/0)."""
    return F.normalize(t.to(_acc_dtype(t)), dim=dim)


def _conv_bn(cin: int, cout: int, act=None, dd=None) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 1, bias=False, **dd), nn.BatchNorm2d(cout, **dd)]
    return nn.Sequential(*layers, act()) if act is not None else nn.Sequential(*layers)


class LatentGNNKernel(nn.Module):
    """One latent graph (official `LatentGNN_Kernel`): psi (1x1 conv + BN + ReLU, C' -> d) gives the
    visible-to-latent adjacency (L2-normalised over pixels) and latent-to-visible adjacency
    (L2-normalised over the d nodes); nodes Z = A_v2l X^T (d, C'); Z <- softmax_rows(Zn Zn^T) Z with
    Zn = Z L2-normalised over channels; back to pixels Y = Z^T A_l2v (C', N).
    """

    def __init__(self, channels: int, latent_dim: int, mode: str, graph_conv: bool, act, dd):
        super().__init__()
        self.mode = mode
        if mode == "asymmetric":
            self.psi_v2l = _conv_bn(channels, latent_dim, act, dd)
            self.psi_l2v = _conv_bn(channels, latent_dim, act, dd)
        else:
            self.psi = _conv_bn(channels, latent_dim, act, dd)
        if graph_conv:  # official GraphConvWeight (off by default in V1)
            self.GraphConvWeight = _conv_bn(channels, channels, act, dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official: GraphConvWeight's conv N(0, 0.01); the other layers keep PyTorch's default init."""
        if hasattr(self, "GraphConvWeight"):
            nn.init.normal_(self.GraphConvWeight[0].weight, std=0.01)

    def forward(self, v2l_feat: Tensor, l2v_feat: Tensor | None) -> Tensor:
        b, c, h, w = v2l_feat.shape
        asymmetric = self.mode == "asymmetric"
        if hasattr(self, "psi"):   # symmetric: one psi (`hasattr` is resolved when TorchScript compiles)
            psi_v2l = psi_l2v = self.psi(v2l_feat)
        else:
            assert l2v_feat is not None, "LatentGNNKernel: the asymmetric mode needs latent-to-visible features"
            psi_v2l, psi_l2v = self.psi_v2l(v2l_feat), self.psi_l2v(l2v_feat)
        with no_autocast(v2l_feat.device):  # norms of ReLU outputs, sums over N: fp32
            v2l_adj = _normalize(psi_v2l.flatten(2), dim=2 if asymmetric else 1)   # (B, d, N), over pixels
            l2v_adj = _normalize(psi_l2v.flatten(2), dim=1) if asymmetric else v2l_adj  # over nodes
            feat = v2l_feat.flatten(2).transpose(1, 2).to(v2l_adj.dtype)
            nodes = torch.matmul(v2l_adj, feat)                                     # (B, d, C')
            nodes_n = F.normalize(nodes, dim=-1)
            affinity = torch.softmax(torch.matmul(nodes_n, nodes_n.transpose(1, 2)), dim=-1)  # (B, d, d)
            nodes = torch.matmul(affinity, nodes)
            out = torch.matmul(nodes.transpose(1, 2), l2v_adj).view(b, c, h, w).to(v2l_feat.dtype)  # (B, C', N)
        if hasattr(self, "GraphConvWeight"):
            out = self.GraphConvWeight(out)
        return out


@register_attn("latentgnn", family="latentgnn", kind=GLOBAL, paper=_PAPER, year=2019,
               attends="d latent nodes (bipartite visible-latent graph)", cost="O(N C^2 + N C d)")
class LatentGNN(TimmInitHooks, nn.Module):
    """LatentGNN block, from "LatentGNN: Learning Efficient Non-local Relations for Visual Recognition"
    (Zhang, Yan, He, ICML 2019, arXiv 1905.11634), as the official `LatentGNNV1`: in the default
    "asymmetric" mode two 1x1 conv (no bias) + BN reduce C -> C' = C * rd_ratio (official
    channel_stride 4) for the visible-to-latent and latent-to-visible streams, each L2-normalised over
    channels; each of `num_kernels` LatentGNNKernel builds a d-node latent graph (d = `latent_dims`,
    one per kernel) and returns C' channels; the kernels are concatenated, 1x1 conv + BN back to C and
    out = x + gamma * y with a scalar gamma initialised to 0 (identity at init). "symmetric" shares one
    reduction and one adjacency (normalised over nodes) for both directions. `graph_conv=True` adds the
    official optional GraphConvWeight (1x1 conv + BN + ReLU) after each kernel. `latent_dims` is
    required by the official class; its example and the detection defaults for res4 use 100 nodes per
    kernel, our default (one kernel of 100). act_layer replaces the ReLUs (default ReLU). Same maths as
    the official code (norms and graph products in fp32 for fp16/bf16 inputs). Cost O(N C^2) for the 1x1
    convs plus O(N C' d) for the graph, linear in N = H*W; O(N C + d^2) memory.
    """

    def __init__(self, channels: int, *, latent_dims: int | tuple[int, ...] = 100, num_kernels: int | None = None,
                 mode: str = "asymmetric", graph_conv: bool = False, rd_ratio: float = 1 / 4, act_layer=None,
                 device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        check_channels(name, channels)
        if mode not in _MODES:
            raise ValueError(f"{name}: mode must be one of {_MODES}, got {mode!r}")
        if not rd_ratio > 0:
            raise ValueError(f"{name}: rd_ratio must be > 0, got {rd_ratio!r}")
        dims = (latent_dims,) * (num_kernels or 1) if isinstance(latent_dims, int) else tuple(latent_dims)
        if num_kernels is not None and len(dims) != num_kernels:
            raise ValueError(f"{name}: {len(dims)} latent_dims for num_kernels={num_kernels}")
        if not dims or any(not isinstance(d, int) or d < 1 for d in dims):
            raise ValueError(f"{name}: latent_dims must be positive integers, got {latent_dims!r}")
        dd = factory(device, dtype)
        act = get_act_layer(act_layer or "relu")
        self.channels, self.mode, self.latent_dims = channels, mode, dims
        inter = max(1, int(channels * rd_ratio))
        if mode == "asymmetric":
            self.down_channel_v2l = _conv_bn(channels, inter, dd=dd)
            self.down_channel_l2v = _conv_bn(channels, inter, dd=dd)
        else:
            self.down_channel = _conv_bn(channels, inter, dd=dd)
        for i, d in enumerate(dims):
            self.add_module(f"LatentGNN_Kernel_{i}", LatentGNNKernel(inter, d, mode, graph_conv, act, dd))
        self.up_channel = _conv_bn(inter * len(dims), channels, dd=dd)
        self.gamma = nn.Parameter(torch.zeros(1, **dd))

    def reset_parameters(self) -> None:
        """gamma = 0 (identity at init)."""
        nn.init.zeros_(self.gamma)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, latent_dims={self.latent_dims}"

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_input(self, x, self.channels)
        if hasattr(self, "down_channel"):   # symmetric
            v2l, l2v = _normalize(self.down_channel(x), dim=1).to(x.dtype), None
        else:
            v2l = _normalize(self.down_channel_v2l(x), dim=1).to(x.dtype)
            l2v = _normalize(self.down_channel_l2v(x), dim=1).to(x.dtype)
        if torch.jit.is_scripting():  # TorchScript cannot look up `LatentGNN_Kernel_<i>` by a computed name: it
            outs: list[Tensor] = []   # unrolls the children (registration order: kernel 0, 1, ..) and keeps those
            for kernel in self.children():
                if hasattr(kernel, "psi_v2l") or hasattr(kernel, "psi"):   # a LatentGNNKernel
                    outs.append(kernel(v2l, l2v))
        else:
            outs = [getattr(self, f"LatentGNN_Kernel_{i}")(v2l, l2v) for i in range(len(self.latent_dims))]
        y = self.up_channel(torch.cat(outs, dim=1) if len(outs) > 1 else outs[0])
        return x + self.gamma * y
