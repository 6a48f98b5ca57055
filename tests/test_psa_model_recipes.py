"""The PSA paper's model end to end: the full-size MscaleOCR + HRNetV2-W48 + PSA has the official model's parameters
(counted on the meta device against the test-only transcriptions of DeLightCMU/PSA's HRNetV2 and NVIDIA's OCR /
scale-attention heads), the Cityscapes recipes parse into it, and the digits-scale recipe trains through the CLI."""
import csv
from pathlib import Path

import official_ocrnet as nvidia
import official_psa_hrnet as official
import pytest
import segmentation_models_pytorch as smp
import torch
import yaml

import lit_attn  # noqa: F401  (registers the models and architectures)
from lit_attn.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = ["--data.init_args.num_train", "16", "--data.init_args.num_val", "4", "--data.init_args.num_test", "4",
             "--data.init_args.image_size", "32", "--data.init_args.digit_size", "[10, 18]"]


def _count(module: torch.nn.Module, prefix: str = "") -> dict[str, int]:
    """Parameters per top-level group: the trunk's stem / layer1 / transitions / stages, the OCR block's parts,
    the scale attention."""
    out: dict[str, int] = {}
    for name, p in module.named_parameters():
        parts = name.removeprefix(prefix).split(".")
        key = ".".join(parts[:2]) if parts[0] in ("stage2", "stage3", "stage4", "ocr") else parts[0]
        key = {"conv1": "stem", "bn1": "stem", "conv2": "stem", "bn2": "stem"}.get(key, key)
        out[key] = out.get(key, 0) + p.numel()
    return out


@pytest.mark.parametrize("psa", ["psa_p", pytest.param("psa_s", marks=pytest.mark.slow)])  # w48 builds: ~6 s each
def test_full_size_mscale_ocr_hrnet_w48_psa_has_the_official_parameters(psa):
    with torch.device("meta"):
        ours = smp.create_model("mscale_ocr", encoder_name=f"tu-hrnet_w48_{psa}", encoder_weights=None, classes=19)
        trunk = official.HighResolutionNet(official.HRNET_W48, psa=psa[-1])
        heads = nvidia.MscaleOCRHeads(720, 19)  # NVIDIA's widths: MID 512, KEY 256, SEGATTN_BOT_CH 256
    mine = _count(ours.encoder.model)
    assert mine == _count(trunk)  # stem, layer1, transitions, every stage module (branches + fuse, PSA included)
    decoder: dict[str, int] = {}
    for k, v in _count(ours.decoder).items():  # our ocr block = NVIDIA's SpatialOCR (ocr_distri_head)
        k = "ocr.ocr_distri_head" if k.startswith("ocr.") else f"ocr.{k}"
        decoder[k] = decoder.get(k, 0) + v
    assert decoder == {k: v for k, v in _count(heads).items() if k.startswith("ocr.")}
    assert _count(ours.scale_attn) == {k.removeprefix("scale_attn."): v for k, v in
                                       _count(heads.scale_attn).items()}
    total = sum(p.numel() for p in ours.parameters())
    assert total == sum(p.numel() for p in trunk.parameters()) + sum(p.numel() for p in heads.parameters())
    assert total == {"psa_p": 71_680_320, "psa_s": 70_709_664}[psa] + 5_047_558 + 1_770_752  # trunk + OCR + attn


@pytest.mark.parametrize("psa", ["p", pytest.param("s", marks=pytest.mark.slow)])  # w48 builds: ~6 s each
def test_cityscapes_psa_recipes_build_the_papers_model(psa):
    path = ROOT / "recipes" / "cityscapes" / f"mscale_ocr_hrnet_w48_psa_{psa}_1024x2048_175e.yaml"
    cfg = yaml.safe_load(path.read_text())
    spec = cfg["model"]["init_args"]["model"]
    assert spec["class_path"] == "lit_attn.integrations.smp_ocr.MscaleOCR"
    kwargs = {**spec["init_args"], "encoder_weights": None}  # (no download here)
    with torch.device("meta"):
        model = smp.create_model("mscale_ocr", **kwargs)
    assert model.encoder.model.stage4[0].branches[3][0].attn.layout == {"p": "parallel", "s": "sequential"}[psa]
    assert model.inference_scales == [2.0, 1.0, 0.5] and not model.inference_flip  # the paper's evaluation
    header = path.read_text().split("seed_everything")[0]
    assert {"p": "86.95", "s": "86.72"}[psa] in header and "Mapillary" in header and "lit-attn convert psa" in header


def test_psa_digits_recipe_trains_through_the_cli(tmp_path, digits_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # oneDNN builds a kernel per conv shape on first use: HRNet's ~100 convs at 5 input sizes (two training scales,
    # three evaluation scales) cost most of this test's time; PyTorch's reference kernels are faster at this size
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    cli_main(["fit", "--config", str(ROOT / "recipes" / "psa_digits.yaml"),
              "--trainer.logger", "{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: logs}}",
              "--trainer.max_steps", "2", "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1",
              "--trainer.limit_val_batches", "1", "--data.init_args.root", digits_root,
              "--data.init_args.batch_size", "8", *TINY_DATA])
    rows = list(csv.DictReader(next(Path("logs").rglob("metrics.csv")).open()))
    miou = [float(r["val/mIoU"]) for r in rows if r.get("val/mIoU")]
    assert miou and 0.0 <= miou[-1] <= 1.0
    losses = [k for k in rows[0] if k.startswith("train/loss")]
    assert losses  # the two-scale training loss with NVIDIA's weights was logged
    assert list(Path("runs/psa_digits/checkpoints").rglob("last.ckpt"))
