"""Polarized Self-Attention: values of the 4 layouts x 2 formulations against the equations, written here
with explicit sums over N (no reassociation), sharing the block's weights; official state dict keys."""
import pytest
import torch

import lit_attn  # noqa: F401  (registers the blocks)
from lit_attn.layers.psa import PolarizedSelfAttention
from lit_attn.registry import create_attn, get_attn_entry

NAMES = {"psa_channel": "channel", "psa_spatial": "spatial", "psa_p": "parallel", "psa_s": "sequential"}


def softmax(t, dim):
    e = (t - t.amax(dim, keepdim=True)).exp()
    return e / e.sum(dim, keepdim=True)


def layer_norm(t, weight, bias, eps=1e-5):
    """LayerNorm of each row of t (B, D) with per-feature affine (weight, bias of shape (D, 1, 1))."""
    mu = t.mean(-1, keepdim=True)
    var = ((t - mu) ** 2).mean(-1, keepdim=True)
    return (t - mu) / torch.sqrt(var + eps) * weight.flatten() + bias.flatten()


def w2d(sd, key):
    return sd[key][:, :, 0, 0]


def ref_channel_mask(sd, x, variant):
    b, c, h, w = x.shape
    X = x.reshape(b, c, h * w)
    q = torch.einsum("oc,bcn->bon", w2d(sd, "conv_q_right.weight"), X)[:, 0]       # (B, N)
    v = torch.einsum("ic,bcn->bin", w2d(sd, "conv_v_right.weight"), X)             # (B, C', N)
    z = torch.einsum("bin,bn->bi", v, softmax(q, -1))                               # (B, C')
    if variant == "official_s":  # C' -> C'/4 (bias) -> LN -> ReLU -> C (bias)
        t = z @ w2d(sd, "conv_up.0.weight").T + sd["conv_up.0.bias"]
        t = torch.relu(layer_norm(t, sd["conv_up.1.weight"], sd["conv_up.1.bias"]))
        u = t @ w2d(sd, "conv_up.3.weight").T + sd["conv_up.3.bias"]
    else:
        u = z @ w2d(sd, "conv_up.weight").T
        if variant == "paper":
            u = layer_norm(u, sd["norm.weight"], sd["norm.bias"])
    return torch.sigmoid(u).reshape(b, c, 1, 1)


def ref_spatial_mask(sd, x, variant):
    b, c, h, w = x.shape
    X = x.reshape(b, c, h * w)
    g = torch.einsum("ic,bcn->bin", w2d(sd, "conv_q_left.weight"), X).mean(-1)    # GAP(W_q X): (B, C')
    v = torch.einsum("ic,bcn->bin", w2d(sd, "conv_v_left.weight"), X)             # (B, C', N)
    if variant == "paper":
        s = torch.einsum("bi,bin->bn", softmax(g, -1), v)
    elif variant == "official_p":
        s = softmax(torch.einsum("bi,bin->bn", g, v), -1)
    else:
        s = torch.einsum("bi,bin->bn", g, softmax(v, -1))
    return torch.sigmoid(s).reshape(b, 1, h, w)


def reference(sd, x, layout, formulation):
    variant = "paper" if formulation == "paper" else "official_s" if layout == "sequential" else "official_p"
    if layout == "channel":
        return ref_channel_mask(sd, x, variant) * x
    if layout == "spatial":
        return ref_spatial_mask(sd, x, variant) * x
    if layout == "parallel":
        return ref_channel_mask(sd, x, variant) * x + ref_spatial_mask(sd, x, variant) * x
    z = ref_channel_mask(sd, x, variant) * x
    return ref_spatial_mask(sd, z, variant) * z


def randomise(block, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return block


def x_input(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("formulation", ["paper", "official"])
@pytest.mark.parametrize("name", list(NAMES))
def test_values_match_equations(name, formulation):
    block = randomise(create_attn(name, 16, formulation=formulation, dtype=torch.float64))
    x = x_input(2, 16, 7, 9)
    sd = {k: v.detach() for k, v in block.state_dict().items()}
    torch.testing.assert_close(block(x), reference(sd, x, NAMES[name], formulation))
    # a non-default width and an odd channel count
    block = randomise(PolarizedSelfAttention(13, layout=NAMES[name], formulation=formulation, rd_ratio=1.0,
                                             dtype=torch.float64), seed=2)
    x = x_input(1, 13, 5, 3)
    sd = {k: v.detach() for k, v in block.state_dict().items()}
    torch.testing.assert_close(block(x), reference(sd, x, NAMES[name], formulation))


def test_registry_entries():
    for name, layout in NAMES.items():
        entry = get_attn_entry(name)
        assert entry.cls is PolarizedSelfAttention and entry.defaults == {"layout": layout}
        assert entry.family == "psa" and entry.kind == "gate" and entry.year == 2021
        block = create_attn(name, 32)
        assert block.layout == layout and block.formulation == "paper" and block.inter_channels == 16


def test_sequential_applies_spatial_to_channel_refined_features():
    x = x_input(2, 16, 7, 9)
    seq = randomise(create_attn("psa_s", 16, dtype=torch.float64))
    sd = seq.state_dict()
    ch = create_attn("psa_channel", 16, dtype=torch.float64)
    sp = create_attn("psa_spatial", 16, dtype=torch.float64)
    ch.load_state_dict({k: v for k, v in sd.items() if k in ch.state_dict()}, strict=True)
    sp.load_state_dict({k: v for k, v in sd.items() if k in sp.state_dict()}, strict=True)
    torch.testing.assert_close(seq(x), sp(ch(x)))
    # not the spatial gate of the raw input
    z = ch(x)
    assert not torch.allclose(seq(x), z * seq.spatial_mask(x))
    # parallel: the sum of the two single-branch blocks with the same weights
    par = create_attn("psa_p", 16, dtype=torch.float64)
    par.load_state_dict(sd, strict=True)
    torch.testing.assert_close(par(x), ch(x) + sp(x))


def test_sequential_official_order():
    x = x_input(2, 16, 7, 9)
    seq = randomise(create_attn("psa_s", 16, formulation="official", dtype=torch.float64))
    z = x * seq.channel_mask(x)
    torch.testing.assert_close(seq(x), z * seq.spatial_mask(z))
    assert not torch.allclose(seq(x), z * seq.spatial_mask(x))


def official_state_dict(kind, c, seed=0):
    """Keys and shapes of DeLightCMU/PSA's PSA_p(c, c) / PSA_s(c, c) (inter = c // 2, PSA_s ratio 4)."""
    i = c // 2
    shapes = {"conv_q_right.weight": (1, c, 1, 1), "conv_v_right.weight": (i, c, 1, 1),
              "conv_q_left.weight": (i, c, 1, 1), "conv_v_left.weight": (i, c, 1, 1)}
    if kind == "p":
        shapes["conv_up.weight"] = (c, i, 1, 1)
    else:
        shapes.update({"conv_up.0.weight": (i // 4, i, 1, 1), "conv_up.0.bias": (i // 4,),
                       "conv_up.1.weight": (i // 4, 1, 1), "conv_up.1.bias": (i // 4, 1, 1),
                       "conv_up.3.weight": (c, i // 4, 1, 1), "conv_up.3.bias": (c,)})
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.3 for k, s in shapes.items()}


@pytest.mark.parametrize("name,kind", [("psa_p", "p"), ("psa_s", "s")])
def test_official_checkpoint_keys_load_strictly(name, kind):
    sd = official_state_dict(kind, 64)
    block = create_attn(name, 64, formulation="official")
    block.load_state_dict(sd, strict=True)
    assert set(block.state_dict()) == set(sd)
    x = torch.randn(2, 64, 6, 5, generator=torch.Generator().manual_seed(3))
    ref = reference({k: v.double() for k, v in sd.items()}, x.double(), NAMES[name], "official")
    torch.testing.assert_close(block(x), ref.float(), rtol=1e-4, atol=1e-5)
    # a whole-network checkpoint: keys under a prefix
    net = torch.nn.Sequential(torch.nn.Identity(), create_attn(name, 64, formulation="official"))
    net.load_state_dict({f"1.{k}": v for k, v in sd.items()}, strict=True)


def test_official_init_and_biases():
    torch.manual_seed(0)
    p = create_attn("psa_p", 256, formulation="official")
    s = create_attn("psa_s", 256, formulation="official")
    for blk in (p, s):
        for n in ("conv_q_right", "conv_v_right", "conv_q_left", "conv_v_left"):
            conv = getattr(blk, n)
            assert conv.bias is None
            std = conv.weight.std().item()
            assert abs(std / (2 / 256) ** 0.5 - 1) < 0.1  # kaiming normal, fan_in, ReLU gain
    assert p.conv_up.bias is None and isinstance(p.norm, torch.nn.Identity)
    assert s.conv_up[0].bias is not None and isinstance(s.conv_up[2], torch.nn.ReLU)
    assert isinstance(create_attn("psa_s", 32, formulation="official", act_layer="silu").conv_up[2],
                      torch.nn.SiLU)
    # paper formulation: bias-free W_z followed by LayerNorm over (C, 1, 1); act_layer ignored
    q = create_attn("psa_s", 32, act_layer="silu")
    assert q.conv_up.bias is None and q.norm.normalized_shape == (32, 1, 1)
    assert not any(isinstance(m, torch.nn.SiLU) for m in q.modules())


def test_official_parallel_spatial_mask_is_nearly_constant():
    """METHODS.md pitfall 2: sigmoid(softmax over N) lies in (0.5, sigmoid(1)) and ~0.5 for large N."""
    blk = randomise(create_attn("psa_p", 16, formulation="official"))
    m = blk.spatial_mask(torch.randn(2, 16, 32, 32))
    assert m.min() >= 0.5 and m.max() <= torch.sigmoid(torch.tensor(1.0))
    assert m.median() - 0.5 < 1e-2


@pytest.mark.parametrize("name", ["psa_p", "psa_s", "psa_channel"])
def test_official_bf16_meta_and_gradients(name):
    blk = randomise(create_attn(name, 32, formulation="official", dtype=torch.float32), scale=0.2)
    x = torch.randn(2, 32, 7, 9, generator=torch.Generator().manual_seed(4))
    ref = blk(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = blk(x.to(memory_format=torch.channels_last))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)
    ref.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blk.parameters())
    meta = create_attn(name, 32, formulation="official", device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())


def test_argument_validation():
    with pytest.raises(ValueError, match="formulation"):
        create_attn("psa_p", 32, formulation="mmseg")
    with pytest.raises(ValueError, match="layout"):
        PolarizedSelfAttention(32, layout="both")
    with pytest.raises(ValueError, match="rd_ratio"):
        PolarizedSelfAttention(32, rd_ratio=0)
    with pytest.raises(ValueError, match="PolarizedSelfAttention"):
        PolarizedSelfAttention(0)
