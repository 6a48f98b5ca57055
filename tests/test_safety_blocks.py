"""Safety of the blocks outside plain fp32 eager use: bad names in timm's attention slots, fp16,
caches built under inference_mode, torch.jit.trace and the TorchScript-based ONNX export."""
import copy
import difflib
import io
from functools import partial

import pytest
import timm
import torch
from timm.layers.squeeze_excite import SEModule
from torch import nn

import lit_attn
from lit_attn.integrations import timm as integ
from lit_attn.layers import psanet
from lit_attn.layers.aa_conv import AugmentedConv2d
from lit_attn.layers.glore import GloReUnit
from lit_attn.registry import GATE, GLOBAL

PLUGINS = lit_attn.list_attn(kind=(GATE, GLOBAL))
C = 32


def randomise(block: nn.Module, std: float, seed: int = 1) -> nn.Module:
    """Non-zero random parameters (zero-init gammas / norms would hide the attention branch)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return block


# --- unknown / non-plug-in names in timm's attention slots ------------------------------------------

TIMM_SLOT_NAMES = [n for n in lit_attn.list_attn()
                   if lit_attn.get_attn_entry(n).plugin or lit_attn.get_attn_entry(n).source == "timm"]


@pytest.mark.parametrize("bad", ["psa_pp", "cbma", "NONLOCAL_DOTS"])
def test_unknown_name_in_timm_slot_lists_close_matches(bad):
    close = difflib.get_close_matches(bad.lower(), TIMM_SLOT_NAMES, n=2)
    assert close
    with pytest.raises(ValueError) as info:
        timm.create_model("resnet18", block_args={"attn_layer": bad})
    msg = str(info.value)
    assert f"{bad!r} is not a known attention block" in msg and "lit_attn.list_attn()" in msg
    assert "did you mean " + ", ".join(map(repr, close)) in msg
    assert isinstance(info.value, AssertionError)  # what timm raised: callers catching it still do
    with pytest.raises(ValueError, match="did you mean 'psa_p', 'psa_s'"):  # other families, same message
        timm.create_model("efficientnet_b0", se_layer="psa_pp")


@pytest.mark.parametrize("name", ["carafe", "ocr", "afnb", "aa_conv", "local_relation"])
def test_timm_slot_refuses_non_plugin_kinds(name):
    kind = lit_attn.get_attn_entry(name).kind
    match = rf"'{name}' is a block of kind '{kind}'.*attention slots take plug-in blocks \(kind gate or global"
    with pytest.raises(ValueError, match=match):
        timm.create_model("resnet18", block_args={"attn_layer": name})
    with pytest.raises(ValueError, match=match):  # efficientnet's builder probes se_layer(8, rd_ratio=1.0)
        timm.create_model("efficientnet_b0", se_layer=name)


@pytest.mark.parametrize(("override", "expected"), [
    ("{attn_layer: psa_pp}", "did you mean 'psa_p', 'psa_s'?"),
    ("{attn_layer: carafe}", "'carafe' is a block of kind 'upsample'"),
    ("{attn_layer: ocr}", "'ocr' is a block of kind 'head'"),
])
def test_cli_names_a_bad_block_before_building_anything(override, expected, capsys):
    """From the CLI: one line naming the config key and the close matches, not an instantiation trace."""
    from pathlib import Path

    from lit_attn.cli import cli_main

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", "--config", str(recipe), "--model.init_args.model.dict_kwargs.block_args", override])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: fit.model.init_args.model.dict_kwargs.block_args.attn_layer: " in err and expected in err
    assert "adapt_class_type" not in err and "AssertionError" not in err  # no instantiation trace


def test_cli_checks_head_and_decoder_block_names():
    from lit_attn.cli import block_name_errors

    cfg = {"model": {"init_args": {"model": {"init_args": {"attention": "danet_pm", "decoder_attention_type": "scse"}},
                                   "other": [{"se_layer": "se"}, {"attn_layer": "eca"}]}}}
    assert block_name_errors(cfg) == [
        "model.init_args.model.init_args.attention: unknown attention block 'danet_pm'; did you mean 'danet_pam', "
        "'danet_cam', 'danet'? (all names: lit_attn.list_attn())"]


def test_conv_block_still_fits_byobnet_self_attn_slot():
    model = timm.create_model("botnet26t_256", self_attn_layer="aa_conv", num_classes=3)
    assert sum(isinstance(m, AugmentedConv2d) for m in model.modules()) == 3


def _same(a, b) -> bool:
    if isinstance(a, partial) and isinstance(b, partial):
        return a.func is b.func and a.args == b.args and a.keywords == b.keywords
    return a is b


def test_timm_names_and_values_resolve_as_timm():
    module = nn.Identity()
    values = ["se", "ECA", "ecam", "cbam", "gc", "gca", "coord", "nl", "bat", "sk", "splat", "lambda", "halo",
              "bottleneck", "", None, False, True, SEModule, partial(SEModule, rd_ratio=0.5), module]
    for v in values:
        assert _same(integ.get_attn(v), integ.timm_get_attn(v)), v


def test_create_attn_unknown_name_lists_close_matches_only():
    with pytest.raises(KeyError) as info:
        lit_attn.create_attn("psa_pp", 8)
    msg = str(info.value)
    assert "unknown attention block 'psa_pp'" in msg and "'psa_p', 'psa_s'" in msg and "lit_attn.list_attn()" in msg
    assert not any(far in msg for far in ("criss_cross", "nonlocal_concat", "residual_attention"))


# --- fp16 ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PLUGINS)
def test_half_finite_and_close_to_fp32(name):
    """Every plug-in under .half() (CPU) against the fp32 model, eval and train mode (dropout off)."""
    size = 14 if name == "bat" else 12  # timm's BAT needs multiples of its block size 7
    for train in (False, True):
        for scale in (4.0, 16.0):
            torch.manual_seed(0)
            block = randomise(lit_attn.create_attn(name, C), std=0.1).train(train)
            for m in block.modules():
                if isinstance(m, nn.modules.dropout._DropoutNd):
                    m.p = 0.0
            half = copy.deepcopy(block).half()
            x = torch.randn(2, C, size, size) * scale
            ref = block(x)
            out = half(x.half())
            where = f"{name}, train={train}, x * {scale:g}"
            assert out.dtype == torch.float16 and torch.isfinite(ref).all() and ref.abs().max() < 3e4, where
            assert torch.isfinite(out).all(), f"{where}: inf/NaN in fp16"
            err = ((out.float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, f"{where}: fp16 relative error {err:.3g}"


def _half_vs_double(half: nn.Module, x: torch.Tensor) -> float:
    """Relative error of the half-precision module against float64 with the same (fp16-rounded) weights and
    input: the error of the computation alone (Y, cubic in x, amplifies the rounding of weights and input)."""
    ref = copy.deepcopy(half).double()(x.half().double())
    out = half(x.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    return ((out.double() - ref).norm() / ref.norm()).item()


def test_glore_half_products_and_bn_in_fp32():
    """GloRe's products grow as |x|^3 before the BN: in fp16 they overflowed (inf / NaN) at x * 16."""
    x = torch.randn(2, C, 12, 12) * 16
    m = randomise(GloReUnit(C), std=0.2).train()
    assert _half_vs_double(copy.deepcopy(m).half(), x) < 2e-3                # train mode: batch statistics
    # eval with statistics of the data (momentum 1: the batch's); for .half() inference the BN stays fp32,
    # as var(Y) does not fit in fp16
    m.blocker.momentum = 1.0
    with torch.no_grad():
        m(x)
    half = copy.deepcopy(m).eval().half()
    half.blocker.float()
    assert _half_vs_double(half, x) < 2e-3


def test_glore_half_bn_statistics_updated():
    """A half-precision blocker runs in fp32 and its running statistics are written back."""
    x = torch.randn(2, C, 12, 12) * 4
    m = randomise(GloReUnit(C, normalize=True), std=0.1).train()
    half = copy.deepcopy(m).half()
    m(x)
    half(x.half())
    assert half.blocker.num_batches_tracked.item() == 1
    for name in ("running_mean", "running_var"):
        ref = getattr(m.blocker, name)
        torch.testing.assert_close(getattr(half.blocker, name).float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max())


# --- caches built under inference_mode -----------------------------------------------------------------

def test_psanet_index_cache_survives_inference_mode():
    psanet._cached_index.cache_clear()
    torch.manual_seed(0)
    block = lit_attn.create_attn("psanet", C)
    fresh = copy.deepcopy(block)
    x, dy = torch.randn(2, C, 12, 12), torch.randn(2, C, 12, 12)
    with torch.inference_mode():
        block.eval()(x)
    (block.train()(x) * dy).sum().backward()  # at the size cached under inference_mode
    index = psanet._cached_index(6, 6, 97, 97, x.device)                   # the 12x12 map shrunk by 2
    assert not any(t.is_inference() for t in index if t is not None)
    psanet._cached_index.cache_clear()
    (fresh.train()(x) * dy).sum().backward()
    for (name, p), q in zip(block.named_parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


# --- torch.jit.trace and ONNX export -------------------------------------------------------------------

TRACED = {"criss_cross": {}, "danet_pam": {}, "nonlocal_gaussian": {}, "carafe": {}, "local_relation": {},
          "aa_conv": {"feat_size": (9, 11), "num_heads": 4, "min_dkh": 4}}


def _traced_block(name):
    torch.manual_seed(0)
    block = randomise(lit_attn.create_attn(name, C, **TRACED[name]), std=0.1).eval()
    return block, torch.randn(1, C, 9, 11), torch.randn(1, C, 9, 11)


@pytest.mark.parametrize("name", list(TRACED))
def test_jit_trace_saves_and_runs_on_a_new_input(name):
    """criss_cross (R = 2 steps) and the chunked attention were traced as Python calls: not savable."""
    block, x1, x2 = _traced_block(name)
    with torch.no_grad():
        traced = torch.jit.trace(block, x1)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    with torch.no_grad():
        ref = block(x2)
        torch.testing.assert_close(loaded(x2), ref, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(ref, block(x1), atol=1e-3)


def _onnx_outputs(model, x_export, x_run):
    ort = pytest.importorskip("onnxruntime")
    f = io.BytesIO()
    torch.onnx.export(model, (x_export,), f, dynamo=False, input_names=["x"], output_names=["y"])
    session = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x_run.numpy()})[0])


@pytest.mark.parametrize("name", list(TRACED))
def test_onnx_export_matches_pytorch_on_a_new_input(name):
    block, x1, x2 = _traced_block(name)
    with torch.no_grad():
        torch.testing.assert_close(_onnx_outputs(block, x1, x2), block(x2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride, dilation, scale", [(1, 1, 1), (2, 2, 1), (3, 1, 1), (1, 1, 2), (1, 2, 3)])
def test_local_ops_export_form_matches_loop_kernels(monkeypatch, stride, dilation, scale):
    """The F.unfold form taken under ONNX export against the custom-op loop kernels (tests/test_local_ops.py)."""
    from lit_attn.ops.local import local_aggregate, local_correlation, local_out_size
    k, g, (h, w) = 5, 2, (7, 9)
    ho, wo = (h * scale, w * scale) if scale > 1 else (local_out_size(h, stride), local_out_size(w, stride))
    x, q, wts = torch.randn(2, 8, h, w), torch.randn(2, 8, ho, wo), torch.randn(2, g, k * k, ho, wo)
    ref_a = local_aggregate(x, wts, k, dilation, scale, stride)
    ref_c = local_correlation(q, x, g, k, dilation, scale, stride)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    torch.testing.assert_close(local_aggregate(x, wts, k, dilation, scale, stride), ref_a)
    torch.testing.assert_close(local_correlation(q, x, g, k, dilation, scale, stride), ref_c)


def test_onnx_export_smp_ccnet():
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    model = smp.create_model("ccnet", encoder_name="resnet18", encoder_weights=None, classes=3).eval()
    x1, x2 = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(_onnx_outputs(model, x1, x2), model(x2), rtol=1e-4, atol=1e-4)
