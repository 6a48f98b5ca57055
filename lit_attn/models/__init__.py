"""timm model entrypoints registered by lit_attn (they appear in `timm.list_models()`)."""
from . import aa_resnet, hrnet_psa, lit_resnet, resattnet  # noqa: F401
