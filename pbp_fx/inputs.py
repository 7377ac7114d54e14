"""Input signatures for checkpoints: what a model was captured with, as JSON, and stand-in inputs rebuilt from it.

    sig = describe_inputs(model, (x,), {"mask": m})
    # {"names": ["x"], "args": [{"kind": "tensor", "shape": [4, 40], "batch_axis": 0, "dtype": "float32"}],
    #  "kwargs": {"mask": {...}}}
    args, kwargs = inputs_from_signature(sig)      # same shapes and dtypes, fixed values

A checkpoint stores the signature so that a model is re-captured without the caller
supplying example inputs again. Axis 0 of every tensor with at least one dimension is the
batch axis (the convention of the exporters' dynamic batch).
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Any, Optional

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import CheckpointError

__all__ = ["describe_inputs", "inputs_from_signature", "same_pattern", "opaque_holder", "positional_names"]


def opaque_holder(value: Any, dataclasses_only: bool = False) -> Optional[str]:
    """The type name of an object in `value` that holds tensors pytree cannot reach (in its attributes: a
    dataclass not registered with torch.export.register_dataclass, a config object), else None: a capture
    takes such an object as one constant, tensors and all, and an ONNX file cannot take it as an input.
    dataclasses_only: only such a dataclass (which registering opens)."""
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor) or leaf is None or isinstance(leaf, (bool, int, float, str)):
            continue
        if dataclasses_only and not (dataclasses.is_dataclass(leaf) and not isinstance(leaf, type)):
            continue
        fields = vars(leaf).values() if hasattr(leaf, "__dict__") else ()
        if any(isinstance(t, torch.Tensor) for v in fields for t in pytree.tree_leaves(v)):
            return type(leaf).__name__
    return None


def _describe(value: Any) -> dict:
    if isinstance(value, torch.Tensor):
        return {"kind": "tensor", "shape": list(value.shape), "batch_axis": 0 if value.dim() else None,
                "dtype": str(value.dtype).replace("torch.", "")}
    if value is None:
        return {"kind": "none"}
    if isinstance(value, (bool, int, str)) or (isinstance(value, float) and value == value):
        return {"kind": "value", "value": value}
    # A dict (string keys: JSON's), list or tuple of inputs, as a batch dict: its parts, in order.
    if type(value) is dict and all(isinstance(k, str) for k in value):
        return {"kind": "dict", "items": {k: _describe(v) for k, v in value.items()}}
    if type(value) in (list, tuple):
        return {"kind": type(value).__name__, "items": [_describe(v) for v in value]}
    # A namedtuple or dataclass: its class by where it is defined (rebuilt where it can be imported), its
    # fields in order.
    cls = type(value)
    if isinstance(value, tuple) and hasattr(cls, "_fields"):
        fields = [(f, getattr(value, f)) for f in cls._fields]
    elif dataclasses.is_dataclass(value):
        fields = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value) if f.init]
    else:
        return {"kind": "unsupported", "type": cls.__name__}
    return {"kind": "record", "type": cls.__name__, "module": cls.__module__, "qualname": cls.__qualname__,
            "fields": [[name, _describe(v)] for name, v in fields]}


def _record_class(entry: dict, where: str) -> type:
    """The namedtuple or dataclass a recorded input was, looked up in the modules this process has imported
    (the model file's, __main__): a checkpoint names it, so nothing is imported for it and nothing but a
    namedtuple or dataclass is built (a crafted file naming subprocess.Popen must not run)."""
    cls = sys.modules.get(entry["module"])
    for part in entry["qualname"].split("."):  # (through __dict__: a module's lazy __getattr__ would import)
        cls = getattr(cls, "__dict__", {}).get(part)
    record = isinstance(cls, type) and ((issubclass(cls, tuple) and hasattr(cls, "_fields"))
                                        or dataclasses.is_dataclass(cls))
    if not record:
        raise CheckpointError(f"the recorded input {where} is a {entry['type']} ({entry['module']}."
                              f"{entry['qualname']}), which is no namedtuple or dataclass this process has imported: "
                              "import its module before load() (a model file's: "
                              "pbp_fx.modelfile.load_model_file(path)), or pass example_inputs / example_kwargs")
    return cls


def positional_names(model: nn.Module, count: int) -> list[str]:
    """The names of `count` positional inputs of model.forward (`arg<i>` past its named parameters)."""
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return [params[i] if i < len(params) else f"arg{i}" for i in range(count)]


def describe_inputs(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """JSON description of example inputs: positional names, shapes (batch axis marked), dtypes."""
    return {"names": positional_names(model, len(args)), "args": [_describe(a) for a in args],
            "kwargs": {k: _describe(v) for k, v in kwargs.items()}}


def _rebuild(entry: dict, where: str, generator: torch.Generator):
    kind = entry.get("kind")
    if kind == "none":
        return None
    if kind == "value":
        return entry["value"]
    if kind == "dict":
        return {k: _rebuild(e, f"{where}[{k!r}]", generator) for k, e in entry["items"].items()}
    if kind in ("list", "tuple"):
        parts = [_rebuild(e, f"{where}[{i}]", generator) for i, e in enumerate(entry["items"])]
        return parts if kind == "list" else tuple(parts)
    if kind == "record":
        cls = _record_class(entry, where)
        values = {name: _rebuild(e, f"{where}.{name}", generator) for name, e in entry["fields"]}
        return cls(**values)
    if kind != "tensor":
        raise CheckpointError(f"the recorded input {where} is a {entry.get('type', kind)}, which cannot be rebuilt: "
                              "pass example_inputs / example_kwargs to load()")
    dtype = getattr(torch, entry["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"the recorded input {where} has dtype {entry['dtype']!r}, unknown to this torch: "
                              "pass example_inputs / example_kwargs to load()")
    shape = tuple(entry["shape"])
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=generator).to(dtype)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)  # integer ids: 0 is a valid index of every table


def inputs_from_signature(signature: dict) -> tuple[tuple, dict]:
    """Stand-in (args, kwargs) with the recorded shapes and dtypes (fixed values, the global RNG untouched)."""
    g = torch.Generator().manual_seed(0)
    names = signature.get("names") or []
    args = tuple(_rebuild(e, repr(names[i]) if i < len(names) else f"#{i}", g)
                 for i, e in enumerate(signature.get("args", [])))
    kwargs = {k: _rebuild(e, repr(k), g) for k, e in signature.get("kwargs", {}).items()}
    return args, kwargs


def same_pattern(a: dict, b: dict) -> bool:
    """Whether two input signatures give a capture the same inputs apart from the batch size and the
    floating dtype: the same positional and keyword inputs, each of the same kind, rank and other dims."""
    def pattern(entry: dict):
        if entry.get("kind") == "dict":
            return "dict", tuple((k, pattern(e)) for k, e in entry["items"].items())
        if entry.get("kind") in ("list", "tuple"):
            return entry["kind"], tuple(pattern(e) for e in entry["items"])
        if entry.get("kind") == "record":
            return "record", entry["module"], entry["qualname"], tuple((n, pattern(e)) for n, e in entry["fields"])
        if entry.get("kind") != "tensor":
            return entry.get("kind"), entry.get("value", entry.get("type"))
        dtype = getattr(torch, entry.get("dtype", ""), None)
        floating = isinstance(dtype, torch.dtype) and (dtype.is_floating_point or dtype.is_complex)
        shape = entry.get("shape", [])
        return "tensor", "float" if floating else entry.get("dtype"), len(shape), tuple(shape[1:])

    def patterns(sig: dict):
        return ([pattern(e) for e in sig.get("args", [])],
                {k: pattern(e) for k, e in sig.get("kwargs", {}).items()})

    return patterns(a) == patterns(b)
