"""`lit-attn convert mmseg|psa CKPT OUT_DIR [...]`: the converter's command line (dispatched by `lit_attn.cli.main`
before LightningCLI). Expected failures print one message, without a traceback, and exit non-zero (2 corrupt
file, 3 not an mmseg checkpoint, 4 unsupported model, 5 key mapping, 1 other)."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import ConvertError

__all__ = ["main"]

_EPILOG = """\
Writes an smp save_pretrained folder (config.json, model.safetensors) plus mmseg_conversion.json (the source,
each setting and where it came from). Load it with:
    import lit_attn, segmentation_models_pytorch as smp
    model = smp.from_pretrained(OUT_DIR)        # eval(); inputs normalised as mmseg's (ImageNet mean/std)
"""


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("a JSON object is needed, e.g. '{\"psa_type\": \"collect\"}'")
    return value


def _parser() -> argparse.ArgumentParser:
    from .mmseg import ARCH_ALIASES, DNL_FORMS, MMSEG_HEADS

    parser = argparse.ArgumentParser(prog="lit-attn convert", description="Convert another library's checkpoint "
                                     "into a lit_attn smp model folder.")
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    p = sub.add_parser("mmseg", help="an mmsegmentation 0.x / 1.x checkpoint", epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Convert an mmsegmentation checkpoint (DANet, CCNet, ISANet, EMANet, NonLocal, "
                                   "DNLNet, GCNet, OCRNet, PSANet, APCNet, ANN or FCN head on ResNetV1c / ResNet, or "
                                   "OCRNet on HRNet -> hrnet_ocr on timm's HRNet) into the matching lit_attn smp "
                                   "architecture.")
    p.add_argument("checkpoint", metavar="CKPT", help="the mmseg .pth file")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (must not exist or be empty)")
    p.add_argument("--arch", choices=sorted({*MMSEG_HEADS, *ARCH_ALIASES}), metavar="NAME",
                   help="confirm the architecture (detected from the keys; a mismatch is an error): "
                        + ", ".join(MMSEG_HEADS))
    p.add_argument("--dnl-form", choices=list(DNL_FORMS), default=None,
                   help="DNLNet: conv_out on the sum of both terms ('sum' = '0.x' = '1.x': what every released "
                        "mmseg computes; the default) or on each term ('per_term')")
    p.add_argument("--output-stride", type=int, choices=(8, 16, 32), default=None,
                   help="when the checkpoint's meta has no config (default 8, mmseg's D8), or to override it")
    p.add_argument("--decoder-kwargs", type=_json_object, default=None, metavar="JSON",
                   help="head settings the checkpoint cannot tell, e.g. '{\"psa_type\": \"collect\"}'")
    p.add_argument("--lightning-ckpt", default=None, metavar="FILE",
                   help="also write the weights as a Lightning checkpoint of SegmentationTask, for lit-attn "
                        "test|validate|predict --config <recipe with the same widths> --ckpt_path FILE")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR (and --lightning-ckpt)")
    q = sub.add_parser("psa", aliases=["nvidia"], epilog=_EPILOG.replace("mmseg_conversion", "psa_conversion")
                       .replace("mmseg's", "NVIDIA's"), formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="a DeLightCMU/PSA or NVIDIA semantic-segmentation OCRNet / MscaleOCR checkpoint",
                       description="Convert an NVIDIA semantic-segmentation checkpoint (OCRNet = HRNet-OCR, "
                                   "MscaleOCR; DeLightCMU/PSA's HRNetV2-OCR + PSA_p / PSA_s included) into lit_attn's "
                                   "hrnet_ocr / mscale_ocr on the matching timm HRNet encoder.")
    q.add_argument("checkpoint", metavar="CKPT", help="the .pth file (train.py's snapshot or a bare state dict)")
    q.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (must not exist or be empty)")
    q.add_argument("--arch", choices=("hrnet_ocr", "mscale_ocr"), help="confirm the architecture (detected from "
                   "the keys: scale_attn.* is mscale_ocr); a mismatch is an error")
    q.add_argument("--inference-scales", type=_scales, default=(0.5, 1.0, 2.0), metavar="S,S,...",
                   help="mscale_ocr's evaluation scales, 1.0 among them (default 0.5,1.0,2.0, NVIDIA's Cityscapes "
                        "evaluation); 'none': the two-scale training output")
    q.add_argument("--flip", action="store_true", help="mscale_ocr: average with the flipped image (NVIDIA's "
                   "--do_flip; off in its evaluation scripts)")
    q.add_argument("--lightning-ckpt", default=None, metavar="FILE", help="also write the weights as a Lightning "
                   "checkpoint of SegmentationTask, for lit-attn test|validate|predict --ckpt_path FILE")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR (and --lightning-ckpt)")
    return parser


def _scales(text: str) -> tuple[float, ...] | None:
    if text.strip().lower() == "none":
        return None
    try:
        return tuple(float(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated numbers expected, e.g. 0.5,1.0,2.0, got {text!r}") from None


def _report(args: argparse.Namespace, convert) -> int:
    """Run `convert()` (a converter call); print its error (exit code of its kind) or what it did (0)."""
    try:
        conv = convert()
    except ConvertError as e:
        message = str(e) if args.checkpoint in str(e) else f"{args.checkpoint}: {e}"
        print(f"lit-attn convert: error ({e.kind}): {message}", file=sys.stderr)
        return e.exit_code
    if args.source == "mmseg":
        plan = conv.plan
        print(f"{args.checkpoint}: mmseg {plan.head_type} (mmseg {plan.mmseg_version or 'version unknown'}) -> "
              f"{plan.arch}, {conv.num_tensors} tensors loaded strictly")
        settings = plan.notes
    else:
        print(f"{args.checkpoint}: {conv.arch}, {conv.num_tensors} tensors loaded strictly")
        settings = conv.settings
    for key, note in settings.items():
        print(f"  {key}: {note}")
    for note in conv.notes:
        print(f"  note: {note}")
    print(f"wrote {conv.out_dir} (load: import lit_attn, segmentation_models_pytorch as smp; "
          f"smp.from_pretrained({str(conv.out_dir)!r}))")
    if args.lightning_ckpt:
        print(f"wrote {args.lightning_ckpt} (lit-attn test --config <recipe> --ckpt_path {args.lightning_ckpt})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `lit-attn convert ...` with `argv` (without the leading "convert"); returns the exit code."""
    args = _parser().parse_args(argv)
    if args.source in ("psa", "nvidia"):
        from .nvidia import convert_psa

        return _report(args, lambda: convert_psa(
            args.checkpoint, args.out_dir, arch=args.arch, inference_scales=args.inference_scales,
            inference_flip=args.flip, overwrite=args.overwrite, lightning_ckpt=args.lightning_ckpt))
    from . import convert_mmseg_checkpoint

    return _report(args, lambda: convert_mmseg_checkpoint(
        args.checkpoint, args.out_dir, arch=args.arch, dnl_form=args.dnl_form, output_stride=args.output_stride,
        decoder_kwargs=args.decoder_kwargs, overwrite=args.overwrite, lightning_ckpt=args.lightning_ckpt))


if __name__ == "__main__":
    sys.exit(main())
