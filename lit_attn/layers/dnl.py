"""Disentangled non-local block (Yin, Yao, Cao, Li, Zhang, Lin, Hu: Disentangled Non-Local Neural Networks,
ECCV 2020, arXiv 2006.06668).

The non-local attention is split into a *whitened pairwise* term, softmax_j((q_i - mean q) . (k_j - mean k)
/ temperature), and a *unary* term, softmax_j(m_j) with m a 1x1 conv of x, one map shared by all queries;
both aggregate the same values. Two structures, as modes of one class: "official"
(yinmh17/DNL-Semantic-Segmentation, `model/seg/ops/nonlocal_block.py`, `_NonLocalNd_bn` with
`with_gc=True`), registered as `dnl`, and "mmseg" (open-mmlab/mmsegmentation
`mmseg/models/decode_heads/dnl_head.py`, `DisentangledNonLocal2d` on top of mmcv's `NonLocal2d`), registered
as `dnl_mmseg`, with mmseg's module names so that a DNLHead state dict loads. Neither builds the N x N
affinity: the whitened pairwise term is an ordinary softmax attention of the centred q and k, so it goes
through `lit_attn.ops.global_attention`.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from ..ops import global_attention, map_to_tokens, tokens_to_map
from ..registry import GLOBAL, register_attn
from ._utils import TimmInitHooks, check_channels, check_input, factory

_MODES = ("official", "mmseg")
_TEMPERATURE = {"official": 0.1, "mmseg": 0.05}
_CONV_OUT_FORMS = ("sum", "per_term")


def _conv(cin: int, cout: int, bias: bool, dd: dict) -> nn.Sequential:
    """A 1x1 conv stored as `<name>.conv`, the state-dict layout of mmcv's ConvModule."""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(cin, cout, 1, bias=bias, **dd)))


class DisentangledNonLocal2d(TimmInitHooks, nn.Module):
    """Disentangled non-local block (Disentangled Non-Local Neural Networks, ECCV 2020, arXiv 2006.06668).
    theta/phi: 1x1 convs C -> C*rd_ratio (C/2) with bias (the biases cancel in the whitening, so they get
    no gradient: listed in `no_grad_params`); whitening subtracts the mean over positions of q and of k (the
    key mean only shifts each softmax row by a constant, the query mean is what matters); logits are scaled
    by d^-0.5 (`use_scale`, both codes) and 1/temperature; the unary mask is a 1x1 conv C -> 1 (with bias)
    softmaxed over positions. `mode="official"` (`dnl`, the authors' `_NonLocalNd_bn` with `with_gc`,
    `use_out=False`, `out_bn=False`, no sub-sampling): value g is C -> C without bias, no output conv,
    out = x + gamma * pairwise + unary with a scalar gamma (init 0) on the pairwise term only, temperature 0.1
    (their ADE20K config; the Cityscapes "NLin" config uses 0.05); all convs N(0, 0.01), biases 0. The unary
    term is not gated, so this mode is *not* the identity at init. `mode="mmseg"` (`dnl_mmseg`, mmseg's
    `DisentangledNonLocal2d` as DNLHead builds it): g is C -> C/2 with bias and out = x + BN(conv_out(pairwise
    + unary)) with one 1x1 conv_out C/2 -> C (no bias) + BN applied to the *sum* of both terms
    (`conv_out_form="sum"`: the code of every released mmseg, 0.6 to 0.30 and 1.x), temperature 0.05;
    `conv_out_form="per_term"` applies conv_out + BN to each term separately, out = x + BN(conv_out(pairwise))
    + BN(conv_out(unary)) (the BN shift counted twice: a variant attributed to mmseg 0.x that no released
    mmseg has, kept for checkpoints trained with it; same weights, outputs that differ by one BN shift, and
    in training the BN sees both terms, as that code would); init as mmcv: theta/phi/g
    N(0, 0.01), BN weight and bias 0 (identity at init), conv_mask PyTorch's default. Module names follow
    mmseg (`theta.conv`, `phi.conv`, `g.conv`, `conv_out.conv`, `conv_out.bn`, `conv_mask`) in both modes;
    official checkpoints map conv_query/conv_key/conv_value -> theta.conv/phi.conv/g.conv. Not implemented:
    sub-sampling (off in every DNL config) and mmseg's unused dot-product mode. No activation: act_layer is
    accepted and ignored. Cost: O(N^2 C) time, O(N C) memory (fused/chunked attention, no N x N tensor; the
    official and mmseg codes materialise it), plus O(N C^2) for the 1x1 convs, N = H*W.
    """

    no_grad_params = ("theta.conv.bias", "phi.conv.bias")

    def __init__(self, channels: int, *, mode: str = "official", temperature: float | None = None,
                 use_scale: bool = True, rd_ratio: float = 0.5, conv_out_form: str = "sum", act_layer=None,
                 device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        check_channels(name, channels)
        if mode not in _MODES:
            raise ValueError(f"{name}: mode must be one of {_MODES}, got {mode!r}")
        temperature = _TEMPERATURE[mode] if temperature is None else temperature
        if not temperature > 0:
            raise ValueError(f"{name}: temperature must be > 0, got {temperature!r}")
        if not rd_ratio > 0:
            raise ValueError(f"{name}: rd_ratio must be > 0, got {rd_ratio!r}")
        if conv_out_form not in _CONV_OUT_FORMS:
            raise ValueError(f"{name}: conv_out_form must be one of {_CONV_OUT_FORMS}, got {conv_out_form!r}")
        if mode == "official" and conv_out_form != "sum":
            raise ValueError(f"{name}: conv_out_form applies to mode='mmseg' only (mode='official' has no conv_out)")
        dd = factory(device, dtype)
        self.channels, self.mode, self.conv_out_form = channels, mode, conv_out_form
        self.temperature, self.use_scale = float(temperature), bool(use_scale)
        self.inter = inter = max(1, int(channels * rd_ratio))
        official = mode == "official"
        self.theta = _conv(channels, inter, True, dd)
        self.phi = _conv(channels, inter, True, dd)
        self.g = _conv(channels, channels if official else inter, not official, dd)
        self.conv_mask = nn.Conv2d(channels, 1, 1, **dd)
        if official:
            self.gamma = nn.Parameter(torch.zeros(1, **dd))
        else:
            self.conv_out = nn.Sequential(OrderedDict(conv=nn.Conv2d(inter, channels, 1, bias=False, **dd),
                                                      bn=nn.BatchNorm2d(channels, **dd)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        convs = [self.theta.conv, self.phi.conv, self.g.conv]
        if self.mode == "official":
            convs.append(self.conv_mask)
            nn.init.zeros_(self.gamma)
        else:
            self.conv_mask.reset_parameters()
            self.conv_out.bn.reset_parameters()
            nn.init.zeros_(self.conv_out.bn.weight)           # mmcv zeros_init: constant_init(norm, 0)
            nn.init.zeros_(self.conv_out.bn.bias)
        for m in convs:
            nn.init.normal_(m.weight, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def extra_repr(self) -> str:
        form = f", conv_out_form={self.conv_out_form!r}" if self.conv_out_form != "sum" else ""
        return (f"mode={self.mode!r}, inter={self.inter}, temperature={self.temperature}, "
                f"use_scale={self.use_scale}{form}")

    def terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(pairwise (B, Cv, H, W), unary (B, Cv, 1, 1)) aggregated values, before gamma / conv_out."""
        h, w = x.shape[-2:]
        q, k, v = map_to_tokens(self.theta(x)), map_to_tokens(self.phi(x)), map_to_tokens(self.g(x))
        q = q - q.mean(-2, keepdim=True)                      # whitening: centre over positions
        k = k - k.mean(-2, keepdim=True)
        scale = (q.shape[-1] ** -0.5 if self.use_scale else 1.0) / self.temperature
        pairwise = tokens_to_map(global_attention(q, k, v, scale=scale), h, w)
        m = self.conv_mask(x).flatten(2)                      # (B, 1, N), one map for all queries
        mask = m.softmax(-1, dtype=torch.promote_types(m.dtype, torch.float32))
        unary = torch.matmul(mask.to(v.dtype), v[:, 0]).transpose(1, 2).unsqueeze(-1)
        return pairwise, unary

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_input(self, x, self.channels)
        pairwise, unary = self.terms(x)
        if hasattr(self, "gamma"):   # mode "official" (no conv_out; `hasattr` is resolved when TorchScript compiles)
            return x + self.gamma * pairwise + unary
        if self.conv_out_form == "per_term":
            return x + self.conv_out(pairwise) + self.conv_out(unary)
        return x + self.conv_out(pairwise + unary)


_PAPER = "Disentangled Non-Local Neural Networks (ECCV 2020, arXiv 2006.06668)"
register_attn("dnl", family="dnl", kind=GLOBAL, paper=_PAPER, year=2020,
              attends="positions (whitened pairwise softmax + shared unary softmax)", cost="O(N^2 C)",
              cls=DisentangledNonLocal2d, mode="official")
register_attn("dnl_mmseg", family="dnl", kind=GLOBAL, paper=_PAPER, year=2020,
              attends="positions (whitened pairwise softmax + shared unary softmax)", cost="O(N^2 C)",
              cls=DisentangledNonLocal2d, mode="mmseg")
