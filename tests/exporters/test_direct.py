"""exporters.direct: common-layer graphs written straight to ONNX (the fast export path)."""
import numpy as np
import onnx
import pytest
import torch
from torch import nn

import pbp_fx
from pbp_fx.exporters import export_onnx
from pbp_fx.exporters.direct import Unsupported, emit
from pbp_fx.exporters.onnx import ExportError

ort = pytest.importorskip("onnxruntime")


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


class Simple(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.dw = nn.Conv2d(6, 6, 3, groups=6, padding="same", bias=False)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 8)
        self.act = nn.LeakyReLU(0.1)
        self.tok = nn.Linear(4, 3)

    def forward(self, x):
        h = self.pool(torch.relu(self.bn(self.conv(x))))
        h = torch.cat([self.dw(h), torch.sigmoid(self.avg(h))], 1)
        v = self.act(self.fc(torch.flatten(self.gap(h), 1)))
        return self.tok(v.view(-1, 2, 4)).tanh() + 1.0, v - 0.5


@pytest.mark.parametrize("fused", [True, False])
def test_direct_export_matches_pytorch_on_another_batch(fused, tmp_path, pb):
    model, x = Simple(), torch.randn(3, 2, 8, 8)
    pb.warm(model, (x,))
    pm = pbp_fx.perforate(model.eval(), (x,))
    pm.grow()
    pb.randomize(pm, scale=0.3)
    pm.eval()
    if fused:  # unfused FusedSites are the dynamo exporter's
        proto = emit(_swapped(pm), (x,), 18, True)
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    path = export_onnx(pm, (x,), tmp_path / "m.onnx", fused=fused)
    model_proto = onnx.load(str(path))
    assert sum(n.domain == "pbp" for n in model_proto.graph.node) == (len(pm.sites) if fused else 0)
    x5 = torch.randn(5, 2, 8, 8)
    got = _session(path).run(None, {"x": x5.numpy()})
    with torch.no_grad():
        want = pm(x5)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-5)


def _swapped(pm):
    from pbp_fx.exporters.onnx import _swap_fused_sites

    return _swap_fused_sites(pm.finalize())[0]


def test_a_reshape_that_fixes_the_batch_goes_to_the_exporter():
    class FixedBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x).view(2, 2, 2)

    pm = pbp_fx.perforate(FixedBatch(), (torch.randn(2, 4),))
    with pytest.raises(Unsupported, match="batch"):
        emit(pm.finalize(), (torch.randn(2, 4),), 18, True)
    emit(pm.finalize(), (torch.randn(2, 4),), 18, False)  # a static batch is fine


def test_layers_it_does_not_know_go_to_the_dynamo_exporter(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 2))
    x = torch.randn(3, 4)
    pm = pbp_fx.perforate(model, (x,))
    pm.grow()
    pm.eval()
    with pytest.raises(Unsupported, match="GELU"):
        emit(_swapped(pm), (x,), 18, True)
    path = export_onnx(pm, (x,), tmp_path / "gelu.onnx")
    got = _session(path).run(None, {_session(path).get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, pm(x).numpy(), rtol=1e-4, atol=1e-5)


class Unsqueezing(nn.Module):
    """The MNIST-1D CNN's shape: [B, L] -> unsqueeze(1) -> Conv1d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3)
        self.fc = nn.Linear(4 * 6, 3)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x.unsqueeze(1))), 1))


def test_unsqueeze_is_written_directly(tmp_path, pb):
    x = torch.randn(3, 8)
    pm = pbp_fx.perforate(Unsqueezing(), (x,))
    pm.grow()
    pb.randomize(pm, scale=0.3)
    pm.eval()
    proto = emit(_swapped(pm), (x,), 18, True)  # no Unsupported: the direct writer takes it
    assert any(n.op_type == "Unsqueeze" for n in proto.graph.node)
    path = export_onnx(pm, (x,), tmp_path / "m.onnx")
    x5 = torch.randn(5, 8)
    with torch.no_grad():
        want = pm(x5)
    np.testing.assert_allclose(_session(path).run(None, {"x": x5.numpy()})[0], want.numpy(), rtol=1e-4, atol=1e-5)


class Promoting(nn.Module):
    """A form of a known layer the direct path does not write, or arithmetic where torch promotes dtypes."""

    def __init__(self, part: str):
        super().__init__()
        self.part = part
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((None, 1) if part == "pool" else 1)
        self.fc = nn.Linear(4 * 6 if part == "pool" else 4, 3)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 3, dtype=torch.float64))

    def forward(self, x, n):
        h = self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))
        if self.part == "int_div":
            return h * (n / 2)  # int64 / 2 is float in torch
        if self.part == "double_buffer":
            return (h * self.scale).float()  # float32 x float64 is float64
        return h


@pytest.mark.parametrize("part", ["pool", "int_div", "double_buffer"])
def test_forms_the_direct_path_cannot_write_go_to_the_dynamo_exporter(tmp_path, pb, part):
    """Each raised a raw error (TypeError from the pool's None, an InferenceError from a Mul of mixed
    dtypes); the direct path now says Unsupported and the dynamo exporter writes them exactly."""
    x, n = torch.randn(3, 2, 6, 6), torch.tensor([[3], [4], [5]])
    pm = pbp_fx.perforate(Promoting(part), (x, n))
    pm.grow()
    pb.randomize(pm, scale=0.3)
    pm.eval()
    with pytest.raises(Unsupported, match="pool" if part == "pool" else "type promotion"):
        emit(_swapped(pm), (x, n), 18, True)
    path = export_onnx(pm, (x, n), tmp_path / "m.onnx")
    sess = _session(path)
    x5, n5 = torch.randn(5, 2, 6, 6), torch.arange(5).view(5, 1)
    feed = dict(zip([i.name for i in sess.get_inputs()], (x5.numpy(), n5.numpy())))
    got = sess.run(None, feed)[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, pm(x5, n5).numpy(), rtol=1e-4, atol=1e-5)


def test_example_inputs_the_model_cannot_run_are_refused_in_one_line(tmp_path):
    pm = pbp_fx.perforate(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), (torch.randn(2, 4),))
    with pytest.raises(ExportError, match=r"^the example inputs do not run through the model \(RuntimeError: "
                       r"mat1 and mat2 shapes cannot be multiplied"):
        export_onnx(pm, (torch.randn(2, 5),), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_both_paths_refuse_inputs_that_disagree_on_the_batch(tmp_path):
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)

        def forward(self, x, shift):
            return self.fc(x) + shift

    pm = pbp_fx.perforate(Shifted(), (torch.randn(2, 4), torch.randn(1, 6)))
    for fused in (True, False):  # the direct path declared shift's dim 0 a batch axis
        with pytest.raises(ExportError, match=r"disagree on the batch size \(dim 0: x 2, shift 1\): .* with "
                                              r"dynamic_axes naming the dim 0 of each input apart, e.g. \{'x': \{0: 'x_size'\}\}"):
            export_onnx(pm, (torch.randn(2, 4), torch.randn(1, 6)), tmp_path / "m.onnx", fused=fused)
    export_onnx(pm, (torch.randn(2, 4), torch.randn(1, 6)), tmp_path / "m.onnx", dynamic_batch=False)


class ReadAfterInPlace(nn.Module):
    """`nn.ReLU(inplace=True)` changes h, which is read again after it (directly or as a view)."""

    def __init__(self, read: str):
        super().__init__()
        self.read = read
        self.fc0, self.fc1, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.fc0(x)
        y = self.fc1(h)  # a read before the change: fine
        if self.read == "view":
            self.act(h.view(-1, 2, 4))
        else:
            self.act(h)
        return self.out(y * h) if self.read != "none" else self.out(self.act(y))


@pytest.mark.parametrize("read", ["same", "view"])
def test_an_in_place_layer_whose_input_is_read_after_it_goes_to_the_dynamo_exporter(tmp_path, read):
    """The direct path wrote a pure Relu there, so the file's output was off by ~0.1 with no error."""
    x = torch.randn(4, 8)
    model = ReadAfterInPlace(read).eval()
    with torch.no_grad():
        want = model(x.clone())
    pm = pbp_fx.perforate(model, (x.clone(),)).eval()
    with pytest.raises(Unsupported, match="in place a tensor read after it"):
        emit(_swapped(pm), (x,), 18, True)
    path = export_onnx(pm, (x,), tmp_path / "m.onnx")
    np.testing.assert_allclose(_session(path).run(None, {"x": x.numpy()})[0], want.numpy(), rtol=1e-4, atol=1e-5)


def test_an_in_place_layer_nothing_reads_around_is_written_directly():
    x = torch.randn(4, 8)
    pm = pbp_fx.perforate(ReadAfterInPlace("none").eval(), (x,)).eval()
    proto = emit(_swapped(pm), (x,), 18, True)
    assert any(n.op_type == "Relu" for n in proto.graph.node)


class BatchSecond(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)

    def forward(self, x):
        h = self.fc(x)
        return torch.relu(h).unsqueeze(0), torch.cat([h, h], 0)  # [1, B, 8] and [2 * B, 8]


def test_outputs_declare_the_batch_where_it_is(tmp_path):
    """The direct path took dim 0 of each output for the batch and fixed the others at the example's sizes:
    [1, B, 8] was declared ['?', 2, 8], and ONNX Runtime warned of a shape mismatch at any other batch."""
    pm = pbp_fx.perforate(BatchSecond(), (torch.randn(2, 6),))
    pm.grow()
    proto = emit(_swapped(pm), (torch.randn(2, 6),), 18, True)  # (written directly)
    dims = [[d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in o.type.tensor_type.shape.dim]
            for o in proto.graph.output]
    assert dims == [[1, "batch", 8], [None, 8]]
    export_onnx(pm, (torch.randn(2, 6),), tmp_path / "m.onnx")
    x5 = torch.randn(5, 6)
    got = _session(tmp_path / "m.onnx").run(None, {"x": x5.numpy()})
    with torch.no_grad():
        for g, w in zip(got, pm.eval()(x5)):
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-6)


def test_an_unbatched_input_is_no_dynamic_batch(tmp_path):
    """A Linear's input [C] had its features declared the dynamic `batch` axis, which ONNX Runtime then
    refused at any other size; the torch.export route says what it is."""
    pm = pbp_fx.perforate(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), (torch.randn(6),))
    with pytest.raises(ExportError, match=r"the ONNX capture fixed dim 0 of input '.*' to 6, .* pass dynamic_batch=False"):
        export_onnx(pm, (torch.randn(6),), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    export_onnx(pm, (torch.randn(6),), tmp_path / "m.onnx", dynamic_batch=False)
