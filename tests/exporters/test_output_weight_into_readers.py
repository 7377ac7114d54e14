"""The rule that moves a site's first output weight V[0] into the weights of the layers that read it."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

import pbp_fx
from pbp_fx.exporters import export_onnx, ort_session
from pbp_fx.exporters.functions import DOMAIN


class ReluNet(nn.Module):
    """Every way a site's output can leave it: through a Relu / LeakyRelu or nothing into a
    (grouped, reflect-padded) conv, a conv read by an Add, a Linear into a Linear, the graph output."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=4, padding_mode="reflect")
        self.pw = nn.Conv2d(8, 6, 1)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1)
        self.side = nn.Conv2d(3, 6, 1)
        self.fc = nn.Linear(6, 5)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        a = F.relu(self.bn(self.conv1(x)))          # Relu into a grouped conv: folds
        b = F.leaky_relu(self.dw(a), 0.1)           # LeakyRelu into a 1x1 conv: folds
        c = self.pw(b)                              # nothing, into a conv: folds
        d = F.relu(self.conv3(c))                   # read by an Add: stays
        e = d + F.relu(self.side(x))                # read by an Add: stays
        h = F.relu(self.fc(e.mean((2, 3))))         # a Linear site into a Linear site: folds
        return self.head(h)                         # the graph output: stays


FOLDED = {"conv1", "dw", "pw", "fc"}


def _perforated(model: nn.Module, x: torch.Tensor, k: int, activation: str, seed: int = 0):
    torch.manual_seed(seed)
    pm = pbp_fx.perforate(model.eval(), (x,), activation=activation)
    for _ in range(k):
        pm.grow()
    with torch.no_grad():
        for s in pm.sites.values():
            s.out_weight.normal_(0.0, 0.5)  # entries of both signs
            s.cascade.normal_(0.0, 0.5)
            if s.dendrites.bias is not None:
                s.dendrites.bias.normal_(0.0, 0.5)
    return pm.eval()


def _ort(path, x: torch.Tensor) -> np.ndarray:
    sess = ort_session(path, device="cpu", threads=1)
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _sites(path) -> dict[str, onnx.NodeProto]:
    return {n.name.removeprefix("pbp/"): n for n in onnx.load(str(path)).graph.node if n.domain == DOMAIN}


@pytest.mark.parametrize("k, activation", [
    (k, a) if (k, a) in ((1, "sigmoid"), (3, "tanh")) else pytest.param(k, a, marks=pytest.mark.slow)
    for a in ("sigmoid", "tanh") for k in (1, 2, 3)])
def test_v0_moves_into_the_readers_with_the_same_outputs(tmp_path, k, activation):
    torch.manual_seed(1)
    x = torch.randn(3, 3, 7, 7)
    pm = _perforated(ReluNet(), x, k, activation)
    folded, kept = tmp_path / "folded.onnx", tmp_path / "kept.onnx"
    export_onnx(pm, (x,), folded)  # (export_onnx runs onnx.checker with full_check)
    export_onnx(pm, (x,), kept, fold_output_weight=False)
    with torch.no_grad():
        ref = pm.finalize()(x).numpy()
    assert np.abs(_ort(folded, x) - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    assert np.abs(_ort(kept, x) - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())

    model = onnx.load(str(folded))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    sites = _sites(folded)
    unit = {name for name, n in sites.items() if "unit_first_weight" in {a.name for a in n.attribute}}
    assert unit == FOLDED
    for name, node in sites.items():
        v = inits[node.input[-1]]
        assert (v[0] == 1).all() if name in unit else not np.allclose(v[0], 1)
    # each used signature ships its function, and no unused one stays
    assert {f.overload for f in model.functions} == {n.overload for n in sites.values()}
    assert all(("unitv0" in n.overload) == (name in unit) for name, n in sites.items())
    unscaled_body = next(f for f in model.functions if f.overload == sites["fc"].overload)
    assert sum(n.op_type == "Mul" for n in unscaled_body.node) == k - 1 + (k - 1) * k // 2  # V[1:], U


def test_the_readers_weights_take_v0_per_input_channel(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 7, 7)
    pm = _perforated(ReluNet(), x, 1, "sigmoid")
    folded, kept = tmp_path / "folded.onnx", tmp_path / "kept.onnx"
    export_onnx(pm, (x,), folded)
    export_onnx(pm, (x,), kept, fold_output_weight=False)

    def tensors(path):
        inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
        return {name: [inits[i] for i in n.input[1:]] for name, n in _sites(path).items()}

    before, after = tensors(kept), tensors(folded)
    g = {name: np.abs(ts[-1][0]) for name, ts in before.items()}
    # dw (groups 4, 2 input channels each): output o reads input channels 2 * (o // 2) + (0, 1)
    w_dw = before["dw"][0]
    expect = w_dw * g["conv1"].reshape(4, 2)[np.arange(8) // 2][:, :, None, None]
    # ... and dw's own neuron rows are divided by its own |V[0]|
    np.testing.assert_allclose(after["dw"][0], expect / g["dw"][:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(after["pw"][0], before["pw"][0] * g["dw"][None, :, None, None]
                               / g["pw"][:, None, None, None], rtol=1e-6)
    # a Linear site's MatMul weight is [In, C]: rows take the reader scale, columns its own
    np.testing.assert_allclose(after["head"][0], before["head"][0] * g["fc"][:, None], rtol=1e-6)
    # untouched: the site read by an Add, and what it reads
    for a, b in zip(before["side"], after["side"]):
        np.testing.assert_array_equal(a, b)


class Conv1dNet(nn.Module):
    """Ungrouped 1-D convs: all K dendrites in one call (rows (copy, channel)), no bias on c1."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.c1 = nn.Conv1d(2, 6, 3, padding=1, bias=bias)
        self.c2 = nn.Conv1d(6, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(F.relu(self.c1(x)))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_one_call_dendrites_and_the_cascade(tmp_path, k):
    x = torch.randn(4, 2, 10)
    pm = _perforated(Conv1dNet(), x, k, "sigmoid", seed=3)
    path = tmp_path / "m.onnx"
    export_onnx(pm, (x,), path)
    with torch.no_grad():
        ref = pm.finalize()(x).numpy()
    assert np.abs(_ort(path, x) - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    assert "unit_first_weight" in {a.name for a in _sites(path)["c1"].attribute}


def test_the_rule_says_why_a_site_keeps_v0(tmp_path, caplog):
    x = torch.randn(4, 2, 10)
    # a sigmoid site without a bias, with a negative V[0] entry: sigmoid's constant has nowhere to go
    pm = _perforated(Conv1dNet(bias=False), x, 1, "sigmoid", seed=3)
    with torch.no_grad():
        pm.sites["c1"].out_weight[0, 0] = -0.5
        pm.sites["c1"].out_weight[0, 1:] = 0.5
    with caplog.at_level("INFO", logger="pbp_fx"):
        export_onnx(pm, (x,), tmp_path / "a.onnx")
    assert "'pbp/c1' keeps V[0]: V[0] has negative entries and the site has no bias" in caplog.text
    assert "'pbp/c2' keeps V[0]: its output is a graph output" in caplog.text
    # the same site with tanh folds (its negation needs no constant)
    pm = _perforated(Conv1dNet(bias=False), x, 1, "tanh", seed=3)
    export_onnx(pm, (x,), tmp_path / "b.onnx")
    assert "unit_first_weight" in {a.name for a in _sites(tmp_path / "b.onnx")["c1"].attribute}
    with torch.no_grad():
        ref = pm.finalize()(x).numpy()
    assert np.abs(_ort(tmp_path / "b.onnx", x) - ref).max() <= 1e-5
    # a zero entry, and relu dendrites (no sign flip)
    with torch.no_grad():
        pm.sites["c1"].out_weight[0, 2] = 0.0
    caplog.clear()
    with caplog.at_level("INFO", logger="pbp_fx"):
        export_onnx(pm, (x,), tmp_path / "c.onnx")
    assert "'pbp/c1' keeps V[0]: V[0] has zero or non-finite entries" in caplog.text
    pm = _perforated(Conv1dNet(), x, 1, "relu", seed=3)
    caplog.clear()
    with caplog.at_level("INFO", logger="pbp_fx"):
        export_onnx(pm, (x,), tmp_path / "d.onnx")
    assert "'pbp/c1' keeps V[0]: its dendrites' activation relu has no sign flip" in caplog.text


def test_a_shared_reader_weight_is_scaled_in_a_copy():
    """A reader's weight that another node also reads gets a scaled copy; the other keeps the original."""
    from pbp_fx.exporters import output_weight_into_readers
    from pbp_fx.exporters.functions import FusedOpSpec, make_function

    spec = FusedOpSpec("conv2d", 2, 1, "tanh", True, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1))
    t = {"W": np.full((2, 2, 1, 1), 2.0, np.float32), "W_d0": np.ones((2, 2, 1, 1), np.float32),
         "B": np.zeros(2, np.float32), "B_d0": np.zeros(2, np.float32),
         "V": np.array([[-0.5, 4.0]], np.float32), "w": np.ones((3, 2, 1, 1), np.float32)}
    site = helper.make_node(spec.op_type, ["x", "W", "W_d0", "B", "B_d0", "V"], ["y"], name="site",
                            domain=DOMAIN, **spec.attributes())
    site.overload = spec.overload
    graph = helper.make_graph(
        [site, helper.make_node("Relu", ["y"], ["r"]), helper.make_node("Conv", ["r", "w"], ["out"], name="reader"),
         helper.make_node("Conv", ["x", "w"], ["other"], name="other")],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 3, 3, 3]) for n in ("out", "other")],
        [numpy_helper.from_array(v, n) for n, v in t.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)],
                              functions=[make_function(spec)])
    before = _run_model(model)
    n, reasons = output_weight_into_readers.rewrite(model, {spec.overload: spec}, 18)
    assert (n, reasons) == (1, [])
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = {node.name: node for node in model.graph.node}
    assert nodes["other"].input[1] == "w" and (inits["w"] == 1).all()
    np.testing.assert_allclose(inits[nodes["reader"].input[1]][:, :, 0, 0], [[0.5, 4.0]] * 3)
    onnx.checker.check_model(model, full_check=True)
    after = _run_model(model)
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def _run_model(model: onnx.ModelProto) -> list[np.ndarray]:
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((1, 2, 3, 3)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def test_a_bfloat16_site_keeps_v0_without_an_error(tmp_path, caplog):
    """np.finfo does not know ONNX's bfloat16 (ml_dtypes): the range check raised a raw ValueError."""
    x = torch.randn(4, 6)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))  # (ONNX's Conv takes no bfloat16 at opset 18)
    pm = _perforated(mlp, x, 1, "tanh", seed=3).to(torch.bfloat16)
    with caplog.at_level("INFO", logger="pbp_fx"):
        export_onnx(pm, (x.to(torch.bfloat16),), tmp_path / "m.onnx")
    assert "'pbp/0' keeps V[0]: the site is bfloat16: rescaling by |V[0]| could overflow its range" in caplog.text


@pytest.mark.parametrize("dtype, small", [(torch.float16, 1e-6), (torch.float32, 1e-40)])
def test_v0_stays_where_rescaling_would_leave_the_dtypes_range(tmp_path, caplog, dtype, small):
    """n / |V[0]| overflowed float16 (non-finite outputs at |V[0]| = 1e-6, 1 % off at 1e-5), and a
    subnormal float32 |V[0]| overflowed float32: such sites keep V[0], saying why."""
    torch.manual_seed(0)
    x = torch.randn(4, 2, 10)
    pm = _perforated(Conv1dNet(), x, 1, "tanh", seed=3)
    with torch.no_grad():
        pm.sites["c1"].out_weight[0, :2] = small
    pm = pm.to(dtype)
    x = x.to(dtype)
    with caplog.at_level("INFO", logger="pbp_fx"):
        export_onnx(pm, (x,), tmp_path / "m.onnx")
    why = "rescaling by |V[0]| could overflow its range" if dtype == torch.float16 else "rescaling would leave float32's range"
    assert "'pbp/c1' keeps V[0]: " in caplog.text and why in caplog.text
    assert "unit_first_weight" not in {a.name for a in _sites(tmp_path / "m.onnx")["c1"].attribute}
    with torch.no_grad():
        ref = pm.finalize()(x).float().numpy()
    got = _ort(tmp_path / "m.onnx", x).astype(np.float32)
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() <= (2e-2 if dtype == torch.float16 else 1e-5) * max(1.0, np.abs(ref).max())


def test_a_value_an_if_branch_reads_keeps_its_scale(tmp_path):
    """torch.cond's branches read a site's output from inside the If node's subgraphs: counted as no
    reader, the rule moved V[0] into the one conv it saw, and the branch read the rescaled value."""
    class Branching(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            h = F.relu(self.a(x))
            z = torch.cond(x.sum() > 0, lambda h: h * 2, lambda h: h - 1, (h,))
            return self.b(h), z

    x = torch.randn(2, 4, 5, 5)
    pm = _perforated(Branching(), x, 1, "sigmoid")
    path = export_onnx(pm, (x,), tmp_path / "m.onnx")
    assert "unit_first_weight" not in {a.name for a in _sites(path)["a"].attribute}
    sess = ort_session(path, device="cpu", threads=1)
    for xs in (x, -x.abs()):  # both branches
        got = sess.run(None, {sess.get_inputs()[0].name: xs.numpy()})
        for g, w in zip(got, pm(xs)):
            np.testing.assert_allclose(g, w.detach().numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", [F.elu, F.softplus, F.gelu], ids=["elu", "softplus", "gelu"])
def test_no_fold_through_an_activation_that_is_not_positively_homogeneous(tmp_path, activation):
    """V[0] moves into a reader only through f(a*x) = a*f(x) (ReLU, LeakyReLU, nothing): through ELU,
    Softplus or GELU the file would compute another function."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(activation(self.fc(x)))

    torch.manual_seed(0)
    x = torch.randn(4, 6)
    pm = pbp_fx.perforate(Net().eval(), (x,), activation="tanh")
    pm.grow()
    with torch.no_grad():
        for s in pm.sites.values():
            s.out_weight.normal_(0.0, 0.5)
    pm.eval()
    path = export_onnx(pm, (x,), tmp_path / "m.onnx", dynamic_batch=False)
    session = ort_session(str(path), device="cpu", threads=1)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - pm(x).numpy()).max() <= 1e-5
