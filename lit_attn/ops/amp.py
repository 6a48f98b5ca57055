"""Autocast helpers that accept every device type, the meta device included.

`torch.autocast(device_type, ...)` raises for device types without an autocast backend ("meta": timm's
default-cfg test builds models on the meta device and runs a forward there), and so does
`torch.is_autocast_enabled(device_type)`. The blocks turn autocast off around their fp32 sections
through `no_autocast(x.device)` and read the autocast dtype through `autocast_dtype(device)`; on a
device type without autocast there is nothing to turn off, and autocast is never on.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["autocast_device_type", "autocast_dtype", "no_autocast"]


def autocast_device_type(device: torch.device | str) -> str | None:
    """The device type as torch.autocast takes it, or None for a device type autocast does not know (meta)."""
    dev_type = device if isinstance(device, str) else device.type
    return dev_type if torch.amp.is_autocast_available(dev_type) else None


class _ScriptedNoAutocast:
    """What `no_autocast` is in a TorchScript-compiled module: a no-op context (TorchScript compiles neither
    torch.autocast with a run-time device type nor contextlib; a scripted module runs in its own dtype)."""

    def __init__(self):
        pass

    def __enter__(self):
        pass

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any):
        pass


def no_autocast(device: torch.device):
    """`torch.autocast(device.type, enabled=False)`, or a no-op context for a device type without autocast
    (and under TorchScript)."""
    if torch.jit.is_scripting():
        return _ScriptedNoAutocast()
    dev_type = autocast_device_type(device)
    return torch.autocast(dev_type, enabled=False) if dev_type is not None else contextlib.nullcontext()


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype while autocast is enabled for the device's type, else None (always None on meta)."""
    dev_type = autocast_device_type(device)
    if dev_type is None or not torch.is_autocast_enabled(dev_type):
        return None
    return torch.get_autocast_dtype(dev_type)
