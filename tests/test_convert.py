"""mmsegmentation checkpoints -> lit_attn smp models (`lit_attn.convert`, `lit-attn convert mmseg`).

Equivalence against mmseg itself comes from tests/fixtures/mmseg (made by mmsegmentation 1.2.2 in a scratch
environment, see its README): for each fixture present, the converted model's logits must match mmseg's within
1e-4 with the same argmax, and its decode / auxiliary heads their outputs. mmseg is not needed here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lit_attn  # noqa: F401  (registers the smp architectures)
from lit_attn.convert import (
    ConvertError,
    CorruptCheckpointError,
    KeyMappingError,
    NotMMSegCheckpointError,
    UnsupportedModelError,
    convert_mmseg,
    convert_mmseg_checkpoint,
    load_mmseg_checkpoint,
    read_checkpoint,
)
from lit_attn.convert.cli import main as convert_main
from lit_attn.convert.config import UNKNOWN, parse_config
from lit_attn.layers.dnl import DisentangledNonLocal2d

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "mmseg"
ARCH = {"fcn": "attnfcn", "danet": "danet", "ccnet": "ccnet", "isanet": "isanet", "emanet": "emanet",
        "nonlocal": "nlnet", "dnl": "dnlnet", "gcnet": "gcnet", "ocrnet": "ocrnet", "psanet": "psanet",
        "apcnet": "apcnet", "ann": "ann", "dnl_v0": "dnlnet"}
TOL = 1e-4
_CACHE: dict[str, object] = {}


def _paths(name: str) -> tuple[Path, Path]:
    ckpt, io = FIXTURES / f"{name}.pth", FIXTURES / f"{name}_io.pt"
    if name == "dnl_v0" and not io.exists():  # same weights, input and logits as `dnl`
        io = FIXTURES / "dnl_io.pt"
    if not (ckpt.exists() and io.exists()):
        pytest.skip(f"fixture {name} not generated yet ({ckpt.name})")
    return ckpt, io


def _converted(name: str):
    """(Conversion, io dict) of a fixture, converted once per session."""
    if name not in _CACHE:
        ckpt, io = _paths(name)
        _CACHE[name] = (convert_mmseg_checkpoint(ckpt), read_checkpoint(io))
    return _CACHE[name]


def _heads(model, x):
    """(logits at input size, decode-head output, aux-head output) of an eval-mode converted model."""
    feats = model.encoder(x)
    aux = model.auxiliary_head(feats[-2]) if model.auxiliary_head is not None else None
    if model.inputs == "ocr":
        dec = model.decoder(feats[-1], aux)
    elif model.inputs == "last2":
        dec = model.decoder(feats[-2], feats[-1])
    else:
        dec = model.decoder(feats[-1])
    return model(x), dec, aux


def _max_abs(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("name", list(ARCH))
def test_fixture_matches_mmseg(name):
    conv, io = _converted(name)
    assert conv.plan.arch == ARCH[name]
    model = conv.model
    assert not model.training
    with torch.no_grad():
        logits, dec, aux = _heads(model, io["input"])
    assert _max_abs(logits, io["logits"]) <= TOL
    assert torch.equal(logits.argmax(1), io["logits"].argmax(1))
    assert _max_abs(dec, io["decode_out"]) <= TOL
    assert _max_abs(aux, io["aux_out"]) <= TOL                     # OCRNet: its stage-1 FCN head
    if name == "danet":                                             # the two training-only classifiers too
        with torch.no_grad():
            pam, cam = model.decoder.branch_features(model.encoder(io["input"])[-1])
            assert _max_abs(model.decoder.pam_cls_seg(pam), io["decode_out_pam"]) <= TOL
            assert _max_abs(model.decoder.cam_cls_seg(cam), io["decode_out_cam"]) <= TOL
    if "input_even" in io:                                          # PSANet's even-size branch
        with torch.no_grad():
            logits, dec, aux = _heads(model, io["input_even"])
        assert _max_abs(logits, io["logits_even"]) <= TOL
        assert torch.equal(logits.argmax(1), io["logits_even"].argmax(1))
        assert _max_abs(dec, io["decode_out_even"]) <= TOL


def test_widths_and_settings_come_from_the_checkpoint():
    conv, _ = _converted("psanet")
    kw = conv.plan.create_kwargs
    assert kw["encoder_name"] == "tu-resnet50c" and kw["encoder_output_stride"] == 8
    assert (kw["stem_width"], kw["channels"], kw["classes"], kw["decoder_channels"], kw["aux_channels"]) == (
        4, (4, 8, 16, 32), 5, 32, 16)
    assert kw["decoder_kwargs"]["mask_size"] == (11, 9)             # not square: from the config in meta
    assert "config" in conv.plan.notes["output_stride"]
    conv, _ = _converted("emanet")
    assert conv.plan.create_kwargs["decoder_kwargs"] == {"ema_channels": 32, "num_bases": 8, "num_stages": 3,
                                                         "momentum": 0.1, "concat_input": True}


def test_dnl_v0_is_the_sum_form_and_per_term_would_fail():
    """Every released mmseg (0.30 here, 0.x layout) applies conv_out once to pairwise + unary; the per-term form
    (one BN shift more) does not reproduce it, so the fixture test above would fail with it."""
    ckpt, io_path = _paths("dnl_v0")
    io = read_checkpoint(io_path)
    conv, _ = _converted("dnl_v0")
    assert conv.plan.mmseg_version == "0.30.0"
    assert conv.plan.create_kwargs["decoder_kwargs"]["conv_out_form"] == "sum"
    assert convert_mmseg(ckpt, dnl_form="0.x").decoder.attn.conv_out_form == "sum"
    per_term = convert_mmseg(ckpt, dnl_form="per_term")
    assert per_term.decoder.attn.conv_out_form == "per_term"
    with torch.no_grad():
        assert _max_abs(per_term(io["input"]), io["logits"]) > 100 * TOL


def test_dnl_per_term_form_matches_naive_transcription():
    """x + BN(conv_out(pairwise)) + BN(conv_out(unary)), written out with an explicit (N, N) softmax, float64."""
    torch.manual_seed(1)
    blk = DisentangledNonLocal2d(16, mode="mmseg", conv_out_form="per_term", dtype=torch.float64)
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.3)
        blk.conv_out.bn.running_mean.normal_(0, 0.5)
        blk.conv_out.bn.running_var.uniform_(0.5, 1.5)
    blk.eval()
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    b, _, h, w = x.shape

    def conv(m, t):
        return F.conv2d(t, m.weight, m.bias)

    def bn(t):
        m = blk.conv_out.bn
        return (t - m.running_mean[:, None, None]) / (m.running_var[:, None, None] + m.eps).sqrt() \
            * m.weight[:, None, None] + m.bias[:, None, None]

    q = conv(blk.theta.conv, x).flatten(2).transpose(1, 2)
    k = conv(blk.phi.conv, x).flatten(2)
    v = conv(blk.g.conv, x).flatten(2).transpose(1, 2)
    q, k = q - q.mean(1, keepdim=True), k - k.mean(2, keepdim=True)
    attn = torch.softmax(q @ k / q.shape[-1] ** 0.5 / 0.05, dim=-1)
    y = (attn @ v).transpose(1, 2).reshape(b, -1, h, w)
    unary = (torch.softmax(conv(blk.conv_mask, x).flatten(1), -1)[:, None] @ v).transpose(1, 2)[..., None]
    ref = x + bn(F.conv2d(y, blk.conv_out.conv.weight)) + bn(F.conv2d(unary, blk.conv_out.conv.weight))
    torch.testing.assert_close(blk(x), ref, rtol=1e-9, atol=1e-9)
    blk.conv_out_form = "sum"                                      # the other form: one BN shift less
    assert not torch.allclose(blk(x), ref, atol=1e-3)
    with pytest.raises(ValueError, match="conv_out_form"):
        DisentangledNonLocal2d(16, mode="mmseg", conv_out_form="0.x")


def test_from_pretrained_in_a_new_process(tmp_path):
    """The written folders load strictly with smp.from_pretrained in a fresh interpreter (after `import lit_attn`)
    and give the converted model's logits."""
    names = [n for n in ARCH if (FIXTURES / f"{n}.pth").exists() and n != "dnl_v0"]
    if not names:
        pytest.skip("no fixtures generated yet")
    expected = {}
    for i, name in enumerate(names):
        conv, io = _converted(name)
        out = tmp_path / name
        if i == 0:  # the converter's own writing (save_pretrained + report, checked by reloading)
            convert_mmseg(FIXTURES / f"{name}.pth", out)
            assert {"config.json", "model.safetensors", "mmseg_conversion.json"} <= {p.name for p in out.iterdir()}
        else:       # the same save_pretrained, without the converter's in-process reload check
            conv.model.save_pretrained(out)
        x = io["input"][..., :33, :41]  # a smaller (still odd) input than the fixture's: a faster new process
        with torch.no_grad():
            expected[name] = conv.model(x)
        torch.save({"input": x, "logits": expected[name]}, out / "expected.pt")
    child = (
        "import sys, torch, lit_attn, segmentation_models_pytorch as smp\n"
        "for folder in sys.argv[1:]:\n"
        "    m = smp.from_pretrained(folder).eval()\n"
        "    d = torch.load(folder + '/expected.pt', weights_only=True)\n"
        "    with torch.no_grad():\n"
        "        diff = (m(d['input']) - d['logits']).abs().max().item()\n"
        "    print(folder.rsplit('/', 1)[-1], type(m).__name__, diff)\n")
    proc = subprocess.run([sys.executable, "-c", child, *(str(tmp_path / n) for n in names)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line and not line.startswith("Loading")]
    assert [r[0] for r in rows] == names
    assert all(float(r[2]) == 0.0 for r in rows), rows
    report = json.loads((tmp_path / names[0] / "mmseg_conversion.json").read_text())
    assert report["architecture"] == ARCH[names[0]] and report["tensors"] > 300


# --------------------------------------------------------------------------------------------- errors
def _state_dict(name: str = "fcn") -> dict:
    ckpt, _ = _paths(name)
    return dict(read_checkpoint(ckpt)["state_dict"])


def _backbone(name: str = "fcn") -> dict:
    return {k: v for k, v in _state_dict(name).items() if k.startswith(("backbone.", "auxiliary_head."))}


def _cli(capsys, *argv) -> tuple[int, str]:
    code = convert_main(["mmseg", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def test_cli_converts(tmp_path, capsys):
    import segmentation_models_pytorch as smp

    from lit_attn.checkpoints import check_checkpoint_fits, load_checkpoint
    from lit_attn.tasks import SegmentationTask

    ckpt, _ = _paths("fcn")
    lightning = tmp_path / "fcn.ckpt"
    code, text = _cli(capsys, ckpt, tmp_path / "out", "--arch", "fcn", "--lightning-ckpt", lightning)
    assert code == 0, text
    assert "FCNHead" in text and "attnfcn" in text and "output_stride: config" in text
    code, text = _cli(capsys, ckpt, tmp_path / "out")                 # never overwrites silently
    assert code == 1 and "not empty" in text and "--overwrite" in text
    assert _cli(capsys, ckpt, tmp_path / "out", "--overwrite")[0] == 0
    # the Lightning checkpoint fits a SegmentationTask built with the same widths (what `lit-attn test` restores)
    kwargs = json.loads((tmp_path / "out" / "mmseg_conversion.json").read_text())["create_model"]
    task = SegmentationTask(smp.create_model("attnfcn", **kwargs), num_classes=5)
    state = load_checkpoint(lightning)
    check_checkpoint_fits(task, state)
    task.load_state_dict(state["state_dict"], strict=True)
    with pytest.raises(ValueError, match="does not fit"):             # other widths: a clear refusal
        check_checkpoint_fits(SegmentationTask(smp.create_model("attnfcn", **dict(kwargs, decoder_channels=8)),
                                               num_classes=5), state)


@pytest.mark.parametrize("content", [b"definitely not a checkpoint\n", "truncated"])
def test_corrupt_file(tmp_path, capsys, content):
    bad = tmp_path / "bad.pth"
    if content == "truncated":
        ckpt, _ = _paths("fcn")
        data = ckpt.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.write_bytes(content)
    with pytest.raises(CorruptCheckpointError, match="not a readable PyTorch checkpoint"):
        convert_mmseg(bad)
    code, text = _cli(capsys, bad, tmp_path / "out")
    assert code == CorruptCheckpointError.exit_code and "error (corrupt)" in text and "Traceback" not in text
    assert not (tmp_path / "out").exists()
    code, text = _cli(capsys, tmp_path / "missing.pth", tmp_path / "out")
    assert code == CorruptCheckpointError.exit_code and "no such checkpoint file" in text


def test_not_mmseg_checkpoints(tmp_path, capsys):
    import timm

    timm_file = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), timm_file)
    with pytest.raises(NotMMSegCheckpointError, match="timm or torchvision"):
        convert_mmseg(timm_file)
    lightning_file = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"model.encoder.conv1.weight": torch.zeros(1)}, "pytorch-lightning_version": "2.5.0",
                "hyper_parameters": {"num_classes": 3}, "epoch": 1}, lightning_file)
    with pytest.raises(NotMMSegCheckpointError, match="Lightning checkpoint"):
        convert_mmseg(lightning_file)
    pickled = tmp_path / "objects.pth"
    torch.save({"state_dict": {}, "fn": print}, pickled)
    with pytest.raises(NotMMSegCheckpointError, match="builtins.print"):  # never unpickled
        convert_mmseg(pickled)
    for path, words in ((timm_file, "timm"), (lightning_file, "Lightning")):
        code, text = _cli(capsys, path, tmp_path / "out")
        assert code == NotMMSegCheckpointError.exit_code and "error (not-mmseg)" in text and words in text
        assert "Traceback" not in text


@pytest.mark.parametrize("head, keys", [
    ("PSPHead (PSPNet)", ["psp_modules.0.1.conv.weight", "bottleneck.conv.weight"]),
    ("ASPPHead (DeepLabV3)", ["image_pool.1.conv.weight", "aspp_modules.0.conv.weight", "bottleneck.conv.weight"]),
    ("UPerHead (UPerNet)", ["psp_modules.0.1.conv.weight", "lateral_convs.0.conv.weight", "fpn_convs.0.conv.weight",
                            "fpn_bottleneck.conv.weight"]),
])
def test_unsupported_heads(tmp_path, capsys, head, keys):
    sd = _backbone()
    sd.update({f"decode_head.{k}": torch.zeros(4, 4, 1, 1) for k in keys})
    sd["decode_head.conv_seg.weight"] = torch.zeros(5, 4, 1, 1)
    with pytest.raises(UnsupportedModelError, match=r"unsupported decode head.*" + head.split()[0]):
        convert_mmseg({"meta": {}, "state_dict": sd})
    path = tmp_path / "other.pth"
    torch.save({"meta": {"mmseg_version": "0.30.0"}, "state_dict": sd}, path)
    code, text = _cli(capsys, path, tmp_path / "out")
    assert code == UnsupportedModelError.exit_code and "error (unsupported)" in text and head in text
    assert "DNLHead (dnlnet)" in text and "Traceback" not in text


def test_cli_entry_point_without_traceback(tmp_path, capsys, monkeypatch):
    """`lit-attn convert` is dispatched by lit_attn.cli.main before LightningCLI; an expected error exits non-zero
    with one line and no traceback."""
    from lit_attn.cli import main

    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"nope")
    monkeypatch.setattr(sys, "argv", ["lit-attn", "convert", "mmseg", str(bad), str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == CorruptCheckpointError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("lit-attn convert: error (corrupt): ") and len(err.splitlines()) == 1


def test_mapping_errors_list_the_keys():
    sd = _state_dict("nonlocal")
    extra = dict(sd, **{"decode_head.nl_block.extra.weight": torch.zeros(1)})
    with pytest.raises(KeyMappingError, match=r"1 mmseg keys that map to nothing:\n\s+decode_head.nl_block.extra"):
        convert_mmseg({"meta": {}, "state_dict": extra})
    missing = {k: v for k, v in sd.items() if not k.startswith("decode_head.nl_block.phi.")}
    with pytest.raises(KeyMappingError, match=r"model keys nothing maps to:\n\s+decoder.attn.phi"):
        convert_mmseg({"meta": {}, "state_dict": missing})
    with pytest.raises(UnsupportedModelError, match="--arch danet"):
        convert_mmseg({"meta": {}, "state_dict": sd}, arch="danet")
    assert isinstance(convert_mmseg({"meta": {}, "state_dict": sd}, arch="nonlocal"), torch.nn.Module)
    counters = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # old checkpoints
    conv = convert_mmseg_checkpoint({"meta": {}, "state_dict": counters})
    assert any("num_batches_tracked" in n for n in conv.notes)


def test_bare_state_dict_and_defaults():
    """A bare mmseg state dict converts; without a config the output stride is mmseg's D8 (or --output-stride)."""
    sd = _state_dict("fcn")
    conv = convert_mmseg_checkpoint(sd)
    assert conv.plan.create_kwargs["encoder_output_stride"] == 8 and "default" in conv.plan.notes["output_stride"]
    assert convert_mmseg_checkpoint(sd, output_stride=16).plan.create_kwargs["encoder_output_stride"] == 16
    no_aux = {k: v for k, v in sd.items() if not k.startswith("auxiliary_head.")}
    assert convert_mmseg(no_aux).auxiliary_head is None
    with pytest.raises(NotMMSegCheckpointError, match="no backbone"):
        load_mmseg_checkpoint({"state_dict": {k: v for k, v in sd.items() if k.startswith("decode_head.")}})


def test_metadata_objects_are_read_inertly(tmp_path, monkeypatch):
    """numpy scalars in meta and mmengine HistoryBuffers in message_hub (real 0.x / 1.x training checkpoints) load
    with weights_only=True as inert placeholders; the weights are untouched."""
    import numpy as np

    module = types.ModuleType("mmengine.logging.history_buffer")

    class HistoryBuffer:
        def __init__(self):
            self._log_history = np.array([1.0, 2.0])

    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = module.__name__, "HistoryBuffer"
    module.HistoryBuffer = HistoryBuffer
    for name in ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer"):
        monkeypatch.setitem(sys.modules, name, module if name.endswith("buffer") else types.ModuleType(name))
    sd = _state_dict("fcn")
    payload = {"meta": {"mmseg_version": "0.30.0", "hook_msgs": {"best_score": np.float64(0.7)}},
               "state_dict": sd, "message_hub": {"loss": HistoryBuffer()}}
    path, legacy = tmp_path / "training.pth", tmp_path / "legacy.pth"
    torch.save(payload, path)
    torch.save(payload, legacy, _use_new_zipfile_serialization=False)  # torch < 1.6 files, as 2020 zoo ones
    monkeypatch.delitem(sys.modules, "mmengine.logging.history_buffer")  # the real class cannot even be imported
    for file in (path, legacy):
        obj = read_checkpoint(file)
        assert "not loaded" in repr(obj["message_hub"]["loss"])
        assert "not loaded" in repr(obj["meta"]["hook_msgs"]["best_score"])
        assert all(torch.equal(obj["state_dict"][k], v) for k, v in sd.items())
    assert convert_mmseg_checkpoint(legacy).plan.mmseg_version == "0.30.0"


def test_config_text_is_parsed_not_executed():
    text = ("norm_cfg = dict(type='SyncBN', requires_grad=True)\n"
            "model = dict(type='EncoderDecoder', backbone=dict(type='ResNetV1c', strides=(1, 2, 1, 1), "
            "dilations=(1, 1, 2, 4), norm_cfg=norm_cfg), decode_head=dict(type='CCHead', recurrence=3, "
            "sizes=[i for i in range(3)], evil=__import__('os').system('false'), neg=-1))\n")
    cfg = parse_config(text)
    head = cfg["model"]["decode_head"]
    assert cfg["model"]["backbone"]["norm_cfg"] == {"type": "SyncBN", "requires_grad": True}
    assert head["recurrence"] == 3 and head["neg"] == -1
    assert head["sizes"] is UNKNOWN and head["evil"] is UNKNOWN
    assert parse_config("not python (") == {}


def test_errors_are_convert_errors():
    for cls in (CorruptCheckpointError, NotMMSegCheckpointError, UnsupportedModelError, KeyMappingError):
        assert issubclass(cls, ConvertError) and cls.exit_code != 0


def test_d16_config_gives_output_stride_16(tmp_path):
    """mmseg's D16 configs (strides (1, 2, 2, 1), dilations (1, 1, 1, 2)) convert at encoder_output_stride 16."""
    import re

    ckpt = torch.load(_paths("fcn")[0], weights_only=True)
    cfg = ckpt["meta"]["cfg"]
    cfg = re.sub(r"dilations=\(\s*1,\s*1,\s*2,\s*4,\s*\)", "dilations=(1, 1, 1, 2)", cfg)
    cfg = re.sub(r"strides=\(\s*1,\s*2,\s*1,\s*1,\s*\)", "strides=(1, 2, 2, 1)", cfg)
    assert "dilations=(1, 1, 1, 2)" in cfg and "strides=(1, 2, 2, 1)" in cfg
    ckpt["meta"]["cfg"] = cfg
    conv = convert_mmseg_checkpoint(ckpt)
    assert conv.plan.create_kwargs["encoder_output_stride"] == 16
    x = torch.randn(1, 3, 65, 81)
    feats = conv.model.encoder(x)
    assert feats[-1].shape[-2:] == (5, 6)  # 65x81 at stride 16 (ceil through the stride-2 convs)
