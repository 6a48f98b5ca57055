"""Attention primitives shared by lit_attn's blocks (see DESIGN.md: the maths lives here)."""
from .attention import chunked_attention, global_attention, map_to_tokens, tokens_to_map

__all__ = ["chunked_attention", "global_attention", "map_to_tokens", "tokens_to_map"]
