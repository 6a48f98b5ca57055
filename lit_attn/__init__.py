"""lit_attn: the attention blocks of the computer-vision literature as timm layers, smp heads and
Lightning recipes.

    import timm, lit_attn
    timm.create_model("resnet50", block_args={"attn_layer": "psa_p"})
    lit_attn.create_attn("nonlocal", 256)
"""
from . import layers  # noqa: F401  (registers the blocks)
from .integrations import timm as _timm_integration
from .registry import AttnEntry, create_attn, get_attn_entry, is_attn, list_attn, register_attn

_timm_integration.install()

from . import models  # noqa: E402,F401  (registers timm model variants)
from .integrations import smp as _smp_integration  # noqa: E402

_smp_integration.install()
from .maps import attention_maps  # noqa: E402,F401  (lit_attn.maps: see the attention)
from .segment import segment_image  # noqa: E402,F401  (image in, mask out)

__version__ = "0.1.0"
__all__ = ["AttnEntry", "create_attn", "get_attn_entry", "is_attn", "list_attn", "register_attn"]
