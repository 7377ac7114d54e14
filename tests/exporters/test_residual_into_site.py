"""The rule that moves a residual Add after a fused 2-D conv site into the site's node."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pbp_fx
from pbp_fx.exporters import export_onnx, ort_session
from pbp_fx.exporters.functions import DOMAIN


class ResidualNet(nn.Module):
    """Residual blocks as ResNet (Add then Relu) and MobileNetV2 (x + f(x), the skip first) write
    them; a skip computed after the site; and sites whose Add cannot move."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.a2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.proj = nn.Conv2d(8, 8, 1)
        self.late = nn.Conv2d(8, 8, 1)
        self.shared = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        x = F.relu(self.stem(x))
        h = F.relu(self.bn1(self.a1(x)))
        x = F.relu(self.bn2(self.a2(h)) + x)   # ResNet: the site first, a Relu after the Add
        x = x + self.proj(x)                   # MobileNetV2: the skip first
        y = self.late(x)                       # the skip of this Add is computed after the site
        x = y + torch.tanh(x)
        z = self.shared(x)                     # read by the Add and by the mean: stays
        x = (z + x) * z.mean()
        v = x.mean((2, 3))
        return self.fc(v) + v                  # a Linear site: stays


MOVED = {"a2", "proj", "late"}


def _perforated(k: int, activation: str = "sigmoid", seed: int = 0):
    torch.manual_seed(seed)
    model = ResidualNet().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.normal_(0.0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 6, 6)
    pm = pbp_fx.perforate(model, (x,), activation=activation)
    for _ in range(k):
        pm.grow()
    with torch.no_grad():
        for s in pm.sites.values():
            s.out_weight.normal_(0.0, 0.5)
            s.cascade.normal_(0.0, 0.5)
    return pm.eval(), x


def _sites(path) -> dict:
    return {n.name.split("/")[-1]: n for n in onnx.load(str(path)).graph.node if n.domain == DOMAIN}


def _ort(path, x: torch.Tensor) -> np.ndarray:
    sess = ort_session(path, device="cpu", threads=1)
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("k, activation", [(1, "sigmoid"), (2, "sigmoid"), (3, "tanh")])
def test_residual_adds_move_into_the_sites_with_the_same_outputs(tmp_path, k, activation):
    pm, x = _perforated(k, activation)
    moved, kept = tmp_path / "moved.onnx", tmp_path / "kept.onnx"
    export_onnx(pm, (x,), moved)
    export_onnx(pm, (x,), kept, fold_residual=False)
    sites = _sites(moved)
    residual = {name for name, n in sites.items() if "residual" in {a.name for a in n.attribute}}
    assert residual == MOVED
    assert all(("_res" in n.overload) == (name in MOVED) for name, n in sites.items())
    model = onnx.load(str(moved))
    assert {f.overload for f in model.functions} == {n.overload for n in sites.values()}
    adds = lambda path: Counter(n.op_type for n in onnx.load(str(path)).graph.node)["Add"]  # noqa: E731
    assert adds(kept) - adds(moved) == len(MOVED)
    order = [n.name for n in model.graph.node]  # topological: each node after its inputs' producers
    made = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        assert all(not i or i in made for i in node.input), (node.name, order)
        made |= set(node.output)
    want = pm(x).detach().numpy()
    for path in (moved, kept):
        np.testing.assert_allclose(_ort(path, x), want, atol=1e-5, rtol=1e-5)
    bigger = torch.randn(5, 3, 6, 6)  # the batch axis stays dynamic
    np.testing.assert_allclose(_ort(moved, bigger), pm(bigger).detach().numpy(), atol=1e-5, rtol=1e-5)


def test_the_rule_says_why_an_add_stays(tmp_path, caplog):
    pm, x = _perforated(1)
    with caplog.at_level("INFO", logger="pbp_fx"):
        export_onnx(pm, (x,), tmp_path / "m.onnx")
    said = [r.getMessage() for r in caplog.records if "stays:" in r.getMessage() and "Add" in r.getMessage()]
    assert any("'pbp/shared' stays: its output has other readers than the Add" in m for m in said), said
    assert any("'pbp/fc' stays: a linear site" in m for m in said), said


def test_a_site_that_is_a_graph_output_keeps_its_add(tmp_path, caplog):
    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.conv(x)
            return y, y + x

    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    pm = pbp_fx.perforate(TwoOutputs().eval(), (x,))
    pm.grow()
    with torch.no_grad():
        pm.sites["conv"].out_weight.normal_(0.0, 0.5)
    with caplog.at_level("INFO", logger="pbp_fx"):
        export_onnx(pm.eval(), (x,), tmp_path / "m.onnx")
    assert "residual" not in {a.name for a in _sites(tmp_path / "m.onnx")["conv"].attribute}
    # (the exporter writes the output through an Identity: a second reader)
    assert any("'pbp/conv' stays: its output" in r.getMessage() for r in caplog.records)


def test_a_site_an_if_branch_reads_keeps_its_add(tmp_path):
    """torch.cond's branches read the site's output from inside the If node's subgraphs: the rule
    counted top-level readers only, moved the site past the If, and the file failed onnx.checker."""
    class Branching(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            z = torch.cond(x.sum() > 0, lambda y: y * 2, lambda y: y - 1, (y,))
            return y + x, z

    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5)
    pm = pbp_fx.perforate(Branching().eval(), (x,))
    pm.grow()
    with torch.no_grad():
        pm.sites["a"].out_weight.normal_(0.0, 0.5)
    pm.eval()
    path = export_onnx(pm, (x,), tmp_path / "m.onnx")
    assert "residual" not in {a.name for a in _sites(path)["a"].attribute}
    sess = ort_session(path, device="cpu", threads=1)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    for g, w in zip(got, pm(x)):
        np.testing.assert_allclose(g, w.detach().numpy(), atol=1e-5, rtol=1e-5)


def test_onnxruntime_fuses_the_moved_add(tmp_path):
    """The point of the rule: after ONNX Runtime's layout pass no standalone Add or Relu is left of a
    ResNet block's tail (the Add is the scale pass's sum input, the Relu fused into the neuron's conv)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(16, 16, 1)  # (the skip in the blocked layout, as inside a network)
            self.a, self.b = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x):
            x = F.relu(self.stem(x))
            return F.relu(self.b(F.relu(self.a(x))) + x)

    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 8)
    pm = pbp_fx.perforate(Block().eval(), (x,))
    pm.grow()
    with torch.no_grad():
        for s in pm.sites.values():
            s.out_weight.normal_(0.0, 0.5)
    counts = {}
    for name, fold in (("moved", True), ("kept", False)):
        path = tmp_path / f"{name}.onnx"
        export_onnx(pm.eval(), (x,), path, fold_residual=fold)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.optimized_model_filepath = str(tmp_path / f"{name}.opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        counts[name] = Counter((n.domain, n.op_type) for n in onnx.load(so.optimized_model_filepath).graph.node)
    if not any(d == "com.microsoft.nchwc" for d, _ in counts["moved"]):
        pytest.skip("this CPU's onnxruntime has no NCHWc kernels")
    assert counts["kept"][("", "Add")] == 1 and counts["kept"][("", "Relu")] == 1  # what the rule removes
    assert counts["moved"][("", "Add")] == 0 and counts["moved"][("", "Relu")] == 0, counts["moved"]
