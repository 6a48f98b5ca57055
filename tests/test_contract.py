"""The block contract (DESIGN.md), checked for every registered lit_attn plug-in block."""
import inspect

import pytest
import timm
import torch
from torch import nn

import lit_attn
from lit_attn.registry import GATE, GLOBAL

PLUGINS = lit_attn.list_attn(kind=(GATE, GLOBAL), source="lit_attn")
C = 32


def randomise(block: nn.Module, std: float = 0.2) -> nn.Module:
    """Non-zero random parameters, so zero-init gammas/norms neither hide gradients nor make identities."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return block


def build(name, **kwargs):
    return lit_attn.create_attn(name, C, **kwargs)


def test_every_issue_name_is_registered():
    expected = {"psa_channel", "psa_spatial", "psa_p", "psa_s", "nonlocal", "nonlocal_gaussian", "nonlocal_dot",
                "nonlocal_concat", "danet_pam", "danet_cam", "danet", "residual_attention", "aa_conv",
                "se", "ese", "eca", "ceca", "ge", "gc", "gca", "cbam", "lcbam", "coord", "nl", "bat",
                # the efficient global-context family (issue 4)
                "criss_cross", "isa", "ema", "a2", "glore", "cgnl", "latentgnn", "dnl", "apnb", "afnb", "base_oc",
                "ocr", "acm", "psanet", "dgmn", "local_relation", "carafe"}
    assert expected <= set(lit_attn.list_attn())
    for name in lit_attn.list_attn():
        e = lit_attn.get_attn_entry(name)
        assert e.paper and e.cost and e.attends and e.family and e.year > 2000


@pytest.mark.parametrize("name", PLUGINS)
@pytest.mark.parametrize("shape", [(2, C, 16, 16), (1, C, 7, 9), (1, C, 1, 1), (3, C, 2, 13)])
def test_shape_and_finite(name, shape):
    block = randomise(build(name)).eval()
    x = torch.randn(shape)
    out = block(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", PLUGINS)
def test_gradients_reach_every_parameter(name):
    block = randomise(build(name)).train()
    x = torch.randn(2, C, 7, 9, requires_grad=True)
    (block(x) * torch.randn(2, C, 7, 9)).sum().backward()
    skip = set(getattr(block, "no_grad_params", ()))
    for pname, p in block.named_parameters():
        if p.requires_grad and pname not in skip:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient reaches {pname}"
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", PLUGINS)
def test_bf16_autocast_finite_and_close(name):
    block = randomise(build(name), std=0.1).eval()
    x = torch.randn(2, C, 12, 10)
    ref = block(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    assert torch.isfinite(out).all()
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 5e-2, f"{name}: bf16 relative error {err:.3g}"


@pytest.mark.parametrize("name", PLUGINS)
def test_channels_last(name):
    block = randomise(build(name)).eval()
    x = torch.randn(2, C, 9, 11)
    torch.testing.assert_close(block(x.to(memory_format=torch.channels_last)), block(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", PLUGINS)
def test_torch_compile(name):
    torch._dynamo.reset()
    block = randomise(build(name)).eval()
    x = torch.randn(2, C, 9, 11)
    compiled = torch.compile(block)
    torch.testing.assert_close(compiled(x), block(x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", PLUGINS)
def test_bad_input_raises_clear_value_error(name):
    block = build(name)
    cls = type(block).__name__
    with pytest.raises(ValueError, match=f"{cls}.*C=16"):
        block(torch.randn(2, 16, 8, 8))
    with pytest.raises(ValueError, match=f"{cls}.*4-D"):
        block(torch.randn(C, 8, 8))
    with pytest.raises(ValueError, match=f"{cls}.*empty"):
        block(torch.randn(0, C, 8, 8))
    with pytest.raises(ValueError, match=f"{cls}.*empty"):
        block(torch.randn(1, C, 0, 8))


@pytest.mark.parametrize("name", PLUGINS)
def test_accepts_what_timm_passes(name):
    meta = build(name, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    double = build(name, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in double.parameters() if p.is_floating_point())
    build(name, act_layer="silu")
    build(name, act_layer=nn.GELU)
    lit_attn.create_attn(name, 8, rd_ratio=1.0)  # efficientnet's probe
    build(name, rd_ratio=0.25)


@pytest.mark.parametrize("name", lit_attn.list_attn(kind=(GATE, GLOBAL)))
def test_builds_in_timm_resnet18_slot(name):
    model = timm.create_model("resnet18", block_args={"attn_layer": name}, num_classes=5)
    cls = lit_attn.get_attn_entry(name).cls
    cls = getattr(cls, "func", cls)
    assert sum(isinstance(m, cls) for m in model.modules()) == 8
    size = 224 if name == "bat" else 64  # timm's BAT asserts maps divisible by its block size 7
    x = torch.randn(2, 3, size, size)
    out = model(x)
    out.square().mean().backward()
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


CONVS = lit_attn.list_attn(kind="conv", source="lit_attn")


@pytest.mark.parametrize("name", CONVS)
def test_conv_blocks_contract(name):
    """Conv-replacement blocks: (in, out) channels, gradients everywhere, compile, clear errors."""
    sized = "feat_size" in inspect.signature(lit_attn.get_attn_entry(name).cls).parameters  # aa_conv's tables
    block = randomise(lit_attn.create_attn(name, C, out_channels=48, **({"feat_size": 8} if sized else {}))).train()
    x = torch.randn(2, C, 7, 9, requires_grad=True)
    out = block(x)
    assert out.shape == (2, 48, 7, 9)
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient reaches {pname}"
    torch._dynamo.reset()
    block.eval()
    torch.testing.assert_close(torch.compile(block)(x.detach()), block(x.detach()), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match=f"{type(block).__name__}.*C=16"):
        block(torch.randn(1, 16, 8, 8))
    with pytest.raises(ValueError, match="4-D"):
        block(torch.randn(C, 8, 8))


@pytest.mark.parametrize("name", PLUGINS)
def test_sync_batchnorm_conversion_keeps_the_block(name):
    """torch's convert_sync_batchnorm (Lightning's sync_batchnorm=True) must not change the maths: a
    fused norm+act module (timm's BatchNormAct2d) would lose its activation in the conversion."""
    block = randomise(build(name), std=0.1).eval()
    x = torch.randn(2, C, 7, 9)
    with torch.no_grad():
        expected = block(x)
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(block).eval()
        torch.testing.assert_close(converted(x), expected)
