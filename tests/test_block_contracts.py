"""Contracts the blocks owe their host models (issue 12: found by timm 1.0.31's tests/test_models.py and smp's
model tests run on lit_attn's models): the meta device, timm's weight-init hooks, timm's `rd_ratio` widths, the
block's own init surviving the host's, every parameter getting a gradient, ONNX / torch.export graphs that are
right at every input size (or refused), and timm's forward_intermediates API.

The slow parts (every block through both ONNX exporters and torch.export) run with --runslow or
LIT_ATTN_RUN_SLOW=1; a representative subset runs by default.
"""
import copy
import io

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import slow_unless
from torch import nn

import lit_attn
from lit_attn.layers.conv_module import ConvModule
from lit_attn.models.lit_resnet import IDENTITY_AT_INIT
from lit_attn.models.pretrained import block_is_identity_at_init
from lit_attn.registry import GATE, GLOBAL, NOT_SCRIPTABLE

PLUGINS = lit_attn.list_attn(kind=(GATE, GLOBAL), source="lit_attn")
IDENTITY = sorted(IDENTITY_AT_INIT)
C = 32


def block_class(name):
    cls = lit_attn.get_attn_entry(name).cls
    return getattr(cls, "func", cls)


def outermost_blocks(model: nn.Module, name: str) -> list[nn.Module]:
    cls = block_class(name)
    blocks = [m for m in model.modules() if isinstance(m, cls)]
    inner = {id(c) for b in blocks for c in b.modules() if c is not b}
    return [b for b in blocks if id(b) not in inner]


def randomise(module: nn.Module, std: float = 0.2, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


# --- 1. the meta device ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PLUGINS)
def test_block_builds_and_runs_on_meta(name):
    """timm's default-cfg test builds models on the meta device and runs a forward there: torch.autocast and
    torch.is_autocast_enabled raise for the "meta" device type (11 blocks failed: cgnl, cgnl_gaussian,
    criss_cross, danet, danet_cam, dgmn, ema, glore, latentgnn, nonlocal_concat, nonlocal_dot)."""
    block = lit_attn.create_attn(name, C, device="meta").eval()
    assert all(t.device.type == "meta" for t in (*block.parameters(), *block.buffers()))
    x = torch.randn(2, C, 9, 11, device="meta")
    y = block(x)
    assert y.shape == x.shape and y.device.type == "meta"


@pytest.mark.parametrize("name", PLUGINS)
def test_resnet18_variant_on_meta_as_timm_builds_it(name):
    with torch.device("meta"):
        model = timm.create_model(f"resnet18_{name}", pretrained=False, device="meta", dtype=torch.float32).eval()
        y = model.forward_features(torch.randn(1, 3, 64, 64, device="meta"))
    assert y.shape == (1, 512, 2, 2) and y.device.type == "meta"


def test_autocast_helpers_skip_devices_without_autocast():
    from lit_attn.ops.amp import autocast_dtype, no_autocast

    with no_autocast(torch.device("meta")):   # torch.autocast("meta", enabled=False) raises
        pass
    assert autocast_dtype(torch.device("meta")) is None and autocast_dtype("cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype(torch.device("cpu")) == torch.bfloat16
        assert autocast_dtype(torch.device("meta")) is None
        with no_autocast(torch.device("cpu")):
            assert autocast_dtype("cpu") is None
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


# --- 2. timm's init hooks --------------------------------------------------------------------------------------

def test_conv_module_init_weights_takes_timms_keyword():
    m = ConvModule(8, 16, 3)
    m.init_weights(zero_init_last=True)       # byobnet / regnet pass it to every module with an init_weights
    m.init_weights(zero_init_last=False)
    m.init_weights()                           # efficientnet calls it without arguments
    assert torch.count_nonzero(m.conv.weight) > 0 and torch.equal(m.bn.weight, torch.ones(16))


@pytest.mark.parametrize("name", ["acm", "apnb", "psanet"])
def test_blocks_with_conv_modules_build_in_byobnet(name):
    """byobnet's init (gernet, regnetz, ...) calls `module.init_weights(zero_init_last=...)` on every module that
    has one: ConvModule.init_weights() refused the keyword (TypeError)."""
    model = timm.create_model("gernet_s", attn_layer=name, num_classes=3).eval()
    assert len(outermost_blocks(model, name)) > 0
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 64, 64))).all()


@pytest.mark.parametrize("name", PLUGINS)
def test_init_hooks_restore_the_blocks_own_init(name):
    """init_weights(zero_init_last=...) and zero_init_last() re-apply the block's own init: after the host
    overwrote every parameter, an identity-at-init block is the identity again."""
    block = lit_attn.create_attn(name, C)
    assert callable(block.init_weights) and callable(block.zero_init_last)
    for call in (lambda b: b.init_weights(zero_init_last=True), lambda b: b.init_weights(zero_init_last=False),
                 lambda b: b.init_weights(), lambda b: b.zero_init_last()):
        randomise(block)
        call(block)
        block.eval()
        x = torch.randn(2, C, 7, 9)
        with torch.no_grad():
            y = block(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        if name in IDENTITY_AT_INIT:
            assert torch.equal(y, x), f"{name}: not the identity after its init hook"


# --- 3. cgnl at timm's rd_ratio widths -------------------------------------------------------------------------

def test_cgnl_rounds_inner_width_to_groups_as_make_divisible():
    from lit_attn.layers.cgnl import CGNL

    assert CGNL(64).planes == 32 and CGNL(2048).planes == 1024          # official widths kept (C/2 divides)
    assert CGNL(96, rd_ratio=0.25 / 6).planes == 8                      # efficientnet_b0's SE width (4) -> 8
    assert CGNL(72).planes == 40                                         # 36 -> 40 (make_divisible(36, 8))
    assert CGNL(8, rd_ratio=1.0).planes == 8                             # efficientnet's probe
    assert CGNL(64, groups=4, rd_ratio=0.3).planes == 20                 # 19.2 -> 20: multiple of 4
    with pytest.raises(ValueError, match="CGNL.*groups"):
        CGNL(30)                                                         # GroupNorm(8, 30) is impossible


def naive_cgnl_dot(block, x):
    """The dot kernel from its definition: within each group, y_j = sum_i t_j p_i g_i over all (c, h, w)."""
    t, p, g = block.t(x), block.p(x), block.g(x)
    b, c, h, w = t.shape
    tg, pg, gg = (a.reshape(b, block.groups, -1) for a in (t, p, g))
    y = torch.einsum("bgj,bgi,bgi->bgj", tg, pg, gg).reshape(b, c, h, w)
    y = F.group_norm(F.conv2d(y, block.z.weight, groups=block.groups), block.groups, block.gn.weight, block.gn.bias,
                     block.gn.eps)
    return x + y


@pytest.mark.parametrize(("channels", "rd_ratio"), [(96, 0.25 / 6), (72, 0.5), (40, 0.25)])
def test_cgnl_rounded_width_values(channels, rd_ratio):
    from lit_attn.layers.cgnl import CGNL

    block = randomise(CGNL(channels, rd_ratio=rd_ratio).double(), std=0.1).eval()
    assert block.planes % block.groups == 0
    x = torch.randn(2, channels, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(block(x), naive_cgnl_dot(block, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("model_name", "slot"), [("efficientnet_b0", "se_layer"), ("regnetz_b16", "attn_layer")])
def test_cgnl_in_timm_rd_ratio_slots(model_name, slot):
    model = timm.create_model(model_name, **{slot: "cgnl"}, num_classes=3).eval()
    blocks = outermost_blocks(model, "cgnl")
    assert blocks and all(b.planes % b.groups == 0 for b in blocks)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 64, 64))).all()


# --- 4. the block's own init survives the host's ---------------------------------------------------------------

def _identity_in(model: nn.Module, name: str, size: int = 64) -> tuple[int, list[bool]]:
    blocks = outermost_blocks(model, name)
    same = []
    hooks = [b.register_forward_hook(lambda m, i, o: same.append(torch.equal(i[0], o))) for b in blocks]
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for h in hooks:
        h.remove()
    return len(blocks), same


HOSTS = {
    # timm ResNet: kaiming on every Conv2d, then zero_init_last() on modules that have it
    "resnet18_slot": lambda n: timm.create_model("resnet18", block_args={"attn_layer": n}, num_classes=3),
    "resnet18_variant": lambda n: timm.create_model(f"resnet18_{n}", num_classes=3),
    "resnet18_variant_no_zero_init_last": lambda n: timm.create_model(f"resnet18_{n}", num_classes=3,
                                                                     zero_init_last=False),
    # byobnet: conv re-init and BatchNorm2d weight 1, then init_weights(zero_init_last=...), children first
    "gernet_s": lambda n: timm.create_model("gernet_s", attn_layer=n, num_classes=3),
    # efficientnet: _init_weight_goog (BatchNorm2d weight 1), then init_weights(), children first
    "efficientnet_b0": lambda n: timm.create_model("efficientnet_b0", se_layer=n, num_classes=3),
}


def test_identity_blocks_are_declared_consistently():
    assert {"a2", "nonlocal", "glore", "dnl_mmseg", "cgnl", "danet"} <= IDENTITY_AT_INIT
    for name in IDENTITY:
        assert block_is_identity_at_init(name)


@pytest.mark.parametrize("host", list(HOSTS))
@pytest.mark.parametrize("name", IDENTITY)
def test_identity_at_init_survives_the_host_init(name, host):
    """Hook every block and compare its output with its input at init. Before: a2 (zero conv_out) lost its
    zero init to ResNet's kaiming, every zero-BN block (nonlocal*, glore, dnl_mmseg) to byobnet's and
    efficientnet's BatchNorm2d init."""
    torch.manual_seed(0)
    n, same = _identity_in(HOSTS[host](name), name)
    assert n > 0 and len(same) == n
    assert all(same), f"{name} in {host}: {same.count(False)} of {n} blocks are not the identity at init"


def test_blocks_keep_their_official_init_in_timm_resnet():
    """Not only the zero init: the non-identity blocks keep their official init too (e.g. EMA's convs
    N(0, sqrt(2/C)) and bases, PSA's kaiming fan_in), where ResNet's kaiming fan_out would replace it."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", block_args={"attn_layer": "psa_p"}, num_classes=3)
    psa = outermost_blocks(model, "psa_p")[0]
    fan_in = psa.conv_q_right.weight[0].numel()
    std = psa.conv_v_right.weight.std().item()
    assert abs(std - (2 / fan_in) ** 0.5) < 0.2 * (2 / fan_in) ** 0.5  # kaiming fan_in; fan_out would be 2x


# --- 5. every parameter gets a gradient (EMA's frozen mid conv) ------------------------------------------------

def test_ema_frozen_conv_is_buffers_with_the_same_keys():
    from lit_attn.layers.ema import EMAUnit

    torch.manual_seed(0)
    m = EMAUnit(16, num_bases=8).train()
    names = {n for n, _ in m.named_parameters()}
    assert not any(n.startswith("conv1.") for n in names)
    assert {"conv1.weight", "conv1.bias"} <= set(m.state_dict())
    assert m.conv1.weight.shape == (16, 16, 1, 1) and not m.conv1.weight.requires_grad
    # a state dict written with conv1 as an nn.Conv2d parameter (official / mmseg-converted layout) loads strictly
    old = {k: v.clone() for k, v in m.state_dict().items()}
    old["conv1.weight"] = torch.randn(16, 16, 1, 1)
    old["conv1.bias"] = torch.randn(16)
    m.load_state_dict(old, strict=True)
    assert torch.equal(m.conv1.weight, old["conv1.weight"]) and torch.equal(m.conv1.bias, old["conv1.bias"])
    # em_grad=True trains conv1: then a parameter, same keys, same forward
    g = EMAUnit(16, num_bases=8, em_grad=True)
    g.load_state_dict(m.state_dict(), strict=True)
    assert "conv1.weight" in {n for n, _ in g.named_parameters()}
    x = torch.randn(2, 16, 5, 6)
    torch.testing.assert_close(g.eval()(x), m.eval()(x), rtol=0, atol=0)
    # buffers follow the module's dtype
    assert m.double().conv1.weight.dtype == torch.float64


def test_ema_conv1_maths_unchanged():
    """conv1 is still the official 1x1 conv with bias: the EM input equals F.conv2d with its weights."""
    from lit_attn.layers.ema import EMAUnit

    m = EMAUnit(8, num_bases=4)
    x = torch.randn(2, 8, 3, 4)
    torch.testing.assert_close(m.conv1(x), F.conv2d(x, m.conv1.weight, m.conv1.bias))


@pytest.mark.parametrize("name", ["ema", "dnl", "psanet"])
def test_every_parameter_gets_a_gradient_in_timm_backward(name):
    """timm's test_model_backward: every parameter must have a .grad after outputs.mean().backward()."""
    torch.manual_seed(0)
    model = timm.create_model(f"resnet18_{name}", num_classes=42).train()
    model(torch.randn(2, 3, 64, 64)).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"


# --- 6. ONNX export and torch.export ---------------------------------------------------------------------------

SIZES = ((64, 64), (96, 80))
ONNX_DEFAULT = ["nonlocal", "danet", "criss_cross", "psa_p", "isa", "acm", "apnb", "nonlocal_concat", "ema"]


def _variant(name: str) -> nn.Module:
    """resnet18_<name> in eval mode with its zero-init gammas / norms made non-zero, so every block computes."""
    return _model(f"resnet18_{name}")


def _model(model_name: str) -> nn.Module:
    """A timm model in eval mode with its zero-init gammas / norms made non-zero, so every block computes."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim <= 1 and torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _onnx_bytes(model: nn.Module, x: torch.Tensor, dynamo: bool) -> bytes:
    if dynamo:
        dim = torch.export.Dim
        prog = torch.onnx.export(model, (x,), dynamo=True, input_names=["x"], output_names=["y"], verbose=False,
                                 dynamic_shapes={"x": {2: dim("h", min=64, max=512), 3: dim("w", min=64, max=512)}})
        return prog.model_proto.SerializeToString()
    f = io.BytesIO()
    torch.onnx.export(model, (x,), f, dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {2: "h", 3: "w"}})
    return f.getvalue()


# blocks whose dynamo export with dynamic H, W is refused by torch.export (a clear error, no graph): ISA's
# group reshapes specialise the number of 8x8 blocks per side (1 at 64x64) in PyTorch's view/contiguity checks
DYNAMO_REFUSED = {"isa"}
# blocks that torch.onnx's dynamo exporter specialises to the export size (it refines the dynamic dims from
# torch.export's suggested fixes): the ONNX graph has a static input and ONNX Runtime refuses other sizes.
# residual_attention: its mask pyramid pools the 2x2 res5 maps of a 64x64 input to 1x1 (torch.export
# specialises sizes of 1)
DYNAMO_STATIC = {"residual_attention"}


def check_onnx(name: str, dynamo: bool) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = _variant(name)
    xs = [torch.randn(1, 3, *s) for s in SIZES]
    try:
        with torch.no_grad():
            blob = _onnx_bytes(model, xs[0], dynamo)
    except Exception as e:  # an exporter error is allowed, only for the blocks known to be refused
        if dynamo and name in DYNAMO_REFUSED:
            return
        raise AssertionError(f"{name}: export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    assert not (dynamo and name in DYNAMO_REFUSED), f"{name}: exports now, update DYNAMO_REFUSED"
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    static = all(isinstance(d, int) for d in session.get_inputs()[0].shape)
    assert not static or (dynamo and name in DYNAMO_STATIC), f"{name}: the exported graph has a static input"
    for x in xs:
        with torch.no_grad():
            ref = model(x)
        if static and tuple(x.shape) != tuple(session.get_inputs()[0].shape):
            with pytest.raises(Exception, match="invalid dimensions"):   # a static graph refuses other sizes
                session.run(None, {session.get_inputs()[0].name: x.numpy()})
            continue
        out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        where = f"{name} ({'dynamo' if dynamo else 'torchscript'}) at {tuple(x.shape)}"
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * max(1.0, ref.abs().max().item()),
                                   msg=lambda m, where=where: f"{where}: {m}")


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", slow_unless(PLUGINS, ONNX_DEFAULT))
def test_onnx_export_matches_at_two_sizes(name, dynamo):
    """Before: acm / apnb refused by the TorchScript exporter (adaptive pooling to sizes that do not divide the
    input) and failing at the second size in ONNX Runtime with the dynamo one; isa failing at the second size
    (a padding branch frozen at the export size); nonlocal_concat refused by both (searchsorted)."""
    check_onnx(name, dynamo)


def check_torch_export(name: str) -> None:
    """torch.export with dynamic H and W (Dim.AUTO: the exporter derives the range the model supports, e.g. maps
    of at least 2 pixels); at each size the exported program either matches eager or refuses the input (a size
    outside the derived range raises), never a wrong result."""
    model = _variant(name)
    xs = [torch.randn(1, 3, *s) for s in SIZES]
    auto = torch.export.Dim.AUTO
    ep = torch.export.export(model, (xs[0],), dynamic_shapes={"x": {2: auto, 3: auto}})
    exported = ep.module()
    with torch.no_grad():
        for i, x in enumerate(xs):
            try:
                out = exported(x)
            except (RuntimeError, AssertionError, ValueError) as e:   # outside the derived range: refused
                assert i > 0, f"{name}: the exported program refuses its own export size: {e}"
                assert "shape" in str(e) or "<=" in str(e) or ">=" in str(e), str(e)
                continue
            torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)


TORCH_EXPORT_DEFAULT = ["psanet", "isa", "residual_attention"]  # parity rule, padding, a refused size


@pytest.mark.parametrize("name", slow_unless(PLUGINS, TORCH_EXPORT_DEFAULT))
def test_torch_export_with_dynamic_sizes(name):
    check_torch_export(name)


def test_export_paths_match_eager_ops(monkeypatch):
    """The ops behind the export paths against the eager ones they replace (float64: exact up to rounding)."""
    from lit_attn.layers import non_local
    from lit_attn.layers.psanet import export_shrunk_size, shrunk_size
    from lit_attn.ops import pooling

    monkeypatch.setattr(pooling, "exporting", lambda: True)
    g = torch.Generator().manual_seed(0)
    for h, w in [(1, 1), (2, 3), (7, 9), (13, 5), (64, 50)]:
        x = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
        for s in [(3, 3), (6, 6), (8, 8), (2, 5)]:
            torch.testing.assert_close(pooling.adaptive_avg_pool2d(x, s), F.adaptive_avg_pool2d(x, s),
                                       rtol=1e-12, atol=1e-12)
        for size in [(1, 1), (3, 4), (16, 10), (h, w)]:
            for align in (False, True):
                torch.testing.assert_close(pooling.resize_bilinear(x, size, align),
                                           F.interpolate(x, size=size, mode="bilinear", align_corners=align),
                                           rtol=1e-12, atol=1e-12)
        for s in (1, 2, 3):
            hs, ws, c = export_shrunk_size(h, w, s)
            assert (hs, ws, bool(c)) == shrunk_size(h, w, s)
    for m in (1, 2, 7, 64, 1000):
        b = (torch.randn(3, m, generator=g) * 3).round().sort(dim=1, descending=True).values   # ties included
        t = torch.cat([torch.randn(3, 40, generator=g) * 3, b[:, : min(m, 5)], b[:, -2:]], 1)
        ref = torch.searchsorted(b.neg().contiguous(), t.neg().contiguous(), side="left")
        assert torch.equal(non_local._count_greater(b, t), ref)


def test_jit_trace_of_isa_follows_the_input_size():
    """A traced ISA was fixed to the trace size (its padding was a branch on the size)."""
    block = randomise(lit_attn.create_attn("isa", C), std=0.1).eval()
    with torch.no_grad():
        traced = torch.jit.trace(block, torch.randn(1, C, 16, 16), check_trace=False)
        for shape in [(1, C, 9, 11), (1, C, 16, 24), (1, C, 5, 8)]:
            x = torch.randn(shape)
            torch.testing.assert_close(traced(x), block(x), rtol=1e-4, atol=1e-5)


# --- 7. forward_intermediates ----------------------------------------------------------------------------------

@pytest.mark.parametrize("model_name", ["resattnet56", "resnet18_nonlocal", "resnet18_psa_p"])
def test_forward_intermediates_follows_timm(model_name):
    """As timm's test_model_forward_intermediates / test_prune_intermediate_layers_contract check it."""
    torch.manual_seed(0)
    model = timm.create_model(model_name).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        out, inter = model.forward_intermediates(x)
        assert [t.shape[1] for t in inter] == info.channels()
        for t, r in zip(inter, info.reduction(), strict=True):
            assert t.shape[-2:] == (-(-96 // r), -(-80 // r))
        torch.testing.assert_close(out, model.forward_features(x), rtol=0, atol=0)
        last = len(inter) - 1
        # indices: an int takes the last n, a list those indices; intermediates_only
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(only) == 2 and all(torch.equal(a, b) for a, b in zip(only, inter[-2:], strict=True))
        for i in range(last + 1):
            sel = model.forward_intermediates(x, indices=[i], stop_early=True, intermediates_only=True)
            torch.testing.assert_close(sel[0], inter[i], rtol=0, atol=0)
        # norm: the final norm on the last intermediate only (resattnet: the final BN-ReLU)
        _, normed = model.forward_intermediates(x, indices=[last], norm=True)
        if model_name == "resattnet56":
            torch.testing.assert_close(normed[0], out, rtol=0, atol=0)
        with pytest.raises((ValueError, AssertionError)):
            model.forward_intermediates(x, output_fmt="NHWC")
    # prune: taps unchanged, features end at the tap, every parameter still used
    for i in range(last + 1):
        pruned = copy.deepcopy(model)
        take = pruned.prune_intermediate_layers([i], prune_norm=True)
        with torch.no_grad():
            torch.testing.assert_close(pruned.forward_intermediates(x, indices=take, intermediates_only=True)[0],
                                       inter[i], rtol=0, atol=0)
            if i < last:
                torch.testing.assert_close(pruned.forward_features(x), inter[i], rtol=0, atol=0)
        pruned.train()
        sum(t.sum() for t in pruned.forward_intermediates(x, indices=take, intermediates_only=True)).backward()
        assert not [n for n, p in pruned.named_parameters() if p.grad is None]


def test_resattnet_features_only_getter():
    model = timm.create_model("resattnet56", features_only=True, feature_cls="getter").eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [64, 256, 512, 1024, 2048]
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]


# --- 8. FX (timm's feature extraction) and TorchScript ---------------------------------------------------------

def _fx_model(model: nn.Module):
    """As timm's tests/test_models.py `_create_fx_model` builds it: the model's last eval node, with timm's
    registered leaf modules and functions."""
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)


FX_DEFAULT = ["nonlocal", "criss_cross", "ema", "psanet", "isa", "residual_attention"]


def check_fx(name: str) -> None:
    model = _variant(name)
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        ref = model(x)
        fx = _fx_model(model)
        out = next(iter(fx(x).values()))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    fx.train()
    next(iter(fx(torch.randn(2, 3, 64, 64)).values())).mean().backward()   # test_model_backward_fx


def test_blocks_are_timm_fx_leaves():
    from timm.layers import get_notrace_modules

    leaves = set(get_notrace_modules())
    assert all(block_class(n) in leaves for n in PLUGINS)


@pytest.mark.parametrize("name", slow_unless(PLUGINS, FX_DEFAULT))
def test_fx_feature_extraction(name):
    """timm's test_model_forward_fx: before, every variant failed (check_input's shape reads on Proxies and the
    blocks' size arithmetic); the blocks are now registered as timm leaf modules (`register_attn`)."""
    check_fx(name)


def test_fx_features_only():
    """timm's `features_only=True, feature_cls="fx"` on a variant with context blocks inside the stages."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18_nonlocal", features_only=True, feature_cls="fx").eval()
    torch.manual_seed(0)
    ref = timm.create_model("resnet18_nonlocal", features_only=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), ref(x), strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", PLUGINS)
def test_torchscript_blocks(name):
    block = randomise(lit_attn.create_attn(name, C), std=0.1).eval()
    if name in NOT_SCRIPTABLE:   # the README's list stays true: a block that scripts now must leave it
        with pytest.raises(Exception):  # noqa: B017  (TorchScript's frontend errors)
            torch.jit.script(block)
        return
    scripted = torch.jit.script(block)
    x = torch.randn(2, C, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), block(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_name", ["resnet18_danet", "resnet50_danet_cam", "aa_resnet50", "resattnet56"])
def test_torchscript_resnet_variant(model_name):
    """timm's test_model_forward_torchscript on variants with context blocks (ContextBasicBlock, ContextBottleneck:
    their scripted forward spells out timm's block forward), on AA-ResNet-50 (relative logits) and Attention-56
    (its modules' top-down walk)."""
    with timm.layers.set_scriptable(True):
        model = _model(model_name)
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)


def test_scripted_ema_refuses_training_mode():
    """The bases update (torch.distributed all-reduce) is Python: a scripted EMA unit says so in training mode
    instead of silently keeping its bases."""
    scripted = torch.jit.script(lit_attn.create_attn("ema", C).eval())
    scripted.train()
    with pytest.raises(Exception, match="eval mode only"):
        scripted(torch.randn(2, C, 5, 6))
