"""How a traced graph is called like the original model.

A captured graph takes only the inputs it was traced with: tensors become graph inputs, and
everything else (`None` for an optional input, a flag, a default) is frozen into the graph.
`CallSignature` remembers the original `forward`'s signature and, per parameter, what the
trace saw (a pytree whose tensor leaves are inputs and whose other leaves are constants).
`bind` takes any call the original accepts (positional `None`s, defaults, keyword-only
inputs), checks it against what was traced, and returns the graph's own call. Keywords that
the original takes through `**kwargs` but the trace never saw are handed back separately:
the caller decides whether they matter (`PerforatedModel` checks them against the original).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils import _pytree as pytree

from .errors import PBError

__all__ = ["CallSignature", "CallError", "GRAPH_STYLES"]

# "positional": the graph's parameters are the original's, in order (symbolic tracing);
# "keyword": the graph takes the traced inputs by name (torch.export, given keyword inputs).
GRAPH_STYLES = ("positional", "keyword")

_P = inspect.Parameter
_VARIADIC = (_P.VAR_POSITIONAL, _P.VAR_KEYWORD)


class CallError(PBError, TypeError):
    """A call the perforated model cannot run: one its original refuses too (named with its forward's
    parameters), or one the original accepts whose input pattern the traced graph does not take."""


class _Tensor:
    """Template leaf: a tensor input of the graph."""

    def __repr__(self) -> str:
        return "Tensor"

    def __eq__(self, other) -> bool:
        return isinstance(other, _Tensor)

    def __hash__(self) -> int:
        return 0


def _template(value) -> tuple:
    leaves, spec = pytree.tree_flatten(value)
    return spec, tuple(_Tensor() if isinstance(v, torch.Tensor) else v for v in leaves)


def _has_tensor(template: tuple) -> bool:
    return any(isinstance(v, _Tensor) for v in template[1])


def _describe(template: tuple) -> str:
    """The traced or passed structure with `Tensor` for its tensors: {'x': Tensor, 'y': [Tensor, 2]}."""
    spec, leaves = template
    text = repr(pytree.tree_unflatten(list(leaves), spec))
    return text if len(text) <= 200 else text[:197] + "..."


def _in_traced_order(spec, value):
    """`value` with each plain dict's keys in the order the trace saw them, where the keys are the
    same (a dict's order does not change what the original reads; the traced graph's inputs follow
    it), and a list or tuple subclass as the plain one traced. Anything else is returned as it is, for
    the check to judge."""
    if spec.type is dict and type(value) is dict and set(value) == set(spec.context):
        return {k: _in_traced_order(_child(spec, i), value[k]) for i, k in enumerate(spec.context)}
    # (a torch.Size where a tuple was traced: the original takes either)
    if spec.type in (list, tuple) and isinstance(value, spec.type) and len(value) == spec.num_children:
        return spec.type(_in_traced_order(_child(spec, i), v) for i, v in enumerate(value))
    return value


def _child(spec, i: int):
    # (TreeSpec.child is newer than torch 2.4, whose children_specs later torches warn of)
    return spec.child(i) if hasattr(spec, "child") else spec.children_specs[i]


def _same_constant(a, b) -> bool:
    if isinstance(a, _Tensor) or isinstance(b, _Tensor):
        return isinstance(a, _Tensor) and isinstance(b, _Tensor)
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - values without a plain equality
        return False


def _matches(template: tuple, value) -> bool:
    spec, leaves = _template(value)
    return spec == template[0] and len(leaves) == len(template[1]) and all(
        _same_constant(a, b) for a, b in zip(template[1], leaves))


@dataclass
class CallSignature:
    """The original forward's signature and the input pattern the graph was traced with."""

    signature: inspect.Signature
    traced: dict  # parameter -> template; **kwargs -> {key: template}; *args -> (template, ...)
    style: str = "positional"
    model_name: str = "model"
    # N when the traced call was N plain tensors in the first N parameters and every other
    # parameter its default: such a call goes to the graph as it is (no binding per call).
    plain_arity: int = -1

    @classmethod
    def of(cls, model: torch.nn.Module, args: tuple, kwargs: dict, style: str = "positional") -> "CallSignature":
        """The call `model(*args, **kwargs)` as a pattern (raises TypeError when the model refuses it)."""
        if style not in GRAPH_STYLES:
            raise ValueError(f"style={style!r}: use one of {GRAPH_STYLES}")
        sig = inspect.signature(model.forward)
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        traced: dict = {}
        for name, param in sig.parameters.items():
            value = bound.arguments.get(name, () if param.kind is _P.VAR_POSITIONAL else {})
            if param.kind is _P.VAR_KEYWORD:
                traced[name] = {k: _template(v) for k, v in value.items()}
            elif param.kind is _P.VAR_POSITIONAL:
                traced[name] = tuple(_template(v) for v in value)
            else:
                traced[name] = _template(value)
        return cls(sig, traced, style, type(model).__name__, _plain_arity(sig, traced))

    def is_plain(self, args: tuple, kwargs: dict) -> bool:
        """A call of `plain_arity` tensors, nothing else: the graph takes it as it is."""
        return (not kwargs and len(args) == self.plain_arity
                and all(isinstance(a, torch.Tensor) for a in args))

    # -- what the trace takes ----------------------------------------------------------------
    def constants(self) -> dict:
        """Named parameters that carry no tensor, with their traced values (symbolic tracing
        specialises on them)."""
        out = {}
        for name, param in self.signature.parameters.items():
            if param.kind not in _VARIADIC and not _has_tensor(self.traced[name]):
                spec, leaves = self.traced[name]
                out[name] = pytree.tree_unflatten(list(leaves), spec)
        return out

    def _passed(self, name: str, value) -> bool:
        """A keyword-style graph takes the parameter: it carries a tensor or is not its default."""
        param = self.signature.parameters[name]
        return _has_tensor(self.traced[name]) or param.default is _P.empty or not _matches(
            _template(param.default), value)

    # -- binding a call ------------------------------------------------------------------------
    def bind(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, dict]:
        """(graph args, graph kwargs, untraced **kwargs entries) for a call of the original.

        Raises CallError (a TypeError) where the original would, naming the model and its forward's
        parameters, and where the original accepts the call but the graph was traced with another
        input pattern."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:  # (inspect's own words name neither the model nor what it takes)
            # (one line: a tensor default's repr spans several)
            raise CallError(f"{self.model_name}.forward{' '.join(str(self.signature).split())}: {exc}") from None
        bound.apply_defaults()
        g_args: list = []
        g_kwargs: dict = {}
        extra: dict = {}
        params = list(self.signature.parameters.values())
        # (the inputs before a `*rest` go by position: by name they would collide with its values)
        at = next((i for i, p in enumerate(params) if p.kind is _P.VAR_POSITIONAL), 0)
        before_rest = {p.name for p in params[:at]}
        for name, param in self.signature.parameters.items():
            traced = self.traced[name]
            if param.kind is _P.VAR_KEYWORD:
                value = bound.arguments.get(name, {})
                for key, v in value.items():
                    if key not in traced:
                        extra[key] = v
                        continue
                    g_kwargs[key] = self._check(key, traced[key], v)
                missing = sorted(set(traced) - set(value))
                if missing:
                    raise CallError(f"{self.model_name} was traced with keyword input(s) {missing}, "
                                    f"this call leaves them out: pass them, or perforate without them")
                continue
            value = bound.arguments.get(name, ())
            if param.kind is _P.VAR_POSITIONAL:
                if len(value) != len(traced):
                    raise CallError(f"{self.model_name} was traced with {len(traced)} extra positional "
                                    f"input(s) in *{name}, this call passes {len(value)}: "
                                    "perforate with an example of this call")
                g_args.extend(self._check(f"{name}[{i}]", t, v) for i, (t, v) in enumerate(zip(traced, value)))
                continue
            value = self._check(name, traced, value)
            if self.style == "positional" or param.kind is _P.POSITIONAL_ONLY or name in before_rest:
                g_args.append(value)
            elif self._passed(name, value):
                g_kwargs[name] = value
        return tuple(g_args), g_kwargs, extra

    def graph_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The graph's call for the traced example itself (untraced keywords are refused)."""
        g_args, g_kwargs, extra = self.bind(args, kwargs)
        if extra:
            raise CallError(f"keyword input(s) {sorted(extra)} were not traced")
        return g_args, g_kwargs

    def _check(self, name: str, traced: tuple, value):
        """`value` as the graph takes it (dicts in the traced key order); CallError where the graph was
        traced with another pattern."""
        if _matches(traced, value):  # (the usual call: nothing to rebuild)
            return value
        ordered = _in_traced_order(traced[0], value)
        if _matches(traced, ordered):
            return ordered
        now, then = _describe(_template(value)), _describe(traced)
        if now == then:  # (alike in print, not in type: a torch.Size where a tuple was traced)
            now, then = f"{now} (a {type(value).__name__})", f"{then} (a {traced[0].type.__name__})"
        what = f"was traced with {name}={then}, this call passes {now}"
        fix = (f"an example call that leaves {name} out, as this one does" if value is None else
               f"an example call whose {name} is {now}, as in this one")
        raise CallError(f"{self.model_name} {what}: the graph is specialised to the traced value; perforate with {fix}")


def _plain_arity(sig: inspect.Signature, traced: dict) -> int:
    n = 0
    params = list(sig.parameters.values())
    while n < len(params) and params[n].kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD) \
            and traced[params[n].name] == _template(torch.empty(0)):
        n += 1
    for param in params[n:]:
        t = traced[param.name]
        if param.kind in _VARIADIC:
            if t:
                return -1
        elif param.default is _P.empty or _has_tensor(t) or not _matches(t, param.default):
            return -1
    return n
