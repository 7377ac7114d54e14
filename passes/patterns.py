"""Node patterns: which fx nodes are neurons (Linear/Conv) and which norms join a site.

Each rule is a small function `node, gm -> match | None`; `find_sites` tries them in order.
Only recognition lives here: no graph is edited.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from pbp_fx.layers import LayerSpec, NormSpec

__all__ = ["NeuronMatch", "NormMatch", "match_neuron", "match_norm", "attr_tensor", "NEURON_RULES", "NORM_RULES"]


@dataclass
class NeuronMatch:
    layer: LayerSpec
    input: fx.Node
    module: Optional[str]  # call_module target; None for the functional form
    weight: str  # attribute path of the weight parameter
    bias: Optional[str]


@dataclass
class NormMatch:
    norm: NormSpec
    node: fx.Node
    module: Optional[str]
    tensors: dict  # running_mean / running_var / weight / bias -> attribute path (or None)


_CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear}


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _param_path(gm: fx.GraphModule, arg) -> Optional[str]:
    """The attribute path of a get_attr node that holds an nn.Parameter (else None)."""
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return None
    try:
        t = gm.get_parameter(arg.target)
    except AttributeError:
        return None
    return arg.target if isinstance(t, nn.Parameter) else None


def _tensor_path(gm: fx.GraphModule, arg) -> Optional[str]:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return arg.target
    return None


def attr_tensor(gm: nn.Module, path: str) -> torch.Tensor:
    """The tensor at a dotted attribute path (parameter, buffer or plain attribute)."""
    owner, _, name = path.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _ntuple(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _unbatched(conv: fx.Node, d: int) -> bool:
    """A conv on an unbatched [C, *S] input: no [B, C, ...] neuron axis, so not a site."""
    return _out_ndim(conv) == d + 1


# -- neuron rules --------------------------------------------------------------------
def linear_or_conv_module(node: fx.Node, gm: fx.GraphModule) -> Optional[NeuronMatch]:
    if node.op != "call_module":
        return None
    m = gm.get_submodule(node.target)
    if not (isinstance(m, nn.Linear) or type(m) in _CONV_MODULES or isinstance(m, tuple(_CONV_MODULES))):
        return None
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) or not node.args:
        return None
    if not isinstance(m, nn.Linear) and _unbatched(node, len(m.kernel_size)):
        return None
    bias = f"{node.target}.bias" if m.bias is not None else None
    return NeuronMatch(LayerSpec.from_module(m), node.args[0], node.target, f"{node.target}.weight", bias)


def functional_linear(node: fx.Node, gm: fx.GraphModule) -> Optional[NeuronMatch]:
    if node.op != "call_function" or node.target not in _LINEAR_FUNCTIONS:
        return None
    weight = _param_path(gm, _arg(node, 1, "weight"))
    b = _arg(node, 2, "bias")
    bias = _param_path(gm, b)
    if weight is None or (b is not None and bias is None):
        return None
    w = gm.get_parameter(weight)
    return NeuronMatch(LayerSpec("linear", tuple(w.shape), bias is not None), _arg(node, 0, "input"),
                       None, weight, bias)


def functional_conv(node: fx.Node, gm: fx.GraphModule) -> Optional[NeuronMatch]:
    if node.op != "call_function" or node.target not in _CONV_FUNCTIONS:
        return None
    d = _CONV_FUNCTIONS[node.target]
    if _unbatched(node, d):
        return None
    weight = _param_path(gm, _arg(node, 1, "weight"))
    b = _arg(node, 2, "bias")
    bias = _param_path(gm, b)
    if weight is None or (b is not None and bias is None):
        return None
    rest = [_arg(node, i, n, dflt) for i, n, dflt in
            ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1), (6, "groups", 1))]
    if any(isinstance(v, fx.Node) for v in rest):
        return None  # hyper-parameters computed at run time: not a static site
    stride, padding, dilation, groups = rest
    w = gm.get_parameter(weight)
    layer = LayerSpec(f"conv{d}d", tuple(w.shape), bias is not None, _ntuple(stride, d),
                      padding if isinstance(padding, str) else _ntuple(padding, d),
                      _ntuple(dilation, d), int(groups))
    return NeuronMatch(layer, _arg(node, 0, "input"), None, weight, bias)


NEURON_RULES = [linear_or_conv_module, functional_linear, functional_conv]


def match_neuron(node: fx.Node, gm: fx.GraphModule) -> Optional[NeuronMatch]:
    for rule in NEURON_RULES:
        m = rule(node, gm)
        if m is not None:
            return m
    return None


# -- norm rules (a norm joins only if it folds in eval form and is per-channel) -------
def _out_ndim(node: fx.Node) -> Optional[int]:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _norm_fits(neuron: fx.Node, layer: LayerSpec, channels: int) -> bool:
    if channels != layer.channels:
        return False
    # BatchNorm normalises dim 1: for a Linear that is the neuron axis only on [B, C].
    return layer.axis == 1 or _out_ndim(neuron) in (None, 2)


def batch_norm_module(neuron: fx.Node, user: fx.Node, layer: LayerSpec, gm) -> Optional[NormMatch]:
    if user.op != "call_module" or not user.args or user.args[0] is not neuron:
        return None
    m = gm.get_submodule(user.target)
    if not isinstance(m, nn.modules.batchnorm._BatchNorm) or not m.track_running_stats:
        return None
    if not _norm_fits(neuron, layer, m.num_features):
        return None
    t = {k: f"{user.target}.{k}" for k in ("running_mean", "running_var")}
    t.update({k: (f"{user.target}.{k}" if m.affine else None) for k in ("weight", "bias")})
    return NormMatch(NormSpec.from_module(m), user, user.target, t)


def functional_batch_norm(neuron: fx.Node, user: fx.Node, layer: LayerSpec, gm) -> Optional[NormMatch]:
    if user.op != "call_function" or user.target is not F.batch_norm or _arg(user, 0, "input") is not neuron:
        return None
    if _arg(user, 5, "training", False) is not False:
        return None  # batch statistics at eval time do not fold
    t = {k: _tensor_path(gm, _arg(user, i, k)) for i, k in
         ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))}
    if t["running_mean"] is None or t["running_var"] is None:
        return None
    if (_arg(user, 3, "weight") is not None and t["weight"] is None) or \
            (_arg(user, 4, "bias") is not None and t["bias"] is None):
        return None
    if not _norm_fits(neuron, layer, attr_tensor(gm, t["running_mean"]).numel()):
        return None
    spec = NormSpec(float(_arg(user, 7, "eps", 1e-5)), _arg(user, 6, "momentum", 0.1),
                    t["weight"] is not None)
    return NormMatch(spec, user, None, t)


NORM_RULES = [batch_norm_module, functional_batch_norm]


def match_norm(neuron: fx.Node, layer: LayerSpec, gm: fx.GraphModule) -> Optional[NormMatch]:
    """The norm that directly and solely consumes the neuron's output, if it joins the site."""
    if len(neuron.users) != 1:
        return None
    user = next(iter(neuron.users))
    for rule in NORM_RULES:
        m = rule(neuron, user, layer, gm)
        if m is not None:
            return m
    return None
