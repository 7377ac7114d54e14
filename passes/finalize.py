"""finalize: the eval-only graph with dendrites fused into their neurons.

Requires: a GraphModule from `insert_dendrites` (any phase; candidates are dropped).
Ensures: a new GraphModule (the input is not modified) in eval mode, with no Site,
SwappedNeuron or candidate left: a site with K >= 1 dendrites is ONE `FusedSite` node whose
weights are the neuron's and the dendrites' concatenated, norms folded; a site with K = 0 is
the original neuron (and norm) nodes, untouched. A neuron (or norm) with forward hooks of the
user's keeps its own call, hooks and all, and its FusedSite (neuron row zero) adds the dendrites to
it. Train/eval `ModeSwitch` nodes become their
eval-mode ops (train-only updates go). A neuron weight stored [in, C] (`x @ W`) is fused
transposed. A neuron weight the rest of the model still uses (tied weights: GPT-2's lm_head
and its embedding), or that several sites read (a module called twice), stays one tensor: each such site
becomes a `TiedFusedSite` that reads it (the neuron's bias is copied per site). The graph
returns the structure the model's forward returned (a ModelOutput that fx wrote as a plain dict).
GraphModules nested in the model (submodules traced in place under an untraceable root, see
`pbp_fx.tracing.TracedPart`) are finalized the same way, in place in the copy, and the graph around
them takes its inputs as the root's forward names them (unless it takes *args or **kwargs).
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import inspect
import operator

import torch
from torch import fx, nn

from pbp_fx.layers import WEIGHT_HOOKS, fold_norm, has_user_hooks
from pbp_fx.modes import ModeSwitch
from pbp_fx.site import CandidatePool, FusedSite, FusedSwappedNeuron, Site, SwappedNeuron, TiedFusedSite
from pbp_fx.tracing import copy_module, parts_model, spec_copy_warnings_ignored

from .insert_dendrites import SITES_ATTR
from .manager import ContractError
from .patterns import attr_tensor
from .train_eval import MODES_ATTR, lower_to_eval
from .submodules import delete_unused_submodules

__all__ = ["finalize", "ensures_finalized", "fuse_site", "FUSED_ATTR"]

FUSED_ATTR = "pbp_fused"


def _neuron_tensors(root: nn.Module, site: Site):
    """The neuron's eval-form weight and bias, its joined norm folded in."""
    spec = site.spec
    w = attr_tensor(root, spec.weight).detach()
    if getattr(spec, "weight_transposed", False):
        w = w.t()  # stored [in, C] for x @ W
    b = None if spec.bias is None else attr_tensor(root, spec.bias).detach()
    if spec.norm is not None:
        t = {k: (None if p is None else attr_tensor(root, p).detach()) for k, p in spec.norm_tensors.items()}
        w, b = fold_norm(w, b, t["running_mean"], t["running_var"], t["weight"], t["bias"], spec.norm.eps)
    return w, b


def fuse_site(site: Site, neuron_weight: torch.Tensor, neuron_bias) -> FusedSite:
    """One FusedSite from a site's neuron tensors (norm already folded) and its dendrites."""
    dw, db = site.folded()
    weight = torch.cat([neuron_weight.unsqueeze(0).to(dw), dw], 0)
    bias = None
    if neuron_bias is not None or db is not None:
        zeros = torch.zeros(site.channels, dtype=dw.dtype, device=dw.device)
        nb = zeros if neuron_bias is None else neuron_bias.to(dw)
        bias = torch.cat([nb.unsqueeze(0), zeros.expand(site.num_dendrites, -1) if db is None else db], 0)
    return FusedSite(site.layer, weight, bias, site.cascade.detach(), site.out_weight.detach(),
                     site.activation, site.name)


def _dendrites_only(site: Site, neuron_weight: torch.Tensor) -> FusedSite:
    """A site's FusedSite whose neuron row is zero: it adds the dendrites to a neuron that runs on
    its own (a layer with hooks of the user's)."""
    return fuse_site(site, torch.zeros_like(neuron_weight), None)


def _erase_if_dead(graph: fx.Graph, node) -> None:
    if isinstance(node, fx.Node) and not node.users and node.op in ("call_module", "call_function", "get_attr"):
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        for i in inputs:
            # the weights (get_attr) and what only reshapes them (a transpose for x @ W.t())
            if i.op == "get_attr" or i.op == "call_function" and all(a.op == "get_attr" for a in i.all_input_nodes):
                _erase_if_dead(graph, i)


def _recompute_hooked_weights(gm: nn.Module) -> None:
    """Weights that `WEIGHT_HOOKS` recompute before each forward (a plain attribute, not a
    parameter), recomputed from their parameters now: an optimizer step since the last forward
    (or a load) left them stale, and fusing reads them. (In eval mode, as here, spectral_norm runs
    no power iteration: its buffers stay as they are.)"""
    with torch.no_grad():
        for m in gm.modules():
            for hook in list(m._forward_pre_hooks.values()):
                if isinstance(hook, WEIGHT_HOOKS):
                    hook(m, ())


def _runs_hooks(gm: nn.Module, node) -> bool:
    """Whether `node` calls a module with hooks of the user's (`has_user_hooks`): a fused site would
    skip them, so the neuron's own call stays."""
    return isinstance(node, fx.Node) and node.op == "call_module" and has_user_hooks(gm.get_submodule(node.target))


def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    if isinstance(getattr(gm, FUSED_ATTR, None), nn.ModuleDict) and not _has_sites(gm):
        raise ValueError("the graph is finalized already (it holds fused sites and no Site): finalize the "
                         "perforated graph once (pm.finalize() gives a new finalized copy each call)")
    with spec_copy_warnings_ignored():
        gm = copy_module(gm)
    gm.eval()
    _recompute_hooked_weights(gm)
    # Graphs nested in the model (submodules traced in place under an untraceable root, each
    # with its own sites) are fused first, innermost first; then the graph itself.
    nested = [m for name, m in gm.named_modules() if name and isinstance(m, fx.GraphModule) and _has_sites(m)]
    fused = [(inner, *_fuse_graph(inner)) for inner in reversed(nested)]
    fused.append((gm, *_fuse_graph(gm)))
    _retie(fused)  # (over every graph: a weight tied across parts, or held by the root's untraced code)
    _return_as_traced(gm)
    _call_parts_as_signed(gm)
    # Sites inside untraceable leaves: swap back to the neuron, or to a fused module.
    for name, mod in list(gm.named_modules()):
        if isinstance(mod, SwappedNeuron):
            owner, _, child = name.rpartition(".")
            parent = gm.get_submodule(owner)
            site = mod.site
            if site.num_dendrites == 0:
                replacement = mod.neuron
            elif has_user_hooks(mod.neuron):  # (its own call stays, hooks and all; the fused site adds the dendrites)
                replacement = FusedSwappedNeuron(_dendrites_only(site, mod.neuron.weight), mod.neuron,
                                                 runs_neuron=True)
            else:
                b = None if getattr(mod.neuron, "bias", None) is None else mod.neuron.bias.detach()
                neuron = copy.deepcopy(mod.neuron).requires_grad_(False)  # (the leaf reads its attributes)
                replacement = FusedSwappedNeuron(fuse_site(site, mod.neuron.weight.detach(), b), neuron)
            setattr(parent, child, replacement)
    gm.eval()
    for p in gm.parameters():
        p.requires_grad_(False)
    ensures_finalized(gm)
    return gm


def ensures_finalized(gm: fx.GraphModule) -> None:
    """This pass's Ensures, checked: no graph of `gm` calls a Site, candidate or ModeSwitch, no SwappedNeuron
    is left, and its fused sites are in eval mode (ContractError otherwise; the model's own modules follow its
    own train(), which may keep one training)."""
    for name, m in gm.named_modules():
        if isinstance(m, (SwappedNeuron, CandidatePool)):
            raise ContractError(f"finalize left a {type(m).__name__} at {name!r}")
        if m.training and isinstance(m, (FusedSite, FusedSwappedNeuron)):
            raise ContractError(f"finalize left {name!r} in train mode")
        if not isinstance(m, fx.GraphModule):
            continue
        for node in m.graph.nodes:
            called = m.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(called, (Site, ModeSwitch)):
                raise ContractError(f"finalize left node {node.name} calling a {type(called).__name__}")


def _return_as_traced(gm: fx.GraphModule) -> None:
    """The graph returns the structure the model's forward returned (a Hugging Face ModelOutput, an
    OrderedDict: `output_as_traced`) where fx wrote it as a plain dict with the same keys."""
    spec = gm.meta.get("pbp_out_spec")
    if spec is None or not (dataclasses.is_dataclass(spec.type) or spec.type is collections.OrderedDict):
        return
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    written = dict(output.args[0])
    with gm.graph.inserting_before(output):  # (an OrderedDict from its pairs: its keys need not be identifiers)
        built = (gm.graph.call_function(spec.type, kwargs=written) if dataclasses.is_dataclass(spec.type) else
                 gm.graph.call_function(spec.type, (list(written.items()),)))
    built.meta["is_wrapped"] = True  # (a leaf to the trace that unpickles the graph, which would write a dict again)
    output.args = (built,)
    gm.recompile()


_LITERALS = (type(None), bool, int, float, str)


def _call_parts_as_signed(gm: fx.GraphModule) -> None:
    """A parts graph (`root(args, kwargs)`, see `parts_model`) takes its inputs as the model's forward
    names them: torch.export runs a graph with its inputs flat, and handed its `*args` and `**kwargs`
    placeholders a list each. Left as it is for a forward with *args or **kwargs, a default that is
    no literal, or parameters fx cannot write in their order."""
    model = parts_model(gm)
    try:
        params = list(inspect.signature(model.forward).parameters.values()) if model is not None else None
    except (TypeError, ValueError):
        return
    if not params or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or (
            p.default is not p.empty and type(p.default) not in _LITERALS) for p in params):
        return
    defaulted = [p.default is not p.empty for p in params]
    if any(d and not later for d, later in zip(defaulted, defaulted[1:])):
        return  # (a keyword-only parameter without a default after one with: no positional signature)
    graph = fx.Graph()
    inputs = {p.name: graph.placeholder(p.name, default_value=p.default) for p in params}
    positional = tuple(inputs[p.name] for p in params if p.kind != p.KEYWORD_ONLY)
    keywords = {p.name: inputs[p.name] for p in params if p.kind == p.KEYWORD_ONLY}
    graph.output(graph.call_module("root", (positional, keywords)))
    gm.graph = graph
    gm.recompile()


def _has_sites(gm: fx.GraphModule) -> bool:
    return hasattr(gm, SITES_ATTR) or hasattr(gm, MODES_ATTR)


def _fuse_graph(gm: fx.GraphModule) -> tuple[nn.ModuleDict, dict]:
    """In place: the graph's ModeSwitch nodes lowered to eval, its Site nodes fused or removed. Returns its fused
    modules and, by key, the neuron weight each fused one copied (for `_retie`)."""
    lower_to_eval(gm)
    graph = gm.graph
    fused_mods = nn.ModuleDict()
    gm.add_submodule(FUSED_ATTR, fused_mods)
    neurons: dict[str, tuple] = {}  # fused key -> (neuron weight tensor, stored transposed, norm folded)
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        site = gm.get_submodule(node.target)
        if not isinstance(site, Site):
            continue
        x, out = node.args
        if site.num_dendrites == 0:
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            continue
        key = node.target.rpartition(".")[2]  # the Site's own key: unique, unlike site_key(name)
        norm_node = out if site.spec.norm_node else None
        neuron = norm_node.args[0] if norm_node is not None else out
        if _runs_hooks(gm, neuron) or _runs_hooks(gm, norm_node):
            # The neuron's own call stays (its hooks run there); the fused node adds the dendrites.
            fused_mods[key] = _dendrites_only(site, _neuron_tensors(gm, site)[0])
            with graph.inserting_after(node):
                tail = graph.call_module(f"{FUSED_ATTR}.{key}", (x,))
            with graph.inserting_after(tail):
                new = graph.call_function(operator.add, (out, tail))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            continue
        fused_mods[key] = fuse_site(site, *_neuron_tensors(gm, site))
        neurons[key] = (attr_tensor(gm, site.spec.weight), bool(getattr(site.spec, "weight_transposed", False)),
                        site.spec.norm is not None)
        with graph.inserting_after(node):
            new = graph.call_module(f"{FUSED_ATTR}.{key}", (x,))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        # The neuron (and its norm) now live inside the fused node.
        _erase_if_dead(graph, norm_node)
        _erase_if_dead(graph, neuron)
    if hasattr(gm, SITES_ATTR):
        delattr(gm, SITES_ATTR)
    if not len(fused_mods):
        delattr(gm, FUSED_ATTR)
    graph.lint()
    delete_unused_submodules(gm)
    gm.recompile()
    return fused_mods, neurons


def _retie(fused: list) -> None:
    """Sites whose neuron weight the finalized model still holds elsewhere, or another site reads too (a module
    called twice, layers sharing one weight), read it, not a copy. fused: (graph, its fused modules, its neurons)
    of every graph `finalize` fused, the root's last."""
    readers = collections.Counter(id(w) for _, _, neurons in fused for w, _, folded in neurons.values() if not folded)
    if not readers:
        return
    held = set()  # tensors the finalized graphs read outside the fused sites
    for gm, _, _ in fused:
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                held.add(id(attr_tensor(gm, node.target)))
            elif node.op == "call_module" and not node.target.startswith(FUSED_ATTR + "."):
                held.update(id(p) for p in gm.get_submodule(node.target).parameters())
    for _, fused_mods, neurons in fused:
        for key, (w, transposed, folded) in neurons.items():
            if (id(w) in held or readers[id(w)] > 1) and not folded and isinstance(w, nn.Parameter):
                fused_mods[key] = TiedFusedSite(fused_mods[key], w, transposed)
