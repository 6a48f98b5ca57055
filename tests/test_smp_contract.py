"""smp's model contract for lit_attn's 14 smp architectures: our own checks in the spirit of smp's
`tests/models/base.py` (BaseModelTester: forward_backward, any_resolution, in_channels / encoder_depth / classes,
classification_head, save_load_with_hub_mixin, compile, torch_export, torch_script), checking values as well as
shapes, plus the opt-in auxiliary outputs (`forward_with_aux`) that `SegmentationTask` trains with.

Small models (timm's test ResNet, head widths 16, 64x64 inputs). The capability flags are checked both ways: a
capability a flag claims must work, one it denies must still fail (so a fix shows up as a flag to flip in
`lit_attn.integrations.smp.CAPABILITIES`). torch.compile, and torch.export beyond three architectures, run only
with --runslow or LIT_ATTN_RUN_SLOW=1 (3-5 s per architecture each on 2 CPU cores).
"""
import warnings

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from helpers import onnx_bytes, slow_unless
from torch import nn

import lit_attn  # noqa: F401  (registers the architectures in smp)
from lit_attn.heads.danet import DAHead
from lit_attn.integrations.smp import ARCHITECTURES, CAPABILITIES
from lit_attn.tasks import SegmentationTask

ARCHS = sorted(ARCHITECTURES)
ENCODER = "tu-test_resnet.r160_in1k"  # timm's 0.8 M-parameter test ResNet (smp's own tests use it)
slow = pytest.mark.slow
# parameters a model holds frozen (requires_grad=False): none (EMA's frozen mid conv is a pair of buffers)
FROZEN = set()


def create(arch, **kwargs):
    torch.manual_seed(0)
    kwargs = {"encoder_name": ENCODER, "encoder_weights": None, "classes": 3, "decoder_channels": 16,
              "aux_channels": 16, **kwargs}
    return smp.create_model(arch, **kwargs)


def sample(b=1, c=3, h=64, w=64):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(1))


def up(t, x):
    return F.interpolate(t, size=x.shape[-2:], mode="bilinear", align_corners=False)


def reference(model, x):
    """(main, *extra, aux) logits at the input size, recomputed from the model's parts in eval mode (before the
    activation): the decode head on the last stage (ANN: the last two; OCRNet: with the auxiliary head's logits),
    DANet's pam / cam classifiers, the auxiliary FCN head on the stage before the last."""
    assert not model.training
    feats = model.encoder(x)
    aux = model.auxiliary_head(feats[-2]) if model.auxiliary_head is not None else None
    if model.arch == "ocrnet":
        outs = [model.decoder(feats[-1], aux)]
    elif model.arch == "ann":
        outs = [model.decoder(feats[-2], feats[-1])]
    else:
        outs = [model.decoder(feats[-1])]
    if isinstance(model.decoder, DAHead):
        pam_feat, cam_feat = model.decoder.branch_features(feats[-1])
        outs += [model.decoder.pam_conv_seg(pam_feat), model.decoder.cam_conv_seg(cam_feat)]
    if aux is not None:
        outs.append(aux)
    return [up(o, x) for o in outs]


def no_grad_params(model):
    return {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward(arch):
    """Training mode: `model(x)` is one Tensor (smp's default classes=1), so `criterion(model(x), y)` works; its
    backward reaches every parameter but the auxiliary outputs' (computed by `forward_with_aux` only), and
    `forward_with_aux`'s reaches every parameter that requires grad."""
    model = create(arch, classes=1).train()
    x = sample(2)  # APCNet's ACM normalises a 1x1 map: batch >= 2 in training (as smp's PSPNet test)
    out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1, 64, 64)
    out.mean().backward()
    unused = {n for n, _ in model.named_parameters() if n.startswith("auxiliary_head.")} if arch != "ocrnet" else set()
    if arch == "danet":
        unused |= {n for n, _ in model.named_parameters() if n.startswith(("decoder.pam_conv_seg", "decoder.cam_conv"))}
    assert no_grad_params(model) == unused
    model.zero_grad(set_to_none=True)
    outs = model.forward_with_aux(x)
    assert isinstance(outs, tuple) and len(outs) == 1 + len(model.aux_loss_weights)
    assert all(o.shape == (2, 1, 64, 64) for o in outs)
    sum(o.mean() for o in outs).backward()
    assert no_grad_params(model) == set()
    assert {n for n, p in model.named_parameters() if not p.requires_grad} <= FROZEN
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_outputs_are_the_heads_logits_at_any_resolution(arch):
    """Eval mode at an odd size (requires_divisible_input_shape is False): `model(x)` equals the decode head's
    logits resized to the input, `forward_with_aux(x)` every output's, and no auxiliary output is computed by
    `model(x)` (OCRNet's auxiliary head excepted: its decode head takes those logits)."""
    model = create(arch, activation="identity").eval()
    assert model.requires_divisible_input_shape is False
    x = sample(1, h=65, w=81)
    calls = []
    if model.auxiliary_head is not None:
        model.auxiliary_head.register_forward_hook(lambda *a: calls.append("aux"))
    with torch.no_grad():
        expected = reference(model, x)
        calls.clear()
        out = model(x)
        assert calls == (["aux"] if arch == "ocrnet" else [])
        outs = model.forward_with_aux(x)
    assert out.shape == (1, 3, 65, 81)
    torch.testing.assert_close(out, expected[0], rtol=0, atol=0)
    assert len(outs) == len(expected) == 1 + len(model.aux_loss_weights)
    for o, e in zip(outs, expected, strict=True):
        torch.testing.assert_close(o, e, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["nlnet", "danet", "ocrnet"])
def test_activation_applies_to_the_main_logits(arch):
    model = create(arch, activation="sigmoid").eval()
    x = sample()
    with torch.no_grad():
        expected = reference(model, x)
        out, outs = model(x), model.forward_with_aux(x)
    torch.testing.assert_close(out, expected[0].sigmoid())
    torch.testing.assert_close(outs[0], out)
    for o, e in zip(outs[1:], expected[1:], strict=True):  # auxiliary logits stay logits (they feed the loss)
        torch.testing.assert_close(o, e)


@pytest.mark.parametrize("depth", [3, 4, 5])
@pytest.mark.parametrize("arch", ARCHS)
def test_in_channels_depth_and_classes(arch, depth):
    """Every smp encoder depth: the decode head takes the deepest stage, the auxiliary head the one before, both
    with the encoder's channel counts; in_channels and classes as asked."""
    model = create(arch, in_channels=1, classes=7, encoder_depth=depth).eval()
    chans = model.encoder.out_channels
    assert len(chans) == depth + 1 and chans[0] == 1
    head_in = (chans[-2], chans[-1]) if arch == "ann" else chans[-1]
    assert model.decoder.in_channels == head_in
    assert model.auxiliary_head.in_channels == chans[-2]
    x = sample(1, c=1)
    with torch.no_grad():
        out, outs, expected = model(x), model.forward_with_aux(x), reference(model, x)
    assert out.shape == (1, 7, 64, 64)
    torch.testing.assert_close(out, expected[0], rtol=0, atol=0)
    assert [o.shape for o in outs] == [(1, 7, 64, 64)] * (1 + len(model.aux_loss_weights))


@pytest.mark.parametrize("arch", ["nlnet", "danet", "ann", "ocrnet"])
def test_encoder_depth_without_a_stage_before_the_last(arch):
    """encoder_depth=1 (one stage): the auxiliary head is turned off with a warning; ANN (two stages) and OCRNet
    (a cascade on the auxiliary head) refuse it, naming what they need."""
    if arch in ("ann", "ocrnet"):
        with pytest.raises(ValueError, match="needs .* use a larger encoder_depth"):
            create(arch, encoder_depth=1)
        return
    with pytest.warns(UserWarning, match="no stage before the last for the auxiliary FCN head; it is turned off"):
        model = create(arch, encoder_depth=1)
    assert model.auxiliary_head is None
    assert model.aux_loss_weights == ((1.0, 1.0) if arch == "danet" else ())
    model.eval()
    with torch.no_grad():
        assert model(sample()).shape == (1, 3, 64, 64)
    with warnings.catch_warnings():  # depth 2: the stem's map is a stage: no warning
        warnings.simplefilter("error")
        model = create(arch, encoder_depth=2)
    assert model.auxiliary_head.in_channels == model.encoder.out_channels[1]


@pytest.mark.parametrize("arch", ARCHS)
def test_classification_head(arch):
    """smp's aux_params: `classification_head` on the last stage (smp's layers and init), `forward` returns
    (mask, label) in both modes as smp's SegmentationModel; the mask is the one without aux_params."""
    aux_params = {"pooling": "avg", "classes": 10, "dropout": 0.5, "activation": "sigmoid"}
    model = create(arch, aux_params=aux_params).eval()
    head = model.classification_head
    assert isinstance(head[0], nn.AdaptiveAvgPool2d) and isinstance(head[1], nn.Flatten)
    assert isinstance(head[2], nn.Dropout) and head[2].p == 0.5
    assert isinstance(head[3], nn.Linear) and head[3].in_features == model.encoder.out_channels[-1]
    assert isinstance(head[4].activation, nn.Sigmoid)
    assert not head[3].bias.any()  # smp's initialize_head: xavier weight, zero bias
    plain = create(arch).eval()
    x = sample(2)
    with torch.no_grad():
        mask, label = model(x)
        torch.testing.assert_close(label, head(model.encoder(x)[-1]))
        torch.testing.assert_close(mask, plain(x))  # same seed: the classification head is built last
        torch.testing.assert_close(model.forward_with_aux(x)[0], mask)
    assert label.shape == (2, 10) and ((label > 0) & (label < 1)).all()
    model.train()
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 2 and out[1].shape == (2, 10)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_with_hub_mixin(arch, tmp_path):
    model = create(arch, aux_params={"classes": 4}).eval()
    with torch.no_grad():  # random running stats, so the round trip also covers the buffers
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path, dataset="digits", metrics={"mIoU": 0.5})
    readme = (tmp_path / "README.md").read_text()
    assert "digits" in readme and "mIoU" in readme
    loaded = smp.from_pretrained(str(tmp_path)).eval()
    assert type(loaded) is type(model) and loaded.aux_loss_weights == model.aux_loss_weights
    x = sample()
    with torch.no_grad():
        for a, b in zip(loaded(x), model(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for a, b in zip(loaded.forward_with_aux(x), model.forward_with_aux(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_segmentation_task_trains_on_forward_with_aux(arch):
    """SegmentationTask's loss is the main loss plus each auxiliary output of `forward_with_aux` times its
    `aux_loss_weights` entry (eval mode here: deterministic outputs to compare with)."""
    model = create(arch).eval()
    task = SegmentationTask(model, num_classes=3)
    task.log = lambda *a, **k: None
    g = torch.Generator().manual_seed(0)
    batch = {"image": sample(2, h=48, w=40), "mask": torch.randint(0, 3, (2, 48, 40), generator=g)}
    with torch.no_grad():
        loss = task.training_step(batch, 0)
        outs = model.forward_with_aux(batch["image"])
    weights = (1.0, *model.aux_loss_weights)
    expected = sum(w * F.cross_entropy(o, batch["mask"], ignore_index=255) for w, o in zip(weights, outs, strict=True))
    torch.testing.assert_close(loss, expected)


def test_segmentation_task_trains_plain_tensor_models():
    """A model without forward_with_aux (smp's Unet) trains on `model(x)` alone."""
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 8), classes=3)
    task = SegmentationTask(model, num_classes=3)
    task.log = lambda *a, **k: None
    batch = {"image": sample(2), "mask": torch.randint(0, 3, (2, 64, 64), generator=torch.Generator().manual_seed(0))}
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(task.training_step(batch, 0), F.cross_entropy(model(batch["image"]), batch["mask"]))
    model.train()
    task.training_step(batch, 0).backward()
    assert all(p.grad is not None for p in [*model.decoder.parameters(), *model.segmentation_head.parameters()])
    unet = smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 8), classes=3,
                    aux_params={"classes": 2})
    with pytest.raises(ValueError, match="aux_params"):  # (mask, label): the label has no loss here
        SegmentationTask(unet, num_classes=3).training_step(batch, 0)


@pytest.mark.parametrize("arch", ARCHS)
def test_capability_flags_as_smp_reads_them(arch):
    cls = smp.MODEL_ARCHITECTURES_MAPPING[arch]
    scriptable, exportable, compilable = CAPABILITIES[arch]
    assert (cls._is_torch_scriptable, cls._is_torch_exportable, cls._is_torch_compilable) == CAPABILITIES[arch]
    assert cls.requires_divisible_input_shape is False


@pytest.mark.parametrize("arch", ARCHS)
def test_torch_script(arch):
    model = create(arch).eval()
    if not model._is_torch_scriptable:
        with pytest.raises(RuntimeError, match="cannot be scripted with TorchScript yet"):  # smp's test expects it
            torch.jit.script(model)
        model._is_torch_scriptable = True  # past the model's guard: TorchScript itself must still fail
        with pytest.raises(Exception):  # noqa: B017  (RuntimeError or TorchScript's frontend errors)
            torch.jit.script(model)
        return
    scripted = torch.jit.script(model)
    x = sample()
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", slow_unless(ARCHS, ("danet", "ann", "ocrnet")))
def test_torch_export(arch):
    """torch.export (strict, as smp's test), 3-5 s per architecture: by default the three input modes (DANet's
    extra outputs, ANN's two stages, OCRNet's cascade), every architecture with LIT_ATTN_RUN_SLOW=1."""
    model = create(arch).eval()
    x = sample()
    if not model._is_torch_exportable:
        with pytest.raises(Exception):  # noqa: B017
            torch.export.export(model, (x,), strict=True)
        return
    exported = torch.export.export(model, (x,), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)


@slow
@pytest.mark.parametrize("arch", ARCHS)
def test_compile(arch):
    """torch.compile as smp's test (fullgraph, dynamic shapes, eager backend), at two sizes."""
    model = create(arch).eval()
    torch.compiler.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")
    if not model._is_torch_compilable:
        with pytest.raises(Exception):  # noqa: B017
            compiled(sample())
        return
    with torch.no_grad():
        for x in (sample(), sample(1, h=65, w=81)):
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


ONNX_SIZES = ((64, 64), (96, 80))


def check_onnx(arch: str, dynamo: bool) -> None:
    """ONNX export with dynamic H, W, run in onnxruntime at the export size and another: the logits match PyTorch
    to 1e-4 (scaled by the logits' magnitude)."""
    ort = pytest.importorskip("onnxruntime")
    model = create(arch).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():   # non-zero gammas / zero-init norms, so that every block computes
        for p in model.parameters():
            if p.ndim <= 1 and torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    xs = [sample(h=h, w=w) for h, w in ONNX_SIZES]
    dynamic = True
    if dynamo and arch in DYNAMO_STATIC_ONLY:   # refused with dynamic H, W (a clear error): exported at one size
        with pytest.raises(Exception, match="constraint"):  # noqa: B017
            onnx_bytes(model, xs[0], dynamo)
        dynamic, xs = False, xs[:1]
    blob = onnx_bytes(model, xs[0], dynamo, dynamic=dynamic)
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    for x in xs:
        with torch.no_grad():
            ref = model(x)
        out = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * max(1.0, ref.abs().max().item()),
                                   msg=lambda m, x=x: f"{arch} ({'dynamo' if dynamo else 'torchscript'}) at "
                                                      f"{tuple(x.shape)}: {m}")


ONNX_DEFAULT = ("danet", "ccnet", "psanet", "isanet")
# torch.export refuses dynamic H, W for ISA's grouped reshapes (it specialises the number of groups per side; the
# same as the isa block's variants, tests/test_block_contracts.py DYNAMO_REFUSED): exported at a fixed size
DYNAMO_STATIC_ONLY = {"isanet"}


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("arch", slow_unless(ARCHS, ONNX_DEFAULT))
def test_onnx_export_matches_onnxruntime(arch, dynamo):
    """Before: the TorchScript-based exporter gave a wrong isanet graph (8.5e-3) and refused apcnet and ann."""
    check_onnx(arch, dynamo)


def test_attnfcn_scriptable_flag_follows_its_block(monkeypatch):
    """AttnFCN's class flag is its default block's (psa_p); an instance with a block TorchScript does not compile
    (none now: `NOT_SCRIPTABLE` is empty, so dgmn stands in) says so, and smp's guard refuses it with smp's message."""
    assert create("attnfcn")._is_torch_scriptable
    assert create("attnfcn", attention="dgmn")._is_torch_scriptable
    monkeypatch.setattr("lit_attn.integrations.smp.NOT_SCRIPTABLE", frozenset({"dgmn"}))
    model = create("attnfcn", attention="dgmn").eval()
    assert not model._is_torch_scriptable
    with pytest.raises(RuntimeError, match="cannot be scripted with TorchScript yet"):
        torch.jit.script(model)
