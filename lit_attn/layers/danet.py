"""DANet: position and channel self-attention, as plug-in blocks.

Dual Attention Network for Scene Segmentation (Fu et al., CVPR 2019, arXiv 1809.02983). Official
code: junfu1115/DANet (now CASIA-IVA-Lab/DANet), `encoding/nn/da_att.py` (`PAM_Module`,
`CAM_Module`). The parameter names follow that file (`query_conv`, `key_conv`, `value_conv`,
`gamma`), so the released PAM/CAM weights load directly (`sa.*` -> `pam.*`, `sc.*` -> `cam.*` for a
DANetHead state dict). The DANet head (3x3 convs around each module, summed branches, auxiliary
outputs) lives with the heads; here are the modules themselves, usable in any timm attention slot.

- `PositionAttention` (`danet_pam`): softmax(Q^T K) over positions, unscaled, through
  `lit_attn.ops.global_attention` (no N x N matrix in memory).
- `ChannelAttention` (`danet_cam`): softmax over channels of the C x C Gram matrix, computed in fp32.
- `DualAttention` (`danet`): both in parallel on the same input, residual branches summed.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import global_attention, map_to_tokens, tokens_to_map
from ..ops.amp import no_autocast
from ..registry import GLOBAL, register_attn
from ._utils import TimmInitHooks, check_channels, check_input, factory

_PAPER = "Dual Attention Network for Scene Segmentation (CVPR 2019, arXiv 1809.02983)"
CAM_MODES = ("official", "stable")


def _rd_channels(name: str, channels: int, rd_ratio: float, rd_channels: int | None) -> int:
    if rd_channels is None:
        if not rd_ratio > 0:
            raise ValueError(f"{name}: rd_ratio must be > 0, got {rd_ratio!r}")
        return max(1, int(channels * rd_ratio))  # the official in_dim // 8 for rd_ratio=1/8
    if not isinstance(rd_channels, int) or rd_channels < 1:
        raise ValueError(f"{name}: rd_channels must be a positive integer, got {rd_channels!r}")
    return rd_channels


@register_attn("danet_pam", family="danet", kind=GLOBAL, paper=_PAPER, year=2019,
               attends="positions", cost="O(N^2 C)")
class PositionAttention(TimmInitHooks, nn.Module):
    """DANet position attention module (PAM), from "Dual Attention Network for Scene Segmentation"
    (Fu et al., CVPR 2019, arXiv 1809.02983), as the official `PAM_Module`: query and key are 1x1
    convs C -> C * rd_ratio (C/8, with bias), value a 1x1 conv C -> C (with bias); energy = Q^T K
    with no 1/sqrt(d) scaling, softmax over the key positions, out = V attention^T and
    y = gamma * out + x with a scalar `gamma` initialised to 0 (identity at init). `rd_channels`
    overrides rd_ratio; act_layer is accepted and ignored (the module has no activation). Same maths
    as the official code; the attention goes through `global_attention` (SDPA, or an exact
    query-chunked kernel on CPU), so it costs O(N^2 C) time but only O(N C) memory, N = H*W.
    """

    def __init__(self, channels: int, *, rd_ratio: float = 1 / 8, rd_channels: int | None = None,
                 act_layer=None, device=None, dtype=None):
        super().__init__()
        check_channels(type(self).__name__, channels)
        dd = factory(device, dtype)
        self.channels = channels
        rd = _rd_channels(type(self).__name__, channels, rd_ratio, rd_channels)
        self.query_conv = nn.Conv2d(channels, rd, 1, **dd)
        self.key_conv = nn.Conv2d(channels, rd, 1, **dd)
        self.value_conv = nn.Conv2d(channels, channels, 1, **dd)
        self.gamma = nn.Parameter(torch.zeros(1, **dd))

    def reset_parameters(self) -> None:
        """gamma = 0 (identity at init); the convs keep PyTorch's default init, as official."""
        nn.init.zeros_(self.gamma)

    def attend(self, x: Tensor) -> Tensor:
        """The attended features V attention^T, (B, C, H, W), before the gamma-scaled residual."""
        h, w = x.shape[-2:]
        q = map_to_tokens(self.query_conv(x))
        k = map_to_tokens(self.key_conv(x))
        v = map_to_tokens(self.value_conv(x))
        return tokens_to_map(global_attention(q, k, v, scale=1.0), h, w)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_input(self, x, self.channels)
        return x + self.gamma * self.attend(x)


@register_attn("danet_cam", family="danet", kind=GLOBAL, paper=_PAPER, year=2019,
               attends="channels", cost="O(N C^2)")
class ChannelAttention(TimmInitHooks, nn.Module):
    """DANet channel attention module (CAM), from "Dual Attention Network for Scene Segmentation"
    (Fu et al., CVPR 2019, arXiv 1809.02983): energy E = X X^T over the C channels (unscaled, no
    convolutions), out = attention X, y = beta * out + x with a scalar beta initialised to 0
    (identity at init; stored as `gamma`, the official name). `mode="official"` (default, matches
    the released weights) is the official `CAM_Module`: softmax(rowmax(E) - E) == softmax(-E), which
    attends most to the *least* similar channels (the authors added it "to prevent divergence").
    `mode="stable"` is the paper's exp(A_i . A_j) normalised, softmax(E - rowmax(E)) == softmax(E).
    E sums N products and overflows fp16 (and loses all resolution in bf16), so E and the softmax
    are computed in fp32 even under autocast. rd_ratio and act_layer are accepted and ignored (no
    reduction, no activation). Cost O(N C^2) time, O(C^2 + N C) memory, N = H*W.
    """

    def __init__(self, channels: int, *, mode: str = "official", rd_ratio: float = 1 / 8, act_layer=None,
                 device=None, dtype=None):
        super().__init__()
        check_channels(type(self).__name__, channels)
        if mode not in CAM_MODES:
            raise ValueError(f"{type(self).__name__}: mode must be one of {CAM_MODES}, got {mode!r}")
        self.channels = channels
        self.mode = mode
        self.gamma = nn.Parameter(torch.zeros(1, **factory(device, dtype)))

    def reset_parameters(self) -> None:
        """beta (`gamma`) = 0: identity at init."""
        nn.init.zeros_(self.gamma)

    def attend(self, x: Tensor) -> Tensor:
        """The attended features attention X, (B, C, H, W), before the beta-scaled residual."""
        b, c, h, w = x.shape
        feats = x.reshape(b, c, h * w)
        with no_autocast(x.device):
            f32 = feats.float() if feats.dtype in (torch.float16, torch.bfloat16) else feats
            energy = torch.bmm(f32, f32.transpose(1, 2))
            attn = torch.softmax(energy.neg() if self.mode == "official" else energy, dim=-1)
        return torch.bmm(attn.to(feats.dtype), feats).reshape(b, c, h, w)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_input(self, x, self.channels)
        return x + self.gamma * self.attend(x)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


@register_attn("danet", family="danet", kind=GLOBAL, paper=_PAPER, year=2019,
               attends="positions + channels", cost="O(N^2 C + N C^2)")
class DualAttention(TimmInitHooks, nn.Module):
    """DANet dual attention, from "Dual Attention Network for Scene Segmentation" (Fu et al.,
    CVPR 2019, arXiv 1809.02983), in plug-in form: the position (`pam`, PositionAttention) and
    channel (`cam`, ChannelAttention) modules run in parallel on the same x and their residual
    branches are summed, y = x + gamma_p * PAM(x) + gamma_c * CAM(x), as the DANet head sums its two
    branches (the head's 3x3 convs, dropout and classifiers are not part of this block). Both gammas
    start at 0 (identity at init). `cam_mode="official"` (default, the released weights) uses
    softmax(-E) in the CAM, `"stable"` the paper's softmax(E); see ChannelAttention.
    act_layer is accepted and ignored. Cost O(N^2 C + N C^2) time, O(N C + C^2) memory, N = H*W.
    """

    def __init__(self, channels: int, *, cam_mode: str = "official", rd_ratio: float = 1 / 8,
                 rd_channels: int | None = None, act_layer=None, device=None, dtype=None):
        super().__init__()
        check_channels(type(self).__name__, channels)
        if cam_mode not in CAM_MODES:
            raise ValueError(f"{type(self).__name__}: cam_mode must be one of {CAM_MODES}, got {cam_mode!r}")
        dd = factory(device, dtype)
        self.channels = channels
        self.pam = PositionAttention(channels, rd_ratio=rd_ratio, rd_channels=rd_channels, **dd)
        self.cam = ChannelAttention(channels, mode=cam_mode, **dd)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_input(self, x, self.channels)
        return x + self.pam.gamma * self.pam.attend(x) + self.cam.gamma * self.cam.attend(x)
