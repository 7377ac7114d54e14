"""What the export's rewrite rules read of an ONNX graph, and how they change its initializers.

Shared by the rules `clip_after_site` and `output_weight_into_readers`: who produces and who
reads each value, the initializers and constants by name, and the layers whose weights can take
a factor that scales their input ("linear readers": a Conv, MatMul, Gemm or fused site reading the
value as its layer input).
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

from .functions import DOMAIN, FusedOpSpec

__all__ = ["GraphIndex", "weight_inputs", "why_not_linear_readers", "input_channel_factor"]

_DEFAULT = ("", "ai.onnx")


class GraphIndex:
    """Producers, readers, use counts, initializers and constants of one graph, by value name.

    Built once per rule; `replace_initializer` keeps it current.
    """

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        self.uses: Counter = Counter()
        for n in graph.node:
            for name in n.input:
                self.readers.setdefault(name, []).append(n)
                self.uses[name] += 1
        # A subgraph may read an initializer by name: then never edit one in place.
        self.has_subgraphs = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                 for n in graph.node for a in n.attribute)
        # A node whose subgraphs (If, Loop, Scan) read an outer value by name reads it too: counted
        # as one of its readers, so that no rule rewrites a value such a branch reads.
        for n in graph.node:
            for name in sorted(_subgraph_reads(n)):
                self.readers.setdefault(name, []).append(n)
                self.uses[name] += 1
        self.graph_outputs = {o.name for o in graph.output}
        self.initializers = {t.name: t for t in graph.initializer}
        # Constant nodes' values; initializers are read when asked for (a model's weights are most of them)
        self.constants: dict[str, np.ndarray] = {}
        for n in graph.node:
            if (n.op_type == "Constant" and n.domain in _DEFAULT and n.attribute
                    and n.attribute[0].name == "value"):
                self.constants[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)

    def scalar(self, name: str) -> Optional[float]:
        """A one-element constant's value (None when `name` is no such constant)."""
        if name in self.initializers:
            init = self.initializers[name]
            value = numpy_helper.to_array(init) if np.prod(init.dims) == 1 else None
        else:
            value = self.constants.get(name)
        return None if value is None or value.size != 1 else float(value.reshape(-1)[0])

    def array(self, name: str) -> np.ndarray:
        """An initializer's current value (a copy)."""
        return numpy_helper.to_array(self.initializers[name]).copy()

    def replace_initializer(self, node: onnx.NodeProto, pos: int, value: np.ndarray, tag: str) -> None:
        """node's initializer input `pos` becomes `value` (cast to its dtype): in place when node is
        its only reader, else as a new initializer named after `tag`."""
        name = node.input[pos]
        old = self.initializers[name]
        value = np.asarray(value).astype(numpy_helper.to_array(old).dtype, copy=False)
        if self.uses[name] == 1 and not self.has_subgraphs:
            old.CopyFrom(numpy_helper.from_array(value, name))
            return
        new = f"{name}_{tag}"
        while new in self.initializers:
            new += "_"
        self.graph.initializer.append(numpy_helper.from_array(value, new))
        self.initializers[new] = self.graph.initializer[-1]
        self.uses[name] -= 1
        self.uses[new] += 1
        node.input[pos] = new


def _subgraph_reads(node: onnx.NodeProto) -> set:
    """The value names read by the nodes of `node`'s subgraphs, at any depth (a superset of the
    outer values they read: names made inside count too, which only makes the rules more careful)."""
    graphs = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    graphs += [g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]
    names: set = set()
    for g in graphs:
        for inner in g.node:
            names.update(i for i in inner.input if i)
            names |= _subgraph_reads(inner)
    return names


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def weight_inputs(node: onnx.NodeProto, specs: dict[str, FusedOpSpec]) -> Optional[list[int]]:
    """Positions of the inputs that scale with the layer input (weights, not biases); None when
    `node` is not a layer that is linear in its input 0."""
    if node.domain in _DEFAULT:
        if node.op_type in ("Conv", "MatMul"):
            return [1]
        if node.op_type == "Gemm" and not _attr(node, "transA", 0):
            return [1]
        return None
    if node.domain == DOMAIN and node.overload in specs:
        return [i for i, name in enumerate(specs[node.overload].input_names()) if name.startswith("W")]
    return None


def input_channel_factor(node: onnx.NodeProto, weight: np.ndarray, scale: np.ndarray,
                         specs: dict[str, FusedOpSpec]) -> Optional[np.ndarray]:
    """The factor (broadcastable to `weight`) that multiplies input channel c of `node`'s layer by
    scale[c]; None when the weight's layout does not match a channel count of len(scale)."""
    channels = scale.shape[0]
    conv = node.op_type == "Conv" if node.domain in _DEFAULT else (
        node.domain == DOMAIN and node.overload in specs and specs[node.overload].is_conv)
    if conv:  # [O, I / groups, *kernel]; output o reads the input channels of its group
        groups = int(_attr(node, "group", 1))
        if weight.ndim < 3 or channels % groups or weight.shape[1] != channels // groups or weight.shape[0] % groups:
            return None
        per_group = scale.reshape(groups, channels // groups)
        rows = per_group[np.arange(weight.shape[0]) // (weight.shape[0] // groups)]
        return rows.reshape(*rows.shape, *([1] * (weight.ndim - 2)))
    if weight.ndim != 2:
        return None
    if node.op_type == "Gemm" and node.domain in _DEFAULT and _attr(node, "transB", 0):  # [N, I]
        return scale[None, :] if weight.shape[1] == channels else None
    return scale[:, None] if weight.shape[0] == channels else None  # MatMul, Gemm, PerforatedLinear: [I, N]


def why_not_linear_readers(value: str, index: GraphIndex, specs: dict[str, FusedOpSpec]) -> Optional[str]:
    """Why a factor on `value` cannot move into the weights of what reads it (None: it can): every
    reader must be a linear layer reading it once, as its layer input, with initializer weights."""
    if value in index.graph_outputs:
        return "its output is a graph output"
    readers = index.readers.get(value, [])
    if not readers:
        return "nothing reads its output"
    for r in readers:
        positions = weight_inputs(r, specs)
        if positions is None:
            return f"{r.op_type} {r.name!r} reads it, which is not a Conv, MatMul, Gemm or fused site"
        if list(r.input).index(value) != 0 or list(r.input).count(value) != 1:
            return f"{r.op_type} {r.name!r} reads it as something other than its layer input"
        if any(r.input[i] not in index.initializers for i in positions):
            return f"{r.op_type} {r.name!r} has weights that are not initializers"
    return None
