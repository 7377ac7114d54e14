"""The FunctionProto bodies of pbp::PerforatedLinear / PerforatedConv, one node at a time.

Each case builds a FusedSite directly, writes the single fused node plus its function by
hand (no torch export, so this sweeps many signatures quickly) and compares ONNX Runtime
with FusedSite.forward.
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from pbp_fx.exporters import DOMAIN, FusedOpSpec, fused_op_spec, make_function
from pbp_fx.exporters.onnx import ExportedSite
from pbp_fx.layers import LayerSpec
from pbp_fx.site import FusedSite


pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


def make_site(layer: LayerSpec, k: int, activation: str, seed: int = 0) -> FusedSite:
    g = torch.Generator().manual_seed(seed)
    c = layer.channels
    weight = torch.randn(1 + k, *layer.weight_shape, generator=g) * 0.5
    bias = torch.randn(1 + k, c, generator=g) if layer.bias else None
    cascade = torch.randn(k, c, k, generator=g)
    out_weight = torch.randn(k, c, generator=g)
    return FusedSite(layer, weight, bias, cascade, out_weight, activation, name="site").eval()


def single_node_model(site: FusedSite, in_shape: list, opset: int = 18) -> onnx.ModelProto:
    ex = ExportedSite(site)
    spec = ex.spec
    tensors = ex.tensors()
    inputs = spec.input_names()
    assert list(tensors) == inputs[1:]
    inits = [numpy_helper.from_array(t.detach().numpy(), n) for n, t in tensors.items()]
    node = helper.make_node(spec.op_type, inputs, ["y"], domain=DOMAIN, overload=spec.overload,
                            **spec.attributes())
    graph = helper.make_graph(
        [node], "one_site", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", *in_shape[1:]])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None] * len(in_shape))], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)],
                              functions=[make_function(spec, opset)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def check(site: FusedSite, in_shape: list, opset: int = 18):
    model = single_node_model(site, in_shape, opset)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for b in (1, 3):
        x = torch.randn(b, *in_shape[1:], generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            want = site(x).numpy()
        got = sess.run(None, {"x": x.numpy()})[0]
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4


ACTS = ["sigmoid", "tanh", "relu"]


@pytest.mark.parametrize("k,activation,bias", list(itertools.product([1, 2, 3], ACTS, [True, False])))
def test_linear(k, activation, bias):
    check(make_site(LayerSpec("linear", (6, 5), bias), k, activation), [2, 5])


@pytest.mark.parametrize("k", [1, 3])
def test_linear_on_tokens(k):
    check(make_site(LayerSpec("linear", (6, 5), True), k, "sigmoid"), [2, 4, 5])


CONVS = {
    "conv1d": LayerSpec("conv1d", (6, 3, 3), True, (2,), (1,), (1,), 1),
    "conv1d_same_even": LayerSpec("conv1d", (4, 2, 4), False, (1,), "same", (1,), 1),
    "conv2d": LayerSpec("conv2d", (6, 3, 3, 3), True, (1, 1), (1, 1), (1, 1), 1),
    "conv2d_valid_dilated": LayerSpec("conv2d", (4, 3, 3, 2), True, (2, 1), "valid", (2, 1), 1),
    "conv2d_grouped": LayerSpec("conv2d", (6, 2, 3, 3), True, (1, 1), (1, 1), (1, 1), 2),
    "conv2d_depthwise": LayerSpec("conv2d", (6, 1, 3, 3), False, (2, 2), (1, 1), (1, 1), 6),
    "conv2d_reflect": LayerSpec("conv2d", (4, 3, 3, 3), True, (1, 1), (1, 1), (1, 1), 1, "reflect"),
    "conv2d_replicate": LayerSpec("conv2d", (4, 3, 3, 3), True, (1, 1), (2, 1), (1, 1), 1, "replicate"),
    "conv3d": LayerSpec("conv3d", (4, 3, 1, 2, 2), True, (1, 1, 1), (0, 1, 0), (1, 1, 1), 1),
}
SHAPES = {"conv1d": [2, 3, 11], "conv2d": [2, 3, 7, 6], "conv3d": [2, 3, 2, 5, 5]}


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv(name, k):
    layer = CONVS[name]
    shape = list(SHAPES[layer.kind])
    shape[1] = layer.weight_shape[1] * layer.groups
    check(make_site(layer, k, "tanh" if k == 2 else "sigmoid"), shape)


def test_circular_padding_needs_opset_19():
    layer = LayerSpec("conv1d", (4, 2, 3), True, (1,), (1,), (1,), 1, "circular")
    site = make_site(layer, 2, "sigmoid")
    with pytest.raises(ValueError, match="opset >= 19"):
        make_function(fused_op_spec(site), 18)
    check(site, [2, 2, 9], opset=19)


def test_fused_layout_runs_one_call_per_copy_with_no_split_or_gather():
    """2-D conv (ungrouped, grouped, depthwise) and linear sites run one layer call per copy, each shaped like the neuron's."""
    for name, layer in [("conv2d", CONVS["conv2d"]), ("grouped", CONVS["conv2d_grouped"]),
                        ("depthwise", CONVS["conv2d_depthwise"]), ("linear", LayerSpec("linear", (6, 5), True))]:
        for k in (1, 3):
            site = make_site(layer, k, "sigmoid")
            f = make_function(fused_op_spec(site))
            op = "MatMul" if layer.kind == "linear" else "Conv"
            calls = [n for n in f.node if n.op_type == op]
            assert len(calls) == 1 + k, name
            assert all(a.i == layer.groups for n in calls for a in n.attribute if a.name == "group")
            assert not [n for n in f.node if n.op_type == "Split"], name
            outputs = {n.output[0] for n in calls}
            assert not [n for n in f.node if n.op_type == "Gather" and n.input[0] in outputs], name
            shape = layer.weight_shape[::-1] if layer.kind == "linear" else layer.weight_shape
            assert all(tuple(w.shape) == tuple(shape) for w in ExportedSite(site).weights), name
            # the cascade Add takes the copy's own layer output first, so a runtime fuses it into that call
            for n in f.node:
                if n.op_type == "Add" and n.output[0].startswith("a_"):
                    assert n.input[0].startswith(("z_", "a_")), name
    # ungrouped 1-D/3-D convs (no blocked layout in ONNX Runtime; im2col once per call): one wide call
    for name in ("conv1d", "conv3d"):
        f = make_function(fused_op_spec(make_site(CONVS[name], 3, "sigmoid")))
        assert [n.op_type for n in f.node if n.op_type in ("Conv", "Split")] == ["Conv", "Conv", "Split"], name
    site = make_site(CONVS["conv2d"], 1, "sigmoid")
    f = make_function(fused_op_spec(site))
    assert [n.op_type for n in f.node if n.op_type in ("Conv", "Split", "Sigmoid")] == ["Conv", "Conv", "Sigmoid"]
    assert "U" not in f.input  # K = 1: no cascade input
    # the dendrite tail first, the neuron's output second: onnxruntime fuses the Add into the tail's V scale
    assert f.node[-1].op_type == "Add" and f.node[-1].input[1] == [n for n in f.node if n.op_type == "Conv"][0].output[0]


def test_overloads_tell_signatures_apart():
    base = dict(kind="conv2d", channels=8, dendrites=2, activation="sigmoid", has_bias=True, kernel_shape=(3, 3),
                strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1), group=1)
    variants = [base, {**base, "dendrites": 3}, {**base, "activation": "tanh"}, {**base, "has_bias": False},
                {**base, "strides": (2, 2)}, {**base, "pads": (0, 0, 1, 1)}, {**base, "group": 2},
                {**base, "padding_mode": "reflect"}, {**base, "channels": 4}, {**base, "kind": "conv3d"}]
    names = {FusedOpSpec(**v).overload for v in variants}
    assert len(names) == len(variants)
    assert all(n.replace("_", "").isalnum() for n in names)


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="activation"):
        FusedOpSpec("linear", 4, 1, "gelu", True)
    with pytest.raises(ValueError, match="at least one dendrite"):
        FusedOpSpec("linear", 4, 0, "sigmoid", True)


@pytest.mark.parametrize("groups", [1, 16])
def test_onnxruntime_keeps_a_k2_conv_site_in_its_blocked_layout(tmp_path, groups):
    """After inlining, ORT's NCHWc transformer fuses every copy's cascade Add and sigmoid into its Conv:
    no Split, standalone Sigmoid or reorder is left inside the site (the old one-wide-call layout had all three)."""
    layer = LayerSpec("conv2d", (16, 16 // groups, 3, 3), True, (1, 1), (1, 1), (1, 1), groups)
    model = single_node_model(make_site(layer, 2, "sigmoid"), [2, 16, 8, 8])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = [(n.domain, n.op_type) for n in onnx.load(so.optimized_model_filepath).graph.node]
    if not any(d == "com.microsoft.nchwc" for d, _ in ops):
        pytest.skip("this CPU's onnxruntime has no NCHWc kernels")
    assert ops.count(("com.microsoft.nchwc", "ReorderInput")) == 1 and ops.count(("com.microsoft.nchwc", "ReorderOutput")) == 1
    assert not [op for d, op in ops if d == "" and op in ("Split", "Sigmoid", "Mul", "Add")], ops
