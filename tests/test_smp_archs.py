"""lit_attn's heads as smp architectures, and lit_attn block names in smp's Unet / Unet++ decoders."""
import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

import lit_attn
from lit_attn.integrations.smp import ARCHITECTURES
from lit_attn.tasks import SegmentationTask

ARCHS = sorted(ARCHITECTURES)
# timm's BAT asserts maps divisible by its block size 7 (a timm limitation, see test_contract)
PLUGINS = [n for n in lit_attn.list_attn(kind=("gate", "global")) if n != "bat"]


def create(arch, encoder="resnet34", classes=5, **kwargs):
    torch.manual_seed(0)
    return smp.create_model(arch, encoder_name=encoder, encoder_weights=None, classes=classes, **kwargs)


def test_every_architecture_is_registered_in_smp():
    expected = {"danet", "ccnet", "isanet", "emanet", "nlnet", "dnlnet", "gcnet", "ocrnet", "psanet", "apcnet",
                "ann", "glorenet", "a2net", "attnfcn"}
    assert expected == set(ARCHS)
    for arch in ARCHS:
        cls = smp.MODEL_ARCHITECTURES_MAPPING[arch]
        assert getattr(smp, cls.__name__) is cls  # smp.from_pretrained looks the class up on the module
        assert issubclass(cls, smp.base.SegmentationModel)


@pytest.mark.parametrize("encoder", ["resnet34", "tu-resnet50"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_at_input_size_train_and_eval(arch, encoder):
    model = create(arch, encoder)
    x = torch.randn(2, 3, 49, 37)  # odd size: nothing divisible by the output stride
    model.train()
    out = model(x)  # smp's contract: one Tensor in training mode too
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, 49, 37) and torch.isfinite(out).all()
    outs = model.forward_with_aux(x)  # the auxiliary outputs, opt-in
    assert isinstance(outs, tuple) and len(outs) == 1 + len(model.aux_loss_weights)
    assert all(o.shape == (2, 5, 49, 37) and torch.isfinite(o).all() for o in outs)
    sum(o.square().mean() for o in outs).backward()
    grads = [p.grad for p in model.decoder.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, 49, 37) and torch.isfinite(out).all()


@pytest.mark.parametrize("stride", [8, 16])
@pytest.mark.parametrize("encoder", ["resnet34", "tu-resnet50"])
def test_encoder_output_stride(encoder, stride):
    model = create("nlnet", encoder, encoder_output_stride=stride).eval()
    seen = []
    model.decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 96))
    assert seen[0][-2:] == (64 // stride, 96 // stride)


def test_mmseg_loss_weights():
    assert create("danet").aux_loss_weights == (1.0, 1.0, 0.4)  # pam, cam, FCN auxiliary head
    assert create("nlnet").aux_loss_weights == (0.4,)
    assert create("nlnet", aux_head=False).aux_loss_weights == ()
    ocr = create("ocrnet", aux_head=False)  # OCR's decode head needs the first cascade stage anyway
    assert ocr.auxiliary_head is not None and ocr.aux_loss_weights == (0.4,)


def test_attnfcn_takes_any_block_and_its_kwargs(tmp_path):
    model = create("attnfcn", attention="criss_cross", attention_kwargs={"recurrence": 1}, decoder_channels=32)
    blocks = [m for m in model.modules() if type(m).__name__ == "CrissCrossAttention"]
    assert len(blocks) == 1 and blocks[0].recurrence == 1
    model.save_pretrained(tmp_path)
    loaded = smp.from_pretrained(str(tmp_path))
    assert [m.recurrence for m in loaded.modules() if type(m).__name__ == "CrissCrossAttention"] == [1]


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="encoder_output_stride"):
        create("danet", encoder_output_stride=4)
    with pytest.raises(ValueError, match="ANN needs two stages"):
        create("ann", encoder_depth=1)
    with pytest.raises(ValueError, match="OCRNet needs the auxiliary FCN head"):
        create("ocrnet", encoder_depth=1)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        create("danet")(torch.randn(3, 32, 32))


@pytest.mark.parametrize("arch", ARCHS)
def test_trains_through_segmentation_task_with_aux_losses(arch):
    """A few SGD steps through SegmentationTask, which trains on `forward_with_aux`: every auxiliary output enters
    the loss with its weight, and the logits the criterion sees are `forward_with_aux`'s."""
    model = create(arch, classes=4, decoder_channels=32)
    task = SegmentationTask(model, num_classes=4, optimizer="sgd", lr=0.01)
    task.log = lambda *a, **k: None
    calls = []

    class Recorder(nn.Module):
        def __init__(self, criterion):
            super().__init__()
            self.criterion = criterion

        def forward(self, logits, mask):
            calls.append(self.criterion(logits, mask))
            return calls[-1]

    task.criterion = Recorder(task.criterion)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(2, 3, 48, 40, generator=g), "mask": torch.randint(0, 4, (2, 48, 40), generator=g)}
    batch["mask"][0, :4] = 255
    losses = []
    outputs = []
    forward_with_aux = model.forward_with_aux
    model.forward_with_aux = lambda x: outputs.append(forward_with_aux(x)) or outputs[-1]
    for _ in range(3):
        calls.clear()
        outputs.clear()
        loss = task.training_step(batch, 0)
        weights = (1.0, *model.aux_loss_weights)
        assert len(calls) == len(weights) == len(outputs[0])
        expected = [task.criterion.criterion(o, batch["mask"]) for o in outputs[0]]
        torch.testing.assert_close(torch.stack(calls), torch.stack(expected), rtol=0, atol=0)
        torch.testing.assert_close(loss, sum(w * c for w, c in zip(weights, calls, strict=True)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("arch", ["Unet", "UnetPlusPlus"])
@pytest.mark.parametrize("name", PLUGINS)
def test_decoder_attention_type_takes_every_plugin_block(arch, name):
    torch.manual_seed(0)
    # the last decoder width is smp's default smallest (16)
    model = getattr(smp, arch)("resnet34", encoder_weights=None, classes=2, decoder_attention_type=name,
                               encoder_depth=3, decoder_channels=(64, 32, 16))
    kind = lit_attn.get_attn_entry(name).cls
    kind = getattr(kind, "func", kind)  # timm entries may be functools.partial
    assert sum(isinstance(m, kind) for m in model.decoder.modules()) >= 4  # two per decoder block
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 2, 32, 32) and torch.isfinite(out).all()


def test_decoder_attention_type_keeps_smp_behaviour():
    model = smp.Unet("resnet34", encoder_weights=None, decoder_attention_type="scse", encoder_depth=3,
                     decoder_channels=(32, 16, 8))
    assert any(type(m).__name__ == "SCSEModule" for m in model.modules())
    with pytest.raises(ValueError, match="not smp's 'scse' or a lit_attn plug-in"):
        smp.Unet("resnet34", encoder_weights=None, decoder_attention_type="no_such_block")


def test_decoder_attention_type_bat_at_sizes_divisible_by_7():
    model = smp.Unet("resnet34", encoder_weights=None, classes=2, decoder_attention_type="bat", encoder_depth=3,
                     decoder_channels=(64, 32, 16))
    out = model(torch.randn(1, 3, 56, 56))  # decoder maps 14, 28, 56: timm's BAT needs multiples of 7
    assert out.shape == (1, 2, 56, 56) and torch.isfinite(out).all()
