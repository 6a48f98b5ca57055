"""Non-local block (Wang, Girshick, Gupta, He: Non-local Neural Networks, CVPR 2018, arXiv 1711.07971).

z_i = x_i + BN(W_z y_i),  y_i = 1/C(x) sum_j f(x_i, x_j) g(x_j), with the paper's four pairwise functions
f as modes of one class, registered as `nonlocal` (embedded Gaussian, the official default),
`nonlocal_gaussian`, `nonlocal_dot` and `nonlocal_concat`. None of them builds the N x N affinity:
the softmax modes go through `lit_attn.ops.global_attention`, the dot mode is reassociated and the
concatenation mode is computed exactly with a sort and prefix sums.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import global_attention, map_to_tokens, tokens_to_map
from ..ops.amp import no_autocast
from ..ops.attention import exporting
from ..registry import GLOBAL, register_attn
from ._utils import TimmInitHooks, check_channels, check_input, factory

_MODES = ("embedded", "gaussian", "dot", "concat")
_ALIASES = {"embedded_gaussian": "embedded", "dot_product": "dot", "concatenation": "concat"}


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


SEARCH_STEPS = 31  # binary-search steps of the export path: exact for up to 2^31 - 1 keys


def _count_greater(b_desc: Tensor, t: Tensor, steps: int = SEARCH_STEPS) -> Tensor:
    """m[b, i] = #{k: b_desc[b, k] > t[b, i]} for rows b_desc (B, M) sorted descending, t (B, N): what
    torch.searchsorted(-b_desc, -t, side="left") gives, by a binary search over the prefix length with a fixed
    number of steps (`SEARCH_STEPS`, from 2^30 down to 1; steps past M are skipped), as gathers and
    comparisons: exact, O(N log M) and free of the size-dependent loop counts an exported graph would freeze."""
    n_keys = b_desc.shape[-1]
    m = torch.zeros_like(t, dtype=torch.long)
    for k in range(steps - 1, -1, -1):
        cand = m + (1 << k)                                   # try to extend the prefix to cand keys
        idx = (cand - 1).clamp(max=n_keys - 1)
        ok = (cand <= n_keys) & (b_desc.gather(-1, idx) > t)  # the prefix holds: every key before is > t
        m = torch.where(ok, cand, m)
    return m


def concat_relu_aggregate(a: Tensor, b: Tensor, g: Tensor) -> Tensor:
    """y_i = sum_j ReLU(a_i + b_j) g_j for a (B, N), b (B, M), g (B, M, d) -> (B, N, d), exactly,
    in O((N + M) log M + (N + M) d) time and O((N + M) d) memory (no N x M tensor).

    With b sorted descending, ReLU(a_i + b_j) > 0 exactly for the first m_i = #{j: b_j > -a_i} keys,
    so y_i = a_i * S_g[m_i] + S_bg[m_i] with prefix sums S_g[m] = sum_{k<m} g_k and
    S_bg[m] = sum_{k<m} b_k g_k. The expression is the same piecewise-linear function as the naive
    sum, so autograd gives its exact gradient (ReLU'(0) = 0, as torch.relu).
    """
    bs, order = b.sort(dim=1, descending=True)
    d = g.shape[-1]
    gs = g.gather(1, order.unsqueeze(-1).expand(-1, -1, d))
    pad = g.new_zeros(g.shape[0], 1, d)
    s_g = torch.cat([pad, gs.cumsum(1)], 1)                      # (B, M + 1, d)
    s_bg = torch.cat([pad, (bs.unsqueeze(-1) * gs).cumsum(1)], 1)
    # -bs is ascending; side="left" counts the keys with -b_k < a_i, i.e. a_i + b_k > 0
    if exporting():  # searchsorted has no ONNX lowering: the same count by a branch-free binary search
        m = _count_greater(bs.detach(), a.detach().neg())
    else:
        m = torch.searchsorted(bs.detach().neg().contiguous(), a.detach().contiguous(), side="left")
    idx = m.unsqueeze(-1).expand(-1, -1, d)
    return a.unsqueeze(-1) * s_g.gather(1, idx) + s_bg.gather(1, idx)


class NonLocal2d(TimmInitHooks, nn.Module):
    """Non-local block (Non-local Neural Networks, CVPR 2018, arXiv 1711.07971), 2-D version.

    z = x + BN(W_z y), y_i = 1/C(x) sum_j f(x_i, x_j) g(x_j), g/theta/phi 1x1 convs C -> C*rd_ratio
    (C/2, official) with biases; `mode` picks f: "embedded" (official default, `nonlocal`):
    softmax_j(theta_i . phi_j * s); "gaussian" (paper only, `nonlocal_gaussian`): softmax_j(x_i . x_j * s)
    on the raw input, no theta/phi (g still embeds); "dot" (`nonlocal_dot`): theta_i . phi_j / N';
    "concat" (paper only, `nonlocal_concat`): ReLU(w_f . [theta_i, phi_j]) / N' with w_f a vector of
    2*C/2 weights and no bias (the paper's formula; mmcv/AlexHex7 also use bias=False). N' = number of
    key positions, a constant (the official StopGradient). Scale s: `use_scale=None` means the official
    s = dim^-0.5 for "embedded" (the paper's equations show none; `use_scale=False` gives the paper's)
    and s = 1 for "gaussian" (the paper's exp(x_i . x_j); True gives C^-0.5); dot/concat ignore it.
    `sub_sample` max-pools 2x2, stride 2, the keys/values only, never the queries; pooling x *before* the
    phi/g convs as the official Caffe2 code (mmcv's NonLocal2d pools *after* them, which differs).
    `pool_ceil=False` (default) floors the pooled size as the official code and mmcv (an odd last row/column
    is dropped; sides of 1 cannot be pooled and raise); `pool_ceil=True` keeps it in a partial window
    (ceil_mode), so odd sizes keep their border and 1-pixel sides work. Init as official: conv weights (and
    w_f) N(0, 0.01), biases 0, BN gamma 0 => identity at init; `norm=False` drops the BN and zero-inits W_z
    instead (detection fine-tuning); `out_bias=False` drops W_z's bias (mmcv's conv_out, whose following BN
    cancels it). No activation: act_layer is accepted and ignored. Cost in N = H*W (plus O(N C^2) for the 1x1
    convs): softmax modes O(N N' C) time, O(N C) memory (fused/chunked attention, no N x N'); dot O(N C^2) by
    reassociation theta (phi^T g); concat O(N log N + N C) with a sort and prefix sums. The dot and concat
    sums over the keys run in fp32 for fp16/bf16 inputs.
    """

    def __init__(self, channels: int, *, mode: str = "embedded", rd_ratio: float = 0.5,
                 sub_sample: bool = False, pool_ceil: bool = False, use_scale: bool | None = None,
                 norm: bool = True, out_bias: bool = True, act_layer=None, device=None, dtype=None):
        super().__init__()
        check_channels("NonLocal2d", channels)
        mode = _ALIASES.get(mode, mode)
        if mode not in _MODES:
            raise ValueError(f"NonLocal2d: mode must be one of {_MODES}, got {mode!r}")
        if not rd_ratio > 0:
            raise ValueError(f"NonLocal2d: rd_ratio must be > 0, got {rd_ratio!r}")
        dd = factory(device, dtype)
        self.channels, self.mode, self.sub_sample = channels, mode, bool(sub_sample)
        self.pool_ceil = bool(pool_ceil)
        self.inner = inner = max(1, int(channels * rd_ratio))
        self.use_scale = (mode == "embedded") if use_scale is None else bool(use_scale)
        if mode != "gaussian":
            self.theta = nn.Conv2d(channels, inner, 1, **dd)
            self.phi = nn.Conv2d(channels, inner, 1, **dd)
        self.g = nn.Conv2d(channels, inner, 1, **dd)
        if mode == "concat":
            self.w_f = nn.Parameter(torch.empty(2 * inner, **dd))
        self.w_z = nn.Conv2d(inner, channels, 1, bias=out_bias, **dd)
        self.norm = nn.BatchNorm2d(channels, **dd) if norm else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in (getattr(self, "theta", None), getattr(self, "phi", None), self.g, self.w_z):
            if m is not None:
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.mode == "concat":
            nn.init.normal_(self.w_f, std=0.01)
        if isinstance(self.norm, nn.BatchNorm2d):
            self.norm.reset_parameters()
            nn.init.zeros_(self.norm.weight)           # official BN_INIT_GAMMA = 0
        else:
            nn.init.zeros_(self.w_z.weight)            # no BN: zero W_z gives the identity

    def extra_repr(self) -> str:
        pool = f", pool_ceil={self.pool_ceil}" if self.sub_sample else ""
        return (f"mode={self.mode!r}, inner={self.inner}, sub_sample={self.sub_sample}{pool}, "
                f"use_scale={self.use_scale}")

    def _pool(self, x: Tensor) -> Tensor:
        """The 2x2, stride-2 max-pool of the keys/values (floor or ceil, see `pool_ceil`)."""
        if not torch.jit.is_scripting() and not self.pool_ceil and min(x.shape[-2:]) < 2:
            raise ValueError(f"NonLocal2d(sub_sample=True, pool_ceil=False) pools 2x2 with the official floor "
                             f"rounding, which leaves no keys for a {tuple(x.shape[-2:])} map; use pool_ceil=True "
                             f"for maps with a side of 1")
        return F.max_pool2d(x, 2, 2, ceil_mode=self.pool_ceil)

    def _softmax_attention(self, q: Tensor, k: Tensor, g: Tensor, h: int, w: int) -> Tensor:
        """Embedded / gaussian: softmax(q k^T * scale) g over the keys, as a (B, inner, H, W) map."""
        scale = q.shape[-1] ** -0.5 if self.use_scale else 1.0
        return tokens_to_map(global_attention(q, k, map_to_tokens(g), scale=scale), h, w)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips the Python-only check)
            check_input(self, x, self.channels)
        _, _, h, w = x.shape
        xk = self._pool(x) if self.sub_sample else x   # keys/values only
        g = self.g(xk)
        # the modes are told apart by the submodules they have (`hasattr` is resolved when TorchScript compiles the
        # module, so only the present submodules are compiled): gaussian has no theta / phi, concat alone has w_f
        if not hasattr(self, "theta"):   # gaussian: the raw input
            y = self._softmax_attention(map_to_tokens(x), map_to_tokens(xk), g, h, w)
        elif self.mode == "embedded":
            y = self._softmax_attention(map_to_tokens(self.theta(x)), map_to_tokens(self.phi(xk)), g, h, w)
        elif not hasattr(self, "w_f"):   # dot
            theta, phi = self.theta(x).flatten(2), self.phi(xk).flatten(2)
            n_keys = phi.shape[-1]                     # N', a constant (no gradient), as official
            with no_autocast(x.device):  # g phi^T sums N' products: fp32
                acc = _acc_dtype(theta)
                theta, phi, gf = theta.to(acc), phi.to(acc), g.flatten(2).to(acc)
                y = torch.matmul(torch.matmul(gf, phi.transpose(1, 2)), theta).div(n_keys)
            y = y.to(g.dtype).unflatten(2, (h, w))
        else:                            # concat
            theta, phi = self.theta(x), self.phi(xk)
            n_keys = phi.shape[-2] * phi.shape[-1]
            with no_autocast(x.device):
                acc = _acc_dtype(theta)
                w1, w2 = self.w_f.to(acc).chunk(2)
                a = torch.einsum("c,bcn->bn", w1, theta.flatten(2).to(acc))
                b = torch.einsum("c,bcn->bn", w2, phi.flatten(2).to(acc))
                y = concat_relu_aggregate(a, b, g.flatten(2).transpose(1, 2).to(acc)).div(n_keys)
            y = y.to(g.dtype).transpose(1, 2).unflatten(2, (h, w))
        return x + self.norm(self.w_z(y))


_PAPER = "Non-local Neural Networks (CVPR 2018, arXiv 1711.07971)"
for _name, _mode, _attends, _cost in (
    ("nonlocal", "embedded", "positions (softmax of embedded dot products)", "O(N^2 C)"),
    ("nonlocal_gaussian", "gaussian", "positions (softmax of raw-input dot products)", "O(N^2 C)"),
    ("nonlocal_dot", "dot", "positions (dot products / N', linear)", "O(N C^2)"),
    ("nonlocal_concat", "concat", "positions (ReLU of concatenation / N')", "O(N log N + N C)"),
):
    register_attn(_name, family="non_local", kind=GLOBAL, paper=_PAPER, year=2018, attends=_attends,
                  cost=_cost, cls=NonLocal2d, mode=_mode)
