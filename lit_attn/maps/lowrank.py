"""Maps of the low-rank blocks, which route every pixel through K global descriptors / nodes: A^2-Net's gather
and distribute attentions, GloRe's pixel-to-node projection and LatentGNN's visible-to-latent (and
latent-to-visible) adjacencies. Each is a (B, K, h, w) "assignment" map, computed as the block computes it
from its captured input; O(N C K), no N x N term.
"""
from __future__ import annotations

import torch.nn.functional as F

from ..layers.double_attn import DoubleAttention
from ..layers.glore import GloReUnit
from ..layers.latentgnn import LatentGNN
from .core import MapPart, map_for
from .position import _acc


@map_for(DoubleAttention)
def a2_map(block: DoubleAttention, args, kwargs, output, cells) -> list[MapPart]:
    """"gather": the n attention maps softmax over the positions of conv_b(x) (each sums to 1 over the pixels:
    descriptor k = sum_j gather_kj a_j); "distribute": softmax over the n descriptors of conv_v(x) at each pixel
    (sums to 1 over n: z_i = sum_k distribute_ki G_k)."""
    x = args[0]
    gather = _acc(block.conv_b(x)).flatten(2).softmax(-1).unflatten(-1, x.shape[-2:])
    distribute = _acc(block.conv_v(x)).softmax(1)
    return [MapPart("assignment", gather, "gather", "gathering attention: softmax over the pixels per descriptor"),
            MapPart("assignment", distribute, "distribute",
                    "distribution attention: softmax over the descriptors per pixel")]


@map_for(GloReUnit)
def glore_map(block: GloReUnit, args, kwargs, output, cells) -> list[MapPart]:
    """The projection B = conv_proj(x): node k gathers sum_j B_kj (state of pixel j), and the reverse projection
    gives pixel j sum_k B_kj (node k). Signed and unnormalised, as the block uses it (no softmax)."""
    note = "pixel-to-node projection B = conv_proj(x) (signed, no softmax; the reverse projection uses it too)"
    if block.normalize:
        note += "; node features divided by H*W"
    return [MapPart("assignment", _acc(block.conv_proj(args[0])), note=note)]


@map_for(LatentGNN)
def latentgnn_map(block: LatentGNN, args, kwargs, output, cells) -> list[MapPart]:
    """Per kernel the visible-to-latent adjacency psi(x') (L2-normalised over the pixels, asymmetric mode; over
    the nodes, symmetric, where it is also the latent-to-visible one) and, asymmetric, the latent-to-visible
    adjacency (L2-normalised over the nodes). x' the block's reduced features, L2-normalised over channels."""
    x = args[0]
    asymmetric = block.mode == "asymmetric"
    if asymmetric:
        v2l, l2v = (F.normalize(_acc(m(x)), dim=1).to(x.dtype)
                    for m in (block.down_channel_v2l, block.down_channel_l2v))
    else:
        v2l = l2v = F.normalize(_acc(block.down_channel(x)), dim=1).to(x.dtype)
    parts = []
    for i in range(len(block.latent_dims)):
        kernel = getattr(block, f"LatentGNN_Kernel_{i}")
        suffix = str(i) if len(block.latent_dims) > 1 else ""
        if asymmetric:
            adj = F.normalize(_acc(kernel.psi_v2l(v2l)).flatten(2), dim=2).unflatten(-1, x.shape[-2:])
            parts.append(MapPart("assignment", adj, "v2l" + suffix,
                                 "visible-to-latent adjacency (L2-normalised over the pixels per node)"))
            back = F.normalize(_acc(kernel.psi_l2v(l2v)), dim=1)
            parts.append(MapPart("assignment", back, "l2v" + suffix,
                                 "latent-to-visible adjacency (L2-normalised over the nodes per pixel)"))
        else:
            parts.append(MapPart("assignment", F.normalize(_acc(kernel.psi(v2l)), dim=1), "v2l" + suffix,
                                 "symmetric adjacency, both directions (L2-normalised over the nodes per pixel)"))
    return parts
