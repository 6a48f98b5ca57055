"""The maps API: `BlockMap`, the `map_for` declarations, query placement and `attention_maps`.

`attention_maps(model, images)` runs the model once (eval mode, no_grad) with a forward hook on every
lit_attn block (every module whose class is in the block registry and that sits in no other block), then
computes, from each block's captured input and its own parameters, the map the block declared with
`@map_for(BlockClass)`; a block that declares none gets the fallback ||block(x) - x|| over the channels.
Position attention is evaluated for the chosen query pixels only (their rows of the attention matrix),
so no N x N tensor is ever built (N = h*w). Cost: one forward, plus per block about what the block's
own attention costs for Q queries (O(Q N C) for the dense ones).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import _REGISTRY

# what a map holds, by kind (B = batch, Q = queries, K = bases / regions, C = channels)
KINDS = {
    "query_attention": "(B, Q, h, w): the attention row of each query pixel over the key grid",
    "channel_gate": "(B, C): the per-channel gate the block multiplies by",
    "spatial_gate": "(B, 1, h, w): the per-position gate the block multiplies by",
    "shared_attention": "(B, 1, h, w): one softmax over the positions, the same for every query (attention pooling)",
    "mixed_gate": "(B, C, h, w): an independent gate per channel and position",
    "assignment": "(B, K, h, w): soft assignment of the pixels to K bases / regions",
    "channel_affinity": "(B, C, C): the channel-to-channel attention matrix (rows: output channels)",
    "residual_norm": "(B, 1, h, w): fallback ||block(x) - x|| over the channels",
    "none": "no map (the fallback needs an output of the input's shape)",
}


@dataclass
class BlockMap:
    """One map of one block: `map` (shape per `kind`, see `KINDS`) at the feature resolution
    `feature_size`; `queries` the (row, col) feature cells of the query pixels for "query_attention" maps
    (on the block's input grid; the map itself is on the key grid, `feature_size`); `image_size` the input
    image's (H, W), so that `to_image()` shows a spatial map over the image. `label` tells the maps of
    one block apart (e.g. "pam" / "cam"); `note` says how to read it (and "fallback: ..." for blocks that
    declare no map)."""

    path: str
    name: str
    kind: str
    map: Tensor | None
    feature_size: tuple[int, int] | None
    image_size: tuple[int, int]
    queries: list[tuple[int, int]] | None = None
    label: str | None = None
    note: str = ""

    def to_image(self) -> Tensor:
        """The spatial map upsampled bilinearly to the image size (see `to_image`)."""
        if self.map is None or self.map.ndim != 4:
            raise ValueError(f"BlockMap {self.path!r} of kind {self.kind!r} has no spatial map to upsample")
        return to_image(self.map, self.image_size)


@dataclass
class MapPart:
    """What a map function returns for one map: kind, tensor, optional label and note."""

    kind: str
    map: Tensor
    label: str | None = None
    note: str = ""


# block class -> fn(block, args, kwargs, output, cells) -> list[MapPart]; `cells` (Q, 2) long feature cells
_MAP_FUNCTIONS: dict[type, Callable[..., list[MapPart]]] = {}


def map_for(*classes: type) -> Callable:
    """Declare `fn(block, args, kwargs, output, cells) -> list[MapPart]` as the map of blocks of `classes`."""

    def add(fn):
        for c in classes:
            _MAP_FUNCTIONS[c] = fn
        return fn

    return add


def supported_blocks() -> list[str]:
    """The registered block names whose class declares a map (the others get the fallback)."""
    return sorted(e.name for e in _REGISTRY.values() if _map_function(e.cls) is not None)


def _map_function(cls) -> Callable | None:
    for c in getattr(cls, "__mro__", ()):
        if c in _MAP_FUNCTIONS:
            return _MAP_FUNCTIONS[c]
    return None


def block_classes() -> tuple[type, ...]:
    """Every registered block class (lit_attn's and timm's)."""
    return tuple({e.cls for e in _REGISTRY.values() if isinstance(e.cls, type)})


def registry_name(block: nn.Module) -> str:
    """The registered name of `block`: the entry of its class whose bound defaults it matches."""
    entries = [e for e in _REGISTRY.values() if e.cls is type(block)]
    for e in entries:
        if all(getattr(block, k, None) == v for k, v in e.defaults.items()):
            return e.name
    return entries[0].name if entries else type(block).__name__


def to_image(map_: Tensor, image_size: Sequence[int]) -> Tensor:
    """A (B, K, h, w) map upsampled bilinearly (align_corners=False) to the image's (H, W)."""
    if not isinstance(map_, Tensor) or map_.ndim != 4:
        raise ValueError(f"to_image expects a (B, K, h, w) map, got {getattr(map_, 'shape', type(map_).__name__)}")
    return F.interpolate(map_.float(), size=tuple(image_size), mode="bilinear", align_corners=False)


def feature_cells(queries: Sequence[Sequence[int]], image_size: Sequence[int], feature_size: Sequence[int]) -> Tensor:
    """(Q, 2) feature cells of image pixels (row, col): floor(row * h / H), floor(col * w / W), the cell whose
    image footprint holds the pixel when the features tile the image (stride H / h)."""
    (ih, iw), (fh, fw) = image_size, feature_size
    return torch.tensor([[min(fh - 1, r * fh // ih), min(fw - 1, c * fw // iw)] for r, c in queries], dtype=torch.long)


def _check_queries(queries, image_size) -> list[tuple[int, int]]:
    ih, iw = image_size
    if queries is None:
        return [(ih // 2, iw // 2)]
    out = []
    for q in queries:
        if len(q) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in q) \
                or not (0 <= q[0] < ih and 0 <= q[1] < iw):
            raise ValueError(f"attention_maps: queries must be (row, col) integer pixels of the {ih}x{iw} image, "
                             f"got {q!r}")
        out.append((int(q[0]), int(q[1])))
    if not out:
        raise ValueError("attention_maps: queries is empty (None means the image centre)")
    return out


def find_blocks(model: nn.Module, blocks: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """The outermost registered blocks of `model` by module path, optionally only those whose path or
    registered name is in `blocks`."""
    classes = block_classes()
    found: dict[str, nn.Module] = {}
    for path, m in model.named_modules():
        if isinstance(m, classes) and not any(path.startswith(p + ".") or p == "" for p in found):
            found[path] = m
    if blocks is not None:
        wanted = set(blocks)
        found = {p: m for p, m in found.items() if p in wanted or registry_name(m) in wanted}
    return found


def _fallback(block: nn.Module, args, kwargs, output) -> list[MapPart]:
    x = args[0] if args else None
    if isinstance(x, Tensor) and isinstance(output, Tensor) and output.shape == x.shape and x.ndim == 4:
        return [MapPart("residual_norm", (output - x).float().norm(dim=1, keepdim=True),
                        note="fallback: this block declares no map; ||block(x) - x|| over the channels")]
    return [MapPart("none", None, note="fallback: this block declares no map and its output is not of its "
                                       "input's shape, so ||block(x) - x|| is undefined")]


def attention_maps(model: nn.Module, images: Tensor, queries: Sequence[Sequence[int]] | None = None,
                   blocks: Iterable[str] | None = None) -> dict[str, BlockMap]:
    """Per lit_attn block of `model`, what it computes on `images` (B, 3, H, W): {key: BlockMap}, the key
    the block's module path, suffixed ":label" for blocks with several maps (e.g. DANet's ":pam", ":cam").

    The model runs once in eval mode under no_grad (its training flag is restored afterwards); `queries` are
    (row, col) image pixels (default: the centre), placed on each block's grid by `feature_cells`; `blocks`
    keeps only the blocks with these paths or registered names. A block called several times is mapped on its
    first call (the note says so). No N x N tensor is built (see the module docstring).
    """
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError(f"attention_maps expects images (B, C, H, W), got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    image_size = (int(images.shape[-2]), int(images.shape[-1]))
    queries = _check_queries(queries, image_size)
    found = find_blocks(model, blocks)
    calls: dict[str, list] = {p: [] for p in found}

    def hook_for(path):
        def hook(module, args, kwargs, output):
            calls[path].append((args, kwargs, output))
        return hook

    handles = [m.register_forward_hook(hook_for(p), with_kwargs=True) for p, m in found.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(images)
            return _compute(found, calls, queries, image_size)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def _compute(found, calls, queries, image_size) -> dict[str, BlockMap]:
    result: dict[str, BlockMap] = {}
    for path, block in found.items():
        name = registry_name(block)
        if not calls[path]:
            result[path] = BlockMap(path, name, "none", None, None, image_size, note="the block did not run")
            continue
        args, kwargs, output = calls[path][0]
        x = args[0] if args else next(iter(kwargs.values()))
        grid = tuple(x.shape[-2:]) if isinstance(x, Tensor) and x.ndim == 4 else None
        cells = feature_cells(queries, image_size, grid) if grid else None
        fn = _map_function(type(block))
        parts = fn(block, args, kwargs, output, cells) if fn is not None else _fallback(block, args, kwargs, output)
        repeat = f" (the block ran {len(calls[path])} times: maps of its first call)" if len(calls[path]) > 1 else ""
        for part in parts:
            key = path if part.label is None else f"{path}:{part.label}"
            spatial = part.map is not None and part.map.ndim == 4
            result[key] = BlockMap(
                path, name, part.kind, part.map, tuple(part.map.shape[-2:]) if spatial else grid, image_size,
                queries=[tuple(c) for c in cells.tolist()] if part.kind == "query_attention" else None,
                label=part.label, note=(part.note + repeat).strip())
    return result
