"""Maps of the gating and assignment blocks: PSA's gates, residual attention's soft mask, EMA's
responsibilities and OCR's soft object regions. Each is what the block's forward computes, evaluated
from its captured input with its own parameters; none involves an N x N term.
"""
from __future__ import annotations

import torch

from ..layers.ema import EMAUnit, em_iterations
from ..layers.object_context import ObjectContextBlock, spatial_gather
from ..layers.psa import PolarizedSelfAttention
from ..layers.residual_attention import AttentionModule
from ..ops import map_to_tokens
from .core import MapPart, map_for


@map_for(PolarizedSelfAttention)
def psa_map(block: PolarizedSelfAttention, args, kwargs, output, cells) -> list[MapPart]:
    """The channel gate A_ch(x) and / or the spatial gate A_sp, as the layout applies them (sequential:
    A_sp of the channel-gated x)."""
    x = args[0]
    parts = []
    ch = None
    if hasattr(block, "conv_q_right"):
        ch = block.channel_mask(x)
        parts.append(MapPart("channel_gate", ch.flatten(1), "channel",
                             f"channel-only gate A_ch ({block.formulation} formulation)"))
    if hasattr(block, "conv_q_left"):
        seq = block.layout == "sequential"
        sp = block.spatial_mask(x * ch if seq else x)
        note = f"spatial-only gate A_sp ({block.formulation} formulation)"
        note += "; of the channel-gated features (sequential)" if seq else ""
        if block.variant == "official_p":
            note += "; official PSA_p: sigmoid(softmax over N), nearly constant ~0.5"
        parts.append(MapPart("spatial_gate", sp, "spatial", note))
    return parts


@map_for(AttentionModule)
def residual_attention_map(block: AttentionModule, args, kwargs, output, cells) -> list[MapPart]:
    """The soft mask M of H = (1 + M) * T (one gate per channel and position)."""
    return [MapPart("mixed_gate", block.mask(block.shared(args[0])),
                    note="soft mask M in H = final((1 + M) * trunk); mean over C for one map per position")]


@map_for(EMAUnit)
def ema_map(block: EMAUnit, args, kwargs, output, cells) -> list[MapPart]:
    """The last E-step's responsibilities z (softmax over the K bases), the weights of the reconstruction."""
    x = args[0]
    b, c, h, w = x.shape
    feats = block.conv1(x).reshape(b, c, h * w)
    feats = feats.float() if feats.dtype in (torch.float16, torch.bfloat16) else feats
    mu0 = block.mu.to(feats.dtype).expand(b, -1, -1)
    _, z = em_iterations(feats, mu0, block.iterations, block.eps)  # (B, N, K)
    return [MapPart("assignment", z.transpose(1, 2).reshape(b, -1, h, w),
                    note=f"responsibilities of the {block.num_bases} bases at EM iteration {block.iterations} "
                         "(softmax over the bases: sums to 1 per pixel)")]


@map_for(ObjectContextBlock)
def ocr_map(block: ObjectContextBlock, args, kwargs, output, cells) -> list[MapPart]:
    """"regions": the soft object regions softmax over the pixels of scale * logits_k (each sums to 1 over
    the pixels); "pixel_region": each pixel's attention over the K regions (sums to 1 over K)."""
    feats = args[0]
    logits = args[1] if len(args) > 1 else kwargs["region_logits"]
    b, k, h, w = logits.shape
    probs = torch.softmax(logits.flatten(2).float() * block.scale, dim=-1).reshape(b, k, h, w)
    sab = block.object_context_block
    regions = spatial_gather(feats, logits, block.scale)                       # (B, C, K, 1)
    q = map_to_tokens(sab.f_query(feats))[:, 0].float()                        # (B, N, key)
    kk = map_to_tokens(sab.f_key(regions))[:, 0].float()                       # (B, K, key)
    attn = torch.softmax(torch.matmul(q, kk.transpose(1, 2)) * sab.scale, dim=-1)
    return [MapPart("assignment", probs, "regions", "soft object regions: softmax over the pixels of each "
                                                    "region's logits (each sums to 1 over the pixels)"),
            MapPart("assignment", attn.transpose(1, 2).reshape(b, k, h, w), "pixel_region",
                    "pixel-to-region attention: softmax over the K regions (sums to 1 per pixel)")]
