"""lit_attn.heads: FCNHead (mmseg), AttnHead (the NLHead pattern for any block), AttnSegmentor (timm / smp)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import lit_attn
from lit_attn.heads import AttnHead, AttnSegmentor, ConvModule, FCNHead


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def conv_bn_relu(m: ConvModule, x: torch.Tensor) -> torch.Tensor:
    """A ConvModule in eval mode, by hand from its own parameters."""
    c, bn = m.conv, m.bn
    y = F.conv2d(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    return F.relu(y * bn.weight[:, None, None] + bn.bias[:, None, None])


def randomise_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()


# ----------------------------------------------------------------------------------------------- FCNHead
def test_fcn_head_matches_mmseg_computation():
    torch.manual_seed(0)
    head = FCNHead(6, 8, 5).eval()
    randomise_bn(head)
    x = torch.randn(2, 6, 7, 9)
    out = x
    for m in head.convs:
        out = conv_bn_relu(m, out)
    # mmseg: conv_cat(torch.cat([x, output], dim=1)): the input first
    out = conv_bn_relu(head.conv_cat, torch.cat([x, out], dim=1))
    ref = F.conv2d(out, head.conv_seg.weight, head.conv_seg.bias)
    torch.testing.assert_close(head(x), ref)
    # the reversed order gives something else (the check above is sensitive to it)
    wrong = conv_bn_relu(head.conv_cat, torch.cat([head.convs(x), x], dim=1))
    assert not torch.allclose(F.conv2d(wrong, head.conv_seg.weight, head.conv_seg.bias), ref)


def test_fcn_head_structure_and_mmseg_keys():
    head = FCNHead(16, 8, 3)
    assert [type(m) for m in head.convs] == [ConvModule, ConvModule]
    assert head.convs[0].conv.bias is None and head.conv_seg.bias is not None
    assert head.convs[0].conv.kernel_size == (3, 3) and head.convs[0].conv.padding == (1, 1)
    assert isinstance(head.dropout, nn.Dropout2d) and head.dropout.p == 0.1
    keys = {k.rsplit(".", 1)[0] for k in head.state_dict()}
    assert keys == {"convs.0.conv", "convs.0.bn", "convs.1.conv", "convs.1.bn", "conv_cat.conv", "conv_cat.bn",
                    "conv_seg"}
    assert head.conv_cat.conv.in_channels == 16 + 8


def test_fcn_aux_head_param_count_mmseg():
    # mmseg's auxiliary head: FCNHead(1024 -> 256, num_convs=1, concat_input=False) on stage 3
    for k in (19, 150):
        aux = FCNHead(1024, 256, k, num_convs=1, concat_input=False)
        assert not hasattr(aux, "conv_cat") and len(aux.convs) == 1
        assert n_params(aux) == 9 * 1024 * 256 + 2 * 256 + 257 * k
    assert n_params(FCNHead(1024, 256, 19, num_convs=1, concat_input=False)) == 2_364_691


def test_fcn_head_init_follows_mmseg():
    torch.manual_seed(0)
    head = FCNHead(64, 256, 64)
    conv = head.convs[1].conv                                 # kaiming normal, fan_out, relu
    expected = math.sqrt(2.0 / (256 * 9))
    assert abs(conv.weight.std().item() / expected - 1) < 0.05
    assert abs(head.conv_seg.weight.std().item() - 0.01) < 0.001
    assert torch.all(head.conv_seg.bias == 0)
    for m in head.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_fcn_head_options_and_errors():
    x = torch.randn(1, 8, 5, 5)
    assert FCNHead(8, 8, 2, num_convs=0, concat_input=False)(x).shape == (1, 2, 5, 5)
    gn = FCNHead(8, 32, 2, norm_layer="groupnorm", act_layer="gelu", dropout=0)
    assert gn.convs[0].norm_name == "gn" and isinstance(gn.dropout, nn.Identity)
    assert gn(x).shape == (1, 2, 5, 5)
    dil = FCNHead(8, 4, 2, dilation=2)
    assert dil.convs[1].conv.dilation == (2, 2) and dil.convs[1].conv.padding == (2, 2)
    assert dil.conv_cat.conv.dilation == (1, 1) and dil(x).shape == (1, 2, 5, 5)      # as mmseg
    plain = FCNHead(8, 4, 2, norm_layer=None)
    assert plain.convs[0].conv.bias is not None and plain.convs[0].norm is None
    with pytest.raises(ValueError, match="num_convs=0"):
        FCNHead(8, 4, 2, num_convs=0)
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        FCNHead(8, 4, 2)(torch.randn(1, 7, 5, 5))
    with pytest.raises(ValueError, match="kernel_size"):
        FCNHead(8, 4, 2, kernel_size=2)


# ----------------------------------------------------------------------------------------------- AttnHead
class Spy(nn.Module):
    """Records its input and returns a recognisable function of it."""

    def __init__(self, channels):
        super().__init__()
        self.channels, self.seen = channels, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return torch.tanh(x) * 3 - 1


def test_attn_head_inserts_block_between_convs():
    torch.manual_seed(0)
    head = AttnHead(12, 8, 3, attention=Spy).eval()
    randomise_bn(head)
    assert isinstance(head.attn, Spy) and head.attention_modules() == (head.attn,)
    x = torch.randn(2, 12, 6, 7)
    seen_by_conv1 = []
    head.convs[1].register_forward_pre_hook(lambda m, a: seen_by_conv1.append(a[0].detach().clone()))
    y = head(x)
    c0 = conv_bn_relu(head.convs[0], x)
    torch.testing.assert_close(head.attn.seen[0], c0)                       # block input = convs[0](x)
    torch.testing.assert_close(seen_by_conv1[0], torch.tanh(c0) * 3 - 1)    # convs[1] input = block(...)
    out = conv_bn_relu(head.convs[1], torch.tanh(c0) * 3 - 1)
    out = conv_bn_relu(head.conv_cat, torch.cat([x, out], 1))
    torch.testing.assert_close(y, F.conv2d(out, head.conv_seg.weight, head.conv_seg.bias))


def test_attn_head_none_is_fcn_d8_head():
    torch.manual_seed(0)
    a = AttnHead(16, 8, 3, attention=None).eval()
    f = FCNHead(16, 8, 3).eval()
    f.load_state_dict(a.state_dict())
    x = torch.randn(1, 16, 5, 5)
    torch.testing.assert_close(a(x), f(x))
    assert isinstance(a.attn, nn.Identity) and a.attention_modules() == ()


def test_attn_head_param_count_nlhead_r50_d8():
    # mmseg NLHead R-50-D8 (Cityscapes, K=19): in 2048, channels 512, two 3x3 ConvModules, conv_cat on
    # 2048 + 512, 1x1 conv_seg. Non-attention part by formula (convs have no bias; BN has 2 C params).
    k = 19
    head = AttnHead(2048, 512, k, attention="nonlocal")
    convs = 9 * (2048 * 512 + 512 * 512 + (2048 + 512) * 512) + 3 * 2 * 512
    conv_seg = 512 * k + k
    assert convs + conv_seg == 23_605_779
    assert n_params(head) - n_params(head.attn) == convs + conv_seg
    # lit_attn's non-local on 512 channels (inner 256): theta/phi/g/W_z with biases + BN; mmcv's
    # NonLocal2d has no W_z bias (it is followed by a norm): 526,080, i.e. 512 fewer
    inner = 256
    assert n_params(head.attn) == 3 * (512 * inner + inner) + (inner * 512 + 512) + 2 * 512 == 526_592
    assert n_params(head) == 24_132_371                      # mmseg NLHead: 23,605,779 + 526,080 = 24,131,859


def test_attn_head_keeps_block_init_and_accepts_kwargs():
    head = AttnHead(16, 32, 3, attention="nonlocal", attention_kwargs={"rd_ratio": 0.25})
    assert head.attn.inner == 8
    assert torch.all(head.attn.norm.weight == 0)           # zero-gamma identity init survives the head init
    head.init_weights()
    assert torch.all(head.attn.norm.weight == 0)


def test_attn_head_rejects_bad_attention(monkeypatch):
    import dataclasses

    from lit_attn.heads import context

    head_only = dataclasses.replace(lit_attn.get_attn_entry("se"), kind="head")
    monkeypatch.setattr(context, "get_attn_entry", lambda name: head_only)
    with pytest.raises(ValueError, match="head-only"):
        AttnHead(8, 8, 2, attention="se")
    monkeypatch.undo()
    with pytest.raises(KeyError, match="unknown attention block"):
        AttnHead(8, 8, 2, attention="no_such_block")
    with pytest.raises(ValueError, match="attention_kwargs"):
        AttnHead(8, 8, 2, attention=None, attention_kwargs={"x": 1})


# kind "gate"/"global" (plug-in) and "conv" blocks that map channels -> channels at any size
PLUGIN = lit_attn.list_attn(kind=("gate", "global"))
# timm's BatNonLocalAttn asserts H and W divisible by its block_size 7: run it on 14 x 14
MAP_SIZE = {"bat": 14}


@pytest.mark.parametrize("name", PLUGIN + ["aa_conv"])
def test_every_plugin_block_builds_and_runs_in_attn_head(name):
    size = MAP_SIZE.get(name, 9)
    head = AttnHead(24, 32, 3, attention=name)
    assert not isinstance(head.attn, nn.Identity)
    y = head(torch.randn(2, 24, size, size))
    assert y.shape == (2, 3, size, size) and torch.isfinite(y).all()


def test_conv_kind_block_in_attn_head():
    head = AttnHead(24, 32, 3, attention="aa_conv", attention_kwargs={"num_heads": 4, "min_dkh": 4})
    assert type(head.attn).__name__ == "AugmentedConv2d"
    x = torch.randn(1, 24, 7, 11)
    head(x).sum().backward()
    assert all(p.grad is not None for p in head.attn.parameters())


# ----------------------------------------------------------------------------------------------- AttnSegmentor
def small(encoder="resnet18", **kw):
    kw = {"num_classes": 4, "attention": "psa_p", "channels": 32, "aux_channels": 16, **kw}
    return AttnSegmentor(encoder, **kw)


@pytest.mark.parametrize("os_, fm", [(8, 8), (16, 4), (32, 2)])
def test_segmentor_timm_output_stride(os_, fm):
    model = small(output_stride=os_).eval()
    x = torch.randn(1, 3, 64, 64)
    feats = model.forward_features(x)
    assert model.encoder_channels == [64, 64, 128, 256, 512]
    assert feats[-1].shape[-2:] == (fm, fm) and feats[-1].shape[1] == 512
    stage3 = max(fm, 64 // 16)
    assert feats[-2].shape[-2:] == (stage3, stage3) and feats[-2].shape[1] == 256
    assert model.encoder_reductions[-1] == os_
    assert model.decode_head.in_channels == 512 and model.auxiliary_head.in_channels == 256
    assert model(x).shape == (1, 4, 64, 64)


def test_segmentor_train_eval_outputs_odd_size_and_backward():
    torch.manual_seed(0)
    model = small(output_stride=8).train()
    x = torch.randn(2, 3, 97, 113)
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 2
    main, aux = out
    assert main.shape == aux.shape == (2, 4, 97, 113)
    (F.cross_entropy(main, torch.randint(0, 4, (2, 97, 113)))
     + 0.4 * F.cross_entropy(aux, torch.randint(0, 4, (2, 97, 113)))).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert next(model.decode_head.attn.parameters()).grad is not None
    model.eval()
    with torch.no_grad():
        y = model(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 4, 97, 113)


def test_segmentor_without_aux_returns_tensor_in_training():
    model = small(aux=False, attention=None).train()
    assert model.auxiliary_head is None and model.attention_blocks() == {}
    y = model(torch.randn(2, 3, 33, 35))
    assert isinstance(y, torch.Tensor) and y.shape == (2, 4, 33, 35)


def test_segmentor_smp_encoder():
    model = small("smp:resnet18", output_stride=16).train()
    assert model.encoder_channels == [64, 64, 128, 256, 512]
    x = torch.randn(2, 3, 97, 113)
    feats = model.forward_features(x)
    assert feats[-1].shape[1:] == (512, 7, 8) and feats[-2].shape[1:] == (256, 7, 8)
    main, aux = model(x)
    assert main.shape == aux.shape == (2, 4, 97, 113)
    assert model.eval()(x).shape == (2, 4, 97, 113)


def test_segmentor_attention_blocks_head_and_encoder():
    model = small(attention="nonlocal", encoder_kwargs={"block_args": {"attn_layer": "eca"}})
    blocks = model.attention_blocks()
    assert blocks["decode_head.attn"] is model.decode_head.attn
    enc = [k for k in blocks if k.startswith("encoder.")]
    assert len(enc) == 8 and all(type(blocks[k]).__name__ == "EcaModule" for k in enc)   # resnet18: 8 blocks
    # a block class that is not registered is still found when it is the head's block
    assert list(small(attention=Spy, aux=False).attention_blocks()) == ["decode_head.attn"]
    assert list(small(attention=None).attention_blocks()) == []
    model = AttnSegmentor("resnet18", num_classes=2, channels=16, aux=False, attention="danet")
    assert list(model.attention_blocks()) == ["decode_head.attn"]                     # outermost only


def test_segmentor_from_yaml_and_errors():
    cfg = yaml.safe_load("""
    encoder: resnet18
    num_classes: 3
    attention: nonlocal
    attention_kwargs: {rd_ratio: 0.25}
    output_stride: 16
    channels: 16
    aux_channels: 8
    dropout: 0.0
    norm_layer: batchnorm
    act_layer: relu
    """)
    model = AttnSegmentor(**cfg).eval()
    assert model.decode_head.attn.inner == 4 and model(torch.randn(1, 3, 40, 40)).shape == (1, 3, 40, 40)
    with pytest.raises(ValueError, match="output_stride"):
        AttnSegmentor("resnet18", num_classes=2, output_stride=4)
    with pytest.raises(ValueError, match="encoder_kwargs must not set"):
        AttnSegmentor("resnet18", num_classes=2, encoder_kwargs={"output_stride": 8})


def test_segmentor_sync_batchnorm_conversion():
    torch.manual_seed(0)
    model = small(attention="nonlocal").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == n_bn
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert isinstance(model.decode_head.convs[0].bn, nn.SyncBatchNorm)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref)


def test_segmentor_lightning_cli_config():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--model", type=nn.Module)
    cfg = parser.parse_string("""
    model:
      class_path: lit_attn.heads.AttnSegmentor
      init_args:
        encoder: smp:resnet18
        num_classes: 3
        attention: eca
        encoder_kwargs: {depth: 5}
        output_stride: 16
        channels: 16
        aux_channels: 8
    """)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    model = instantiate(cfg).model
    assert isinstance(model, AttnSegmentor) and type(model.decode_head.attn).__name__ == "EcaModule"
    assert "aux_channels: 8" in parser.dump(cfg)
