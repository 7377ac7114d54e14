"""find_sites: decide which neurons get dendrites. Produces plain data, edits nothing.

Requires: a GraphModule from `pbp_fx.trace` (shape metadata optional but used when present).
Ensures: one SiteSpec per call of a Linear/Conv (module, functional or ATen with parameter
weights, `x @ W` products included; convs on batched inputs) whose result an output or a side
effect reads, in graph order, then one per
Linear/Conv inside untraceable leaves (each neuron once, also when leaves nest). A functional
site is named after the module that calls it when that module holds the weight (torch.export
records it in `node.meta["nn_module_stack"]`; a tied weight keeps the caller's name), else
after the weight's attribute path.
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import fx, nn

from pbp_fx.config import ConfigError
from pbp_fx.layers import LayerSpec, NormSpec

from .patterns import attr_tensor, computes_as_its_layer, match_neuron, match_norm, target_name

__all__ = ["SiteSpec", "find_sites", "SiteFilter", "live_nodes"]

SiteFilter = Union[None, str, type, Callable[[str, Optional[nn.Module]], bool], Iterable[Any]]


@dataclass
class SiteSpec:
    """Where a site is and what its neuron looks like (plain data)."""

    name: str  # public name: the neuron's qualified name, "@i" for the i-th reuse
    layer: LayerSpec
    norm: Optional[NormSpec] = None
    module: Optional[str] = None  # the neuron module's qualified name (None: functional)
    weight: Optional[str] = None  # attribute path of the neuron weight
    bias: Optional[str] = None
    neuron_node: Optional[str] = None  # None for a site inside an untraceable leaf
    input_node: Optional[str] = None
    output_node: Optional[str] = None  # the norm node when a norm joins, else the neuron node
    norm_node: Optional[str] = None
    norm_tensors: dict = field(default_factory=dict)
    weight_transposed: bool = False  # the weight parameter is stored [in, C] (x @ W): the neuron reads W.t()
    input_index: int = 0  # position of x in the neuron node's args (1 for addmm)
    input_name: str = "input"  # keyword of x in the neuron node's kwargs
    # Path of the GraphModule whose nodes these are ("" for the graph itself; a TracedPart's
    # graph when the root could not be traced); module / weight / node names are relative to it.
    graph: str = ""

    def to_dict(self) -> dict:
        """The spec as JSON-ready data (`from_dict` reads it back)."""
        return asdict(self)

    @staticmethod
    def from_dict(data: dict) -> "SiteSpec":
        """A spec from `to_dict`'s data, also after a JSON round trip (lists back to tuples)."""
        def layer(d: dict) -> LayerSpec:
            tuples = ("weight_shape", "stride", "padding", "dilation")  # (padding may be a str: "same")
            return LayerSpec(**{k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in d.items()})

        d = dict(data)
        d["layer"] = layer(d["layer"])
        d["norm"] = None if d.get("norm") is None else NormSpec(**d["norm"])
        return SiteSpec(**d)

    @property
    def in_leaf(self) -> bool:
        return self.neuron_node is None

    @property
    def kind(self) -> str:
        return self.layer.kind

    @property
    def channels(self) -> int:
        return self.layer.channels


def rules(f: SiteFilter, which: str = "include/exclude") -> list:
    """include / exclude as a list of rules (module types, name globs, callables `(name, module)`);
    anything else is refused in one line. An iterable is read once (a generator would be used up
    by the first layer), so callers pass the list on."""
    if f is None:
        return []
    if isinstance(f, (str, bytes, type)) or callable(f) and not isinstance(f, (list, tuple, set, nn.Module)):
        out = [f]
    else:
        try:
            out = list(f)
        except TypeError:
            out = [f]
    for rule in out:
        if isinstance(rule, nn.Module):
            raise ConfigError(f"{which} holds the module {type(rule).__name__}(...), an instance: pass its type "
                              f"({type(rule).__name__}), its name glob, or a callable (name, module) -> bool",
                              which.partition("/")[0], rule)
        if not isinstance(rule, (str, type)) and not callable(rule):
            raise ConfigError(f"{which} {rule!r} is not a rule: pass module types, name globs (\"layer1.*\") or "
                              "callables (name, module) -> bool, alone or in a list", which.partition("/")[0], rule)
    return out


def site_filters(include: SiteFilter, exclude: SiteFilter) -> tuple[Optional[list], Optional[list]]:
    """include and exclude read once and checked (`rules`), None when empty: what a caller that
    searches more than once (perforate's two searches, compare's arms, a training job) passes on."""
    return rules(include, "include") or None, rules(exclude, "exclude") or None


def _matches(rule, name: str, module: Optional[nn.Module]) -> bool:
    if isinstance(rule, type):
        return module is not None and isinstance(module, rule)
    if isinstance(rule, str):
        return fnmatch.fnmatchcase(name.split("@")[0], rule) or fnmatch.fnmatchcase(name, rule)
    if callable(rule):
        return bool(rule(name, module))
    raise TypeError(f"include/exclude entries must be module types, name globs or callables, got {rule!r}")


def selected(name: str, module: Optional[nn.Module], include: SiteFilter, exclude: SiteFilter) -> bool:
    inc, exc = rules(include), rules(exclude)
    if inc and not any(_matches(r, name, module) for r in inc):
        return False
    return not any(_matches(r, name, module) for r in exc)


def _owner(gm: nn.Module, path: str) -> Optional[nn.Module]:
    owner = path.rpartition(".")[0]
    try:
        return gm.get_submodule(owner) if owner else gm
    except AttributeError:
        return None


def _caller(gm: nn.Module, node: fx.Node, weight: str) -> Optional[str]:
    """The innermost module calling `node` (nn_module_stack) when it holds the weight under
    another path (a tied weight: GPT-2's lm_head reads the embedding matrix)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    if not isinstance(path, str) or not path or weight.startswith(path + "."):
        return None
    try:
        owner = gm.get_submodule(path)
        w = _owner(gm, weight)
        held = getattr(w, weight.rpartition(".")[2], None) if w is not None else None
    except AttributeError:
        return None
    return path if held is not None and any(p is held for p in owner.parameters(recurse=False)) else None


def _weight_site_name(weight: str, own: str) -> str:
    """A functional layer's site name from its weight's path: its owner's path; `own` for the
    graph root's own `weight` (a bare nn.Conv2d/nn.Linear perforated alone)."""
    if weight == "weight":
        return own
    return weight[: -len(".weight")] if weight.endswith(".weight") else weight


def find_sites(gm: fx.GraphModule, include: SiteFilter = None, exclude: SiteFilter = None,
               model: Optional[nn.Module] = None) -> list[SiteSpec]:
    """List the neuron sites of `gm`. include/exclude take module types, qualified-name
    globs ("layer1.*") or callables `(name, module) -> bool`; exclude wins. The root module's
    own weight (a bare layer perforated alone) is the site "root".
    model: the model `gm` was traced from. Rules then see its module that holds a functional
    layer's weight (fx copies such an owner into the graph as a plain nn.Module, so a rule for
    its type would not match the copy)."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"find_sites takes a captured graph, not a {type(gm).__name__}: pass pbp_fx.trace(model, "
                        "example_inputs)")
    return _find(gm, include, exclude, own="root", model=model)


def _holders(model: Optional[nn.Module]) -> dict[int, nn.Module]:
    """id of each parameter and buffer of `model` -> the first module that holds it itself."""
    out: dict[int, nn.Module] = {}
    for m in ([] if model is None else model.modules()):
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            out.setdefault(id(t), m)
    return out


def _holder_in_model(model: nn.Module, holders: dict[int, nn.Module], weight, path: str) -> Optional[nn.Module]:
    """The module of `model` that holds `weight` itself: the one at the weight's path in the graph where it
    does (a tensor tied between modules: the head, not the embedding), else its first holder."""
    try:
        at_path = model.get_submodule(path.rpartition(".")[0])
    except AttributeError:
        at_path = None
    if at_path is not None and any(t is weight for t in [*at_path.parameters(recurse=False),
                                                         *at_path.buffers(recurse=False)]):
        return at_path
    return holders.get(id(weight)) if isinstance(weight, torch.Tensor) else None


def _find(gm: fx.GraphModule, include: SiteFilter, exclude: SiteFilter, own: str,
          model: Optional[nn.Module] = None) -> list[SiteSpec]:
    """find_sites, naming the graph root's own weight `own` ("" inside a part: no module can have
    that name, so the part's qualifier tells it from a child module called "root")."""
    include, exclude = rules(include, "include"), rules(exclude, "exclude")
    holders = _holders(model) if include or exclude else {}
    specs: list[SiteSpec] = []
    uses: dict[str, int] = {}
    live = live_nodes(gm.graph)
    for node in gm.graph.nodes:
        if node not in live:
            continue  # a call whose result nothing reads: no output depends on a dendrite there
        match = match_neuron(node, gm)
        if match is None:
            continue
        caller = None if match.module else _caller(gm, node, match.weight)
        base = match.module or caller or _weight_site_name(match.weight, own)
        i = uses.get(base, 0)
        uses[base] = i + 1
        name = base if i == 0 else f"{base}@{i}"
        module = gm.get_submodule(match.module or caller) if (match.module or caller) else _owner(gm, match.weight)
        if match.module is None and caller is None and holders:  # (the model's module holding the weight)
            module = _holder_in_model(model, holders, attr_tensor(gm, match.weight), match.weight) or module
        if not selected(name, module, include, exclude):
            continue
        norm = match_norm(node, match.layer, gm)
        specs.append(SiteSpec(
            name=name, layer=match.layer, norm=None if norm is None else norm.norm,
            module=match.module, weight=match.weight, bias=match.bias, neuron_node=node.name,
            input_node=match.input.name, output_node=(norm.node if norm else node).name,
            norm_node=None if norm is None else norm.node.name,
            norm_tensors={} if norm is None else dict(norm.tensors),
            weight_transposed=match.weight_transposed, input_index=match.input_index, input_name=match.input_name))
    untraceable = gm.meta.get("pbp_untraceable", [])
    for leaf in untraceable:
        # A leaf inside another untraceable leaf: its neurons are found through the outer one.
        if not any(leaf.startswith(outer + ".") for outer in untraceable):
            specs.extend(_leaf_sites(gm, leaf, include, exclude))
    specs.extend(_part_sites(gm, include, exclude))
    return specs


def live_nodes(graph: fx.Graph) -> set:
    """The nodes the graph's outputs or side effects (impure calls, in-place writes such as a
    buffer's `copy_`, which a later call may read) read."""
    def effect(n: fx.Node) -> bool:
        name = target_name(n.target)
        in_place = n.op in ("call_method", "call_function") and name.endswith("_") and not name.endswith("__")
        return n.op != "placeholder" and (in_place or n.is_impure())

    todo = [n for n in graph.nodes if n.op == "output" or effect(n)]
    live: set = set()
    while todo:
        node = todo.pop()
        if node not in live:
            live.add(node)
            todo.extend(node.all_input_nodes)
    return live


def _part_sites(gm: fx.GraphModule, include: SiteFilter, exclude: SiteFilter) -> list[SiteSpec]:
    """Sites of the submodules traced in place under an untraceable root (`TracedPart`s), named
    by their path in the model (`backbone.body.conv1`)."""
    from pbp_fx.tracing import TracedPart

    out = []
    for path, part in gm.named_modules():
        if not isinstance(part, TracedPart):
            continue
        qualify = _part_qualifier(part)
        for spec in _find(part.graph_module, _scoped(include, qualify), _scoped(exclude, qualify), own="",
                          model=part.source):
            spec.name = qualify(spec.name)
            spec.graph = f"{path}.graph_module" + (f".{spec.graph}" if spec.graph else "")
            out.append(spec)
    return out


def _part_qualifier(part) -> Callable[[str], str]:
    """A site name inside a part -> its name in the model: `path.name`, except that the part's own
    weight (site "", `_find`: a part that is an nn.Linear traced alone, or a functional weight of
    the part's module) is named by the part's path, as the same layer inside a traced graph is."""
    def qualify(name: str) -> str:
        base, at, use = name.partition("@")
        return part.name + at + use if base == "" else f"{part.name}.{name}"
    return qualify


def _scoped(f: SiteFilter, qualify: Callable[[str], str]) -> list:
    """A filter for names inside a part: the rule sees the model-qualified name."""
    def rule(r):
        return lambda name, module: _matches(r, qualify(name), module)
    return [rule(r) for r in rules(f)]


def _leaf_sites(gm: fx.GraphModule, leaf: str, include: SiteFilter, exclude: SiteFilter) -> list[SiteSpec]:
    """Neurons inside an untraceable leaf: reached by module swapping, no norm joins."""
    from pbp_fx.site import SwappedNeuron

    out = []
    leaf_module = gm.get_submodule(leaf)
    for sub, m in leaf_module.named_modules():
        if not sub:
            continue
        try:
            layer = LayerSpec.from_module(m)
        except TypeError:
            continue
        if not computes_as_its_layer(m):  # (its own forward: no copy of the layer computes it)
            continue
        path = f"{leaf}.{sub}"
        # In a perforated graph (explain) the layer sits in its SwappedNeuron: named by the layer's
        # own path, as perforate named it, so that filters and reports see the same name.
        owner, _, last = sub.rpartition(".")
        swapped = last == "neuron" and owner and isinstance(leaf_module.get_submodule(owner), SwappedNeuron)
        name = f"{leaf}.{owner}" if swapped else path
        if selected(name, m, include, exclude):
            out.append(SiteSpec(name=name, layer=layer, module=path, weight=f"{path}.weight",
                                bias=f"{path}.bias" if m.bias is not None else None))
    return out
