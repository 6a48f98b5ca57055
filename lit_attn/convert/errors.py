"""The expected failures of a conversion, each a `ConvertError` whose message says what went wrong and what to do
(the CLI prints it without a traceback and exits with `exit_code`)."""
from __future__ import annotations

__all__ = ["ConvertError", "CorruptCheckpointError", "KeyMappingError", "NotMMSegCheckpointError",
           "NotPSACheckpointError", "UnsupportedModelError"]


class ConvertError(Exception):
    """A conversion that cannot be done; `kind` names the reason in a word."""

    kind = "error"
    exit_code = 1


class CorruptCheckpointError(ConvertError):
    """The file cannot be read as a PyTorch checkpoint (missing, truncated, not a `torch.save` file)."""

    kind = "corrupt"
    exit_code = 2


class NotMMSegCheckpointError(ConvertError):
    """A readable checkpoint that is not mmsegmentation's (a timm / torchvision state dict, a Lightning checkpoint,
    a pickle of arbitrary Python objects, ...)."""

    kind = "not-mmseg"
    exit_code = 3


class NotPSACheckpointError(ConvertError):
    """A readable checkpoint that is not an NVIDIA semantic-segmentation / DeLightCMU PSA OCRNet or MscaleOCR one
    (no `backbone.*` + `ocr.*` state dict, or arbitrary pickled Python objects)."""

    kind = "not-psa"
    exit_code = 3


class UnsupportedModelError(ConvertError):
    """An mmsegmentation checkpoint of a model lit_attn does not convert (another decode head, another backbone,
    a configuration our architecture cannot reproduce)."""

    kind = "unsupported"
    exit_code = 4


class KeyMappingError(ConvertError):
    """State-dict keys that map to nothing, model keys that nothing maps to, or shapes that differ."""

    kind = "mapping"
    exit_code = 5
