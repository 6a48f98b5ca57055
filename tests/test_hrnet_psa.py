"""The PSA paper's backbone: timm HRNetV2 with PSA in every basic block (`hrnet_*_psa_{p,s}`), checked against a
transcription of the official code (tests/official_psa_hrnet.py, DeLightCMU/PSA): parameters layer by layer,
outputs with the official weights, the block's placement; features, smp, pretrained trunks, plain timm
unchanged. Forwards run at a tiny width (TINY); w48 is only built on the meta device."""
import json
import logging
import re
import subprocess
import sys

import official_psa_hrnet as official
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from helpers import onnx_bytes, randomize_
from timm.models import hrnet as timm_hrnet
from torch import nn

import lit_attn  # noqa: F401  (registers the models)
from lit_attn.layers.psa import PolarizedSelfAttention
from lit_attn.models import hrnet_psa
from lit_attn.models.hrnet_psa import (
    PsaBasicBlock,
    PsaHighResolutionNet,
    PsaHighResolutionNetFeatures,
    official_to_timm_keys,
    psa_hrnet_cfg,
)
from lit_attn.models.pretrained import PretrainedLoadError

ATTNS = ("psa_p", "psa_s")
VARIANTS = [f"{b}_{a}" for b in hrnet_psa.BASES for a in ATTNS]


def _stage(num_modules, num_blocks, num_channels, block_type="BASIC"):
    return dict(num_modules=num_modules, num_branches=len(num_blocks), block_type=block_type,
                num_blocks=num_blocks, num_channels=num_channels, fuse_method="SUM")


# a reduced-width HRNet (timm cfg form): several modules per stage, branches of 1-2 blocks, width 8
TINY = dict(stem_width=64, stage1=_stage(1, (1,), (8,), "BOTTLENECK"), stage2=_stage(1, (1, 1), (8, 16)),
            stage3=_stage(2, (1, 1, 1), (8, 16, 32)), stage4=_stage(1, (2, 1, 1, 1), (8, 16, 32, 64)))


def _group(name: str) -> str:
    """Where a parameter sits: the stem, a stage-1 block, a transition, a stage module's fuse layers, or one
    block of a branch (its PSA block apart, official `deattn` and our `attn` alike)."""
    m = re.match(r"(stage\d+\.\d+)\.branches\.(\d+)\.(\d+)\.((?:de)?attn\.)?", name)
    if m:
        return f"{m[1]}.branch{m[2]}.block{m[3]}" + (".psa" if m[4] else "")
    m = re.match(r"(stage\d+\.\d+)\.fuse_layers\.", name) or re.match(r"(layer1\.\d+|transition\d+)\.", name)
    if m:
        return m[1]
    assert name.split(".")[0] in ("conv1", "bn1", "conv2", "bn2"), name
    return "stem"


def _counts(model: nn.Module) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        out[_group(name)] = out.get(_group(name), 0) + p.numel()
    return out


@pytest.fixture(autouse=True, scope="module")
def _reference_convs():
    """oneDNN builds a kernel per conv configuration on first use: seconds for HRNet's ~100 of them at each
    input size; PyTorch's reference kernels run these tiny widths faster."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = enabled


def _tiny(attn: str, **kwargs) -> PsaHighResolutionNetFeatures:
    return PsaHighResolutionNetFeatures(psa_hrnet_cfg(TINY, attn), **kwargs)


# --- registration ----------------------------------------------------------------------------------------

def test_the_eight_variants_are_timm_models_with_the_base_tags():
    assert timm.list_models("hrnet*_psa*") == sorted(VARIANTS)
    for base in hrnet_psa.BASES:
        for attn in ATTNS:
            tags = [n.replace(f"{base}.", f"{base}_{attn}.") for n in timm.list_pretrained(f"{base}.*")]
            assert tags and timm.list_pretrained(f"{base}_{attn}.*") == tags
            cfg = timm.models.get_pretrained_cfg(f"{base}_{attn}")
            assert cfg.hf_hub_id == f"timm/{base}.{cfg.tag}"  # the BASE checkpoint
    assert timm_hrnet.block_types_dict["BASIC"] is timm.models.resnet.BasicBlock  # timm's entries untouched
    assert timm_hrnet.block_types_dict["BOTTLENECK"] is timm.models.resnet.Bottleneck
    with pytest.raises(ValueError, match="stage2 of the cfg uses 'BOTTLENECK' blocks"):
        psa_hrnet_cfg(dict(TINY, stage2=dict(TINY["stage2"], block_type="BOTTLENECK")), "psa_p")
    with pytest.raises(ValueError, match="psa_init must be one of"):
        _tiny("psa_p", psa_init="kaiming")


# --- (a) parameters, layer by layer, against the official transcription --------------------------------

@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("base", ["hrnet_w48", "hrnet_w18_small_v2"])
def test_parameters_equal_the_official_model_block_by_block(base, attn):
    # w48: the official config (config.py OCR_EXTRA); w18_small_v2: timm's, in the official form
    extra = official.HRNET_W48 if base == "hrnet_w48" else official.official_extra(timm_hrnet.cfg_cls[base])
    with torch.device("meta"):
        ours = timm.create_model(f"{base}_{attn}", features_only=True)
        ref = official.HighResolutionNet(extra, psa=attn[-1])
    mine, theirs = _counts(ours), _counts(ref)
    assert mine == theirs  # every block, PSA block, fuse layer, transition and the stem
    assert sum(mine.values()) == sum(p.numel() for p in ref.parameters())
    assert len([g for g in mine if g.endswith(".psa")]) == len(ours.attention_blocks()) == sum(
        s["NUM_MODULES"] * sum(s["NUM_BLOCKS"]) for k, s in extra.items() if k in ("STAGE2", "STAGE3", "STAGE4"))
    assert not any(g.startswith("layer1") and g.endswith(".psa") for g in mine)
    # features_only: the stem and the raw branches (what smp's "tu-" encoder gets)
    w = timm_hrnet.cfg_cls[base]["stage4"]["num_channels"]
    assert ours.feature_info.channels() == [64, *w] and ours.feature_info.reduction() == [2, 4, 8, 16, 32]
    # same tensors, same shapes, under the mapped official names
    shapes = {k: v.shape for k, v in official_to_timm_keys(ref.state_dict()).items()}
    assert shapes == {k: v.shape for k, v in ours.state_dict().items()}


def test_official_w48_config_is_timms_hrnet_w48():
    extra = official.official_extra(timm_hrnet.cfg_cls["hrnet_w48"])
    for stage in ("STAGE2", "STAGE3", "STAGE4"):
        assert extra[stage] == official.HRNET_W48[stage]
    assert {k: v for k, v in extra["STAGE1"].items() if k != "NUM_BRANCHES"} == {
        k: v for k, v in official.HRNET_W48["STAGE1"].items() if k != "NUM_RANCHES"}  # (official typo, unused)


# --- (b) the official weights give the official outputs -----------------------------------------------

@pytest.mark.parametrize("attn", ATTNS)
def test_official_weights_give_the_official_branches(attn):
    ref = randomize_(official.HighResolutionNet(official.official_extra(TINY), psa=attn[-1]), seed=1).eval()
    ours = _tiny(attn).eval()
    ours.load_state_dict(official_to_timm_keys(ref.state_dict()), strict=True)
    assert isinstance(ours.stage2[0].branches[0][0].attn, PolarizedSelfAttention)
    g = torch.Generator().manual_seed(2)
    for size in ((64, 64), (70, 54)):  # the official code interpolates to sizes: odd sizes run there too
        x = torch.randn(2, 3, *size, generator=g)
        with torch.no_grad():
            branches, feats = ref(x.clone())
            mine = ours(x)
        assert [tuple(t.shape) for t in mine] == [(2, 64, (size[0] + 1) // 2, (size[1] + 1) // 2)] + [
            tuple(t.shape) for t in branches]
        assert min(t.std().item() for t in branches) > 0.05  # informative outputs, not vanished
        for a, b in zip(mine[1:], branches, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        up = [nn.functional.interpolate(t, size=mine[1].shape[-2:], mode="bilinear") for t in mine[2:]]
        torch.testing.assert_close(torch.cat([mine[1], *up], 1), feats, rtol=1e-5, atol=1e-5)  # HRNetV2 concat


def test_official_keys_map_with_prefixes_and_name_the_rest():
    ref = official.HighResolutionNet(official.official_extra(TINY), psa="p")
    sd = {f"module.backbone.{k}": v for k, v in ref.state_dict().items()}
    mapped = official_to_timm_keys(sd)
    assert set(mapped) == set(_tiny("psa_p").state_dict())
    assert "stage2.0.branches.0.0.attn.conv_q_right.weight" in mapped and not any("deattn" in k for k in mapped)
    with pytest.raises(ValueError, match=r"2 key\(s\) outside the HRNetV2 trunk .*module\.ocr\.conv\.weight, "
                                         r"module\.cls\.bias"):
        official_to_timm_keys(dict(sd, **{"module.ocr.conv.weight": 0, "module.cls.bias": 0}))
    del mapped["stage3.1.branches.2.0.attn.conv_up.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*stage3\.1\.branches\.2\.0\.attn\.conv_up\.weight"):
        _tiny("psa_p").load_state_dict(mapped, strict=True)


# --- (c) placement --------------------------------------------------------------------------------------

def test_psa_sees_act1_and_feeds_conv2_in_every_basic_block():
    model = _tiny("psa_s").eval()
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, PsaBasicBlock)}
    assert len(blocks) == 2 + 2 * 3 + 5 and all(n.startswith(("stage2", "stage3", "stage4")) for n in blocks)
    assert not any(isinstance(m, PolarizedSelfAttention) for m in model.layer1.modules())  # Bottlenecks: none
    seen: dict[str, dict[str, torch.Tensor]] = {n: {} for n in blocks}
    for n, b in blocks.items():
        assert b.attn.channels == b.conv1.out_channels and b.attn.layout == "sequential"
        b.act1.register_forward_hook(lambda m, i, o, n=n: seen[n].__setitem__("act1", o.clone()))
        b.attn = nn.Identity()  # the PSA block replaced by a recording hook (and a pass-through)
        b.attn.register_forward_pre_hook(lambda m, i, n=n: seen[n].__setitem__("attn", i[0].clone()))
        b.conv2.register_forward_pre_hook(lambda m, i, n=n: seen[n].__setitem__("conv2", i[0].clone()))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    for n in blocks:
        assert torch.equal(seen[n]["attn"], seen[n]["act1"]) and torch.equal(seen[n]["conv2"], seen[n]["act1"])


def test_psa_init_follows_the_official_model():
    torch.manual_seed(0)
    hrnet, block = _tiny("psa_s"), _tiny("psa_s", psa_init="block")
    w = torch.cat([m.weight.flatten() for a in hrnet.attention_blocks().values() for m in a.modules()
                   if isinstance(m, nn.Conv2d)])
    assert abs(w.std().item() - 0.001) < 1e-4  # official get_seg_model: N(0, 0.001) on every conv
    q = block.stage2[0].branches[0][0].attn.conv_q_left.weight  # the block's own: kaiming fan_in
    assert 0.5 < q.std().item() / (2 / 8) ** 0.5 < 1.5
    hrnet.init_weights()  # timm's init again, then the PSA init again
    assert hrnet.stage2[0].branches[0][0].attn.conv_v_left.weight.abs().max() < 0.01


# --- (d) the plain timm models are unchanged ---------------------------------------------------------

_PLAIN = """
import timm, torch
def plain():
    with torch.device("meta"):
        m = timm.create_model("hrnet_w18_small_v2")
    return [sum(p.numel() for p in m.parameters()), list(m.state_dict()), repr(m)]
"""


def test_plain_timm_hrnet_is_unchanged_here():
    ns: dict = {}
    exec(_PLAIN, ns)
    count, keys, tree = ns["plain"]()
    assert count == 15_597_464 and not any(".attn." in k for k in keys)
    assert "Upsample(scale_factor=2.0, mode='nearest')" in tree and "OfficialFuseModule" not in tree
    assert {k: timm_hrnet.block_types_dict[k] for k in ("BASIC", "BOTTLENECK")} == {
        "BASIC": timm.models.resnet.BasicBlock, "BOTTLENECK": timm.models.resnet.Bottleneck}
    assert all(s["block_type"] in ("BASIC", "BOTTLENECK") for c in timm_hrnet.cfg_cls.values()
               for k, s in c.items() if k.startswith("stage"))


@pytest.mark.slow  # a fresh interpreter (~5-10 s); test_plain_timm_hrnet_is_unchanged_here checks the same in-process
def test_plain_timm_hrnet_is_unchanged():
    """Param count, keys and module tree of timm's hrnet_w18_small_v2 without lit_attn (a fresh interpreter)
    and here, after the import."""
    before = json.loads(subprocess.run([sys.executable, "-c", _PLAIN + "import json; print(json.dumps(plain()))"],
                                       check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    ns: dict = {}
    exec(_PLAIN, ns)
    assert "lit_attn" in sys.modules and ns["plain"]() == before
    assert before[0] == 15_597_464
    assert "Upsample(scale_factor=2.0, mode='nearest')" in before[2] and "attn" not in before[2]


# --- (e) contracts at the tiny width ---------------------------------------------------------------------

@pytest.mark.parametrize(("attn", "backward"), [("psa_p", False), ("psa_s", True)])
def test_meta_bf16_channels_last_odd_size(attn, backward):
    with torch.device("meta"):
        meta = _tiny(attn)
    assert all(p.is_meta for p in meta.parameters())
    model = randomize_(_tiny(attn), seed=3).eval()
    x = torch.randn(1, 3, 45, 37)  # odd: branches 12x10, 6x5, 3x3, 2x2
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x)
    assert [t.shape[-2:] for t in ref] == [(23, 19), (12, 10), (6, 5), (3, 3), (2, 2)]
    for a, b, c in zip(ref, cl, half, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        assert c.dtype == torch.bfloat16 and torch.isfinite(c).all()
        assert (c.float() - a).norm() < 0.1 * a.norm()
    if backward:  # trains at odd sizes too
        model.train()(x)[-1].mean().backward()
        assert model.stage4[0].branches[3][0].attn.conv_q_left.weight.grad is not None


# the smallest HRNet with every stage (one module, one block per branch): the exports' cost grows with the ops
MINI = dict(stem_width=16, stage1=_stage(1, (1,), (4,), "BOTTLENECK"), stage2=_stage(1, (1, 1), (8, 16)),
            stage3=_stage(1, (1, 1, 1), (8, 16, 32)), stage4=_stage(1, (1, 1, 1, 1), (8, 16, 32, 64)))


def test_official_fuse_scripts_but_the_model_does_not_as_timms_hrnet():
    """OfficialFuseModule compiles with TorchScript (scripted == eager, odd branch sizes); the whole model does not,
    as timm's own HRNet (its SequentialList / stages are not scriptable; timm's test_models.py excludes `hrnet*`
    from its TorchScript tests, which excludes these models too)."""
    model = randomize_(_tiny("psa_p"), seed=6).eval()
    fuse = model.stage4[0]
    assert isinstance(fuse, hrnet_psa.OfficialFuseModule)
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(1, c, h, w, generator=g) for c, h, w in ((8, 17, 13), (16, 9, 7), (32, 5, 4), (64, 3, 2))]
    scripted = torch.jit.script(fuse)
    with torch.no_grad():
        for a, b in zip(scripted(list(x)), fuse(list(x)), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for m in (model, timm.create_model("hrnet_w18_small_v2")):
        with pytest.raises(RuntimeError):
            torch.jit.script(m)


ONNX_SIZES = ((64, 64), (45, 37))


@pytest.mark.parametrize(("attn", "dynamo"), [("psa_p", False), ("psa_s", False),  # dynamo: 15-40 s each, slow
                                              pytest.param("psa_p", True, marks=pytest.mark.slow),
                                              pytest.param("psa_s", True, marks=pytest.mark.slow)])
def test_onnx_export_matches_onnxruntime(attn, dynamo):
    """Both ONNX exporters with dynamic H, W: onnxruntime's branches equal PyTorch's to 1e-4 at the export size and
    an odd one. Dynamic export needs H, W >= 33: at 32 the stride-32 branch is 1x1 and torch.export specialises it
    (a clear constraint error)."""
    ort = pytest.importorskip("onnxruntime")
    model = randomize_(PsaHighResolutionNetFeatures(psa_hrnet_cfg(MINI, attn)), seed=7).eval()
    xs = [torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1)) for h, w in ONNX_SIZES]
    blob = onnx_bytes(model, xs[0], dynamo, min_size=33)
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    for x in xs:
        with torch.no_grad():
            refs = model(x)
        outs = session.run(None, {"x": x.numpy()})
        assert len(outs) == len(refs) == 5
        for out, ref in zip(outs, refs, strict=True):
            torch.testing.assert_close(torch.from_numpy(out), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # torch.compile of ~40 modules, ~20-40 s on 2 CPU cores
def test_compile_fullgraph_dynamic():
    model = randomize_(PsaHighResolutionNetFeatures(psa_hrnet_cfg(MINI, "psa_s")), seed=8).eval()
    torch.compiler.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")
    with torch.no_grad():
        for h, w in ONNX_SIZES:
            x = torch.rand(1, 3, h, w)
            for a, b in zip(compiled(x), model(x), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --- features: raw branches, incre, FX, smp -------------------------------------------------------------

@pytest.mark.slow  # 2 w48 builds; covered by test_parameters_equal_... (feature_info) + test_smp_unet_encoder
def test_smp_w48_encoder_gives_the_raw_branches():
    with torch.device("meta"):
        enc = smp.encoders.get_encoder("tu-hrnet_w48_psa_p", weights=None)  # timm.create_model(features_only=True)
    assert enc.out_channels == [3, 64, 48, 96, 192, 384] and isinstance(enc.model, PsaHighResolutionNetFeatures)
    assert enc.model.feature_info.reduction() == [2, 4, 8, 16, 32] and enc.model.incre_modules is None


def test_features_only_gives_the_raw_branches():
    with torch.device("meta"):
        raw = timm.create_model("hrnet_w18_small_v2_psa_s", features_only=True)
        incre = timm.create_model("hrnet_w18_small_v2_psa_s", features_only=True, feature_location="incre")
        getter = timm.create_model("hrnet_w18_small_v2_psa_p", features_only=True, feature_cls="getter")
        cls = timm.create_model("hrnet_w18_small_v2_psa_p")
    assert isinstance(raw, PsaHighResolutionNetFeatures) and raw.incre_modules is None
    assert raw.feature_info.channels() == getter.feature_info.channels() == [64, 18, 36, 72, 144]
    assert incre.feature_info.channels() == [64, 128, 256, 512, 1024]
    assert cls.num_classes == 1000 and cls.incre_modules is not None


def test_fx_feature_extraction():
    with pytest.raises(ValueError, match="'stem' is not present"):  # as for timm's own HRNet
        timm.create_model("hrnet_w18_small_v2_psa_s", features_only=True, feature_cls="fx")
    model = randomize_(_tiny("psa_s"), seed=5).eval()
    nodes = timm.models.get_graph_node_names(model)[1]
    last = [n for n in nodes if re.fullmatch(r"stage4\.0\.fuse_act(_\d)?", n)]
    assert len(last) == 4
    fx = timm.models.create_feature_extractor(model, return_nodes=last)
    x = torch.randn(1, 3, 70, 54)
    with torch.no_grad():
        for a, b in zip(fx(x).values(), model(x)[1:], strict=True):
            assert torch.equal(a, b)


def test_smp_unet_encoder():
    model = smp.Unet("tu-hrnet_w18_small_v2_psa_p", encoder_weights=None, classes=3).eval()
    assert model.encoder.out_channels == [3, 64, 18, 36, 72, 144]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)
        assert model(torch.randn(1, 3, 70, 54)).shape == (1, 3, 70, 54)  # smp's Unet takes any size


# --- pretrained: the plain trunk, PSA blocks fresh ----------------------------------------------------

@pytest.fixture(scope="module")
def w18_small(tmp_path_factory):
    base = timm.create_model("hrnet_w18_small_v2")
    sd = {k: v.clone() for k, v in randomize_(base, seed=4).state_dict().items()}
    path = tmp_path_factory.mktemp("hrnet") / "hrnet_w18_small_v2.pth"
    torch.save(sd, path)
    return {"sd": sd, "file": str(path)}


@pytest.mark.parametrize("features_only", [False, True])
def test_pretrained_loads_the_plain_trunk(w18_small, features_only, caplog):
    name, kw = "hrnet_w18_small_v2_psa_s", dict(features_only=features_only)
    torch.manual_seed(3)
    fresh = timm.create_model(name, **kw).state_dict()
    torch.manual_seed(3)
    with caplog.at_level(logging.INFO, logger="lit_attn.models.pretrained"):
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=w18_small["file"]), **kw)
    prefixes = tuple(p + "." for p in model.attention_blocks())
    state = model.state_dict()
    trunk = [k for k in state if not k.startswith(prefixes)]
    blocks = [k for k in state if k.startswith(prefixes)]
    assert set(trunk) <= set(w18_small["sd"]) and all(torch.equal(state[k], w18_small["sd"][k]) for k in trunk)
    if not features_only:
        assert set(trunk) == set(w18_small["sd"])  # classification model: the whole checkpoint
    else:
        assert {k.split(".")[0] for k in set(w18_small["sd"]) - set(trunk)} == {
            "incre_modules", "downsamp_modules", "final_layer", "classifier"}
    assert len(model.attention_blocks()) == 4 + 3 * 6 + 2 * 8 and all(torch.equal(state[k], fresh[k]) for k in blocks)
    assert any(m.startswith(f"{name}: loaded {len(trunk)} trunk tensors") and f"{len(blocks)} tensors of the psa_s "
               "blocks keep their init" in m for m in caplog.messages)


def test_pretrained_missing_trunk_key_is_an_error(w18_small, tmp_path):
    sd = dict(w18_small["sd"])
    del sd["stage3.2.branches.1.1.bn2.running_var"]
    torch.save(sd, tmp_path / "ckpt.pth")
    with pytest.raises(PretrainedLoadError, match=r"hrnet_w18_small_v2_psa_p: .* missing from the checkpoint: "
                                                  r"stage3\.2\.branches\.1\.1\.bn2\.running_var"):
        timm.create_model("hrnet_w18_small_v2_psa_p", pretrained=True, features_only=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "ckpt.pth")))


def test_classification_model_runs():
    model = timm.create_model("hrnet_w18_small_v2_psa_p", num_classes=7).eval()
    assert isinstance(model, PsaHighResolutionNet)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
