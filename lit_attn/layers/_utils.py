"""Small helpers shared by the blocks: input checks and timm-compatible argument handling."""
from __future__ import annotations

from timm.layers import register_notrace_function
from torch import Tensor, nn


@register_notrace_function  # a leaf for timm's FX tracing (it reads shapes, which are Proxies there)
def check_input(block: nn.Module, x: Tensor, channels: int, what: str | None = None) -> None:
    """Raise a ValueError naming `block` (and the argument `what`, for blocks with several inputs) unless x
    is a non-empty (B, channels, H, W) tensor."""
    name = type(block).__name__
    if not isinstance(x, Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        as_what = f"`{what}` as " if what else ""
        raise ValueError(f"{name} expects {as_what}a 4-D (B, C={channels}, H, W) tensor, got {shape}")
    if x.shape[1] != channels:
        built = (f"`{what}` with C={channels} channels, got C=" if what
                 else f"C={channels} channels, got an input with C=")
        raise ValueError(f"{name} was built for {built}{x.shape[1]} (shape {tuple(x.shape)})")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        arg = f"`{what}`" if what else "input"
        raise ValueError(f"{name} got an empty {arg} of shape {tuple(x.shape)}; B, H and W must be >= 1")


def check_channels(block_name: str, channels: int, **divisors: int) -> None:
    """Raise a ValueError unless `channels` is a positive int divisible by each given divisor."""
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"{block_name} needs a positive integer channel count, got {channels!r}")
    for what, d in divisors.items():
        if d < 1 or channels % d:
            raise ValueError(f"{block_name}: channels={channels} must be divisible by {what}={d}")


def factory(device=None, dtype=None) -> dict:
    """The `device`/`dtype` keyword arguments that timm passes to every layer."""
    return {"device": device, "dtype": dtype}


def reset_block(block: nn.Module) -> None:
    """Re-initialise `block` as its constructor left it: every module in it, innermost first, that has a
    `reset_parameters` (torch layers: PyTorch's default init; lit_attn modules: their own init) runs it,
    so each lit_attn module's specific init (zero gammas, zero-init BN, official std) is applied after
    the defaults of the layers it holds."""
    for m in reversed(list(block.modules())):
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()


class TimmInitHooks:
    """timm's weight-init hooks for a lit_attn block, so that the block keeps its own init inside a timm model.

    timm models initialise every layer they hold, the blocks' layers included, and overwrite the block's
    init (zero gammas / zero-init BN or convs, the official stds): ResNet kaiming-initialises every Conv2d
    and then calls `m.zero_init_last()` on each module that has it (when `zero_init_last=True`, its
    default); byobnet (gernet, regnetz, ...) re-initialises convs and sets every BatchNorm2d weight to 1,
    then calls `m.init_weights(zero_init_last=...)` on each module that has it, children first;
    efficientnet / mobilenetv3 do the same and call `m.init_weights()`; regnet calls `m.zero_init_last()`.
    Both hooks re-apply the block's own init (`reset_block`). `zero_init_last` is the host's setting for
    its own residual branches: the block's init is the method's (paper / official code) either way, so the
    argument is accepted and does not change it. The block defines `reset_parameters()` for its specific
    init (the layers it does not mention keep PyTorch's defaults)."""

    def init_weights(self, zero_init_last: bool = True) -> None:
        """timm's byobnet / efficientnet hook: re-apply the block's own init (see the class docstring)."""
        reset_block(self)

    def zero_init_last(self) -> None:
        """timm's ResNet / RegNet hook: re-apply the block's own init (see the class docstring)."""
        reset_block(self)
