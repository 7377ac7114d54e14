"""Tracing: torch.fx symbolic tracing with a leaf policy for untraceable submodules.

A submodule whose forward cannot be traced (data-dependent control flow and the like) is
retried as a leaf: it stays one `call_module` node, and `perforate` reaches the neurons
inside it by module swapping. When the failing code is the root's own forward, nothing
can be isolated and `TraceError` names the module and the line.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import traceback
from typing import Iterable, Optional

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import TraceError

__all__ = ["PBTracer", "trace", "TraceError"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PBTracer(fx.Tracer):
    """fx Tracer that treats `leaves` (qualified names) and pbp-fx's own modules as leaves,
    and records the innermost module whose forward raised while being traced."""

    def __init__(self, leaves: Iterable[str] = ()):
        super().__init__()
        self.leaves = set(leaves)
        self.failed_module: Optional[str] = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from .site import FusedSite, Site, SwappedNeuron

        if qualname in self.leaves or isinstance(m, (Site, FusedSite, SwappedNeuron)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # the innermost module sees the error first
                self.failed_module = self.path_of_module(m)
            raise


def _user_frame(exc: BaseException) -> str:
    """file:line of the last traceback frame in user code (not torch, not pbp-fx)."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        f = os.path.abspath(frame.filename)
        if not f.startswith(_TORCH_DIR) and not f.startswith(os.path.join(_OWN_DIR, "pbp_fx")):
            return f"{frame.filename}:{frame.lineno}"
    return "<unknown line>"


def _reason(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def trace(model: nn.Module, example_inputs: Optional[tuple] = None, *,
          leaves: Iterable[str] = (), max_leaves: int = 64) -> fx.GraphModule:
    """Symbolically trace `model` into a GraphModule that shares its submodules.

    Untraceable submodules become leaves (listed in `gm.meta["pbp_leaves"]`). With
    `example_inputs`, shapes are propagated into `node.meta["tensor_meta"]` (the model's
    train/eval state and buffers are left as they were).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace() needs an nn.Module, got {type(model).__name__}")
    leaves = set(leaves)
    added: list[str] = []
    while True:
        tracer = PBTracer(leaves)
        try:
            graph = tracer.trace(model)
            break
        except Exception as exc:  # noqa: BLE001 - any tracing failure is reported or isolated
            where = tracer.failed_module
            if not where:
                raise TraceError(
                    f"cannot trace {type(model).__name__}.forward ({_reason(exc)}) at {_user_frame(exc)}: "
                    "the failing code is in the root module, so it cannot be isolated as a leaf; "
                    "move it into a submodule or make it traceable") from exc
            if where in leaves or len(added) >= max_leaves:
                raise TraceError(f"cannot trace module {where!r} ({_reason(exc)}) at {_user_frame(exc)}") from exc
            leaves.add(where)
            added.append(where)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta["pbp_leaves"] = sorted(leaves)
    gm.meta["pbp_untraceable"] = list(added)
    if example_inputs is not None:
        propagate_shapes(gm, example_inputs)
    return gm


class _ShapeProp(ShapeProp):
    """ShapeProp that remembers the node it is running (to name it in errors)."""

    node: Optional[fx.Node] = None

    def run_node(self, n: fx.Node):
        self.node = n
        return super().run_node(n)


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Record tensor shapes in node.meta without changing any module state."""
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    modes = {m: m.training for m in gm.modules()}
    buffers = {name: b.detach().clone() for name, b in gm.named_buffers()}
    prop = _ShapeProp(gm)
    # ShapeProp prints a traceback to stderr before it raises: keep stderr until we know.
    err = io.StringIO()
    try:
        gm.eval()
        with torch.no_grad(), contextlib.redirect_stderr(err):
            prop.propagate(*example_inputs)
    except Exception as exc:  # noqa: BLE001
        cause = exc.__cause__ if exc.__cause__ is not None and "ShapeProp" in str(exc) else exc
        n = prop.node
        where = "" if n is None else f" at {n.target if n.op == 'call_module' else n.name}"
        raise TraceError(f"example inputs do not run through the model{where}: {_reason(cause)} "
                         f"(check their shapes and dtypes against the model's forward)") from exc
    else:
        sys.stderr.write(err.getvalue())  # warnings raised while running the model
    finally:
        for m, t in modes.items():
            m.train(t)
        with torch.no_grad():
            for name, b in gm.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
