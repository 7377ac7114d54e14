"""The rule that writes a bounded ReLU after a fused site as HardSigmoid, its bound folded into the readers."""
from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

import pbp_fx
from pbp_fx.exporters import clip_after_site, export_onnx, fused_op_spec, ort_session, run
from pbp_fx.exporters.functions import DOMAIN
from pbp_fx.site import FusedSite


class Relu6Net(nn.Module):
    """MobileNetV2's pattern: conv-BN-ReLU6 into a depthwise conv, a pointwise conv and a Linear;
    plus a clamp with another bound read by a conv and a plain op, and a ReLU6 read by a pool."""

    def __init__(self):
        super().__init__()
        self.expand, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect")
        self.pw = nn.Conv2d(8, 6, 1)
        self.side = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        a = F.relu6(self.bn(self.expand(x)))            # read by a (fused) depthwise conv: folds
        b = torch.clamp(self.dw(a), 0.0, 2.5)           # another bound, read by a (fused) pointwise conv
        c = self.pw(b)
        s = F.relu6(self.side(x))                       # read by an Add: stays a Clip
        pooled = F.relu6(c + s).mean((2, 3))            # after an Add, not a site: untouched
        h = torch.clamp(self.fc(pooled), min=0.0, max=4.0)  # read by a (fused) Linear: folds
        return self.head(h)


def _perforated(k: int = 1):
    torch.manual_seed(0)
    model = Relu6Net().eval()
    x = torch.randn(2, 3, 7, 7)
    pm = pbp_fx.perforate(model, (x,))
    for _ in range(k):
        pm.grow()
    with torch.no_grad():
        for s in pm.sites.values():
            s.out_weight.normal_(0.0, 0.5)
            if k > 1:
                s.cascade.normal_(0.0, 0.5)
    return pm.eval(), x


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _specs(pm) -> dict:
    """The fused ops' signatures by overload, as export_onnx makes them."""
    return {spec.overload: spec for spec in (fused_op_spec(m) for m in pm.finalize().modules()
                                             if isinstance(m, FusedSite))}


@pytest.mark.parametrize("k", [1, 2])
def test_bounded_relus_after_sites_become_hardsigmoids_with_the_same_outputs(tmp_path, k):
    pm, x = _perforated(k)
    folded, kept = tmp_path / "folded.onnx", tmp_path / "kept.onnx"
    export_onnx(pm, (x,), folded)
    export_onnx(pm, (x,), kept, fold_clip=False)
    onnx.checker.check_model(onnx.load(str(folded)), full_check=True)
    assert _ops(kept)["Clip"] == 5 and "HardSigmoid" not in _ops(kept)
    # expand's, dw's and fc's bounds fold; side's ReLU6 (read by an Add) and the one after the Add stay.
    assert _ops(folded)["HardSigmoid"] == 3 and _ops(folded)["Clip"] == 2
    want = pm(x).detach().numpy()
    for path in (folded, kept):  # every initializer is read: the folded Clips' bounds are gone
        graph = onnx.load(str(path)).graph
        assert {t.name for t in graph.initializer} <= {i for n in graph.node for i in n.input}
        got = run(ort_session(str(path), threads=1), [x.numpy()])[0]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # The readers' weights (the neuron's and the K dendrites') carry the bound; biases, U and V do not.
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(kept)).graph.initializer}
    proto = onnx.load(str(folded))
    after = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    readers = {n.name: n for n in proto.graph.node if n.domain == DOMAIN}
    for site, bound in (("dw", 6.0), ("pw", 2.5), ("head", 4.0)):
        node = readers[f"pbp/{site}"]
        for pos, name in enumerate(node.input[1:], start=1):
            factor = bound if pos <= 1 + k else 1.0
            np.testing.assert_allclose(after[name], before[name] * factor, rtol=1e-6)


def test_the_rule_says_why_a_clip_stays(tmp_path):
    pm, x = _perforated(1)
    path = tmp_path / "kept.onnx"
    export_onnx(pm, (x,), path, fold_clip=False)
    proto = onnx.load(str(path))
    n, reasons = clip_after_site.rewrite(proto, _specs(pm))
    assert n == 3
    assert len(reasons) == 1  # (the Clip after the Add follows no site: the rule does not look at it)
    assert "'pbp/side' stays: Add" in reasons[0] and "not a Conv, MatMul, Gemm or fused site" in reasons[0]


@pytest.mark.parametrize("low, high, why", [
    (0.5, 6.0, "lower bound is not a constant 0"),
    (0.0, float("inf"), "upper bound is not a finite constant > 0"),
])
def test_other_bounds_stay_clips(tmp_path, low, high, why):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Hardtanh(low, high), nn.Conv2d(4, 2, 1)).eval()
    n, reasons, _ = _rule_on(model, torch.randn(2, 3, 5, 5), tmp_path)
    assert n == 0 and len(reasons) == 1 and why in reasons[0]


def _rule_on(model: nn.Module, x: torch.Tensor, tmp_path) -> tuple:
    """The rule's (rewritten count, reasons) on the model's file with one dendrite per site, and the model."""
    pm = pbp_fx.perforate(model, (x,))
    pm.grow()
    path = tmp_path / "rule.onnx"
    export_onnx(pm, (x,), path, fold_clip=False)
    return (*clip_after_site.rewrite(onnx.load(str(path)), _specs(pm)), pm)


@pytest.mark.parametrize("dtype, high, why", [
    (torch.float32, float(torch.finfo(torch.float32).max), "1/3.40282e+38 is below float32's normal range"),
    (torch.float32, 1e37, "'s weights times 1e+37 would overflow float32"),  # (the reader's weights are ~100)
    (torch.float16, 65504.0, "1/65504 is below float16's normal range"),
    (torch.float64, 6.0, "is float64, and HardSigmoid's alpha 1/6 is a float32 attribute"),
])
def test_a_bound_whose_fold_would_not_keep_the_numbers_stays_a_clip(tmp_path, dtype, high, why):
    """A clamp to finfo.max (an overflow guard) multiplied the readers' weights to inf: the file gave -inf/NaN; a
    float64 model's alpha 1/6 was rounded to float32 (2.8e-8 off, against 1e-16 unfolded)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Hardtanh(0.0, high), nn.Linear(4, 2)).eval().to(dtype)
    with torch.no_grad():
        model[2].weight.mul_(200.0)
    x = torch.randn(2, 3, dtype=dtype)
    n, reasons, pm = _rule_on(model, x, tmp_path)
    assert n == 0 and len(reasons) == 1 and why in reasons[0], reasons
    if dtype == torch.float32:  # (ONNX Runtime's CPU has float32 and float16 Linear kernels)
        path = tmp_path / "m.onnx"
        export_onnx(pm, (x,), path, dynamic_batch=False)
        got = run(ort_session(str(path), threads=1), [x.numpy()])[0]
        np.testing.assert_allclose(got, pm(x).detach().numpy(), atol=1e-5)


def test_a_bfloat16_model_with_a_relu6_after_a_site_exports_at_opset_22(tmp_path):
    """The fold's range check asked numpy's finfo about ml_dtypes' bfloat16: a raw ValueError."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU6(), nn.Linear(4, 2)).eval().to(torch.bfloat16)
    x = torch.randn(2, 3, dtype=torch.bfloat16)
    pm = pbp_fx.perforate(model, (x,))
    pm.grow()
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (ONNX Runtime's CPU has no bfloat16 Gemm: the file is not run)
        export_onnx(pm.eval(), (x,), path, opset=22)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert _ops(path)["HardSigmoid"] == 1


def test_a_shared_weight_is_scaled_in_a_copy():
    """An initializer another node also reads keeps its values there."""
    from onnx import TensorProto, helper

    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    lo, hi = (numpy_helper.from_array(np.array(v, np.float32), n) for v, n in ((0.0, "lo"), (6.0, "hi")))
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["site"], name="site", domain=DOMAIN),  # stands in for a fused site
         helper.make_node("Clip", ["site", "lo", "hi"], ["a"], name="clip"),
         helper.make_node("Conv", ["a", "w"], ["y"], name="reader"),
         helper.make_node("Conv", ["x", "w"], ["z"], name="other")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z")], [w, lo, hi])
    model = helper.make_model(graph)
    n, _ = clip_after_site.rewrite(model, {})
    nodes = {node.name: node for node in model.graph.node}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert n == 1 and nodes["clip"].op_type == "HardSigmoid"
    assert nodes["other"].input[1] == "w" and (inits["w"] == 1).all()
    assert nodes["reader"].input[1] != "w" and (inits[nodes["reader"].input[1]] == 6).all()
