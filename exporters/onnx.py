"""Export perforated models to ONNX, each fused site as ONE custom-domain node.

    export_onnx(pm, example_inputs, "model.onnx")              # fused (default)
    export_onnx(pm, example_inputs, "plain.onnx", fused=False) # standard ops only

Route (torch 2.13): the model is finalized (`PerforatedModel.finalize()`), then every
`FusedSite` in it is swapped for a small export module whose forward is
`torch.onnx.ops.symbolic("pbp::PerforatedLinear" | "pbp::PerforatedConv", ...)`: the dynamo
exporter (`torch.onnx.export(..., dynamo=True)`) writes that as a bare node in domain "pbp",
with the site's weights as initializers. After export the node gets its function overload
and the file gets one FunctionProto per signature (`pbp_fx.exporters.functions`), so plain
onnxruntime runs it. (Functions produced during translation would be inlined by the
exporter; attaching them afterwards keeps the fused op visible.) Nothing is registered
globally: `torch.onnx.ops.symbolic` is torch's own op.

A finalized graph made only of common layers (Linear, Conv, BatchNorm, pooling, elementwise
ops, fused sites) is written directly (`pbp_fx.exporters.direct`, milliseconds); any other
graph goes through the dynamo exporter, whose fixed cost is seconds.

Unfused (`fused=False`) exports the finalized graph's ordinary computation: one wide
Linear/Conv per site followed by standard slicing and elementwise ops.

Every file: ONNX IR >= 10 (function overloads; 10 for opsets 18-22), one default-domain opset shared by the graph
and the function bodies, a dynamic batch axis (dim 0 of every input and output) unless
`dynamic_batch=False` (and the named axes of `dynamic_axes`), passes
`onnx.checker.check_model(full_check=True)`, and carries metadata_props:

    pbp_fx.version     pbp_fx.__version__
    pbp_fx.sites       JSON list of site names
    pbp_fx.dendrites   JSON {site name: K}
    pbp_fx.activation  the dendrite activation ("none" when the model has no sites)
    pbp_fx.fused       "true" | "false"
    pbp_fx.domain      "pbp" (the custom domain of the fused ops)

The file is written atomically (a temporary file in the target directory, then
`os.replace`); a target whose directory is missing or not writable raises
`ExportPathError` (an `OSError`) before any work and leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import io
import json
import logging
import numbers
import os
import re
import sys
import warnings
from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np
import onnx
import torch
from torch import Tensor, fx, nn

from pbp_fx.errors import PBError, warn_at_user
from pbp_fx.fileio import atomic_write
from pbp_fx.inputs import opaque_holder
from pbp_fx.layers import conv_output_length, conv_pads, dendrite_calls
from pbp_fx.site import FusedSite, Site, dendrites_silenced
from pbp_fx.tracing import batch_size, buffers_kept, copy_module, ignore_spec_copy_warnings

from . import clip_after_site, output_weight_into_readers
from .direct import plain_output_names
from .functions import DOMAIN, DOMAIN_VERSION, MIN_OPSET, FusedOpSpec, make_function
from .ort import AXIS_RANGES_KEY, MAX_BATCH_KEY, MIN_BATCH_KEY, output_difference, sizes_text

__all__ = ["export_onnx", "check_other_sizes", "ExportError", "ExportPathError", "fused_op_spec", "MIN_IR_VERSION", "METADATA_KEYS",
           "MIN_OPSET", "MAX_OPSET"]

log = logging.getLogger(__name__)

# IR 10 is the first with function overloads; onnxruntime >= 1.16 reads it.
MIN_IR_VERSION = 10
# The newest opset torch.onnx reaches with onnxscript's own version converter; above it, its fallback
# to onnx's C API converter drops node metadata (the fused sites) and fails on ops such as Gelu.
MAX_OPSET = 25
# Conv and several other ops take bfloat16 from opset 22 on.
BFLOAT16_OPSET = 22
METADATA_KEYS = ("pbp_fx.version", "pbp_fx.sites", "pbp_fx.dendrites", "pbp_fx.activation",
                 "pbp_fx.fused", "pbp_fx.domain")
SITE_KEY = "pbp.site"  # node metadata: the site a fused node computes
OVERLOAD_KEY = "pbp.overload"  # node metadata, consumed (removed) after export


class ExportError(PBError):
    """The model cannot be exported to ONNX (unsupported layer, shape or option)."""


class ExportPathError(ExportError, OSError):
    """The output path cannot be written (missing or read-only directory, a directory)."""


# -- the fused op at export time ------------------------------------------------------------

def ntuple(v, n: int) -> tuple:
    """An int or sequence as an n-tuple of ints."""
    return tuple(int(i) for i in v) if isinstance(v, (tuple, list)) else (int(v),) * n


def fused_op_spec(site: FusedSite) -> FusedOpSpec:
    """The ONNX signature (function overload) of one FusedSite."""
    layer = site.layer
    common = dict(kind=layer.kind, channels=layer.channels, dendrites=site.num_dendrites,
                  activation=site.activation, has_bias=site.bias is not None)
    if layer.kind == "linear":
        return FusedOpSpec(**common)
    kernel = tuple(int(k) for k in layer.weight_shape[2:])
    nd = len(kernel)
    dilation = ntuple(layer.dilation, nd)
    begins, ends = conv_pads(layer.padding, kernel, dilation)
    return FusedOpSpec(**common, kernel_shape=kernel, strides=ntuple(layer.stride, nd),
                       pads=tuple(begins + ends), dilations=dilation, group=int(layer.groups),
                       padding_mode=layer.padding_mode)


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().contiguous().clone(), requires_grad=False)


class ExportedSite(nn.Module):
    """Stands in for a FusedSite during export: one `pbp::Perforated*` node.

    Holds the site's tensors in the layout the function body reads (see
    `pbp_fx.exporters.functions`). Its eager forward is the FusedSite's, so the module
    still computes the right thing outside export.
    """

    def __init__(self, site: FusedSite):
        super().__init__()
        self.site = site
        self.spec = fused_op_spec(site)
        layer = site.layer
        calls = [site.neuron_tensors()] + dendrite_calls(layer, *site.dendrite_tensors())
        if layer.kind == "linear":  # MatMul takes [In, outputs]
            calls = [(w.t(), b) for w, b in calls]
        self.weights = nn.ParameterList([_frozen(w) for w, _ in calls])
        self.biases = nn.ParameterList([_frozen(b) for _, b in calls] if self.spec.has_bias else [])
        self.U = _frozen(site.cascade) if self.spec.dendrites > 1 else None  # K = 1: no cascade
        self.V = _frozen(site.out_weight)

    def tensors(self) -> dict[str, Tensor]:
        """The fused node's inputs after x, by the function's input names."""
        names = self.spec.input_names()[1:]
        values = list(self.weights) + list(self.biases) + ([self.U] if self.U is not None else []) + [self.V]
        return dict(zip(names, values))

    def forward(self, x: Tensor) -> Tensor:
        # Dynamo (the exporter's strict capture) folds is_in_onnx_export() to False; it reads
        # is_exporting() as it is.
        if not (torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()):
            return self.site(x)
        spec = self.spec
        geometry = (spec.pads, spec.dilations, spec.kernel_shape, spec.strides) if spec.is_conv else None
        return _fused_node(x, list(self.tensors().values()), f"{DOMAIN}::{spec.op_type}", spec.attributes(),
                           spec.channels, geometry, {SITE_KEY: self.site.name, OVERLOAD_KEY: spec.overload})


# In the graph as one call under dynamo (the exporter's strict capture, used when the non-strict
# one fails: an untraceable root's Python), which skips torch.onnx's own code; export then
# traces into it and records the symbolic op. Registered by _torch_export, not at import:
# allow_in_graph imports torch._dynamo (about a second), which the direct writer never needs.
def _fused_node(x: Tensor, tensors: list, op: str, attributes: dict, channels: int, geometry, props: dict) -> Tensor:
    """One `pbp::Perforated*` node over x and the site's tensors; geometry: conv (pads,
    dilations, kernel, strides), None for linear."""
    # The input size the site's weights take: a dynamic axis that must equal it is specialised
    # (and refused after the export), as the unfused layer's own shape check does.
    weight = tensors[0]
    if geometry is None:
        torch._check(x.shape[-1] == weight.shape[0])  # MatMul's weight: [In, outputs]
        shape = [*x.shape[:-1], channels]
    else:
        torch._check(x.shape[1] == weight.shape[1] * int(attributes.get("group", 1)))
        pads, dilations, kernel, strides = geometry
        nd = len(kernel)
        shape = [x.shape[0], channels]
        for i in range(nd):
            shape.append(conv_output_length(x.shape[2 + i], pads[i], pads[nd + i], kernel[i], dilations[i], strides[i]))
    return torch.onnx.ops.symbolic(op, [x, *tensors], attributes, dtype=x.dtype, shape=shape,
                                   version=DOMAIN_VERSION, metadata_props=props)


def _swap_fused_sites(root: nn.Module) -> tuple[nn.Module, dict[str, FusedOpSpec]]:
    """Replace every FusedSite under `root` (in place) by an ExportedSite."""
    specs: dict[str, FusedOpSpec] = {}
    if isinstance(root, FusedSite):
        new = ExportedSite(root)
        return new, {new.spec.overload: new.spec}
    for name, mod in list(root.named_modules()):
        if not isinstance(mod, FusedSite):
            continue
        owner, _, child = name.rpartition(".")
        parent = root.get_submodule(owner) if owner else root
        new = ExportedSite(mod)
        setattr(parent, child, new)
        specs[new.spec.overload] = new.spec
    return root, specs


# -- what gets exported --------------------------------------------------------------------

def _prepare(model: nn.Module) -> tuple[nn.Module, dict[str, int], str]:
    """(an eval-mode module safe to modify, {site: K}, activation)."""
    from pbp_fx.perforated import PerforatedModel, perforated_inside

    if isinstance(model, PerforatedModel):
        module = model.finalize()  # a new eval-mode GraphModule; `model` is untouched
        return _root_of_parts(module), dict(model.num_dendrites), model.activation
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx needs a PerforatedModel or an nn.Module, got {type(model).__name__}")
    if inside := perforated_inside(model):  # its sites would be exported unfinalized, unfused
        raise ExportError(f"export_onnx got a {type(model).__name__}: {inside}; it is finalized and fused there"
                          + _own_layers_advice(model))
    sites = [m for m in model.modules() if isinstance(m, (Site, FusedSite))]
    dendrites = {m.name: m.num_dendrites for m in sites}
    activation = ",".join(sorted({m.activation for m in sites})) or "none"
    if isinstance(model, fx.GraphModule) and any(isinstance(m, Site) for m in sites):
        from pbp_fx.passes import finalize  # a perforated graph (pm.graph_module): fuse it first

        return _root_of_parts(finalize(model)), dendrites, activation
    return _root_of_parts(copy_module(model).eval()), dendrites, activation


def _own_layers_advice(wrapper: nn.Module) -> str:
    """For a module holding a PerforatedModel beside layers of its own (a normalisation before
    it): how to export them too, with the PerforatedModel finalized in its place."""
    from pbp_fx.perforated import PerforatedModel, access_path

    held = [name for name, m in wrapper.named_modules() if isinstance(m, PerforatedModel)]
    own = [f"model{access_path(wrapper, name)} ({type(m).__name__})" if name else "tensors of its own"
           for name, m in wrapper.named_modules()
           if not any(name == h or name.startswith(h + ".") for h in held)
           and any(True for _ in [*m.parameters(recurse=False), *m.buffers(recurse=False)])]
    if not own:
        return ""
    path = access_path(wrapper, held[0])
    return (f"; that file leaves out {type(wrapper).__name__}'s own layers ({', '.join(own[:3])}"
            f"{', ...' if len(own) > 3 else ''}): to keep them, export a copy holding the finalized model in its "
            f"place, m = copy.deepcopy(model); m{path} = m{path}.finalize()")


def _root_of_parts(module: nn.Module) -> nn.Module:
    """An untraceable root's graph (submodules traced in place) is exported as the root itself,
    called like the original, with its fused parts in place: torch.onnx captures the root's Python."""
    from pbp_fx.tracing import parts_model

    root = parts_model(module) if isinstance(module, fx.GraphModule) else None
    return module if root is None else root


def _warn_train_mode_only(model: nn.Module) -> None:
    """A PerforatedModel (or its finalized graph) whose graph follows train mode only: its file computes
    the train-mode path (perforate warned of the graph, not of the file)."""
    from pbp_fx.perforated import PerforatedModel

    meta = model.graph_module.meta if isinstance(model, PerforatedModel) else getattr(model, "meta", {})
    if meta.get("pbp_modes") == "train":
        warn_at_user(f"the model's graph follows train mode only ({meta.get('pbp_modes_reason', '')}), so the ONNX "
                     "file computes its train-mode path (batch statistics, buffer updates), not its eval-mode one: "
                     "for the file, load the trained model into one perforated in eval mode: pbp_fx.save(pm, path), "
                     "then pbp_fx.load(path, pbp_fx.perforate(base_model.eval(), example_inputs))")


def graph_inputs(model: nn.Module, example_inputs: Any, example_kwargs: Optional[dict] = None) -> tuple:
    """A model's example inputs as its graph (and so the ONNX file) takes them, positionally: a
    perforated model's call of the original (keyword inputs as a dict, positional `None`s or
    defaults) becomes the traced graph's own call."""
    from pbp_fx.perforated import PerforatedModel

    kwargs = dict(example_inputs) if isinstance(example_inputs, dict) else {}
    args = () if isinstance(example_inputs, dict) or example_inputs is None else _as_tuple(example_inputs)
    kwargs.update(example_kwargs or {})
    call = model.call_signature if isinstance(model, PerforatedModel) else None
    if call is None:
        if kwargs:
            why = ("were given to a model captured in parts (its root's Python runs as it is, so no graph records "
                   "their order; a model whose root does not trace, such as a Hugging Face model with its cache on: "
                   "use_cache=False often lets it trace whole)" if isinstance(model, PerforatedModel)
                   else "need a PerforatedModel, whose graph knows their order")
            raise ExportError(f"keyword example inputs (a dict) {why}: pass this model's inputs as a tuple, in the "
                              "order of its forward's parameters (a model file: example_inputs(), not example_kwargs())")
        return args
    try:
        args, kwargs = call.graph_inputs(args, kwargs)
    except TypeError as e:
        hint = "" if kwargs else "; keyword inputs go in a dict: example_kwargs={'name': tensor, ...}"
        if "traced with" in str(e):  # the graph is specialised to its example call (labels, say)
            hint += ("; a trained model keeps its weights: pbp_fx.save(model, path), then "
                     "pbp_fx.load(path, base_model, example_kwargs=<these inputs>) captures it for these inputs")
        raise ExportError(f"example inputs do not match the model: {e}{hint}") from e
    graph = model.graph_module
    if kwargs and any(n.target.startswith("**") for n in graph.graph.find_nodes(op="placeholder")):
        return GraphInputs((*args, *kwargs.values()), keywords=tuple(kwargs))
    return tuple(args) + tuple(kwargs.values())


class GraphInputs(tuple):
    """A graph's inputs whose last `keywords` go to its forward's `**name` by keyword (fx traces a
    forward(x, **kw) so), not by position."""

    def __new__(cls, values, keywords: tuple = ()):
        out = super().__new__(cls, values)
        out.keywords = keywords
        return out


class KeywordInputs(nn.Module):
    """`module` called with all its `count` inputs by position, the last `keywords` passed on by
    keyword; `input_names`: forward's parameters, then the keywords."""

    def __init__(self, module: nn.Module, keywords: tuple, count: int):
        super().__init__()
        self.module, self.keywords = module, tuple(keywords)
        self.input_names = _input_names(module, count - len(self.keywords)) + list(self.keywords)
        self.train(module.training)

    def forward(self, *inputs):
        n = len(inputs) - len(self.keywords)
        return self.module(*inputs[:n], **dict(zip(self.keywords, inputs[n:])))


class FlatInputs(nn.Module):
    """`module` called with the leaves of its nested inputs (a dict or list of tensors) given one
    by one, as an ONNX file takes them; `input_names` names each leaf by its path, e.g. batch_img."""

    def __init__(self, module: nn.Module, spec, input_names: list[str]):
        super().__init__()
        self.module = module
        self.spec = spec
        self.input_names = input_names
        self.train(module.training)

    def forward(self, *leaves):
        return self.module(*torch.utils._pytree.tree_unflatten(list(leaves), self.spec))


def defaults_as_constants(model: nn.Module, module: nn.Module, inputs: tuple) -> tuple:
    """The inputs without those the example call left to a tensor default of `model`'s forward
    (a PerforatedModel's call signature): each becomes a constant of the graph `module` (a
    placeholder replaced by a buffer), as torch.onnx writes a plain module's, so the file takes
    only the inputs the call gave (a default [1, C] tensor beside a batch was refused as a second,
    disagreeing batch)."""
    from pbp_fx.perforated import PerforatedModel

    call = model.call_signature if isinstance(model, PerforatedModel) else None
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"] \
        if isinstance(module, fx.GraphModule) else []
    if call is None or len(placeholders) != len(inputs) or any(n.target.startswith("*") for n in placeholders):
        return inputs
    defaults = {id(p.default) for p in call.signature.parameters.values() if isinstance(p.default, Tensor)}
    defaulted = [id(value) in defaults for value in inputs]
    codegen = module.graph._codegen
    pytree_info = codegen.pytree_info if isinstance(codegen, fx.graph._PyTreeCodeGen) else None
    if not any(defaulted) or (pytree_info is not None and not _flat_pytree_call(pytree_info, len(inputs))):
        return inputs  # (a nested pytree call: its spec is not rebuilt here, and the default stays an input)
    for node, value, is_default in zip(placeholders, inputs, defaulted):
        if is_default:
            name = f"pbp_default_{node.target}"
            module.register_buffer(name, value.detach().clone())
            with module.graph.inserting_after(node):
                constant = module.graph.get_attr(name)
            node.replace_all_uses_with(constant)
            module.graph.erase_node(node)
    if pytree_info is not None:  # (torch.export's graphs flatten their call by a spec of every input)
        names = [n for n, is_default in zip(pytree_info.orig_args, defaulted) if not is_default]
        spec = torch.utils._pytree.tree_structure((tuple(names), {}))
        module.graph._codegen = fx.graph._PyTreeCodeGen(fx.graph._PyTreeInfo(names, spec, pytree_info.out_spec))
    module.recompile()
    return tuple(value for value, is_default in zip(inputs, defaulted) if not is_default)


def _flat_pytree_call(info, count: int) -> bool:
    """Whether a pytree codegen's call is `count` inputs, each one placeholder: (args, kwargs) of leaves."""
    spec = info.in_spec
    if spec is None or len(info.orig_args) != count or not (
            spec.type is tuple and spec.num_children == 2 and spec.child(0).type is tuple
            and spec.child(1).type is dict):
        return False
    return all(part.child(i).is_leaf() for part in (spec.child(0), spec.child(1)) for i in range(part.num_children))


def flat_call(module: nn.Module, inputs: tuple) -> tuple[nn.Module, tuple]:
    """(module, inputs) as an ONNX file takes them: each input that is a list, tuple or dict
    (or a type registered with pytree, a registered dataclass) becomes its leaves, each an input of its own
    (through `FlatInputs`); else both unchanged.
    torch.onnx.export took a trailing dict for keyword arguments, and a list as one input. Inputs
    that go to the graph's `**name` (`GraphInputs.keywords`) are passed by keyword (`KeywordInputs`)."""
    keywords = getattr(inputs, "keywords", ())
    if keywords:
        module, inputs = KeywordInputs(module, keywords, len(inputs)), tuple(inputs)
    _refuse_objects_holding_tensors(module, inputs)
    pytree = torch.utils._pytree
    # (a dataclass registered with torch.export.register_dataclass is a container too)
    if all(pytree.tree_flatten(x)[1].is_leaf() for x in inputs):
        return module, inputs
    paths, spec = pytree.tree_flatten_with_path(tuple(inputs))
    tops = _input_names(module, len(inputs))
    names = [tops[path[0].idx] + "".join(f"_{_key_name(k)}" for k in path[1:]) for path, _ in paths]
    if len(set(names)) < len(names):  # (a parameter named like another's key: a_b and a["b"])
        names = [f"{name}_{i}" for i, name in enumerate(names)]
    return FlatInputs(module, spec, names), tuple(leaf for _, leaf in paths)


def _refuse_objects_holding_tensors(module: nn.Module, inputs: tuple) -> None:
    """An input that is, or holds, an object whose tensors pytree cannot reach (a dataclass not
    registered with torch.export.register_dataclass) is refused by name: torch.onnx failed on it with
    "Unsupported input type", or the batch check with "needs at least one tensor input"."""
    for top, x in zip(_input_names(module, len(inputs)), inputs):
        kind = opaque_holder(x)
        if kind is not None:
            register = (f", or register {kind} with torch.export.register_dataclass"
                        if opaque_holder(x, dataclasses_only=True) else "")
            raise ExportError(f"input {top!r} holds an object of type {kind}, whose tensors an ONNX file cannot take as "
                              f"they are: export a wrapper module that takes the tensors (as a tuple or dict) and builds "
                              f"the {kind} for the model{register}")


def _drop_unused_initializers(proto: onnx.ModelProto) -> None:
    """Initializers no node or output reads any more (a folded Clip's bounds): dropped, so that the
    file holds only what it runs and ONNX Runtime does not warn on loading it."""
    graph = proto.graph

    def read(g) -> set:  # names the graph's nodes read, subgraphs (If / Loop bodies) at any depth included
        names = {name for node in g.node for name in node.input}
        for node in g.node:
            for attr in node.attribute:
                for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                    names |= read(sub)
        return names

    used = read(graph) | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _as_tuple(example_inputs) -> tuple:
    return example_inputs if isinstance(example_inputs, tuple) else (
        tuple(example_inputs) if isinstance(example_inputs, list) else (example_inputs,))


def _tensor_input_names(module: nn.Module, inputs: tuple) -> list[str]:
    """The names of the file's inputs (the tensor ones among `inputs`): forward's parameters."""
    return [n for n, t in zip(_input_names(module, len(inputs)), inputs) if isinstance(t, Tensor)]


def _input_names(module: nn.Module, count: int) -> list[str]:
    """The names the ONNX file gives the first `count` inputs: `forward`'s parameters (both export
    paths name inputs so); a `*args` forward's inputs are `args_0`, `args_1`, ..."""
    import inspect

    if isinstance(module, (FlatInputs, KeywordInputs)):
        return module.input_names[:count]
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for p in params:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            names += [f"{p.name}_{i}" for i in range(count - len(names))]
        elif p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        if len(names) >= count:
            break
    return names[:count] + [f"input_{i}" for i in range(len(names), count)]


def check_dynamic_axes(dynamic_axes: Any) -> dict:
    """`dynamic_axes` in its one form {input name or position: {dim: axis name}}, or ExportError."""
    if dynamic_axes is None:
        return {}
    form = ("dynamic_axes takes {input name or position: {dim: axis name}}, e.g. "
            "{'input_ids': {1: 'sequence'}}")
    if not isinstance(dynamic_axes, dict):
        raise ExportError(f"dynamic_axes is a {type(dynamic_axes).__name__}: {form}")
    out = {}
    for key, dims in dynamic_axes.items():
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise ExportError(f"dynamic_axes key {key!r} is not an input name or position: {form}")
        if not isinstance(dims, dict) or not dims:
            raise ExportError(f"dynamic_axes[{key!r}] is {dims!r}: {form}")
        for dim, axis in dims.items():
            if isinstance(dim, bool) or not isinstance(dim, int):
                raise ExportError(f"dynamic_axes[{key!r}] has dim {dim!r}, not an int: {form}")
            if not isinstance(axis, str) or not axis.isidentifier():
                raise ExportError(f"dynamic_axes[{key!r}][{dim}] = {axis!r}: an axis name is an identifier "
                                  "such as 'sequence'")
        out[key] = dict(dims)
    return out


def _dynamic_shapes(module: nn.Module, inputs: tuple, dynamic_batch: bool, dynamic_axes: dict):
    """(inputs to trace with, dynamic_shapes). A batch of 1 is repeated to 2 so that the
    exporter does not specialise the batch axis to the constant 1; `dynamic_axes` (checked by
    `check_dynamic_axes`) adds named axes, one torch.export.Dim per name."""
    names = _input_names(module, len(inputs))
    axes: list[dict[int, str]] = [{} for _ in inputs]
    for key, dims in dynamic_axes.items():
        if isinstance(key, str):
            if key not in names:
                # (the tensor inputs only: a number input is a constant of the file, no input of it)
                raise ExportError(f"dynamic_axes names input {key!r}, which the exported graph does not take: "
                                  f"its inputs are {_tensor_input_names(module, inputs)}")
            i = names.index(key)
        elif not -len(inputs) <= key < len(inputs):
            raise ExportError(f"dynamic_axes names input position {key}, but the graph takes {len(inputs)} input(s)")
        else:
            i = key % len(inputs)
        t = inputs[i]
        if not isinstance(t, Tensor):
            raise ExportError(f"dynamic_axes names input {names[i]!r}, which is not a tensor: drop it")
        for dim, axis in dims.items():
            if not -t.dim() <= dim < max(t.dim(), 1) or t.dim() == 0:
                raise ExportError(f"dynamic_axes[{key!r}] (pbp-fx export --dynamic-axis {key}:{dim}=...) has dim {dim}, "
                                  f"but input {names[i]!r} has {t.dim()} dim(s) (shape {list(t.shape)})")
            dim %= t.dim()
            if dim == 0 and dynamic_batch and axis != "batch":
                raise ExportError(f"dynamic_axes names dim 0 of input {names[i]!r} {axis!r}, but dim 0 is the "
                                  "dynamic batch axis: drop it, or pass dynamic_batch=False "
                                  "(pbp-fx export --static-batch)")
            if dim != 0 and dynamic_batch and axis == "batch":
                raise ExportError(f"dynamic_axes names dim {dim} of input {names[i]!r} 'batch', the name of the dynamic "
                                  "batch axis (dim 0), which would tie the two sizes: give it another name, or pass "
                                  "dynamic_batch=False (pbp-fx export --static-batch)")
            if dim != 0 and t.shape[dim] < 2:
                # torch.export specialises sizes 0 and 1 to constants
                raise ExportError(f"input {names[i]!r} has size {t.shape[dim]} along dim {dim}, so that axis "
                                  "cannot be dynamic: export with an example of size >= 2 there")
            if dim in axes[i] and axes[i][dim] != axis:  # (the same dim as -1 and 2, or by name and position)
                raise ExportError(f"dynamic_axes gives dim {dim} of input {names[i]!r} two names, {axes[i][dim]!r} "
                                  f"and {axis!r}: give it one")
            axes[i][dim] = axis
    if dynamic_batch:
        tensors = [t for t in inputs if isinstance(t, Tensor) and t.dim() > 0]
        if not tensors:
            raise ExportError("dynamic_batch=True needs at least one tensor input with a batch axis: "
                              "pass dynamic_batch=False (pbp-fx export --static-batch)")
        sizes = {int(t.shape[0]) for t in tensors}
        if len(sizes) != 1:
            shown = ", ".join(f"{n} {int(t.shape[0])}" for n, t in zip(names, inputs)
                              if isinstance(t, Tensor) and t.dim() > 0)
            tensor_names = [n for n, t in zip(names, inputs) if isinstance(t, Tensor) and t.dim() > 0]
            shapes = {n: tuple(t.shape) for n, t in zip(names, inputs) if isinstance(t, Tensor)}
            # (an RNN's states, or a sequence-first layer's inputs, have their batch on dim 1)
            if any(isinstance(m, nn.RNNBase) or isinstance(m, nn.MultiheadAttention) and not m.batch_first
                   for m in module.modules()):
                advice = "for inputs whose batch is not dim 0 " + _batch_axes_advice(module, shapes, tensor_names,
                                                                                     None, ",")
            else:  # (nothing sequence-first: dim 0 is an axis of each input's own, a flat id list beside offsets)
                # (sizes 0 and 1 stay fixed: torch.export specialises them, a broadcast [1, C] input)
                sized = [n for n in tensor_names if shapes[n][0] > 1]
                example = ", ".join(f"{n!r}: {{0: '{n}_size'}}" for n in sized)
                flags = " ".join(f"--dynamic-axis {n}:0={n}_size" for n in sized)
                advice = ("where dim 0 is no batch the inputs share (a flat list of ids beside its offsets, a "
                          "broadcast [1, C] input), pass dynamic_batch=False with dynamic_axes naming the dim 0 of "
                          f"each input apart, e.g. {{{example}}} (--static-batch {flags})")
            raise ExportError(f"example inputs disagree on the batch size (dim 0: {shown}): give them one batch "
                              f"size, or, {advice}")
        if sizes == {1}:
            inputs = tuple(t.expand(2, *t.shape[1:]).clone() if isinstance(t, Tensor) and t.dim() > 0 else t
                           for t in inputs)
        for t, dims in zip(inputs, axes):
            if isinstance(t, Tensor) and t.dim() > 0:
                dims[0] = "batch"
    if not any(axes):
        return inputs, None
    sizes_of: dict[str, set] = {}
    for t, dims in zip(inputs, axes):
        for dim, axis in dims.items():
            sizes_of.setdefault(axis, set()).add(int(t.shape[dim]))
    for axis, sizes in sizes_of.items():
        if len(sizes) > 1 and axis != "batch":
            raise ExportError(f"the example inputs disagree on the size of axis {axis!r} ({sorted(sizes)}): one "
                              "name is one size, so give those dims one size or the axes different names")
    dims_of = {axis: torch.export.Dim(axis) for axis in sizes_of}
    shapes = tuple({d: dims_of[a] for d, a in dims.items()} if dims else None for dims in axes)
    return inputs, _by_parameter(module, shapes)


def _by_parameter(module: nn.Module, shapes: tuple):
    """dynamic_shapes as torch.export matches them to `forward`'s parameters: a forward that
    takes `*args` (a part traced in place, `forward(self, x, *rest)`) gets the inputs from that
    one on under its name, and those before it each under its own."""
    import inspect

    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return shapes
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
    if at is None:
        return shapes
    return {**{p.name: s for p, s in zip(params[:at], shapes[:at])}, params[at].name: tuple(shapes[at:])}


def _output_names(out, input_names: Sequence[str] = ()) -> Optional[list[str]]:
    """The names to export the example output `out` with (None: the exporter's), apart from the inputs'."""
    if isinstance(out, Tensor):
        return _apart_from_inputs(plain_output_names(1), input_names)
    if isinstance(out, (tuple, list)) and all(isinstance(o, Tensor) for o in out):
        return _apart_from_inputs(plain_output_names(len(out)), input_names)
    return None  # nested outputs (a dict: `_leaf_names` names them after the export)


def _distinct_names(names: list[str]) -> list[str]:
    """`names` with a repeat (keys that join alike: "a.b" and "a" -> "b") written `<name>_1`,
    `<name>_2`, ..., with a warning: the outputs kept the exporter's internal names."""
    seen, out = set(names), []
    for i, name in enumerate(names):
        if name in names[:i]:
            fresh = next(f"{name}_{n}" for n in range(1, len(names) + 2) if f"{name}_{n}" not in seen)
            warn_at_user(f"two outputs join their keys to {name!r}: the second is named {fresh!r} in the ONNX "
                         "file (keys without '.' name each output apart)")
            seen.add(fresh)
            name = fresh
        out.append(name)
    return out


def _has_bfloat16(proto) -> bool:
    """Whether the graph's inputs or initializers hold bfloat16."""
    bf16 = onnx.TensorProto.BFLOAT16
    return any(t.data_type == bf16 for t in proto.graph.initializer) or any(
        v.type.tensor_type.elem_type == bf16 for v in proto.graph.input)


def _apart_from_inputs(names: list[str], input_names) -> list[str]:
    """`names`, where one is an input's written `<name>_output` (an ONNX graph names each value once),
    with a warning."""
    taken = set(input_names)
    clashing = [n for n in names if n in taken]
    if not clashing:
        return names
    def free(name: str) -> str:  # (`<name>_output` may be an input's name too)
        while name in taken or name in names:
            name += "_output"
        return name

    renamed = [free(n) if n in taken else n for n in names]
    said = ", ".join(f"output {n!r} is named {renamed[names.index(n)]!r}" for n in clashing)
    warn_at_user(f"{said} in the ONNX file: an input has {'that name' if len(clashing) == 1 else 'each name'}")
    return renamed


def _not_a_tensor(out, where: str = "output") -> str:
    """The first part of an example output ONNX cannot return, described ("" when there is none);
    Nones are left out as the exporter leaves them."""
    if out is None or isinstance(out, Tensor):
        return ""
    if isinstance(out, dict):  # (a Hugging Face ModelOutput is one)
        items = [(f"{where}[{k!r}]", v) for k, v in out.items()]
    elif isinstance(out, (tuple, list)):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(out)]
    elif (children := _registered_children(out)) is not None:
        items = [(f"{where}{key}", v) for key, v in children]
    elif dataclasses.is_dataclass(out):
        return f"{type(out).__name__} (a dataclass) at {where}"
    elif isinstance(out, (int, float, str, bytes)):
        return f"{type(out).__name__} {str(out)[:40]} at {where}"
    else:  # (an object's repr can run long and say its type twice: an HF cache's does)
        return f"a {type(out).__name__} at {where}"
    return next((odd for odd in (_not_a_tensor(v, w) for w, v in items) if odd), "")


def _registered_children(out) -> Optional[list]:
    """(key, child) pairs of an object whose type torch's pytree registry flattens (a dataclass
    registered with torch.export.register_dataclass, a class of register_pytree_node), in the
    order the exporter flattens them; a key prints as ".field", "['key']" or "[0]"; None when
    the type is not registered."""
    from torch.utils import _pytree  # (torch's own registry: no public query of it)

    node = _pytree.SUPPORTED_NODES.get(type(out))
    if node is None:
        return None
    if node.flatten_with_keys_fn is not None:
        return list(node.flatten_with_keys_fn(out)[0])
    return [(_pytree.SequenceKey(i), child) for i, child in enumerate(node.flatten_fn(out)[0])]


def _key_name(key) -> str:
    """A pytree key as an output name part: the field, the dict key or the index."""
    for attribute in ("name", "key", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key).strip(".[]'\"")


def _leaf_names(out, prefix: str = "") -> Optional[list[str]]:
    """Names for a structured output's tensors in the order the exporter flattens them: a dict's
    keys, joined with "." down nested dicts, lists and tuples ("logits", "aux.0"; a tuple's own
    "output_0", "output_1.z"), Nones left out as the exporter leaves them; None when another
    leaf is not a tensor."""
    if isinstance(out, Tensor):
        return [prefix or "output"]
    if isinstance(out, dict):
        items = [(str(k), v) for k, v in out.items()]
    elif isinstance(out, (tuple, list)):
        items = [(str(i) if prefix else f"output_{i}", v) for i, v in enumerate(out)]
    elif (children := _registered_children(out)) is not None:
        from torch.utils._pytree import SequenceKey

        items = [(f"output_{key.idx}" if not prefix and isinstance(key, SequenceKey) else _key_name(key), v)
                 for key, v in children]
    else:
        return None
    names: list[str] = []
    for key, value in items:
        if value is None:
            continue  # (the exporter drops a None output)
        below = _leaf_names(value, f"{prefix}.{key}" if prefix else key)
        if below is None:
            return None
        names += below
    return names


def _graph_names(graph: onnx.GraphProto) -> set:
    """Every value and node name in `graph` and, at any depth, its subgraphs (If / Loop bodies)."""
    names = {v.name for v in [*graph.input, *graph.output, *graph.value_info]} | {t.name for t in graph.initializer}
    for node in graph.node:
        names |= set(node.input) | set(node.output) | {node.name}
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names |= _graph_names(g)
    return names


def _name_outputs(proto: onnx.ModelProto, names: list[str], input_names: Sequence[str] = ()) -> None:
    """Graph output i also as names[i] (an Identity, which runtimes drop): the exporter's own names
    are internal values' (_symbolic_3, addcmul_11). An internal value or initializer that has the
    name already is renamed first; a name that is a graph input's, or one of `input_names` (the
    names the inputs get back, `_restore_input_names`), is written `<name>_output`, with a warning."""
    graph = proto.graph
    if len(names) != len(graph.output) or len(set(names)) != len(names):
        log.info("export_onnx: the outputs keep the exporter's names (%d names for %d outputs)",
                 len(names), len(graph.output))
        return
    names = _apart_from_inputs(names, {v.name for v in graph.input} | set(input_names))
    used = _graph_names(graph)
    for out, name in zip(graph.output, names):
        if out.name == name:
            continue
        if name in used:
            fresh = next(f"{name}_{i}" for i in range(1, len(used) + 2) if f"{name}_{i}" not in used)
            _rename_value(graph, name, fresh)
            used.add(fresh)
        graph.node.append(onnx.helper.make_node("Identity", [out.name], [name], name=f"{name}_output"))
        out.name = name
        used.add(name)


def _restore_input_names(proto: onnx.ModelProto, names: list[str]) -> None:
    """The graph's inputs under `names` (forward's parameters), where the exporter renamed one
    (`x` -> `x_orig` when the model also returns x, with `Identity(x_orig) -> x`) and the name
    is free, or held only by that Identity (which then goes)."""
    graph = proto.graph
    if len(graph.input) != len(names):
        return
    outputs = {v.name for v in graph.output}
    for value, name in zip(graph.input, names):
        if value.name == name:
            continue
        producers = [n for n in graph.node if name in n.output]
        if (len(producers) == 1 and producers[0].op_type == "Identity" and list(producers[0].input) == [value.name]
                and name not in outputs):
            graph.node.remove(producers[0])
            _rename_value(graph, name, value.name)
        if name not in _graph_names(graph):
            _rename_value(graph, value.name, name)


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every use of the value (or node) name `old` in `graph` and its subgraphs as `new` (ONNX
    names are unique across scopes, so a subgraph's `old` is the outer value)."""
    for node in graph.node:
        for field in (node.input, node.output):
            for i, name in enumerate(field):
                if name == old:
                    field[i] = new
        if node.name == old:
            node.name = new
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                _rename_value(g, old, new)
    for item in [*graph.initializer, *graph.value_info, *graph.input, *graph.output]:
        if item.name == old:
            item.name = new


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's known noise (torchvision probing, pytree deprecations)."""
    reg = logging.getLogger("torch.onnx._internal.exporter._registration")
    # torch.export's "Unable to find user code corresponding to {u0}" while it captures a data-dependent
    # branch: the failure is reported in one line of its own.
    shapes = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    # onnxscript's constant folding logs a fold it skips ("Evaluation failed: cannot reshape ...") as a
    # warning: the file is right either way (the op stays unfolded).
    folding = logging.getLogger("onnxscript.optimizer._constant_folding")
    # The exporter's notes on outputs it drops (a None in a dict) and torch's guard failures, which it
    # logs at length before raising: the failure is reported in one line of its own.
    core, guards = logging.getLogger("torch.onnx._internal.exporter._core"), logging.getLogger("torch._guards")
    quiet = {reg: logging.ERROR, shapes: logging.ERROR, folding: logging.ERROR, core: logging.ERROR,
             guards: logging.CRITICAL}
    before = {logger: logger.level for logger in quiet}
    for logger, level in quiet.items():
        logger.setLevel(level)
    try:
        with warnings.catch_warnings():
            ignore_spec_copy_warnings()
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            # Inputs that share the one batch dim: the file names that axis once, as it should.
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
            # A model whose inputs are not flat tensors keeps the exporter's axis names (still dynamic).
            warnings.filterwarnings("ignore", message=r"# ONNX model has different number of inputs than the flatten")
            yield
    finally:
        for logger, level in before.items():
            logger.setLevel(level)


def _direct_or_torch_export(module: nn.Module, inputs: tuple, opset: int, dynamic_batch: bool,
                            dynamic_axes: dict) -> onnx.ModelProto:
    """Direct emission when the graph is made of common layers and only the batch axis is
    dynamic (`exporters.direct`: no dynamo import, registry or re-capture), else the dynamo exporter."""
    from .direct import Unsupported, emit

    # (checked first: the same refusals on both paths)
    traced = _dynamic_shapes(module, inputs, dynamic_batch, dynamic_axes)
    if not dynamic_axes:
        try:
            return emit(module, inputs, opset, dynamic_batch, output_names=lambda count: _apart_from_inputs(
                plain_output_names(count), _tensor_input_names(module, inputs)))
        except Unsupported as why:
            log.debug("export_onnx: the dynamo exporter runs (direct path: %s)", why)
    proto = _torch_export(module, inputs, traced, opset, dynamic_batch, sorted({a for d in dynamic_axes.values()
                                                                              for a in d.values()}))
    _keep_dynamic_axes(proto, module, traced, dynamic_batch)
    return proto


def _keep_dynamic_axes(proto: onnx.ModelProto, module: nn.Module, traced: tuple, dynamic_batch: bool = True) -> None:
    """ExportError when a requested axis other than the batch came out as a constant (dim 0 is
    the batch unless dynamic_batch is False: then it is an axis like any other); the
    exporter's own name for an axis (s31: it drops the names when an input is not a tensor)
    becomes the requested one, wherever it appears in the graph's inputs, outputs and values."""
    inputs, shapes = traced
    if shapes is None:
        return
    if isinstance(shapes, dict):  # a `*args` forward: `_by_parameter`'s one entry
        shapes = next(iter(shapes.values()))
    by_name = {v.name: v for v in proto.graph.input}
    renames: dict[str, str] = {}
    requested: dict[str, str] = {}  # exporter's symbol -> where the name it gets was asked for
    names = _input_names(module, len(inputs))
    for name, dims in zip(names, shapes):
        value = by_name.get(name)
        if not dims or value is None:
            continue
        for dim, axis in dims.items():
            shape = value.type.tensor_type.shape.dim
            if dim >= len(shape):
                continue
            if not shape[dim].dim_param:
                if dim == 0 and dynamic_batch:
                    continue  # (the batch: `_torch_export` says which input fixes it)
                size = shape[dim].dim_value
                tied = _static_twin(names, inputs, shapes, name, size)
                if tied is None and any(isinstance(m, nn.RNNBase) for m in module.modules()):
                    # torch 2.13: after one torch.export of an RNN in a process (perforate's frontend
                    # "auto" runs one), later exports fix its sequence length
                    raise ExportError(f"axis {axis.__name__!r} (dim {dim} of input {name!r}) came out fixed to "
                                      f"{shape[dim].dim_value}: torch.export fixes a recurrent layer's sequence "
                                      "length (an nn.RNN's always, a GRU/LSTM's once one has been exported in this "
                                      "process): export without that axis, or, for a batch-first GRU/LSTM, perforate "
                                      "with frontend='fx' and export once, in a fresh process (pbp-fx export "
                                      "--frontend fx)")
                if tied is not None:  # torch.export ties equal sizes that meet in an op; the other stayed static
                    other, other_dim = tied
                    raise ExportError(
                        f"axis {axis.__name__!r} (dim {dim} of input {name!r}) came out fixed to {size}: input "
                        f"{other!r} has size {size} in dim {other_dim} without a dynamic axis; if the model combines "
                        f"the two (an attention mask, an elementwise op), give it the axis too (dynamic_axes "
                        f"{{{other!r}: {{{other_dim}: {axis.__name__!r}}}}}, or --dynamic-axis "
                        f"{other}:{other_dim}={axis.__name__}); else the model fixes that size (a reshape to a "
                        "constant size, or a tensor of that length added along it): export without that axis")
                raise ExportError(f"the model fixes dim {dim} of input {name!r} to {shape[dim].dim_value}, so axis "
                                  f"{axis.__name__!r} cannot be dynamic (a reshape to a constant size, or a tensor of "
                                  "that length added along it): export without that axis")
            symbol = shape[dim].dim_param
            if renames.setdefault(symbol, axis.__name__) != axis.__name__:
                first, where = renames[symbol], requested[symbol]
                raise ExportError(f"axes {first!r} ({where}) and {axis.__name__!r} (dim {dim} of input {name!r}) are "
                                  "one size in this model (it combines them): give them one name")
            requested.setdefault(symbol, f"dim {dim} of input {name!r}")
    renames = {old: new for old, new in renames.items() if old != new}
    taken = {d.dim_param for v in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]
             for d in v.type.tensor_type.shape.dim if d.dim_param}
    if renames and not (set(renames.values()) & (taken - set(renames))):  # (no clash with another symbol)
        for v in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
            for d in v.type.tensor_type.shape.dim:
                if d.dim_param in renames:
                    d.dim_param = renames[d.dim_param]


def _batch_dims(module: nn.Module, shapes: dict, names: list, size: Optional[int]) -> tuple[list, dict]:
    """(the inputs among `names` that look like RNN states [layers, batch, hidden], {input: its
    batch dim}) for batch `size` (None: the states' dim 1). A state has the shape of a
    GRU/LSTM/RNN state of the model's own where it has one, else is 3-D with dim 1 of that size
    (the first input then left out: the sequence); a sequence's batch dim is 1 where every RNN
    and MultiheadAttention of the model has batch_first=False."""
    rnns = [m for m in module.modules() if isinstance(m, nn.RNNBase)]
    sizes = {(m.num_layers * (2 if m.bidirectional else 1), h) for m in rnns
             for h in {m.hidden_size, getattr(m, "proj_size", 0) or m.hidden_size}}
    # (torch's sequence-first layers: their inputs [T, B, ...] have the batch on dim 1)
    sequenced = [m for m in module.modules() if isinstance(m, (nn.RNNBase, nn.MultiheadAttention))]
    sequence_dim = 1 if sequenced and not any(m.batch_first for m in sequenced) else 0

    def state(n: str, batch: Optional[int]) -> bool:
        shape = shapes.get(n, ())
        return len(shape) == 3 and (batch is None or shape[1] == batch) and (not sizes or (shape[0], shape[2]) in sizes)

    if size is None:
        found = [shapes[n][1] for n in names if sizes and state(n, None)]
        first = shapes.get(names[0]) or (None,)
        size = found[0] if found else first[sequence_dim if len(first) > sequence_dim else 0]
    states = [n for n in names if state(n, size)]
    if not sizes and len(states) > 1 and states[0] == names[0]:
        states = states[1:]
    states = states or names[1:2]
    dims = {}
    for n in names:
        shape = shapes.get(n, ())
        dims[n] = 1 if n in states and len(shape) > 1 else next(
            (d for d in (sequence_dim, 0, 1) if d < len(shape) and shape[d] == size), 0)
    return states, dims


def _batch_axes_advice(module: nn.Module, shapes: dict, names: list, size: Optional[int], lead: str) -> str:
    """'(an RNN state ...)<lead> pass dynamic_batch=False with dynamic_axes naming each input's
    batch dim, e.g. ...' for inputs whose batch is not dim 0 of each (RNN states, sequence-first
    inputs)."""
    states, dims = _batch_dims(module, shapes, names, size)
    example = ", ".join(f"{n!r}: {{{d}: 'b'}}" for n, d in dims.items())
    flags = " ".join(f"--dynamic-axis {n}:{d}=b" for n, d in dims.items())
    what = (f"an RNN state [layers, batch, hidden], such as {' and '.join(map(repr, states))} may be"
            if any(isinstance(m, nn.RNNBase) for m in module.modules()) else
            "a sequence-first input [T, batch, ...], as nn.MultiheadAttention takes by default")
    return (f"({what}){lead} "
            f"pass dynamic_batch=False with dynamic_axes naming each input's batch dim, e.g. {{{example}}} "
            f"(--static-batch {flags})")


def _static_twin(names: list, inputs: tuple, shapes, name: str, size: int):
    """(input, dim) of another tensor input with `size` in a dim past the batch that no dynamic axis
    names, or None: the likely reason a requested axis of that size came out fixed."""
    for other, t, dims in zip(names, inputs, shapes):
        if other == name or not isinstance(t, torch.Tensor):
            continue
        for d in range(1, t.dim()):
            if t.shape[d] == size and d not in (dims or {}):
                return other, d
    return None


def _refusal_at_doubled_axes(module: nn.Module, inputs: tuple, shapes, axes: list) -> Optional[str]:
    """The model's own error (one line) when it runs with the named dynamic axes at twice their example
    sizes, else None: a model that fixes a size makes the exporter fail with a solver's message."""
    if not isinstance(shapes, (tuple, list)):
        return None
    probe = []
    for t, dims in zip(inputs, shapes):
        for dim, axis in (dims or {}).items() if isinstance(t, Tensor) else ():
            if getattr(axis, "__name__", None) in axes:
                t = _doubled(t, dim)
        probe.append(t)
    try:
        with torch.no_grad(), buffers_kept(module), contextlib.redirect_stderr(io.StringIO()):
            module(*probe)
    except Exception as e:  # noqa: BLE001 - the model's own limit
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0][:160] if text else ''}"
    return None


def _axis_ranges_of(proto: onnx.ModelProto) -> dict:
    """The file's AXIS_RANGES_KEY: {axis: [least, most or None]}."""
    return json.loads(next((p.value for p in proto.metadata_props if p.key == AXIS_RANGES_KEY), "{}"))


def _put_axis_ranges(proto: onnx.ModelProto, ranges: dict) -> None:
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != AXIS_RANGES_KEY]
    del proto.metadata_props[:]
    for key, value in kept + [(AXIS_RANGES_KEY, json.dumps({k: list(v) for k, v in sorted(ranges.items())}))]:
        proto.metadata_props.add(key=key, value=value)


def _record_axis_ranges(proto: onnx.ModelProto, ep, axes: Optional[list]) -> None:
    """Metadata AXIS_RANGES_KEY for the named dynamic axes that torch.export bounded: a forward
    that branches on such a size (`if x.shape[1] > 5`) keeps the example's branch, and the file, which has
    no guard, would compute it at every size (ort.run refuses the others); a model's own limit (a position
    table) bounds it too. A least of 2 or less is left out (torch.export's default is 0; it takes a dynamic
    size to be at least 2 where it decides a branch, with no bound: `_branch_at_one` probes that)."""
    from pbp_fx.tracing import size_range

    if not axes or ep is None:
        return
    values = {v.name: v for v in proto.graph.input}
    ranges = {}
    for node in ep.graph.nodes:
        value = values.get(node.name) if node.op == "placeholder" else None
        shape = getattr(node.meta.get("val"), "shape", ())
        dims = value.type.tensor_type.shape.dim if value is not None else ()
        for size, dim in zip(shape, dims):
            bounds = size_range(ep, size)
            if dim.dim_param in axes and bounds is not None and ((bounds[0] or 0) > 2 or bounds[1] is not None):
                least, most = ranges.get(dim.dim_param, (0, None))
                ranges[dim.dim_param] = (max(least, bounds[0] or 0),
                                         bounds[1] if most is None else min(most, bounds[1] or most))
    if ranges:
        _put_axis_ranges(proto, ranges)


def _original_at(model: nn.Module, example_inputs: Any, example_kwargs: Optional[dict], axes: dict, axis: str,
                 size: int, training: Optional[bool] = None) -> tuple[Optional[bool], list]:
    """(whether a PerforatedModel's original runs on the example with the named `axis` made `size` long, its
    tensor outputs there): its inputs bound by name to the original's forward, run in `training` mode (default:
    the model's) with the random state kept; (None, []) where that cannot be tried (another module, an input
    the axis names by its flattened position)."""
    from pbp_fx.perforated import PerforatedModel
    from pbp_fx.tracing import whole_model_in_mode

    source = model.source_model if isinstance(model, PerforatedModel) else None
    if source is None:
        return None, []
    kwargs = dict(example_inputs) if isinstance(example_inputs, dict) else {}
    args = () if isinstance(example_inputs, dict) or example_inputs is None else _as_tuple(example_inputs)
    kwargs.update(example_kwargs or {})
    try:
        bound = inspect.signature(source.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None, []
    resized = False
    for key, dims in axes.items():
        name = key if isinstance(key, str) else next(iter(list(bound.arguments)[key:key + 1]), None)
        value = bound.arguments.get(name) if name is not None else None
        for dim, named in dims.items():
            if named == axis and isinstance(value, Tensor) and 0 < dim < value.dim():
                value, resized = _resized(value, dim, size), True
        if resized and name in bound.arguments:
            bound.arguments[name] = value
    if not resized:
        return None, []
    try:
        with torch.no_grad(), buffers_kept(source), torch.random.fork_rng(devices=[]), \
                whole_model_in_mode(source, model.training if training is None else training), \
                contextlib.redirect_stderr(io.StringIO()):
            out = source(*bound.args, **bound.kwargs)
    except Exception:  # noqa: BLE001 - the model's own limit there
        return False, []
    return True, [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, Tensor)]


def _outside_tolerance(got: Tensor, want: Tensor) -> bool:
    """Whether the graph's output differs from the original's by more than the exporter's parity bound."""
    difference, bound = output_difference(got, want)
    return difference > bound


def _branch_at_one(proto: onnx.ModelProto, module: nn.Module, inputs: tuple, model: nn.Module, example_inputs: Any,
                   example_kwargs: Optional[dict], axes: dict) -> set:
    """Record a least of 2 in AXIS_RANGES_KEY for each named axis past dim 0 where the graph, its dendrites
    silenced (V = 0: the original's function), computes other outputs than the original at a size of 1:
    torch.export takes a dynamic size to be at least 2, so a forward that branches between 1 and 2
    (`if x.shape[1] > 1`) keeps the example's branch with no bound to record. Returns those axes (the
    original runs at 1: a branch)."""
    recorded = _axis_ranges_of(proto)
    positions = [i for i, t in enumerate(inputs) if isinstance(t, Tensor)]  # (the file's inputs, in order)
    branches = set()
    # (the original shares the sites inside leaves the capture did not trace: silenced there too)
    source = getattr(model, "source_model", None)
    with dendrites_silenced(module), dendrites_silenced(source) if source is not None else contextlib.nullcontext():
        for axis in sorted({name for dims in axes.values() for dim, name in dims.items() if dim != 0}):
            if recorded.get(axis, [0])[0] <= 1 and _probe_at_one(proto, axis, module, inputs, positions, model,
                                                                 example_inputs, example_kwargs, axes):
                recorded[axis] = [2, recorded.get(axis, [0, None])[1]]
                branches.add(axis)
    if branches:
        _put_axis_ranges(proto, recorded)
    return branches


def _probe_at_one(proto: onnx.ModelProto, axis: str, module: nn.Module, inputs: tuple, positions: list,
                  model: nn.Module, example_inputs, example_kwargs: Optional[dict], axes: dict) -> bool:
    """`_branch_at_one` for one named axis: whether the graph computes other outputs than the original with
    that axis 1 long (False where either cannot be run there)."""
    runs, want = _original_at(model, example_inputs, example_kwargs, axes, axis, 1, training=module.training)
    if not runs:
        return False
    probe, resized = list(inputs), False
    for value, i in zip(proto.graph.input, positions):
        for dim, d in enumerate(value.type.tensor_type.shape.dim):
            if d.dim_param == axis and 0 < dim < probe[i].dim():
                probe[i], resized = _resized(probe[i], dim, 1), True
    if not resized:
        return False
    try:
        with torch.no_grad(), buffers_kept(module), torch.random.fork_rng(devices=[]), \
                contextlib.redirect_stderr(io.StringIO()):
            got = [t for t in torch.utils._pytree.tree_leaves(module(*probe)) if isinstance(t, Tensor)]
    except Exception:  # noqa: BLE001 - (the graph refuses the size itself: nothing wrong is computed)
        return False
    return len(got) != len(want) or any(g.shape != w.shape or _outside_tolerance(g, w) for g, w in zip(got, want))


def _range_notes(proto: onnx.ModelProto, model: nn.Module, example_inputs: Any, example_kwargs: Optional[dict],
                 axes: dict, branches: set, said_elsewhere: set) -> dict:
    """{axis: the warning for its recorded range}: a branch where the original runs outside the range
    (`branches`: known to), both causes where that cannot be tried, nothing for the model's own limit (a
    position table's length: the file refuses what the model does); `said_elsewhere`: axes left out."""
    notes = {}
    for axis, (least, most) in _axis_ranges_of(proto).items():
        if axis in said_elsewhere:
            continue
        outside = [n for n in (least - 1 if least > 1 else None, None if most is None else most + 1) if n is not None]
        runs = [True] if axis in branches else [_original_at(model, example_inputs, example_kwargs, axes, axis, n)[0]
                                                for n in outside]
        cause = ("torch.export captured the forward's branch on that size for those" if True in runs else
                 "torch.export bounded that size: a branch of the forward on it, or a limit of the model's own"
                 if None in runs else None)
        if cause is not None:
            notes[axis] = (f"the ONNX file computes the model's outputs at {axis} of {sizes_text(least, most)} only "
                           f"({cause}): pbp_fx.exporters.run and pbp-fx run refuse other sizes; export with an example "
                           "of the other size for those calls")
    return notes


def _root_reason(exc: BaseException) -> str:
    """The first line of an export error's innermost cause: the capture's own reason, not the
    exporter's "step 1/3" report that wraps it (terminal colour codes removed)."""
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    why = re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).strip().splitlines()
    return why[0] if why else type(cause).__name__


def _torch_export(module: nn.Module, inputs: tuple, batched: tuple, opset: int,
                  dynamic_batch: bool, axes: Optional[list] = None) -> onnx.ModelProto:
    """The dynamo exporter's file; `batched`: `_dynamic_shapes`' (inputs to trace with, dynamic shapes)."""
    torch.compiler.allow_in_graph(_fused_node)  # registers the function itself (idempotent)
    traced_inputs, shapes = batched
    try:
        # (buffers kept: a forward that writes its own (a call counter) would bake the advanced value)
        with torch.no_grad(), buffers_kept(module):
            example_out = module(*traced_inputs)
    except Exception as e:  # noqa: BLE001 - the model's own error on these inputs: one line
        text = str(e).strip().splitlines()
        hint = (" (the batch of 1 ran as 2 for a dynamic batch axis: pass dynamic_batch=False (pbp-fx export "
                "--static-batch) if the model fixes "
                "its batch size)" if traced_inputs is not inputs else "")
        raise ExportError(f"the example inputs do not run through the model ({type(e).__name__}: "
                          f"{text[0] if text else ''}){hint}: pass inputs of the shapes and dtypes it takes") from e
    odd = _not_a_tensor(example_out)
    if odd:
        raise ExportError(f"the model's output holds {odd}, and an ONNX model returns tensors only: return "
                          "tensors from forward (alone, or in a tuple or dict), e.g. torch.tensor(value) for a number"
                          + (f", or register the dataclass once: torch.export.register_dataclass({odd.split()[0]})"
                             if "(a dataclass)" in odd else "")
                          + (" (a Hugging Face model's key/value cache: set use_cache=False in the configs of the model and of "
                             "the submodules that keep their own, a decoder's: for m in model.modules(): if "
                             "hasattr(m, 'config'): m.config.use_cache = False)"
                             if odd.startswith("a ") and "Cache " in odd else ""))
    input_names = _tensor_input_names(module, inputs)
    names = _output_names(example_out, input_names)
    # torch.export prints the partial graph to stderr when a capture fails: that belongs with the
    # traceback (a note on the error), not before a one-line error.
    printed = io.StringIO()
    try:
        with _quiet_exporter(), contextlib.redirect_stderr(printed):
            program = torch.onnx.export(module, traced_inputs, dynamo=True, opset_version=opset,
                                        dynamic_shapes=shapes, output_names=names, verbose=False,
                                        optimize=True)
    except ModuleNotFoundError as e:
        raise ExportError(f"torch.onnx.export needs the package {e.name!r}: pip install {e.name}") from e
    except Exception as e:  # the exporter's errors are long reports: keep the first line
        if printed.getvalue().strip():
            report = f"torch.onnx.export printed:\n{printed.getvalue().rstrip()}"
            if hasattr(e, "add_note"):  # Python 3.11+; on 3.10 (supported) the debug log keeps it
                e.add_note(report)
            log.debug("%s", report)
        if re.search(r"This is step [23]/3", re.sub(r"\x1b\[[0-9;]*m", "", str(e))):  # (the capture went through)
            raise ExportError(
                f"torch.onnx.export captured the model but cannot convert an op of it to ONNX ({_root_reason(e)}): "
                "when the op is the model's own, torch.onnx.export(model, inputs, dynamo=True) of the unperforated "
                "model fails alike; try another opset (opset=, pbp-fx export --opset), or write that op so that "
                "the converter takes it"
                # (a conv whose groups is the batch, timm's CondConv2d: a symbolic attribute the converter refuses)
                + (", or, where the model computes with the batch size itself, export with dynamic_batch=False "
                   "(pbp-fx export --static-batch)" if shapes else "")) from e
        from pbp_fx.tracing import TracedPart

        parts = [m.name for m in module.modules() if isinstance(m, TracedPart) and m is not module]
        if parts:
            raise ExportError(
                f"torch.onnx.export cannot capture {type(module).__name__}.forward, the Python around its "
                f"perforated parts ({_root_reason(e)}): make that forward traceable, "
                "or export a part on its own, e.g. "
                f"export_onnx(pm.finalize().get_submodule('root.model.{parts[0]}'), <its inputs>, path)") from e
        leaves = [m for gm in module.modules() if isinstance(gm, torch.fx.GraphModule)
                  for m in gm.meta.get("pbp_untraceable", [])]
        if leaves:
            raise ExportError(f"torch.onnx.export cannot capture submodule {leaves[0]!r}, which has data-dependent "
                              f"control flow ({_root_reason(e)}): ONNX export traces the "
                              "whole model, so make that code traceable (torch.cond, or no branch on tensor "
                              "values); excluding it from perforation does not help") from e
        if axes:
            refused = _refusal_at_doubled_axes(module, traced_inputs, shapes, axes)
            if refused:
                raise ExportError(f"the model itself does not run with the dynamic axes {', '.join(map(repr, axes))} "
                                  f"at twice the example's sizes ({refused}): it fixes those sizes (a Linear after a "
                                  "flatten, a reshape to a constant size): export without them") from e
            raise ExportError(f"torch.onnx.export cannot keep the dynamic axes {', '.join(map(repr, axes))} "
                              f"({_root_reason(e)}): the model constrains their sizes (a "
                              "multiple of its strides, or equal to another size): export without them") from e
        why = _root_reason(e)  # the capture's own reason (an unregistered output type, ...), not "step 1/3"
        shapes_at_fault = re.search(r"dim|shape|size|constraint|speciali[sz]|guard", why, re.IGNORECASE)
        hint = (" (or pass dynamic_batch=False (pbp-fx export --static-batch) if the model fixes its batch size)"
                if dynamic_batch and shapes_at_fault else "")
        raise ExportError(f"torch.onnx.export failed: {why}{hint}") from e
    sys.stderr.write(printed.getvalue())  # a successful export's own messages, as they were
    proto = program.model_proto
    _record_axis_ranges(proto, program.exported_program, axes)
    if names is None:  # a structured output: its keys name the tensors
        keys = _leaf_names(example_out)
        if keys is not None:
            _name_outputs(proto, _distinct_names(keys), input_names)
    _restore_input_names(proto, input_names)
    if dynamic_batch:
        fixed = [(v.name, v.type.tensor_type.shape.dim[0].dim_value) for v in proto.graph.input
                 if v.type.tensor_type.shape.dim and not v.type.tensor_type.shape.dim[0].dim_param]
        if fixed:
            name, size = fixed[0]
            batched = [v.name for v in proto.graph.input if v.type.tensor_type.shape.dim]
            others = ""
            if len(batched) > 1:
                # dim 0 of every input is one batch axis: one input whose dim 0 is no batch fixes them all.
                shapes = dict(zip(input_names, (tuple(t.shape) for t in inputs if isinstance(t, Tensor))))
                others = ("; dim 0 of every input is the one batch axis, so an input whose dim 0 is not its batch "
                          + _batch_axes_advice(module, shapes, batched, size, " fixes the others' too:"))
            raise ExportError(f"the ONNX capture fixed dim 0 of input {name!r} to {size}, so it cannot be the "
                              "dynamic batch axis: the model fixes it (a reshape to a constant batch, or an input "
                              "without a batch dim, such as one unbatched [C, L] sample for a Conv1d: use -1 for the "
                              "batch in reshapes), or torch.onnx's capture specialised it where the model runs at any "
                              "batch (torchvision's RAFT); pass dynamic_batch=False (pbp-fx export --static-batch)"
                              + others)
    return proto


# -- post-processing -------------------------------------------------------------------------

def _default_opset(proto: onnx.ModelProto) -> int:
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    raise ExportError("the exported model imports no default-domain opset")


def _attach_functions(proto: onnx.ModelProto, specs: dict[str, FusedOpSpec]) -> int:
    """Give each pbp node its overload, ship one function per used overload; returns the node count."""
    opset = _default_opset(proto)
    used: dict[str, FusedOpSpec] = {}
    names = {n.name for n in proto.graph.node if n.domain != DOMAIN}
    count = 0
    for node in proto.graph.node:
        if node.domain != DOMAIN:
            continue
        props = {p.key: p.value for p in node.metadata_props}
        overload = props.get(OVERLOAD_KEY)
        if overload not in specs:
            raise ExportError(f"fused node {node.name!r} has no known signature: this is a pbp-fx bug")
        node.overload = overload
        site = props.get(SITE_KEY, "")
        name = f"pbp/{site}" if site else node.name
        while name in names:  # a site module called more than once
            name += "_"
        names.add(name)
        node.name = name
        del node.metadata_props[:]
        node.metadata_props.add(key=SITE_KEY, value=site)
        used[overload] = specs[overload]
        count += 1
    for overload in sorted(used):
        proto.functions.append(make_function(used[overload], opset))
    if not count:
        for i in reversed(range(len(proto.opset_import))):
            if proto.opset_import[i].domain == DOMAIN:
                del proto.opset_import[i]
    elif not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.add(domain=DOMAIN, version=DOMAIN_VERSION)
    return count


def _ir_version(proto: onnx.ModelProto) -> int:
    """The lowest IR version valid for the file's opsets, and >= 10 (function overloads):
    the widest range of runtimes reads it (onnxruntime 1.31 reads up to IR 11)."""
    try:
        needed = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    except (TypeError, ValueError):
        needed = proto.ir_version
    return max(MIN_IR_VERSION, needed)


def _strip_trace_metadata(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debug metadata (stack traces, local paths)."""
    for node in proto.graph.node:
        if node.domain == DOMAIN:
            continue
        keep = [(p.key, p.value) for p in node.metadata_props if not p.key.startswith(("pkg.torch.", "namespace"))]
        del node.metadata_props[:]
        for k, v in keep:
            node.metadata_props.add(key=k, value=v)


def _set_metadata(proto: onnx.ModelProto, dendrites: dict[str, int], activation: str, fused: bool,
                  min_batch: int = 1, max_batch: Optional[int] = None) -> None:
    import pbp_fx

    values = {
        "pbp_fx.version": pbp_fx.__version__,
        "pbp_fx.sites": json.dumps(list(dendrites)),
        "pbp_fx.dendrites": json.dumps(dendrites),
        "pbp_fx.activation": activation,
        "pbp_fx.fused": "true" if fused else "false",
        "pbp_fx.domain": DOMAIN,
    }
    if min_batch > 1:  # (the smallest batch the file computes the model's outputs at: ort.run refuses smaller)
        values[MIN_BATCH_KEY] = str(min_batch)
    if max_batch is not None:  # (and the largest: ort.run refuses larger)
        values[MAX_BATCH_KEY] = str(max_batch)
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    for k, v in kept + list(values.items()):
        proto.metadata_props.add(key=k, value=v)


# -- writing ---------------------------------------------------------------------------------

def _target(path: Union[str, os.PathLike]) -> str:
    """The absolute output path, after checking it can be written."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise ExportPathError(f"cannot write ONNX file {path}: it is a directory; give a file path such as "
                              f"{os.path.join(path, 'model.onnx')}")
    if not os.path.isdir(folder):
        raise ExportPathError(f"cannot write ONNX file {path}: directory {folder} does not exist; "
                              f"create it first (mkdir -p {folder})")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportPathError(f"cannot write ONNX file {path}: directory {folder} is not writable; "
                              "choose a writable directory or fix its permissions")
    return path


def _write_atomic(data: bytes, path: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write, ExportPathError, "ONNX file")


# -- public entry point ----------------------------------------------------------------------

# The warning's start when ONNX Runtime cannot load the file to check it against the model (`export --check`,
# which then reports the same cause as its error, leaves it out).
NOT_LOADED_FOR_CHECKS = "the file was not checked against the model"


class SizeCheck(NamedTuple):
    """What `check_other_sizes` found: the sizes tried ("" when none), what differs there in a line
    (None: nothing), and why the sizes were tried but not compared (None: they were)."""

    sizes: str
    problem: Optional[str]
    unchecked: Optional[str] = None
    how: str = "twice the example's"


def check_other_sizes(model: Any, module: nn.Module, inputs: Sequence,
                      axes: Optional[set] = None, small: bool = False, least: int = 1,
                      most: Optional[int] = None) -> SizeCheck:
    """Run the ONNX file `model` (a path, its bytes, or an ONNX Runtime session of it) with every
    dynamic dim of its inputs doubled (`_doubled`; small: made 2 long, or 3 where the example's is 2,
    `_resized`, which costs a forward of 2 or 3 samples where doubling costs two of the example's) and
    compare with `module(*inputs)` at those sizes
    (`ort.output_difference`). axes: only the dims with these names (None: every dynamic dim, the
    batch too). Returns a SizeCheck: the sizes checked ("" when nothing was: no such dim, no
    onnxruntime or no kernel of it for the file), what differs there in a line (or None), why
    those sizes were not compared (the model itself refuses them, a bounded axis, or gives NaN/Inf
    there; a model whose outputs are random has only their shapes compared), and how the sizes were
    made. least, most: the dim-0 sizes the file computes right (its min_batch, max_batch): dim 0 is
    made another size within them (left as it is when there is none). torch.onnx writes some ops for the example's sizes only while it declares the axis
    dynamic (an adaptive pooling's kernel, a sequence-first GRU's length)."""
    from .ort import output_difference, run

    session = checking_session(model)
    if session is None:
        return SizeCheck("", None)
    tensors = [t for t in inputs if isinstance(t, Tensor)]
    doubled, grown = [], []
    for value, t in zip(session.get_inputs(), tensors):  # (a dynamic dim's size is its name there)
        t = t.detach().cpu()
        for dim, d in enumerate(value.shape):
            if isinstance(d, str) and (axes is None or d in axes) and dim < t.dim() and t.shape[dim]:
                size = (3 if t.shape[dim] == 2 else 2) if small else 2 * t.shape[dim]
                if dim == 0 and (size < least or (most is not None and size > most)):
                    size = next((n for n in (2 * t.shape[0], t.shape[0] + 1, t.shape[0] - 1)
                                 if n >= least and (most is None or n <= most)), None)
                    if size is None:  # (the file takes the example's batch alone)
                        continue
                t = _resized(t, dim, size)
                grown.append(f"{d}={t.shape[dim]}")
        doubled.append(t)
    how = "another size than the example's" if small else "twice the example's"
    if not grown:
        return SizeCheck("", None, how=how)
    sizes = ", ".join(dict.fromkeys(grown))
    by_tensor = iter(doubled)
    device = next((t.device for t in tensors), None)
    probe = [next(by_tensor).to(device) if isinstance(t, Tensor) else t for t in inputs]
    def outputs() -> list:
        # (an fx GraphModule prints its generated code's frame to stderr before it raises)
        # (copies: a forward that changes its input in place, x.sub_(mean), would change the next call's
        # input and the arrays ONNX Runtime reads, which share its memory)
        given = [t.clone() if isinstance(t, Tensor) else t for t in probe]
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            return [t for t in torch.utils._pytree.tree_leaves(module(*given)) if isinstance(t, Tensor)]

    try:
        want = outputs()
    except Exception as e:  # noqa: BLE001 - the model's own limit (a table of positions): nothing to compare
        text = " ".join(str(e).split())[:160]
        return SizeCheck(sizes, None, f"the model itself raises there ({type(e).__name__}: {text}), so the file "
                                      "is checked at the example's sizes only; it declares the axis dynamic, and "
                                      "takes only the sizes the model takes", how)
    if not all(bool(torch.isfinite(w).all()) for w in want if w.is_floating_point()):
        # (NaN and inf travel otherwise through each runtime's kernels: nothing to compare)
        return SizeCheck(sizes, None, "the model's outputs there are not finite, so the file is checked at the "
                                      "example's sizes only", how)
    where = f"at {sizes} ({how})"
    arrays = tuple(t.numpy() for t in doubled)
    try:
        got = run(session, arrays)
    except Exception as e:  # noqa: BLE001 - ONNX Runtime's refusal of the sizes the file declares dynamic
        return SizeCheck(sizes, f"the ONNX file fails {where}, sizes it declares dynamic, which the model takes "
                                f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})",
                         how=how)
    if len(got) != len(want):
        return SizeCheck(sizes, f"the ONNX file gives {len(got)} output(s) {where}, where the model gives {len(want)}",
                         how=how)
    for i, (g, w) in enumerate(zip(got, want)):
        if tuple(g.shape) != tuple(w.shape):
            return SizeCheck(sizes, f"the ONNX file's output {i} has shape {tuple(g.shape)} {where}, where the model's has "
                                    f"{tuple(w.shape)}: torch.onnx fixed a size the file declares dynamic", how=how)
    for i, (g, w) in enumerate(zip(got, want)):
        diff, bound = output_difference(torch.as_tensor(g), w.detach().cpu())
        if not diff <= bound and not all(torch.equal(a, b) for a, b in zip(want, outputs())):
            # (a model that samples in eval, MC dropout or a VAE's draw, differs from itself at each run)
            return SizeCheck(sizes, None, "the model's outputs are random (two runs differ), so only their shapes "
                                          "are compared there", how)
        if not diff <= bound and not (w.is_floating_point() or w.is_complex()):
            apart = int((torch.as_tensor(g).to(w.dtype) != w.detach().cpu()).sum())
            if _integers_differ_at_example(session, module, inputs, i):  # (no fault of the sizes)
                warn_at_user(f"the ONNX file's output {i} (integers) differs from the model's in {apart} of "
                             f"{w.numel()} entries {where}, and already at the example's sizes: ties (a topk, "
                             "argmax or sort over equal values) break differently in ONNX Runtime and torch; not "
                             "checked at other sizes")
                continue
            return SizeCheck(sizes, f"the ONNX file's output {i} (integers) differs from the model's in {apart} of "
                                    f"{w.numel()} entries {where}, where it equals the model's at the example's sizes: it "
                                    "does not compute the model's function at sizes it declares dynamic", how=how)
        if not diff <= bound:
            return SizeCheck(sizes, f"the ONNX file's output {i} differs from the model's by {diff:.2e} {where} (bound "
                                    f"{bound:.2e}): it does not compute the model's function at sizes it declares dynamic "
                                    "(torch.onnx wrote some op for the example's size, e.g. an adaptive pooling's kernel)",
                             how=how)
    return SizeCheck(sizes, None, how=how)


def checking_session(model: Any):
    """An ONNX Runtime CPU session (1 thread) of `model` (a path, its bytes, or a session: itself) to check
    the file with; None (said) where ONNX Runtime cannot load it."""
    from .ort import RuntimeUnavailableError, ort_session

    if hasattr(model, "get_inputs"):
        return model
    try:  # (an onnxruntime without a kernel the file needs, bfloat16 on the CPU, cannot check it)
        return ort_session(model, device="cpu", threads=1)
    except RuntimeUnavailableError as e:  # (said: the file may be meant for another runtime, or be a mistake)
        warn_at_user(f"{NOT_LOADED_FOR_CHECKS}: {e}")
    except Exception as e:  # noqa: BLE001
        log.info("export_onnx: not checked: ONNX Runtime cannot load the file (%s)", type(e).__name__)
    return None


def check_at_example(session, module: nn.Module, inputs: Sequence) -> Optional[str]:
    """What of the file's floating outputs differs from the model's at the example's own sizes beyond
    `ort.output_difference`'s bound, in a line (None: nothing; outputs that are not finite, or that differ
    between two runs of the model, are not compared)."""
    from .ort import output_difference, run

    def outputs() -> list:
        given = [t.clone() if isinstance(t, Tensor) else t for t in inputs]
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            return [t for t in torch.utils._pytree.tree_leaves(module(*given)) if isinstance(t, Tensor)]

    want = outputs()
    try:
        got = run(session, tuple(t.detach().cpu().numpy() for t in inputs if isinstance(t, Tensor)))
    except Exception as e:  # noqa: BLE001 - ONNX Runtime loaded the file but cannot run it on the example
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return f"the ONNX file fails at the example's own sizes ({type(e).__name__}: {text})"
    for i, (g, w) in enumerate(zip(got, want)):
        if not w.is_floating_point() or not bool(torch.isfinite(w).all()) or tuple(g.shape) != tuple(w.shape):
            continue  # (integers: ties break differently; non-finite values and shapes: the other checks)
        diff, bound = output_difference(torch.as_tensor(g), w.detach().cpu())
        if not diff <= bound and all(torch.equal(a, b) for a, b in zip(want, outputs())):
            return (f"the ONNX file's output {i} differs from the model's by {diff:.2e} at the example's own sizes "
                    f"(bound {bound:.2e})")
    return None


def _integers_differ_at_example(session, module: nn.Module, inputs: tuple, i: int) -> bool:
    """Whether integer output i of the file differs from the model's at the example's own sizes."""
    from .ort import run

    tensors = tuple(t.detach().cpu().numpy() for t in inputs if isinstance(t, Tensor))
    with torch.no_grad():  # (on copies: `tensors` shares the inputs' memory)
        given = [t.clone() if isinstance(t, Tensor) else t for t in inputs]
        want = [t for t in torch.utils._pytree.tree_leaves(module(*given)) if isinstance(t, Tensor)][i]
    got = torch.as_tensor(run(session, tensors)[i])
    return tuple(got.shape) != tuple(want.shape) or not torch.equal(got.to(want.dtype), want.detach().cpu())


def _resized(t: Tensor, dim: int, size: int) -> Tensor:
    """t cut to `size` along `dim`, or made that long with copies of it scaled as `_doubled` scales them."""
    while t.shape[dim] < size:
        t = _doubled(t, dim)
    return t.narrow(dim, 0, size)


def _doubled(t: Tensor, dim: int) -> Tensor:
    """t with its size along `dim` doubled: a float tensor followed by a copy scaled by 1 +- up to 3 %
    per entry (no exact repeats, whose ties sort/topk break differently in each runtime; signs and
    zeros kept, so a log or sqrt of the input stays in its domain), any other by itself (token ids
    and masks stay valid)."""
    if not t.is_floating_point():
        return torch.cat([t, t], dim)
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).clamp(-3, 3)
    return torch.cat([t, (t.double() * (1 + 0.01 * noise)).to(t.dtype)], dim)


def export_onnx(model: nn.Module, example_inputs: Any, path: Union[str, os.PathLike], fused: bool = True,
                dynamic_batch: bool = True, opset: Optional[int] = None, fold_clip: bool = True,
                fold_output_weight: bool = True, example_kwargs: Optional[dict] = None,
                dynamic_axes: Optional[dict] = None) -> str:
    """Export `model` to the ONNX file `path` and return the path (as given).

    model: a PerforatedModel (finalized first; the model itself is not modified), a
        finalized GraphModule, or any nn.Module (exported as is, in eval mode, on a copy).
    example_inputs: a tensor or tuple of tensors the model is called with, or a dict of keyword
        inputs (a PerforatedModel of a model called with keywords: `pm(input_ids=...)`).
    example_kwargs: keyword inputs besides positional example_inputs (a PerforatedModel).
    fused: each site with K >= 1 dendrites becomes ONE `pbp::PerforatedLinear` /
        `pbp::PerforatedConv` node (with a function body for plain runtimes); with
        fused=False the file holds standard ops only.
    dynamic_batch: dim 0 of every input (and output) is a symbolic "batch" axis.
    dynamic_axes: more symbolic axes, {input name or position: {dim: axis name}}, e.g.
        {"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}; one name is one
        axis (its dims take one size). Input names are the exported graph's: `forward`'s
        parameters. An axis the model fixes (a constant size in a reshape) is refused.
    opset: the default-domain opset (>= 18) of the graph and of the function bodies; None: 18,
        or the lowest the fused sites need (19 for a circular-padded conv site).
    fold_clip: (fused only) a bounded ReLU after a site, Clip(y, 0, m), is written as
        HardSigmoid(y; 1/m) with m folded into the weights of the convs and sites that read
        it (`pbp_fx.exporters.clip_after_site`): the same function, which ONNX Runtime's CPU
        layout pass can fuse into the site's conv. Their weights in the file are then m times
        the model's.
    fold_output_weight: (fused only) where a site's output goes through nothing or a Relu /
        LeakyRelu into linear layers only, its first output weight V[0] moves into their weights
        and the site's node adds its first dendrite unscaled
        (`pbp_fx.exporters.output_weight_into_readers`): the same function without a per-channel
        scale pass, which ONNX Runtime's CPU kernels run on their own. The site's tensors and
        the readers' weights in the file then differ from the model's.

    Raises ExportPathError (an OSError) for an unwritable path, ExportError when the model
    cannot be exported. The file is complete or absent, never partial.
    """
    flags = {"fused": fused, "dynamic_batch": dynamic_batch, "fold_clip": fold_clip,
             "fold_output_weight": fold_output_weight}
    for name, value in flags.items():  # (a string such as "no" reads as True)
        if not isinstance(value, (bool, np.bool_)):
            raise ExportError(f"{name}={value!r}: give True or False")
    if opset is not None:
        if isinstance(opset, bool) or not isinstance(opset, numbers.Integral):
            raise ExportError(f"opset={opset!r} is not a whole number: pass an int from {MIN_OPSET} to {MAX_OPSET}, "
                              "or None for the lowest the model takes")
        opset = int(opset)
    if opset is not None and int(opset) < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: the exporter and the fused ops need opset >= {MIN_OPSET}")
    if opset is not None and int(opset) > MAX_OPSET:
        raise ExportError(f"opset {opset} is newer than torch.onnx exports reliably: pass an opset from {MIN_OPSET} "
                          f"to {MAX_OPSET}")
    target = _target(path)
    axes = check_dynamic_axes(dynamic_axes)
    # (copies: a forward that changes its input in place, x.sub_(mean), runs several times here, and the
    # caller's tensors stay as given)
    given = graph_inputs(model, example_inputs, example_kwargs)
    # (the caller's tensors only: a forward's tensor default, filled in by graph_inputs, is found by identity)
    callers = {id(t) for t in torch.utils._pytree.tree_leaves((example_inputs, example_kwargs)) if isinstance(t, Tensor)}
    copied = tuple(torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) and id(t) in callers
                                                else t, x) for x in given)
    inputs = GraphInputs(copied, given.keywords) if isinstance(given, GraphInputs) else copied
    _warn_train_mode_only(model)
    module, dendrites, activation = _prepare(model)
    # (a torch.export capture whose forward branches on the batch size holds the example's branch)
    meta = getattr(module, "meta", {})
    min_batch, max_batch = meta.get("pbp_min_batch", 1), meta.get("pbp_max_batch")
    sizes = f"{min_batch} or more" if max_batch is None else f"{min_batch} to {max_batch}"
    # (dim 0 named by dynamic_axes is as dynamic as the batch axis)
    dim_0_dynamic = dynamic_batch or any(0 in dims for dims in axes.values())
    given = batch_size(inputs, {})
    if given and (given < min_batch or (max_batch is not None and given > max_batch)):
        raise ExportError(f"the model computes other outputs at a batch of {given} than its graph, which torch.export "
                          f"captured for batches of {sizes} (its forward branches on the batch size): export it with "
                          f"an example of {sizes} samples, or perforate the model with a batch-{given} example for "
                          "such calls")
    projected = next((name for name, m in module.named_modules() if isinstance(m, nn.LSTM) and m.proj_size), None)
    if projected is not None:  # (torch.onnx writes the plain model so too: measured with torch 2.13)
        raise ExportError(f"LSTM {projected!r} has proj_size={module.get_submodule(projected).proj_size}, which "
                          "torch.onnx writes wrong (over several layers or directions a graph onnx.checker refuses, "
                          "over one a cell state ONNX Runtime refuses): export a model without proj_size")
    specs: dict[str, FusedOpSpec] = {}
    if fused:
        module, specs = _swap_fused_sites(module)
        if opset is None:
            opset = max([MIN_OPSET, *(spec.min_opset for spec in specs.values())])
        for spec in specs.values():
            if spec.min_opset > opset:
                raise ExportError(f"a site with padding_mode={spec.padding_mode!r} needs opset >= "
                                  f"{spec.min_opset}: pass opset={spec.min_opset} "
                                  f"(pbp-fx export --opset {spec.min_opset})")
    opset = MIN_OPSET if opset is None else int(opset)
    inputs = defaults_as_constants(model, module, inputs)
    module, inputs = flat_call(module, inputs)
    proto = _direct_or_torch_export(module, inputs, opset, dynamic_batch, axes)
    n_fused = _attach_functions(proto, specs)
    if fused and n_fused < len(specs):
        raise ExportError(f"only {n_fused} fused node(s) reached the ONNX graph for {len(specs)} "
                          "signature(s): this is a pbp-fx bug")
    if fused and fold_clip:
        _, kept = clip_after_site.rewrite(proto, specs)
        for why in kept:
            log.info("export_onnx: %s", why)
    if fused and fold_output_weight:
        _, kept = output_weight_into_readers.rewrite(proto, specs, _default_opset(proto))
        for why in kept:
            log.info("export_onnx: %s", why)
    _drop_unused_initializers(proto)
    expected = sum(1 for k in dendrites.values() if k > 0) if fused else 0
    if fused and dendrites and n_fused < expected:
        log.warning("export_onnx: %d of the %d sites with dendrites are in the exported graph: the others are not on "
                    "its eval-mode path (a train-only branch, or code the example inputs do not reach)", n_fused,
                    expected)
    _strip_trace_metadata(proto)
    _set_metadata(proto, dendrites, activation, fused, *((min_batch, max_batch) if dim_0_dynamic else (1, None)))
    proto.ir_version = _ir_version(proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0]
        if "tensor(bfloat16)" in first and opset < BFLOAT16_OPSET:
            ops = re.findall(r"op_type:(\w+)", first)  # (the innermost: a fused node's failing body op)
            what = f"the model's {ops[-1]} op" if ops else "an op of the model"
            raise ExportError(f"{what} has no bfloat16 form at opset {opset}: pass opset={BFLOAT16_OPSET} (pbp-fx "
                              f"export --opset {BFLOAT16_OPSET}), where ONNX gives most ops one, or export the model "
                              "in float32") from None  # (the fix is known: ONNX's report would bury it)
        if "tensor(bfloat16)" in first or ("inconsistent type" in first and _has_bfloat16(proto)):
            # (torch.onnx folds an eval BatchNorm into its Conv with float32 weights for a bfloat16 model)
            raise ExportError(f"the exported ONNX model does not pass onnx.checker: {first}; torch.onnx writes some "
                              "bfloat16 ops (a Conv with its BatchNorm folded in) with float32 weights: export the "
                              "model in float32 or float16") from None
        raise ExportError(f"the exported ONNX model does not pass onnx.checker: {first}") from e
    branches = _branch_at_one(proto, module, inputs, model, example_inputs, example_kwargs, axes) if axes else set()
    body = proto.SerializeToString()
    # torch.onnx can write an axis as dynamic and still fix its size inside (a sequence-first GRU's length, its
    # dim 0 taken for the batch): checked, the named axes apart from the batch so that a failure names its fix
    # (the batch at 2 samples, or 3: a small forward's cost, where twice the example's cost two of it)
    checks = [({a for dims in axes.values() for a in dims.values()}, False, "export without those dynamic axes")
              ] if axes else []
    if dynamic_batch:
        checks.append(({"batch"}, True, "export with dynamic_batch=False (pbp-fx export --static-batch)"))
    batch_said = (min_batch > 1 or max_batch is not None) and dim_0_dynamic  # (its own warning below)
    on_dim_0 = {name for dims in axes.values() for dim, name in dims.items() if dim == 0}
    range_notes = _range_notes(proto, model, example_inputs, example_kwargs, axes, branches,
                               on_dim_0 if batch_said else set())
    session = checking_session(body)
    problem = check_at_example(session, module, inputs) if session is not None else None
    if problem is not None:  # (at every size: no dynamic axis is at fault)
        raise ExportError(f"{problem}: the file does not compute the model's function; export with fused=False "
                          "(pbp-fx export --unfused), or find the rewrite at fault with fold_clip=False / "
                          "fold_output_weight=False (--keep-clip / --keep-output-weight)")
    for names, small, fix in checks if session is not None else []:
        checked = check_other_sizes(session, module, inputs, names, small,
                                    *((min_batch, max_batch) if dim_0_dynamic else (1, None)))
        if checked.problem is not None:
            raise ExportError(f"{checked.problem}: {fix}")
        # (where a checked size left a recorded range, the file refuses it: the range's own words say so)
        if checked.unchecked is not None and not names & set(range_notes):
            warn_at_user(f"dynamic axes not checked at {checked.sizes} ({checked.how}): {checked.unchecked}")
    for note in range_notes.values():
        warn_at_user(note)
    if batch_said:
        warn_at_user(f"the ONNX file computes the model's outputs at batches of {sizes} only (torch.export "
                     "captured the forward's branch on the batch size for those): pbp_fx.exporters.run and pbp-fx run "
                     "refuse other batches; perforate the model with an example of the other batch for those calls")
    _write_atomic(body, target)
    log.info("exported %s (%s, %d fused node(s), opset %d)", target, "fused" if fused else "unfused",
             n_fused, _default_opset(proto))
    return path
