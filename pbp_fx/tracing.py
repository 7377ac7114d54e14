"""Tracing: a model into a GraphModule, by symbolic tracing or by torch.export.

Two frontends:

- "fx": `torch.fx` symbolic tracing with a leaf policy. A submodule whose forward cannot be
  traced (data-dependent control flow and the like) is retried as a leaf: it stays one
  `call_module` node, and `perforate` reaches the neurons inside it by module swapping.
  When the failing code is the root's own forward, nothing can be isolated.
- "export": `torch.export.export(..., strict=False)` on the example inputs (positional and
  keyword), unlifted into a GraphModule whose parameters are `get_attr` nodes on the model's
  own submodules. ATen-level graph; shapes dynamic where the model allows (every dimension of
  every tensor input, `torch.export.Dim.AUTO`; else the batch dimension only), static
  otherwise. Called like the model: same keyword inputs, same output structure (tuples, dicts,
  Hugging Face ModelOutput).
- "auto" (the default): fx, then export when fx cannot trace the model (or traces it into a
  graph the example inputs do not run through). Modern Hugging Face models take this path.

Both frontends capture the model in train and in eval mode and merge the two
(`pbp_fx.passes.train_eval`): dropout, batch norm and attention dropout then follow
`.train()` / `.eval()` like the original model. `gm.meta` records what happened:

    pbp_frontend   "fx" | "export"            which frontend made the graph
    pbp_fx_error   why fx was not used (auto)  or absent
    pbp_modes      "train+eval" | "train" | "eval": the captures the graph follows
    pbp_modes_reason  why the graph follows one mode only (absent when it follows both)
    pbp_dynamic    export: "auto" (dynamic dims) | "batch" (dynamic batch only) | "static"
    pbp_min_batch  export: the smallest batch the graph computes the model's outputs at, where more than 1 (2 where
                   it computes others at a batch of 1; torch.export's lower bound where the model runs below it)
    pbp_max_batch  export: the largest, where torch.export bounds the batch and the model runs above it
    pbp_call       a CallSignature: how the graph is called like the model (with example inputs)
    pbp_leaves / pbp_untraceable               fx: leaf modules / those isolated (kept whole)
    pbp_mode_leaves  fx: submodules kept whole because their Python branches on `.training`
    pbp_frontend_choice  auto: why fx's or torch.export's graph was chosen (when both ran)
    pbp_parts / pbp_plain  "parts": submodules traced in place / modules with neurons left plain

An untraceable root forward (a detection model iterating over its images): with "auto", the
root's Python is kept as it is and each submodule that traces (a backbone, a head) is
replaced in place by a `TracedPart`, found top-down from the inputs it received when the
model ran on the example; the graph is one call of that root.
"""
from __future__ import annotations

import builtins
import collections
import contextlib
import copy
import functools
import inspect
import io
import itertools
import logging
import math
import operator
import os
import re
import sys
import traceback
import warnings
from typing import Any, Callable, Iterable, Optional

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.utils import _pytree as pytree

from .config import FRONTENDS, ConfigError
from .errors import ExampleInputsError, PBWarning, TraceError, warn_at_user
from .inputs import opaque_holder, positional_names
from .layers import WEIGHT_HOOKS, StandIn, has_user_hooks
from .modes import ModeSwitch
from .signature import CallError, CallSignature

__all__ = ["PBTracer", "TracedPart", "trace", "parts_model", "propagate_shapes", "buffers_kept", "copy_module",
           "memo_computed_tensors", "keyword_changes_output", "whole_model_in_mode",
           "keep_out_of_state_dict_on_copy", "FX_CONSTANT",
           "TraceError", "FRONTENDS"]

log = logging.getLogger(__name__)


_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _grad_context() -> tuple:
    """The modes a forward can switch inside itself: grad, inference mode, autocast (CPU, CUDA, and
    how deep autocast regions nest, which `autocast(enabled=False)` changes even where it is off)."""
    depth = torch.autocast_increment_nesting() - 1  # (read by a step up and back: no state changes)
    torch.autocast_decrement_nesting()
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"),
            torch.is_autocast_enabled("cuda"), depth)


def _function_forwards() -> frozenset:
    """The code of every torch.autograd.Function subclass's forward defined so far (torch's own too)."""
    codes, stack = set(), list(torch.autograd.Function.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        forward = cls.__dict__.get("forward")
        code = getattr(getattr(forward, "__func__", forward), "__code__", None)  # (a staticmethod's function)
        if code is not None:
            codes.add(code)
    return frozenset(codes)


def _inside_function_forward(forwards: frozenset) -> bool:
    """Whether a torch.autograd.Function's forward (code in `forwards`) is being traced: Function.apply
    turns grad mode off around it, which is no switch of the model's (a capture keeps the forward's ops
    and autograd derives their gradients; `_warn_custom_backwards` checks those against the Function's
    own backward). Found by the forward's frame: apply itself is C code in some torch versions."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in forwards:
            return True
        frame = frame.f_back
    return False


_AUTOCAST = "autocast (torch.autocast)"
_CONTEXT_NAMES = ("grad mode (torch.no_grad, enable_grad or set_grad_enabled)", "inference mode (torch.inference_mode)",
                  _AUTOCAST, _AUTOCAST, _AUTOCAST)


class PBTracer(fx.Tracer):
    """fx Tracer that treats `leaves` (qualified names) and pbp-fx's own modules as leaves,
    records the innermost module whose forward raised while being traced, and whether the
    forward switched a mode (`switched_modes`: no_grad, autocast, ...) around some of its ops,
    which symbolic tracing does not record: the graph would run them in the caller's modes."""

    def __init__(self, leaves: Iterable[str] = ()):
        super().__init__()
        self.leaves = set(leaves)
        self.failed_module: Optional[str] = None
        self.switched_modes: list[str] = []
        self._start_context: Optional[tuple] = None
        self._function_forwards: frozenset = frozenset()
        self.output: Any = None  # what forward returned, as it returned it (a ModelOutput, not a dict)
        self._outermost: Any = None  # the value of the last outermost create_arg call
        self._arg_depth = 0

    def trace(self, root, concrete_args=None):
        # In fixed modes, whatever the caller's (a perforate under no_grad): a forward's own no_grad
        # is then a switch.
        with torch.enable_grad(), torch.inference_mode(False):
            self._start_context = _grad_context()
            self._function_forwards = _function_forwards()
            return super().trace(root, concrete_args)

    def create_arg(self, a):
        # fx writes a dict subclass (a Hugging Face ModelOutput) as a plain dict; the output's own
        # structure is kept aside: the outermost create_arg before the output node is forward's value.
        if self._arg_depth == 0:
            self._outermost = a
        self._arg_depth += 1
        try:
            return super().create_arg(a)
        finally:
            self._arg_depth -= 1

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        if kind == "output":
            self.output = self._outermost
        if kind == "placeholder" and any(isinstance(a, fx.Node) for a in args):
            # A tensor default becomes a get_attr node, which fx writes into forward's signature as a name its
            # code does not define (NameError: _tensor_constant0). CallSignature gives the graph every tensor
            # input, defaults bound, so None stands there (no default at all breaks a signature in which it
            # follows another default).
            args = (None,)
        if self._start_context is not None and kind != "placeholder":
            for i, (now, start) in enumerate(zip(_grad_context(), self._start_context)):
                if now != start and _CONTEXT_NAMES[i] not in self.switched_modes and \
                        not (i == 0 and _inside_function_forward(self._function_forwards)):
                    self.switched_modes.append(_CONTEXT_NAMES[i])
        return super().create_node(kind, target, args, kwargs, name, type_expr)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:

        from .site import FusedSite, Site, SwappedNeuron

        if qualname in self.leaves or isinstance(m, (Site, FusedSite, SwappedNeuron, ModeSwitch)):
            return True
        return super().is_leaf_module(m, qualname)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _AugmentedProxy(node, self)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # the innermost module sees the error first
                self.failed_module = self.path_of_module(m)
            raise


_AUGMENTED = {"iadd": "+", "isub": "-", "imul": "*", "itruediv": "/", "ifloordiv": "//", "imod": "%",
              "ipow": "**", "imatmul": "@", "iand": "&", "ior": "|", "ixor": "^", "ilshift": "<<", "irshift": ">>"}
# Ops whose result may share its input's storage: an in-place change of it changes the input too.
_VIEWS = {"getitem", "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "t", "T", "mT", "H", "mH",
          "adjoint", "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select", "flatten", "unflatten",
          "split", "split_with_sizes", "tensor_split", "chunk", "unbind", "unfold", "detach", "data", "as_strided",
          "movedim", "moveaxis", "swapaxes", "swapdims", "diagonal", "real", "imag", "view_as_real",
          "view_as_complex", "ravel", "broadcast_to", "broadcast_tensors", "atleast_1d", "atleast_2d",
          "atleast_3d", "hsplit", "vsplit", "dsplit", "indices", "values"}
# Ops that return their input itself when they change nothing (same dtype, device, layout).
_NO_OP_WHEN_SAME = {"contiguous", "to", "type", "type_as", "float", "double", "half", "bfloat16", "int", "long",
                    "cpu", "cuda"}
# Functions that may return their input itself (dropout outside training).
_MAY_RETURN_INPUT = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"}
# Modules that may return their input itself (Dropout in eval mode).
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Flatten,
                 nn.Unflatten)


class _AugmentedProxy(fx.Proxy):
    """A Proxy that marks `a += b` (and the other augmented assignments) on the node it makes.

    A Proxy has no __iadd__, so Python runs `a = a + b`: a new tensor. On a tensor the model
    runs it in place, so another name for `a` (or a view of it) read afterwards sees the change
    there and not in the graph: `_check_augmented` refuses such a graph."""

    def __getattr__(self, k: str) -> "fx.proxy.Attribute":
        return _AugmentedAttribute(self, k)  # (`y = h.T; y += 1`)


class _AugmentedAttribute(fx.proxy.Attribute):
    """An attribute of an `_AugmentedProxy` (h.T, h.data): marked as its parent is."""


def _augmented(name: str, symbol: str):
    op = getattr(operator, {"iand": "and_", "ior": "or_"}.get(name, name[1:]))

    def method(self, other):
        result = op(self, other)
        if isinstance(result, fx.Proxy):
            caller = sys._getframe(1)
            # (the changed tensor is the node's first argument: a node, not kept here, which a
            # merge of the train and eval captures replaces)
            result.node.meta["pbp_augmented"] = (symbol, f"{caller.f_code.co_filename}:{caller.f_lineno}")
        return result
    method.__name__ = f"__{name}__"
    return method


for _name, _symbol in _AUGMENTED.items():
    for _cls in (_AugmentedProxy, _AugmentedAttribute):
        setattr(_cls, f"__{_name}__", _augmented(_name, _symbol))
# Python's own errors name the type ("'Proxy' object does not support item assignment"): fx's names.
_AugmentedProxy.__name__, _AugmentedAttribute.__name__ = "Proxy", "Attribute"


def _check_augmented(gm: fx.GraphModule) -> None:
    """TraceError for an augmented assignment on a tensor (`a += b`, traced as `a + b`) whose
    old value, under another name or through a view, is read after it."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        marked = node.meta.get("pbp_augmented")
        target = node.args[0] if marked is not None and node.args else None
        if not isinstance(target, fx.Node) or not isinstance(target.meta.get("tensor_meta"), TensorMetadata):
            continue  # (a number, a tuple: Python's += makes a new one too)
        symbol, where = marked
        # The tensor and what shares its storage: the tensors it is a view of, and their views,
        # except an item of the same base at another index (q, k, v = qkv[0], qkv[1], qkv[2]).
        aliases, came_from, todo = set(), {}, [(target, None)]
        while todo:
            a, child = todo.pop()
            if a in aliases or not isinstance(a, fx.Node):
                continue
            aliases.add(a)
            came_from[a] = child
            if a.args and _shares_input(gm, a):
                todo.append((a.args[0], a))
            todo.extend((u, None) for u in a.users if u is not node and _shares_input(gm, u)
                        and not _other_item(u, came_from[a]))
        if any(order[u] > order[node] for a in aliases for u in a.users
               if u is not node and u not in aliases and not _other_item(u, came_from[a])):
            raise TraceError(f"{where}: `{symbol}=` changes a tensor in place that the model reads after it under "
                             f"another name or through a view, and torch.fx traces it as `{symbol}` (a new tensor), "
                             f"so the graph would not compute what the model does: use frontend='export', or write "
                             f"`a = a {symbol} b` where the other name keeps the old value")


def _shares_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node`'s result may share the storage of its first argument: a view, the input
    itself (an Identity, a cast to its own dtype), a basic-indexing item of one tensor."""
    if node.op == "call_module":

        module = gm.get_submodule(str(node.target))  # (an in-place activation returns its input)
        return isinstance(module, (*_PASS_THROUGH, ModeSwitch)) or getattr(module, "inplace", False) is True
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    name, before = _target_name(node), node.args[0].meta.get("tensor_meta")
    if node.kwargs.get("inplace") is True or (node.op in ("call_method", "call_function") and name.endswith("_")
                                              and not name.startswith("_")):
        return True  # h.relu_(), torch.relu_(h), F.relu(h, inplace=True): the input itself
    after = node.meta.get("tensor_meta")
    if name == "getitem":  # an item of a tuple (max's values, attention's output) is a tensor of its own,
        if not isinstance(before, TensorMetadata):  # except the pieces of a split, chunk or unbind
            return _target_name(node.args[0]) in _VIEWS
        return len(node.args) > 1 and _basic_index(node.args[1])
    if name in _NO_OP_WHEN_SAME:
        return not (isinstance(before, TensorMetadata) and isinstance(after, TensorMetadata)) or (
            before.dtype == after.dtype and before.stride == after.stride)
    return name in _VIEWS or name in _MAY_RETURN_INPUT


def _basic_index(index) -> bool:
    """An index of ints, slices, None and Ellipsis (a view), not of tensors or lists (a copy)."""
    parts = index if isinstance(index, tuple) else (index,)
    for part in parts:
        if isinstance(part, fx.Node):
            if isinstance(part.meta.get("tensor_meta"), TensorMetadata):
                return False  # a tensor index
        elif not isinstance(part, (int, slice, type(None), type(Ellipsis))):
            return False
    return True


def _other_item(node: fx.Node, sibling: Optional[fx.Node]) -> bool:
    """Whether `node` and `sibling` are items of one tensor (or one split) at different leading
    int indices, counted from the front (h[-1] is h[0] when dim 0 has one entry), of a dim not
    broadcast (an expand's stride 0 makes every item one)."""
    def leading(n):
        if n is None or _target_name(n) != "getitem" or len(n.args) < 2 or not isinstance(n.args[0], fx.Node):
            return None
        first = n.args[1][0] if isinstance(n.args[1], tuple) and n.args[1] else n.args[1]
        if not isinstance(first, int) or isinstance(first, bool):
            return None
        meta = n.args[0].meta.get("tensor_meta")
        if isinstance(meta, TensorMetadata):
            if not meta.shape or meta.stride[0] == 0:
                return None
            size = meta.shape[0]
        elif isinstance(meta, (list, tuple)):
            size = len(meta)
        else:
            return None
        return (n.args[0], first % size) if size else None

    a, b = leading(node), leading(sibling)
    return a is not None and b is not None and a[0] is b[0] and a[1] != b[1]


def _target_name(node: fx.Node) -> str:
    from pbp_fx.passes.patterns import target_name

    if node.target is builtins.getattr and len(node.args) > 1:
        return str(node.args[1])  # (h.T, h.data: a getattr node)
    return target_name(node.target)


def _is_user_file(filename: str) -> bool:
    """Not torch, not pbp-fx, not code made at run time (a dataclass's "<string>" __init__)."""
    f = os.path.abspath(filename)
    return not filename.startswith("<") and not f.startswith(_TORCH_DIR) and not f.startswith(
        os.path.join(_OWN_DIR, "pbp_fx"))


def _user_frame(exc: BaseException) -> str:
    """file:line of the last traceback frame in user code (`_is_user_file`)."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if _is_user_file(frame.filename):
            return f"{frame.filename}:{frame.lineno}"
    return "<unknown line>"


def _in_decorator(model: nn.Module, exc: BaseException) -> bool:
    """Whether fx failed in the wrapper of a decorated forward: fx reads the wrapper's code object
    ("co_varnames is too small", at no user line) and calls it with its own arguments (transformers'
    `can_return_tuple`: "'NoneType' object has no attribute 'pop'")."""
    forward = type(model).forward
    if not hasattr(forward, "__wrapped__"):
        return False
    code = getattr(forward, "__code__", None)
    if code is None or _user_frame(exc) == "<unknown line>":
        return code is not None
    innermost = [f.f_code for f, _ in traceback.walk_tb(exc.__traceback__) if _is_user_file(f.f_code.co_filename)]
    # (the failing user frame is the wrapper's own, compared by place: fx runs a patched copy of the root's code)
    return bool(innermost) and (innermost[-1].co_filename, innermost[-1].co_firstlineno) == (code.co_filename,
                                                                                          code.co_firstlineno)


def _where_failed(exc: BaseException, reason: Callable[[BaseException], str] = None) -> str:
    """The exception's first line (or `reason(exc)`), and the user's line it came from when known."""
    line = _user_frame(exc)
    return (reason or _reason)(exc) + ("" if line == "<unknown line>" else f" at {line}")


def _fx_failure(model: nn.Module, error: TraceError) -> str:
    """What stopped fx at the root, short (for a warning that goes on without fx)."""
    cause = error.__cause__ or error
    if _in_decorator(model, cause):
        return f"a decorator wraps forward, which symbolic tracing cannot follow ({_reason(cause)})"
    return _where_failed(cause)


def _reason(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _export_reason(exc: BaseException) -> str:
    """torch.export's reason, its pytree advice made short and specific."""
    found = re.match(r"Found <class '(?:.*\.)?([\w]+)'> in output, which is not a known type", _reason(exc))
    if found:
        return (f"forward returns {found.group(1)}, a type torch.export cannot flatten: return tensors in a tuple "
                f"or dict, or register it once (a dataclass: torch.export.register_dataclass({found.group(1)}))")
    return _reason(exc)


def _as_args(example_inputs) -> Optional[tuple]:
    if example_inputs is None:
        return None
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _in_other_mode(model: nn.Module) -> list[str]:
    """Paths of the outermost modules whose mode is not the root's (a frozen encoder in eval mode
    under a training head)."""
    other = [p for p, m in model.named_modules() if p and m.training != model.training]
    return [p for p in other if not any(p.startswith(q + ".") for q in other)]


def _mixed_modes(model: nn.Module, as_is: fx.GraphModule, capture: Callable[[], fx.GraphModule]) -> list[str]:
    """The outermost modules in the other mode than the root's (a frozen encoder in eval mode under a
    training head) when the graph holds code of theirs that depends on the mode: `capture()` with the
    whole model in the root's mode gives another graph than `as_is`. [] otherwise."""
    primary, outermost = model.training, _in_other_mode(model)
    if not outermost:
        return []
    try:
        with whole_model_in_mode(model, primary):
            whole = capture()
    except Exception:  # noqa: BLE001 - the check only; the capture as it is stands
        return []
    parted = _first_difference(as_is.graph, whole.graph)
    if parted is None:
        return []
    # The module in the other mode that holds the first differing op, where the module stack says
    # (a method such as forward_head runs under its caller's): else all of them.
    stack = [path for path, _ in (parted.meta.get("nn_module_stack") or {}).values() if path]
    holding = [p for p in outermost if any(q == p or q.startswith(p + ".") for q in stack)]
    # (no submodule on the stack: the root's own code, or a method it calls on a module; a submodule in
    # the root's mode: the captures differ for another reason, such as Python randomness)
    return holding or ([] if stack else outermost)


def _first_difference(a: fx.Graph, b: fx.Graph) -> Optional[fx.Node]:
    """The first node of `a` that differs from `b`'s in op, target or constant arguments (node names
    and tensor-constant attribute names aside: a second capture numbers its constants on); None when
    the graphs agree."""
    def key(n: fx.Node):
        target = "_tensor_constant" if n.op == "get_attr" and str(n.target).startswith("_tensor_constant") else n.target
        plain = fx.node.map_arg((n.args, n.kwargs), lambda _: None)
        return n.op, str(target), repr(plain)

    for x, y in itertools.zip_longest(a.nodes, b.nodes):
        if x is None or y is None or key(x) != key(y):
            return x if x is not None else list(a.nodes)[-1]
    return None


def _warn_mixed_modes(model: nn.Module, modules: list[str]) -> None:
    """Why: the two captures are of the whole model in each mode, and a mode switch follows the
    root's .train()/.eval(), so ops captured in another mode than the root's keep it."""
    if not modules:
        return
    mode, other = ("train", "eval") if model.training else ("eval", "train")
    names = ", ".join(modules[:3]) + (", ..." if len(modules) > 3 else "")
    one = len(modules) == 1
    warn_at_user(f"{type(model).__name__}: {names} {'is' if one else 'are'} in {other} mode under a model in {mode} "
                 f"mode, and the graph holds mode-dependent code inside {'it' if one else 'them'} (a branch on "
                 "self.training, a functional dropout; under torch.export also batch norm and dropout layers) as it "
                 "runs now: pm.train() and pm.eval() do not switch that; call "
                 f"model.{mode}() before perforate for a graph in which it follows the mode")


@contextlib.contextmanager
def whole_model_in_mode(model: nn.Module, training: Optional[bool]):
    """Run a block with the whole model in train (True) / eval (False) mode, or as it is (None);
    every module's own mode is restored afterwards."""
    saved = {m: m.training for m in model.modules()}
    try:
        if training is not None:
            model.train(training)
        yield
    finally:
        for m, t in saved.items():
            m.train(t)


# -- the fx frontend ------------------------------------------------------------------------------

def _fx_capture(model: nn.Module, leaves: set, max_leaves: int, constants: Optional[dict] = None) -> fx.GraphModule:
    leaves = set(leaves)
    added: list[str] = []
    # Each try starts from the model's buffers as they were; the graph module copies the ones its graph
    # reads as the trace left them (a constant table filled at the first call), or as they were when the
    # trace deleted them after reading; then the model gets its own back.
    saved = BufferSnapshot(model)
    try:
        while True:
            tracer = PBTracer(leaves)
            try:
                graph = tracer.trace(model, concrete_args=constants or None)
                _restore_constant_names(graph, constants or {})
                _none_checks_exportable(graph)
                break
            except Exception as exc:  # noqa: BLE001 - any tracing failure is reported or isolated
                _restore_buffers(model, saved)
                where = tracer.failed_module
                if not where:
                    line = _user_frame(exc)
                    if _in_decorator(model, exc):
                        raise TraceError(
                            f"torch.fx cannot trace {type(model).__name__}.forward, which a decorator wraps "
                            f"({_where_failed(exc)}): capture it with frontend='export' (or 'auto')") from exc
                    raise TraceError(
                        f"cannot trace {type(model).__name__}.forward ({_reason(exc)})"
                        f"{'' if line == '<unknown line>' else ' at ' + line}: "
                        "the failing code is in the root module, so it cannot be isolated as a leaf; "
                        "move it into a submodule or make it traceable") from exc
                if where in leaves or len(added) >= max_leaves:
                    raise TraceError(f"cannot trace module {where!r} ({_reason(exc)}) at {_user_frame(exc)}") from exc
                leaves.add(where)
                added.append(where)
        _put_back_what_the_graph_reads(model, graph, saved)
        try:
            gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        except SyntaxError as exc:  # fx's code for some signatures (a keyword-only input after a default) does not compile
            raise TraceError(f"fx cannot write {type(model).__name__}.forward's signature back as code ({exc.msg}): "
                             "use frontend='export'") from exc
    finally:
        _restore_buffers(model, saved)
    gm.meta["pbp_leaves"] = sorted(leaves)
    gm.meta["pbp_untraceable"] = list(added)
    gm.meta["pbp_switched_modes"] = list(tracer.switched_modes)
    gm.meta["pbp_out_spec"] = _output_spec(tracer.output, graph)
    return gm


def _put_back_what_the_graph_reads(model: nn.Module, graph: fx.Graph, saved: "BufferSnapshot") -> None:
    """Buffers the graph reads that the traced forward then deleted or set to None, back in the model
    as they were (the graph read them before)."""
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        path, _, leaf = node.target.rpartition(".")
        tensor, _, persistent = saved.tables.get(path, {}).get(leaf, (None, None, True))
        if tensor is None:
            continue
        m = model.get_submodule(path)
        if m._buffers.get(leaf) is None:
            _register_again(m, leaf, tensor, persistent)


def output_as_traced(gm: fx.GraphModule, out: Any) -> Any:
    """`out` of a graph `gm` that `trace` captured, in the structure its forward returned (fx writes a
    ModelOutput as a plain dict: `_output_spec`)."""
    spec = gm.meta.get("pbp_out_spec")
    return out if spec is None else pytree.tree_unflatten(pytree.tree_leaves(out), spec)


def _output_spec(output: Any, graph: fx.Graph) -> Optional[pytree.TreeSpec]:
    """The pytree structure of what forward returned when it is a dict subclass that pytree knows (a
    Hugging Face ModelOutput, an OrderedDict), which fx writes as a plain dict with the same keys in
    the same order: the perforated model rebuilds its output in it (`PerforatedModel`). None
    otherwise (a tensor, a plain dict, a structure pytree does not know: kept as fx writes it)."""
    node = next((n for n in reversed(graph.nodes) if n.op == "output"), None)
    if node is None or not node.args or not isinstance(output, dict) or type(output) is dict:
        return None
    def builtin(a):  # (fx holds the output in its immutable containers)
        if isinstance(a, dict):
            return {k: builtin(v) for k, v in a.items()}
        if isinstance(a, (list, tuple)) and not hasattr(a, "_fields"):
            return (list if isinstance(a, list) else tuple)(builtin(v) for v in a)
        return a

    spec = pytree.tree_structure(output)
    written = node.args[0]
    if spec.is_leaf() or not isinstance(written, dict) or list(spec.context or ()) != list(written):
        return None
    # (an inner structure pytree does not know is one leaf to it, and several as fx writes it)
    return spec if spec.num_leaves == pytree.tree_structure(builtin(written)).num_leaves else None


def specialised_to_none(value: Any, message: str) -> None:
    """fx's check that an input specialised to None got None (`torch.fx._symbolic_trace._assert_is_none`)."""
    if value is not None:
        raise AssertionError(message)


def _none_checks_exportable(graph: fx.Graph) -> None:
    """The graph's checks of inputs specialised to None (a Hugging Face model's labels=None) call
    `specialised_to_none`, marked as fx marks a wrapped function: its code registers it as a leaf for any
    later trace (the one that unpickles a GraphModule). Why not fx's own: registered under its dotted name
    there, it made every later fx trace or torch.export in the process fail with a KeyError naming it."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.fx._symbolic_trace._assert_is_none:
            node.target = specialised_to_none
            node.meta["is_wrapped"] = True


def _restore_constant_names(graph: fx.Graph, constants: dict) -> None:
    """fx names the placeholder of a specialised input `name_1`: back to `name`, so that the
    graph (and the finalized model) takes that input under its own keyword."""
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        base, _, count = str(node.target).rpartition("_")
        if base in constants and count == "1":
            node._rename(base)
            if node.name == base:  # (the name was free)
                node.target = base


def _trace_fx(model: nn.Module, leaves: Iterable[str], max_leaves: int,
              call: Optional[CallSignature]) -> fx.GraphModule:
    primary = model.training
    # Inputs that carry no tensor (None for an optional input, flags) are specialised to the
    # example's values, so `if mask is not None:` takes the example's path.
    constants = call.constants() if call is not None else None
    leaves, kept_whole = set(leaves), []
    # fx stores a forward's tensor constants on the traced root (the user's model); each graph
    # holds its own reference, so they all go again.
    before = set(model.__dict__) | set(model._buffers) | set(model._parameters) | set(model._modules)
    try:
        while True:
            gm = _fx_capture(model, leaves, max_leaves, constants)  # as the model is: today's graph
            mixed = _mixed_modes(model, gm, lambda: _fx_capture(model, set(gm.meta["pbp_leaves"]), 0, constants))
            why = ""
            try:
                with whole_model_in_mode(model, not primary):
                    other = _fx_capture(model, set(gm.meta["pbp_leaves"]), 0, constants)
            except TraceError as exc:
                other, why = None, _reason(exc)
            result = _merged(gm, other, primary)
            # Captures that part inside a submodule whose forward reads `.training` (a branch on the
            # mode): that module is kept whole, so its Python takes the path of the mode at each call.
            reader = (None if result.graph_module is not None or other is None
                      else _mode_reader(model, result.parted_at, kept_whole))
            if reader is None or len(kept_whole) >= max_leaves:
                break
            kept_whole.append(reader)
            leaves = set(gm.meta["pbp_leaves"]) | {reader}
    finally:
        for name in set(model.__dict__) | set(model._buffers):
            if name not in before and name.startswith("_tensor_constant"):
                delattr(model, name)
    merged = _one_mode(gm, primary, type(model).__name__, result.reason or why) if result.graph_module is None \
        else result.graph_module
    _warn_mixed_modes(model, mixed)
    _constants_out_of_state_dict(merged, before)
    merged.meta["pbp_untraceable"] = list(gm.meta["pbp_untraceable"]) + kept_whole
    merged.meta["pbp_mode_leaves"] = kept_whole
    merged.meta["pbp_switched_modes"] = gm.meta["pbp_switched_modes"]
    merged.meta["pbp_out_spec"] = gm.meta["pbp_out_spec"]
    return merged


FX_CONSTANT = re.compile(r"_tensor_constant\d+")


def _constants_out_of_state_dict(gm: fx.GraphModule, own: set) -> None:
    """The tensors fx took for constants (`self.table[self.index.view(-1)]`'s index) are no state of
    the model: out of its state dict, where their numbers (which depend on how many captures ran
    before: the model's mode at capture) made a checkpoint refuse a model in the other mode. own:
    the root's own names (a buffer of the user's so named stays state)."""
    gm._non_persistent_buffers_set.update(n for n in gm._buffers if FX_CONSTANT.fullmatch(n) and n not in own)


def _mode_reader(model: nn.Module, nodes: tuple, kept_whole: list) -> Optional[str]:
    """The innermost submodule around the nodes where two captures part (fx records each node's
    module stack), not kept whole yet, whose own forward reads `.training`; torch's modules are
    followed by the merge."""
    for node in nodes:
        stack = (node.meta.get("nn_module_stack") or {}) if node is not None else {}
        for path, _ in reversed(list(stack.values())):
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            if not path or path in kept_whole or type(module).__module__.startswith("torch."):
                continue
            try:
                source = inspect.getsource(type(module).forward)
            except (OSError, TypeError):
                continue
            if ".training" in source:
                return path
    return None


# -- the export frontend --------------------------------------------------------------------------

def _ordered_kwargs(model: nn.Module, kwargs: dict) -> dict:
    """Keyword inputs in the order of the forward signature (positional calls then bind right)."""
    try:
        names = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return dict(kwargs)
    order = {n: i for i, n in enumerate(names)}
    return dict(sorted(kwargs.items(), key=lambda kv: order.get(kv[0], len(order))))


def _export_inputs(model: nn.Module, args: tuple, kwargs: dict, dims: str):
    """(args, kwargs, dynamic_shapes) for torch.export. dims: "auto" (every dim of every tensor
    Dim.AUTO), "batch" (dim 0 of every tensor Dim.AUTO, the rest static) or "static".

    The tensors are always new objects (same data): torch.export leaves dim markings
    (`_dynamo_weak_dynamic_indices`) on the tensors it is given, and a later export of the same
    tensors follows them whatever its dynamic_shapes say, so a static retry failed like the
    dynamic attempt. A batch of 1 everywhere is repeated to 2 first: export specialises 0 and 1."""
    def fresh(v):
        return v.detach().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v

    args, kwargs = pytree.tree_map(fresh, (args, kwargs))
    if dims == "static":
        return args, kwargs, None
    if batch_of_one(args, kwargs):
        grow = lambda t: t.expand(2, *t.shape[1:]).clone() if isinstance(t, torch.Tensor) and t.dim() > 0 else t  # noqa: E731
        args, kwargs = pytree.tree_map(grow, (args, kwargs))
    auto = torch.export.Dim.AUTO

    def spec(v):
        if isinstance(v, torch.Tensor):
            return {d: auto for d in range(v.dim() if dims == "auto" else min(v.dim(), 1))}
        node = pytree.SUPPORTED_NODES.get(type(v))
        if node is not None and not isinstance(v, (dict, list, tuple)):
            # (a registered type, a dataclass: torch.export takes its children's specs as a list)
            return [spec(c) for c in node.flatten_fn(v)[0]]
        if isinstance(v, dict):
            return type(v)((k, spec(x)) for k, x in v.items())
        if isinstance(v, (list, tuple)):
            items = [spec(x) for x in v]
            return type(v)(*items) if hasattr(type(v), "_fields") else type(v)(items)
        return None
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return args, kwargs, None
    shapes = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(spec(v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: spec(v) for k, v in value.items()}
        else:
            shapes[name] = spec(value)
    return args, kwargs, shapes


def _resolve(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def is_lifted_constant(key: str) -> bool:
    """Whether a buffer name (or state_dict key) is a tensor constant that torch.export lifted out of the
    forward (`lifted_tensor_<n>`): named by the capture, not by the model, so two captures of one model
    (with and without labels) name it otherwise; it is no state to save or load."""
    return re.fullmatch(r"lifted_tensor_\d+", key.rpartition(".")[2]) is not None


def _rehome(un: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """A plain GraphModule over the exported graph whose `get_attr`s reach the model's own submodules.

    Export unlifts parameters into bare containers; putting the model's children back (they
    hold the very same tensors) keeps module types for include/exclude and real module paths.
    No input-checking hooks: the forward binds positional and keyword inputs like the model's."""
    gm = fx.GraphModule(un, un.graph, type(model).__name__)
    targets = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    for name, child in model.named_children():
        if not isinstance(getattr(gm, name, None), nn.Module) or name == "_guards_fn":
            continue
        prefix = name + "."
        if all(_resolve(child, t[len(prefix):]) is _resolve(gm, t) for t in targets if t.startswith(prefix)):
            setattr(gm, name, child)
    for name in getattr(model, "_non_persistent_buffers_set", ()):
        if name in gm._buffers:
            gm._non_persistent_buffers_set.add(name)
    for module in gm.modules():  # constants the forward makes (BART's decoder start id): no state of the model
        for name in module._buffers:
            if is_lifted_constant(name):
                module._non_persistent_buffers_set.add(name)
    for node in gm.graph.nodes:  # fake values (and their provenance) are heavy to copy: shapes come from ShapeProp
        for key in ("val", "from_node", "tensor_meta", "example_value", "unbacked_bindings"):
            node.meta.pop(key, None)
    # The dtype torch.export saw reach a `.to()`/`.float()` inside the forward is asserted there, and autocast
    # (Trainer(bf16=True)) brings another: the forward converts whatever it gets (GPT-2's loss takes
    # logits.float()). Only the inputs' asserts are kept (`graph_input_dtypes`).
    check = torch.ops.aten._assert_tensor_metadata.default
    for node in list(gm.graph.find_nodes(op="call_function", target=check)):
        if not (node.args and isinstance(node.args[0], fx.Node) and node.args[0].op == "placeholder"):
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


@contextlib.contextmanager
def _quiet_export():
    """torch.export logs guard diagnostics and whole graphs on failures: errors are ours to report."""
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.split(".")[0] == "torch"]
    loggers.append(logging.getLogger("torch"))
    levels = [lg.level for lg in loggers]
    err = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stderr(err):
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_capture(model: nn.Module, args: tuple, kwargs: dict, dims: str) -> fx.GraphModule:
    with _explicit_keywords(model, kwargs):
        a, k, shapes = _export_inputs(model, args, kwargs, dims)
        # (grad on, whatever the caller's mode: a forward's own no_grad is then a region the graph keeps)
        # (buffers put back after each try: a forward that fills a buffer from None leaves a fake
        # tensor in it, which the next capture would take for a constant)
        with _quiet_export(), torch.enable_grad(), buffers_kept(model) as saved:
            ep = torch.export.export(model, a, k, dynamic_shapes=shapes, strict=False)
            filled = saved.filled(model)
        if filled:
            # torch.export (2.13) then writes the new tensor into an input of the graph (copy_ into x)
            raise TraceError(f"forward fills buffer {filled[0]!r}, registered as None, with a tensor, which "
                             "torch.export writes into an input instead; register it with a tensor, e.g. torch.zeros")
        gm = _rehome(ep.module(), model)
        if dims != "static":
            gm.meta["pbp_batch_range"] = _batch_range(ep)
            gm.meta["pbp_batch_fixed"] = _batch_fixed(ep)
        if dims != "static" and batch_of_one(args, kwargs):
            _check_on_example(model, gm, args, kwargs)
        return gm


def _batch_range(ep) -> tuple[int, Optional[int]]:
    """The dim-0 sizes an export capture takes: torch.export's range for its inputs' dynamic dim 0, (2, None)
    for a plain dynamic batch; narrower where the forward branches on the batch size (`if x.shape[0] > 3`
    keeps the example's branch: 4 and up, or 2 to 3) or where the model itself needs it (a kernel over a
    sequence-first input's time); (1, None) without a dynamic dim 0."""
    least, most = 1, None
    for node in ep.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and val.dim():
            bounds = size_range(ep, val.shape[0])
            if bounds is None:
                continue
            low, high = bounds
            if low is not None:
                least = max(least, low)
            if high is not None:
                most = high if most is None else min(most, high)
    return least, most


def _batch_fixed(ep) -> Optional[int]:
    """The batch a capture asked to keep dynamic took as a constant (the forward fixed it: a tensor of
    the example's batch against one of a fixed size), when no user input's dim 0 stayed dynamic; else None."""
    user = set(ep.graph_signature.user_inputs)
    sizes = [node.meta["val"].shape[0] for node in ep.graph.nodes
             if node.op == "placeholder" and node.name in user and isinstance(node.meta.get("val"), torch.Tensor)
             and node.meta["val"].dim()]

    def fixed(size) -> bool:
        if not isinstance(size, torch.SymInt):
            return True
        bounds = size_range(ep, size)
        single = bounds is not None and bounds[0] is not None and bounds[0] == bounds[1]
        return bool(size.node.expr.is_number) or single

    if not sizes or not all(fixed(s) for s in sizes):
        return None
    return int(sizes[0])


def size_range(ep, size) -> Optional[tuple[Optional[int], Optional[int]]]:
    """(least, most) of a dynamic size of an ExportedProgram's input (`ep.range_constraints`; None for an
    end that is infinite or not a number); None for a static size or one without a range."""
    if not isinstance(size, torch.SymInt):
        return None
    bounds = ep.range_constraints.get(size.node.expr)
    return None if bounds is None else (_whole(bounds.lower), _whole(bounds.upper))


def _whole(bound) -> Optional[int]:
    """A range end as an int; None for an infinite one (torch's int_oo, sympy's oo) or anything else."""
    try:
        value = float(bound)
    except (TypeError, ValueError, AttributeError):
        return None
    return int(value) if math.isfinite(value) and value == int(value) else None


def _with_batch(args: tuple, kwargs: dict, n: int) -> Optional[tuple[tuple, dict]]:
    """The example with every tensor input's dim 0 made n long (its samples repeated in order), when every
    tensor input has one dim-0 size; else None."""
    tensors = _batched(args, kwargs)
    if not tensors or len({t.shape[0] for t in tensors}) != 1 or n < 1:
        return None
    index = torch.arange(n) % tensors[0].shape[0]
    return pytree.tree_map(lambda t: t[index.to(t.device)] if isinstance(t, torch.Tensor) and t.dim() > 0 else t,
                           (args, kwargs))


def _model_runs(model: nn.Module, inputs: Optional[tuple[tuple, dict]]) -> bool:
    """Whether the model itself runs on these inputs (buffers and random state kept)."""
    if inputs is None:
        return False
    try:
        with torch.no_grad(), buffers_kept(model), torch.random.fork_rng(devices=[]):
            model(*inputs[0], **inputs[1])
    except Exception:  # noqa: BLE001 - (the model's own limit: a kernel longer than the sequence)
        return False
    return True


def _branch_bounds(model: nn.Module, gm: fx.GraphModule, args: tuple, kwargs: dict) -> tuple[int, Optional[int]]:
    """(min_batch, max_batch) of a dynamic capture where its batch range is narrower than the sizes the model
    itself takes (a forward that branches on the batch size: the graph computes the example's branch
    beyond it); (1, None) where not. A bound the model has too (a kernel over dim 0) is its own limit."""
    least, most = gm.meta.pop("pbp_batch_range", (1, None))
    low = least if least > 2 and _model_runs(model, _with_batch(args, kwargs, least - 1)) else 1
    high = most if most is not None and _model_runs(model, _with_batch(args, kwargs, most + 1)) else None
    return low, high


def batch_size(args: tuple, kwargs: dict) -> int:
    """The largest dim 0 of the tensor inputs (0 without one): the call's batch."""
    return max((t.shape[0] for t in _batched(args, kwargs)), default=0)


def _batched(args: tuple, kwargs: dict) -> list:
    """The tensor inputs with a dim 0 (a batch, when there is one)."""
    return [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0]


def batch_of_one(args: tuple, kwargs: dict) -> bool:
    """Whether every tensor input has a batch of 1 (`_export_inputs` captures with 2)."""
    tensors = _batched(args, kwargs)
    return bool(tensors) and all(t.shape[0] == 1 for t in tensors)


def _check_on_example(model: nn.Module, gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """A TraceError (the next, less dynamic capture is tried) when the graph captured at a batch of 2
    does not run at the example's own batch of 1 (two inputs concatenated on dim 0 and chunked back) or
    computes other outputs there than the model (a forward that branches on the batch size)."""
    try:
        alike = _runs_alike(model, gm, args, kwargs)
    except Exception as exc:  # noqa: BLE001 - the graph's own failure
        raise TraceError(f"the graph captured at a batch of 2 does not run at the example's batch of 1 "
                         f"({_reason(exc)})") from exc
    if alike is False:
        raise TraceError("the graph captured at a batch of 2 computes other outputs than the model at the example's "
                         "batch of 1 (its forward branches on the batch size)")


def _runs_alike(model: nn.Module, gm: fx.GraphModule, args: tuple, kwargs: dict) -> Optional[bool]:
    """Whether gm, in the model's mode, computes the model's outputs on these inputs (to float rounding;
    the same random state for both; buffers kept). None when the model itself does not run on them;
    the graph's own exception propagates. With grad and every parameter requiring it, as the capture ran
    (nn.TransformerEncoder takes another path, its nested-tensor fast path, without: also when its
    parameters are all frozen), keeping no activations."""
    def run(module):
        with torch.enable_grad(), buffers_kept(module), torch.random.fork_rng(devices=cuda), \
                parameters_requiring_grad(module), \
                torch.autograd.graph.saved_tensors_hooks(lambda _t: None, lambda _none: None):
            torch.manual_seed(0)
            out = module(*args, **kwargs)
        return pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out)

    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        want = run(model)
    except Exception:  # noqa: BLE001 - (the model's own limit, a BatchNorm in train mode at one sample)
        return None
    with whole_model_in_mode(gm, model.training):
        got = run(gm)
    return _same_output(want, got, close=True)


def _first_sample(args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
    """The example cut to its first sample (every tensor input's dim 0 to 1) when every tensor input has
    one batch of 2 or more on dim 0; else None."""
    tensors = _batched(args, kwargs)
    if not tensors or len({t.shape[0] for t in tensors}) != 1 or tensors[0].shape[0] < 2:
        return None
    return pytree.tree_map(lambda t: t[:1] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, (args, kwargs))


def _smallest_batch(model: nn.Module, gm: fx.GraphModule, args: tuple, kwargs: dict) -> int:
    """2 when the graph, captured with a dynamic batch from an example of 2 or more, computes other outputs
    than the model at a batch of 1 (torch.export assumes a dynamic size is at least 2, so a forward that
    branches on the batch size keeps the branch of the example); else 1."""
    one = _first_sample(args, kwargs)
    if one is None:
        return 1
    try:
        alike = _runs_alike(model, gm, *one)
    except Exception:  # noqa: BLE001 - (a guard of a size it fixed: such calls are refused as they are)
        return 1
    return 2 if alike is False else 1


@contextlib.contextmanager
def _explicit_keywords(model: nn.Module, kwargs: dict):
    """While exporting, a forward that takes tensors through `**kwargs` shows them as keyword-only
    parameters (an instance-level forward with that signature, calling the class's).

    torch.export (2.13) cannot take dynamic shapes for a `**kwargs` parameter (an internal
    assertion, "Must provide a tree_name"), so such a model was captured with static shapes; by
    name they can be dynamic. Parameter names (the graph's FQNs) do not change."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        sig = None
    var_kw = next((p for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None) if sig else None
    extra = [k for k in kwargs if sig is not None and k not in sig.parameters]
    if var_kw is None or not extra or "forward" in vars(model):
        yield
        return
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in extra]
    original = type(model).forward

    def forward(*a, **k):
        return original(model, *a, **k)

    forward.__signature__ = sig.replace(parameters=params)
    model.forward = forward
    try:
        yield
    finally:
        del model.forward


def _trace_export(model: nn.Module, args: tuple, kwargs: dict, dynamic) -> fx.GraphModule:
    """torch.export's graph with every dim dynamic, else the batch dim only (a CNN whose Linear
    fixes its input length: torch's constraint solver fails on the length's floor divisions
    rather than specialising it), else static shapes."""
    kwargs = _ordered_kwargs(model, kwargs)
    primary = model.training
    # Each capture puts the model's buffers back (`_export_capture`); the graph's own copies of them
    # get the values they had before any ran the forward's writes (a call counter).
    saved = BufferSnapshot(model)
    gm = _export_both_modes(model, args, kwargs, dynamic, primary)
    _restore_buffers(gm, saved, own=False)
    return gm


class _OutOfStateDict:
    """A GraphModule deepcopy hook: the buffers (module path, name) that are not in the graph
    module's state dict stay out of its copy's (torch's GraphModule.__deepcopy__ registers every
    buffer its graph reads as persistent: `copy.deepcopy(pm).state_dict()` then held keys that
    `pm.load_state_dict` refuses)."""

    def __init__(self, pairs: list[tuple[str, str]]):
        self.pairs = pairs

    def __call__(self, copied: fx.GraphModule) -> None:
        modules = dict(copied.named_modules())
        for path, name in self.pairs:
            m = modules.get(path)
            if m is not None and name in m._buffers:
                m._non_persistent_buffers_set.add(name)


def keep_out_of_state_dict_on_copy(model: nn.Module) -> None:
    """Each graph module in `model` keeps its non-persistent buffers so in its deep copies."""
    for g in model.modules():
        if isinstance(g, fx.GraphModule) and not any(isinstance(h, _OutOfStateDict) for h in g._deepcopy_hooks):
            pairs = [(path, name) for path, m in g.named_modules() for name in sorted(m._non_persistent_buffers_set)]
            if pairs:
                g._register_deepcopy_hook(_OutOfStateDict(pairs))


def ignore_spec_copy_warnings() -> None:
    """Inside a warnings.catch_warnings(): torch's pytree warns that `isinstance(treespec, LeafSpec)` is
    deprecated whenever an exported graph's input/output specs are copied (its own API, not the user's
    code)."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)


@contextlib.contextmanager
def spec_copy_warnings_ignored():
    """`ignore_spec_copy_warnings` for a block."""
    with warnings.catch_warnings():
        ignore_spec_copy_warnings()
        yield


def copy_module(model: nn.Module, memo: Optional[dict] = None) -> nn.Module:
    """copy.deepcopy of a module, also of one whose attributes hold tensors computed from its
    parameters, which torch's deepcopy refuses (`memo_computed_tensors`)."""
    return copy.deepcopy(model, memo_computed_tensors(model, {} if memo is None else memo))


def memo_computed_tensors(model: nn.Module, memo: dict) -> dict:
    """`memo` for copy.deepcopy with a detached copy of each tensor attribute of the model's modules
    that autograd computed (`torch.nn.utils.weight_norm`'s `weight`, recomputed from g and v before
    every forward): torch's deepcopy refuses such tensors."""
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf and id(value) not in memo:
                memo[id(value)] = value.detach().clone()
    return memo


@contextlib.contextmanager
def buffers_kept(model: nn.Module):
    """The model's buffers as they were before the block (a `BufferSnapshot`, yielded), restored after
    it: a capture runs the forward's own writes to them (`self.calls.add_(1)`) on the real tensors,
    once per capture."""
    saved = BufferSnapshot(model)
    try:
        yield saved
    finally:
        _restore_buffers(model, saved)


class BufferSnapshot:
    """Every module's buffer table as it was: each entry (a buffer set to None too) by its dotted
    name, with its tensor, a copy of its values and whether it is persistent. A buffer two modules
    share is listed under each of its names, with one copy of its values."""

    def __init__(self, module: nn.Module):
        # {module path: {name in it: (tensor, values, persistent)}}, from the module's own table:
        # named_buffers() leaves out a buffer set to None
        self.tables: dict[str, dict[str, tuple[Optional[torch.Tensor], Optional[torch.Tensor], bool]]] = {}
        values: dict[int, torch.Tensor] = {}
        for path, m in module.named_modules(remove_duplicate=False):
            if isinstance(m, torch.jit.ScriptModule):  # (TorchScript's own buffer table, which trace() refuses)
                continue
            # (no values of a lazy buffer: it has none before its first call)
            self.tables[path] = {leaf: (b, None if b is None or nn.parameter.is_lazy(b)
                                        else values.setdefault(id(b), b.detach().clone()),
                                        leaf not in m._non_persistent_buffers_set)
                                 for leaf, b in m._buffers.items()}
        self.entries = {_dotted(path, leaf): e for path, table in self.tables.items() for leaf, e in table.items()}

    def filled(self, module: nn.Module) -> list[str]:
        """Names of the buffers that were None and that `module` now holds a tensor in."""
        return [_dotted(path, leaf) for path, m in module.named_modules(remove_duplicate=False)
                if path in self.tables for leaf, b in m._buffers.items()
                if b is not None and leaf in self.tables[path] and self.tables[path][leaf][0] is None]

    def value(self, name: str) -> Optional[torch.Tensor]:
        """The saved values of buffer `name` (None for a buffer that was None, or lazy)."""
        return self.entries[name][1]


def _dotted(path: str, leaf: str) -> str:
    return f"{path}.{leaf}" if path else leaf


def _restore_buffers(module: nn.Module, saved: BufferSnapshot, own: bool = True) -> None:
    """The buffers of a snapshot back in `module` by name. own: the snapshot is of `module`, so each
    module's buffer table is put back as it was: a buffer the forward replaced (a table sized at the
    first call, as timm's ConViT does) gets its own tensor back, shared buffers stay one tensor, and
    one the forward set to None, deleted, registered or filled from None is put back as it was. Else
    (another module holding them by name) the values of the tensors it holds are copied. Either way
    a buffer replaced by one of another shape gets a copy of the saved one: a copy into it would
    broadcast the old values into the new shape, which the forward then takes for its own table."""
    placed: dict[int, torch.Tensor] = {}  # a saved value's copy, registered once under all its names
    with torch.no_grad():
        for path, m in list(module.named_modules(remove_duplicate=False)):
            if isinstance(m, torch.jit.ScriptModule):
                continue
            if own and path in saved.tables:
                _restore_table(m, saved.tables[path], placed)
                continue
            for leaf, b in list(m._buffers.items()):
                entry = saved.entries.get(_dotted(path, leaf))
                if b is not None and entry is not None and entry[1] is not None:
                    _put_values(m, leaf, b, entry[1], placed)


def _restore_table(m: nn.Module, table: dict, placed: dict) -> None:
    """Module `m`'s buffer table as the snapshot has it."""
    for leaf in [leaf for leaf in m._buffers if leaf not in table]:
        delattr(m, leaf)  # registered by the forward
    for leaf, (tensor, value, persistent) in table.items():
        if leaf not in m._buffers or m._buffers[leaf] is not tensor or \
                (leaf in m._non_persistent_buffers_set) == persistent:
            _register_again(m, leaf, tensor, persistent)
        if value is not None:
            _put_values(m, leaf, tensor, value, placed)


def _register_again(m: nn.Module, leaf: str, tensor: Optional[torch.Tensor], persistent: bool) -> None:
    """`leaf` a buffer of `m` again, also where the forward deleted it and set a plain attribute."""
    if leaf not in m._buffers and leaf in vars(m):
        delattr(m, leaf)
    m.register_buffer(leaf, tensor, persistent=persistent)


def _put_values(m: nn.Module, leaf: str, b: torch.Tensor, value: torch.Tensor, placed: dict) -> None:
    if b.shape == value.shape:
        b.copy_(value)
    else:
        setattr(m, leaf, placed.setdefault(id(value), value.clone()))


def tensors_copied(obj):
    """obj with every tensor in its containers (any pytree: tuples, namedtuples, dicts, ...) cloned."""
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, obj)


def refuse_script_modules(model: nn.Module) -> None:
    """A TraceError naming a TorchScript module in `model`: its compiled forward and buffer table are
    beyond fx, torch.export and the buffer snapshots."""
    scripted = next((path for path, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)), None)
    if scripted is not None:
        what, part = (f"{scripted!r} is", "the model with that part as ") if scripted else ("the model is", "")
        raise TraceError(f"{what} a TorchScript module (torch.jit.script, trace or freeze): pbp-fx captures Python "
                         f"modules; perforate {part}the Python module it was scripted from")


_GRADIENT_FAITHFUL = ("torch.", "pbp_fx.")  # (modules whose autograd.Functions' backwards are their derivatives)


def _own_autograd_functions() -> list:
    """The torch.autograd.Function classes defined so far outside torch and pbp-fx."""
    found, stack = [], list(torch.autograd.Function.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if not cls.__module__.startswith(_GRADIENT_FAITHFUL):
            found.append(cls)
    return found


def _custom_backwards(model: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """The torch.autograd.Function classes of the model's own (not torch's) with a backward of their own
    that its forward runs on the example inputs: a capture keeps their forward ops, whose gradients
    autograd derives, and drops their backward. One eager forward with grad, only when such a Function
    class exists, keeping no activations; floating inputs and every parameter require grad (a model whose
    parameters are all frozen still sends the site errors through those Functions)."""
    if torch.is_inference_mode_enabled() or not _own_autograd_functions():
        return []
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    # (then as given, then with the parameters as they are: a forward that writes its input, or a frozen
    # parameter, in place refuses a leaf that requires grad)
    given = (args, kwargs)
    for (call_args, call_kwargs), force in ((_requiring_grad(given), True), (given, True), (given, False)):
        try:
            with buffers_kept(model), torch.random.fork_rng(devices=cuda), torch.enable_grad(), \
                    parameters_requiring_grad(model) if force else contextlib.nullcontext(), \
                    torch.autograd.graph.saved_tensors_hooks(lambda _t: None, lambda _none: None):
                output = model(*call_args, **call_kwargs)
            break
        except Exception:  # noqa: BLE001 - (a model the inputs cannot run: the capture says why)
            continue
    else:
        return []
    return sorted({node._forward_cls.__qualname__ for node in _custom_calls(pytree.tree_leaves(output))})


def _custom_calls(outputs: list) -> list:
    """The autograd nodes, behind the tensors in `outputs`, of torch.autograd.Function calls of classes
    outside torch and pbp-fx (a Function's backward node names its class as `_forward_cls`)."""
    from .training import autograd_nodes  # (training builds on this module)

    roots = [(t.grad_fn, 0) for t in outputs if isinstance(t, torch.Tensor)]
    return [node for node in autograd_nodes(roots).values()
            if hasattr(node, "_forward_cls") and not node._forward_cls.__module__.startswith(_GRADIENT_FAITHFUL)]


# Gradients of the capture that differ by more than this (relative to the largest, or 4 units of the
# narrowest float dtype's precision where that is more: bfloat16 rounds to 8e-3) from the model's
# are a dropped backward, not the rounding of reordered ops.
_GRADIENT_TOLERANCE = 1e-3

# Parameters (or inputs) checked per Function class: the nearest upstream of its first calls, whose
# gradient flows through its backward (not every parameter: two gradient sets of an LLM would not fit).
_CHECKED_CALLS = 4


def _warn_custom_backwards(model: nn.Module, gm: fx.GraphModule, names: list[str], args: tuple,
                           kwargs: dict) -> None:
    """Warn when the capture's gradients differ from the model's on the example inputs because it dropped
    the backward of a Function in `names` (a straight-through estimator, a gradient reversal); a
    backward that is its forward's derivative (a memory-efficient activation) is no reason. Skipped,
    said as a possibility, where they cannot be compared (the graph also runs no_grad ops with grad)."""
    how = (f"{type(model).__name__} runs torch.autograd.Function {', '.join(names)} with a backward of its own: "
           "the perforated model keeps its forward ops alone, whose gradients autograd derives")
    difference = None
    if not gm.meta.get("pbp_switched_modes"):  # (fx also lost a no_grad: the gradients differ for that too)
        for force in (True, False):  # (every parameter requiring grad, else as they are: `_custom_backwards`)
            try:
                difference = _gradient_difference(model, gm, args, kwargs, force)
                break
            except Exception:  # noqa: BLE001 - (no comparison: said as what may happen)
                difference = None
    if difference is None:
        warn_at_user(f"{how}, so a backward that is not their derivative (a straight-through estimator, a gradient "
                     "reversal) is lost and training differs; compare a parameter's .grad of the model and of the "
                     "perforated model on one batch before training")
        return
    worst, tolerance = difference
    if worst > tolerance:
        warn_at_user(f"{how}, and on the example inputs its gradients differ from the model's (by {worst:.2g} of the "
                     "largest): training differs; capture a model whose Function's forward computes what its backward "
                     "differentiates, or keep that Function out of the model")


def _gradient_difference(model: nn.Module, gm: fx.GraphModule, args: tuple, kwargs: dict,
                         force: bool = True) -> tuple[float, float]:
    """(max |grad of gm - grad of model| / max |grad of model|, the tolerance for the dtypes seen) over the
    tensors nearest upstream of each custom Function call: parameters, or floating inputs. A fixed random
    projection of the outputs is differentiated; random state and buffers are kept. force: with every
    parameter requiring grad (`parameters_requiring_grad`)."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []

    def outputs_of(run, inputs) -> list:
        torch.manual_seed(0)  # (the same dropout masks in both runs)
        return [t for t in pytree.tree_leaves(run(inputs)) if isinstance(t, torch.Tensor)
                and t.requires_grad and t.is_floating_point()]

    def projection(outputs) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(1)
        return sum((t.float() * torch.randn(t.shape, generator=g).to(t.device)).sum() for t in outputs)

    inputs = _requiring_grad((args, kwargs))
    forced = (parameters_requiring_grad(model), parameters_requiring_grad(gm)) if force else ()
    with buffers_kept(model), buffers_kept(gm), torch.random.fork_rng(devices=cuda), torch.enable_grad(), \
            contextlib.ExitStack() as stack:
        for frozen in forced:
            stack.enter_context(frozen)
        outputs = outputs_of(lambda i: model(*i[0], **i[1]), inputs)
        wrt = _nearest_leaves(_custom_calls(outputs))
        if not wrt:  # (no gradient of the model's flows through their backwards: nothing to differ)
            return 0.0, _GRADIENT_TOLERANCE
        want = torch.autograd.grad(projection(outputs), wrt, allow_unused=True)
        del outputs
        got = torch.autograd.grad(projection(outputs_of(lambda i: _call_graph(gm, gm.meta.get("pbp_call"), *i),
                                                        inputs)), wrt, allow_unused=True)
    dtypes = {t.dtype for t in wrt}
    tolerance = max([_GRADIENT_TOLERANCE] + [4 * torch.finfo(d).eps for d in dtypes])
    scale = max((float(a.abs().max()) for a in want if a is not None and a.numel()), default=0.0)
    worst = 0.0
    for a, b in zip(want, got):
        if (a is None) != (b is None):
            return math.inf, tolerance
        if a is not None and a.numel():
            worst = max(worst, float((a.float() - b.float()).abs().max()))
    return (worst / scale if scale else (math.inf if worst else 0.0)), tolerance


@contextlib.contextmanager
def parameters_requiring_grad(model: nn.Module):
    """Every floating parameter of `model` requires grad inside (one made under inference_mode cannot, and is
    left); the ones it turned are frozen again after, whatever happens inside or while turning them."""
    turned = []
    try:
        for p in model.parameters():
            if p.requires_grad or not p.is_floating_point() or p.is_inference():
                continue
            p.requires_grad_(True)
            turned.append(p)
        yield
    finally:
        for p in turned:
            p.requires_grad_(False)


def _requiring_grad(inputs):
    """`inputs` (a pytree) with each floating tensor a detached leaf that requires grad."""
    return pytree.tree_map(
        lambda t: t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, inputs)


def _nearest_leaves(calls: list) -> list:
    """For the first `_CHECKED_CALLS` autograd nodes of each Function class in `calls`, and each of a
    node's inputs, the leaf tensor (requiring grad) nearest upstream of that input: breadth first, the
    smallest of the first level that holds any. Every input's own: a parameter fed to the Function
    directly (a learned quantisation step) must not hide the straight-through input beside it."""
    per_class: dict = {}
    found: dict[int, torch.Tensor] = {}
    for node in calls:
        seen = per_class.setdefault(node._forward_cls, [])
        if len(seen) >= _CHECKED_CALLS:
            continue
        seen.append(node)
        for start, _ in node.next_functions:
            level, visited = [start] if start is not None else [], set()
            while level:
                leaves = [n.variable for n in level if hasattr(n, "variable")]
                if leaves:
                    leaf = min(leaves, key=lambda t: t.numel())
                    found.setdefault(id(leaf), leaf)
                    break
                visited.update(id(n) for n in level)
                level = [m for n in level for m, _ in n.next_functions if m is not None and id(m) not in visited]
    return list(found.values())


def _call_graph(gm: fx.GraphModule, call: Optional[CallSignature], args: tuple, kwargs: dict):
    graph_args, graph_kwargs = _graph_inputs(call, args, kwargs)
    return gm(*graph_args, **graph_kwargs)


def _refuse_inputs_the_model_cannot_run(model: nn.Module, args: tuple, kwargs: dict, exc: Exception) -> None:
    """An ExampleInputsError when the model itself fails on the inputs (torch.export's failure then
    says nothing about the model's code). Run as the user would (grad mode as it is: a forward may
    take gradients itself), its buffers and random state kept."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with buffers_kept(model), torch.random.fork_rng(devices=cuda):
            model(*args, **kwargs)
    except Exception as own:  # noqa: BLE001
        raise ExampleInputsError(f"example inputs do not run through the model: {_reason(own)} (check their "
                                 "shapes and dtypes against the model's forward)") from exc


def _export_both_modes(model: nn.Module, args: tuple, kwargs: dict, dynamic, primary: bool) -> fx.GraphModule:
    tries = _DIM_TRIES[dynamic]
    for dims in tries:
        try:
            gm = _export_capture(model, args, kwargs, dims)
            break
        except Exception as exc:  # noqa: BLE001
            if dims == tries[-1]:
                line = _user_frame(exc)
                raise TraceError(f"torch.export cannot export {type(model).__name__} ({_export_reason(exc)})"
                                 f"{'' if line == '<unknown line>' else ' at ' + line}") from exc
            log.info("trace: export with %s failed (%s); trying %s", _DIMS_WORDS[dims], _reason(exc),
                     _DIMS_WORDS[tries[tries.index(dims) + 1]])
    _warn_mixed_modes(model, _mixed_modes(model, gm, lambda: _export_capture(model, args, kwargs, dims)))
    try:
        with whole_model_in_mode(model, not primary):
            other = _export_capture(model, args, kwargs, dims)
    except Exception as exc:  # noqa: BLE001
        log.info("trace: the %s-mode export failed: %s", "eval" if primary else "train", _reason(exc))
        other, why = None, _where_failed(exc, _reason)
    else:
        why = ""
    result = _merged(gm, other, primary)
    if result.graph_module is None and other is not None and dims == "auto" and "batch" in tries:
        # Every-dim-dynamic captures may order their shape arithmetic by mode (a window's padding
        # size before or after a norm's counter update: timm's TinyViT), which the merge cannot pair;
        # batch-only captures have none of it, and a merged graph keeps both modes.
        try:
            batch_gm = _export_capture(model, args, kwargs, "batch")
            with whole_model_in_mode(model, not primary):
                batch_other = _export_capture(model, args, kwargs, "batch")
        except Exception as exc:  # noqa: BLE001
            log.info("trace: the batch-only captures for the mode merge failed: %s", _reason(exc))
        else:
            retried = _merged(batch_gm, batch_other, primary)
            if retried.graph_module is not None:
                log.info("trace: the modes merged with a dynamic batch only (every-dim captures: %s)", result.reason)
                gm, result, dims = batch_gm, retried, "batch"
    least, most = _branch_bounds(model, gm, args, kwargs) if dims != "static" else (1, None)
    fixed = gm.meta.get("pbp_batch_fixed") if dims != "static" else None
    # (the first call at another batch raised "Guard failed: x.size()[0] == 8"; where the model itself takes
    # no other dim-0 size, a sequence-first or unbatched input, there is nothing to say)
    if fixed is not None and _model_runs(model, _with_batch(args, kwargs, fixed + 1)):
        warn_at_user(f"torch.export fixed {type(model).__name__}'s batch at {fixed}: its forward makes the batch a "
                     "constant (a tensor of the example's batch meets one of a fixed size), where the model itself "
                     f"runs at other batches; the perforated model and its ONNX file take batches of {fixed} only: "
                     "perforate it with an example of the batch you call it with, or change the line that fixes it")
    gm = result.graph_module if result.graph_module is not None else _one_mode(
        gm, primary, type(model).__name__, result.reason or why, keep_whole=False)
    gm.meta["pbp_dynamic"] = dims
    gm.meta.pop("pbp_batch_range", None)  # (a merged graph took the capture's meta: read above)
    if least > 1 or most is not None:  # (its ONNX file would compute the example's branch beyond them)
        if least == 1 and _smallest_batch(model, gm, args, kwargs) == 2:
            least = 2
        gm.meta["pbp_min_batch"], gm.meta["pbp_max_batch"] = least, most
        sizes = f"{least} or more" if most is None else f"{least} to {most}"
        warn_at_user(f"torch.export captured {type(model).__name__} for batches of {sizes} (its forward branches on "
                     f"the batch size, and the example's batch of {batch_size(args, kwargs)} took that branch): the "
                     "perforated model and its ONNX file refuse other batches; perforate it with an example of "
                     "the other batch for those calls")
    elif dims != "static" and _smallest_batch(model, gm, args, kwargs) == 2:
        gm.meta["pbp_min_batch"] = 2
        warn_at_user(f"{type(model).__name__}'s forward computes other outputs at a batch of 1 than the graph "
                     f"torch.export captured at the example's batch of {_batched(args, kwargs)[0].shape[0]}"
                     " (it takes a dynamic batch to be 2 or more, and the forward branches on the batch size): the "
                     "perforated model and its ONNX file refuse batches of 1; call it with "
                     "batches of 2 or more (DataLoader(drop_last=True)), or perforate it with a batch-1 example "
                     "for batch-1 calls")
    gm.meta["pbp_leaves"] = []
    gm.meta["pbp_untraceable"] = []
    return gm


_DIMS_WORDS = {"auto": "every dim dynamic", "batch": "a dynamic batch only", "static": "static shapes"}
# perforate(dynamic=...) -> the export attempts, in order. "batch": every-dim-dynamic captures of
# models with windowed attention (torchvision swin_t) spend minutes in torch's symbolic shape
# reasoning (measured 39x the batch-only capture), so users can skip that attempt.
_DIM_TRIES = {True: ("auto", "batch", "static"), "batch": ("batch", "static"), False: ("static",)}
DYNAMIC_CHOICES = tuple(_DIM_TRIES)


# -- both frontends ---------------------------------------------------------------------------------

def _merged(primary_gm: fx.GraphModule, other: Optional[fx.GraphModule], primary: bool):
    """`merge_modes`' result for the capture in the model's mode and one in the other (none: not
    merged); a merged graph carries the primary capture's meta."""
    from pbp_fx.passes.train_eval import MODES_ATTR, MergeResult, merge_modes

    if other is None:
        return MergeResult(None, "")
    train_gm, eval_gm = (primary_gm, other) if primary else (other, primary_gm)
    result = merge_modes(train_gm, eval_gm, training=primary)
    if result.graph_module is None:
        return result
    merged = result.graph_module if hasattr(result.graph_module, MODES_ATTR) else primary_gm  # (the same graph)
    merged.meta.update(dict(primary_gm.meta))
    merged.meta["pbp_modes"] = "train+eval"
    return MergeResult(merged)


def _one_mode(primary_gm: fx.GraphModule, primary: bool, name: str, reason: str,
              keep_whole: bool = True) -> fx.GraphModule:
    """The capture in the model's mode, warned of: its graph takes that mode's path whatever
    .train()/.eval() say. keep_whole: the frontend keeps a mode-reading submodule whole (fx)."""
    mode, other_mode = ("train", "eval") if primary else ("eval", "train")
    reason = (f"its {other_mode}-mode graph takes another path: {reason}" if reason.startswith("the ")
              else f"it cannot be captured in {other_mode} mode" + (f" ({reason})" if reason else ""))
    # (a PB run trains and then evaluates: one mode does not serve it, the submodule does, under either frontend
    # choice that reaches fx: torch.export inlines every submodule)
    fix = ("move the code that depends on the mode into a submodule (fx keeps one whose forward reads "
           "self.training whole, so it follows the mode)" if keep_whole else
           "move the code that depends on the mode into a submodule and capture with frontend 'fx' (or 'auto', "
           "which tries it first): fx keeps a submodule whose forward reads self.training whole, so it follows the "
           "mode, where torch.export inlines it")
    warnings.warn(f"{name}: {reason}; the graph follows {mode} mode whatever .train()/.eval() say: {fix}, or trace "
                  f"the model in the mode you will use it in (a PB run trains and evaluates: it needs both)",
                  PBWarning, stacklevel=5)
    primary_gm.meta["pbp_modes"] = mode
    primary_gm.meta["pbp_modes_reason"] = reason
    return primary_gm


def trace(model: nn.Module, example_inputs: Optional[Any] = None, example_kwargs: Optional[dict] = None, *,
          frontend: str = "auto", leaves: Iterable[str] = (), max_leaves: int = 64,
          dynamic=True, parts: bool = True) -> fx.GraphModule:
    """Trace `model` into a GraphModule that shares its parameters (and, with fx, its submodules).

    example_inputs: a tensor or tuple of positional inputs; example_kwargs: keyword inputs
    (`input_ids=..., attention_mask=...`). With them, shapes are propagated into
    `node.meta["tensor_meta"]` (modes and buffers are left as they were).
    frontend: "auto" (fx, then torch.export, then parts), "fx", "export" or "parts" (the last two need the
    example inputs).
    leaves / max_leaves: fx leaf policy. dynamic: True, "batch" or False (`perforate`).
    parts (auto): when neither frontend captures the root's forward, capture the submodules that
    do trace (meta["pbp_frontend"] == "parts", see `_trace_parts`).
    The model's train/eval state, its buffers and the example tensors are left as they were.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace() needs an nn.Module, got {type(model).__name__}")
    if frontend not in FRONTENDS:
        raise ConfigError(f"frontend={frontend!r}: use one of {', '.join(FRONTENDS)}")
    refuse_script_modules(model)
    # (the root's Python runs as it is in a parts capture: only a graph of the root needs the free names)
    whole, (model, renames) = model, _free_of_graph_module_names(model)
    # (capture runs the model several times: one that writes its input in place would change the caller's)
    args, kwargs = tensors_copied((_as_args(example_inputs), dict(example_kwargs or {})))
    if args is None and kwargs:
        args = ()
    _refuse_opaque_inputs(model, args or (), kwargs)
    # (a parts capture's own traces of its parts: checked once, for the whole)
    own_backwards = _custom_backwards(model, args, kwargs) if args is not None and parts else []
    gm = _capture(model, args, kwargs, frontend, leaves, max_leaves, dynamic, parts, whole)
    if renames and gm.meta.get("pbp_frontend") != "parts":
        gm.meta["pbp_renamed"] = dict(renames)
        warn_at_user(f"{type(whole).__name__} holds {', '.join(repr(n) for n in renames)}, named like torch.fx "
                     f"GraphModule attribute(s): the perforated model holds them as "
                     f"{', '.join(repr(n) for n in renames.values())} (its site and parameter names, and "
                     "include/exclude, use these)")
    if own_backwards:
        _warn_custom_backwards(model, gm, own_backwards, args, kwargs)
    return gm


def _refuse_opaque_inputs(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """An example input holding a dataclass with tensors that pytree cannot reach is refused by name: fx froze
    it into the graph as one constant, and the perforated model refused every other instance (a batch made
    anew each step). Another object (a config passed on every call) stays a constant, as before."""
    for name, value in [*zip(positional_names(model, len(args)), args), *kwargs.items()]:
        kind = opaque_holder(value, dataclasses_only=True)
        if kind is not None:
            raise ExampleInputsError(
                f"input {name!r} holds an object of type {kind}, whose tensors a capture can only take as constants "
                f"(the perforated model would refuse every other {kind}): register {kind} with "
                f"torch.export.register_dataclass({kind}) before perforate (a dataclass), or pass its tensors")


@functools.lru_cache(maxsize=1)
def graph_module_names() -> frozenset:
    """Attribute names a GraphModule has and a plain nn.Module has not (`meta`, `graph`, `code`, ...): a
    captured graph cannot hold a child, parameter or buffer of the model's root under one of them."""
    return frozenset(set(dir(fx.GraphModule(nn.Module(), fx.Graph()))) - set(dir(nn.Module())))


def _free_of_graph_module_names(model: nn.Module) -> tuple[nn.Module, dict]:
    """(`model`, {}), or where its root holds a child, parameter or buffer named like a GraphModule attribute
    (a GNN's `self.graph`, a codebook `self.code`), (a shallow copy that holds it under a free name
    (`graph_`) and still reads and writes it by its own in the forward, {name: free name}). Its state is
    the model's own; a graph of it carries the free names."""
    clashes = [n for table in (model._modules, model._parameters, model._buffers) for n in table
               if n in graph_module_names()]
    if not clashes:
        return model, {}
    taken = set(dir(model)) | set(model._modules) | set(model._parameters) | set(model._buffers)
    renames = {}
    for name in clashes:
        new = name + "_"
        while new in taken or new in graph_module_names():
            new += "_"
        taken.add(new)
        renames[name] = new
    copied = copy.copy(model)
    for key in ("_modules", "_parameters", "_buffers"):
        table = {renames.get(k, k): v for k, v in getattr(model, key).items()}
        object.__setattr__(copied, key, table)
    copied._non_persistent_buffers_set = {renames.get(k, k) for k in model._non_persistent_buffers_set}

    def alias(new: str) -> property:
        return property(lambda self: getattr(self, new), lambda self, value: setattr(self, new, value))

    cls = type(model)
    object.__setattr__(copied, "__class__", type(cls.__name__, (cls,), {
        "__module__": cls.__module__, "__qualname__": cls.__qualname__,
        **{name: alias(new) for name, new in renames.items()}}))
    return copied, renames


def _capture(model: nn.Module, args: Optional[tuple], kwargs: dict, frontend: str, leaves: Iterable[str],
             max_leaves: int, dynamic, parts: bool, whole: nn.Module) -> fx.GraphModule:
    """trace() after its checks: fx, else torch.export, else the parts that trace (of `whole`, the model as
    given: `model` may be its copy with free names, `_free_of_graph_module_names`)."""
    if frontend in ("export", "parts") and args is None:
        raise TraceError(f"frontend={frontend!r} needs example inputs: pass example_inputs and/or example_kwargs")
    if frontend == "parts":
        return _trace_parts(whole, args, kwargs, TraceError(
            f"no submodule of {type(model).__name__} with Linear/Conv layers traces on its call from the example"),
                            dynamic, why=None)
    fx_error: Optional[TraceError] = None
    shape_error: Optional[TraceError] = None
    fx_call, export_call = _call_signatures(model, args, kwargs)
    if has_user_hooks(model) and passes_every_input_positionally(model, args, kwargs):
        # torch.export runs the root's own hooks, which read the inputs as the caller passes them: a
        # keyword-style call (each input by name) would hand a pre-hook empty args.
        export_call = fx_call
    if frontend in ("fx", "auto"):
        try:
            # auto: fx's warnings (a one-mode graph) stand only if fx's graph is the one chosen
            # (each capture puts the model's buffers back itself: `_fx_capture`)
            with warnings.catch_warnings(record=True) as fx_warnings:
                warnings.simplefilter("always")
                gm = _trace_fx(model, leaves, max_leaves, fx_call)
        except TraceError as exc:
            if frontend == "fx" or args is None:
                raise
            fx_error = exc
        else:
            gm.meta["pbp_frontend"] = "fx"
            log.info("trace: %s traced with fx (symbolic tracing)", type(model).__name__)
            if args is None:
                _replay(fx_warnings)
                return gm
            try:
                _propagate(gm, fx_call, args, kwargs)
                _check_augmented(gm)
            except TraceError as exc:
                if frontend == "fx":
                    raise
                shape_error = exc
            else:
                written, restructured = _written_buffers(model, args, kwargs, gm)
                written, unreproduced = _written_otherwise(model, gm, fx_call, args, kwargs, written)
                if frontend == "auto":
                    gm = _prefer(model, gm, lambda: _export_graph(model, export_call, args, kwargs, dynamic),
                                 written)
                _warn_restructured(model, restructured)
                if gm.meta["pbp_frontend"] == "fx":
                    _replay(fx_warnings)
                    _drop_buffer_writes(gm, unreproduced)
                    if written and frontend == "fx":
                        warn_at_user(f"{_writes_buffers(model, written)}: the perforated model will not update "
                                     "them; frontend='export' keeps them")
                    switched = gm.meta.get("pbp_switched_modes")
                    if switched:
                        warn_at_user(f"forward switches {' and '.join(switched)} around some of its ops, which "
                                     "symbolic tracing does not record: the perforated model runs them in the "
                                     "caller's modes (a layer under no_grad trains); use frontend='export'"
                                     + (", which keeps the switch" if frontend == "fx" else
                                        " (torch.export could not capture this model here)"))
                return gm
    try:
        gm = _trace_export(model, *_graph_inputs(export_call, args, kwargs), dynamic)
    except TraceError as exc:
        if shape_error is not None:
            raise shape_error from None
        if fx_error is not None:
            error = TraceError(f"{fx_error}; torch.export failed too: {exc}")
            if frontend == "auto" and parts:
                # (the warning says each frontend's own reason; the whole error is in meta["pbp_fx_error"])
                why = f"fx: {_fx_failure(model, fx_error)}; torch.export: {_where_failed(exc.__cause__ or exc, _export_reason)}"
                return _trace_parts(whole, args, kwargs, error, dynamic, why)
            raise error from fx_error
        if frontend == "export":  # (only asked for: auto goes on to other captures, and a run costs a forward)
            if has_user_hooks(model) and not passes_every_input_positionally(model, args, kwargs):
                # (torch.export passes the inputs by name: a pre-hook reading its args failed, which the
                # check of the inputs below blamed on the example)
                raise TraceError(f"{exc}; {type(model).__name__} has forward hook(s) or pre-hook(s) on itself, "
                                 "which torch.export runs with the inputs by name unless the example passes every "
                                 "input of forward positionally: pass them so, remove the hooks, or use "
                                 "pbp_fx.perforate, which drops them with a warning") from exc
            _refuse_inputs_the_model_cannot_run(model, *_graph_inputs(export_call, args, kwargs), exc)
            raise TraceError(f"{exc}: change that code so that torch.export captures it, or use frontend "
                             "'auto' (symbolic tracing, else the model's traceable submodules in place)") from exc
        raise
    gm.meta["pbp_frontend"] = "export"
    if fx_error is not None or shape_error is not None:
        why = str(fx_error or shape_error)
        gm.meta["pbp_fx_error"] = why
        log.info("trace: %s: symbolic tracing failed (%s); traced with torch.export", type(model).__name__, why)
    else:
        log.info("trace: %s traced with torch.export", type(model).__name__)
    try:
        _propagate(gm, export_call, args, kwargs)
    except TraceError:
        if shape_error is not None:
            raise shape_error from None
        raise
    _warn_restructured(model, _written_buffers(model, args, kwargs, gm)[1])
    return gm


def _replay(caught) -> None:
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _export_graph(model, call, args, kwargs, dynamic) -> fx.GraphModule:
    gm = _trace_export(model, *_graph_inputs(call, args, kwargs), dynamic)
    gm.meta["pbp_frontend"] = "export"
    _propagate(gm, call, args, kwargs)
    return gm


def _unreached(model: nn.Module, gm: fx.GraphModule) -> tuple[int, list[str]]:
    """(sites of `gm`, the model's Linear/Conv-like weights that none of them reaches), the weights
    of layers that are never sites aside (recurrent, transposed convs, Bilinear): they are no reason
    for auto to try torch.export, whose capture of a GRU/LSTM fixes the sequence length of every
    later export of one in the process. A site's parametrized weight reaches its originals
    (weight_norm's g and v)."""
    from torch.nn.utils import parametrize

    from pbp_fx.passes.find_sites import find_sites
    from pbp_fx.passes.patterns import NEVER_SITES, neuron_weights

    specs = find_sites(gm)
    reached = {id(p) for m in model.modules() if isinstance(m, NEVER_SITES) for p in m.parameters()}
    for spec in specs:
        path, _, name = (spec.weight or "").rpartition(".")
        try:
            owner = gm.get_submodule(path) if path else gm
            if parametrize.is_parametrized(owner, name):
                # (not read: that runs the parametrization, and spectral_norm's writes its _u and _v)
                reached.update(id(p) for p in owner.parametrizations[name].parameters())
            else:
                reached.add(id(getattr(owner, name)))
        except AttributeError:
            continue
    return len(specs), [name for name, p in neuron_weights(model) if id(p) not in reached]


def _written_buffers(model: nn.Module, args: tuple, kwargs: dict,
                     gm: fx.GraphModule) -> tuple[list[str], list[str]]:
    """Buffers the model's forward writes (a running mean of its own, a call counter) that the fx
    graph `gm` drops: outside norm layers (whose statistics every frontend keeps) and outside the
    modules `gm` calls whole (a leaf, a parametrized layer: spectral_norm's _u and _v), whose own
    forward runs and writes them. Found by running the model once, every buffer restored after.
    Symbolic tracing records the other writes once, while tracing, or drops them. Returned twice:
    those whose values are written (torch.export keeps those writes), and those deleted, set to
    None, filled from None or registered, which no graph keeps."""
    kept_ids = {id(b) for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
                for b in m.buffers(recurse=False)}
    kept_ids |= {id(b) for m in _called_whole(gm) for b in m.buffers()}
    # Then by the model's own names: a module that reassigns its buffer (self.n = self.n + 1) holds a
    # new tensor after the run, and a module shared under two paths is named once, by its first.
    named = _buffer_table(model)  # (a buffer set to None too: filling it is a write)
    kept = {n for n, b in named.items() if id(b) in kept_ids}
    if all(n in kept for n in named):
        return [], []
    with buffers_kept(model) as before:
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                model(*args, **kwargs)
        except Exception:  # noqa: BLE001 - the frontends report a model that does not run
            return [], []
        now = _buffer_table(model)  # (compared before the block puts the values back into these tensors)
        names = [n for n in dict.fromkeys([*named, *now]) if n not in kept]
        restructured = [n for n in names if n not in named or n not in now or (named[n] is None) != (now[n] is None)]
        written = [n for n in names if n not in restructured and before.value(n) is not None
                   and not _same_values(now[n], before.value(n))]
    return written, restructured


def _warn_restructured(model: nn.Module, restructured: list[str]) -> None:
    if restructured:
        warn_at_user(f"{type(model).__name__}.forward deletes, registers, fills from None or sets to None buffer(s) "
                     f"{', '.join(restructured[:3])}, which no captured graph keeps: the perforated model runs every "
                     "call as the example's first call ran (keep such a buffer a tensor and write its values)")


def _buffer_table(model: nn.Module) -> dict[str, Optional[torch.Tensor]]:
    """Every buffer entry by its first name, one set to None included (named_buffers() skips those)."""
    return {_dotted(path, leaf): b for path, m in model.named_modules() for leaf, b in m._buffers.items()}


def _called_whole(gm: fx.GraphModule) -> list[nn.Module]:
    """The modules the call_module nodes of `gm` (and of the graphs it holds) run, submodules and all."""
    return [g.get_submodule(n.target) for g in gm.modules() if isinstance(g, fx.GraphModule)
            for n in g.graph.nodes if n.op == "call_module"]


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape and values, NaN equal to NaN (a buffer holding NaN is not written by reading it)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def _written_otherwise(model: nn.Module, gm: fx.GraphModule, call: Optional[CallSignature], args: tuple,
                       kwargs: dict, written: list[str]) -> tuple[list[str], set[str]]:
    """The buffers among `written` that the fx graph `gm` does not write as the forward does, and
    the graph's own names of them (a buffer two modules share is one tensor under two names): after
    two calls of each from the same values and random state (a decay that ran once while tracing,
    `self.ema.mul_(0.9).add_(x)`, leaves a zero buffer alike after one call). A write fx records
    whole (`self.ema.add_(x)`, `self.count.add_(1)` with a traced operand) is kept as it is. A graph
    that cannot be run so leaves every write as it is in the graph, each warned of."""
    if not written:
        return [], set()
    g_args, g_kwargs = _graph_inputs(call, args, kwargs)
    in_graph: dict[int, list[str]] = {}  # (the graph holds the model's own buffer tensors)
    for name, b in gm.named_buffers(remove_duplicate=False):
        in_graph.setdefault(id(b), []).append(name)
    modes = {m: m.training for m in gm.modules()}
    want: dict[str, torch.Tensor] = {}
    try:
        with buffers_kept(model) as before, buffers_kept(gm), torch.no_grad():
            gm.train(model.training)
            for run in (lambda: model(*args, **kwargs), lambda: gm(*g_args, **g_kwargs)):
                # (an fx GraphModule prints its generated code's frame to stderr before it raises)
                with torch.random.fork_rng(devices=[]), contextlib.redirect_stderr(io.StringIO()):
                    try:
                        run()
                        run()
                    except Exception:  # noqa: BLE001 - the model's or the graph's: said where the capture is checked
                        return written, set()
                if not want:
                    want = {n: model.get_buffer(n).detach().clone() for n in written}
                    _restore_buffers(model, before)
            names = {n: in_graph.get(id(model.get_buffer(n)), []) for n in written}
            otherwise = [n for n in written
                         if not names[n] or not _same_values(gm.get_buffer(names[n][0]), want[n])]
            return otherwise, {g for n in otherwise for g in names[n]}
    finally:
        for m, training in modes.items():
            m.training = training


def _drop_buffer_writes(gm: fx.GraphModule, written: set[str]) -> None:
    """Take out of an fx graph the in-place ops it recorded on the buffers the forward writes:
    symbolic tracing records only those whose arguments are traced values, and runs the rest once,
    while tracing (`self.ema.mul_(0.9).add_(x)` kept the add_ alone: the decay was dropped and the
    buffer grew at every call). The graph then reads those buffers unchanged, as the warnings say."""
    from pbp_fx.passes.patterns import target_name

    names = set(written)
    for node in list(gm.graph.nodes):
        if node.op in ("call_method", "call_function"):
            name, args = _target_name(node), node.args
        elif node.op == "call_module" and isinstance(switch := gm.get_submodule(node.target), ModeSwitch):
            form = switch.bound_form(node, True)  # (a train-only update: the mode merge wraps it)
            name, args = target_name(switch.target), form[0] if isinstance(form, tuple) else ()
        else:
            continue
        first = args[0] if args else None
        if name.endswith("_") and not name.startswith("_") and isinstance(first, fx.Node) \
                and first.op == "get_attr" and first.target in names:
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
            if not first.users:
                gm.graph.erase_node(first)
    gm.recompile()


def _writes_buffers(model: nn.Module, written: list[str]) -> str:
    """The start of each warning about buffers the forward writes, which fx's graph drops."""
    return (f"{type(model).__name__}.forward writes buffer(s) {', '.join(written[:3])}, which symbolic tracing "
            "drops (or runs once, while tracing)")


def _prefer(model: nn.Module, fx_gm: fx.GraphModule, export, written: list[str] = ()) -> fx.GraphModule:
    """The auto frontend's choice once fx has traced the model: torch.export's graph instead when
    fx leaves Linear/Conv-like weights unreached (inside torch.nn leaves such as
    MultiheadAttention, or behind wrapped functions) and export reaches more of them, when
    fx follows one mode only and export follows both, or when the forward writes buffers of its
    own (`written`) or switches grad mode or autocast around some ops, which export keeps and fx
    does not. The choice is in meta["pbp_frontend_choice"]."""
    fx_sites, missed = _unreached(model, fx_gm)
    one_mode = fx_gm.meta.get("pbp_modes") != "train+eval"
    switched = fx_gm.meta.get("pbp_switched_modes")
    if not missed and not one_mode and not written and not switched:
        return fx_gm
    why = (f"fx: {fx_sites} sites, {len(missed)} Linear/Conv-like weight(s) unreached "
           f"({', '.join(missed[:3])}{', ...' if len(missed) > 3 else ''})" if missed
           else f"fx: {fx_sites} sites, {fx_gm.meta.get('pbp_modes')} mode only" if one_mode
           else f"fx: forward writes buffer(s) {', '.join(written[:3])}, which symbolic tracing does not keep"
           if written else f"fx: forward switches {' and '.join(switched)}, which symbolic tracing does not record")
    try:
        # export's warnings (a one-mode graph) stand only if its graph is the one chosen
        with warnings.catch_warnings(record=True) as export_warnings:
            warnings.simplefilter("always")
            ex_gm = export()
    except TraceError as exc:
        fx_gm.meta["pbp_frontend_choice"] = f"{why}; torch.export failed ({exc}): fx"
        log.info("trace: %s", fx_gm.meta["pbp_frontend_choice"])
        if written:
            warn_at_user(f"{_writes_buffers(model, written)}, and torch.export, which keeps them, cannot capture it "
                         f"({_where_failed(exc.__cause__ or exc, _export_reason)}): the perforated model will not "
                         "update them")
        return fx_gm
    ex_sites, ex_missed = _unreached(model, ex_gm)
    ex_both = ex_gm.meta.get("pbp_modes") == "train+eval"
    better = (ex_sites > fx_sites and (ex_both or one_mode) or (one_mode and ex_both and ex_sites >= fx_sites)
              or (bool(written) and ex_sites >= fx_sites and (ex_both or one_mode))
              # (fewer sites is right there: a layer under no_grad, inside export's grad-mode region, trains not)
              or (bool(switched) and (ex_both or one_mode)))
    chosen = ex_gm if better else fx_gm
    if chosen is fx_gm and written:
        short = [f"reaches {ex_sites} of fx's {fx_sites} sites"] if ex_sites < fx_sites else []
        short += [] if ex_both else [f"follows {ex_gm.meta.get('pbp_modes')} mode only"]
        warn_at_user(f"{_writes_buffers(model, written)}: auto keeps its graph, since torch.export's, which keeps "
                     f"them, {' and '.join(short)}: the perforated model will not update them (frontend='export' "
                     "takes torch.export's graph as it is)")
    if chosen is ex_gm:
        _replay([w for w in export_warnings if issubclass(w.category, PBWarning)])
        if switched and ex_sites < fx_sites and _AUTOCAST in switched:
            warn_at_user(f"{type(model).__name__}: forward switches autocast, which only torch.export keeps: its graph "
                         f"is used, where {fx_sites - ex_sites} layer(s) inside a switched region are no sites "
                         "(torch.export wraps the region); layers under no_grad train not in any case")
    choice = (f"{why}; export: {ex_sites} sites, {ex_gm.meta.get('pbp_modes')} mode(s): "
              f"{chosen.meta['pbp_frontend']}")
    chosen.meta["pbp_frontend_choice"] = choice
    log.info("trace: %s: %s", type(model).__name__, choice)
    return chosen


def passes_every_input_positionally(model: nn.Module, args: Optional[tuple], kwargs: dict) -> bool:
    """Whether `model(*args, **kwargs)` gives every parameter of its forward positionally (no keyword,
    no default): then the graph's positional call is the caller's own, which the root's hooks read."""
    if args is None or kwargs:
        return False
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(args) == len(params) and all(
        p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in params)


def _call_signatures(model: nn.Module, args: Optional[tuple], kwargs: dict):
    """The example call as the fx graph and as the exported graph take it (None, None without
    example inputs or an inspectable forward)."""
    if args is None:
        return None, None
    try:
        return (CallSignature.of(model, args, kwargs, "positional"),
                CallSignature.of(model, args, kwargs, "keyword"))
    except (ValueError, RuntimeError):  # no inspectable signature: the graph is called as given
        return None, None
    except TypeError as exc:
        raise ExampleInputsError(f"example inputs do not match {type(model).__name__}.forward: {exc}") from exc


def _graph_inputs(call: Optional[CallSignature], args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return (args, kwargs) if call is None else call.graph_inputs(args, kwargs)


def _propagate(gm: fx.GraphModule, call: Optional[CallSignature], args: tuple, kwargs: dict) -> None:
    """Shapes from the example call; the graph remembers how it is called (`pbp_call`)."""
    _check_input_names(gm)
    propagate_shapes(gm, *_graph_inputs(call, args, kwargs))
    if call is not None:
        gm.meta["pbp_call"] = call


def _check_input_names(gm: fx.GraphModule) -> None:
    """Refuse a graph whose generated code reads one input for another: fx names the input `input`
    (a builtin) `input_1` in its code, and a forward that also takes `input_1` then reads `input`
    twice (torch.fx and torch.export alike), silently."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    targets = {str(n.target) for n in placeholders}
    for n in placeholders:
        if n.name != str(n.target) and n.name in targets:
            raise TraceError(f"forward's inputs {n.target!r} and {n.name!r} collide in the captured graph's code "
                             f"(torch.fx writes {n.target!r} as {n.name!r}, so the model would read {n.target!r} "
                             f"twice): rename the input {n.name!r}")


# -- shapes ----------------------------------------------------------------------------------------

class _ShapeProp(ShapeProp):
    """ShapeProp that remembers the node it is running (to name it in errors)."""

    node: Optional[fx.Node] = None

    def placeholder(self, target, args, kwargs):
        if str(target).startswith("*"):  # *args / **kwargs: one prepared tuple / dict (see _flat_inputs)
            value = next(self.args_iter)
            return list(value) if not str(target).startswith("**") else value
        return super().placeholder(target, args, kwargs)

    def run_node(self, n: fx.Node):
        # fx.Interpreter's run_node, not ShapeProp's: ShapeProp's imports sympy (torch's symbolic
        # shapes, 0.2-0.7 s per process) for fake-tensor bookkeeping that real inputs do not need.
        self.node = n
        result = fx.Interpreter.run_node(self, n)
        tensors = []
        meta = fx.node.map_aggregate(result, lambda v: tensors.append(v) or _tensor_meta(v)
                                     if isinstance(v, torch.Tensor) else v)
        if tensors:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


def _tensor_meta(t: torch.Tensor) -> TensorMetadata:
    """ShapeProp's record of a tensor, without torch._check (whose first call imports sympy)."""
    fmt = next((f for f in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)
                if t.is_contiguous(memory_format=f)), None)
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), fmt, t.is_quantized, {})


def _flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The example inputs as the graph's placeholders take them."""
    codegen = gm.graph._codegen
    if isinstance(codegen, fx.graph._PyTreeCodeGen) and codegen.pytree_info.in_spec is not None:
        return _pytree_inputs(gm, codegen.pytree_info, args, kwargs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flat, used = [], set()
    for i, p in enumerate(placeholders):
        name = str(p.target).lstrip("*")
        if str(p.target).startswith("**"):  # _ShapeProp hands these over as one value
            flat.append({k: v for k, v in kwargs.items() if k not in used})
            used.update(kwargs)
        elif str(p.target).startswith("*"):
            flat.append(tuple(args[i:]))
            args = args[:i]
        elif i < len(args):
            flat.append(args[i])
        elif name in kwargs:
            flat.append(kwargs[name])
            used.add(name)
        elif p.args:
            flat.append(p.args[0])
        else:
            raise ExampleInputsError(f"example inputs do not run through the model: no value for its input {name!r}")
    extra = sorted(set(kwargs) - used)
    if extra or len(args) > len(placeholders):
        what = f"keyword input(s) {extra}" if extra else f"{len(args)} positional inputs"
        raise ExampleInputsError(f"example inputs do not run through the model: it takes no {what}")
    return flat


def _pytree_inputs(gm: fx.GraphModule, info, args: tuple, kwargs: dict) -> list:
    """Flatten inputs like the pytree codegen's forward does (torch.fx.graph._PyTreeCodeGen)."""
    from torch.fx._pytree import tree_flatten_spec

    try:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise ExampleInputsError(f"example inputs do not run through the model: {exc} "
                                 f"(the graph takes {', '.join(info.orig_args)})") from exc
    # (with a structured constant in concrete_args, fx's code flattens [self, x, ...]: the module itself is its
    # first leaf, which is no placeholder)
    own = bool(info.orig_args) and info.orig_args[0] == "self" and "self" not in bound.arguments
    values = [gm] * own + [bound.arguments[n] for n in info.orig_args if n in bound.arguments]
    spec = info.in_spec
    if spec.type is tuple and spec.num_children == 2 and spec.child(0).type is tuple and spec.child(1).type is dict:
        count = spec.child(0).num_children
        tree = (list(values[:count]), dict(zip(spec.child(1).context, values[count:])))
    else:
        tree = list(values)
    return list(tree_flatten_spec(tree, spec))[own:]


def propagate_shapes(gm: fx.GraphModule, example_inputs, example_kwargs: Optional[dict] = None) -> None:
    """Record tensor shapes in node.meta without changing any module state."""
    args = _as_args(example_inputs) or ()
    kwargs = dict(example_kwargs or {})
    modes = {m: m.training for m in gm.modules()}
    buffers = BufferSnapshot(gm)
    prop = _ShapeProp(gm)
    # ShapeProp prints a traceback to stderr before it raises: keep stderr until we know.
    err = io.StringIO()
    try:
        flat = _flat_inputs(gm, args, kwargs)
        gm.eval()
        with torch.no_grad(), contextlib.redirect_stderr(err):
            prop.propagate(*flat)
    except TraceError:
        raise
    except Exception as exc:  # noqa: BLE001
        cause = exc.__cause__ if exc.__cause__ is not None and "ShapeProp" in str(exc) else exc
        n = prop.node
        where = "" if n is None else f" at {n.name}" if n.op != "call_module" else \
            f" at submodule {n.target!r} ({type(gm.get_submodule(n.target)).__name__})"  # ('0' read as a position)
        raise ExampleInputsError(f"example inputs do not run through the model{where}: {_reason(cause)} "
                                 f"(check their shapes and dtypes against the model's forward)") from exc
    else:
        sys.stderr.write(err.getvalue())  # warnings raised while running the model
    finally:
        for m, t in modes.items():
            m.train(t)
        _restore_buffers(gm, buffers)


# -- an untraceable root: its traceable submodules, in place -----------------------------------------

def keyword_changes_output(module: nn.Module, args: tuple, kwargs: dict, key: str) -> bool:
    """Whether `module(*args, **kwargs)` differs without kwargs[key]: both run in eval mode, without
    gradients, random state and buffers kept. A module that fails on the call counts as changed."""
    def fresh(value):  # (each run on its own copy: a module that writes its input in place changed the caller's)
        return pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, value)

    without = {k: v for k, v in kwargs.items() if k != key}
    try:
        with whole_model_in_mode(module, False), buffers_kept(module), torch.no_grad(), \
                torch.random.fork_rng(devices=[]):
            return not _same_output(module(*fresh(args), **fresh(without)), module(*fresh(args), **fresh(kwargs)))
    except Exception:  # noqa: BLE001 - (a buffer left on another device): cannot tell, so it may
        return True


def _same_output(a, b, close: bool = False) -> bool:
    """Whether two outputs match: one structure, equal values (close: floating tensors of one dtype equal to
    float rounding, NaN to NaN)."""
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape:
                return False
            if close and x.is_floating_point() and x.dtype == y.dtype:
                scale = float(x.detach().abs().nan_to_num(0.0, 0.0, 0.0).max()) if x.numel() else 0.0
                if not torch.allclose(x, y, rtol=1e-4, atol=1e-5 * max(scale, 1.0), equal_nan=True):
                    return False
            elif not torch.equal(x, y):
                return False
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return False
        elif x is not y and x != y:
            return False
    return True


# The Hugging Face Trainer's loss keyword (tokens in the whole accumulated batch).
LOSS_KEYWORD = "num_items_in_batch"


class TracedPart(StandIn, nn.Module):
    """A submodule replaced by its graph, called like the submodule (`name`: its path in the model).

    source: the submodule as it was (not registered: it shares the graph's parameters), run only
    to see whether a keyword the root hands on untraced (the Hugging Face Trainer's
    `num_items_in_batch`, through `**kwargs`) changes its output: dropped when it does not."""

    def __init__(self, name: str, graph_module: fx.GraphModule, source: Optional[nn.Module] = None):
        super().__init__()
        self.name = name
        self.graph_module = graph_module
        object.__setattr__(self, "source", source)
        self.ignored_keywords: set[str] = set()

    # Code outside the part reads its attributes (a leaf sizes a table on `self.fc.weight.device`): the
    # source's, whose parameters are the graph's (`StandIn`). The source follows the model's device and
    # dtype (.to, .double): its tensors the graph does not share (a buffer fx reads as an attribute)
    # stayed behind, and the check then failed.
    stand_in_for = "source"

    def forward(self, *args, **kwargs):
        call: Optional[CallSignature] = self.graph_module.meta.get("pbp_call")
        if call is None:
            return output_as_traced(self.graph_module, self.graph_module(*args, **kwargs))
        try:
            g_args, g_kwargs, extra = call.bind(args, kwargs)
        except CallError as exc:  # (the root's own code made this call: the example may not decide it)
            raise CallError(f"{exc} (part {self.name} of a parts capture, whose inputs the root's own "
                            "code passes, and may pass them otherwise per batch, a padding mask as None "
                            "where a batch needs none; then no single example fits, and a capture of the whole model "
                            "is needed: perforate the model in eval mode, or make what stopped the train-mode capture, "
                            "in perforate's warning, not depend on the mode)") from None
        # (getattr: a part pickled before these attributes existed)
        for key in sorted(set(extra) - getattr(self, "ignored_keywords", set())):
            source = getattr(self, "source", None)
            if source is None or keyword_changes_output(source, args, kwargs, key):
                example = ("{**batch, 'num_items_in_batch': torch.tensor(n)}, the count the Trainer passes"
                           if key == LOSS_KEYWORD else f"{{..., {key!r}: <a value>}}")
                raise TraceError(f"{self.name} was traced without the keyword input {key!r}, which the model hands "
                                 f"it and which {'changes' if source is not None else 'may change'} its output: "
                                 f"pass it in example_kwargs to perforate() ({example})")
            self.ignored_keywords.add(key)
        # (the root's code reads the output as the submodule returned it: `outputs[0]` of a ModelOutput)
        return output_as_traced(self.graph_module, self.graph_module(*g_args, **g_kwargs))


_HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
                "_forward_hooks_always_called")


def _keep_own_hooks(part: TracedPart, module: nn.Module) -> None:
    """The part's own forward hooks and pre-hooks run around it as they ran around the submodule: symbolic
    tracing starts at its forward, outside them (a weight hook's work, weight_norm's, is in the graph)."""
    if not has_user_hooks(module):
        return
    for table in _HOOK_TABLES:
        own = getattr(module, table, None)
        if own is not None:
            setattr(part, table, collections.OrderedDict(own))
    for key, hook in list(part._forward_pre_hooks.items()):
        if isinstance(hook, WEIGHT_HOOKS):
            del part._forward_pre_hooks[key]


class _Unpacked(nn.Module):
    """The model under a graph that passes the call through: `self.root(args, kwargs)`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, args, kwargs):
        return self.model(*args, **kwargs)


def parts_model(gm: fx.GraphModule) -> Optional[nn.Module]:
    """The model that a parts graph (meta["pbp_frontend"] == "parts") calls: the original's
    root with its `TracedPart`s in place, called like the original. None for any other graph."""
    if gm.meta.get("pbp_frontend") != "parts":
        return None
    holder = getattr(gm, "root", None)
    return holder.model if isinstance(holder, _Unpacked) else None


def _record_calls(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """{submodule path: (args, kwargs) of its first call} while the model runs on the example
    (no grad; modes and buffers left as they were)."""
    seen: dict = {}
    names = {id(m): n for n, m in model.named_modules() if n}
    hooks = []

    def hook(module, a, k):
        seen.setdefault(names[id(module)], (a, dict(k)))

    for n, m in model.named_modules():
        if n:
            hooks.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    buffers = BufferSnapshot(model)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
        _restore_buffers(model, buffers)
    return seen


def _with_parts(model: nn.Module, parts: dict) -> nn.Module:
    """A shallow copy of `model` with the modules at the paths of `parts` replaced; the copies
    share every other submodule, parameter and buffer (the model itself is left as it is)."""
    copies: dict[str, nn.Module] = {}

    def copied(path: str) -> nn.Module:
        if path in copies:
            return copies[path]
        original = model.get_submodule(path) if path else model
        clone = copy.copy(original)
        clone._modules = dict(original._modules)
        if path:
            owner, _, child = path.rpartition(".")
            copied(owner)._modules[child] = clone
        copies[path] = clone
        return clone

    for path, part in parts.items():
        owner, _, child = path.rpartition(".")
        copied(owner)._modules[child] = part
    return copied("")


def _trace_parts(model: nn.Module, args: tuple, kwargs: dict, root_error: TraceError,
                 dynamic: bool, why: Optional[str]) -> fx.GraphModule:
    """The root's forward as it is, its traceable submodules (those with Linear/Conv-like
    weights, outermost first) captured in place. Raises `root_error` when no part has a site;
    `why`: the frontends' reasons, for the warning (None: frontend='parts' was asked for)."""
    from pbp_fx.passes.find_sites import find_sites
    from pbp_fx.passes.patterns import neuron_weights

    try:
        calls = _record_calls(model, args, kwargs)
    except Exception as exc:  # noqa: BLE001 - the example does not even run: the model's own error, else the root's
        _refuse_inputs_the_model_cannot_run(model, args, kwargs, exc)
        raise root_error from None
    parts: dict[str, TracedPart] = {}
    failed: dict[str, str] = {}
    todo = [n for n, _ in model.named_children()]
    while todo:
        path = todo.pop(0)
        module = model.get_submodule(path)
        if not neuron_weights(module):
            continue
        if path in calls:
            a, k = calls[path]
            try:
                with _quiet_export():
                    gm = trace(module, tuple(a), k, frontend="auto", dynamic=dynamic, parts=False)
                if find_sites(gm):
                    parts[path] = TracedPart(path, gm, source=module)
                    if gm.meta.get("pbp_frontend") == "fx":
                        _keep_own_hooks(parts[path], module)
                    continue
            except (TraceError, TypeError) as exc:
                failed[path] = _reason(exc)
        todo[:0] = [f"{path}.{n}" for n, _ in module.named_children()]
    if not parts:
        raise root_error
    plain = sorted({name.rpartition(".")[0] or name for name, _ in neuron_weights(model)
                    if not any(name.startswith(p + ".") for p in parts)})
    graph = fx.Graph()
    call = graph.call_module("root", (graph.placeholder("*args"), graph.placeholder("**kwargs")))
    graph.output(call)
    holder = nn.Module()
    holder.root = _Unpacked(_with_parts(model, parts))
    gm = fx.GraphModule(holder, graph, type(model).__name__)
    modes = {p.graph_module.meta.get("pbp_modes") for p in parts.values()}
    gm.meta.update(pbp_frontend="parts", pbp_fx_error=str(root_error), pbp_parts=list(parts), pbp_plain=plain,
                   pbp_leaves=[], pbp_untraceable=[], pbp_modes=modes.pop() if len(modes) == 1 else "mixed")
    if why is not None:
        warnings.warn(f"{type(model).__name__}.forward traces with neither fx nor torch.export ({why}): its "
                      f"submodules {', '.join(parts)} are perforated in place, the root's Python runs as it is"
                      + (f"; left plain: {', '.join(plain)}" if plain else ""), PBWarning, stacklevel=3)
    elif plain:
        warn_at_user(f"frontend='parts': {type(model).__name__}'s submodules {', '.join(parts)} are perforated in "
                     f"place; left plain: {', '.join(plain)}")
    return gm
