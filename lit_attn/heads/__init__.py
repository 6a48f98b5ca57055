"""Segmentation decode heads (mmsegmentation-style) and a timm/smp encoder + head segmentor.

    from lit_attn.heads import AttnHead, AttnSegmentor, FCNHead
    head = AttnHead(2048, 512, 19, attention="nonlocal")          # mmseg NLHead pattern, any block
    model = AttnSegmentor("resnet50", num_classes=19, attention="psa_p", output_stride=8)
    model = AttnSegmentor("smp:resnet34", num_classes=19, attention="danet")
"""
from .context import AttnHead, build_attention
from .fcn import ConvModule, FCNHead, init_head_weights
from .segmentor import AttnSegmentor, build_encoder, find_attention_blocks

__all__ = ["AttnHead", "AttnSegmentor", "ConvModule", "FCNHead", "build_attention", "build_encoder",
           "find_attention_blocks", "init_head_weights"]
