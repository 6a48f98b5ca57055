"""ANN: asymmetric non-local blocks with pyramid-pooled keys and values.

Asymmetric Non-local Neural Networks for Semantic Segmentation (Zhu, Xu, Bai, Huang, Bai, ICCV 2019,
arXiv 1908.07678). Official code: MendelXu/ANN, `models/seg/utils/apnb.py` and `afnb.py`; the
reference for the heads is mmsegmentation's `mmseg/models/decode_heads/ann_head.py`. The keys and
values are adaptive-average-pooled, after their 1x1 projections, to a pyramid of sizes (1, 3, 6, 8)
and concatenated to S = 1 + 9 + 36 + 64 = 110 anchors; the queries stay at full resolution, so the
attention is N x S (N = H*W), never N x N.

- `APNB` (`apnb`, plug-in): self-attention of a map to its own pyramid anchors, query and key
  projections shared, then a 1x1 conv-BN-ReLU on concat[context, x].
- `AFNB` (`afnb`, head-only, forward(low, high)): the queries come from the high-level map, keys
  and values from the low-level one, then a 1x1 conv-BN on concat[context, high].

Submodules follow mmseg's names (`key_project`, `query_project`, `value_project`, `out_project`,
`bottleneck`; conv-norm-act units with `conv`/`bn` children as mmcv's ConvModule), so an mmseg ANNHead
state dict loads after dropping `stages.0.`. Official names: f_key, f_query, f_value, W, conv_bn_dropout.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..ops import global_attention, map_to_tokens, tokens_to_map
from ..ops.pooling import adaptive_avg_pool2d
from ..registry import GLOBAL, HEAD, register_attn
from ._utils import TimmInitHooks, check_channels, check_input, factory
from .conv_module import ConvModule

_PAPER = "Asymmetric Non-local Neural Networks for Semantic Segmentation (ICCV 2019, arXiv 1908.07678)"
POOL_SIZES = (1, 3, 6, 8)


def pyramid_pool(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    """(B, C, H, W) -> (B, C, S): adaptive average pools of x at each size s (s x s cells), flattened in
    row-major order and concatenated, S = sum(s^2) (110 for (1, 3, 6, 8)). Any H, W >= 1 (a map
    smaller than s is replicated by the adaptive pooling windows, as in PyTorch's AdaptiveAvgPool2d). While
    exporting, the same bins are pooled with matrix products (`lit_attn.ops.pooling`), so ONNX export works at
    any H, W. `sizes` defaults to POOL_SIZES."""
    if sizes is None:
        sizes = [1, 3, 6, 8]  # POOL_SIZES (TorchScript reads no module globals)
    return torch.cat([adaptive_avg_pool2d(x, s).flatten(2) for s in sizes], 2)


def pyramid_attention(query: Tensor, key: Tensor, value: Tensor, sizes: list[int] | None = None) -> Tensor:
    """softmax over the S pyramid anchors of (q k^T) * dk^-0.5, times the pooled values.

    query (B, dk, H, W) at full resolution; key (B, dk, H', W') and value (B, dv, H', W') are pooled by
    `pyramid_pool` to S anchors. Returns the (B, dv, H, W) context, through `global_attention` (O(N S)
    memory, N = H*W)."""
    h, w = query.shape[-2:]
    q = map_to_tokens(query)                                  # (B, 1, N, dk)
    k = map_to_tokens(pyramid_pool(key, sizes)[..., None])     # (B, 1, S, dk)
    v = map_to_tokens(pyramid_pool(value, sizes)[..., None])   # (B, 1, S, dv)
    return tokens_to_map(global_attention(q, k, v, scale=q.shape[-1] ** -0.5), h, w)


def _inner(name: str, what: str, channels: int, rd_ratio: float, given: int | None) -> int:
    if given is None:
        if not rd_ratio > 0:
            raise ValueError(f"{name}: rd_ratio must be > 0, got {rd_ratio!r}")
        return max(1, int(channels * rd_ratio))
    if not isinstance(given, int) or given < 1:
        raise ValueError(f"{name}: {what} must be a positive integer, got {given!r}")
    return given


def _pool_sizes(name: str, sizes) -> tuple[int, ...]:
    sizes = tuple(sizes) if isinstance(sizes, Sequence) else (sizes,)
    if not sizes or not all(isinstance(s, int) and s >= 1 for s in sizes):
        raise ValueError(f"{name}: pool_sizes must be a non-empty sequence of positive ints, got {sizes!r}")
    return sizes


def _dropout(name: str, p: float) -> nn.Module:
    if not 0 <= p < 1:
        raise ValueError(f"{name}: dropout must be in [0, 1), got {p!r}")
    return nn.Dropout2d(p) if p > 0 else nn.Identity()


@register_attn("apnb", family="ann", kind=GLOBAL, paper=_PAPER, year=2019,
               attends="pyramid-pooled positions (S = 110 anchors)", cost="O(N S C), S = 110")
class APNB(TimmInitHooks, nn.Module):
    """Asymmetric Pyramid Non-local Block, from "Asymmetric Non-local Neural Networks for Semantic
    Segmentation" (Zhu et al., ICCV 2019, arXiv 1908.07678). q = k = key_project(x) (one shared
    1x1 conv-BN-ReLU C -> key_channels, f_query = f_key as in the official code and mmseg's
    share_key_query=True), v = value_project(x) (1x1 conv with bias); k and v are pooled to the
    pyramid `pool_sizes` (1, 3, 6, 8) -> S = 110 anchors; context = out_project(softmax_S(q k^T *
    key_channels^-0.5) v) with out_project a 1x1 conv zero-initialised (weight and bias, so the
    context is 0 at init); y = Dropout2d(ReLU(BN(conv1x1(concat[context, x])))) (`bottleneck`).
    Defaults: key_channels = value_channels = C * rd_ratio (C/2: the official 512 -> 256), dropout
    0.05 (official; mmseg's APNB has none, pass dropout=0 to match it). Differences from the official
    code: the convs before a BN have no bias (as mmseg); the shared projection runs once (official
    and mmseg call it twice, which updates its BN running stats twice per training step). The
    official `sizes` / mmseg `query_scales` stages other than 1 (max-pooled queries) crash in both
    codes and are not provided. act_layer/norm_layer set the conv-norm-act units (ReLU, BatchNorm2d).
    The output is returned as a copy while autograd records (the final ReLU's backward reads it and
    timm blocks add the shortcut in place). Cost O(N S (dk + dv) + N C^2) time, O(N (C + S)) memory,
    N = H*W, S = 110.
    """

    def __init__(self, channels: int, *, key_channels: int | None = None, value_channels: int | None = None,
                 pool_sizes: Sequence[int] = POOL_SIZES, dropout: float = 0.05, rd_ratio: float = 0.5,
                 act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d, device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        check_channels(name, channels)
        dd = factory(device, dtype)
        act_layer = act_layer or nn.ReLU
        self.channels = channels
        self.key_channels = kc = _inner(name, "key_channels", channels, rd_ratio, key_channels)
        self.value_channels = vc = _inner(name, "value_channels", kc, 1.0, value_channels)
        self.pool_sizes = _pool_sizes(name, pool_sizes)
        self.key_project = ConvModule(channels, kc, 1, norm_layer=norm_layer, act_layer=act_layer, **dd)
        self.value_project = nn.Conv2d(channels, vc, 1, **dd)
        self.out_project = nn.Conv2d(vc, channels, 1, **dd)
        self.bottleneck = ConvModule(2 * channels, channels, 1, norm_layer=norm_layer, act_layer=act_layer, **dd)
        self.dropout = _dropout(name, dropout)
        self.reset_parameters()

    __jit_unused_properties__ = ["query_project"]  # TorchScript compiles module properties; forward does not use it

    @property
    def query_project(self) -> nn.Module:
        """The query projection is the key projection (one module, one set of weights). It is not
        registered a second time, so the state dict (and smp's safetensors save) holds it once."""
        return self.key_project

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # mmseg's APNB registers the shared module under both names: its query_project.* entries
        # are copies of key_project.*
        for key in [k for k in state_dict if k.startswith(prefix + "query_project.")]:
            state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_parameters(self) -> None:
        """Zero out_project (weight and bias), as official and mmseg: the context starts at 0."""
        nn.init.zeros_(self.out_project.weight)
        nn.init.zeros_(self.out_project.bias)

    def context(self, x: Tensor) -> Tensor:
        """The attended context out_project(softmax(q k^T / sqrt(dk)) v), (B, C, H, W)."""
        qk = self.key_project(x)
        return self.out_project(pyramid_attention(qk, qk, self.value_project(x), list(self.pool_sizes)))

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_input(self, x, self.channels)
        out = self.dropout(self.bottleneck(torch.cat([self.context(x), x], 1)))
        # a ReLU's backward reads its output, and callers modify the block's output in place (timm's
        # BasicBlock: x += shortcut): hand back a copy when autograd records the graph
        return out.clone() if out.requires_grad else out

    def extra_repr(self) -> str:
        return f"key_channels={self.key_channels}, value_channels={self.value_channels}, pool_sizes={self.pool_sizes}"


@register_attn("afnb", family="ann", kind=HEAD, paper=_PAPER, year=2019,
               attends="pyramid-pooled positions of a lower-level map (S = 110 anchors)", cost="O(N S C), S = 110")
class AFNB(nn.Module):
    """Asymmetric Fusion Non-local Block, from "Asymmetric Non-local Neural Networks for Semantic
    Segmentation" (Zhu et al., ICCV 2019, arXiv 1908.07678); head-only: forward(low, high) with low
    (B, low_channels, H', W') (stage 4, 1024 in the paper) and high (B, channels, H, W) (stage 5, 2048).
    q = query_project(high), k = key_project(low) (separate 1x1 conv-BN-ReLU units to key_channels),
    v = value_project(low) (1x1 conv with bias); k and v pooled to the `pool_sizes` pyramid (S = 110
    anchors); context = out_project(softmax_S(q k^T * key_channels^-0.5) v), out_project a zero-init
    1x1 conv to out_channels; y = Dropout2d(BN(conv1x1(concat[context, high]))) (no ReLU, `bottleneck`).
    Defaults: low_channels = C/2, key_channels = value_channels = C * rd_ratio (C/8: the official
    2048 -> 256; mmseg's project_channels), out_channels = C (official and mmseg), dropout 0.05
    (official; mmseg applies its head dropout 0.1 after the block instead: pass dropout=0).
    Differences from the official code, as mmseg: no bias on the convs before a BN. H', W' may differ
    from H, W (the keys are pooled to fixed sizes; both codes allow it), the batch sizes must match.
    Cost O(N S (dk + dv) + N C^2) time, O(N (C + S)) memory, N = H*W, S = 110.
    """

    def __init__(self, channels: int, *, low_channels: int | None = None, key_channels: int | None = None,
                 value_channels: int | None = None, out_channels: int | None = None,
                 pool_sizes: Sequence[int] = POOL_SIZES, dropout: float = 0.05, rd_ratio: float = 1 / 8,
                 act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d, device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        check_channels(name, channels)
        dd = factory(device, dtype)
        act_layer = act_layer or nn.ReLU
        self.channels = channels
        self.low_channels = low = _inner(name, "low_channels", channels, 0.5, low_channels)
        self.out_channels = out = _inner(name, "out_channels", channels, 1.0, out_channels)
        self.key_channels = kc = _inner(name, "key_channels", channels, rd_ratio, key_channels)
        self.value_channels = vc = _inner(name, "value_channels", kc, 1.0, value_channels)
        self.pool_sizes = _pool_sizes(name, pool_sizes)
        self.key_project = ConvModule(low, kc, 1, norm_layer=norm_layer, act_layer=act_layer, **dd)
        self.query_project = ConvModule(channels, kc, 1, norm_layer=norm_layer, act_layer=act_layer, **dd)
        self.value_project = nn.Conv2d(low, vc, 1, **dd)
        self.out_project = nn.Conv2d(vc, out, 1, **dd)
        self.bottleneck = ConvModule(out + channels, out, 1, norm_layer=norm_layer, act_layer=None, **dd)
        self.dropout = _dropout(name, dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero out_project (weight and bias), as official and mmseg: the context starts at 0."""
        nn.init.zeros_(self.out_project.weight)
        nn.init.zeros_(self.out_project.bias)

    def check_inputs(self, low: Tensor, high: Tensor) -> None:
        """ValueError naming the block unless low is (B, low_channels, H', W') and high (B, channels, H, W)."""
        check_input(self, low, self.low_channels, "low")
        check_input(self, high, self.channels, "high")
        if low.shape[0] != high.shape[0]:
            raise ValueError(f"{type(self).__name__}: `low` and `high` need the same batch size, got "
                             f"{tuple(low.shape)} and {tuple(high.shape)}")

    def context(self, low: Tensor, high: Tensor) -> Tensor:
        """The attended context out_project(softmax(q k^T / sqrt(dk)) v), (B, out_channels, H, W)."""
        q, k, v = self.query_project(high), self.key_project(low), self.value_project(low)
        return self.out_project(pyramid_attention(q, k, v, list(self.pool_sizes)))

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only checks)
            self.check_inputs(low, high)
        return self.dropout(self.bottleneck(torch.cat([self.context(low, high), high], 1)))

    def extra_repr(self) -> str:
        return (f"low_channels={self.low_channels}, key_channels={self.key_channels}, "
                f"value_channels={self.value_channels}, out_channels={self.out_channels}, "
                f"pool_sizes={self.pool_sizes}")
