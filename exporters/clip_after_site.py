"""Rewrite rule: a bounded ReLU after a fused site becomes a HardSigmoid, its bound folded into the consumers.

Why: ONNX Runtime's x86 NCHWc transformer fuses a site's final Add into the neuron's Conv as the
conv's sum input, and after such a sum it fuses only some activations: Relu, Sigmoid, Tanh and
HardSigmoid, not Clip. So a ReLU6 (Clip(y, 0, 6)) after a site ran in NCHW between two reorders:
MobileNetV2 with one dendrite per site ran 1.28x its FLOP ratio, 1.09x with the Clip as a Relu
(bench/results/latency_stop18.md). Exactly:

    Clip(y, 0, m) = m * HardSigmoid(y; alpha=1/m, beta=0)

and a Conv, MatMul, Gemm or fused site is linear in its input (zero or input-derived padding), so
the factor m moves into the weights of every consumer. The file computes the same function, up to
rounding.

A Clip matches when its min is a constant 0 and its max a constant m > 0, its input is a fused
site's output, and every reader of its output is such a layer reading it as the layer input, with
weights held as initializers (`graph_index.why_not_linear_readers`), and the rewrite keeps the
numbers: the readers' weights times m stay finite in their dtype, 1/m stays a normal number there,
and the weights are not float64 (HardSigmoid's alpha is a float32 attribute). `rewrite` returns why
each other Clip after a site did not match.
"""
from __future__ import annotations

from typing import Optional

import ml_dtypes
import numpy as np
import onnx
from onnx import helper

from .functions import DOMAIN, FusedOpSpec
from .graph_index import GraphIndex, weight_inputs, why_not_linear_readers

__all__ = ["rewrite"]


def _why_not(clip: onnx.NodeProto, index: GraphIndex, specs: dict[str, FusedOpSpec]) -> Optional[str]:
    """Why this Clip after a site cannot become a HardSigmoid (None: it can)."""
    low = index.scalar(clip.input[1]) if len(clip.input) > 1 and clip.input[1] else None
    high = index.scalar(clip.input[2]) if len(clip.input) > 2 and clip.input[2] else None
    if low != 0.0:
        return "its lower bound is not a constant 0"
    if high is None or not high > 0.0 or not np.isfinite(high):
        return "its upper bound is not a finite constant > 0"
    why = why_not_linear_readers(clip.output[0], index, specs)
    if why is not None:
        return why
    for r in index.readers[clip.output[0]]:
        for pos in weight_inputs(r, specs):
            weight = index.array(r.input[pos])
            if weight.dtype == np.float64:
                return f"{r.op_type} {r.name!r} is float64, and HardSigmoid's alpha 1/{high:g} is a float32 attribute"
            info = ml_dtypes.finfo(weight.dtype)  # (numpy's finfo does not know bfloat16, onnx's ml_dtypes type)
            if 1.0 / high < info.tiny:
                return f"1/{high:g} is below {weight.dtype}'s normal range"
            if weight.size and float(np.abs(weight.astype(np.float64)).max()) * high > float(info.max):
                return f"{r.op_type} {r.name!r}'s weights times {high:g} would overflow {weight.dtype}"
    return None


def rewrite(model: onnx.ModelProto, specs: dict[str, FusedOpSpec]) -> tuple[int, list[str]]:
    """Apply the rule to every Clip that reads a fused site's output (in place).

    specs: the fused ops' signatures by overload (their input layout). Returns the number of
    Clips rewritten and, for each other Clip after a site, why it stayed.
    """
    index = GraphIndex(model.graph)
    done, skipped = 0, []
    for clip in model.graph.node:
        if clip.op_type != "Clip" or clip.domain not in ("", "ai.onnx"):
            continue
        src = index.producer.get(clip.input[0])
        if src is None or src.domain != DOMAIN:
            continue  # (after a plain Conv the runtime fuses the Clip itself)
        why = _why_not(clip, index, specs)
        if why is not None:
            skipped.append(f"Clip {clip.name!r} after site {src.name!r} stays: {why}")
            continue
        bound = index.scalar(clip.input[2])
        for r in index.readers[clip.output[0]]:
            for pos in weight_inputs(r, specs):
                index.replace_initializer(r, pos, index.array(r.input[pos]) * bound, f"times_{bound:g}")
        clip.op_type = "HardSigmoid"
        del clip.input[1:]
        clip.attribute.extend([helper.make_attribute("alpha", 1.0 / bound), helper.make_attribute("beta", 0.0)])
        done += 1
    return done, skipped
