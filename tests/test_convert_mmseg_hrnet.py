"""mmseg HRNet OCRNet checkpoints -> lit_attn's hrnet_ocr (`lit_attn.convert.convert_mmseg`, `lit-attn convert mmseg`).

Equivalence against mmseg itself comes from tests/fixtures/mmseg/ocrnet_hr* (made by mmsegmentation 1.2.2 in a scratch
environment by scripts/make_mmseg_fixtures.py; see the fixtures' README): mmseg's CascadeEncoderDecoder (HRNet with
timm's hrnet_w18_small layout, FCNHead + OCRHead at reduced widths, 5 classes, float16-stored weights). mmseg is not
needed here. The converted model must give mmseg's logits, OCRHead and stage-1 FCNHead outputs within 1e-4 at a size
divisible by 32; at an odd size it must equal mmseg's model with a one-step bilinear fuse, and mmseg's own outputs
once its two-step fuse (transcribed below) is put back.
"""
from __future__ import annotations

import copy
import gzip
import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lit_attn  # noqa: F401  (registers the smp architectures)
from lit_attn.convert import (
    KeyMappingError,
    UnsupportedModelError,
    convert_mmseg,
    convert_mmseg_checkpoint,
    load_mmseg_checkpoint,
    read_checkpoint,
)
from lit_attn.convert.cli import main as convert_main
from lit_attn.convert.config import parse_config
from lit_attn.convert.mmseg import build_plan, map_state_dict, stem_kind
from lit_attn.heads.hrnet_ocr import hrnetv2_representation
from lit_attn.models.hrnet_psa import OfficialFuseModule

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mmseg"
CKPT, IO = FIXTURES / "ocrnet_hr.pth", FIXTURES / "ocrnet_hr_io.pt"
TOL = 1e-4
ZERO_BIASES = ("decoder.conv3x3_ocr.0.bias", "decoder.aux_head.0.bias")

pytestmark = pytest.mark.skipif(not (CKPT.exists() and IO.exists()), reason="ocrnet_hr fixture not generated")


@pytest.fixture(scope="module")
def converted():
    return convert_mmseg_checkpoint(CKPT), read_checkpoint(IO)


def _outputs(model, x):
    """(logits at the input size, OCR head's cls logits, aux-head logits at stride 4) of an eval-mode hrnet_ocr."""
    with torch.no_grad():
        cls, aux, _ = model.decoder(hrnetv2_representation(model.encoder(x)[2:], model.align_corners))
        return model(x), cls, aux


def _max_abs(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def _state_dict() -> dict:
    return dict(read_checkpoint(CKPT)["state_dict"])


def _model_cfg() -> dict:
    return parse_config(read_checkpoint(CKPT)["meta"]["cfg"])["model"]


def test_matches_mmseg(converted):
    conv, io = converted
    assert conv.plan.arch == "hrnet_ocr" and conv.plan.head_type == "OCRHead" and conv.plan.mmseg_version == "1.x"
    assert conv.plan.create_kwargs == {"encoder_name": "tu-hrnet_w18_small", "encoder_weights": None,
                                       "in_channels": 3, "classes": 5, "decoder_channels": 16,
                                       "decoder_key_channels": 8, "decoder_dropout": 0.0}
    assert conv.num_tensors == len(_state_dict()) + len(ZERO_BIASES) and not conv.model.training
    assert any(all(k in n for k in ZERO_BIASES) and "set to 0" in n for n in conv.notes), conv.notes
    state = conv.model.state_dict()
    assert all(not state[k].any() for k in ZERO_BIASES)
    logits, cls, aux = _outputs(conv.model, io["input"])
    assert _max_abs(logits, io["logits"]) <= TOL
    assert torch.equal(logits.argmax(1), io["logits"].argmax(1))
    assert _max_abs(cls, io["decode_out"]) <= TOL                   # OCRHead (decode_head.1) at stride 4
    assert _max_abs(aux, io["aux_out"]) <= TOL                      # stage-1 FCNHead (decode_head.0)


def mmseg_hrmodule_forward(self, x):
    """Transcription of mmsegmentation 1.2.2 `mmseg/models/backbones/hrnet.py` `HRModule.forward` (identical in
    0.30.0) with its fuse layers' `Upsample(scale_factor=2**(j - i), mode='bilinear', align_corners=False)`
    (`mmseg/models/utils/wrappers.py`: size = int(side * factor)), on timm's module names: a lower branch is
    upsampled by 2^k, then resized to the target branch's size."""
    if self.num_branches == 1:
        return [self.branches[0](x[0])]
    x = [branch(t) for branch, t in zip(self.branches, x, strict=True)]
    x_fuse = []
    for i in range(len(self.fuse_layers)):
        y = 0
        for j in range(self.num_branches):
            if i == j:
                y = y + x[j]
            elif j > i:
                z = self.fuse_layers[i][j](x[j])
                z = F.interpolate(z, [int(t * 2 ** (j - i)) for t in z.shape[-2:]], None, "bilinear", False)
                y = y + F.interpolate(z, size=x[i].shape[2:], mode="bilinear", align_corners=False)
            else:
                y = y + self.fuse_layers[i][j](x[j])
        x_fuse.append(self.fuse_act(y))
    return x_fuse


def test_odd_size_differs_only_by_mmseg_two_step_fuse(converted):
    conv, io = converted
    x = io["input_odd"]                                             # 33x49: branches 9x13, 5x7, 3x4, 2x2
    logits, cls, aux = _outputs(conv.model, x)
    # ours = mmseg's model with a one-step bilinear fuse (its Upsample removed), everything else mmseg's
    assert _max_abs(logits, io["logits_odd_one_step_fuse"]) <= TOL
    assert _max_abs(cls, io["decode_out_odd_one_step_fuse"]) <= TOL
    assert _max_abs(aux, io["aux_out_odd_one_step_fuse"]) <= TOL
    assert _max_abs(logits, io["logits_odd"]) > 1e-3                # the documented difference is real
    model = copy.deepcopy(conv.model)
    fuses = [m for m in model.encoder.modules() if isinstance(m, OfficialFuseModule)]
    assert len(fuses) == 3                                          # stages 2, 3, 4 of hrnet_w18_small
    for m in fuses:
        m.forward = types.MethodType(mmseg_hrmodule_forward, m)
    logits, cls, aux = _outputs(model, x)
    assert _max_abs(logits, io["logits_odd"]) <= TOL
    assert _max_abs(cls, io["decode_out_odd"]) <= TOL
    assert _max_abs(aux, io["aux_out_odd"]) <= TOL


def test_mmseg_0x_layout(converted, tmp_path):
    conv1, io = converted
    meta = json.loads((FIXTURES / "ocrnet_hr_v0_meta.json").read_text())
    path = tmp_path / "ocrnet_hr18s_512x1024_80k_cityscapes.pth"
    torch.save({"meta": meta, "state_dict": _state_dict()}, path)
    conv = convert_mmseg_checkpoint(path, tmp_path / "out")
    assert conv.plan.mmseg_version == "0.30.0" and conv.plan.create_kwargs == conv1.plan.create_kwargs
    assert "config" in conv.plan.notes["decoder_dropout"]
    assert _max_abs(_outputs(conv.model, io["input"])[0], io["logits"]) <= TOL
    report = json.loads((tmp_path / "out" / "mmseg_conversion.json").read_text())
    assert report["architecture"] == "hrnet_ocr" and report["class_names"][:2] == ["road", "sidewalk"]


@pytest.mark.parametrize("tag, trunk, classes", [("hr18s", "hrnet_w18_small_v2", 19), ("hr18", "hrnet_w18", 19),
                                                 ("hr48", "hrnet_w48", 19), ("hr48_ade20k", "hrnet_w48", 150)])
def test_zoo_layouts_plan_and_map_every_key(tag, trunk, classes):
    """The full-size zoo models' keys and shapes (recorded by mmseg on the meta device) pick the right timm trunk
    and map onto hrnet_ocr completely (strict; on the meta device, no weights)."""
    import segmentation_models_pytorch as smp

    with gzip.open(FIXTURES / "ocrnet_hr_zoo_keys.json.gz", "rt") as f:
        layout = json.load(f)[tag]
    sd = {k: torch.empty(shape, device="meta") for k, shape in layout["keys"].items()}
    plan = build_plan(load_mmseg_checkpoint({"meta": {}, "state_dict": sd}))
    assert plan.create_kwargs == {"encoder_name": f"tu-{trunk}", "encoder_weights": None, "in_channels": 3,
                                  "classes": classes, "decoder_channels": 512, "decoder_key_channels": 256,
                                  "decoder_dropout": 0.0}
    with torch.device("meta"):
        model = smp.create_model(plan.arch, **plan.create_kwargs)
    state, notes = map_state_dict(plan.arch, stem_kind(sd), sd, model.state_dict())
    assert state.keys() == model.state_dict().keys() and len(state) == len(sd) + len(ZERO_BIASES)
    assert any("set to 0" in n for n in notes)


def test_missing_and_extra_keys_are_named():
    sd = _state_dict()
    head_key = "decode_head.1.object_context_block.key_project.1.bn.running_mean"
    with pytest.raises(KeyMappingError, match=r"model keys nothing maps to:\n\s+decoder\.ocr\.object_context_block"
                                              r"\.f_key\.3\.0\.running_mean"):
        convert_mmseg({k: v for k, v in sd.items() if k != head_key})
    with pytest.raises(KeyMappingError, match=r"mmseg keys that map to nothing:\n\s+decode_head\.1\.extra\.weight"):
        convert_mmseg(dict(sd, **{"decode_head.1.extra.weight": torch.zeros(1)}))
    with pytest.raises(KeyMappingError, match=r"map to nothing:\n\s+backbone\.head\.weight"):
        convert_mmseg(dict(sd, **{"backbone.head.weight": torch.zeros(1)}))
    # the trunk: the nearest timm HRNet and what differs from it
    trunk_key = "backbone.transition1.0.1.running_var"
    with pytest.raises(UnsupportedModelError, match=r"nearest hrnet_w18_small: missing transition1\.0\.1\.running_var"):
        convert_mmseg({k: v for k, v in sd.items() if k != trunk_key})
    with pytest.raises(UnsupportedModelError, match=r"extra stage4\.0\.branches\.0\.0\.conv3\.weight"):
        convert_mmseg(dict(sd, **{"backbone.stage4.0.branches.0.0.conv3.weight": torch.zeros(16, 16, 1, 1)}))


def _with_model_cfg(edit) -> dict:
    model = _model_cfg()
    edit(model)
    return {"meta": {"cfg": {"model": model}}, "state_dict": _state_dict()}


def test_refusals_and_settings():
    def stage1_dropout(m):
        m["decode_head"][0]["dropout_ratio"] = 0.1

    def select(m):
        m["decode_head"][1]["input_transform"] = "multiple_select"

    def corners(m):
        m["decode_head"][1]["align_corners"] = True

    for edit, words in ((stage1_dropout, "decode_head.0 (FCNHead) dropout_ratio=0.1"),
                        (select, "input_transform='multiple_select'"), (corners, "align_corners=True")):
        with pytest.raises(UnsupportedModelError, match=words.replace("(", r"\(").replace(")", r"\)")):
            convert_mmseg(_with_model_cfg(edit))

    def ocr_dropout(m):                                             # the same place as hrnet_ocr's: before cls_head
        m["decode_head"][1]["dropout_ratio"] = 0.1

    conv = convert_mmseg_checkpoint(_with_model_cfg(ocr_dropout))
    assert conv.plan.create_kwargs["decoder_dropout"] == 0.1
    sd = _state_dict()
    with pytest.raises(UnsupportedModelError, match="--output-stride 8"):
        convert_mmseg(sd, output_stride=8)
    with pytest.raises(UnsupportedModelError, match="OCRHead on a ResNet is ocrnet"):
        convert_mmseg(sd, arch="ocrnet")
    assert isinstance(convert_mmseg(sd, arch="ocrnet_hr"), torch.nn.Module)
    fcn = {k.replace("decode_head.0.", "decode_head."): v for k, v in sd.items() if not k.startswith("decode_head.1.")}
    with pytest.raises(UnsupportedModelError, match="FCNHead on an HRNet backbone"):   # mmseg's fcn_hr18
        convert_mmseg(fcn)


def test_cli(tmp_path, capsys, converted):
    import segmentation_models_pytorch as smp

    _, io = converted
    code = convert_main(["mmseg", str(CKPT), str(tmp_path / "out"), "--arch", "hrnet_ocr"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "OCRHead" in text and "-> hrnet_ocr" in text and "tu-hrnet_w18_small" in text and "set to 0" in text
    model = smp.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        assert _max_abs(model(io["input"]), io["logits"]) <= TOL
