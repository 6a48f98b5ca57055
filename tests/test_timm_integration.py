"""String names in timm's attention slots, across timm families, and the registered variants."""
import sys
from dataclasses import replace

import pytest
import timm
import torch
from timm.layers.cbam import CbamModule
from timm.layers.squeeze_excite import SEModule

import lit_attn
from lit_attn.integrations import timm as integ
from lit_attn.layers.non_local import NonLocal2d
from lit_attn.models.lit_resnet import ContextBasicBlock, ContextBottleneck


def test_every_timm_module_binding_get_attn_is_patched():
    holders = [n for n, m in list(sys.modules.items())
               if n.startswith("timm") and m is not None and getattr(getattr(m, "get_attn", None), "__name__", "")
               == "get_attn"]
    assert integ.unpatched_modules() == []
    assert set(integ.patched_modules()) == set(holders)
    assert {"timm.models.resnet", "timm.models.byobnet", "timm.models.cspnet", "timm.models._efficientnet_builder",
            "timm.models.nfnet", "timm.layers.create_attn"} <= set(holders)
    assert integ.install() == integ.patched_modules()  # idempotent


def test_timm_own_names_and_values_still_work():
    get_attn = sys.modules["timm.layers.create_attn"].get_attn
    assert get_attn("se") is SEModule and get_attn("CBAM") is CbamModule
    assert get_attn(NonLocal2d) is NonLocal2d and get_attn(None) is None and get_attn(True) is SEModule
    with pytest.raises(AssertionError, match="Invalid attn module"):
        get_attn("no_such_block")
    m = timm.create_model("resnet18", block_args={"attn_layer": "se"})
    assert isinstance(m.layer1[0].se, SEModule)
    m = timm.create_model("resnet18", block_args={"attn_layer": NonLocal2d})
    assert isinstance(m.layer1[0].se, NonLocal2d)


def _check(model, size=64):
    out = model(torch.randn(2, 3, size, size))
    out.mean().backward()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["psa_p", "danet_cam"])
def test_other_timm_families_take_lit_attn_names(name):
    cls = type(lit_attn.create_attn(name, 8))
    byob = timm.create_model("gernet_s", attn_layer=name, num_classes=3)
    eff = timm.create_model("efficientnet_b0", se_layer=name, num_classes=3)
    csp_cfg = timm.models.cspnet.model_cfgs["cspresnet50"]
    csp = timm.create_model("cspresnet50", stages=replace(csp_cfg.stages, attn_layer=name), num_classes=3)
    nf = timm.create_model("nf_resnet26", attn_layer=name, num_classes=3)
    vov = timm.create_model("ese_vovnet19b_dw", attn=name, num_classes=3)
    for model in (byob, eff, csp, nf, vov):
        assert any(isinstance(m, cls) for m in model.modules()), type(model).__name__
        _check(model)


def test_string_names_survive_smp_save_pretrained(tmp_path):
    import segmentation_models_pytorch as smp
    model = smp.Unet("tu-resnet18", encoder_weights=None, classes=2, block_args={"attn_layer": "psa_p"})
    model.save_pretrained(tmp_path)
    again = smp.from_pretrained(str(tmp_path))
    cls = type(lit_attn.create_attn("psa_p", 8))
    assert sum(isinstance(m, cls) for m in again.modules()) == 8
    state = again.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(state[key], value)


VARIANTS = [n for n in timm.list_models(module="lit_resnet")]


def test_variants_cover_every_plugin_and_base():
    plugins = lit_attn.list_attn(kind=("gate", "global"), source="lit_attn")
    assert set(VARIANTS) == {f"{b}_{p}" for b in ("resnet18", "resnet50", "resnet101") for p in plugins}


# the papers' own placements in ResNet-50 (0-based block indices followed by the block, per stage)
PAPER_POSITIONS_R50 = {
    "glore": {1: [0, 2], 2: [0, 2, 4]},        # GloRe official resnet50_3d_gcn_x5 ("+2 res3 / +3 res4")
    "cgnl": {2: [4]}, "cgnl_gaussian": {2: [4]},  # CGNL: before the last block of res4
    "latentgnn": {2: [5]},                     # LatentGNN detection code: after res4 ("C4")
    "dgmn": {3: [2]},                          # DGMN: after the last res5 block (DynamicWeightsCat11)
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_placement(variant):
    model = timm.create_model(variant, device="meta")
    base, name = variant.split("_", 1)
    kind = lit_attn.get_attn_entry(name).kind
    cls = lit_attn.get_attn_entry(name).cls
    n_blocks = sum(isinstance(m, cls) for m in model.modules())
    layers = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}[base]
    if kind == "gate":
        assert n_blocks == sum(layers)
    elif name in PAPER_POSITIONS_R50:
        positions = {s: [i for i, b in enumerate(getattr(model, f"layer{s + 1}"))
                         if isinstance(b, (ContextBasicBlock, ContextBottleneck))] for s in range(4)}
        assert n_blocks == sum(len(v) for v in positions.values())
        if base == "resnet50":
            assert {s: v for s, v in positions.items() if v} == PAPER_POSITIONS_R50[name]
    else:  # after every other block of res3 and res4 (Non-local paper: 5 blocks in ResNet-50)
        assert n_blocks == layers[1] // 2 + layers[2] // 2
        assert n_blocks == sum(isinstance(m, (ContextBasicBlock, ContextBottleneck)) for m in model.modules())
    if variant == "resnet50_nonlocal":
        assert n_blocks == 5


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.startswith("resnet18_")])
def test_resnet18_variants_train_step(variant):
    model = timm.create_model(variant, pretrained=False, num_classes=4)
    _check(model)


def test_variant_timm_api():
    name = "resnet50_nonlocal"
    model = timm.create_model(name, pretrained=False, num_classes=7)
    x = torch.randn(1, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (1, 2048, 2, 2)
    assert model.forward_head(feats, pre_logits=True).shape == (1, 2048)
    assert model.forward_head(feats).shape == (1, 7)
    model.reset_classifier(3)
    assert model(x).shape == (1, 3) and model.get_classifier().out_features == 3
    fo = timm.create_model(name, features_only=True, out_indices=(1, 2, 3, 4))
    maps = fo(x)
    assert [m.shape[1] for m in maps] == fo.feature_info.channels() == [256, 512, 1024, 2048]
    assert fo.feature_info.reduction() == [4, 8, 16, 32]
    os8 = timm.create_model("resnet18_danet", features_only=True, output_stride=8)
    assert [m.shape[-1] for m in os8(x)] == [32, 16, 8, 8, 8]
    base = timm.create_model("resnet50")
    missing, unexpected = model.load_state_dict({k: v for k, v in base.state_dict().items() if "fc" not in k},
                                                strict=False)
    assert not unexpected and all("context" in k or "fc" in k for k in missing)
