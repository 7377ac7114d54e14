"""Rewrite rule: a site's first output weight V[0] moves into the weights of the layers that read it.

Why: y = n + sum_k V[k] * s_k scales each dendrite output per channel, and ONNX Runtime's CPU
kernels have no per-channel scale after a conv's activation, so V[0] * s_0 runs as a blocked
depthwise 1x1 conv over the whole output: about a tenth of a fused MNASNet's time at K = 1
(ORT per-node profile). When the site's output goes through nothing or a positively homogeneous
activation f (Relu, LeakyRelu: f(g y) = g f(y) for g > 0) into linear layers only, then with
g = |V[0]| (per channel, all > 0)

    f(y) = g * f(y'),   y' = n / g + sign(V[0]) * s_0 + sum_{k>0} (V[k] / g) * s_k

and g moves into the readers' weights (input channel c times g[c]). A negative sign becomes a
positive one by negating the first dendrite's pre-activation: tanh(-a) = -tanh(a), and
sigmoid(-a) = 1 - sigmoid(a), whose 1 goes into the neuron's bias (and, where later dendrites
read s_0 through the cascade U, into their biases). V[0] is then all ones and the node says so
(`FusedOpSpec.unit_first_weight`): its body adds s_0 without a Mul. The file computes the same
function, up to rounding. At K >= 2 the other V rows stay as they are (divided by g).

A site matches when its activation is sigmoid or tanh, every |V[0]| entry is finite and > 0 (and,
in float32/64 only, within a range the rescaled tensors keep: `_why_out_of_range`), its
weights, biases, U and V are initializers (a sigmoid site with a negative V[0] entry needs a
bias), and its output (after the activation, if one reads it alone) is read only by linear
layers (`graph_index.why_not_linear_readers`) along the same channel axis. `rewrite` returns why
each other site did not match.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx

from .functions import DOMAIN, FusedOpSpec, set_flags, ship_functions
from .graph_index import GraphIndex, input_channel_factor, weight_inputs, why_not_linear_readers

__all__ = ["rewrite"]

HOMOGENEOUS = ("Relu", "LeakyRelu")  # f(g y) = g f(y) for every g > 0
SIGN_FLIPS = ("sigmoid", "tanh")  # an activation whose negation is itself, up to a constant


def _output_value(site: onnx.NodeProto, index: GraphIndex) -> str:
    """What the readers read: the site's output, or the output of a homogeneous activation that
    alone reads it."""
    y = site.output[0]
    readers = index.readers.get(y, [])
    if (y not in index.graph_outputs and len(readers) == 1 and readers[0].op_type in HOMOGENEOUS
            and readers[0].domain in ("", "ai.onnx") and readers[0].input[0] == y):
        return readers[0].output[0]
    return y


def _why_not(site: onnx.NodeProto, spec: FusedOpSpec, index: GraphIndex,
             specs: dict[str, FusedOpSpec]) -> Optional[str]:
    """Why this site's V[0] cannot move into its readers (None: it can)."""
    if spec.activation not in SIGN_FLIPS:
        return f"its dendrites' activation {spec.activation} has no sign flip"
    names = dict(zip(spec.input_names(), site.input))
    missing = [n for n, v in names.items() if n != "x" and v not in index.initializers]
    if missing:
        return f"its {', '.join(missing)} are not initializers"
    first = index.array(names["V"])[0]
    if not (np.isfinite(first).all() and (first != 0).all()):
        return "V[0] has zero or non-finite entries"
    why = _why_out_of_range(np.abs(first.astype(np.float64)), index.array(names["W"]).dtype)
    if why is not None:
        return why
    if spec.activation == "sigmoid" and (first < 0).any() and not spec.has_bias:
        return "V[0] has negative entries and the site has no bias to take sigmoid's constant"
    value = _output_value(site, index)
    why = why_not_linear_readers(value, index, specs)
    if why is not None:
        return why
    scale = np.abs(first)
    for r in index.readers[value]:
        reader_conv = specs[r.overload].is_conv if r.domain == DOMAIN else r.op_type == "Conv"
        if reader_conv != spec.is_conv:
            return f"{r.op_type} {r.name!r} reads it along another channel axis"
        for pos in weight_inputs(r, specs):
            if input_channel_factor(r, index.array(r.input[pos]), scale, specs) is None:
                return f"{r.op_type} {r.name!r} has a weight of another channel count"
    return None


def _why_out_of_range(scale: np.ndarray, dtype: np.dtype) -> Optional[str]:
    """Why dividing the neuron by |V[0]| (and multiplying the readers by it) would not be the same
    function in `dtype`, up to rounding (None: it would). Half precision has too little range: a
    neuron output of 10 over |V[0]| = 1e-4 overflows float16, and readers times it fall to
    subnormals. In float32/64 the factor stays within sqrt of the smallest normal number and its
    inverse, so weights and activations keep their range."""
    if np.dtype(dtype).itemsize < 4:  # (bfloat16 is ml_dtypes', which np.finfo does not know)
        return f"the site is {np.dtype(dtype).name}: rescaling by |V[0]| could overflow its range"
    info = np.finfo(dtype)
    bound = float(np.sqrt(info.tiny))
    if scale.min() < bound or scale.max() > 1.0 / bound:
        return (f"|V[0]| has entries outside [{bound:.0e}, {1.0 / bound:.0e}]: rescaling would leave "
                f"{np.dtype(dtype).name}'s range")
    return None


def _fold(site: onnx.NodeProto, spec: FusedOpSpec, index: GraphIndex, specs: dict[str, FusedOpSpec]) -> None:
    """Edit the site's tensors and its readers' weights (the rule's identity, see the module)."""
    pos = {name: i for i, name in enumerate(spec.input_names())}
    v = index.array(site.input[pos["V"]]).astype(np.float64)
    scale = np.abs(v[0])
    flip = v[0] < 0
    sign = np.where(flip, -1.0, 1.0)
    sigmoid_shift = flip.astype(np.float64) if spec.activation == "sigmoid" else np.zeros_like(scale)

    def out_rows(t: np.ndarray, rows: slice, factor: np.ndarray) -> np.ndarray:
        """t with its output rows (conv: dim 0; MatMul weight [In, N] and biases: the last dim) times factor."""
        t = t.astype(np.float64)
        if spec.is_conv and t.ndim > 1:
            t[rows] *= factor.reshape(-1, *([1] * (t.ndim - 1)))
        else:
            t[..., rows] *= factor
        return t

    def edit(name: str, value: np.ndarray) -> None:
        index.replace_initializer(site, pos[name], value, "unitv0")

    every = slice(0, spec.channels)
    edit("W", out_rows(index.array(site.input[pos["W"]]), every, 1.0 / scale))
    call, rows = spec.copy_rows(0)
    edit(f"W_d{call}", out_rows(index.array(site.input[pos[f"W_d{call}"]]), rows, sign))
    if spec.has_bias:
        edit("B", out_rows(index.array(site.input[pos["B"]]), every, 1.0 / scale) - sigmoid_shift)
        biases = {c: index.array(site.input[pos[f"B_d{c}"]]).astype(np.float64) for c in range(len(spec.call_sizes))}
        biases[call][rows] *= sign
    if spec.dendrites > 1:
        u = index.array(site.input[pos["U"]]).astype(np.float64)
        for k in range(1, spec.dendrites):
            if spec.has_bias:  # U * s_0 = U * (1 - s_0'): the U goes into dendrite k's bias
                c_k, rows_k = spec.copy_rows(k)
                biases[c_k][rows_k] += u[k, :, 0] * sigmoid_shift
            u[k, :, 0] *= sign
        edit("U", u)
    if spec.has_bias:
        for c, value in biases.items():
            edit(f"B_d{c}", value)
    v[0] = 1.0
    v[1:] /= scale
    edit("V", v)
    for r in index.readers[_output_value(site, index)]:
        for p in weight_inputs(r, specs):
            w = index.array(r.input[p])
            index.replace_initializer(r, p, w * input_channel_factor(r, w, scale, specs), "times_v0")


def rewrite(model: onnx.ModelProto, specs: dict[str, FusedOpSpec], opset: int) -> tuple[int, list[str]]:
    """Apply the rule to every fused site of `model` (in place; `specs`, the signatures by overload,
    gains the rewritten sites' signatures, so that a later rule reads them). The model then ships a
    function for each signature its nodes use, and no other.

    Returns the number of sites rewritten and, for each other site, why it stayed.
    """
    index = GraphIndex(model.graph)
    done, skipped = 0, []
    for site in model.graph.node:
        if site.domain != DOMAIN or site.overload not in specs or specs[site.overload].unit_first_weight:
            continue
        spec = specs[site.overload]
        why = _why_not(site, spec, index, specs)
        if why is not None:
            skipped.append(f"site {site.name!r} keeps V[0]: {why}")
            continue
        _fold(site, spec, index, specs)
        set_flags(site, specs, "unit_first_weight")
        done += 1
    if done:
        ship_functions(model, specs, opset)
    return done, skipped
