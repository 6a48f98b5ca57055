"""See the attention: per block of a model, what the block computes on an image.

    maps = lit_attn.maps.attention_maps(model, images, queries=[(40, 20)])
    for key, m in maps.items():
        print(key, m.name, m.kind, tuple(m.map.shape), m.note)
    heat = maps["layer3.1.context"].to_image()       # (B, Q, H, W) over the image

Blocks declare their maps with `@map_for(BlockClass)` (`supported_blocks()` lists them); the others
get the fallback ||block(x) - x||. Position attention gives the rows of the query pixels only (no N x N).
"""
from . import context, gates, lowrank, position, psanet  # noqa: F401  (declare the maps)
from .core import (
    KINDS,
    BlockMap,
    MapPart,
    attention_maps,
    feature_cells,
    find_blocks,
    map_for,
    supported_blocks,
    to_image,
)

__all__ = ["KINDS", "BlockMap", "MapPart", "attention_maps", "feature_cells", "find_blocks", "map_for",
           "supported_blocks", "to_image"]
