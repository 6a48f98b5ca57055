"""`lit-attn convert psa`: NVIDIA semantic-segmentation / DeLightCMU PSA checkpoints (HRNetV2 + PSA_p / PSA_s, OCR,
MscaleOCR) into hrnet_ocr / mscale_ocr. The checkpoints are made here by the test-only transcriptions of the
official modules (tests/official_psa_hrnet.py: DeLightCMU/PSA's HRNetV2 + PSA; tests/official_ocrnet.py: NVIDIA's
OCR_block, make_attn_head and the OCRNet / MscaleOCR forwards) at the hrnet_w18_small_v2 trunk with narrow heads,
randomised, saved as NVIDIA's train.py saves them (`module.` keys under "state_dict", numpy mean_iu); the released
Cityscapes checkpoints cannot be downloaded here. The converted model must reproduce the official outputs."""
import numpy as np
import official_ocrnet as nvidia
import official_psa_hrnet as official
import pytest
import segmentation_models_pytorch as smp
import torch
from helpers import randomize_
from timm.models import hrnet as timm_hrnet

import lit_attn  # noqa: F401  (registers the architectures and models)
from lit_attn.convert.cli import main as convert_main
from lit_attn.convert.errors import KeyMappingError, NotPSACheckpointError, UnsupportedModelError
from lit_attn.convert.nvidia import convert_psa

CLASSES, MID, KEY, BOT = 5, 32, 16, 16
SCALES = (0.5, 1.0, 2.0)


@pytest.fixture(autouse=True, scope="module")
def _reference_convs():
    """oneDNN builds a kernel per conv shape on first use (seconds for HRNet's); the reference kernels are faster at
    these widths."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = enabled


def official_model(psa: str | None, seed: int = 1):
    """(backbone callable x -> HRNetV2 features, heads, NVIDIA-format checkpoint dict) of the official structure."""
    extra = official.official_extra(timm_hrnet.cfg_cls["hrnet_w18_small_v2"])
    trunk = randomize_(official.HighResolutionNet(extra, psa=(psa or "psa_s")[-1]), seed).eval()
    heads = randomize_(nvidia.MscaleOCRHeads(18 + 36 + 72 + 144, CLASSES, MID, KEY, bot_ch=BOT), seed + 1).eval()
    state = {f"module.backbone.{k}": v for k, v in trunk.state_dict().items()}
    if psa is None:  # a plain HRNet-OCR trunk: the official BasicBlock without its deattn
        state = {k: v for k, v in state.items() if ".deattn." not in k}
        for m in trunk.modules():
            if hasattr(m, "deattn"):
                m.deattn = torch.nn.Identity()
    state.update({f"module.{k}": v for k, v in heads.state_dict().items()})
    ckpt = {"epoch": 174, "arch": "network.ocrnet.HRNet_Mscale", "num_classes": CLASSES,
            "mean_iu": np.float64(0.8695), "command": "train.py --arch ocrnet.HRNet_Mscale", "state_dict": state}
    return (lambda x: trunk(x)[1]), heads, ckpt


def images(h=48, w=40, seed=3):
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("psa", ["psa_p", "psa_s"])
def test_mscale_ocr_psa_matches_the_official_model_single_and_multi_scale_with_flip(psa, tmp_path):
    backbone, heads, ckpt = official_model(psa)
    path = tmp_path / "cityscapes_ocrnet.HRNet_Mscale_psa.pth"
    torch.save(ckpt, path)
    out = tmp_path / "converted"
    assert convert_main(["psa", str(path), str(out)]) == 0
    model = smp.from_pretrained(str(out)).eval()
    assert type(model).__name__ == "MscaleOCR" and model.encoder.model.stage2[0].branches[0][0].attn.layout == (
        "parallel" if psa == "psa_p" else "sequential")
    x = images()
    with torch.no_grad():
        ref = nvidia.nscale_forward(heads, backbone, x, list(SCALES))[0]
        assert ref.std() > 0.05  # informative logits
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
        model.inference_flip = True  # NVIDIA's eval loop: the mean of the flipped image's logits (flipped back) and x's
        flipped = nvidia.eval_minibatch_output(
            lambda im: nvidia.nscale_forward(heads, backbone, im, list(SCALES))[0], x, do_flip=True)
        torch.testing.assert_close(model(x), flipped, rtol=1e-4, atol=1e-4)
        model.inference_flip, model.inference_scales = False, [1.0]  # single scale: the 1x pass alone
        single = nvidia.nscale_forward(heads, backbone, x, [1.0])[0]
        torch.testing.assert_close(model(x), single, rtol=1e-4, atol=1e-4)
        joint = nvidia.two_scale_forward(heads, backbone, x)["pred"]  # the training forward, eval-mode BN
        torch.testing.assert_close(model.forward_with_aux(x)[0], joint, rtol=1e-4, atol=1e-4)


def test_plain_hrnet_ocr_checkpoint_converts_at_an_odd_size(tmp_path):
    """NVIDIA's OCRNet (no scale_attn, no PSA): hrnet_ocr on timm's plain hrnet_w18_small_v2."""
    backbone, heads, ckpt = official_model(None)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if "scale_attn." not in k}
    conv = convert_psa(ckpt, tmp_path / "out", lightning_ckpt=tmp_path / "task.ckpt")
    assert conv.arch == "hrnet_ocr" and conv.create_kwargs["encoder_name"] == "tu-hrnet_w18_small_v2"
    x = images(70, 54)
    with torch.no_grad():
        ref_cls, ref_aux = nvidia.ocrnet_forward(heads, backbone, x)
        main, aux = conv.model.forward_with_aux(x)
    torch.testing.assert_close(main, ref_cls, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(aux, ref_aux, rtol=1e-4, atol=1e-4)
    saved = torch.load(tmp_path / "task.ckpt", weights_only=True)["state_dict"]
    assert saved.keys() == {f"model.{k}" for k in conv.model.state_dict()}


def test_missing_extra_and_foreign_keys_are_named(tmp_path):
    _, _, ckpt = official_model("psa_s")
    state = ckpt["state_dict"]
    gone = "module.backbone.stage3.0.branches.1.0.deattn.conv_v_left.weight"  # the trunk then matches no timm HRNet
    with pytest.raises(UnsupportedModelError, match=r"missing stage3\.0\.branches\.1\.0\.attn\.conv_v_left\.weight"):
        convert_psa({**ckpt, "state_dict": {k: v for k, v in state.items() if k != gone}})
    gone = "module.ocr.ocr_distri_head.object_context_block.f_up.1.0.running_var"
    with pytest.raises(KeyMappingError, match=r"decoder\.ocr\.object_context_block\.W\.1\.0\.running_var"):
        convert_psa({**ckpt, "state_dict": {k: v for k, v in state.items() if k != gone}})
    with pytest.raises(KeyMappingError, match=r"ocr\.extra_head\.weight"):
        convert_psa({**ckpt, "state_dict": {**state, "module.ocr.extra_head.weight": torch.zeros(1)}})
    with pytest.raises(UnsupportedModelError, match="--arch hrnet_ocr"):
        convert_psa(ckpt, arch="hrnet_ocr")
    with pytest.raises(NotPSACheckpointError, match="not an NVIDIA OCRNet"):
        convert_psa({"state_dict": {"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}})
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": state, "opt": torch.optim.SGD}, path)  # a pickled class: refused, not run
    assert convert_main(["psa", str(path), str(tmp_path / "out")]) == 3


def test_a_trunk_that_matches_no_timm_hrnet_names_the_nearest(tmp_path):
    _, _, ckpt = official_model("psa_p")
    cut = "module.backbone.stage4.0.branches.3"
    state = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(cut)}
    with pytest.raises(UnsupportedModelError, match=r"nearest hrnet_w18_small_v2_psa_p: missing stage4\.0\.branch"):
        convert_psa({"state_dict": state})
