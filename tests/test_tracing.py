"""pbp_fx.tracing: fx tracing, leaf isolation of untraceable submodules, one-line trace errors."""
import collections
import dataclasses
import copy
import inspect
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import pbp_fx
from parts_models import FunctionalDropout, Reshapes
from pbp_fx.site import Site
from pbp_fx.errors import TraceError
from pbp_fx.tracing import PBTracer, trace

pytestmark = pytest.mark.usefixtures("seeded")


class Branchy(nn.Module):
    """Data-dependent control flow: not symbolically traceable."""

    def __init__(self, n=4):
        super().__init__()
        self.fc = nn.Linear(n, n)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


class WithBranchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.block = Branchy()
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.relu(self.block(self.inp(x))))


class Outer(nn.Module):
    """Untraceable itself and holding an untraceable child."""

    def __init__(self):
        super().__init__()
        self.inner = Branchy()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.inner(x)
        if y.mean() > 0:
            return self.fc(y)
        return self.fc(-y)


class RootBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > 0:  # ROOT-BRANCH-LINE
            return y
        return -y


def _line_of(cls, marker):
    src, start = inspect.getsourcelines(cls)
    return start + next(i for i, line in enumerate(src) if marker in line)


def test_trace_computes_what_the_model_computes(pb):
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.randn(2, 2, 4, 4)
    gm = trace(m, (x,))
    assert isinstance(gm, fx.GraphModule)
    assert pb.max_diff(gm(x), m(x)) == 0.0
    assert gm.get_submodule("0") is m[0]  # submodules are shared, not copied
    assert gm.meta["pbp_leaves"] == [] and gm.meta["pbp_untraceable"] == []


def test_shapes_are_propagated_only_with_example_inputs():
    m = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
    nodes = {n.name: n for n in trace(m, (torch.randn(2, 3),)).graph.nodes}
    assert tuple(nodes["_0"].meta["tensor_meta"].shape) == (2, 5)
    assert all("tensor_meta" not in n.meta for n in trace(m).graph.nodes)
    # a bare tensor is accepted as a 1-tuple
    assert tuple({n.name: n for n in trace(m, torch.randn(4, 3)).graph.nodes}["_0"].meta["tensor_meta"].shape) == (4, 5)


def test_shape_propagation_leaves_modes_and_buffers_alone():
    m = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Dropout(0.5))
    m.train()
    m[1].eval()  # mixed modes must survive as they are
    before = {k: v.clone() for k, v in m.state_dict().items()}
    trace(m, (torch.randn(8, 3) * 10,))
    assert m.training and not m[1].training and m[2].training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    m[1].train()
    trace(m, (torch.randn(8, 3) * 10,))
    assert int(m[1].num_batches_tracked) == 0
    assert torch.equal(m[1].running_mean, torch.zeros(5))


def test_untraceable_submodule_becomes_a_leaf(pb):
    m = WithBranchy()
    x = torch.randn(3, 3)
    gm = trace(m, (x,))
    assert gm.meta["pbp_leaves"] == ["block"] and gm.meta["pbp_untraceable"] == ["block"]
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["inp", "block", "out"]
    for sign in (1.0, -1.0):  # both branches still run eagerly inside the leaf
        assert pb.max_diff(gm(sign * x), m(sign * x)) == 0.0


def test_nested_untraceable_modules_are_both_isolated(pb):
    m = nn.Sequential(nn.Linear(4, 4), Outer())
    gm = trace(m, (torch.randn(2, 4),))
    assert gm.meta["pbp_untraceable"] == ["1.inner", "1"]
    assert gm.meta["pbp_leaves"] == ["1", "1.inner"]
    x = torch.randn(2, 4)
    assert pb.max_diff(gm(x), m(x)) == 0.0


def test_root_control_flow_is_a_one_line_trace_error_with_file_and_line():
    with pytest.raises(pbp_fx.TraceError) as info:
        trace(RootBranch(), (torch.randn(2, 3),), frontend="fx")
    msg = str(info.value)
    assert "\n" not in msg
    assert "RootBranch" in msg
    assert f"{__file__}:{_line_of(RootBranch, 'ROOT-BRANCH-LINE')}" in msg
    assert isinstance(info.value, pbp_fx.PBError)


def test_root_control_flow_with_auto_traces_the_submodules_in_place():
    with pytest.warns(UserWarning, match="neither fx nor torch.export") as said:
        gm = trace(RootBranch(), (torch.randn(2, 3),))
    # the reason itself, not the name of a field the user cannot see
    assert "meta[" not in str(said[0].message)
    assert "(fx: symbolically traced variables cannot be used as inputs to control flow at " in str(said[0].message)
    assert "; torch.export: " in str(said[0].message)  # each frontend's reason, with the line it failed at
    assert gm.meta["pbp_frontend"] == "parts" and gm.meta["pbp_parts"] == ["fc"]
    assert "RootBranch" in gm.meta["pbp_fx_error"]


def test_explicit_leaves_are_kept_as_calls():
    m = WithBranchy()
    gm = trace(m, leaves=["inp"])
    assert "inp" in gm.meta["pbp_leaves"] and "inp" not in gm.meta["pbp_untraceable"]
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["inp", "block", "out"]


def test_too_many_leaves_is_a_trace_error_naming_the_module():
    with pytest.raises(pbp_fx.TraceError, match=r"cannot trace module 'block' .* at .*test_tracing.py:\d+"):
        trace(WithBranchy(), max_leaves=0)


def test_example_inputs_that_do_not_fit_are_a_trace_error():
    with pytest.raises(pbp_fx.TraceError, match="example inputs do not run"):
        trace(nn.Linear(3, 4), (torch.randn(2, 5),))


def test_trace_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        trace(lambda x: x)


def test_pbp_modules_are_leaves():
    tracer = PBTracer()
    site = Site("s", pbp_fx.layers.LayerSpec.from_module(nn.Linear(2, 2)))
    assert tracer.is_leaf_module(site, "pbp_sites.s")
    assert tracer.is_leaf_module(nn.Linear(2, 2), "fc")  # torch.nn modules as usual
    assert not tracer.is_leaf_module(WithBranchy(), "m")
    assert PBTracer(["m"]).is_leaf_module(WithBranchy(), "m")


# -- frontends: fx, torch.export, auto ------------------------------------------------------------

class ShapeBranch(nn.Module):
    """fx cannot branch on x.dim() (a Proxy); torch.export sees the real number."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.dim() == 3:
            x = x.mean(1)
        return self.fc(x)


class KwOut(nn.Module):
    """Keyword inputs (one optional) and a structured output."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x, mask=None, scale: float = 1.0):
        h = torch.relu(self.a(x))
        if mask is not None:
            h = h * mask
        return {"logits": self.b(h) * scale, "hidden": (h,)}


def test_auto_uses_fx_when_it_traces():
    gm = trace(WithBranchy(), (torch.randn(2, 3),))
    assert gm.meta["pbp_frontend"] == "fx" and "pbp_fx_error" not in gm.meta


def test_auto_falls_back_to_torch_export_and_says_why(pb, caplog):
    m, x = ShapeBranch(), torch.randn(2, 6, 4)
    with pytest.raises(pbp_fx.TraceError, match="cannot trace ShapeBranch.forward"):
        trace(m, (x,), frontend="fx")
    with caplog.at_level("INFO", logger="pbp_fx.tracing"):
        gm = trace(m, (x,))
    assert gm.meta["pbp_frontend"] == "export" and "cannot trace" in gm.meta["pbp_fx_error"]
    assert any("traced with torch.export" in r.getMessage() for r in caplog.records)
    assert gm.meta["pbp_dynamic"] == "auto"
    for shape in [(2, 6, 4), (5, 3, 4), (1, 9, 4)]:  # dynamic batch and sequence
        y = torch.randn(*shape)
        assert pb.max_diff(gm(y), m(y)) == 0.0
    # parameters are the model's own, reached through its own submodules
    assert gm.fc is m.fc and gm.get_parameter("fc.weight") is m.fc.weight


def test_keyword_inputs_and_structured_outputs_in_both_frontends(pb):
    m = KwOut()
    x, mask = torch.randn(3, 4), (torch.rand(3, 5) > 0.5).float()
    want = m(x, mask=mask)
    for frontend in ("fx", "export"):
        gm = trace(m, (x,), {"mask": mask}, frontend=frontend)
        got = gm(x, mask=mask)
        assert set(got) == {"logits", "hidden"} and isinstance(got["hidden"], tuple)
        assert pb.max_diff(got["logits"], want["logits"]) == 0.0
        pm = pbp_fx.perforate(m, (x,), example_kwargs={"mask": mask}, frontend=frontend)
        assert pb.max_diff(pm(x, mask=mask)["hidden"], want["hidden"]) == 0.0
        nodes = {n.name: n for n in gm.graph.nodes}
        assert any("tensor_meta" in n.meta for n in nodes.values())  # shapes propagated through kwargs


def test_export_frontend_is_exact_and_keeps_the_model_untouched(pb):
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3)).train()
    pb.warm(m, (torch.randn(4, 2, 4, 4),))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(1, 2, 4, 4)  # a batch of 1 is still exported with a dynamic batch
    gm = trace(m, (x,), frontend="export")
    assert m.training and all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    m.eval()
    gm.eval()
    for batch in (1, 3):
        y = torch.randn(batch, 2, 4, 4)
        assert pb.max_diff(gm(y), m(y)) == 0.0


def _strided_convs() -> nn.Sequential:
    return nn.Sequential(*[nn.Conv1d(1 if i == 0 else 4, 4, 5, stride=2, padding=1) for i in range(3)])


class LengthFixed(nn.Module):
    """Three strided 1-D convs, then a Linear that fixes the length (models/mnist1d_cnn.py in small):
    with every dim dynamic, torch's constraint solver fails on the length's floor divisions."""

    def __init__(self):
        super().__init__()
        self.convs, self.fc = _strided_convs(), nn.Linear(4 * 2, 3)

    def forward(self, x):  # [B, 24]
        return self.fc(torch.flatten(self.convs(x.unsqueeze(1)), 1))


class BatchFixed(LengthFixed):
    """The same convs along the batch dim: no dim can be dynamic."""

    def forward(self, x):  # [24, B]
        return self.fc(torch.flatten(self.convs(x.t().unsqueeze(1)), 1))


def test_export_frontend_keeps_the_batch_dynamic_when_other_dims_cannot_be(pb):
    m, x = LengthFixed().eval(), torch.randn(3, 24)
    gm = trace(m, (x,), frontend="export").eval()
    assert gm.meta["pbp_dynamic"] == "batch"
    for batch in (1, 5):
        y = torch.randn(batch, 24)
        assert pb.max_diff(gm(y), m(y)) == 0.0


def test_export_frontend_falls_back_to_static_shapes_on_the_same_inputs(pb):
    # torch.export marks the tensors it is given as dynamic: the static retry must not see those marks
    m, x = BatchFixed().eval(), torch.randn(24, 5)
    gm = trace(m, (x,), frontend="export").eval()
    assert gm.meta["pbp_dynamic"] == "static"
    assert pb.max_diff(gm(x), m(x)) == 0.0
    assert not [k for k in vars(x) if k.startswith("_dynamo")]


def test_export_failures_are_one_line_trace_errors():
    with pytest.raises(pbp_fx.TraceError) as info:
        trace(RootBranch(), (torch.randn(2, 3),), parts=False)
    msg = str(info.value)
    assert "\n" not in msg and "torch.export failed too" in msg
    with pytest.raises(pbp_fx.TraceError, match="torch.export cannot export RootBranch"):
        trace(RootBranch(), (torch.randn(2, 3),), frontend="export")


def test_an_output_torch_export_cannot_flatten_is_named_without_a_made_up_line():
    """The message named "<string>:1" (a dataclass's generated __init__) and torch's pytree report."""
    import dataclasses

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor

    class ReturnsOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return Out(self.fc(x))

    with pytest.raises(pbp_fx.TraceError, match=r"^torch.export cannot export ReturnsOut \(forward returns Out, a type "
                                                r"torch.export cannot flatten: .*register_dataclass\(Out\)\)\)") as info:
        trace(ReturnsOut(), (torch.randn(2, 3),), frontend="export")
    assert "<string>" not in str(info.value) and "\n" not in str(info.value)


def test_captures_leave_no_tensor_constants_on_the_model():
    """fx stores a forward's tensor constants on the traced root: trace and perforate left
    `_tensor_constant0` on the user's model."""
    class Consts(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) + torch.tensor([1.0, 2.0, 3.0])

    m, x = Consts(), torch.randn(2, 3)
    gm = trace(m, (x,), frontend="fx")
    assert gm.meta["pbp_modes"] == "train+eval"
    pm = pbp_fx.perforate(m, (x,), frontend="fx")
    assert not [k for k in vars(m) if k.startswith("_tensor_constant")]
    assert torch.equal(gm(x), m(x)) and torch.equal(pm(x), m(x)) and torch.equal(pm.finalize()(x), m(x))


def test_dynamic_batch_keeps_other_dims_static_where_every_dim_could_be_dynamic(pb):
    m, x = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval(), torch.randn(3, 6, 4)
    every = pbp_fx.perforate(m, (x,), frontend="export").eval()
    batch = pbp_fx.perforate(m, (x,), frontend="export", dynamic="batch").eval()
    assert every.graph_module.meta["pbp_dynamic"] == "auto"
    assert batch.graph_module.meta["pbp_dynamic"] == "batch"
    for shape in ((1, 6, 4), (5, 6, 4)):
        y = torch.randn(*shape)
        assert pb.max_diff(batch(y), m(y)) == 0.0
    y = torch.randn(2, 9, 4)  # another length: only the every-dim capture accepts it
    assert pb.max_diff(every(y), m(y)) == 0.0
    with pytest.raises(Exception):
        batch(y)
    with pytest.raises(ValueError, match="dynamic='length'.*'batch'"):
        pbp_fx.perforate(m, (x,), dynamic="length")


class _MyLinear(nn.Module):
    """A Linear from outside torch.nn (like Hugging Face's Conv1D): addmm with a [in, out] weight."""

    def __init__(self, i, o):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(i, o) * 0.1)
        self.bias = nn.Parameter(torch.zeros(o))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class _WithMyLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _MyLinear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_a_linear_layer_from_outside_torch_nn_counts_as_a_neuron_to_reach():
    """Where symbolic tracing does not reach it as a site, auto sees its weight unreached and takes export."""
    x = torch.randn(4, 8)
    pm = pbp_fx.perforate(_WithMyLinear(), (x,))
    assert list(pm.sites) == ["a", "b"]
    rows = {r.name: r.status for r in pbp_fx.explain_sites(_WithMyLinear(), (x,))}
    assert rows == {"a": "site", "b": "site"}


class _RunningMean(nn.Module):
    """The forward writes buffers of its own: a running input mean and a call counter."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        self.register_buffer("mu", torch.zeros(4))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.mu.mul_(0.9).add_(0.1 * x.mean(0).detach())
        self.calls.add_(1)
        return self.fc2(torch.relu(self.bn(self.fc1(x - self.mu))))


def test_a_forward_that_writes_its_own_buffers_is_captured_by_export():
    """Symbolic tracing would run those writes once while tracing (or drop them): auto takes export,
    and the perforated model keeps updating them as the original does."""
    model, ref = _RunningMean(), _RunningMean()
    ref.load_state_dict(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = pbp_fx.perforate(model, (torch.randn(3, 4),))
    assert pm.graph_module.meta["pbp_frontend"] == "export"
    assert "writes buffer(s) mu, calls" in pm.graph_module.meta["pbp_frontend_choice"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # the probe left no trace
    x = torch.ones(5, 4)
    for _ in range(3):
        got, want = pm(x), ref(x)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(pm.graph_module.mu, ref.mu) and int(pm.graph_module.calls) == int(ref.calls)



class _FillsFromNone(nn.Module):
    """A cache registered as None, filled at the first call."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("cache", None)

    def forward(self, x):
        if self.cache is None:
            self.cache = x.detach().mean(0)
        return self.fc(x) + self.cache


class _DeletesOnce(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("once", torch.full((4,), 2.0))

    def forward(self, x):
        y = self.fc(x)
        if hasattr(self, "once"):
            y = y + self.once
            del self.once
        return y


class _SetsNone(_DeletesOnce):
    def forward(self, x):
        y = self.fc(x)
        if self.once is not None:
            y = y + self.once
            self.once = None
        return y


@pytest.mark.parametrize("frontend", ["auto", "fx", "export"])
@pytest.mark.parametrize("cls", [_FillsFromNone, _DeletesOnce, _SetsNone])
def test_a_forward_that_fills_deletes_or_unsets_a_buffer_leaves_the_model_as_it_was(cls, frontend):
    """Capture runs the forward; a buffer table it changes (named_buffers() lists no None) is put
    back after each capture: the model keeps its table, the perforated model's first call is the
    model's, and the user is told that no graph keeps such a change. torch.export, which writes a
    buffer filled from None into the input, is refused there (auto falls back to fx)."""
    torch.manual_seed(0)
    model, ref = cls(), cls()
    ref.load_state_dict(model.state_dict())
    table = dict(model._buffers)
    example, x = torch.randn(3, 4) * 5, torch.randn(3, 4)
    if cls is not _DeletesOnce and frontend == "export":  # (torch.export fails on _SetsNone itself)
        refused = "fills buffer 'cache', registered as None, with a tensor.*torch.zeros" if cls is _FillsFromNone else ""
        with pytest.raises(TraceError, match=refused):
            pbp_fx.perforate(model, (example,), frontend=frontend)
        assert all(a is b for a, b in zip(dict(model._buffers).values(), table.values()))
        return
    with pytest.warns(UserWarning, match=r"deletes, registers, fills from None or sets to None buffer\(s\) (cache|once)"):
        pm = pbp_fx.perforate(model, (example,), frontend=frontend)
    assert dict(model._buffers).keys() == table.keys()
    assert all(a is b for a, b in zip(dict(model._buffers).values(), table.values()))
    x0 = x.clone()
    assert torch.allclose(pm(x), ref(x), atol=1e-6)
    assert torch.equal(x, x0)



class _CachesAConstant(nn.Module):
    """A constant table made at the first call (a cached mask): filled from None, or registered."""

    def __init__(self, registers: bool):
        super().__init__()
        self.fc, self.registers = nn.Linear(4, 4), registers
        if not registers:
            self.register_buffer("cache", None)

    def forward(self, x):
        if self.registers and not hasattr(self, "cache"):
            self.register_buffer("cache", torch.full((4,), 3.0))
        elif not self.registers and self.cache is None:
            self.cache = torch.full((4,), 3.0)
        return self.fc(x) + self.cache


@pytest.mark.parametrize("frontend", ["auto", "fx", "export"])
@pytest.mark.parametrize("registers", [False, True])
def test_a_constant_table_made_at_the_first_call_is_captured(registers, frontend):
    """The graph reads the table the trace made: putting the model's buffers back before fx built its
    graph module lost it ('unsupported operand ... NoneType', blamed on the example inputs)."""
    model = nn.Sequential(_CachesAConstant(registers), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    if frontend == "export" and not registers:  # (torch.export writes the filled table into x)
        with pytest.raises(TraceError, match="fills buffer '0.cache', registered as None"):
            pbp_fx.perforate(model, (x,), frontend=frontend)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = pbp_fx.perforate(model, (x,), frontend=frontend)
    assert not hasattr(model[0], "cache") if registers else model[0].cache is None
    torch.testing.assert_close(pm(x), model(x))
    torch.testing.assert_close(pm(x), model(x))


class _ScaledByKeyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, **kwargs):
        return self.fc(x) * kwargs["scale"]


def test_a_tensor_through_var_keywords_keeps_a_dynamic_capture():
    """torch.export cannot take dynamic shapes for a **kwargs parameter: the capture names the
    keyword as a parameter of its own, so the graph stays dynamic (it was static, and a call with
    another batch failed)."""
    model = _ScaledByKeyword()
    pm = pbp_fx.perforate(model, (torch.randn(4, 4),), example_kwargs={"scale": torch.randn(4, 4)},
                          frontend="export")
    assert pm.graph_module.meta["pbp_dynamic"] == "auto" and list(pm.sites) == ["fc"]
    assert "forward" not in vars(model)
    x, scale = torch.randn(7, 4), torch.randn(7, 4)
    assert torch.allclose(pm(x, scale=scale), model(x, scale=scale))


class _Lookup(nn.Module):
    """A codebook: a 2-D weight read by indexing, no bias (not a Linear)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 4))

    def forward(self, idx):
        return self.weight[idx]


class _WithCodebookAndNaN(nn.Module):
    def __init__(self):
        super().__init__()
        self.cb, self.fc = _Lookup(), nn.Linear(4, 2)
        self.register_buffer("fill", torch.tensor(float("nan")))  # read-only: never written

    def forward(self, idx):
        return self.fc(self.cb(idx))


def test_a_lookup_table_and_a_nan_buffer_do_not_send_auto_to_export():
    pm = pbp_fx.perforate(_WithCodebookAndNaN(), (torch.tensor([1, 2, 3]),))
    meta = pm.graph_module.meta
    assert meta["pbp_frontend"] == "fx" and "pbp_frontend_choice" not in meta and list(pm.sites) == ["fc"]


class _KeywordOnlyAfterDefault(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.emb = nn.Linear(6, 4), nn.Embedding(5, 4)

    def forward(self, feats, mask=None, *, ids):
        h = self.fc(feats) + self.emb(ids)
        return h if mask is None else h * mask


def test_a_signature_fx_cannot_write_back_falls_back_to_export():
    """fx generated `def forward(self, feats, mask = None, ids)` (a SyntaxError): auto ended in a
    traceback instead of trying torch.export."""
    model = _KeywordOnlyAfterDefault()
    kwargs = {"feats": torch.randn(3, 6), "ids": torch.randint(0, 5, (3,))}
    with pytest.raises(TraceError, match="fx cannot write .*signature.*frontend='export'") as err:
        pbp_fx.perforate(model, example_kwargs=kwargs, frontend="fx")
    assert "\n" not in str(err.value)
    pm = pbp_fx.perforate(model, example_kwargs=kwargs)
    assert pm.graph_module.meta["pbp_frontend"] == "export"
    torch.testing.assert_close(pm(**kwargs), model(**kwargs))


class _ScaledInEval(nn.Module):
    """Branches on the mode in its own forward, in a way the merge of two captures cannot follow."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        h = self.fc(x)
        return h if self.training else h * 2


class _DropPathDivided(nn.Module):
    def forward(self, x):
        if not self.training:
            return x
        mask = x.new_empty(x.shape[0], 1).bernoulli_(0.7)
        return x * mask / 0.7


class _ModeBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.drop, self.head = _ScaledInEval(), _DropPathDivided(), nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.relu(self.drop(self.inner(x))))


@pytest.mark.parametrize("frontend", ["auto", "fx"])
def test_a_submodule_branching_on_its_mode_is_kept_whole_and_follows_the_mode(frontend):
    torch.manual_seed(0)
    model, x = _ModeBranches(), torch.randn(8, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no one-mode warning
        pm = pbp_fx.perforate(model, x, frontend=frontend)
    assert pm.graph_module.meta["pbp_mode_leaves"] == ["inner"]  # (the drop path merges: `x * mask / keep`)
    assert list(pm.sites) == ["head", "inner.fc"]  # the kept-whole module's neuron is a site too
    for training in (True, False):
        model.train(training), pm.train(training)
        torch.manual_seed(1)
        want = model(x)
        torch.manual_seed(1)
        torch.testing.assert_close(pm(x), want, rtol=0, atol=0)
    pm.start_dendrite_phase()
    pm.install_candidates(v_init=0.5)
    pm.eval()
    torch.testing.assert_close(pm.finalize()(x), pm(x))


class _CountsItsCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("scale", torch.ones(2))  # read, never written

    def forward(self, x):
        self.calls += 1
        return self.fc(x) * self.scale


def test_frontend_fx_warns_of_a_buffer_the_forward_writes(recwarn):
    """frontend='fx' dropped `self.calls += 1` without a word (auto picks torch.export, which keeps it)."""
    model, x = _CountsItsCalls(), torch.randn(3, 4)
    with pytest.warns(UserWarning, match=r"forward writes buffer\(s\) calls, which symbolic tracing drops"):
        trace(model, (x,), frontend="fx")
    assert int(model.calls) == 0  # the check runs the model once and restores its buffers
    recwarn.clear()
    gm = trace(model, (x,), frontend="auto")
    assert gm.meta["pbp_frontend"] == "export" and not [w for w in recwarn if "writes buffer" in str(w.message)]


class _Decays(nn.Module):
    """A running mean updated in a chain (`mul_` then `add_`) or by one op, in train mode only."""

    def __init__(self, chained: bool):
        super().__init__()
        self.chained = chained
        self.body, self.head = nn.Linear(6, 16), nn.Linear(16, 3)
        self.register_buffer("ema", torch.zeros(16))

    def forward(self, x):
        h = torch.relu(self.body(x))
        if self.training:
            new = 0.1 * h.detach().mean(0)
            self.ema.mul_(0.9).add_(new) if self.chained else self.ema.add_(new)
        return self.head(h - self.ema)


def test_a_buffer_update_fx_records_in_part_is_taken_out_as_the_warning_says():
    """fx ran the chain's `mul_` once while tracing and recorded the `add_` alone: the graph's running mean grew
    without its decay (the outputs 2e-3 off after 4 calls), while the warning said it was not updated at all."""
    model, x = _Decays(chained=True), torch.randn(3, 6)
    with pytest.warns(pbp_fx.PBWarning, match=r"writes buffer\(s\) ema, .*the perforated model will not update them"):
        pm = pbp_fx.perforate(model, (x,), frontend="fx")
    frozen = copy.deepcopy(model)
    frozen.train()
    pm.train()
    for _ in range(4):
        xi = torch.randn(3, 6)
        got = pm(xi)
    assert not pm.graph_module.ema.any()  # (not updated: as said)
    with torch.no_grad():
        want = frozen.head(torch.relu(frozen.body(xi)) - frozen.ema.zero_())
    torch.testing.assert_close(got, want)


def test_a_buffer_update_fx_records_whole_is_kept_and_not_warned_of(recwarn):
    """`self.ema.add_(x)` with a traced operand is in fx's graph whole: it was warned of as not updated."""
    model, x = _Decays(chained=False), torch.randn(3, 6)
    pm = pbp_fx.perforate(model, (x,), frontend="fx")
    assert not [w for w in recwarn if "writes buffer" in str(w.message)]
    ref = copy.deepcopy(model)
    ref.train()
    pm.train()
    for _ in range(3):
        xi = torch.randn(3, 6)
        torch.testing.assert_close(pm(xi), ref(xi))
    torch.testing.assert_close(pm.graph_module.ema, ref.ema)


class _DecaysWithRest(_Decays):
    def forward(self, x, *rest, **extra):  # (the graph's call packs neither: the check called it as fx's ShapeProp)
        return super().forward(x) + rest[0]


class _SharedRunningMean(nn.Module):
    """One buffer under two names (b.ema is a.ema), written by one op with a traced operand."""

    def __init__(self):
        super().__init__()
        self.b = nn.Module()  # (first: the model names the tensor b.ema, the graph a.ema)
        self.b.register_buffer("ema", torch.zeros(16))
        self.a = _Decays(chained=False)
        self.a.ema = self.b.ema

    def forward(self, x):
        return self.a(x)


@pytest.mark.parametrize("kind", ["rest", "shared"])
def test_a_buffer_write_fx_keeps_whole_stays_for_star_inputs_and_shared_buffers(recwarn, capfd, kind):
    """`forward(self, x, *rest)` / `**extra`: the check called the graph with *rest packed in a tuple, failed (fx's
    24-line frame on stderr) and took the graph's correct write out; a buffer two modules share was looked up
    under a name the graph does not hold (a reviewer)."""
    model = _DecaysWithRest(chained=False) if kind == "rest" else _SharedRunningMean()
    args = (torch.randn(3, 6), torch.randn(3, 3)) if kind == "rest" else (torch.randn(3, 6),)
    pm = pbp_fx.perforate(model, args, frontend="fx")
    assert not [w for w in recwarn if "writes buffer" in str(w.message)]
    assert capfd.readouterr().err == ""
    ref = copy.deepcopy(model)
    ref.train()
    pm.train()
    for _ in range(3):
        xs = tuple(torch.randn_like(a) for a in args)
        torch.testing.assert_close(pm(*xs), ref(*xs))


class _InputMean(nn.Module):
    """Subtracts a running input mean that it updates in train mode (fx keeps it whole: it reads .training)."""

    def __init__(self, d):
        super().__init__()
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.9).add_(0.1 * x.mean(0))
                self.steps += 1
        return x - self.mean


class _SpectralHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc = _InputMean(4), nn.utils.parametrizations.spectral_norm(nn.Linear(4, 3))

    def forward(self, x):
        return self.fc(self.norm(x))


def test_buffers_written_by_a_module_the_graph_calls_whole_are_kept(recwarn):
    """A module kept whole and spectral_norm's parametrization (_u, _v) run their own forward in the graph:
    fx (and load, which captures as saved) warned that it dropped their writes, and auto tried torch.export."""
    model, x = _SpectralHead(), torch.randn(3, 4)
    ref = copy.deepcopy(model)
    pm = pbp_fx.perforate(model, (x,), frontend="fx")
    assert not [w for w in recwarn if "writes buffer" in str(w.message)]
    for _ in range(3):
        got, want = pm(x), ref(x)
    torch.testing.assert_close(got, want)
    buffers = dict(pm.graph_module.named_buffers())
    assert all(torch.equal(buffers[k], b) for k, b in ref.named_buffers())
    gm = trace(nn.Sequential(_InputMean(4), nn.Linear(4, 3)), (x,))
    assert gm.meta["pbp_frontend"] == "fx" and "pbp_frontend_choice" not in gm.meta


class _FrozenFeatures(nn.Module):
    """A feature layer run under torch.no_grad (frozen by the forward itself), a head that trains;
    with autocast=True the head runs under CPU autocast instead."""

    def __init__(self, autocast: bool = False):
        super().__init__()
        self.feat, self.head, self.autocast = nn.Linear(8, 4), nn.Linear(4, 3), autocast

    def forward(self, x):
        if self.autocast:
            h = torch.relu(self.feat(x))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.head(h).float()
        with torch.no_grad():
            h = torch.relu(self.feat(x))
        return self.head(h)


def test_a_forward_that_switches_grad_mode_is_captured_by_export_and_keeps_its_layer_frozen():
    """Symbolic tracing records no grad-mode switch: the auto graph trained the layer the model runs
    under no_grad (and `compare` credited PB with the difference)."""
    torch.manual_seed(0)
    model, x = _FrozenFeatures(), torch.randn(5, 8)
    pm = pbp_fx.perforate(model, (x,))
    assert pm.graph_module.meta["pbp_frontend"] == "export"
    assert "switches grad mode" in pm.graph_module.meta["pbp_frontend_choice"]
    pm(x).sum().backward()
    params = dict(pm.named_parameters())
    assert params["graph_module.feat.weight"].grad is None and params["graph_module.head.weight"].grad is not None
    assert list(pm.sites) == ["head"]  # (a layer under no_grad is no site: its dendrites would not train)


def test_a_forward_that_switches_autocast_is_captured_by_export_exactly():
    torch.manual_seed(0)
    model, x = _FrozenFeatures(autocast=True), torch.randn(5, 8)
    pm = pbp_fx.perforate(model, (x,))
    assert pm.graph_module.meta["pbp_frontend"] == "export"
    assert torch.equal(pm(x), model(x))


@pytest.mark.parametrize("caller", ["no_grad", "autocast"])
def test_a_forwards_grad_mode_switch_is_seen_whatever_mode_perforate_runs_in(caller):
    """Under a caller's torch.no_grad the forward's own no_grad changed nothing while tracing: fx's graph
    was kept (and torch.export's, captured in the caller's mode, lost the region too)."""
    torch.manual_seed(0)
    model, x = _FrozenFeatures(), torch.randn(5, 8)
    around = torch.no_grad() if caller == "no_grad" else torch.autocast("cpu", dtype=torch.bfloat16)
    with around:
        pm = pbp_fx.perforate(model, (x,))
    assert pm.graph_module.meta["pbp_frontend"] == "export" and list(pm.sites) == ["head"]
    pm(x).sum().backward()
    assert dict(pm.named_parameters())["graph_module.feat.weight"].grad is None


def test_an_autocast_off_region_is_seen_and_its_lost_sites_are_said():
    """`with torch.autocast("cpu", enabled=False):` outside any autocast changes no enabled flag: only the
    region's nesting shows it. torch.export keeps it, and wraps its layers, which are then no sites."""
    class Fp32Island(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(4, 3)

        def forward(self, x):
            with torch.autocast("cpu", enabled=False):
                h = torch.relu(self.a(x.float()))
            return self.b(h)

    with pytest.warns(UserWarning, match=r"forward switches autocast, which only torch.export keeps: its graph is "
                                         r"used, where 1 layer\(s\) inside a switched region are no sites"):
        pm = pbp_fx.perforate(Fp32Island(), (torch.randn(5, 8),))
    assert pm.graph_module.meta["pbp_frontend"] == "export" and list(pm.sites) == ["b"]


def test_frontend_fx_warns_of_a_grad_mode_switch_it_drops():
    with pytest.warns(UserWarning, match=r"forward switches grad mode \(torch.no_grad, .*\) around some of its ops, "
                                         r"which symbolic tracing does not record.*use frontend='export'"):
        gm = trace(_FrozenFeatures(), (torch.randn(5, 8),), frontend="fx")
    assert gm.meta["pbp_switched_modes"]
    with warnings.catch_warnings():  # outside the forward, a caller's no_grad is no switch
        warnings.simplefilter("error")
        with torch.no_grad():
            trace(nn.Sequential(nn.Linear(3, 2)), (torch.randn(2, 3),), frontend="fx")


@pytest.mark.parametrize("frontend", ["auto", "fx", "export"])
def test_inputs_named_input_and_input_1_are_refused_not_read_twice(frontend):
    """forward(self, input, input_1): fx's code wrote `input_1 = input`, so the model read its first input
    twice (0.56 off the original, with 0 dendrites), under every frontend."""
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, input, input_1):
            return self.fc(input) + self.fc(input_1)

    with pytest.raises(TraceError, match="inputs 'input' and 'input_1' collide .*: rename the input 'input_1'"):
        trace(Two(), (torch.randn(2, 4), torch.randn(2, 4)), frontend=frontend)
    gm = trace(nn.Sequential(nn.Linear(4, 3)), (torch.randn(2, 4),), frontend=frontend)  # `input` alone: fine
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["input"]


def _decorated(forward):
    """A model named Decorated with one Linear(4, 4), `fc`, and `forward` (decorated) as its forward."""
    class Decorated(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    Decorated.forward = forward
    return Decorated


def test_a_decorated_forward_fx_cannot_trace_names_the_decorator_and_the_fix():
    """transformers 5 wraps forward in decorators: fx failed with 'co_varnames is too small ... at
    <unknown line>: move it into a submodule', which named neither cause nor fix."""
    import functools

    def passes_through(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            return f(*args, **kwargs)
        return wrapper

    def forward(self, x, mask=None, **kwargs):
        return self.fc(x)

    Decorated = _decorated(passes_through(forward))

    with pytest.raises(pbp_fx.TraceError, match=r"torch.fx cannot trace Decorated.forward, which a decorator wraps "
                                                r"\(.*\): capture it with frontend='export'") as info:
        pbp_fx.perforate(Decorated(), torch.zeros(2, 4), frontend="fx")
    assert "unknown line" not in str(info.value)
    assert len(pbp_fx.perforate(Decorated(), torch.zeros(2, 4)).sites) == 1  # (auto: export takes it)


class _Augmented(nn.Module):
    """`+=` / `*=` on a tensor whose old value another name still reads afterwards (the "read
    after" kinds), or on a tensor of its own (the others: fx's graph is exact there)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.fc, self.drop, self.out = kind, nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 2)
        self.ident, self.attn = nn.Identity(), nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        h, k = self.drop(torch.relu(self.fc(x))), self.kind
        # read after: a view, an attribute view, a module or a dropout returning its input, a split's piece
        if k in ("alias", "view", "T", "identity", "dropout", "split", "ravel", "relu_", "torch.relu_"):
            y = {"alias": lambda: h, "view": lambda: h[:, :2], "T": lambda: h.T, "identity": lambda: self.ident(h),
                 "dropout": lambda: F.dropout(h, 0.5, self.training), "split": lambda: h.split(2, 1)[0],
                 "ravel": lambda: h.ravel(), "relu_": lambda: h.relu_(), "torch.relu_": lambda: torch.relu_(h)}[k]()
            y *= 3
            return self.out(h)
        if k == "last":  # h[-1] is h[0] where dim 0 has one entry
            t = h.unsqueeze(0)
            y = t[-1]
            y *= 3
            return self.out(t[0])
        # tensors of their own: an item of a tuple output, other items of one tensor, copies
        if k == "attention":
            out, w = self.attn(h.unsqueeze(1), h.unsqueeze(1), h.unsqueeze(1))
            out += 1
            return self.out(out.squeeze(1)) + w.sum()
        if k == "max":
            v, i = h.max(-1)
            v += 1
            return self.out(h) + v.unsqueeze(-1) + i.unsqueeze(-1)
        if k == "items":
            qk = h.view(-1, 2, 2).transpose(0, 1)
            q, kk = qk[0], qk[1]
            q *= 2
            return self.out(torch.cat([q, kk], 1))
        if k == "gather":
            e = h[torch.tensor([1, 0, 2])]
            e += 1
            return self.out(h[:3] + e)
        h += x  # a residual: the old value is not read again
        return self.out(h)


_READ_AFTER = ["alias", "view", "T", "identity", "dropout", "split", "ravel", "relu_", "torch.relu_", "last"]


@pytest.mark.parametrize("kind", _READ_AFTER)
def test_an_augmented_assignment_read_after_under_another_name_is_not_traced_as_a_new_tensor(kind):
    """fx traces `y += 1` as `y + 1`: the graph read h from before the change and the perforated
    model computed otherwise than the model (0.5 off), without an error."""
    x, model = torch.randn(3, 4), _Augmented(kind).eval()
    with pytest.raises(TraceError, match=r"test_tracing.py:\d+: `\*=` changes a tensor in place that the model "
                                         r"reads after it .* use frontend='export'"):
        pbp_fx.perforate(model, (x,), frontend="fx")
    if kind == "split":  # (torch.export refuses an in-place change of one of several views: the same reason)
        with pytest.raises(TraceError, match="changes a tensor in place"):
            pbp_fx.perforate(model, (x,))
        return
    pm = pbp_fx.perforate(model, (x,))  # auto: torch.export, which keeps the change
    assert pm.graph_module.meta["pbp_frontend"] == "export"
    pm.eval()
    with torch.no_grad():
        assert torch.allclose(pm(x), model(x), atol=1e-6)


@pytest.mark.parametrize("kind", ["residual", "attention", "max", "items", "gather"])
def test_an_augmented_assignment_on_a_tensor_of_its_own_keeps_the_fx_graph(kind):
    """A review of the check: an item of a tuple output (attention, max), another item of one
    tensor (q, k, v of qkv) and an advanced-indexing copy were refused as aliases."""
    x, model = torch.randn(3, 4), _Augmented(kind).eval()
    pm = pbp_fx.perforate(model, (x,), frontend="fx")
    assert pm.graph_module.meta["pbp_frontend"] == "fx"
    pm.eval()
    with torch.no_grad():
        assert torch.allclose(pm(x), model(x), atol=1e-6)


class _RunningCenter(nn.Module):
    """Writes its own buffer in train mode only: auto takes torch.export, which follows one mode."""

    def __init__(self):
        super().__init__()
        self.f, self.o = nn.Linear(8, 8), nn.Linear(8, 2)
        self.register_buffer("mean", torch.zeros(8))

    def forward(self, x):
        h = self.f(x)
        if self.training:
            self.mean.mul_(0.9).add_(0.1 * h.detach().mean(0))
        return self.o(torch.relu(h - self.mean))


def test_an_attribute_updated_in_place_is_not_taken_for_one_value_read_twice():
    """Taking every read of one attribute for the same value merged this model's fx captures, and the merged
    graph dropped the update's mul_(0.9): its running mean drifted from the model's at the second step."""
    with pytest.warns(pbp_fx.PBWarning, match="the graph follows train mode whatever"):
        gm = trace(_RunningCenter(), (torch.randn(4, 8),), frontend="fx")
    assert gm.meta["pbp_modes"] == "train"


def test_auto_warns_that_the_export_graph_it_chose_follows_one_mode():
    """The export attempt's warnings were silenced whether or not its graph was chosen: pm.eval()
    then ran the train path (buffer updates included) with no word said."""
    # (its advice was "trace the model in the mode you will use it in", which a PB run, trained then evaluated,
    # cannot follow; the submodule fix was offered under fx only: a reviewer)
    with pytest.warns(pbp_fx.PBWarning, match=r"the graph follows train mode whatever .*: move the code that depends "
                                              r"on the mode into a submodule and capture with frontend 'fx'.*it needs "
                                              r"both\)$"):
        pm = pbp_fx.perforate(_RunningCenter(), (torch.randn(4, 8),))
    assert pm.graph_module.meta["pbp_frontend"] == "export" and pm.graph_module.meta["pbp_modes"] == "train"


def test_a_decorator_that_fails_under_fx_at_its_own_line_is_named():
    """transformers' can_return_tuple fails under fx at its own line ("'NoneType' object has no attribute
    'pop'"): the error named neither the decorator nor the fix."""
    import functools

    def pops_a_flag(f):
        @functools.wraps(f)
        def wrapper(self, *args, **kwargs):
            flag = kwargs.pop("return_dict", None)
            out = f(self, *args, **kwargs)
            return out if flag is None else (out,)
        return wrapper

    def forward(self, x, mask=None, **kwargs):
        return self.fc(x)

    Decorated = _decorated(pops_a_flag(forward))

    with pytest.raises(pbp_fx.TraceError, match=r"torch.fx cannot trace Decorated.forward, which a decorator wraps "
                                                r"\('NoneType' object has no attribute 'pop' at .*test_tracing.py:\d+\): "
                                                r"capture it with frontend='export'"):
        trace(Decorated(), (torch.zeros(2, 4),), frontend="fx")


class _ScaledByAConstant(nn.Module):
    """A frozen encoder of modules only (fx keeps them whole: nothing to warn of), a forward that makes a
    tensor constant, and a plain module in eval mode too."""

    def __init__(self):
        super().__init__()
        self.act, self.enc, self.head = nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.act(self.enc(x)) * torch.tensor([2.0]))


def test_the_mixed_modes_check_sees_no_difference_in_numbered_constants_and_leaves_none_behind(recwarn):
    """A second capture numbers its tensor constant on (_tensor_constant1): the check warned of a model without
    mode-dependent code, and left the constant on the model."""
    model = _ScaledByAConstant()
    model.act.eval(), model.enc.eval()
    before = set(model.__dict__)
    trace(model, (torch.randn(3, 4),), frontend="fx")
    assert not [w for w in recwarn if "mode-dependent code" in str(w.message)]
    assert not {n for n in set(model.__dict__) - before if n.startswith("_tensor_constant")}


class _FrozenDropoutAmongPlainModules(nn.Module):
    def __init__(self):
        super().__init__()
        self.a1, self.a2, self.a3, self.enc, self.head = nn.ReLU(), nn.ReLU(), nn.ReLU(), FunctionalDropout(), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.enc(self.a3(self.a2(self.a1(x)))))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_the_mixed_modes_warning_names_the_module_that_holds_the_mode_dependent_code(frontend):
    """It named every module in the other mode, plain ReLUs first, and the one that mattered behind "..."."""
    model = _FrozenDropoutAmongPlainModules()
    for m in (model.a1, model.a2, model.a3, model.enc):
        m.eval()
    with pytest.warns(UserWarning, match=r"_FrozenDropoutAmongPlainModules: enc is in eval mode under a model in "
                                         r"train mode"):
        trace(model, (torch.randn(3, 4),), frontend=frontend)


def test_a_decorator_is_not_blamed_for_a_failure_in_forwards_own_body():
    import functools

    def passes_through(f):
        @functools.wraps(f)
        def wrapper(self, x):
            return f(self, x)
        return wrapper

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: fx fails here, in forward's own body
            x = -x
        return self.fc(x)

    Decorated = _decorated(passes_through(forward))

    with pytest.raises(pbp_fx.TraceError, match=r"cannot trace Decorated.forward \(symbolically traced variables "
                                                r"cannot be used as inputs to control flow\) at .*test_tracing.py"):
        trace(Decorated(), (torch.zeros(2, 4),), frontend="fx")


class _Out:
    def __init__(self, y):
        self.y = y


class _ReturnsItsOwnType(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        for _ in range(int(x.shape[0])):  # fx: no int() of a proxy
            h = h + 0
        return _Out(self.b(h))  # torch.export: an output type it cannot flatten


def test_the_parts_warning_gives_torch_exports_short_reason():
    """It gave torch's pytree text ("... you need to register a pytree for it. See https://github.com/...")."""
    with pytest.warns(UserWarning, match=r"; torch.export: forward returns _Out, a type torch.export cannot flatten: "
                                         r"return tensors in a tuple or dict"):
        gm = trace(_ReturnsItsOwnType(), (torch.randn(2, 4),))
    assert gm.meta["pbp_frontend"] == "parts"


class _AlternatesEachCall(nn.Module):
    """Python state makes two captures differ (no mode in it)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * 2 if self.calls % 2 else x + 1


def test_the_mixed_modes_check_does_not_blame_a_frozen_module_for_a_difference_elsewhere(recwarn):
    """Captures that differ inside a module in the root's mode named the innocent frozen Linear."""
    model = nn.Sequential(nn.Linear(4, 4).eval(), _AlternatesEachCall(), nn.Linear(4, 2))
    trace(model, (torch.randn(3, 4),), frontend="fx")
    assert not [w for w in recwarn if "mode-dependent code" in str(w.message)]


def test_auto_does_not_try_torch_export_for_recurrent_weights_no_frontend_makes_sites_of():
    """auto took a GRU's weights for weights fx left unreached and ran torch.export to compare, which fixed
    the sequence length of every later ONNX export of a GRU in the process (a dynamic T came out fixed)."""
    class GRUHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.gru, self.head = nn.Linear(5, 8), nn.GRU(8, 12, batch_first=True), nn.Linear(12, 3)

        def forward(self, x):
            return self.head(self.gru(torch.relu(self.emb(x)))[0][:, -1])

    gm = trace(GRUHead(), (torch.randn(2, 5, 5),))
    assert gm.meta["pbp_frontend"] == "fx" and "pbp_frontend_choice" not in gm.meta


class _WeightNormedDecoder(nn.Module):
    """weight_norm / spectral_norm sites and a transposed conv, which is never a site."""

    def __init__(self):
        super().__init__()
        self.enc = nn.utils.parametrizations.weight_norm(nn.Conv2d(1, 4, 3, stride=2, padding=1))
        self.dec = nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1)
        self.head = nn.utils.parametrizations.spectral_norm(nn.Linear(4, 2))

    def forward(self, x):
        return self.head(torch.relu(self.dec(torch.relu(self.enc(x)))).mean((2, 3)))


def test_auto_does_not_try_torch_export_for_transposed_convs_or_parametrized_sites():
    """auto took a ConvTranspose2d's weight (never a site) and a weight_norm / spectral_norm site's originals
    (g, v) for weights fx left unreached, and ran torch.export to compare (perforate 0.05 s -> 2.8 s)."""
    gm = trace(_WeightNormedDecoder(), (torch.randn(2, 1, 8, 8),))
    assert gm.meta["pbp_frontend"] == "fx" and "pbp_frontend_choice" not in gm.meta
    assert [s.name for s in pbp_fx.explain_sites(_WeightNormedDecoder(), (torch.randn(2, 1, 8, 8),))
            if s.status == "site"] == ["enc", "head"]


class _ReassignedCount(nn.Module):
    """Counts its calls by reassigning its buffer (a new tensor each time); fx keeps it whole (it
    branches on a value)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x):
        if x.sum() > -1e9:
            self.n = self.n + 1
        return x * 2


def test_a_buffer_reassigned_inside_a_module_kept_whole_is_no_dropped_write(recwarn):
    """The check compared tensor ids: a reassigned buffer is a new tensor, so it was warned of as
    dropped (and auto tried torch.export), though the module's own forward updates it."""
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.count, self.b = nn.Linear(4, 4), _ReassignedCount(), nn.Linear(4, 2)
            self.register_buffer("scale", torch.ones(()))  # (read only: the check runs the model for it)

        def forward(self, x):
            return self.b(self.count(self.a(x))) * self.scale

    x = torch.randn(3, 4)
    pm = pbp_fx.perforate(Root(), (x,), frontend="fx")
    assert not [w for w in recwarn if "writes buffer" in str(w.message)]
    pm(x)
    pm(x)
    assert [b.item() for n, b in pm.named_buffers() if n.endswith("count.n")] == [2.0]


def test_a_buffer_of_a_module_shared_under_two_names_inside_a_whole_module_is_kept(recwarn):
    """Matched by the whole module's own paths (block.c.n), a buffer the model names by its first
    path (stats.n) read as a dropped write."""
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("n", torch.zeros(()))

        def forward(self, x):
            self.n.add_(1)
            return x

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c, self.fc = c, nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.c(x) if x.sum() > -1e9 else x)  # (a branch on a value: kept whole)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            counter = Counter()
            self.stats, self.block, self.head = counter, Block(counter), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(torch.relu(self.block(x)))

    pbp_fx.perforate(Shared(), (torch.randn(3, 4),), frontend="fx")
    assert not [w for w in recwarn if "writes buffer" in str(w.message)]


def test_auto_keeping_fx_though_the_forward_writes_a_buffer_says_so():
    """auto chose fx's graph, which drops `steps`, and said nothing (only --explain's choice line)."""
    from parts_models import CountsSteps

    with pytest.warns(UserWarning, match=r"CountsSteps.forward writes buffer\(s\) steps, which symbolic tracing drops "
                                         r"\(or runs once, while tracing\): auto keeps its graph, since torch.export's, "
                                         r"which keeps them, follows train mode only: the perforated model"):
        gm = trace(CountsSteps(), (torch.randn(4, 5),))
    assert gm.meta["pbp_frontend"] == "fx"


class _SizedOnFirstCall(nn.Module):
    """Sizes a cached table at its first call, on its layer's device (timm ConViT's GPSA.rel_indices)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.register_buffer("table", torch.zeros(1, 1, 3), persistent=False)

    def forward(self, x):
        if self.table.shape[1] != x.shape[1]:  # (symbolic tracing cannot take the branch: a leaf under fx)
            self.table = torch.arange(x.shape[1] * 3.0, device=self.fc.weight.device).reshape(1, -1, 3) + 1
        return self.fc(x + self.table)


class _HoldsSized(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.sized = nn.Linear(3, 3), _SizedOnFirstCall()

    def forward(self, x):
        return self.sized(self.inp(x))


class _BranchingHoldsSized(_HoldsSized):
    def forward(self, x):  # (untraceable at the root: captured in parts)
        h = self.inp(x)
        return self.sized(h if h.sum() > -1e9 else -h)


@pytest.mark.parametrize("model_class, frontend", [(_HoldsSized, "auto"), (_HoldsSized, "export"),
                                                   (_BranchingHoldsSized, "auto")])
def test_a_buffer_sized_at_the_first_call_is_put_back_as_it_was(model_class, frontend):
    """The capture's runs replaced the (1, 1, 3) table by a (1, 5, 3) one, and putting the old one back
    by copy broadcast its zeros into the new shape: the forward then kept an all-zero table as its own
    (ConViT 10 % off, no warning). Sized anew at the first call, the leaf reads its layer's weight,
    which a swapped-in site lacked."""
    torch.manual_seed(0)
    model, x = model_class().eval(), torch.randn(2, 5, 3)
    pm = pbp_fx.perforate(model, (x,), frontend=frontend)
    assert model.sized.table.shape == (1, 1, 3) and not model.sized.table.any()  # the user's model as it was
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x), rtol=0, atol=0)
    assert "sized.fc" in pm.sites


class _TwoSharingATable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.mid, self.b = _SizedOnFirstCall(), nn.Linear(4, 3), _SizedOnFirstCall()
        self.b.table = self.a.table

    def forward(self, x):
        return self.b(self.mid(torch.relu(self.a(x))))


@pytest.mark.parametrize("frontend", ["auto", "export"])
def test_a_buffer_two_modules_share_is_put_back_as_one_tensor_under_both_names(frontend):
    """Saved under its first name only, the second holder kept the forward's (1, 5, 3) table, and the
    first got a copy: the two modules no longer shared one tensor."""
    torch.manual_seed(0)
    model, x = _TwoSharingATable().eval(), torch.randn(2, 5, 3)
    table = model.a.table
    pm = pbp_fx.perforate(model, (x,), frontend=frontend)
    assert model.a.table is table and model.b.table is table and not table.any()
    held = {n: b for n, b in pm.named_buffers(remove_duplicate=False) if n.endswith("table")}
    assert [tuple(b.shape) for b in held.values()] == [(1, 1, 3)] * 2, held
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("frontend", ["auto", "export"])
def test_inputs_the_model_fails_on_are_named_as_the_inputs_fault_by_every_frontend(frontend):
    """frontend='export' said torch.export cannot export the model and told the user to change its code."""
    from pbp_fx import ExampleInputsError

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ExampleInputsError, match=r"^example inputs do not run through the model.*: mat1 and mat2 "
                                                 r"shapes cannot be multiplied .*\(check their shapes and dtypes "
                                                 r"against the model's forward\)$"):
        pbp_fx.perforate(model, (torch.randn(2, 5),), frontend=frontend)


class _Forces(nn.Module):
    """-dE/dx by autograd in its forward (a physics-informed net): runs, but not under no_grad."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 1)

    def forward(self, x):
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(self.fc(torch.tanh(x)).sum(), x, create_graph=True)
        return -g


def test_inputs_a_model_runs_on_are_not_blamed_for_an_export_failure():
    """The inputs check ran the model under no_grad, where this one fails: its inputs were blamed."""
    from pbp_fx.errors import ExampleInputsError

    with pytest.raises(TraceError, match=r"^torch.export cannot export _Forces") as err:
        pbp_fx.perforate(_Forces(), (torch.randn(4, 3),), frontend="export")
    assert not isinstance(err.value, ExampleInputsError)


class _PairedEncoder(nn.Module):
    """Two images through one conv as one batch, chunked back (RAFT's feature encoder)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, a, b):
        f1, f2 = torch.chunk(self.conv(torch.cat([a, b], 0)), 2, dim=0)
        return (f1 * f2).sum(1)


def test_a_graph_captured_at_a_batch_of_two_that_refuses_the_examples_batch_of_one_is_captured_static():
    """torch.export captures a batch of 1 at 2; the graph then guarded against a batch of 1, and the
    example itself was refused as 'example inputs do not run through the model'."""
    model = _PairedEncoder().eval()
    a, b = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    pm = pbp_fx.perforate(model, (a, b), frontend="export")
    assert pm.graph_module.meta["pbp_dynamic"] == "static"
    torch.testing.assert_close(pm(a, b), model(a, b))


class _CentresBatches(nn.Module):
    """Branches on the batch size (fx cannot trace it: torch.export captures it)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.a, self.drop, self.c = nn.Linear(6, 6), nn.Dropout(dropout), nn.Linear(6, 2)

    def forward(self, x):
        h = self.drop(F.relu(self.a(x)))
        if x.shape[0] > 1:
            h = h - h.mean(0, keepdim=True)
        return self.c(h)


def test_a_batch_branch_captured_from_a_batch_of_one_computes_the_models_outputs_on_it():
    """The example's batch of 1 ran as 2 for a dynamic batch: the graph kept the branch of 2 and the perforated
    model was 0.25 off the model on the example itself, with no word (a reviewer)."""
    model, x = _CentresBatches().eval(), torch.randn(1, 6)
    pm = pbp_fx.perforate(model, (x,))
    assert pm.graph_module.meta["pbp_frontend"] == "export" and pm.graph_module.meta["pbp_dynamic"] == "static"
    torch.testing.assert_close(pm(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False])
def test_dropout_alone_keeps_a_batch_of_one_capture_dynamic(training):
    """Both runs of the comparison draw the same dropout masks: a model with no batch branch is not made static."""
    class Dropped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.drop, self.c = nn.Linear(6, 6), nn.Dropout(0.5), nn.Linear(6, 2)

        def forward(self, x):
            h = self.drop(F.relu(self.a(x)))
            if x.shape[-1] == 6:  # (fx cannot trace it: torch.export captures it)
                h = F.dropout(h, 0.3, self.training)
            return self.c(h)

    with warnings.catch_warnings():
        warnings.simplefilter("error", pbp_fx.PBWarning)
        pm = pbp_fx.perforate(Dropped().train(training), (torch.randn(1, 6),))
    assert pm.graph_module.meta["pbp_frontend"] == "export" and pm.graph_module.meta["pbp_dynamic"] == "auto"
    assert "pbp_min_batch" not in pm.graph_module.meta


def test_a_batch_branch_that_a_dynamic_capture_cannot_guard_refuses_batches_of_one():
    """torch.export takes a dynamic batch to be 2 or more and keeps no guard for it: at a batch of 1 the
    perforated model was 0.40 off the model, with no word (a reviewer)."""
    model, x = _CentresBatches().eval(), torch.randn(3, 6)
    with pytest.warns(pbp_fx.PBWarning, match=r"^_CentresBatches's forward computes other outputs at a batch of 1 "
                                              r"than the graph torch.export captured at the example's batch of 3 .*"
                                              r"the perforated model and its ONNX file refuse batches of 1"):
        pm = pbp_fx.perforate(model, (x,))
    assert pm.graph_module.meta["pbp_min_batch"] == 2
    with pytest.raises(pbp_fx.CallError, match=r"^_CentresBatches's forward computes other outputs at a batch of 1 "
                                               r"than its graph, .*: call it with batches of 2 or more"):
        pm(torch.randn(1, 6))
    y = torch.randn(5, 6)
    torch.testing.assert_close(pm(y), model(y))


class _PaddedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Linear(8, 16), nn.Linear(16, 3)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0), 2,
                                         enable_nested_tensor=True)

    def forward(self, x, mask):
        return self.fc(self.enc(self.emb(x), src_key_padding_mask=mask))


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("batch", [1, 4])
def test_a_transformer_encoders_fast_path_is_not_taken_for_a_batch_branch(batch, frozen):
    """The check ran the model without grad, where nn.TransformerEncoder takes its nested-tensor fast path (zeros
    at padded positions): a batch-4 example refused batches of 1, a batch-1 one was captured static; a frozen
    encoder takes that path with grad too (reviewers)."""
    x, mask = torch.randn(batch, 6, 8), torch.zeros(batch, 6, dtype=torch.bool)
    mask[:, -2:] = True
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "computes other outputs", pbp_fx.PBWarning)
        pm = pbp_fx.perforate(_PaddedEncoder().eval().requires_grad_(not frozen), (x, mask), frontend="export")
    assert pm.graph_module.meta["pbp_dynamic"] == "auto" and "pbp_min_batch" not in pm.graph_module.meta


class _FeatureBranch(_CentresBatches):
    def forward(self, x):
        return self.c(F.relu(self.a(x)) * (1.0 if x.shape[-1] == 6 else 2.0))


def test_a_dynamic_capture_whose_batch_of_one_runs_alike_takes_batches_of_one():
    model = _FeatureBranch().eval()
    pm = pbp_fx.perforate(model, (torch.randn(3, 6),))
    assert pm.graph_module.meta["pbp_frontend"] == "export" and "pbp_min_batch" not in pm.graph_module.meta
    x = torch.randn(1, 6)
    torch.testing.assert_close(pm(x), model(x))


def test_a_torchscript_submodule_is_refused_in_one_line():
    """perforate and explain_sites failed with TorchScript's four-line TypeError from inside a buffer snapshot."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.fc = torch.jit.script(nn.Linear(6, 6)), nn.Linear(6, 2)

        def forward(self, x):
            return self.fc(self.inner(x))

    for call in (pbp_fx.perforate, pbp_fx.explain_sites):
        with pytest.raises(pbp_fx.TraceError, match=r"'inner' is a TorchScript module \(torch.jit.script, trace or "
                                                     r"freeze\): pbp-fx captures Python modules") as err:
            call(M(), (torch.randn(2, 6),))
        assert "\n" not in str(err.value)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g


class _MemoryEfficientSwish(torch.autograd.Function):
    """timm's *_me activations: a backward that is the forward's derivative, saving memory."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return g * s * (1 + x * (1 - s))


class _MemoryEfficientSwishNewStyle(_MemoryEfficientSwish):
    """The torch 2 style: forward without ctx, setup_context apart (the same backward)."""

    @staticmethod
    def forward(x):
        return x * torch.sigmoid(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])


class _StraightThroughRound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _LearnedStepQuantiser(torch.autograd.Function):
    """LSQ/PACT-style: a learned step fed to the Function directly (its gradient the forward's derivative),
    the activation passed straight through."""

    @staticmethod
    def forward(ctx, x, step):
        ctx.save_for_backward(x, step)
        return torch.round(x / step) * step

    @staticmethod
    def backward(ctx, g):
        x, step = ctx.saved_tensors
        return g, (g * torch.round(x / step)).sum().reshape(step.shape)  # (the step's: exact)


class _Quantised(nn.Module):
    def __init__(self):
        super().__init__()
        self.feat, self.head = nn.Linear(6, 8), nn.Linear(8, 2)
        self.step = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return self.head(_LearnedStepQuantiser.apply(self.feat(x), self.step))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_straight_through_input_beside_a_parameter_fed_to_the_function_is_warned_of(frontend):
    """Only the nearest leaf of a Function call was compared, here its own step, whose gradient matched: the
    straight-through gradient of feat (8.2 in the model, 0 perforated) went unsaid."""
    with pytest.warns(pbp_fx.PBWarning, match=r"^_Quantised runs torch.autograd.Function _LearnedStepQuantiser with "
                                              r"a backward of its own: .* its gradients differ"):
        pbp_fx.perforate(_Quantised(), (torch.randn(16, 6),), frontend=frontend)


def _with_function(function):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.feat, self.drop, self.head = nn.Linear(6, 8), nn.Dropout(0.3), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.drop(function.apply(self.feat(x))))

    return Net()


@pytest.mark.parametrize("function", [_MemoryEfficientSwish, _MemoryEfficientSwishNewStyle])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("frontend", ["fx", "export", "auto"])
def test_a_custom_backward_that_is_its_forwards_derivative_is_not_warned_of(frontend, dtype, function):
    """Every Function with a backward of its own was warned of (timm's memory-efficient activations, Bloom's
    GeLUFunction), and fx added that the forward 'switches grad mode' (Function.apply's own no_grad), which
    sent auto to torch.export. The capture's gradients are now compared with the model's on the example
    inputs (dropout in the model), to the precision of the model's dtype (bfloat16's two formulas differ
    by 5e-3)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", pbp_fx.PBWarning)
        pm = pbp_fx.perforate(_with_function(function).to(dtype), (torch.randn(64, 6, dtype=dtype),),
                              frontend=frontend)
    assert pm.graph_module.meta["pbp_frontend"] == ("fx" if frontend == "auto" else frontend)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_straight_through_estimator_is_warned_of_with_the_gradient_difference(frontend):
    with pytest.warns(pbp_fx.PBWarning, match=r"^Net runs torch.autograd.Function _StraightThroughRound with a "
                                              r"backward of its own: .* and on the example inputs its gradients "
                                              r"differ from the model's \(by [0-9.e+-]+ of the largest\)") as caught:
        pbp_fx.perforate(_with_function(_StraightThroughRound), (torch.randn(4, 6),), frontend=frontend)
    assert not [w for w in caught if "switches grad mode" in str(w.message)]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_custom_backward_the_capture_drops_is_warned_of(frontend):
    """A gradient-reversal layer's forward is captured, its backward dropped: the perforated model's gradients
    were the negatives of the model's, with no word."""
    class DANN(nn.Module):
        def __init__(self):
            super().__init__()
            self.feat, self.head = nn.Linear(6, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(_GradReverse.apply(torch.relu(self.feat(x))))

    with pytest.warns(pbp_fx.PBWarning, match=r"DANN runs torch.autograd.Function _GradReverse with a backward of its "
                                              r"own: the perforated model keeps its forward ops alone"):
        pbp_fx.perforate(DANN(), (torch.randn(2, 6),), frontend=frontend)
    plain = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", pbp_fx.PBWarning)  # (torch's own Functions, and none: no word)
        pbp_fx.perforate(plain, (torch.randn(2, 6),), frontend=frontend)


def test_a_straight_through_estimator_in_a_model_whose_parameters_are_all_frozen_is_warned_of():
    """The Function finder ran the model on the example as given: with every parameter frozen nothing required
    grad, no Function was seen, and the estimator that routes the site errors went unsaid (a reviewer)."""
    model = _with_function(_StraightThroughRound).requires_grad_(False)
    with pytest.warns(pbp_fx.PBWarning, match=r"^Net runs torch.autograd.Function _StraightThroughRound with a "
                                              r"backward of its own: .* its gradients differ"):
        pbp_fx.perforate(model, (torch.randn(16, 6),))


class _DoublesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.feat, self.head = nn.Linear(6, 8), nn.Linear(8, 2)

    def forward(self, x):
        x.mul_(2)  # (refuses a leaf that requires grad)
        return self.head(_StraightThroughRound.apply(self.feat(x)))


def test_a_custom_backward_in_a_model_that_writes_its_input_in_place_is_still_said():
    with pytest.warns(pbp_fx.PBWarning, match=r"^_DoublesItsInput runs torch.autograd.Function _StraightThroughRound "
                                              r"with a backward of its own"):
        pbp_fx.perforate(_DoublesItsInput(), (torch.randn(16, 6),))


def test_the_gradient_check_freezes_again_what_it_turned_and_leaves_inference_tensors():
    """A head loaded under inference_mode (which cannot require grad) broke the turning half way: the layers
    turned before it stayed trainable in the user's model (a reviewer)."""
    model = _with_function(_StraightThroughRound).requires_grad_(False)
    with torch.inference_mode():
        weight = torch.randn(2, 8)
    model.head.weight = nn.Parameter(weight, requires_grad=False)
    trace(model, (torch.randn(16, 6),), frontend="fx")  # (its forward with grad fails on that head: no check)
    assert not [n for n, p in model.named_parameters() if p.requires_grad]


class _RunningCentre(nn.Module):
    """A frozen parameter the forward updates in place: it refuses to require grad there."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)
        self.centre = nn.Parameter(torch.zeros(4), requires_grad=False)

    def forward(self, x):
        h = _StraightThroughRound.apply(self.a(x))
        self.centre.mul_(0.9).add_(0.1 * h.detach().mean(0))
        return self.b(h - self.centre)


def test_a_custom_backward_beside_a_parameter_updated_in_place_is_still_said():
    """With every parameter made to require grad, the in-place update failed both tries of the Function finder
    and the straight-through estimator went unsaid (a reviewer)."""
    with pytest.warns(pbp_fx.PBWarning, match=r"^_RunningCentre runs torch.autograd.Function _StraightThroughRound "
                                              r"with a backward of its own"):
        pbp_fx.perforate(_RunningCentre(), (torch.randn(3, 4),), frontend="fx")


class _ReluOnItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x, *, shift):
        return self.fc(self.act(x) + self.act(shift))


_Pair = collections.namedtuple("_Pair", "x shift")


class _ReluOnAPair(_ReluOnItsInput):
    def forward(self, pair):
        return self.fc(self.act(pair.x) + self.act(pair.shift))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_trace_leaves_the_callers_example_tensors_as_they_were(frontend):
    x, shift = torch.randn(5, 4), torch.randn(5, 4)
    before = (x.clone(), shift.clone())
    gm = trace(_ReluOnItsInput(), x, {"shift": shift}, frontend=frontend)
    assert torch.equal(x, before[0]) and torch.equal(shift, before[1])
    assert gm.meta["pbp_frontend"] == frontend
    trace(_ReluOnAPair(), (_Pair(x, shift),), frontend=frontend)  # (a namedtuple's were not copied: a reviewer)
    assert torch.equal(x, before[0]) and torch.equal(shift, before[1])


class _FrozenTokenModel(nn.Module):
    """Token ids in, every parameter frozen: nothing upstream of the Function required grad."""

    def __init__(self, function):
        super().__init__()
        self.function = function
        self.embed, self.feat, self.head = nn.Embedding(20, 6), nn.Linear(6, 8), nn.Linear(8, 2)

    def forward(self, ids):
        return self.head(self.function.apply(self.feat(self.embed(ids))))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_frozen_model_on_token_ids_has_its_custom_backwards_checked(frontend):
    ids = torch.randint(0, 20, (16, 5))
    model = _FrozenTokenModel(_StraightThroughRound).requires_grad_(False)
    with pytest.warns(pbp_fx.PBWarning, match=r"^_FrozenTokenModel runs torch.autograd.Function _StraightThroughRound "
                                              r"with a backward of its own: .* its gradients differ"):
        trace(model, (ids,), frontend=frontend)
    assert not any(p.requires_grad for p in model.parameters())  # (frozen again after the check)
    exact = _FrozenTokenModel(_MemoryEfficientSwish).requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pbp_fx.PBWarning)
        pbp_fx.perforate(exact, (ids,), frontend=frontend)


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, scale=2.0):
        return self.fc(x) * scale


def test_export_of_a_model_with_root_hooks_called_by_keyword_names_the_hooks_not_the_inputs():
    """trace() itself (perforate drops such hooks): torch.export passes inputs by name, so the pre-hook read no
    args and the model was refused as 'example inputs do not run through the model: tuple index out of range'."""
    model, x = _Scaled(), torch.randn(5, 4)
    model.register_forward_pre_hook(lambda mod, args: (args[0] * 2,) + tuple(args[1:]))
    for kwargs in ({}, {"scale": 3.0}):
        with pytest.raises(TraceError, match=r"^torch.export cannot export _Scaled \([^()]*\)[^;]*; _Scaled has forward "
                                             r"hook\(s\) or pre-hook\(s\) on itself, which torch.export runs with the "
                                             r"inputs by name unless the example passes every input of forward "
                                             r"positionally: pass them so, remove the hooks, or use pbp_fx.perforate"):
            trace(model, (x,), kwargs, frontend="export")
    gm = trace(model, (x, 3.0), frontend="export")
    assert torch.allclose(gm(x, 3.0), model(x, 3.0))
    # hooks that read no args are captured from any call (refused up front, they had failed a valid capture)
    reader = _Scaled()
    reader.register_forward_hook(lambda mod, args, out: out * 2)
    reader.register_forward_pre_hook(lambda mod, args, kwargs: (args, {**kwargs, "scale": 5.0}), with_kwargs=True)
    for kwargs in ({}, {"scale": 3.0}):
        gm = trace(reader, (x,), kwargs, frontend="export")
        torch.testing.assert_close(gm(x, **kwargs), reader(x, **kwargs))


class GraphNamedParts(nn.Module):
    """A root whose child, parameter and buffer are named like GraphModule attributes (a GNN's `graph`,
    a codebook `code`): building the GraphModule failed ("cannot assign 'dict' as child module 'meta'")
    with fx, and torch.export's unlift with "references nonexistent attribute weight of meta"."""

    def __init__(self):
        super().__init__()
        self.meta = nn.Linear(4, 4)
        self.graph = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.code = nn.Parameter(torch.randn(4))
        self.register_buffer("recompile", torch.ones(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.graph(self.meta(x)) * self.code + self.recompile)


@pytest.mark.parametrize("frontend", ["fx", "export", "auto"])
def test_a_root_with_names_of_graph_module_attributes_is_captured_under_free_names(frontend, tmp_path):
    model = GraphNamedParts()
    x = torch.randn(5, 4)
    with pytest.warns(pbp_fx.PBWarning, match=r"holds 'meta', 'graph', 'code', 'recompile', named like torch.fx "
                                               r"GraphModule attribute\(s\).*'meta_', 'graph_', 'code_', 'recompile_'"):
        pm = pbp_fx.perforate(model, (x,), frontend=frontend)
    assert list(pm.sites) == ["meta_", "graph_.0", "head"]
    assert "graph_module.code_" in pm.state_dict()
    torch.testing.assert_close(pm(x), model(x), rtol=0, atol=0)
    # the model itself is as it was: its class, its names, its state
    assert type(model) is GraphNamedParts and isinstance(model.meta, nn.Linear)
    assert list(model.state_dict()) == ["code", "recompile", "meta.weight", "meta.bias", "graph.0.weight",
                                        "graph.0.bias", "head.weight", "head.bias"]
    for site in pm.sites.values():
        site.grow()
        site.out_weight.data.fill_(0.3)
    torch.testing.assert_close(pm.finalize()(x), pm(x))
    pbp_fx.save(pm, tmp_path / "run.safetensors")
    with pytest.warns(pbp_fx.PBWarning, match="named like torch.fx GraphModule"):
        loaded = pbp_fx.load(tmp_path / "run.safetensors", GraphNamedParts())
    torch.testing.assert_close(loaded(x), pm(x), rtol=0, atol=0)


def test_a_forward_assigning_a_renamed_buffer_writes_the_renamed_one():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.register_buffer("meta", torch.zeros(3))

        def forward(self, x):
            self.meta = self.meta + 1  # the property's setter: the buffer under its free name
            return self.fc(x) + self.meta

    model = Counter()
    x = torch.randn(2, 3)
    with pytest.warns(pbp_fx.PBWarning, match="'meta_'"):
        pm = pbp_fx.perforate(model, (x,), frontend="export")
    torch.testing.assert_close(model.meta, torch.zeros(3))  # capture left the model's buffer as it was
    expected = model.fc(x) + 1
    torch.testing.assert_close(pm(x), expected)
    torch.testing.assert_close(pm(x), expected + 1)  # the perforated model's own buffer counts on
    torch.testing.assert_close(pm.get_buffer("graph_module.meta_"), torch.full((3,), 2.0))


def test_frontend_parts_captures_the_submodules_in_place_on_any_root():
    class Traceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Sequential(nn.Linear(4, 6), nn.ReLU()), nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.body(x))

    model, x = Traceable(), torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (asked for: no "traces with neither fx nor torch.export")
        pm = pbp_fx.perforate(model, (x,), frontend="parts")
    assert pm.capture["captured_with"] == "parts" and pm.graph_module.meta["pbp_parts"] == ["body", "head"]
    torch.testing.assert_close(pm(x), model(x), rtol=0, atol=0)
    with pytest.raises(TraceError, match=r"frontend='parts' needs example inputs"):
        trace(model, frontend="parts")


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_dataclass_input_is_refused_unless_registered_then_any_instance_runs(frontend, tmp_path):
    """fx froze an unregistered dataclass input into the graph as one constant, tensors and all: the perforated
    model refused every other instance, with the tensors' repr in the message (a reviewer)."""
    @dataclasses.dataclass
    class Batch:
        u: torch.Tensor
        scale: float = 2.0

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, batch):
            return self.fc(batch.u) * batch.scale

    model = Model()
    with pytest.raises(pbp_fx.errors.ExampleInputsError, match=r"^input 'batch' holds an object of type Batch, whose "
                                                               r"tensors a capture can only take as constants"):
        pbp_fx.perforate(model, (Batch(torch.randn(3, 4)),), frontend=frontend)
    torch.export.register_dataclass(Batch)
    pm = pbp_fx.perforate(model, (Batch(torch.randn(3, 4)),), frontend=frontend)
    other = Batch(torch.randn(5, 4))  # another object, another batch size
    torch.testing.assert_close(pm(other), model(other), rtol=0, atol=0)
    pbp_fx.save(pm, tmp_path / "run.safetensors")
    loaded = pbp_fx.load(tmp_path / "run.safetensors", Model, example_inputs=(other,))  # (a local class: no import)
    torch.testing.assert_close(loaded(other), model(other), rtol=0, atol=0)


class UntraceableMeta(nn.Module):
    """A root child named like a GraphModule attribute, under a root only a parts capture takes."""

    def __init__(self):
        super().__init__()
        self.meta, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.meta(x)
        if h.sum() > 0:
            h = h * 2
        return self.head(h)


def test_a_root_named_like_graph_module_attributes_keeps_its_names_in_a_parts_capture():
    """The free names served a parts capture too, which builds no graph of the root: its sites changed names
    (checkpoints saved before no longer loaded) and torch.save(pm) failed on the renamed copy's class (a reviewer)."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        pm = pbp_fx.perforate(UntraceableMeta(), (torch.randn(2, 4),))
    assert pm.capture["captured_with"] == "parts" and list(pm.sites) == ["meta", "head"]
    assert not [w for w in said if "GraphModule attribute" in str(w.message)]
    torch.save(pm, io.BytesIO())


def test_free_names_skip_taken_ones_keep_buffers_unsaved_and_say_why_a_layer_is_no_site():
    class Crowded(nn.Module):
        def __init__(self):
            super().__init__()
            self.meta, self.meta_ = nn.Linear(4, 4), nn.Linear(4, 4)
            self.graph = nn.Linear(4, 4)  # its weight is taken in part: no site, said under its free name
            self.register_buffer("code", torch.ones(4), persistent=False)

        def forward(self, x):
            return self.meta_(self.meta(x)) + F.linear(x, self.graph.weight[:, :4] * 2) + self.code

    for frontend in ("fx", "export"):
        with pytest.warns(pbp_fx.PBWarning) as said:
            pm = pbp_fx.perforate(Crowded(), (torch.randn(2, 4),), frontend=frontend)
        assert list(pm.sites) == ["meta__", "meta_"]
        if frontend == "export":  # (fx's GraphModule saves a root's unsaved buffers, whatever their names)
            assert not any("code" in k for k in pm.state_dict())
        assert any("not sites" in str(w.message) and "graph_ (graph_.weight" in str(w.message) for w in said)


class _Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x))


class _BranchingOverBody(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = _Body(), nn.Linear(4, 2)

    def forward(self, x):
        h = self.body(x)
        if h.sum() > 0:
            h = h * 2
        return self.head(h)


def test_a_parts_own_hooks_run_around_it_as_around_the_submodule():
    """A forward hook and pre-hook on a submodule that a parts capture traced with fx were lost (tracing starts
    at its forward): the pre-hook's scaling was missing from the output (a reviewer)."""
    model, seen = _BranchingOverBody(), []
    model.body.register_forward_pre_hook(lambda module, args: (args[0] * 3,))
    model.body.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    model.body.register_forward_pre_hook(lambda module, args, kwargs: ((args[0] + 1,), kwargs), with_kwargs=True)
    model.body.register_forward_hook(lambda module, args, kwargs, out: out - 0.5, with_kwargs=True, always_call=True)
    x = torch.randn(2, 4).abs()
    with pytest.warns(pbp_fx.PBWarning, match="neither fx nor torch.export"):
        pm = pbp_fx.perforate(model, (x,))
    assert pm.graph_module.meta["pbp_parts"] == ["body", "head"]
    seen.clear()
    torch.testing.assert_close(pm(x), model(x), rtol=0, atol=0)
    assert len(seen) == 2  # (once around each model's body)
    pm.eval(), model.eval()
    torch.testing.assert_close(pm.finalize()(x), model(x))


def test_fx_takes_a_tuple_constant_input():
    """fx's code for a structured constant flattens [self, x, size]: shape propagation left the module out and
    failed with 'example inputs do not run through the model: list index out of range' (a reviewer)."""
    model, x = Reshapes(), torch.randn(3, 4)
    pm = pbp_fx.perforate(model, (x, (3, 2, 3)), frontend="fx")
    assert pm.capture["captured_with"] == "fx" and list(pm.sites) == ["fc"]
    torch.testing.assert_close(pm(x, (3, 2, 3)), model(x, (3, 2, 3)), rtol=0, atol=0)


class _Scale:
    """A config object of the caller's, not a dataclass, passed on every call."""

    def __init__(self):
        self.scale = torch.tensor(2.0)


def test_a_config_object_passed_on_every_call_stays_a_constant_as_before():
    """The dataclass refusal took in any object with tensor attributes, with advice (register_dataclass) that
    fails on a plain class; such a config, passed on every call, had worked (a reviewer)."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x, cfg):
            return self.fc(x) * cfg.scale

    model, cfg, x = Model(), _Scale(), torch.randn(5, 4)
    pm = pbp_fx.perforate(model, (torch.randn(2, 4), cfg))
    torch.testing.assert_close(pm(x, cfg), model(x, cfg), rtol=0, atol=0)


class _NoGradBody(nn.Module):
    """A mode switch in its forward: auto captures it with torch.export, which runs its hooks into the graph."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        with torch.no_grad():
            shift = h.mean()
        return torch.relu(h - shift)


class _BranchingOverNoGradBody(_BranchingOverBody):
    def __init__(self):
        super().__init__()
        self.body = _NoGradBody()


def test_a_part_torch_export_captured_has_its_hooks_in_its_graph_once():
    model = _BranchingOverNoGradBody()
    model.body.register_forward_pre_hook(lambda module, args: (args[0] * 3,))
    x = torch.randn(2, 4).abs()
    with pytest.warns(pbp_fx.PBWarning, match="neither fx nor torch.export"):
        pm = pbp_fx.perforate(model, (x,))
    part = next(m for m in pm.modules() if getattr(m, "name", None) == "body")
    assert part.graph_module.meta["pbp_frontend"] == "export"
    torch.testing.assert_close(pm(x), model(x), rtol=0, atol=0)  # (the pre-hook's scaling once, not twice)


def test_a_dataclass_passed_by_keyword_is_refused_too():
    @dataclasses.dataclass
    class Batch:
        u: torch.Tensor

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x, batch=None):
            return self.fc(x) + self.fc(batch.u)

    with pytest.raises(pbp_fx.errors.ExampleInputsError, match=r"^input 'batch' holds an object of type Batch"):
        pbp_fx.perforate(Model(), (torch.randn(3, 4),), example_kwargs={"batch": Batch(torch.randn(3, 4))})


def test_a_part_returns_its_output_as_the_submodule_did_to_the_root_that_reads_it():
    """A root the capture could not trace read its submodule's ModelOutput by position (`outputs[0]`,
    DeBERTa-v2's encoder): the traced part returned fx's plain dict, and every call raised KeyError: 0."""
    from dataclasses import dataclass

    modeling = pytest.importorskip("transformers.utils")

    @dataclass
    class EncoderOutput(modeling.ModelOutput):
        last_hidden_state: torch.Tensor = None
        pooled: torch.Tensor = None

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)

        def forward(self, x):
            h = torch.relu(self.fc(x))
            return EncoderOutput(last_hidden_state=h, pooled=h.mean(1))

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.head = Encoder(), nn.Linear(6, 2)

        def forward(self, x):
            outputs = self.encoder(x)
            if float(x.sum()) > 1e9:  # data-dependent: the root does not trace
                return outputs[1]
            return self.head(outputs[0])

    torch.manual_seed(0)
    model, x = Root(), torch.randn(3, 4)
    pm = pbp_fx.perforate(model, (x,), frontend="parts")
    assert pm.graph_module.meta["pbp_parts"] == ["encoder", "head"]
    pm.grow()
    with torch.no_grad():
        torch.testing.assert_close(pm.eval()(x), model(x))  # V = 0: the dendrites add nothing
        final = pm.finalize()
        torch.testing.assert_close(final(x), pm(x))


def test_a_batch_the_forward_fixes_is_warned_of_as_the_model_is_perforated():
    """torch.export took the batch as a constant (a tensor of the example's batch met one of a fixed
    size: CLIP's loss) without a word: the first training step at another batch failed."""
    class FixedBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = self.fc(x)
            return torch.stack([h[i] * (i + 1) for i in range(x.shape[0])])  # a Python loop over the batch

    with pytest.warns(UserWarning, match=r"torch.export fixed FixedBatch's batch at 8: .* take batches of 8 only: "
                                         r"perforate it with an example of the batch you call it with"):
        pbp_fx.perforate(FixedBatch(), (torch.randn(8, 4),), frontend="export")

    class SequenceFirst(nn.Module):  # (T, B, F) with a table of T rows: dim 0 is no batch (a reviewer)
        def __init__(self):
            super().__init__()
            self.fc, self.pos = nn.Linear(4, 8), nn.Parameter(torch.zeros(6, 1, 8))

        def forward(self, x):
            return (self.fc(x) + self.pos).mean(0)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pbp_fx.perforate(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), (torch.randn(8, 4),), frontend="export")
        pm = pbp_fx.perforate(SequenceFirst(), (torch.randn(6, 2, 4),), frontend="export")
    assert pm(torch.randn(6, 5, 4)).shape == (5, 8)


def test_an_example_the_model_cannot_run_names_the_models_error_in_a_parts_capture():
    """A parts capture on an example the model raises on said 'no submodule ... traces on its call from the
    example' and dropped the model's own error (Whisper without its decoder inputs, on pbp_fx.load)."""
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            if x.shape[1] != 4:
                raise ValueError("x needs 4 features")
            return self.fc(x)

    with pytest.raises(pbp_fx.ExampleInputsError, match=r"example inputs do not run through the model: x needs 4 "
                                                         r"features"):
        pbp_fx.perforate(Root(), (torch.randn(2, 5),), frontend="parts")


class _LabelsOptional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x, labels=None):
        logits = self.fc(x)
        return logits if labels is None else (logits - labels).square().mean()


def test_an_input_specialised_to_none_leaves_fx_and_torch_export_working_after_unpickling(tmp_path):
    """fx checks such an input with `_assert_is_none`, and a GraphModule unpickled (traced again) wrote that
    check under its dotted name in fx's table of wrapped functions: from then on every fx trace and
    torch.export in the process failed with KeyError 'torch.fx._symbolic_trace._assert_is_none' (the ONNX
    export of a Hugging Face ResNet, say)."""
    x = torch.randn(4, 3)
    pm = pbp_fx.perforate(_LabelsOptional(), (x,), frontend="fx")
    torch.save(pm, tmp_path / "pm.pt")
    again = torch.load(tmp_path / "pm.pt", weights_only=False)
    torch.testing.assert_close(again(x), pm(x))
    with pytest.raises(pbp_fx.CallError, match="labels"):
        again(x, labels=torch.zeros(4, 2))
    final = again.finalize()
    torch.save(final, tmp_path / "final.pt")
    torch.testing.assert_close(torch.load(tmp_path / "final.pt", weights_only=False)(x), final(x))
    torch.testing.assert_close(torch.export.export(final, (x,)).module()(x), final(x))
    fx.symbolic_trace(nn.Linear(2, 2))


class _MaskedPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask=None):
        return self.fc(x) if mask is None else self.fc(x) * mask


class _MaskByData(nn.Module):
    """A root that passes its part a padding mask, or None where the batch needs none (Hugging Face's audio models)."""

    def __init__(self):
        super().__init__()
        self.part = _MaskedPart()

    def forward(self, x):
        mask = None if bool((x > 0).all()) else (x > 0).float()
        return self.part(x, mask)


def test_a_part_called_otherwise_by_the_roots_own_code_says_no_single_example_may_fit():
    """Wav2Vec2 in train mode (captured in parts) failed at the first batch without padding, told to perforate with
    an example that leaves attention_mask out, which then failed at the next padded batch (a reviewer)."""
    pm = pbp_fx.perforate(_MaskByData(), (torch.randn(3, 4),))
    assert pm.graph_module.meta["pbp_frontend"] == "parts"
    with pytest.raises(pbp_fx.CallError, match=r"was traced with mask=Tensor, this call passes None.*\(part part of a "
                                               r"parts capture, whose inputs the root's own code passes.*no single "
                                               r"example fits.*perforate the model in eval mode"):
        pm(torch.rand(3, 4) + 0.1)


class _DataDependentInTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        if self.training and float(h.sum()) > 1e9:  # (HF's LayerDrop draws so: torch.export cannot capture it)
            h = h * 2
        return h


def test_a_model_that_captures_in_eval_mode_only_is_warned_of_with_its_line():
    """The warning gave torch's reason without the model's line (a reviewer: Wav2Vec2's LayerDrop, at
    modeling_wav2vec2.py:740, went unnamed)."""
    model = _DataDependentInTraining().eval()
    with pytest.warns(pbp_fx.PBWarning, match=r"it cannot be captured in train mode \(.* at .*test_tracing.py:\d+\)"):
        pbp_fx.perforate(model, (torch.randn(3, 4),), frontend="export")
