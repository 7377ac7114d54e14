"""Rewrite rule: a bounded ReLU after a fused site becomes a HardSigmoid, its bound folded into the consumers.

Why: ONNX Runtime's x86 NCHWc transformer fuses a site's final Add into the neuron's Conv as the
conv's sum input, and after such a sum it fuses only some activations: Relu, Sigmoid, Tanh and
HardSigmoid, not Clip. So a ReLU6 (Clip(y, 0, 6)) after a site ran in NCHW between two reorders:
MobileNetV2 with one dendrite per site ran 1.28x its FLOP ratio, 1.09x with the Clip as a Relu
(bench/results/latency_stop18.md). Exactly:

    Clip(y, 0, m) = m * HardSigmoid(y; alpha=1/m, beta=0)

and a Conv or fused site is linear in its input (zero or input-derived padding), so the factor m
moves into the weights of every consumer. The file computes the same function, up to rounding.

A Clip matches when its min is a constant 0 and its max a constant m > 0, its input is a fused
site's output, and every reader of its output is a Conv, PerforatedConv or PerforatedLinear that
reads it as the layer input, with weights held as initializers. `rewrite` returns why each
other Clip after a site did not match.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .functions import DOMAIN, FusedOpSpec

__all__ = ["rewrite"]


def _scalar(name: str, constants: dict[str, np.ndarray]) -> Optional[float]:
    value = constants.get(name)
    return None if value is None or value.size != 1 else float(value.reshape(-1)[0])


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node values, by name."""
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _weight_inputs(node: onnx.NodeProto, specs: dict[str, FusedOpSpec]) -> Optional[list[int]]:
    """Positions of the inputs that scale with the layer input (weights, not biases); None if unknown."""
    if node.domain in ("", "ai.onnx") and node.op_type == "Conv":
        return [1]
    if node.domain == DOMAIN and node.overload in specs:
        return [i for i, name in enumerate(specs[node.overload].input_names()) if name.startswith("W")]
    return None


def _why_not(clip: onnx.NodeProto, readers: list[onnx.NodeProto], graph_outputs: set, inits: dict,
             constants: dict, specs: dict[str, FusedOpSpec]) -> Optional[str]:
    """Why this Clip after a site cannot become a HardSigmoid (None: it can)."""
    low = _scalar(clip.input[1], constants) if len(clip.input) > 1 and clip.input[1] else None
    high = _scalar(clip.input[2], constants) if len(clip.input) > 2 and clip.input[2] else None
    if low != 0.0:
        return "its lower bound is not a constant 0"
    if high is None or not high > 0.0 or not np.isfinite(high):
        return "its upper bound is not a finite constant > 0"
    if clip.output[0] in graph_outputs:
        return "its output is a graph output"
    if not readers:
        return "nothing reads its output"
    for r in readers:
        positions = _weight_inputs(r, specs)
        if positions is None:
            return f"{r.op_type} {r.name!r} reads it, which is not a Conv or fused site"
        if list(r.input).index(clip.output[0]) != 0 or list(r.input).count(clip.output[0]) != 1:
            return f"{r.op_type} {r.name!r} reads it as something other than its layer input"
        if any(r.input[i] not in inits for i in positions):
            return f"{r.op_type} {r.name!r} has weights that are not initializers"
    return None


def rewrite(model: onnx.ModelProto, specs: dict[str, FusedOpSpec]) -> tuple[int, list[str]]:
    """Apply the rule to every Clip that reads a fused site's output (in place).

    specs: the fused ops' signatures by overload (their input layout). Returns the number of
    Clips rewritten and, for each other Clip after a site, why it stayed.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    uses: Counter = Counter()
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
            uses[name] += 1
    has_subgraphs = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                        for n in graph.node for a in n.attribute)
    graph_outputs = {o.name for o in graph.output}
    init_by_name = {t.name: t for t in graph.initializer}
    constants = _constants(graph)
    done, skipped = 0, []
    for clip in graph.node:
        if clip.op_type != "Clip" or clip.domain not in ("", "ai.onnx"):
            continue
        src = producer.get(clip.input[0])
        if src is None or src.domain != DOMAIN:
            continue  # (after a plain Conv the runtime fuses the Clip itself)
        users = readers.get(clip.output[0], [])
        why = _why_not(clip, users, graph_outputs, init_by_name, constants, specs)
        if why is not None:
            skipped.append(f"Clip {clip.name!r} after site {src.name!r} stays: {why}")
            continue
        bound = _scalar(clip.input[2], constants)
        for r in users:
            for pos in _weight_inputs(r, specs):
                _scale_input(graph, r, pos, bound, init_by_name, uses, has_subgraphs)
        clip.op_type = "HardSigmoid"
        del clip.input[1:]
        clip.attribute.extend([helper.make_attribute("alpha", 1.0 / bound), helper.make_attribute("beta", 0.0)])
        done += 1
    return done, skipped


def _scale_input(graph: onnx.GraphProto, node: onnx.NodeProto, pos: int, factor: float,
                 init_by_name: dict, uses: Counter, has_subgraphs: bool) -> None:
    """node's initializer input `pos` times factor: in place when node is its only reader, else a copy."""
    name = node.input[pos]
    src = init_by_name[name]
    value = numpy_helper.to_array(src)
    scaled = value * np.asarray(factor, dtype=value.dtype)
    if uses[name] == 1 and not has_subgraphs:
        src.CopyFrom(numpy_helper.from_array(scaled, name))
        return
    new = f"{name}_times_{factor:g}"
    while new in init_by_name:
        new += "_"
    t = numpy_helper.from_array(scaled, new)
    graph.initializer.append(t)
    init_by_name[new] = graph.initializer[-1]
    uses[name] -= 1
    uses[new] += 1
    node.input[pos] = new
