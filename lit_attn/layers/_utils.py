"""Small helpers shared by the blocks: input checks and timm-compatible argument handling."""
from __future__ import annotations

from torch import Tensor, nn


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
