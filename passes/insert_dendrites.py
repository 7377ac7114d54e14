"""insert_dendrites: route each site's output through a Site module.

Requires: `specs` from `find_sites` on this very graph (checked: their graphs, modules, nodes and weight shapes).
Ensures: for every graph site (in its own graph: `spec.graph`), `call_module pbp_sites.<key>(x, out)` follows the site output
and has taken over all its uses, x being what the neuron reads (an upstream Site's output
where sites chain), and the site knows the module its output node calls, or that the node is the neuron
layer as a function (`Site.output_made_by`); every leaf site's neuron is swapped for SwappedNeuron. With
no dendrites installed each Site returns its input unchanged, so the model computes exactly
what it computed before.
"""
from __future__ import annotations

from typing import Iterable

from torch import fx, nn

from pbp_fx.config import PBConfig
from pbp_fx.layers import LayerSpec, NormSpec
from pbp_fx.site import FUNCTION_MADE, Site, SwappedNeuron

from .find_sites import SiteSpec
from .manager import ContractError
from .patterns import node_arg, attr_tensor

__all__ = ["insert_dendrites", "ensures_inserted", "record_output_makers", "site_key", "SITES_ATTR"]

SITES_ATTR = "pbp_sites"


def site_key(name: str) -> str:
    """A module-attribute-safe key for a site name."""
    return name.replace(".", "_").replace("@", "_at")


def insert_dendrites(gm: fx.GraphModule, specs: Iterable[SiteSpec], activation: str = PBConfig.activation,
                     mode: str = PBConfig.mode) -> fx.GraphModule:
    """Insert one Site per spec into `gm` (in place) and return it."""
    specs = list(specs)
    for spec in specs:  # (all before any is inserted: nothing half-perforated)
        if not isinstance(spec, SiteSpec) or not isinstance(spec.layer, LayerSpec) or not (
                spec.norm is None or isinstance(spec.norm, NormSpec)):
            what = type(spec).__name__ if not isinstance(spec, SiteSpec) else (
                f"a spec whose layer is a {type(spec.layer).__name__}" if not isinstance(spec.layer, LayerSpec)
                else f"a spec whose norm is a {type(spec.norm).__name__}")
            raise TypeError(f"insert_dendrites got {what}: pass find_sites(gm)'s SiteSpecs, or "
                            "SiteSpec.from_dict(d) of their to_dict() data")
        missing = _missing_from(gm, spec)
        if missing:
            raise ValueError(f"site spec {spec.name!r} names {missing}, which this graph lacks: the specs come from "
                             "find_sites on another graph; pass find_sites(gm) of this one")
    for graph in dict.fromkeys(s.graph for s in specs if s.graph):  # submodules traced in place
        _insert(gm.get_submodule(graph), [s for s in specs if s.graph == graph], activation, mode)
    gm = _insert(gm, [s for s in specs if not s.graph], activation, mode)
    ensures_inserted(gm, specs)
    return gm


def ensures_inserted(gm: fx.GraphModule, specs: Iterable[SiteSpec]) -> None:
    """This pass's Ensures, checked: each graph site's output is read by its Site node alone, and each
    leaf site's neuron is a SwappedNeuron of its Site (ContractError otherwise)."""
    nodes: dict[str, dict] = {}  # graph path -> {node name: node}, built once per graph
    for spec in specs:
        owner = gm.get_submodule(spec.graph) if spec.graph else gm
        if spec.in_leaf:
            neuron = owner.get_submodule(spec.module)
            if not isinstance(neuron, SwappedNeuron) or neuron.site.name != spec.name:
                raise ContractError(f"insert_dendrites left site {spec.name!r}'s neuron {spec.module!r} unswapped")
            continue
        if spec.graph not in nodes:
            nodes[spec.graph] = {n.name: n for n in owner.graph.nodes}
        out = nodes[spec.graph][spec.output_node]
        readers = [u for u in out.users if not (u.op == "call_module" and u.target.startswith(SITES_ATTR + ".")
                                                and owner.get_submodule(u.target).name == spec.name)]
        if readers or not out.users:
            raise ContractError(f"insert_dendrites left site {spec.name!r}'s output {out.name} read by "
                                f"{[u.name for u in readers] or 'no Site'}")


def _missing_from(gm: fx.GraphModule, spec: SiteSpec) -> str:
    """What of the spec's graph, module, weight and nodes `gm` lacks ("" when it has them all)."""
    try:
        owner = gm.get_submodule(spec.graph) if spec.graph else gm
    except AttributeError:
        return f"graph {spec.graph!r}"
    try:
        if spec.module is not None:
            owner.get_submodule(spec.module)
        attr_tensor(owner, spec.weight)
    except AttributeError:
        return f"module {spec.module or spec.weight!r}"
    weight = attr_tensor(owner, spec.weight)
    shape = tuple(weight.shape)[::-1] if spec.weight_transposed else tuple(weight.shape)
    if shape != tuple(spec.layer.weight_shape):
        return f"a {spec.weight!r} of shape {tuple(spec.layer.weight_shape)} (it is {shape} here)"
    if not spec.in_leaf:
        nodes = {n.name for n in owner.graph.nodes} if isinstance(owner, fx.GraphModule) else set()
        for node in (spec.neuron_node, spec.output_node):
            if node not in nodes:
                return f"node {node!r}"
    return ""


def _insert(gm: fx.GraphModule, specs: list, activation: str, mode: str) -> fx.GraphModule:
    if not hasattr(gm, SITES_ATTR):
        gm.add_submodule(SITES_ATTR, nn.ModuleDict())
    sites: nn.ModuleDict = getattr(gm, SITES_ATTR)
    names = {s.name for s in sites.values()}
    nodes = {n.name: n for n in gm.graph.nodes}
    for spec in specs:
        if spec.name in names or spec.in_leaf and isinstance(gm.get_submodule(spec.module), SwappedNeuron):
            raise ValueError(f"site {spec.name!r} is already perforated: run insert_dendrites once per graph")
        names.add(spec.name)
        weight = attr_tensor(gm, spec.weight)
        site = Site(spec.name, spec.layer, spec.norm, activation=activation, mode=mode)
        site.to(device=weight.device, dtype=weight.dtype)  # new dendrites follow the layer's device and dtype
        site.spec = spec
        if spec.in_leaf:
            owner, _, child = spec.module.rpartition(".")
            parent = gm.get_submodule(owner)
            setattr(parent, child, SwappedNeuron(getattr(parent, child), site))
            continue
        key = site_key(spec.name)
        while key in sites:  # "a.b" and "a_b" share a key: keep both sites
            key += "_"
        sites[key] = site
        norm = nodes.get(spec.norm_node)
        if norm is not None and norm.op == "call_module":  # (a BatchNorm, or its ModeSwitch under torch.export)
            site.follow_mode_of(gm.get_submodule(norm.target))
        # The neuron's current input, not spec.input_node: when that node is an upstream site's
        # output, the upstream Site has taken over its uses and the dendrites must see the same x.
        out, x = nodes[spec.output_node], node_arg(nodes[spec.neuron_node], spec.input_index, spec.input_name)
        with gm.graph.inserting_after(out):
            new = gm.graph.call_module(f"{SITES_ATTR}.{key}", (x, out))
        out.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    gm.graph.lint()
    gm.recompile()
    record_output_makers(gm)
    return gm


def record_output_makers(gm: fx.GraphModule) -> None:
    """Tell each site of gm's graphs what makes the output it reads (`Site.output_made_by`): the module its
    output node calls now, the neuron layer called as a function, or nothing known (None). Run again where
    modules may have been swapped since (a dendrite phase's start)."""
    for owner in gm.modules():
        if not isinstance(owner, fx.GraphModule):
            continue
        for node in owner.graph.nodes:
            if node.op != "call_module" or not node.target.startswith(SITES_ATTR + "."):
                continue
            site, out = owner.get_submodule(node.target), node.args[1]
            if not isinstance(site, Site) or not isinstance(out, fx.Node):
                continue
            if out.op == "call_module":
                site.output_made_by(owner.get_submodule(out.target))
            elif out.op == "call_function" and out.name == getattr(getattr(site, "spec", None), "neuron_node", None):
                site.output_made_by(FUNCTION_MADE)
            else:
                site.output_made_by(None)
