"""explain_sites: every Linear/Conv-like op of a model, and whether it is a site (or why not).

    rows = pbp_fx.explain_sites(model, example_inputs, exclude=["head"])
    for r in rows: print(r.name, r.kind, r.status, r.reason)

It traces a copy of the model like `perforate` does and looks at three things: the graph's
Linear/Conv-like nodes (the site rules of `passes.patterns` say why a node is not a site), the
include/exclude filters, and the model's Linear/Conv-like weights that no graph node turns into
a site (inside a layer symbolic tracing keeps whole, behind a function the graph does not look
into, in untraceable Python, or not used on the example inputs); a layer whose weight is computed
at run time is named by the parameter it is computed from.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx, nn

from .tracing import TracedPart, copy_module, trace

__all__ = ["SiteExplanation", "explain_sites", "explain_graph", "UNTRACED"]

# A reason the user has been told of already (a parts capture's warning): perforate warns of the others.
UNTRACED = "in the root's untraceable Python (not traced)"


@dataclass(frozen=True)
class SiteExplanation:
    """One Linear/Conv-like op: `status` "site" or "not a site", and the reason when not."""

    name: str  # the site name, or the weight's / node's qualified name
    kind: str  # "linear", "conv2d", ... or the layer / op type
    status: str
    reason: str = ""


def explain_sites(model: nn.Module, example_inputs=(), include=None, exclude=None, *,
                  example_kwargs: Optional[dict] = None, frontend: str = "auto") -> list[SiteExplanation]:
    """Every Linear/Conv-like op of `model` with "site" or the reason it is not one (sites first,
    in graph order). Arguments as for `perforate`; the model is not modified."""
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    model = copy_module(model)
    gm = trace(model, example_inputs, example_kwargs, frontend=frontend)
    return explain_graph(gm, model, include, exclude)


def _graphs(gm: fx.GraphModule) -> list[tuple[str, fx.GraphModule]]:
    """(name prefix, graph) for the graph and the submodules traced in place under it."""
    out = [("", gm)]
    out += [(part.name + ".", part.graph_module) for _, part in gm.named_modules() if isinstance(part, TracedPart)]
    return out


def _kind(node: fx.Node, g: fx.GraphModule) -> str:
    from .passes.patterns import target_name

    if node.op == "call_module":
        return type(g.get_submodule(node.target)).__name__
    if isinstance(node.target, torch._ops.OpOverload):  # (a torch.export graph's aten op: einsum, not einsum.default)
        return node.target.overloadpacket.__name__
    return target_name(node.target)


def explain_graph(gm: fx.GraphModule, model: nn.Module, include=None, exclude=None) -> list[SiteExplanation]:
    """explain_sites on a traced graph of `model` (which shares its parameters)."""
    from .passes.find_sites import find_sites, live_nodes
    from .passes.patterns import NEVER_SITES, NotASite, attr_tensor, explain_neuron, match_neuron, neuron_weights

    rows: list[SiteExplanation] = []
    reached: set[int] = set()
    selected = {s.name for s in find_sites(gm, include, exclude, model=model)}
    specs = find_sites(gm)
    for spec in specs:
        owner = gm.get_submodule(spec.graph) if spec.graph else gm
        reached.add(id(attr_tensor(owner, spec.weight)))
        if spec.name in selected:
            rows.append(SiteExplanation(spec.name, spec.kind, "site"))
        else:
            rows.append(SiteExplanation(spec.name, spec.kind, "not a site", "excluded by include/exclude"))
    wrapped: dict[int, tuple] = {}  # weight id -> (the function that reads it without a site rule seeing it, its target)
    read: set[int] = set()  # ids of the attributes the graphs read
    contracted: dict[int, tuple] = {}  # parameter id -> (its name, the contraction reading it: einsum, ...)
    for prefix, g in _graphs(gm):
        params = {id(p): n for n, p in g.named_parameters()}
        live = live_nodes(g.graph)
        for node in g.graph.nodes:
            dead = None if node in live else match_neuron(node, g)
            if dead is not None:
                reached.add(id(attr_tensor(g, dead.weight)))
                name = dead.module or dead.weight.removesuffix(".weight")
                rows.append(SiteExplanation(prefix + name, dead.layer.kind, "not a site",
                                            "its result is not used: no output depends on it"))
                continue
            verdict = explain_neuron(node, g)
            if isinstance(verdict, NotASite):
                weight, computed = _weight_of(node, g)
                if weight is not None:
                    reached.add(id(weight))
                attrs = [a.target for a in node.all_input_nodes if a.op == "get_attr"]
                own = params.get(id(weight)) if weight is not None else None
                name = prefix + (own or (attrs[0] if attrs else node.name))
                why = computed or str(verdict)
                rows.append(SiteExplanation(name, _kind(node, g), "not a site", why))
            elif node.op == "get_attr" and verdict is None:
                try:
                    value = attr_tensor(g, node.target)
                except AttributeError:
                    continue
                if node.users:
                    read.add(id(value))
                users = [u for u in node.users if u.op == "call_function" and explain_neuron(u, g) is None]
                if users:
                    wrapped.setdefault(id(value), (_kind(users[0], g), users[0].target))
                    contraction = next((u for u in users if _is_contraction(u.target)), None)
                    if contraction is not None and value.dim() >= 2 and value.is_floating_point():
                        contracted.setdefault(id(value), (prefix + params.get(id(value), node.target),
                                                          _kind(contraction, g)))
    leaves = [] if gm.meta.get("pbp_frontend") == "parts" else _leaf_modules(gm)
    plain = set(gm.meta.get("pbp_plain", []))
    site_names = {spec.name for spec in specs}
    weights = neuron_weights(model)
    for name, p in weights:
        if id(p) in reached:
            continue
        layer, parametrized, _ = name.partition(".parametrizations.")
        if parametrized and layer in site_names:
            continue  # a site's parametrization originals (weight_norm's g and v): the site reads them
        module_path = name.rpartition(".")[0]
        kind = _weight_kind(model, module_path, p)
        if isinstance(model.get_submodule(layer if parametrized else module_path), NEVER_SITES):
            rows.append(SiteExplanation(name, kind, "not a site", f"{kind} is not a layer kind pbp-fx perforates "
                                        "(Linear, Conv1d/2d/3d and their functional forms)"))
            continue
        leaf = next((lf for lf in leaves if module_path == lf or module_path.startswith(lf + ".")), None)
        if leaf is not None:
            why = (f"inside {type(model.get_submodule(leaf)).__name__} {leaf!r}, a layer symbolic tracing keeps "
                   "whole: frontend='export' reaches it")
        elif id(p) in wrapped:
            why = _read_by(*wrapped[id(p)], gm.meta.get("pbp_frontend"))
        elif module_path in plain or gm.meta.get("pbp_frontend") == "parts":
            why = UNTRACED
        elif id(p) in read:
            why = "read by the graph, but no Linear/Conv op takes it or a value computed from it as its weight"
        else:
            why = "not used on the example inputs"
        rows.append(SiteExplanation(name, kind, "not a site", why))
    listed = {id(p) for _, p in weights} | reached
    for pid, (name, op) in contracted.items():  # (parameters of no layer: neuron_weights does not list them)
        if pid not in listed:
            rows.append(SiteExplanation(name, op, "not a site", f"read by {op}(), which is no Linear/Conv op pbp-fx "
                                        "perforates: write the product as F.linear(x, W) or x @ W to make it a site"))
    return rows


# Tensor contractions that can hold a layer's product (a weight read by them is a layer in all but form).
_CONTRACTIONS = (torch.einsum, torch.tensordot, torch.bmm, torch.baddbmm, torch.matmul, operator.matmul, torch.mm)
_CONTRACTION_NAMES = frozenset(f.__name__ for f in _CONTRACTIONS)  # (their aten ops' names in a torch.export graph)


def _is_contraction(target) -> bool:
    """One of _CONTRACTIONS, as fx records it or as its aten op in a torch.export graph."""
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__ in _CONTRACTION_NAMES
    return target in _CONTRACTIONS


def _read_by(kind: str, target, frontend: Optional[str]) -> str:
    """Why a weight read by a call no site rule matches is no site."""
    if kind.startswith("wrap_with_"):  # (torch.export's grad-mode / autocast region)
        return (f"inside a region the forward runs under another grad mode or autocast, which torch.export keeps "
                f"as one call ({kind}) that no site rule looks into")
    if isinstance(target, torch._ops.OpOverload) or str(getattr(target, "__module__", "")).startswith("torch"):
        return f"read by {kind}(), which is no Linear/Conv op pbp-fx perforates"
    if frontend == "export":
        return f"read by {kind}(), which the graph does not look into"
    return f"read by {kind}(), which the graph does not look into: frontend='export' reaches it"


# timm's ScaledStdConv2d and BiT's StdConv2d standardize their weight in forward.
COMPUTED = ("the layer's weight is computed at run time from this parameter (e.g. standardized in forward), "
             "so it is no parameter and the layer is not a site")
# nn.MultiheadAttention's packed in_proj_weight, split where query and key/value differ (cross-attention).
SLICED = ("the layer's weight is a part or view of this parameter taken at run time (a slice, split or reshape, e.g. "
          "a packed projection split in forward), so it is no parameter of its own and the layer is not a site")
# Ops that take part of a tensor or lay it out anew, computing no value (fx's names and aten's).
_VIEW_OPS = frozenset({"getitem", "split", "split_with_sizes", "chunk", "unbind", "narrow", "slice", "select", "view",
                       "reshape", "flatten", "unflatten", "t", "transpose", "permute", "contiguous", "squeeze",
                       "unsqueeze", "expand", "alias", "clone", "getattr", "T", "mT", "numpy_T", "adjoint"})


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target.overloadpacket.__name__
    return getattr(node.target, "__name__", "")


def _weight_of(node: fx.Node, g: fx.GraphModule) -> tuple:
    """(the parameter a Linear/Conv-like node reads as its weight, None), or for a weight computed at run time,
    (the parameter it is computed from, SLICED where only views lead there, else COMPUTED); (None, None) when
    neither. A >= 2-D parameter is taken before a flat one."""
    from .passes.patterns import explain_neuron

    if node.op == "call_module":
        return getattr(g.get_submodule(node.target), "weight", None), None
    direct = _param_at_least_2d(node.all_input_nodes, g)
    if direct is not None or node.op != "call_function" or len(node.args) < 2:
        return direct, None
    seen, todo = set(), [node.args[1]] if isinstance(node.args[1], fx.Node) else []
    flat = None  # (a 1-D parameter the weight is a view of: taken where no >= 2-D one is found)
    while todo:  # (the weight argument's own inputs, back to the parameters it is computed from)
        n = todo.pop()
        if n in seen or n.op not in ("call_function", "call_method") or explain_neuron(n, g) is not None:
            continue  # (a weight computed by another layer, a hypernetwork's, is no parameter of this one)
        seen.add(n)
        found = _param_at_least_2d(n.all_input_nodes, g)
        if found is not None:
            return found, _how(seen)
        if flat is None:
            flat = _param_at_least_2d(n.all_input_nodes, g, dims=1)
            flat_how = _how(seen)
        todo.extend(n.all_input_nodes)
    return (flat, flat_how) if flat is not None else (None, None)


def _how(path: set) -> str:
    """SLICED where every op on the way from the parameter to the weight only takes part of it or lays it out
    anew, else COMPUTED."""
    return SLICED if all(_op_name(n) in _VIEW_OPS for n in path) else COMPUTED


def _param_at_least_2d(nodes, g: fx.GraphModule, dims: int = 2):
    for a in nodes:
        if a.op == "get_attr":
            try:
                t = g.get_parameter(a.target)
            except AttributeError:
                continue
            if t.dim() >= dims:
                return t
    return None


def _leaf_modules(gm: fx.GraphModule) -> list[str]:
    """Paths of modules the graph calls whole (fx leaves other than pbp-fx's own modules)."""
    from .modes import ModeSwitch
    from .site import FusedSite, Site

    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if not isinstance(m, (Site, FusedSite, ModeSwitch, nn.Linear, nn.modules.conv._ConvNd)):
                out.append(node.target)
    return out


def _weight_kind(model: nn.Module, module_path: str, p) -> str:
    try:
        owner = model.get_submodule(module_path) if module_path else model
    except AttributeError:
        return f"{p.dim()}-D weight"
    return type(owner).__name__
