"""Node patterns: which fx nodes are neurons (Linear/Conv) and which norms join a site.

Each rule is a small function `node, gm -> match | NotASite | None`: a match, the reason a
Linear/Conv-like node is not a site (a failed match says why), or None for any other node;
`find_sites` tries them in order, `explain_neuron` keeps the reasons.
Only recognition lives here: no graph is edited.

Neurons: `call_module` Linear/ConvNd; functional F.linear / F.convNd and their ATen forms
(aten.linear, aten.conv1d/2d/3d, aten.convolution, as torch.export writes them), and
matrix products with a parameter on the right, `x @ W` (aten.mm / aten.matmul / aten.addmm,
torch.mm / torch.matmul / torch.addmm / `@`): a Linear whose weight is stored transposed,
[in, C] (Hugging Face's GPT-2 Conv1D). Weights are parameters reached by `get_attr`, possibly
through a 2-D transpose. Norms: BatchNorm (module, F.batch_norm, aten.batch_norm), also
behind a train/eval `ModeSwitch`, joining when its eval form uses running statistics.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import fx, nn

from pbp_fx.layers import LayerSpec, NormSpec

__all__ = ["NeuronMatch", "NormMatch", "NotASite", "match_neuron", "explain_neuron", "match_norm", "attr_tensor", "neuron_weights",
           "NEURON_RULES", "NORM_RULES"]


@dataclass
class NeuronMatch:
    layer: LayerSpec
    input: fx.Node
    module: Optional[str]  # call_module target; None for the functional form
    weight: str  # attribute path of the weight parameter
    bias: Optional[str]
    weight_transposed: bool = False  # the parameter is stored [in, C]: the neuron weight is its .t()
    input_index: int = 0  # where the neuron's input x sits in the node's args
    input_name: str = "input"  # ... or its keyword


@dataclass
class NormMatch:
    norm: NormSpec
    node: fx.Node
    module: Optional[str]
    tensors: dict  # running_mean / running_var / weight / bias -> attribute path (or None)


_aten = torch.ops.aten
_CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3,
                   _aten.conv1d.default: 1, _aten.conv2d.default: 2, _aten.conv3d.default: 3,
                   _aten.conv1d.padding: 1, _aten.conv2d.padding: 2, _aten.conv3d.padding: 3}
_LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear, _aten.linear.default}
# x @ W with W a parameter [in, C]: (input index, input keyword, weight index, weight keyword)
_MATMUL_FUNCTIONS = {_aten.mm.default: (0, "self", 1, "mat2"), _aten.matmul.default: (0, "self", 1, "other"),
                     torch.mm: (0, "input", 1, "mat2"), torch.matmul: (0, "input", 1, "other"),
                     operator.matmul: (0, "a", 1, "b")}
_ADDMM_FUNCTIONS = {_aten.addmm.default: ("self", "mat1", "mat2"), torch.addmm: ("input", "mat1", "mat2")}
_BATCH_NORM_FUNCTIONS = {
    # target: argument positions of input, running_mean, running_var, weight, bias, training, momentum, eps
    F.batch_norm: {"input": 0, "running_mean": 1, "running_var": 2, "weight": 3, "bias": 4, "training": 5,
                   "momentum": 6, "eps": 7},
    _aten.batch_norm.default: {"input": 0, "weight": 1, "bias": 2, "running_mean": 3, "running_var": 4,
                               "training": 5, "momentum": 6, "eps": 7},
}
_BATCH_NORM_DEFAULTS = {"training": False, "momentum": 0.1, "eps": 1e-5}


def target_name(target) -> str:
    """A node's target as a name: a method's or module path's string, a function's __name__."""
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def node_arg(node: fx.Node, index: int, name: str, default=None):
    """The node's argument at `index`, or its keyword `name` (fx records either)."""
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


def _is_transpose_2d(node) -> bool:
    """A node computing the 2-D transpose of its first argument."""
    if not isinstance(node, fx.Node) or not node.args:
        return False
    if node.op == "call_function":
        t = node.target
        if t in (_aten.t.default, torch.t, _aten.numpy_T.default, _aten.mT.default):
            return True
        if t in (_aten.transpose.int, torch.transpose):
            return sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1] if len(node.args) >= 3 else False
        if t in (_aten.permute.default, torch.permute):
            return len(node.args) >= 2 and list(node.args[1]) in ([1, 0], [-1, -2], [1, -2], [-1, 0])
        if t is getattr:  # (fx records `W.T` / `W.mT` as getattr(W, "T"): `x @ W.T` was no site, and unlisted)
            return len(node.args) == 2 and node.args[1] in ("T", "mT")
    if node.op == "call_method":
        if node.target == "t":
            return True
        if node.target == "transpose" and len(node.args) >= 3:
            return sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1]
    return False


def _weight_ref(gm: fx.GraphModule, arg) -> Optional[tuple[str, bool]]:
    """(attribute path of the weight parameter, whether the node reads it through a 2-D transpose)."""
    path = _param_path(gm, arg)
    if path is not None:
        return path, False
    if _is_transpose_2d(arg):
        inner = _param_path(gm, arg.args[0])
        if inner is not None and gm.get_parameter(inner).dim() == 2:
            return inner, True
    return None


def _tensor_path(arg) -> Optional[str]:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return arg.target
    return None


def attr_tensor(gm: nn.Module, path: str) -> torch.Tensor:
    """The tensor at a dotted attribute path (parameter, buffer or plain attribute)."""
    owner, _, name = path.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


# Layers with Linear/Conv-like weights that no frontend makes sites of.
NEVER_SITES = (nn.RNNBase, nn.RNNCellBase, nn.modules.conv._ConvTransposeNd, nn.Bilinear)


# torch.nn layers whose wide parameters are no neuron weights: lookup tables and elementwise norm
# affines (LayerNorm([C, H, W]) holds a 3-D weight).
_NOT_NEURONS = (nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase,
                *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def neuron_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Linear/Conv-like weights of a model, by qualified name: the weights of Linear / ConvNd
    modules, and the 2-D or wider parameters of other torch.nn layers (MultiheadAttention's
    in_proj_weight), embeddings excepted. What a capture could make sites of."""
    out, seen = [], set()
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            found = [("weight", m.weight)]
        elif type(m).__module__.startswith("torch.nn.") and not isinstance(m, _NOT_NEURONS):
            found = [(n, p) for n, p in m.named_parameters(recurse=False) if p.dim() >= 2]
        elif _linear_like(m):
            found = [("weight", m.weight)]
        else:
            continue
        for pname, p in found:
            if isinstance(p, nn.Parameter) and id(p) not in seen:
                seen.add(id(p))
                out.append((f"{name}.{pname}" if name else pname, p))
    return out


def _linear_like(m: nn.Module) -> bool:
    """A layer from outside torch.nn shaped like a Linear/Conv: its own 2-D or wider `weight`
    parameter and a `bias` attribute (a parameter, or None), as Hugging Face's Conv1D and users'
    Linears have; not an embedding or a norm by its class name. A lookup table (a codebook, a
    positional table) has a weight and no bias: it is not counted."""
    w = m._parameters.get("weight")
    kind = type(m).__name__.lower()
    has_bias = "bias" in m._parameters or hasattr(m, "bias")
    return (isinstance(w, nn.Parameter) and w.dim() >= 2 and has_bias
            and "embed" not in kind and "norm" not in kind)


def _ntuple(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _unbatched(conv: fx.Node, d: int) -> bool:
    """A conv on an unbatched [C, *S] input: no [B, C, ...] neuron axis, so not a site."""
    return _out_ndim(conv) == d + 1


# -- neuron rules --------------------------------------------------------------------
# Each returns a NeuronMatch, a NotASite (a Linear/Conv-like op and why it is not a site), or
# None (not a Linear/Conv-like op at all).

class NotASite(str):
    """Why a Linear/Conv-like node is not a site: a rule's failed match, as a sentence."""


_UNBATCHED = "a convolution on an unbatched [C, ...] input: no batch axis, so no neuron channels"
_NOT_PARAM = "its weight is not a parameter (a buffer or a value computed at run time)"
_RUNTIME_HYPER = "its stride / padding / dilation / groups are computed at run time"

# The forwards a site's copies (and finalize, and the ONNX function) compute: a subclass that
# overrides forward (weight standardisation, "same" padding, a LoRA branch) computes something else.
_STOCK_FORWARDS = (nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)
_STOCK_CONV_FORWARDS = (nn.Conv1d._conv_forward, nn.Conv2d._conv_forward, nn.Conv3d._conv_forward)


def computes_as_its_layer(m: nn.Module) -> bool:
    """Whether a Linear/ConvNd module's call is its layer's own: its class keeps torch's forward (and a
    conv's _conv_forward, where a subclass may standardise the weight or pad "same") and __call__."""
    cls = type(m)
    return (cls.forward in _STOCK_FORWARDS and cls.__call__ is nn.Module.__call__
            and getattr(cls, "_conv_forward", _STOCK_CONV_FORWARDS[0]) in _STOCK_CONV_FORWARDS)


# (said where fx made the choice: under auto, torch.export has been tried already)
EXPORT_CAPTURES_IT = " (frontend='export', or 'auto', captures the ops of that forward instead)"


def own_forward(m: nn.Module) -> NotASite:
    return NotASite(f"its class {type(m).__name__} overrides forward (or _conv_forward), which the site's copies and the finalized "
                    f"and exported layer would not compute{EXPORT_CAPTURES_IT}")


def linear_or_conv_module(node: fx.Node, gm: fx.GraphModule) -> Union[NeuronMatch, NotASite, None]:
    if node.op != "call_module":
        return None
    m = gm.get_submodule(node.target)
    if not (isinstance(m, nn.Linear) or type(m) in _CONV_MODULES or isinstance(m, tuple(_CONV_MODULES))):
        return None
    if isinstance(m, nn.modules.lazy.LazyModuleMixin):
        return NotASite("a lazy module that has not run yet: call the model once before perforating")
    if not computes_as_its_layer(m):
        return own_forward(m)
    x = node_arg(node, 0, "input")  # (self.fc(input=h) as well as self.fc(h))
    if not isinstance(x, fx.Node):
        return NotASite("called without a tensor input")
    if not isinstance(m, nn.Linear) and _unbatched(node, len(m.kernel_size)):
        return NotASite(_UNBATCHED)
    bias = f"{node.target}.bias" if m.bias is not None else None
    return NeuronMatch(LayerSpec.from_module(m), x, node.target, f"{node.target}.weight", bias)


def functional_linear(node: fx.Node, gm: fx.GraphModule) -> Union[NeuronMatch, NotASite, None]:
    if node.op != "call_function" or node.target not in _LINEAR_FUNCTIONS:
        return None
    ref = _weight_ref(gm, node_arg(node, 1, "weight"))
    b = node_arg(node, 2, "bias")
    bias = _param_path(gm, b)
    if ref is None:
        return NotASite(_NOT_PARAM)
    if b is not None and bias is None:
        return NotASite("its bias is not a parameter")
    if not isinstance(node_arg(node, 0, "input"), fx.Node):
        return NotASite("its input is a constant")
    weight, transposed = ref
    shape = tuple(gm.get_parameter(weight).shape)
    if len(shape) != 2:
        return NotASite(f"its weight is {len(shape)}-D, not 2-D")
    shape = shape[::-1] if transposed else shape
    return NeuronMatch(LayerSpec("linear", shape, bias is not None), node_arg(node, 0, "input"),
                       None, weight, bias, weight_transposed=transposed)


def _product(gm: fx.GraphModule, x, w, b, index: int, name: str) -> Union[NeuronMatch, NotASite, None]:
    """x @ W (+ b) as a Linear: W is [in, C] (or W.t() of a [C, in] parameter), b a [C] parameter."""
    if not isinstance(x, fx.Node) or _param_path(gm, x) is not None:
        return None
    ref = _weight_ref(gm, w)
    if ref is None:
        return None
    weight, read_transposed = ref
    p = gm.get_parameter(weight)
    if p.dim() != 2:
        return NotASite(f"a product with a {p.dim()}-D parameter, not a 2-D weight")
    stored_transposed = not read_transposed  # x @ W reads W as [in, C]
    channels = p.shape[1] if stored_transposed else p.shape[0]
    fan_in = p.shape[0] if stored_transposed else p.shape[1]
    bias = None
    if b is not None:
        bias = _param_path(gm, b)
        if bias is None or tuple(gm.get_parameter(bias).shape) != (channels,):
            return NotASite("its added term is not a [C] bias parameter")
    return NeuronMatch(LayerSpec("linear", (int(channels), int(fan_in)), bias is not None), x, None, weight, bias,
                       weight_transposed=stored_transposed, input_index=index, input_name=name)


def functional_matmul(node: fx.Node, gm: fx.GraphModule) -> Union[NeuronMatch, NotASite, None]:
    if node.op != "call_function" or node.target not in _MATMUL_FUNCTIONS:
        return None
    xi, xn, wi, wn = _MATMUL_FUNCTIONS[node.target]
    return _product(gm, node_arg(node, xi, xn), node_arg(node, wi, wn), None, xi, xn)


def functional_addmm(node: fx.Node, gm: fx.GraphModule) -> Union[NeuronMatch, NotASite, None]:
    if node.op != "call_function" or node.target not in _ADDMM_FUNCTIONS:
        return None
    bn, xn, wn = _ADDMM_FUNCTIONS[node.target]
    if node_arg(node, 3, "beta", 1) != 1 or node_arg(node, 4, "alpha", 1) != 1:
        return NotASite("addmm with beta or alpha other than 1")
    return _product(gm, node_arg(node, 1, xn), node_arg(node, 2, wn), node_arg(node, 0, bn), 1, xn)


def functional_conv(node: fx.Node, gm: fx.GraphModule) -> Union[NeuronMatch, NotASite, None]:
    if node.op != "call_function" or node.target not in _CONV_FUNCTIONS:
        return None
    d = _CONV_FUNCTIONS[node.target]
    if _unbatched(node, d):
        return NotASite(_UNBATCHED)
    weight = _param_path(gm, node_arg(node, 1, "weight"))
    b = node_arg(node, 2, "bias")
    bias = _param_path(gm, b)
    if weight is None:
        return NotASite(_NOT_PARAM)
    if b is not None and bias is None:
        return NotASite("its bias is not a parameter")
    rest = [node_arg(node, i, n, dflt) for i, n, dflt in
            ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1), (6, "groups", 1))]
    if any(isinstance(v, fx.Node) for v in rest):
        return NotASite(_RUNTIME_HYPER)
    stride, padding, dilation, groups = rest
    w = gm.get_parameter(weight)
    layer = LayerSpec(f"conv{d}d", tuple(w.shape), bias is not None, _ntuple(stride, d),
                      padding if isinstance(padding, str) else _ntuple(padding, d),
                      _ntuple(dilation, d), int(groups))
    return NeuronMatch(layer, node_arg(node, 0, "input"), None, weight, bias)


def aten_convolution(node: fx.Node, gm: fx.GraphModule) -> Union[NeuronMatch, NotASite, None]:
    """aten.convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)."""
    if node.op != "call_function" or node.target is not _aten.convolution.default or len(node.args) < 9:
        return None
    x, w_arg, b, stride, padding, dilation, transposed, _, groups = node.args[:9]
    weight = _param_path(gm, w_arg)
    bias = _param_path(gm, b)
    if transposed:
        return NotASite("a transposed convolution (not a site kind)")
    if weight is None:
        return NotASite(_NOT_PARAM)
    if b is not None and bias is None:
        return NotASite("its bias is not a parameter")
    if not isinstance(x, fx.Node):
        return NotASite("its input is a constant")
    w = gm.get_parameter(weight)
    d = w.dim() - 2
    if d not in (1, 2, 3):
        return NotASite(f"a {d}-D convolution")
    if _unbatched(node, d):
        return NotASite(_UNBATCHED)
    if any(isinstance(v, fx.Node) for v in (stride, padding, dilation, groups)):
        return NotASite(_RUNTIME_HYPER)
    layer = LayerSpec(f"conv{d}d", tuple(w.shape), bias is not None, _ntuple(stride, d), _ntuple(padding, d),
                      _ntuple(dilation, d), int(groups))
    return NeuronMatch(layer, x, None, weight, bias)


NEURON_RULES = [linear_or_conv_module, functional_linear, functional_conv, aten_convolution,
                functional_matmul, functional_addmm]


def match_neuron(node: fx.Node, gm: fx.GraphModule) -> Optional[NeuronMatch]:
    m = explain_neuron(node, gm)
    return m if isinstance(m, NeuronMatch) else None


def explain_neuron(node: fx.Node, gm: fx.GraphModule) -> Union[NeuronMatch, NotASite, None]:
    """The node's NeuronMatch; else why this Linear/Conv-like node is not a site; else None."""
    reason = None
    for rule in NEURON_RULES:
        m = rule(node, gm)
        if isinstance(m, NeuronMatch):
            return m
        reason = reason or m
    return reason


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


def eval_call(node: fx.Node, gm) -> Optional[tuple]:
    """(target, args, kwargs) of what `node` computes in eval mode: a call_function as it is,
    a train/eval ModeSwitch by its eval form (None for anything else)."""
    if node.op == "call_function":
        return node.target, node.args, dict(node.kwargs)
    if node.op == "call_module":
        from pbp_fx.modes import ModeSwitch

        m = gm.get_submodule(node.target)
        if isinstance(m, ModeSwitch) and m.kind == "call_function":
            form = m.bound_form(node, training=False)
            return None if not isinstance(form, tuple) else (m.target, form[0], form[1])
    return None


def functional_batch_norm(neuron: fx.Node, user: fx.Node, layer: LayerSpec, gm) -> Optional[NormMatch]:
    """F.batch_norm / aten.batch_norm (also behind a ModeSwitch) with running statistics in eval form."""
    call = eval_call(user, gm)
    if call is None or call[0] not in _BATCH_NORM_FUNCTIONS:
        return None
    target, args, kwargs = call
    pos = _BATCH_NORM_FUNCTIONS[target]

    def get(name):
        i = pos[name]
        return args[i] if len(args) > i else kwargs.get(name, _BATCH_NORM_DEFAULTS.get(name))

    if get("input") is not neuron or get("training") is not False:
        return None  # batch statistics at eval time do not fold
    raw = {k: get(k) for k in ("running_mean", "running_var", "weight", "bias")}
    t = {k: _tensor_path(v) for k, v in raw.items()}
    if t["running_mean"] is None or t["running_var"] is None:
        return None
    if (raw["weight"] is not None and t["weight"] is None) or (raw["bias"] is not None and t["bias"] is None):
        return None
    if not _norm_fits(neuron, layer, attr_tensor(gm, t["running_mean"]).numel()):
        return None
    spec = NormSpec(float(get("eps")), get("momentum"), t["weight"] is not None)
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
