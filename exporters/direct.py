"""Direct fx -> ONNX emission for graphs made of common layers (the fast export path).

The dynamo exporter costs seconds whatever the model: importing torch._dynamo, building the
onnxscript torchlib registry (the source of ~500 functions parsed into IR), re-capturing the
graph with torch.export and running its decompositions. A finalized graph of Linear / Conv /
BatchNorm / pooling / elementwise layers and fused sites maps one node to one or two ONNX
ops, so `emit` writes it directly. Anything it does not know (another op, a shape computed at
run time, a non-float input) raises `Unsupported` and the caller uses the dynamo exporter.

Requires: a GraphModule in eval mode whose FusedSites are `ExportedSite`s (exporters.onnx).
Ensures: a ModelProto (no functions attached yet) computing what the module computes on the
example inputs, batch axis dynamic when asked; pbp nodes carry the same metadata the dynamo
route gives them.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Optional

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn

from pbp_fx.layers import has_user_hooks
from pbp_fx.tracing import buffers_kept

__all__ = ["emit", "Unsupported"]


class Unsupported(Exception):
    """The graph has something the direct path does not emit (the dynamo exporter then runs)."""


_DTYPES = {torch.float32: TensorProto.FLOAT, torch.float64: TensorProto.DOUBLE, torch.int64: TensorProto.INT64}
_ACTIVATION_MODULES = {nn.ReLU: "Relu", nn.Sigmoid: "Sigmoid", nn.Tanh: "Tanh", nn.Identity: "Identity",
                       nn.Dropout: "Identity", nn.Softsign: "Softsign"}
_UNARY_FUNCTIONS = {torch.relu: "Relu", F.relu: "Relu", torch.sigmoid: "Sigmoid", torch.tanh: "Tanh",
                    torch.exp: "Exp", torch.abs: "Abs", torch.neg: "Neg", operator.neg: "Neg"}
_UNARY_METHODS = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "exp": "Exp", "abs": "Abs",
                  "neg": "Neg", "contiguous": "Identity"}
_BINARY = {operator.add: "Add", torch.add: "Add", operator.sub: "Sub", torch.sub: "Sub",
           operator.mul: "Mul", torch.mul: "Mul", operator.truediv: "Div", torch.div: "Div"}
_BINARY_METHODS = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div"}


class _Emitter:
    def __init__(self, gm: fx.GraphModule, inputs: tuple, dynamic_batch: bool):
        self.gm = gm
        self.dynamic_batch = dynamic_batch
        self.batch = None
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.names: dict[fx.Node, str] = {}
        self.values = self._run(inputs)
        self.count = 0

    def _run(self, inputs: tuple) -> dict:
        """Every node's example value (for ranks, dtypes and constant checks)."""
        values: dict[fx.Node, Any] = {}

        class Record(fx.Interpreter):
            def run_node(self, n):
                values[n] = super().run_node(n)
                return values[n]

        with torch.no_grad():
            Record(self.gm).run(*inputs)
        return values

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def node(self, op: str, inputs: list, hint: str, domain: str = "", **attrs) -> str:
        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def const(self, value, hint: str = "const") -> str:
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def tensor(self, arg, like: Optional[torch.Tensor] = None) -> str:
        """The ONNX name of a node's value, or of a Python scalar as a constant of `like`'s dtype."""
        if isinstance(arg, fx.Node):
            if arg not in self.names:
                raise Unsupported(f"value of {arg.name} is not a tensor the emitter produced")
            return self.names[arg]
        if isinstance(arg, (int, float)) and like is not None:
            return self.const(torch.tensor(arg, dtype=like.dtype), "scalar")
        raise Unsupported(f"argument {arg!r}")

    # -- per node ---------------------------------------------------------------------------------
    def placeholder(self, n: fx.Node, value) -> None:
        if not isinstance(value, torch.Tensor) or value.dtype not in _DTYPES or value.dim() == 0:
            raise Unsupported(f"input {n.name}")
        # forward's own parameter name: fx writes one that shadows a builtin (`input`) as `input_1`,
        # and no other node takes the builtin's name
        self.names[n] = str(n.target)

    def get_attr(self, n: fx.Node, value) -> None:
        if not isinstance(value, torch.Tensor):
            raise Unsupported(f"attribute {n.target}")
        self.names[n] = self.const(value, n.name)

    def call_module(self, n: fx.Node, value) -> None:
        from pbp_fx.layers import conv_pads

        from .onnx import ExportedSite, ntuple

        m = self.gm.get_submodule(n.target)
        if n.kwargs or len(n.args) != 1:
            raise Unsupported(f"call of {n.target} with {len(n.args)} arguments")
        if has_user_hooks(m):  # (the dynamo exporter runs them as the module call does)
            raise Unsupported(f"hooks on {n.target}")
        x = self.tensor(n.args[0])
        xv = self.values[n.args[0]]
        if getattr(m, "inplace", False):
            self._check_in_place(n)
        if isinstance(m, ExportedSite):
            spec = m.spec
            if spec.padding_mode != "zeros":
                raise Unsupported("padding mode")
            # The fused node's inputs in the function's own order and layout (one source: ExportedSite).
            ins = [x] + [self.const(t, name) for name, t in m.tensors().items()]
            from .functions import DOMAIN
            from .onnx import OVERLOAD_KEY, SITE_KEY

            out = self.node(spec.op_type, ins, "pbp", domain=DOMAIN, **spec.attributes())
            props = self.nodes[-1].metadata_props
            props.add(key=SITE_KEY, value=m.site.name)
            props.add(key=OVERLOAD_KEY, value=spec.overload)
        elif type(m) in _ACTIVATION_MODULES:
            out = self.node(_ACTIVATION_MODULES[type(m)], [x], n.name)
        elif type(m) is nn.LeakyReLU:
            out = self.node("LeakyRelu", [x], n.name, alpha=float(m.negative_slope))
        elif type(m) is nn.Linear:
            w = self.const(m.weight.t(), "weight")
            if xv.dim() == 2 and m.bias is not None:
                out = self.node("Gemm", [x, w, self.const(m.bias, "bias")], n.name)
            else:
                out = self.node("MatMul", [x, w], n.name)
                if m.bias is not None:
                    out = self.node("Add", [out, self.const(m.bias, "bias")], n.name)
        elif type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            if m.padding_mode != "zeros" or xv.dim() != m.weight.dim():
                raise Unsupported("conv padding mode or unbatched input")
            nd = m.weight.dim() - 2
            kernel = tuple(m.weight.shape[2:])
            dil = ntuple(m.dilation, nd)
            begins, ends = conv_pads(m.padding, kernel, dil)
            ins = [x, self.const(m.weight, "weight")] + ([self.const(m.bias, "bias")] if m.bias is not None else [])
            out = self.node("Conv", ins, n.name, kernel_shape=list(kernel), strides=list(ntuple(m.stride, nd)),
                            pads=begins + ends, dilations=list(dil), group=int(m.groups))
        elif type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            if m.training or m.running_mean is None or xv.dim() < 2:
                raise Unsupported("batch norm without running statistics")
            c = m.num_features
            scale = m.weight if m.weight is not None else torch.ones(c)
            bias = m.bias if m.bias is not None else torch.zeros(c)
            ins = [x] + [self.const(t, "bn") for t in (scale, bias, m.running_mean, m.running_var)]
            out = self.node("BatchNormalization", ins, n.name, epsilon=float(m.eps))
        elif type(m) is nn.Flatten:
            out = self._flatten(n, x, xv, m.start_dim, m.end_dim)
        elif type(m) in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d):
            if any(s != 1 for s in ntuple(m.output_size, xv.dim() - 2) if s is not None):
                raise Unsupported("adaptive pooling to more than one cell")
            out = self.node("GlobalAveragePool", [x], n.name)
        elif type(m) in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d):
            out = self._pool(n, m, x, xv)
        elif type(m) is nn.Softmax and m.dim is not None:
            out = self.node("Softmax", [x], n.name, axis=int(m.dim))
        else:
            raise Unsupported(f"module {type(m).__name__}")
        self.names[n] = out

    def _check_in_place(self, n: fx.Node) -> None:
        """An in-place layer emits as a pure op only where nothing reads the changed tensor afterwards.

        ONNX values are immutable: a later reader of the input (or of a view sharing its storage)
        would see the value from before the change, where torch sees the one after.
        """
        storage = self.values[n.args[0]].untyped_storage().data_ptr()
        aliases = {v for v, value in self.values.items() if v is not n and isinstance(value, torch.Tensor)
                   and value.untyped_storage().data_ptr() == storage}
        order = {v: i for i, v in enumerate(self.gm.graph.nodes)}
        if any(v.op == "placeholder" for v in aliases) or any(
                order[u] > order[n] for v in aliases for u in v.users if u not in aliases):
            raise Unsupported(f"{n.target} changes in place a tensor read after it")

    def _pool(self, n, m, x: str, xv: torch.Tensor) -> str:
        nd = xv.dim() - 2
        if nd < 1 or getattr(m, "ceil_mode", False) or getattr(m, "return_indices", False):
            raise Unsupported("pooling mode")
        kernel = _ntuple_local(m.kernel_size, nd)
        stride = _ntuple_local(m.stride if m.stride is not None else m.kernel_size, nd)
        pad = _ntuple_local(m.padding, nd)
        attrs = dict(kernel_shape=list(kernel), strides=list(stride), pads=list(pad) * 2)
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            if any(d != 1 for d in _ntuple_local(m.dilation, nd)):
                raise Unsupported("dilated pooling")
            return self.node("MaxPool", [x], n.name, **attrs)
        if getattr(m, "divisor_override", None) is not None:
            raise Unsupported("divisor_override")
        return self.node("AveragePool", [x], n.name, count_include_pad=int(m.count_include_pad), **attrs)

    def _flatten(self, n, x: str, xv: torch.Tensor, start: int, end: int) -> str:
        rank = xv.dim()
        start, end = start % rank, end % rank
        if start == 1 and end == rank - 1:
            return self.node("Flatten", [x], n.name, axis=1)
        if start == end:
            return self.node("Identity", [x], n.name)
        raise Unsupported("flatten of inner dims")

    def call_function(self, n: fx.Node, value) -> None:
        t = n.target
        args = n.args
        if t in _UNARY_FUNCTIONS and len(args) == 1 and not n.kwargs:
            self.names[n] = self.node(_UNARY_FUNCTIONS[t], [self.tensor(args[0])], n.name)
        elif t in _BINARY and len(args) == 2 and not n.kwargs:
            self.names[n] = self._binary(n, _BINARY[t], args[0], args[1])
        elif t is torch.flatten and not n.kwargs:
            start = args[1] if len(args) > 1 else 0
            end = args[2] if len(args) > 2 else -1
            self.names[n] = self._flatten(n, self.tensor(args[0]), self.values[args[0]], start, end)
        elif t is torch.cat and not n.kwargs and isinstance(args[0], (list, tuple)):
            dim = args[1] if len(args) > 1 else 0
            self.names[n] = self.node("Concat", [self.tensor(a) for a in args[0]], n.name,
                                      axis=int(dim) % value.dim())
        else:
            raise Unsupported(f"function {getattr(t, '__name__', t)}")

    def call_method(self, n: fx.Node, value) -> None:
        t, args = n.target, n.args
        if t in _UNARY_METHODS and len(args) == 1 and not n.kwargs:
            self.names[n] = self.node(_UNARY_METHODS[t], [self.tensor(args[0])], n.name)
        elif t in _BINARY_METHODS and len(args) == 2 and not n.kwargs:
            self.names[n] = self._binary(n, _BINARY_METHODS[t], args[0], args[1])
        elif t in ("view", "reshape") and not n.kwargs:
            shape = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            if not all(isinstance(s, int) for s in shape):
                raise Unsupported("reshape to a shape computed at run time")
            shape = list(shape)
            if self.dynamic_batch and shape and shape[0] != -1:
                raise Unsupported("a reshape to a constant batch size (the batch axis cannot be dynamic)")
            self.names[n] = self.node("Reshape", [self.tensor(args[0]), self.const(torch.tensor(shape))], n.name)
        elif t == "unsqueeze" and len(args) == 2 and isinstance(args[1], int) and not n.kwargs:
            axis = args[1] % (self.values[args[0]].dim() + 1)
            self.names[n] = self.node("Unsqueeze", [self.tensor(args[0]), self.const(torch.tensor([axis]))], n.name)
        elif t == "flatten" and not n.kwargs:
            start = args[1] if len(args) > 1 else 0
            end = args[2] if len(args) > 2 else -1
            self.names[n] = self._flatten(n, self.tensor(args[0]), self.values[args[0]], start, end)
        else:
            raise Unsupported(f"method {t}")

    def _binary(self, n: fx.Node, op: str, a, b) -> str:
        like = self.values[a] if isinstance(a, fx.Node) else self.values.get(b)
        if not isinstance(like, torch.Tensor):
            raise Unsupported("arithmetic on non-tensors")
        # ONNX arithmetic takes one dtype: where torch promotes (int / 2, int * 0.5, float32 * float64)
        # the operands would need casts this path does not write.
        operands = [self.values.get(v) if isinstance(v, fx.Node) else v for v in (a, b)]
        result = self.values.get(n)
        if not isinstance(result, torch.Tensor) or any(
                isinstance(v, torch.Tensor) and v.dtype != result.dtype for v in operands):
            raise Unsupported("arithmetic with type promotion")
        return self.node(op, [self.tensor(a, like), self.tensor(b, like)], n.name)


def _ntuple_local(v, n: int) -> tuple:
    return tuple(int(i) for i in v) if isinstance(v, (tuple, list)) else (int(v),) * n


def _value_info(name: str, value: torch.Tensor, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, _DTYPES[value.dtype], dims)


def _output_dims(gm: fx.GraphModule, inputs: tuple, outputs: list, batch: Optional[str]) -> list[list]:
    """Each output's declared dims: those that follow the batch named `batch`, the others fixed,
    from a second run at twice the batch (the batch may end up in any dim, [1, B, C], or in
    none); a dim that grows otherwise (a flattened [B * T]) unknown. Unsupported when the graph
    does not run at twice the batch (an unbatched input [C], a size the model fixes): the dynamo
    exporter then finds out which it is."""
    if batch is None:
        return [list(o.shape) for o in outputs]
    b = inputs[0].shape[0]
    try:
        with torch.no_grad(), buffers_kept(gm):
            twice = [t for t in torch.utils._pytree.tree_leaves(gm(*(torch.cat([t, t]) for t in inputs)))
                     if isinstance(t, torch.Tensor)]
    except Exception as exc:  # noqa: BLE001 - the model's own limit: the dynamo exporter says which
        raise Unsupported(f"the graph does not run at twice the batch: {type(exc).__name__}") from exc
    if len(twice) != len(outputs) or any(t.dim() != o.dim() for t, o in zip(twice, outputs)):
        raise Unsupported("outputs of another structure at twice the batch")
    return [[d if d == d2 else batch if (d, d2) == (b, 2 * b) else None for d, d2 in zip(o.shape, t.shape)]
            for o, t in zip(outputs, twice)]


def plain_output_names(count: int) -> list[str]:
    """A tensor output's name, `output`, or a tuple's, `output_0`, `output_1`, ..."""
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def emit(gm: nn.Module, inputs: tuple, opset: int, dynamic_batch: bool,
         output_names: Optional[Callable[[int], list[str]]] = None) -> onnx.ModelProto:
    """The ONNX model of `gm` on `inputs` (see the module docstring); raises Unsupported.
    output_names(number of outputs): their names (default `output`, or `output_0`, `output_1`, ...)."""
    if not isinstance(gm, fx.GraphModule) or gm.training:
        raise Unsupported("not an eval-mode GraphModule")
    try:
        # (buffers kept: the file takes their values as they were, not as the forward left them)
        with buffers_kept(gm):
            e = _Emitter(gm, inputs, dynamic_batch)
    except Exception as exc:  # noqa: BLE001 - running the graph on the inputs failed: the exporter reports it
        raise Unsupported(f"running the graph: {exc}") from exc
    batch = "batch" if dynamic_batch else None
    graph_inputs, outputs = [], []
    for n in gm.graph.nodes:
        if n.op == "output":
            outputs = list(n.args[0]) if isinstance(n.args[0], (tuple, list)) else [n.args[0]]
            continue
        if n.op == "call_module" and n.target == "_guards_fn":
            continue
        handler = getattr(e, n.op, None)
        if handler is None:
            raise Unsupported(n.op)
        try:
            handler(n, e.values.get(n))
        except Unsupported:
            raise
        except Exception as exc:  # noqa: BLE001 - a form of a known layer the handler does not expect
            raise Unsupported(f"{n.op} {n.target}: {type(exc).__name__}: {exc}") from exc
        if n.op == "placeholder":
            value = e.values[n]
            graph_inputs.append(_value_info(e.names[n], value, [batch or value.shape[0], *value.shape[1:]]))
    if not outputs or not all(isinstance(o, fx.Node) and isinstance(e.values.get(o), torch.Tensor) for o in outputs):
        raise Unsupported("outputs other than tensors")
    names = (output_names or plain_output_names)(len(outputs))
    values = [e.values[o] for o in outputs]
    if any(v.dtype not in _DTYPES or v.dim() == 0 for v in values):
        raise Unsupported("output dtype")
    graph_outputs = []
    for name, o, value, dims in zip(names, outputs, values, _output_dims(gm, inputs, values, batch)):
        e.nodes.append(helper.make_node("Identity", [e.tensor(o)], [name], name=f"{name}_identity"))
        graph_outputs.append(_value_info(name, value, dims))
    graph = helper.make_graph(e.nodes, type(gm).__name__, graph_inputs, graph_outputs, e.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="pbp-fx")
