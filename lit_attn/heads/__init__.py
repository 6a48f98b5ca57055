"""Segmentation decode heads (mmsegmentation-style) and a timm/smp encoder + head segmentor.

    from lit_attn.heads import AttnHead, AttnSegmentor, DAHead, FCNHead
    head = AttnHead(2048, 512, 19, attention="nonlocal")          # mmseg NLHead pattern, any block
    head = DAHead(2048, 512, 19)                                   # mmseg's DANet head, R-50-D8 defaults
    model = AttnSegmentor("resnet50", num_classes=19, attention="psa_p", output_stride=8)

The named heads (DAHead, CCHead, ISAHead, EMAHead, NLHead, DNLHead, GCHead, OCRHead, PSAHead, APCHead,
ANNHead, GloReHead, A2Head) follow mmseg's R-50-D8 configurations; as smp architectures they are
`smp.create_model("danet", ...)` etc. (lit_attn.integrations.smp). HRNetOCRHead and ScaleAttentionHead are NVIDIA's
(the PSA paper's HRNet-OCR / MscaleOCR; smp architectures "hrnet_ocr", "mscale_ocr").
"""
from .ann import ANNHead
from .apc import APCHead
from .context import A2Head, AttnHead, CCHead, DNLHead, GCHead, GloReHead, NLHead, build_attention
from .danet import DAHead
from .ema import EMAHead
from .fcn import ConvModule, FCNHead, init_head_weights
from .hrnet_ocr import HRNetOCRHead, ScaleAttentionHead
from .isa import ISAHead
from .ocr import OCRHead
from .psa import PSAHead
from .segmentor import AttnSegmentor, build_encoder, find_attention_blocks

__all__ = ["A2Head", "ANNHead", "APCHead", "AttnHead", "AttnSegmentor", "CCHead", "ConvModule", "DAHead", "DNLHead",
           "EMAHead", "FCNHead", "GCHead", "GloReHead", "HRNetOCRHead", "ISAHead", "NLHead", "OCRHead", "PSAHead",
           "ScaleAttentionHead", "build_attention", "build_encoder", "find_attention_blocks", "init_head_weights"]
