"""ONNX FunctionProto bodies for the fused dendrite ops in domain "pbp".

A fused site is ONE node ``pbp::PerforatedLinear`` or ``pbp::PerforatedConv``. Its inputs,
all stored as initializers in the layout the body consumes directly
(`pbp_fx.layers.dendrite_calls`, shared with FusedSite), are

    x        the layer input: [..., In] (Linear) or [B, In, *S] (ConvNd)
    W        the neuron's weight (norm folded): Linear [In, C] (transposed for MatMul),
             ConvNd [C, In/groups, *kernel]
    W_d0..   the dendrites' weights, one per layer call (`dendrite_call_sizes`): one call per
             copy, each shaped like W, except ungrouped 1-D/3-D convs: all K copies in ONE
             call (W_d0 with K*C outputs, rows (copy, channel))
    B, B_d0..  (only when the site has a bias) the biases of those calls
    U        (only when K >= 2) the cascade weights [K, C, K]: a_k = pre_k + sum_{j<k} U[k, :, j] * s_j
    V        the output weights [K, C]: y = n + sum_k V[k] * s_k

Node attributes describe the op for readers and native kernels (``channels``,
``dendrites``, ``activation``; convolutions add ``kernel_shape``, ``strides``, ``pads``,
``dilations``, ``group``, ``padding_mode``; ``unit_first_weight`` = 1 when V[0] is all ones,
written by `output_weight_into_readers`, so the body adds s_0 without a Mul); every one is
declared by the function. A
function body depends on all of them (K is unrolled, strides are constants, ...), so each
distinct signature ships its own FunctionProto, told apart by the function ``overload``
(ONNX IR >= 10): ``FusedOpSpec.overload`` names it, e.g. ``conv2d_c16_k2_sigmoid_b1_s1x1_
p1x1x1x1_d1x1_g1_zeros``. The body is plain default-domain ops, so onnxruntime (which
inlines local functions) runs the file with no extra library:

    n = MatMul(x, W) [+ B]              or   Conv(Pad?(x), W, B)      the neuron, alone
    z_i = MatMul(x, W_di) [+ B_di]      or   Conv(Pad?(x), W_di, B_di)
    pre_1..pre_K = the copies of the z_i (a Split only when one call holds several)
    s_k = act(pre_k + sum_{j<k} U[k, :, j] * s_j)
    y = (sum_k V[k] * s_k) + n

Why this layout (ONNX Runtime profiles, bench/results/latency.md): with one call per copy
there is no Split or Gather, grouped/depthwise convs keep channel multiplier 1, and for 2-D
convs onnxruntime's NCHWc transformer fuses each copy's cascade Add (as the conv's sum
input) and activation into its Conv, turns the per-channel scales into blocked depthwise
convs and the tail's Adds into sum inputs, and keeps the whole site and a Relu after it in
the blocked layout (a Split made it reorder to NCHW and back around every site). The slices
of U and V are taken inside the body from the initializers; onnxruntime constant-folds them
after inlining.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pbp_fx.layers import dendrite_call_sizes, dendrite_rows

__all__ = ["DOMAIN", "DOMAIN_VERSION", "MIN_OPSET", "FusedOpSpec", "make_function", "op_type_for", "ship_functions",
           "set_flags"]

DOMAIN = "pbp"
DOMAIN_VERSION = 1
MIN_OPSET = 18  # the lowest default-domain opset of the fused ops' bodies (and of the exporter)

_ACT_OPS = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu"}
# torch padding_mode -> ONNX Pad mode (and the default-domain opset it needs).
_PAD_MODES = {"reflect": ("reflect", 18), "replicate": ("edge", 18), "circular": ("wrap", 19)}


def op_type_for(kind: str) -> str:
    return "PerforatedLinear" if kind == "linear" else "PerforatedConv"


def _ints(values) -> str:
    return "x".join(str(int(v)) for v in values) or "none"


@dataclass(frozen=True)
class FusedOpSpec:
    """Everything a fused op's function body depends on (hashable: one function each)."""

    kind: str  # "linear" | "conv1d" | "conv2d" | "conv3d"
    channels: int  # C
    dendrites: int  # K >= 1
    activation: str  # "sigmoid" | "tanh" | "relu"
    has_bias: bool
    kernel_shape: tuple = ()
    strides: tuple = ()
    pads: tuple = ()  # ONNX order: all begins, then all ends
    dilations: tuple = ()
    group: int = 1
    padding_mode: str = "zeros"
    unit_first_weight: bool = False  # V[0] is all ones: y = n + s_0 + sum_{k>0} V[k] * s_k

    def __post_init__(self):
        if self.activation not in _ACT_OPS:
            raise ValueError(f"activation {self.activation!r} has no ONNX op: use one of {sorted(_ACT_OPS)}")
        if self.dendrites < 1:
            raise ValueError("a fused op needs at least one dendrite (K = 0 sites are plain layers)")
        if self.padding_mode != "zeros" and self.padding_mode not in _PAD_MODES:
            raise ValueError(f"padding_mode {self.padding_mode!r} has no ONNX Pad mode")

    @property
    def op_type(self) -> str:
        return op_type_for(self.kind)

    @property
    def is_conv(self) -> bool:
        return self.kind != "linear"

    @property
    def spatial(self) -> int:
        return 0 if self.kind == "linear" else int(self.kind[-2])

    @property
    def min_opset(self) -> int:
        return _PAD_MODES[self.padding_mode][1] if self.padding_mode in _PAD_MODES else 18

    @property
    def overload(self) -> str:
        """The function overload name: a readable, unique encoding of the signature."""
        head = f"{self.kind}_c{self.channels}_k{self.dendrites}_{self.activation}_b{int(self.has_bias)}"
        tail = "_unitv0" if self.unit_first_weight else ""
        if not self.is_conv:
            return head + tail
        return (f"{head}_w{_ints(self.kernel_shape)}_s{_ints(self.strides)}_p{_ints(self.pads)}"
                f"_d{_ints(self.dilations)}_g{self.group}_{self.padding_mode}{tail}")

    def attributes(self) -> dict:
        """The node attributes (all declared by the function)."""
        attrs = {"channels": self.channels, "dendrites": self.dendrites, "activation": self.activation}
        if self.is_conv:
            attrs.update(kernel_shape=list(self.kernel_shape), strides=list(self.strides),
                         pads=list(self.pads), dilations=list(self.dilations), group=self.group,
                         padding_mode=self.padding_mode)
        if self.unit_first_weight:  # (absent otherwise: files without the rewrite keep their bytes)
            attrs["unit_first_weight"] = 1
        return attrs

    @property
    def call_sizes(self) -> list[int]:
        """Copies per dendrite layer call (`pbp_fx.layers.dendrite_call_sizes`)."""
        return dendrite_call_sizes(self.kind, self.group, self.dendrites)

    @property
    def call_suffixes(self) -> list[str]:
        """The names' suffix of each layer call's weight and bias: "" (the neuron's: W, B), then "_d0", ...
        (the dendrites' calls: W_d0, B_d0, ...)."""
        return [""] + [f"_d{i}" for i in range(len(self.call_sizes))]

    def copy_rows(self, copy: int) -> tuple[int, slice]:
        """(dendrite call, rows of its outputs) that hold dendrite `copy` (`pbp_fx.layers.dendrite_rows`)."""
        return dendrite_rows(self.kind, self.group, self.dendrites, self.channels, copy)

    def input_names(self) -> list[str]:
        calls = self.call_suffixes
        names = ["x"] + [f"W{c}" for c in calls] + ([f"B{c}" for c in calls] if self.has_bias else [])
        return names + (["U"] if self.dendrites > 1 else []) + ["V"]


class _Body:
    """Accumulates the nodes of one function body with fresh value names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(self, op_type: str, inputs: list[str], hint: str = "t", outputs: int = 1, **attrs):
        names = [self.fresh(hint) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, hint: str = "c") -> str:
        arr = np.asarray(value, dtype=np.int64)
        name = self.fresh(hint)
        self.nodes.append(helper.make_node("Constant", [], [name],
                                           value=numpy_helper.from_array(arr, name)))
        return name


def make_function(spec: FusedOpSpec, opset: int = MIN_OPSET) -> onnx.FunctionProto:
    """The FunctionProto implementing `spec` with default-domain ops of `opset`."""
    if opset < spec.min_opset:
        raise ValueError(f"{spec.op_type} with padding_mode={spec.padding_mode!r} needs opset >= "
                         f"{spec.min_opset}, got {opset}")
    b = _Body()
    k = spec.dendrites
    calls = spec.call_suffixes

    # -- the neuron's layer and the dendrites' layer calls -------------------------------
    if spec.is_conv:
        x = "x"
        conv_pads = list(spec.pads)
        if spec.padding_mode != "zeros":
            nd = spec.spatial
            begins, ends = spec.pads[:nd], spec.pads[nd:]
            pads = b.const([0, 0, *begins, 0, 0, *ends], "pads")
            x = b.op("Pad", [x, pads], "padded", mode=_PAD_MODES[spec.padding_mode][0])
            conv_pads = [0] * (2 * nd)
        conv = dict(kernel_shape=list(spec.kernel_shape), strides=list(spec.strides), pads=conv_pads,
                    dilations=list(spec.dilations), group=spec.group)
        outs = [b.op("Conv", [x, f"W{c}"] + ([f"B{c}"] if spec.has_bias else []), "z", **conv) for c in calls]
        axis = 1
    else:
        outs = [b.op("MatMul", ["x", f"W{c}"], "z") for c in calls]
        if spec.has_bias:
            outs = [b.op("Add", [z, f"B{c}"], "z") for z, c in zip(outs, calls)]
        axis = -1
    n, pre = outs[0], []
    for z, size in zip(outs[1:], spec.call_sizes):
        if size == 1:
            pre.append(z)
        else:
            pre += b.op("Split", [z], "copy", outputs=size, axis=axis, num_outputs=size)

    # -- per-channel vectors shaped to broadcast along the neuron axis -----------------
    def channel_vec(t: str) -> str:
        if spec.is_conv:  # [C] -> [C, 1, ..., 1]
            t = b.op("Unsqueeze", [t, b.const(list(range(1, spec.spatial + 1)), "axes")], "vec")
        return t

    def v_row(i: int) -> str:
        return channel_vec(b.op("Gather", ["V", b.const(i, "k")], "v", axis=0))

    def u_entry(i: int, j: int) -> str:
        row = b.op("Gather", ["U", b.const(i, "k")], "u", axis=0)  # [C, K]
        return channel_vec(b.op("Gather", [row, b.const(j, "j")], "u", axis=1))

    # -- cascade, activation and the weighted sum ----------------------------------------
    act = _ACT_OPS[spec.activation]
    acts: list[str] = []
    for i in range(k):
        a = pre[i]
        for j in range(i):
            a = b.op("Add", [a, b.op("Mul", [u_entry(i, j), acts[j]], "ua")], "a")
        acts.append(b.op(act, [a], "s"))
    tail = acts[0] if spec.unit_first_weight else b.op("Mul", [v_row(0), acts[0]], "vs")
    for i in range(1, k):
        tail = b.op("Add", [tail, b.op("Mul", [v_row(i), acts[i]], "vs")], "tail")
    # The dendrite tail first: onnxruntime's NCHWc transformer then fuses this Add (and an activation
    # after the site) into the tail's per-channel V Mul (a depthwise 1x1 conv after the transform), and
    # the neuron's Conv runs as the plain model's does; a bare tail (unit_first_weight) fuses it into
    # the neuron's Conv as the sum input (bench/results/latency_profile_stop37.md).
    b.nodes.append(helper.make_node("Add", [tail, n], ["y"]))
    return helper.make_function(
        DOMAIN, spec.op_type, spec.input_names(), ["y"], b.nodes,
        [helper.make_opsetid("", opset)], attributes=sorted(spec.attributes()),
        doc_string=f"{spec.op_type} with {k} dendrite(s): see pbp_fx.exporters.functions",
        overload=spec.overload)


def set_flags(node: onnx.NodeProto, specs: dict[str, FusedOpSpec], *flags: str) -> FusedOpSpec:
    """A rewrite sets FusedOpSpec's boolean `flags` (such as ``unit_first_weight``) on a fused
    node: its new signature joins `specs`, and the node takes its overload and the flags' attributes."""
    new = dataclasses.replace(specs[node.overload], **{f: True for f in flags})
    specs[new.overload] = new
    node.overload = new.overload
    node.attribute.extend(helper.make_attribute(f, 1) for f in flags)
    return new


def ship_functions(model: onnx.ModelProto, specs: dict[str, FusedOpSpec], opset: int) -> None:
    """After a rewrite changed fused nodes' overloads: the model ships one function for each
    signature its nodes use (from `specs`, by overload), and no other (in place)."""
    used = {n.overload for n in model.graph.node if n.domain == DOMAIN}
    have = {f.overload for f in model.functions if f.domain == DOMAIN}
    kept = [f for f in model.functions if f.domain != DOMAIN or f.overload in used]
    del model.functions[:]
    model.functions.extend(kept)
    for overload in sorted(used - have):
        model.functions.append(make_function(specs[overload], opset))
