"""lit_attn's attention blocks; importing this package registers them."""
from . import aa_conv, danet, non_local, psa, residual_attention, timm_blocks  # noqa: F401
