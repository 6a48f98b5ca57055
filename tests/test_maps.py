"""lit_attn.maps: each declared map against an independent computation written here (full N x N attention
matrices, naive EM, gates recovered from the block's output / input), the fallback, query placement, the
timm / smp models, and no N x N tensor while computing the maps."""
from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from helpers import MaxNumel, randomize_
from torch import nn

import lit_attn
from lit_attn.layers.non_local import NonLocal2d
from lit_attn.maps import attention_maps, feature_cells, supported_blocks, to_image

ATOL = 1e-5


def conv1x1(m, t):
    out = torch.einsum("oc,bchw->bohw", m.weight[:, :, 0, 0], t)
    return out if m.bias is None else out + m.bias[:, None, None]


def single(block, x, **kw):
    """The maps of one block, run as a model of its own (path "0")."""
    return attention_maps(nn.Sequential(block), x, **kw)


def rows_at(full, cells, w):
    """Rows of the (B, N, Nk) matrix `full` at the (row, col) cells of a width-w grid: (B, Q, Nk)."""
    return full[:, [r * w + c for r, c in cells]]


# ------------------------------------------------------------------------------------------ non-local
def naive_nonlocal(block: NonLocal2d, x):
    """The full (B, N, N') pairwise matrix f / C(x) from the block's weights, and the block's output from it."""
    xk = F.max_pool2d(x, 2, 2, ceil_mode=block.pool_ceil) if block.sub_sample else x
    if block.mode == "gaussian":
        th, ph = x.flatten(2), xk.flatten(2)
    else:
        th, ph = conv1x1(block.theta, x).flatten(2), conv1x1(block.phi, xk).flatten(2)
    n_keys = ph.shape[-1]
    if block.mode in ("embedded", "gaussian"):
        s = th.shape[1] ** -0.5 if block.use_scale else 1.0
        full = torch.softmax(th.transpose(1, 2) @ ph * s, -1)
    elif block.mode == "dot":
        full = th.transpose(1, 2) @ ph / n_keys
    else:
        c = th.shape[1]
        pair = block.w_f[:c] @ th              # (B, N)
        full = torch.relu(pair[:, :, None] + (block.w_f[c:] @ ph)[:, None]) / n_keys
    g = conv1x1(block.g, xk).flatten(2)
    y = (g @ full.transpose(1, 2)).unflatten(2, x.shape[-2:])
    return full, x + block.norm(conv1x1(block.w_z, y))


@pytest.mark.parametrize("mode,sub_sample,size", [("embedded", False, (8, 8)), ("gaussian", False, (6, 7)),
                                                  ("dot", False, (8, 8)), ("concat", False, (8, 8)),
                                                  ("embedded", True, (8, 8)), ("embedded", "ceil", (7, 9))])
def test_nonlocal_rows_equal_the_full_matrix(mode, sub_sample, size):
    block = NonLocal2d(8, mode=mode, sub_sample=bool(sub_sample), pool_ceil=sub_sample == "ceil")
    randomize_(block, 1).eval()
    if mode == "concat":
        block.w_f.data.normal_()
    x = torch.randn(2, 8, *size)
    full, out = naive_nonlocal(block, x)
    with torch.no_grad():
        assert torch.allclose(out, block(x), atol=1e-4)  # the reference is the block's maths
        queries = [(0, 0), (3, 5), (size[0] - 1, size[1] - 1)]
        m = single(block, x, queries=queries)["0"]
    assert m.kind == "query_attention" and m.queries == queries  # image = feature grid here
    hk, wk = m.feature_size
    assert (hk * wk) == full.shape[-1] and hk == (-(-size[0] // 2) if sub_sample == "ceil" else
                                                   size[0] // 2 if sub_sample else size[0])
    assert torch.allclose(m.map.flatten(2), rows_at(full, queries, size[1]), atol=ATOL)
    if mode in ("embedded", "gaussian"):
        assert torch.allclose(m.map.sum((2, 3)), torch.ones(2, 3), atol=ATOL)


# ------------------------------------------------------------------------------------------ DANet
def test_danet_pam_rows_and_cam_affinity():
    block = randomize_(lit_attn.create_attn("danet", 16), 2).eval()
    x = torch.randn(2, 16, 6, 8)
    q, k = conv1x1(block.pam.query_conv, x).flatten(2), conv1x1(block.pam.key_conv, x).flatten(2)
    full = torch.softmax(q.transpose(1, 2) @ k, -1)                         # (B, N, N), unscaled
    f = x.flatten(2)
    energy = f @ f.transpose(1, 2)
    cam = torch.softmax(energy.max(-1, keepdim=True)[0] - energy, -1)       # the official CAM_Module's form
    block.pam.gamma.data.fill_(0.7)
    block.cam.gamma.data.fill_(-0.3)
    v = conv1x1(block.pam.value_conv, x).flatten(2)
    ref = x + 0.7 * (v @ full.transpose(1, 2)).unflatten(2, (6, 8)) - 0.3 * (cam @ f).unflatten(2, (6, 8))
    with torch.no_grad():
        assert torch.allclose(block(x), ref, atol=1e-4)
        maps = single(block, x, queries=[(5, 7), (2, 1)])
    assert set(maps) == {"0:pam", "0:cam"}
    assert torch.allclose(maps["0:pam"].map.flatten(2), rows_at(full, [(5, 7), (2, 1)], 8), atol=ATOL)
    assert maps["0:cam"].kind == "channel_affinity"
    assert torch.allclose(maps["0:cam"].map, cam, atol=ATOL)
    stable = lit_attn.create_attn("danet_cam", 16, mode="stable")
    with torch.no_grad():
        m = single(stable, x)["0"]
    assert torch.allclose(m.map, torch.softmax(energy, -1), atol=ATOL)


# ------------------------------------------------------------------------------------------ criss-cross
def naive_cross_matrix(q, k):
    """Dense (B, N, N) criss-cross attention: softmax over the same row and column only (-inf elsewhere)."""
    h, w = q.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    yy, xx = yy.flatten(), xx.flatten()
    allowed = (yy[:, None] == yy[None]) | (xx[:, None] == xx[None])
    logits = q.flatten(2).transpose(1, 2) @ k.flatten(2)
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)


@pytest.mark.parametrize("recurrence", [1, 2, 3])
def test_criss_cross_passes_and_composed_map(recurrence):
    block = randomize_(lit_attn.create_attn("criss_cross", 16, recurrence=recurrence), 3).eval()
    block.gamma.data.fill_(0.8)
    x = torch.randn(2, 16, 5, 7)
    xr, mats = x, []
    for _ in range(recurrence):  # x_{r+1} = x_r + gamma * V_r A_r^T
        a = naive_cross_matrix(conv1x1(block.query_conv, xr), conv1x1(block.key_conv, xr))
        mats.append(a)
        xr = xr + 0.8 * (conv1x1(block.value_conv, xr).flatten(2) @ a.transpose(1, 2)).unflatten(2, (5, 7))
    queries = [(0, 0), (2, 3), (4, 6)]
    with torch.no_grad():
        assert torch.allclose(block(x), xr, atol=1e-4)
        maps = single(block, x, queries=queries)
    for r in range(recurrence):
        m = maps[f"0:pass{r + 1}"].map.flatten(2)
        assert torch.allclose(m, rows_at(mats[r], queries, 7), atol=ATOL)
        assert ((m > 0).sum(-1) == 5 + 7 - 1).all()                         # the row and the column only
    if recurrence > 1:
        composed = mats[-1]
        for a in reversed(mats[:-1]):
            composed = composed @ a
        m = maps["0:composed"].map.flatten(2)
        assert torch.allclose(m, rows_at(composed, queries, 7), atol=ATOL)
        assert torch.allclose(m.sum(-1), torch.ones(2, 3), atol=ATOL)
        assert (m > 0).all()                                                # two passes reach every pixel
    else:
        assert "0:composed" not in maps


# ------------------------------------------------------------------------------------------ Base-OC, DNL, ISA
def softmax_rows(q, k, scale=1.0, allowed=None):
    """Dense (B, N, Nk) softmax_j(q_i . k_j * scale) of q (B, C, N), k (B, C, Nk), -inf where not `allowed`."""
    logits = q.transpose(1, 2) @ k * scale
    return torch.softmax(logits if allowed is None else logits.masked_fill(~allowed, float("-inf")), -1)


@pytest.mark.parametrize("scale,size", [(1, (6, 7)), (2, (7, 9))])
def test_base_oc_rows_equal_the_full_matrix(scale, size):
    block = randomize_(lit_attn.create_attn("base_oc", 16, scale=scale), 11).eval()
    x = torch.randn(2, 16, *size)
    xs = F.max_pool2d(x, scale, scale, ceil_mode=True) if scale > 1 else x
    hs, ws = xs.shape[-2:]
    sab = block.attn
    full = softmax_rows(sab.f_query(xs).flatten(2), sab.f_key(xs).flatten(2), block.attn.key_channels ** -0.5)
    eye = torch.eye(hs * ws).reshape(1, hs * ws, hs, ws)     # U[j', p]: the upsampling's weight of pooled j' at p
    up = F.interpolate(eye, size=size, mode="bilinear", align_corners=True).flatten(2)[0]
    effective = up.T @ full                                  # (B, N, N'): the query's weights of the pooled keys
    ctx = conv1x1(sab.W, (conv1x1(sab.f_value, xs).flatten(2) @ effective.transpose(1, 2)).unflatten(2, size))
    queries = [(0, 0), (3, 4), (size[0] - 1, size[1] - 2)]
    with torch.no_grad():
        assert torch.allclose(block.context(x), ctx, atol=1e-4)
        m = single(block, x, queries=queries)["0"]
    assert m.kind == "query_attention" and m.feature_size == (hs, ws)
    assert torch.allclose(m.map.flatten(2), rows_at(effective, queries, size[1]), atol=ATOL)
    assert torch.allclose(m.map.sum((2, 3)), torch.ones(2, 3), atol=ATOL)


@pytest.mark.parametrize("name", ["dnl", "dnl_mmseg"])
def test_dnl_pairwise_rows_and_unary_map(name):
    block = randomize_(lit_attn.create_attn(name, 16, temperature=0.5), 12).eval()
    x = torch.randn(2, 16, 6, 5)
    q, k = conv1x1(block.theta.conv, x).flatten(2), conv1x1(block.phi.conv, x).flatten(2)
    q, k = q - q.mean(-1, keepdim=True), k - k.mean(-1, keepdim=True)
    full = softmax_rows(q, k, 8 ** -0.5 / 0.5)
    unary = torch.softmax(conv1x1(block.conv_mask, x).flatten(2), -1)            # (B, 1, N)
    v = conv1x1(block.g.conv, x).flatten(2)
    pair_ctx = (v @ full.transpose(1, 2)).unflatten(2, (6, 5))
    unary_ctx = (v @ unary.transpose(1, 2))[..., None]                           # (B, Cv, 1, 1)
    if name == "dnl":
        block.gamma.data.fill_(0.6)
        ref = x + 0.6 * pair_ctx + unary_ctx
    else:
        ref = x + block.conv_out(pair_ctx + unary_ctx)
    queries = [(0, 0), (4, 2), (5, 4)]
    with torch.no_grad():
        assert torch.allclose(block(x), ref, atol=1e-4)
        maps = single(block, x, queries=queries)
    assert set(maps) == {"0:pairwise", "0:unary"}
    assert maps["0:pairwise"].kind == "query_attention" and maps["0:unary"].kind == "shared_attention"
    assert torch.allclose(maps["0:pairwise"].map.flatten(2), rows_at(full, queries, 5), atol=ATOL)
    assert torch.allclose(maps["0:unary"].map.flatten(2), unary, atol=ATOL)
    assert maps["0:unary"].map.shape == (2, 1, 6, 5)


@pytest.mark.parametrize("size,down", [((10, 13), (4, 4)), ((8, 6), (2, 3))])
def test_isa_composed_rows_equal_the_dense_two_stage_product(size, down):
    block = randomize_(lit_attn.create_attn("isa", 16, down_factor=down), 13).eval()
    x = torch.randn(2, 16, *size)
    (h, w), (dh, dw) = size, down
    hp, wp = -(-h // dh) * dh, -(-w // dw) * dw
    top, left = (hp - h) // 2, (wp - w) // 2
    xp = F.pad(x, (left, wp - w - left, top, hp - h - top))
    yy, xx = [t.flatten() for t in torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")]
    same_offset = (yy[:, None] % dh == yy[None] % dh) & (xx[:, None] % dw == xx[None] % dw)
    same_block = (yy[:, None] // dh == yy[None] // dh) & (xx[:, None] // dw == xx[None] // dw)
    stages, feats = [], xp
    for sab, allowed in ((block.long_range_sa, same_offset), (block.short_range_sa, same_block)):
        a = softmax_rows(sab.f_query(feats).flatten(2), sab.f_key(feats).flatten(2), sab.scale, allowed)
        stages.append(a)
        feats = sab.W((conv1x1(sab.f_value, feats).flatten(2) @ a.transpose(1, 2)).unflatten(2, (hp, wp)))
    composed = stages[1] @ stages[0]                                         # (B, Np, Np): short after long
    queries = [(0, 0), (h // 2, w // 2), (h - 1, w - 1), (1, w - 2)]
    rows = rows_at(composed, [(r + top, c + left) for r, c in queries], wp).unflatten(2, (hp, wp))
    with torch.no_grad():
        assert torch.allclose(block.context(x), feats[:, :, top:top + h, left:left + w], atol=1e-4)
        m = single(block, x, queries=queries)["0"]
    assert m.kind == "query_attention" and m.map.shape == (2, 4, h, w)
    assert torch.allclose(m.map, rows[:, :, top:top + h, left:left + w], atol=ATOL)
    assert ((composed > 0).sum(-1) == hp * wp).all()                         # one path to every pixel
    padded = (hp, wp) != (h, w)
    sums = m.map.sum((2, 3))
    assert (sums < 1 - 1e-3).all() if padded else torch.allclose(sums, torch.ones(2, 4), atol=ATOL)


# ------------------------------------------------------------------------------------------ low-rank
def test_a2_gather_and_distribute_maps():
    block = randomize_(lit_attn.create_attn("a2", 16, num_descriptors=5), 14).eval()
    x = torch.randn(2, 16, 6, 7)
    gather = torch.softmax(conv1x1(block.conv_b, x).flatten(2), -1)             # (B, n, N) over the pixels
    distribute = torch.softmax(conv1x1(block.conv_v, x).flatten(2), 1)          # (B, n, N) over the descriptors
    z = (conv1x1(block.conv_a, x).flatten(2) @ gather.transpose(1, 2)) @ distribute
    with torch.no_grad():
        assert torch.allclose(block(x), x + conv1x1(block.conv_out, z.unflatten(2, (6, 7))), atol=1e-4)
        maps = single(block, x)
    assert {k: m.kind for k, m in maps.items()} == {"0:gather": "assignment", "0:distribute": "assignment"}
    assert torch.allclose(maps["0:gather"].map.flatten(2), gather, atol=ATOL)
    assert torch.allclose(maps["0:distribute"].map.flatten(2), distribute, atol=ATOL)


@pytest.mark.parametrize("normalize", [False, True])
def test_glore_projection_is_the_one_forward_uses(normalize):
    block = randomize_(lit_attn.create_attn("glore", 16, normalize=normalize), 15).eval()
    block.blocker.weight.data.normal_()
    x = torch.randn(2, 16, 5, 6)
    proj = conv1x1(block.conv_proj, x).flatten(2)                               # (B, Nn, N)
    v = conv1x1(block.conv_state, x).flatten(2) @ proj.transpose(1, 2)           # official GloRe_Unit order
    v = v / 30 if normalize else v
    y = block.conv_extend.weight[:, :, 0, 0] @ block.gcn(v) @ proj
    with torch.no_grad():
        assert torch.allclose(block(x), x + block.blocker(y.unflatten(2, (5, 6))), atol=1e-3)
        m = single(block, x)["0"]
    assert m.kind == "assignment" and m.map.shape == (2, 4, 5, 6)
    assert torch.allclose(m.map.flatten(2), proj, atol=ATOL)


@pytest.mark.parametrize("mode,dims", [("asymmetric", (3, 4)), ("symmetric", (5,))])
def test_latentgnn_adjacencies(mode, dims):
    block = randomize_(lit_attn.create_attn("latentgnn", 16, latent_dims=dims, mode=mode), 16).eval()
    block.gamma.data.fill_(0.5)
    x = torch.randn(2, 16, 5, 6)
    sym = mode == "symmetric"
    v2l = F.normalize(block.down_channel(x) if sym else block.down_channel_v2l(x), dim=1)
    l2v = v2l if sym else F.normalize(block.down_channel_l2v(x), dim=1)
    outs, adjs = [], {}
    for i in range(len(dims)):  # official LatentGNN_Kernel.forward, written out
        kernel = getattr(block, f"LatentGNN_Kernel_{i}")
        if sym:
            a_v2l = a_l2v = F.normalize(kernel.psi(v2l).flatten(2), dim=1)
        else:
            a_v2l = F.normalize(kernel.psi_v2l(v2l).flatten(2), dim=2)
            a_l2v = F.normalize(kernel.psi_l2v(l2v).flatten(2), dim=1)
        nodes = a_v2l @ v2l.flatten(2).transpose(1, 2)
        nn_ = F.normalize(nodes, dim=-1)
        nodes = torch.softmax(nn_ @ nn_.transpose(1, 2), -1) @ nodes
        outs.append((nodes.transpose(1, 2) @ a_l2v).unflatten(2, (5, 6)))
        suffix = str(i) if len(dims) > 1 else ""
        adjs["0:v2l" + suffix] = a_v2l
        if not sym:
            adjs["0:l2v" + suffix] = a_l2v
    with torch.no_grad():
        assert torch.allclose(block(x), x + 0.5 * block.up_channel(torch.cat(outs, 1)), atol=1e-4)
        maps = single(block, x)
    assert set(maps) == set(adjs)
    for key, adj in adjs.items():
        assert maps[key].kind == "assignment" and torch.allclose(maps[key].map.flatten(2), adj, atol=ATOL), key


# ------------------------------------------------------------------------------------------ PSANet
def naive_psa_logits(mask, mask_h, mask_w):
    """(B, N, N) G[i, j] = mask_i at offset j - i (channel (dy + half_h) * mask_w + dx + half_w), 0 outside."""
    b, _, h, w = mask.shape
    g = torch.zeros(b, h * w, h * w)
    for i in range(h * w):
        for j in range(h * w):
            dy, dx = j // w - i // w + (mask_h - 1) // 2, j % w - i % w + (mask_w - 1) // 2
            if 0 <= dy < mask_h and 0 <= dx < mask_w:
                g[:, i, j] = mask[:, dy * mask_w + dx, i // w, i % w]
    return g


@pytest.mark.parametrize("psa_type", ["bi-direction", "distribute"])
def test_psanet_collect_and_distribute_rows(psa_type):
    block = lit_attn.create_attn("psanet", 16, mask_size=(5, 3), psa_type=psa_type, shrink_factor=1,
                                 proj_padding=0, normalization_factor=2.0)
    randomize_(block, 17).eval()
    x = torch.randn(2, 16, 6, 5)
    branches = [(block.reduce, block.attention, psa_type if psa_type != "bi-direction" else "collect")]
    if psa_type == "bi-direction":
        branches.append((block.reduce_p, block.attention_p, "distribute"))
    outs, mats = [], {}
    for reduce, attention, kind in branches:
        feats = reduce(x)
        g = naive_psa_logits(attention(feats), 5, 3)
        # collect: out_i = sum_j softmax_j(G)[i, j] v_j; distribute: out_j = sum_i softmax_i(G)[i, j] v_i
        a = torch.softmax(g, -1) if kind == "collect" else torch.softmax(g, 1).transpose(1, 2)
        mats[kind] = a                                                      # row = the query
        outs.append((feats.flatten(2) @ a.transpose(1, 2)).unflatten(2, (6, 5)) / 2.0)
    queries = [(0, 0), (3, 2), (5, 4), (1, 4)]
    with torch.no_grad():
        assert torch.allclose(block.context(x), block.proj(torch.cat(outs, 1)), atol=1e-4)
        maps = single(block, x, queries=queries)
    assert set(maps) == {f"0:{k}" for k in mats}
    for kind, a in mats.items():
        m = maps[f"0:{kind}"]
        assert m.kind == "query_attention" and m.map.shape == (2, 4, 6, 5)
        assert torch.allclose(m.map.flatten(2), rows_at(a, queries, 5), atol=ATOL), kind


# ------------------------------------------------------------------------------------------ gates
@pytest.mark.parametrize("formulation", ["paper", "official"])
@pytest.mark.parametrize("layout", ["channel", "spatial", "parallel", "sequential"])
def test_psa_gates_are_what_forward_applies(layout, formulation):
    block = lit_attn.create_attn("psa_p", 16, layout=layout, formulation=formulation)
    randomize_(block, 4).eval()
    x = torch.randn(2, 16, 6, 5)
    with torch.no_grad():
        ratio = block(x) / x                         # the gate recovered from the output
        maps = single(block, x)
    ch = maps["0:channel"].map[:, :, None, None] if layout != "spatial" else None
    sp = maps["0:spatial"].map if layout != "channel" else None
    gate = {"channel": lambda: ch, "spatial": lambda: sp, "parallel": lambda: ch + sp,
            "sequential": lambda: ch * sp}[layout]()
    keep = x.abs() > 0.1
    assert torch.allclose(ratio[keep], gate.expand_as(x)[keep], rtol=1e-4, atol=1e-5)
    for m in maps.values():
        assert m.kind in ("channel_gate", "spatial_gate") and ((m.map > 0) & (m.map < 1)).all()


def test_residual_attention_mask_is_the_gate():
    block = randomize_(lit_attn.create_attn("residual_attention", 8, p=0, t=0), 5).eval()
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        ratio = block(x) / x                         # p = t = 0: H = (1 + M) x
        m = single(block, x)["0"]
    keep = x.abs() > 0.1
    assert m.kind == "mixed_gate" and m.map.shape == x.shape
    assert torch.allclose(ratio[keep], 1 + m.map[keep], rtol=1e-4, atol=1e-5)


def test_ema_responsibilities_equal_a_naive_em():
    block = randomize_(lit_attn.create_attn("ema", 16, num_bases=6, iterations=3), 6).eval()
    x = torch.randn(2, 16, 5, 6)
    feats = conv1x1(block.conv1, x).flatten(2)
    mu = block.mu.repeat(2, 1, 1)
    for _ in range(3):  # XiaLiPKU/EMANet network.py EMAU.forward, written out
        z = torch.softmax(feats.transpose(1, 2) @ mu, dim=2)
        z_ = z / (1e-6 + z.sum(dim=1, keepdim=True))
        mu = feats @ z_
        mu = mu / (1e-6 + mu.norm(dim=1, keepdim=True))
    recon = (mu @ z.transpose(1, 2)).unflatten(2, (5, 6))
    with torch.no_grad():
        assert torch.allclose(block(x), (block.conv2(F.relu(recon)) + x).relu(), atol=1e-4)
        m = single(block, x)["0"]
    assert m.kind == "assignment" and m.map.shape == (2, 6, 5, 6)
    assert torch.allclose(m.map, z.transpose(1, 2).unflatten(2, (5, 6)), atol=ATOL)
    assert torch.allclose(m.map.sum(1), torch.ones(2, 5, 6), atol=ATOL)


class _OCRHolder(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x[:, :16], x[:, 16:])


def test_ocr_regions_and_pixel_region_attention():
    block = randomize_(lit_attn.create_attn("ocr", 16, key_channels=8, scale=1.5), 7).eval()
    feats, logits = torch.randn(2, 16, 6, 5), torch.randn(2, 3, 6, 5)
    probs = torch.softmax(1.5 * logits.flatten(2), -1)                          # (B, K, N) over the pixels
    regions = (probs @ feats.flatten(2).transpose(1, 2)).transpose(1, 2)[..., None]   # (B, C, K, 1)
    sab = block.object_context_block
    q, k = sab.f_query(feats).flatten(2), sab.f_key(regions).flatten(2)
    attn = torch.softmax(q.transpose(1, 2) @ k * 8 ** -0.5, -1)                # (B, N, K)
    ctx = sab.W((attn @ sab.f_value(regions).flatten(2).transpose(1, 2)).transpose(1, 2).unflatten(2, (6, 5)))
    with torch.no_grad():
        assert torch.allclose(block(feats, logits), block.conv_bn_dropout(torch.cat([ctx, feats], 1)), atol=1e-4)
        maps = attention_maps(_OCRHolder(block), torch.cat([feats, logits], 1))
    assert torch.allclose(maps["block:regions"].map.flatten(2), probs, atol=ATOL)
    assert torch.allclose(maps["block:regions"].map.sum((2, 3)), torch.ones(2, 3), atol=ATOL)
    assert torch.allclose(maps["block:pixel_region"].map.flatten(2), attn.transpose(1, 2), atol=ATOL)


def test_fallback_is_the_residual_norm():
    assert "cbam" not in supported_blocks()
    block = randomize_(lit_attn.create_attn("cbam", 16), 8).eval()
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        ref = (block(x) - x).norm(dim=1, keepdim=True)
        m = single(block, x)["0"]
    assert m.kind == "residual_norm" and m.note.startswith("fallback") and m.name == "cbam"
    assert torch.allclose(m.map, ref, atol=ATOL)


# ------------------------------------------------------------------------------------------ queries, API
@pytest.mark.parametrize("image,queries,cells", [((64, 64), [(37, 10), (0, 63)], [(4, 1), (0, 7)]),
                                                 ((48, 64), [(47, 63), (20, 33)], [(5, 7), (2, 4)])])
def test_queries_land_on_their_feature_cell(image, queries, cells):
    block = randomize_(NonLocal2d(8), 9)
    model = nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), block).eval()
    x = torch.randn(1, 3, *image)
    assert feature_cells(queries, image, (image[0] // 8, image[1] // 8)).tolist() == [list(c) for c in cells]
    with torch.no_grad():
        m = attention_maps(model, x, queries=queries)["1"]
        full, _ = naive_nonlocal(block, model[0](x))
    assert m.queries == cells and m.image_size == image
    assert torch.allclose(m.map.flatten(2), rows_at(full, cells, image[1] // 8), atol=ATOL)
    assert m.to_image().shape == (1, 2, *image)
    with torch.no_grad():
        centre = attention_maps(model, x)["1"]      # default: the image centre
    assert centre.queries == [(image[0] // 16, image[1] // 16)]


def test_bad_queries_and_images_raise_and_training_is_restored():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), NonLocal2d(8)).train()
    x = torch.randn(1, 3, 8, 8)
    for bad in ([(8, 0)], [(1,)], [(-1, 2)], [(1.5, 2)], []):
        with pytest.raises(ValueError, match="queries"):
            attention_maps(model, x, queries=bad)
    with pytest.raises(ValueError, match="images"):
        attention_maps(model, torch.randn(3, 8, 8))
    assert model.training and set(attention_maps(model, x, blocks=["nonlocal"])) == {"1"}
    assert attention_maps(model, x, blocks=["danet"]) == {}
    assert model.training
    const = torch.full((1, 2, 4, 4), 0.25)
    assert torch.allclose(to_image(const, (16, 12)), torch.full((1, 2, 16, 12), 0.25))


def test_timm_resnet18_variants():
    x = torch.randn(2, 3, 64, 64)
    model = timm.create_model("resnet18_nonlocal").eval()
    seen = {}
    model.layer3[1].context.register_forward_hook(lambda m, a, o: seen.setdefault("x", a[0]))
    with torch.no_grad():
        maps = attention_maps(model, x, queries=[(40, 20)])
    assert set(maps) == {"layer2.1.context", "layer3.1.context"}
    m = maps["layer3.1.context"]
    assert m.name == "nonlocal" and m.map.shape == (2, 1, 4, 4) and m.queries == [(2, 1)]
    full, _ = naive_nonlocal(model.layer3[1].context, seen["x"])
    assert torch.allclose(m.map.flatten(2), rows_at(full, [(2, 1)], 4), atol=ATOL)

    model = timm.create_model("resnet18_psa_p").eval()
    with torch.no_grad():
        maps = attention_maps(model, x)
    assert len(maps) == 16 and {m.name for m in maps.values()} == {"psa_p"}
    assert maps["layer4.1.se:channel"].map.shape == (2, 512) and maps["layer4.1.se:spatial"].map.shape == (2, 1, 2, 2)


@pytest.mark.parametrize("arch", ["danet", "ccnet", "emanet", "ocrnet"])
def test_smp_archs(arch):
    model = smp.create_model(arch, encoder_name="resnet18", encoder_weights=None, classes=3).eval()
    with torch.no_grad():
        maps = attention_maps(model, torch.randn(2, 3, 64, 64), queries=[(10, 50), (63, 0)])
    kinds = {k: m.kind for k, m in maps.items()}
    one = torch.ones(2, 2)
    if arch == "danet":
        assert kinds == {"decoder.pam": "query_attention", "decoder.cam": "channel_affinity"}
        assert torch.allclose(maps["decoder.pam"].map.sum((2, 3)), one, atol=ATOL)
        assert maps["decoder.pam"].queries == [(1, 6), (7, 0)]
        assert torch.allclose(maps["decoder.cam"].map.sum(-1), torch.ones(2, 512), atol=ATOL)
    elif arch == "ccnet":
        assert set(kinds) == {"decoder.attn:pass1", "decoder.attn:pass2", "decoder.attn:composed"}
        for m in maps.values():
            assert m.map.shape == (2, 2, 8, 8) and torch.allclose(m.map.sum((2, 3)), one, atol=ATOL)
    elif arch == "emanet":
        m = maps["decoder.ema"]
        assert m.kind == "assignment" and torch.allclose(m.map.sum(1), torch.ones(2, 8, 8), atol=ATOL)
    else:
        regions, pix = maps["decoder.ocr:regions"].map, maps["decoder.ocr:pixel_region"].map
        assert regions.shape == pix.shape == (2, 3, 8, 8)
        assert torch.allclose(regions.sum((2, 3)), torch.ones(2, 3), atol=ATOL)
        assert torch.allclose(pix.sum(1), torch.ones(2, 8, 8), atol=ATOL)


@pytest.mark.parametrize("block", ["nonlocal", "nonlocal_gaussian", "nonlocal_dot", "nonlocal_concat",
                                   "danet_pam", "criss_cross", "base_oc", "dnl", "isa"])
def test_no_n_by_n_tensor(block, monkeypatch):
    import lit_attn.ops.attention as ops_attention

    monkeypatch.setattr(ops_attention, "CHUNK_ELEMENTS", 1 << 16)  # the blocks' own forward chunks too
    model = nn.Sequential(nn.Conv2d(3, 8, 1), lit_attn.create_attn(block, 8)).eval()
    n = 64 * 64
    queries = [(r, c) for r in (0, 31, 63) for c in (5, 40)]
    with MaxNumel() as rec:
        maps = attention_maps(model, torch.randn(1, 3, 64, 64), queries=queries)
    assert rec.max_numel < n * n // 16, (rec.max_numel, n * n)
    assert all(m.map.shape == (1, 6, 64, 64) for m in maps.values() if m.kind == "query_attention")
    with MaxNumel() as naive:  # the recorder does see an N x N matrix
        torch.randn(1, n, 2) @ torch.randn(1, 2, n)
    assert naive.max_numel >= n * n
