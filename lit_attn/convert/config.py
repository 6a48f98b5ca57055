"""The model config an mmseg checkpoint carries in its metadata, read without executing it.

mmseg 0.x saves the resolved config text as `meta["config"]` (mmcv's `Config.pretty_text`), mmseg 1.x as
`meta["cfg"]` (mmengine's); both are Python source made of `name = dict(...)` assignments. `parse_config` walks its
syntax tree and keeps literals only (numbers, strings, tuples, lists, dicts, `dict(...)` calls, names assigned
earlier); anything else (a comprehension, a call to another function) becomes `UNKNOWN`. Nothing is evaluated.
"""
from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any

__all__ = ["UNKNOWN", "config_text", "mmseg_version", "model_config", "parse_config"]


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = _Unknown()


def _literal(node: ast.AST, names: dict[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_literal(e, names) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):  # {**other}
            return UNKNOWN
        return {_literal(k, names): _literal(v, names) for k, v in zip(node.keys, node.values, strict=True)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        if any(kw.arg is None for kw in node.keywords):  # dict(**other)
            return UNKNOWN
        return {kw.arg: _literal(kw.value, names) for kw in node.keywords}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _literal(node.operand, names)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return -v if isinstance(node.op, ast.USub) else v
        return UNKNOWN
    if isinstance(node, ast.Name):
        return names.get(node.id, UNKNOWN)
    return UNKNOWN


def parse_config(text: str) -> dict[str, Any]:
    """{name: value} of the top-level `name = <literal>` assignments of an mmseg config text ({} if the text is
    not Python)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return {}
    names: dict[str, Any] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            names[stmt.targets[0].id] = _literal(stmt.value, names)
    return names


def config_text(meta: Mapping[str, Any]) -> str | None:
    """The config text of an mmseg checkpoint's meta (0.x `config`, 1.x `cfg`), None when absent."""
    for key in ("config", "cfg"):
        value = meta.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return None


def model_config(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The `model = dict(...)` of the checkpoint's config (a dict, values possibly `UNKNOWN`), None without one."""
    for key in ("config", "cfg"):
        value = meta.get(key)
        if isinstance(value, Mapping) and isinstance(value.get("model"), Mapping):
            return dict(value["model"])
    text = config_text(meta)
    if text is None:
        return None
    model = parse_config(text).get("model")
    return model if isinstance(model, dict) else None


def mmseg_version(meta: Mapping[str, Any]) -> tuple[str | None, str]:
    """(version, where it came from): mmseg 0.x meta has `mmseg_version` ("0.30.0+abc"); mmengine-era (1.x) meta
    has `mmengine_version` (and no mmseg_version); (None, "no version in meta") otherwise."""
    version = meta.get("mmseg_version")
    if isinstance(version, str) and version:
        return version, "meta['mmseg_version']"
    if isinstance(meta.get("mmengine_version"), str):
        return "1.x", f"meta['mmengine_version'] = {meta['mmengine_version']!r} (an mmengine-era, 1.x checkpoint)"
    return None, "no mmseg_version / mmengine_version in meta"
