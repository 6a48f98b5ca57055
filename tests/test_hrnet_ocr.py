"""NVIDIA's HRNet-OCR and MscaleOCR as smp architectures ("hrnet_ocr", "mscale_ocr"): the heads against a
transcription of NVIDIA's modules and forwards (tests/official_ocrnet.py) with a shared stand-in backbone (timm's
test ResNet's maps at strides 4-32 through NVIDIA's HRNetV2 concat), then smp's contract with ResNet and HRNet
encoders, the capability flags both ways, and a Lightning fit."""
import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from helpers import onnx_bytes, randomize_
from official_ocrnet import (
    MscaleOCRHeads,
    eval_minibatch_output,
    hrnetv2_concat,
    nscale_forward,
    ocrnet_forward,
    two_scale_forward,
)
from torch import nn

import lit_attn  # noqa: F401  (registers the architectures)
from lit_attn.heads.hrnet_ocr import HRNetOCRHead, ScaleAttentionHead, official_ocr_keys
from lit_attn.integrations.smp_ocr import OCR_CAPABILITIES
from lit_attn.tasks import SegmentationTask

ARCHS = ["hrnet_ocr", "mscale_ocr"]
ENCODER = "tu-test_resnet.r160_in1k"  # timm's 0.8 M-parameter test ResNet: branches 32, 48, 192, 96 -> 368
TINY = {"decoder_channels": 32, "decoder_key_channels": 16}  # the head widths of the equivalence tests


def create(arch, encoder=ENCODER, classes=3, **kwargs):
    torch.manual_seed(0)
    if arch == "mscale_ocr":
        kwargs.setdefault("attn_channels", 16)
    return smp.create_model(arch, encoder_name=encoder, encoder_weights=None, classes=classes, **{**TINY, **kwargs})


def official_for(model, seed=1):
    """NVIDIA's heads at the model's widths, randomised, loaded into the model through `official_ocr_keys`."""
    torch.manual_seed(seed)
    high = model.decoder.in_channels
    heads = randomize_(MscaleOCRHeads(high, model.decoder.num_classes, TINY["decoder_channels"],
                                     TINY["decoder_key_channels"], bot_ch=16), seed).eval()
    state = heads.state_dict()
    if not hasattr(model, "scale_attn"):
        state = {k: v for k, v in state.items() if not k.startswith("scale_attn.")}
    mine = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    mapped = official_ocr_keys(state)
    assert set(mapped) == set(mine)  # every head key, no encoder key
    model.load_state_dict({**model.state_dict(), **mapped}, strict=True)
    return heads


def sample(b=2, h=70, w=54, seed=2):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_official_keys_map_every_head_key_and_name_bad_ones():
    official = MscaleOCRHeads(720, 19)  # NVIDIA's widths (HRNetV2-W48, Cityscapes)
    mapped = official_ocr_keys({f"module.{k}": v for k, v in official.state_dict().items()})  # DDP's prefix
    ours = nn.ModuleDict({"decoder": HRNetOCRHead(720, 19), "scale_attn": ScaleAttentionHead(512)})
    ours.load_state_dict(mapped, strict=True)
    assert "decoder.ocr.object_context_block.f_query.0.weight" in mapped  # f_pixel
    assert "decoder.ocr.object_context_block.W.1.0.running_var" in mapped  # f_up's BN
    assert "decoder.ocr.conv_bn_dropout.0.weight" in mapped and "scale_attn.conv1.weight" in mapped
    assert official_ocr_keys({"backbone.stage4.0.fuse_layers.0.1.0.weight": torch.zeros(1)}) == {
        "encoder.model.stage4.0.fuse_layers.0.1.0.weight": torch.zeros(1)}
    with pytest.raises(KeyError, match=r"ocr\.ocr_gather_head\.foo"):
        official_ocr_keys({**official.state_dict(), "ocr.ocr_gather_head.foo": torch.zeros(1)})
    with pytest.raises(KeyError, match=r"backbone\.conv1\.weight"):
        official_ocr_keys({"backbone.conv1.weight": torch.zeros(1)}, backbone_prefix=None)
    missing = dict(mapped)
    del missing["decoder.ocr.object_context_block.f_key.2.weight"]
    with pytest.raises(RuntimeError, match=r"decoder\.ocr\.object_context_block\.f_key\.2\.weight"):
        ours.load_state_dict(missing, strict=True)


def test_ocr_block_matches_official():
    official = randomize_(MscaleOCRHeads(40, 5, 32, 16, bot_ch=16), 1).eval()
    ours = HRNetOCRHead(40, 5, mid_channels=32, key_channels=16).eval()
    ours.load_state_dict(official_ocr_keys({k: v for k, v in official.state_dict().items() if k.startswith("ocr.")},
                                           head_prefix=""), strict=True)
    x = torch.randn(2, 40, 17, 13)
    with torch.no_grad():
        for a, b in zip(ours(x), official.ocr(x), strict=True):  # cls, aux, ocr_feats
            close(a, b)


def test_hrnet_ocr_matches_official_ocrnet():
    model = create("hrnet_ocr", activation="identity").eval()
    official = official_for(model)
    x = sample()
    with torch.no_grad():
        cls, aux = ocrnet_forward(official, lambda im: hrnetv2_concat(model.encoder(im)[2:]), x)
        out, outs = model(x), model.forward_with_aux(x)
    assert cls.shape == (2, 3, 70, 54)
    close(out, cls)
    close(outs[0], cls)
    close(outs[1], aux)


@pytest.mark.parametrize("flip", [False, True])
def test_mscale_inference_matches_official_nscale(flip):
    """Eval mode: NVIDIA's nscale_forward over (0.5, 1.0, 2.0) (inside its evaluation loop for the flip)."""
    model = create("mscale_ocr", inference_flip=flip).eval()
    official = official_for(model)
    x = sample(1, h=38, w=30)  # scales 0.5 -> 19x15, 2.0 -> 76x60
    backbone = lambda im: hrnetv2_concat(model.encoder(im)[2:])  # noqa: E731
    expected = eval_minibatch_output(lambda im: nscale_forward(official, backbone, im, [0.5, 1.0, 2.0])[0], x, flip)
    with torch.no_grad():
        out = model(x)
        model.inference_flip = False
        unflipped = model(x)
    assert out.shape == (1, 3, 38, 30)
    close(out, expected)
    assert flip == ((out - unflipped).abs().max() > 1e-4)  # the flip changes the logits


def test_mscale_training_forward_matches_official_two_scale():
    """forward_with_aux = NVIDIA's two_scale_forward (eval-mode BN and dropout, so both sides are deterministic):
    joint pred, joint aux, the 0.5x pred resized (SUPERVISED_MSCALE_WT's loss_lo) and the 1x pred."""
    model = create("mscale_ocr", activation="identity").eval()
    official = official_for(model)
    x = sample(2, h=38, w=30)
    with torch.no_grad():
        ref = two_scale_forward(official, lambda im: hrnetv2_concat(model.encoder(im)[2:]), x, lo_scale=0.5)
        outs = model.forward_with_aux(x)
        model.inference_scales = None  # NVIDIA without N_SCALES: the two-scale prediction in eval mode too
        two_scale_eval = model(x)
    assert model.aux_loss_weights == (0.4, 0.05, 0.05)
    assert len(outs) == 4
    for o, key in zip(outs, ("pred", "aux", "scaled_pred_05x", "pred_10x"), strict=True):
        close(o, ref[key])
    close(two_scale_eval, ref["pred"])
    assert (ref["pred"] - ref["pred_10x"]).abs().max() > 1e-3  # the low scale contributes


@pytest.mark.parametrize("high", [270, 720])  # HRNetV2-W18 and W48 representations
def test_parameter_counts_equal_officials_per_module(high):
    official = MscaleOCRHeads(high, 19)
    ours = HRNetOCRHead(high, 19)
    attn = ScaleAttentionHead(512)

    def count(m):
        return sum(p.numel() for p in m.parameters())

    for mine, theirs in ((ours.conv3x3_ocr, official.ocr.conv3x3_ocr), (ours.aux_head, official.ocr.aux_head),
                         (ours.ocr, official.ocr.ocr_distri_head), (ours.cls_head, official.ocr.cls_head),
                         (attn, official.scale_attn)):
        assert count(mine) == count(theirs)
    assert count(ours) == count(official.ocr)
    if high == 720:
        # by hand: conv3x3_ocr 720*512*9 + 512 + BN 1024; aux_head 720^2 + 720 + BN 1440 + 720*19 + 19; SpatialOCR
        # f_pixel / f_object 2 * (512*256 + 256^2 + 2 BN 512), f_down 512*256 + 512, f_up 256*512 + 1024,
        # conv_bn_dropout 1024*512 + 1024; cls_head 512*19 + 19; scale_attn 512*256*9 + 256^2*9 + 2 BN 512 + 256
        assert count(official.ocr) == 3_319_296 + 534_259 + 1_184_256 + 9_747
        assert count(attn) == 1_179_648 + 589_824 + 1024 + 256


@pytest.mark.parametrize(("arch", "encoder"), [
    ("hrnet_ocr", "tu-resnet18"), ("mscale_ocr", "tu-resnet18"), ("hrnet_ocr", "tu-hrnet_w18_small_v2"),
    pytest.param("mscale_ocr", "tu-hrnet_w18_small_v2", marks=pytest.mark.slow)])  # 8-15 s, paths covered above
def test_smp_contract_with_resnet_and_hrnet_encoders(arch, encoder):
    """Any input size (38x30), one Tensor in train and eval mode, (main, *aux) from forward_with_aux."""
    model = create(arch, encoder, classes=3)
    if "hrnet" in encoder:  # timm's HRNet, raw branches (feature_location=''), not the 'incre' head's maps
        assert model.encoder.out_channels == [3, 64, 18, 36, 72, 144] and model.decoder.in_channels == 270
        from timm.models.hrnet import HighResolutionModule

        from lit_attn.models.hrnet_psa import OfficialFuseModule  # the segmentation HRNetV2's bilinear fuse
        fuses = [m for m in model.encoder.modules() if isinstance(m, HighResolutionModule)]
        assert fuses and all(isinstance(m, OfficialFuseModule) for m in fuses)
        assert not any(isinstance(m, torch.nn.Upsample) for m in model.encoder.modules())
    x = sample(2, 38, 30)
    model.train()
    out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 38, 30)
    outs = model.forward_with_aux(x)
    assert len(outs) == 1 + len(model.aux_loss_weights) and all(o.shape == (2, 3, 38, 30) for o in outs)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 38, 30) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_sgd_steps_through_segmentation_task_lower_the_loss(arch):
    model = create(arch, classes=3).train()
    task = SegmentationTask(model, num_classes=3)
    task.log = lambda *a, **k: None
    batch = {"image": sample(2, 48, 40), "mask": torch.randint(0, 3, (2, 48, 40), generator=torch.Generator()
                                                                .manual_seed(0))}
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(4):
        loss = task.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_training_loss_is_nvidias_weighted_sum():
    model = create("mscale_ocr").eval()
    task = SegmentationTask(model, num_classes=3)
    task.log = lambda *a, **k: None
    batch = {"image": sample(2, 48, 40), "mask": torch.randint(0, 3, (2, 48, 40))}
    with torch.no_grad():
        loss = task.training_step(batch, 0)
        joint, aux, lo, hi = model.forward_with_aux(batch["image"])
    ce = [F.cross_entropy(o, batch["mask"], ignore_index=255) for o in (joint, aux, lo, hi)]
    close(loss, ce[0] + 0.4 * ce[1] + 0.05 * ce[2] + 0.05 * ce[3])  # main + OCR_ALPHA aux + SUPERVISED_MSCALE_WT
    assert create("mscale_ocr", supervised_mscale_weight=0).aux_loss_weights == (0.4,)
    assert create("hrnet_ocr").aux_loss_weights == (0.4,)


def test_forward_backward_reaches_every_parameter():
    for arch in ARCHS:
        model = create(arch).train()
        sum(o.mean() for o in model.forward_with_aux(sample(2, 64, 64))).backward()
        assert {n for n, p in model.named_parameters() if p.grad is None} == set()


def test_encoder_depth_in_channels_and_bad_arguments():
    model = create("hrnet_ocr", encoder_depth=3, in_channels=1).eval()  # strides 4 and 8 only
    assert model.decoder.in_channels == sum(model.encoder.out_channels[2:]) == 32 + 48
    with torch.no_grad():
        assert model(torch.rand(1, 1, 33, 47)).shape == (1, 3, 33, 47)
    with pytest.raises(ValueError, match="encoder_depth must be 2-5"):
        create("hrnet_ocr", encoder_depth=1)
    with pytest.raises(ValueError, match="encoder_output_stride=32 only"):
        create("hrnet_ocr", "tu-hrnet_w18_small_v2", encoder_output_stride=8)
    with pytest.raises(ValueError, match="contain 1.0"):
        create("mscale_ocr", inference_scales=(0.5, 2.0))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        create("hrnet_ocr")(torch.rand(3, 32, 32))


@pytest.mark.parametrize("arch", ARCHS)
def test_classification_head_and_hub_round_trip(arch, tmp_path):
    kwargs = {"inference_scales": (0.75, 1.0), "inference_flip": True} if arch == "mscale_ocr" else {}
    model = randomize_(create(arch, aux_params={"classes": 4}, **kwargs), 1).eval()
    x = sample(1, 64, 64)
    with torch.no_grad():
        mask, label = model(x)
        torch.testing.assert_close(label, model.classification_head(model.encoder(x)[-1]))
    assert mask.shape == (1, 3, 64, 64) and label.shape == (1, 4)
    model.save_pretrained(tmp_path)
    loaded = smp.from_pretrained(str(tmp_path)).eval()
    assert type(loaded) is type(model) and loaded.aux_loss_weights == model.aux_loss_weights
    if arch == "mscale_ocr":
        assert loaded.inference_scales == [1.0, 0.75] and loaded.inference_flip
    with torch.no_grad():
        for a, b in zip(loaded(x), model(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["hrnet_ocr", pytest.param("mscale_ocr", marks=pytest.mark.slow)])  # ~15 s each
def test_capability_flags_tell_the_truth(arch):
    """TorchScript and torch.export (strict) as smp's tests, values checked; torch.compile in the slow test."""
    cls = smp.MODEL_ARCHITECTURES_MAPPING[arch]
    assert (cls._is_torch_scriptable, cls._is_torch_exportable, cls._is_torch_compilable) == OCR_CAPABILITIES[arch]
    assert cls.requires_divisible_input_shape is False
    model = create(arch, **({"inference_scales": (0.5, 1.0)} if arch == "mscale_ocr" else {})).eval()
    x = sample(1, 64, 64)
    with torch.no_grad():
        ref = model(x)
        if model._is_torch_scriptable:
            close(torch.jit.script(model)(x), ref)
        else:
            with pytest.raises(RuntimeError, match="cannot be scripted"):
                torch.jit.script(model)
        if model._is_torch_exportable:
            close(torch.export.export(model, (x,), strict=True).module()(x), ref)
        else:
            with pytest.raises(Exception):  # noqa: B017
                torch.export.export(model, (x,), strict=True)


def test_timm_hrnet_instances_refuse_torchscript_clearly():
    model = create("hrnet_ocr", "tu-hrnet_w18_small_v2").eval()
    assert not model._is_torch_scriptable and smp.MODEL_ARCHITECTURES_MAPPING["hrnet_ocr"]._is_torch_scriptable
    with pytest.raises(RuntimeError, match="cannot be scripted"):
        torch.jit.script(model)
    model._is_torch_scriptable = True  # past the guard: the HRNet encoder fails
    with pytest.raises(RuntimeError, match="_out_idx|statically determinable"):
        torch.jit.script(model)


def test_mscale_two_scale_eval_scripts():
    model = create("mscale_ocr", inference_scales=None).eval()
    x = sample(1, 40, 40)
    with torch.no_grad():
        close(torch.jit.script(model)(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_compile(arch):
    model = create(arch).eval()
    torch.compiler.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")
    assert model._is_torch_compilable
    with torch.no_grad():
        for x in (sample(1, 64, 64), sample(1, 65, 81)):
            close(compiled(x), model(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_meta_bf16_channels_last_odd_size(arch):
    with torch.device("meta"):
        meta = create(arch)
    assert all(p.is_meta for p in meta.parameters())
    kwargs = {"inference_scales": (0.5, 1.0, 1.5)} if arch == "mscale_ocr" else {}
    model = randomize_(create(arch, **kwargs), 3).eval()
    x = sample(1, 45, 37)  # odd: 0.5 -> 22x18, 1.5 -> 67x55
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x)
    assert ref.shape == (1, 3, 45, 37)
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    assert (half.float() - ref).norm() < 0.1 * ref.norm()


ONNX_SIZES = ((64, 64), (96, 80))


@pytest.mark.parametrize(("arch", "dynamo"), [("hrnet_ocr", True), ("hrnet_ocr", False), ("mscale_ocr", False),
                                              pytest.param("mscale_ocr", True, marks=pytest.mark.slow)])  # ~20 s
def test_onnx_export_matches_onnxruntime(arch, dynamo):
    """Both ONNX exporters with dynamic H, W (MscaleOCR: its 0.5 / 1 / 2 scales in eval mode): onnxruntime equals
    PyTorch to 1e-4 at the export size and another. Before: MscaleOCR resized by a size computed in Python, which
    both exporters froze at the export size (0.068 off at 96x80)."""
    ort = pytest.importorskip("onnxruntime")
    model = randomize_(create(arch), 1).eval()
    xs = [sample(1, h, w) for h, w in ONNX_SIZES]
    blob = onnx_bytes(model, xs[0], dynamo, min_size=33)
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    for x in xs:
        with torch.no_grad():
            ref = model(x)
        out = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_segmentation_task_fits_on_digits(tmp_path, digits_root):
    """Two steps of Lightning fit + validation on the digits data through SegmentationTask (forward_with_aux)."""
    import lightning.pytorch as pl

    from lit_attn.data import DigitsDataModule

    dm = DigitsDataModule(root=digits_root, num_train=8, num_val=2, num_test=2, image_size=32, digit_size=(10, 18),
                          batch_size=4, eval_batch_size=2)
    model = create("mscale_ocr", classes=11, inference_scales=(0.5, 1.0))
    task = SegmentationTask(model, num_classes=11)
    trainer = pl.Trainer(max_steps=2, limit_val_batches=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(task, datamodule=dm)
    assert trainer.global_step == 2
    assert "val/mIoU" in trainer.callback_metrics and "train/loss_aux2" in trainer.logged_metrics
