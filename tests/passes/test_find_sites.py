"""passes.find_sites: which nodes are neuron sites, which norms join them; plain data, no edits."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pbp_fx import trace
from pbp_fx.layers import LayerSpec, NormSpec
from pbp_fx.passes import SiteSpec, find_sites
from parts_models import BranchingRoot

pytestmark = pytest.mark.usefixtures("seeded")


def _specs(model, *shape, **kw):
    gm = trace(model, (torch.randn(*shape),))
    return gm, find_sites(gm, **kw)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Branchy()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.inner(x)
        return self.fc(y) if y.mean() > 0 else y


def test_module_sites_with_and_without_norm():
    gm, specs = _specs(nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4, eps=1e-3), nn.ReLU(),
                                     nn.Flatten(), nn.Linear(16, 3)), 2, 2, 4, 4)
    conv, fc = specs
    assert isinstance(conv, SiteSpec)
    assert conv.name == "0" and conv.module == "0" and conv.weight == "0.weight" and conv.bias is None
    assert conv.layer == LayerSpec.from_module(gm.get_submodule("0")) and conv.kind == "conv2d"
    assert conv.norm == NormSpec(eps=1e-3) and conv.norm_node == "_1" and conv.output_node == "_1"
    assert conv.neuron_node == "_0" and conv.input_node == "input_1"
    assert conv.norm_tensors == {"running_mean": "1.running_mean", "running_var": "1.running_var",
                                 "weight": "1.weight", "bias": "1.bias"}
    assert not conv.in_leaf
    assert fc.name == "4" and fc.norm is None and fc.norm_node is None and fc.output_node == fc.neuron_node == "_4"
    assert fc.bias == "4.bias" and fc.channels == 3


def test_find_sites_edits_nothing():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    gm = trace(model, (torch.randn(2, 3),))
    code = gm.code
    modules = dict(gm.named_modules())
    find_sites(gm)
    assert gm.code == code and dict(gm.named_modules()) == modules


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Module()
        self.conv.weight = nn.Parameter(torch.randn(4, 1, 3, 3))  # depthwise
        self.conv.bias = nn.Parameter(torch.randn(4))
        self.register_buffer("rm", torch.zeros(4))
        self.register_buffer("rv", torch.ones(4))
        self.w = nn.Parameter(torch.randn(3, 4))
        self.register_buffer("wb", torch.randn(3, 4))

    def forward(self, x):
        h = F.conv2d(x, self.conv.weight, self.conv.bias, (2, 1), 1, 1, 4)
        h = F.batch_norm(h, self.rm, self.rv, None, None, False, 0.1, 1e-3)
        h = h.mean((2, 3))
        a = F.linear(h, self.w)
        b = F.linear(h, self.wb)          # buffer weight: not a neuron
        c = F.linear(h, self.w * 2.0)     # computed weight: not a neuron
        d = torch.nn.functional.linear(input=h, weight=self.w, bias=None)
        return a + b + c + d


def test_functional_sites():
    gm, specs = _specs(Functional(), 2, 4, 6, 6)
    assert [s.name for s in specs] == ["conv", "w", "w@1"]
    conv = specs[0]
    assert conv.module is None and conv.weight == "conv.weight" and conv.bias == "conv.bias"
    assert conv.layer == LayerSpec("conv2d", (4, 1, 3, 3), True, (2, 1), (1, 1), (1, 1), 4)
    assert conv.norm == NormSpec(eps=1e-3, affine=False)
    assert conv.norm_tensors == {"running_mean": "rm", "running_var": "rv", "weight": None, "bias": None}
    assert specs[1].layer == LayerSpec("linear", (3, 4), False) and specs[1].bias is None


def test_norm_joins_only_when_it_folds_and_is_per_channel():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn_a = nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3, track_running_stats=False)
            self.b, self.bn_b = nn.Conv1d(3, 3, 1), nn.BatchNorm1d(3)
            self.c, self.bn_c = nn.Linear(3, 3), nn.BatchNorm1d(3)  # tokens [B, 3, 3]: BN's dim 1 is not the axis
            self.d, self.ln = nn.Linear(3, 3), nn.LayerNorm(3)
            self.e = nn.Conv1d(3, 3, 1)

        def forward(self, x):
            x = self.bn_a(self.a(x))
            y = self.b(x)
            x = self.bn_b(y) + y                          # the neuron output has two users
            x = self.bn_c(self.c(x))
            x = self.ln(self.d(x))
            x = self.e(x)
            return F.batch_norm(x, torch.zeros(3), torch.ones(3), training=True)

    _, specs = _specs(M(), 2, 2, 3)
    assert [s.name for s in specs] == ["a", "b", "c", "d", "e"]
    assert all(s.norm is None for s in specs)


def test_batchnorm1d_joins_linear_on_flat_features():
    _, specs = _specs(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None, affine=False)), 5, 3)
    assert specs[0].norm == NormSpec(momentum=None, affine=False)
    assert specs[0].norm_tensors["weight"] is None


def test_non_neurons_are_not_sites():
    model = nn.Sequential(nn.ConvTranspose2d(2, 3, 3), nn.Conv2d(3, 3, 1), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 2, 4, 4))  # materialise the lazy module
    _, specs = _specs(model, 1, 2, 4, 4)
    assert [s.name for s in specs] == ["1", "3"]  # LazyLinear has become a Linear


def test_reused_module_gets_one_site_per_call():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x))) + self.fc(x)

    _, specs = _specs(M(), 2, 3)
    assert [s.name for s in specs] == ["fc", "fc@1", "fc@2"]
    assert len({s.neuron_node for s in specs}) == 3
    assert all(s.module == "fc" and s.weight == "fc.weight" for s in specs)


def test_a_layer_called_with_its_input_by_keyword_is_a_site():
    """self.fc(input=h): symbolic tracing records the input as a keyword, and such a call was 'not a site
    (called without a positional input)' under fx while torch.export made it one."""
    import pbp_fx

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.conv = nn.Linear(3, 3), nn.Conv1d(3, 3, 1)

        def forward(self, x):
            h = self.fc(input=torch.relu(self.fc(x)))
            return self.conv(input=h.unsqueeze(-1))

    gm = trace(M(), (torch.randn(2, 3),), frontend="fx")
    assert [s.name for s in find_sites(gm)] == ["fc", "fc@1", "conv"]
    pm = pbp_fx.perforate(M(), (torch.randn(2, 3),))
    assert pm.graph_module.meta["pbp_frontend"] == "fx"  # (auto took torch.export for the layers fx missed)
    pm.grow()
    with torch.no_grad():
        for site in pm.sites.values():
            site.out_weight.normal_()
    x = torch.randn(4, 3)
    torch.testing.assert_close(pm.finalize()(x), pm(x))


def test_leaf_sites_come_last_and_are_in_leaf():
    model = nn.Sequential(Branchy(), nn.Linear(4, 2))
    _, specs = _specs(model, 2, 4)
    assert [s.name for s in specs] == ["1", "0.fc"]
    leaf = specs[1]
    assert leaf.in_leaf and leaf.module == "0.fc" and leaf.weight == "0.fc.weight" and leaf.bias == "0.fc.bias"
    assert leaf.neuron_node is None and leaf.norm is None


def test_nested_untraceable_leaves_give_each_neuron_once():
    _, specs = _specs(nn.Sequential(nn.Linear(4, 4), Outer()), 2, 4)
    assert [s.name for s in specs] == ["0", "1.inner.fc", "1.fc"]


@pytest.mark.parametrize("include,exclude,expected", [
    ("layer1.*", None, ["layer1.0", "layer1.1"]),
    ("layer1.0", None, ["layer1.0"]),
    ("*.1", None, ["layer1.1", "layer2.1"]),
    ("fc*", None, ["fc", "fc@1"]),
    ("fc", None, ["fc", "fc@1"]),         # a glob on the module name matches every call
    ("fc@1", None, ["fc@1"]),
    (None, ["layer1.*", "fc@1"], ["layer2.1", "fc"]),
    (nn.Linear, "fc@*", ["layer2.1", "fc"]),
    ([nn.Conv2d, lambda n, m: n.startswith("layer2")], None, ["layer1.0", "layer1.1", "layer2.1"]),
    (lambda n, m: m is not None and m.weight.shape[0] == 4, "layer1.0", ["layer1.1"]),
    (None, "*", []),
])
def test_include_exclude(include, exclude, expected):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer1 = nn.Sequential(nn.Conv2d(2, 4, 1), nn.Conv2d(4, 4, 1))
            self.layer2 = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(self.fc(self.layer2(self.layer1(x))))

    _, specs = _specs(M(), 1, 2, 2, 2, include=include, exclude=exclude)
    assert [s.name for s in specs] == expected


def test_callable_filters_see_name_and_module():
    seen = []
    model = nn.Sequential(nn.Linear(4, 4), Branchy())
    gm = trace(model, (torch.randn(1, 4),))
    find_sites(gm, include=lambda n, m: seen.append((n, type(m))) or True)
    assert seen == [("0", nn.Linear), ("1.fc", nn.Linear)]


@pytest.mark.parametrize("dim,padding", [(1, 1), (2, "same"), (3, 0)])
def test_functional_conv_of_every_dim(dim, padding, pb):
    import pbp_fx

    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dim]

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 2, *([3] * dim)) * 0.3)
            self.bias = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return torch.relu(conv(x, self.weight, self.bias, padding=padding, stride=1))

    x = torch.randn(2, 2, *([5] * dim))
    _, specs = _specs(M(), *x.shape)
    assert len(specs) == 1 and specs[0].name == "root" and specs[0].kind == f"conv{dim}d"
    assert specs[0].layer.padding == (padding if isinstance(padding, str) else (padding,) * dim)
    pm = pbp_fx.perforate(M(), (x,))
    pm.grow()
    pb.randomize(pm)
    pm.eval()
    assert pb.max_diff(pm.finalize()(x), pm(x)) <= 1e-5


def test_convs_on_unbatched_inputs_are_not_sites():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 1)
            self.w = nn.Parameter(torch.randn(4, 4, 1, 1))
            self.fc = nn.Linear(1, 2)

        def forward(self, x):
            h = self.conv(x)                                        # [C, L]: no batch axis
            h = F.conv2d(h.unsqueeze(-1).unsqueeze(0), self.w)[0]  # [1, C, L, 1]: batched, a site
            return self.fc(F.conv2d(h, self.w))                    # [C, L, 1]: unbatched

    _, specs = _specs(M(), 3, 5)
    assert [s.name for s in specs] == ["w", "fc"]


# -- ATen-level sites (torch.export frontend) and x @ W products -------------------------------------

class Products(nn.Module):
    """Every way a Linear shows up at the ATen level, plus a conv + BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.w_in_out = nn.Parameter(torch.randn(4, 5) * 0.5)   # x @ W, stored [in, out]
        self.b = nn.Parameter(torch.randn(5) * 0.1)
        self.w_out_in = nn.Parameter(torch.randn(6, 5) * 0.5)   # x @ W.t(), stored [out, in]
        self.fc = nn.Linear(6, 3)
        self.head = nn.Module()
        self.head.weight = nn.Parameter(torch.randn(3, 3) * 0.5)  # F.linear with a transposed parameter

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))       # [B, 4]
        h = torch.relu(torch.addmm(self.b, h, self.w_in_out))    # addmm: x is argument 1
        h = torch.relu(h.unsqueeze(1) @ self.w_out_in.t()).squeeze(1)  # matmul on [B, 1, 5]
        h = torch.relu(self.fc(h))
        return F.linear(h, self.head.weight.t()) + torch.mm(h, self.head.weight)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_aten_and_product_sites(frontend, pb):
    import pbp_fx

    x, model = torch.randn(3, 2, 6, 6), Products().eval()
    gm = trace(model, (x,), frontend=frontend)
    assert gm.meta["pbp_frontend"] == frontend
    specs = {s.name: s for s in find_sites(gm)}
    assert list(specs) == ["conv", "w_in_out", "w_out_in", "fc", "head", "head@1"]
    assert specs["conv"].norm is not None and specs["conv"].kind == "conv2d"
    assert specs["w_in_out"].layer == LayerSpec("linear", (5, 4), True) and specs["w_in_out"].weight_transposed
    assert specs["w_in_out"].input_index == 1 and specs["w_in_out"].bias == "b"
    assert specs["w_out_in"].layer == LayerSpec("linear", (6, 5), False) and not specs["w_out_in"].weight_transposed
    assert specs["head"].weight_transposed and specs["head@1"].weight_transposed
    pm = pbp_fx.perforate(model, (x,), frontend=frontend)
    want = model(x)
    assert pb.max_diff(pm(x), want) < 1e-6
    pm.grow()
    pb.randomize(pm, 0.5)
    pm.eval()
    with torch.no_grad():
        y = pm(x)
        assert pb.max_diff(y, want) > 1e-3
        assert pb.max_diff(pm.finalize()(x), y) < 1e-5


class TransposedByAttribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6) * 0.4)
        self.v = nn.Parameter(torch.randn(3, 8) * 0.4)

    def forward(self, x):
        return torch.relu(x @ self.w.T) @ self.v.mT


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_product_with_a_parameter_transposed_by_its_attribute_is_a_site(frontend, pb, tmp_path):
    """fx records `W.T` as getattr(W, "T"): `x @ W.T` was no site, and explain_sites did not list it (a reviewer)."""
    import pbp_fx

    x, model = torch.randn(5, 6), TransposedByAttribute()
    assert [s.name for s in find_sites(trace(model, (x,), frontend=frontend))] == ["w", "v"]
    pm = pbp_fx.perforate(model, (x,), frontend=frontend)
    assert pb.max_diff(pm(x), model(x)) < 1e-6
    pm.grow()
    pb.randomize(pm, 0.5)
    pm.eval()
    with torch.no_grad():
        y = pm(x)
        assert pb.max_diff(pm.finalize()(x), y) < 1e-5
    from pbp_fx.exporters import export_onnx, ort_session, run

    got = run(ort_session(export_onnx(pm, (x,), tmp_path / "m.onnx"), device="cpu", threads=1), (x.numpy(),))[0]
    assert pb.max_diff(torch.as_tensor(got), y) < 1e-5


def test_part_sites_are_named_by_their_path_in_the_model():
    with pytest.warns(UserWarning, match="neither fx nor torch.export"):
        gm = trace(BranchingRoot(), (torch.randn(3, 4),))
    assert gm.meta["pbp_frontend"] == "parts"
    # A part that is a layer, or a functional weight of a part's own, is named by the part's path.
    assert [s.name for s in find_sites(gm)] == ["a", "gate.b", "gate", "head"]
    assert [s.name for s in find_sites(gm, include=["head", "gate", "gate.*"])] == ["gate.b", "gate", "head"]
    assert [s.name for s in find_sites(gm, exclude=["a"])] == ["gate.b", "gate", "head"]


class DeadCall(nn.Module):
    """`dead`'s result is discarded; `stat` writes a buffer (a side effect a later call reads)."""

    def __init__(self):
        super().__init__()
        self.a, self.dead, self.stat, self.b = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 2)
        self.register_buffer("running", torch.zeros(8))

    def forward(self, x):
        self.dead(x)
        self.running.copy_(self.stat(x).mean(0))
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_call_whose_result_nothing_reads_is_not_a_site(frontend):
    gm = trace(DeadCall(), (torch.randn(3, 4),), frontend=frontend)
    assert [s.name for s in find_sites(gm)] == ["stat", "a", "b"]


@pytest.mark.parametrize("layer, x", [(nn.Conv2d(3, 4, 3), torch.randn(2, 3, 8, 8)), (nn.Linear(3, 4), torch.randn(2, 3))])
def test_a_bare_layer_perforated_alone_is_the_root_site_not_weight(layer, x):
    """nn.Conv2d perforated by itself named its site 'weight' (its weight's path with '.weight' cut off)."""
    assert [s.name for s in find_sites(trace(layer, (x,)))] == ["root"]


def test_a_generator_of_rules_applies_to_every_layer():
    """include=(glob for ...) was used up by the first layer: every later layer saw no rule."""
    import pbp_fx

    model, x = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2)), torch.randn(2, 5)
    assert list(pbp_fx.perforate(model, (x,), include=(n for n in ["0", "4"])).sites) == ["0", "4"]
    assert list(pbp_fx.perforate(model, (x,), exclude=(n for n in ["2", "4"])).sites) == ["0"]
    gm = trace(model, (x,))
    assert [s.name for s in find_sites(gm, exclude=iter(["0"]))] == ["2", "4"]


@pytest.mark.parametrize("rule, message", [
    (5, "include 5 is not a rule: pass module types, name globs"),
    ([nn.Linear, 3.5], "include 3.5 is not a rule"),
    (nn.Linear(5, 5), "include holds the module Linear(...), an instance: pass its type (Linear)"),
])
def test_a_rule_that_is_no_type_glob_or_callable_is_refused_in_one_line(rule, message):
    """include=5 raised 'int object is not iterable'; a module instance was called as a rule (a forward error)."""
    import pbp_fx
    from pbp_fx.config import ConfigError

    with pytest.raises(ConfigError) as info:
        pbp_fx.perforate(nn.Sequential(nn.Linear(5, 5)), (torch.randn(2, 5),), include=rule)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_child_module_named_root_inside_a_part_keeps_its_path():
    """The part's own weight and a child called `root` both came out as 'root' inside a part, and the
    child was renamed to the part's path ('block', not 'block.root')."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.root, self.other = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.other(torch.relu(self.root(x)))

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.head = Block(), nn.Linear(4, 2)

        def forward(self, x):
            if float(x.sum()) > 0:  # data-dependent: captured in parts
                x = x * 2
            return self.head(self.block(x))

    with pytest.warns(UserWarning, match="neither fx nor torch.export"):
        gm = trace(Untraceable(), (torch.randn(3, 4),))
    assert [s.name for s in find_sites(gm)] == ["block.root", "block.other", "head"]
    assert [s.name for s in find_sites(gm, include="block.root")] == ["block.root"]


class _StandardizedConv(nn.Conv2d):
    """A conv whose forward is its own (weight standardisation), with Python fx cannot trace."""

    def forward(self, x):
        if x.dim() != 4:  # (a Proxy's truth value: fx keeps the module whole)
            raise ValueError("4-D input")
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_a_layer_whose_class_overrides_forward_is_no_site_and_export_reaches_its_ops():
    """fx kept such a conv whole and made it a stock site: finalize and the ONNX file computed a plain conv
    with its raw weight (0.68 off the model, with V = 0, silently), and timm's Conv2dSame ("same" padding in
    its forward) failed in the dendrite phase with torch's size mismatch (a reviewer)."""
    import pbp_fx

    torch.manual_seed(0)
    model = nn.Sequential(_StandardizedConv(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)).eval()
    x = torch.randn(2, 3, 4, 4)
    explained = {e.name: e for e in pbp_fx.explain_sites(model, (x,), frontend="fx")}
    assert explained["0.weight"].status == "not a site"
    assert explained["0.weight"].reason.startswith("its class _StandardizedConv overrides forward")
    with pytest.warns(UserWarning, match=r"are not sites.*_StandardizedConv overrides forward"):
        pm = pbp_fx.perforate(model, (x,), frontend="fx")
    assert list(pm.sites) == ["3"]
    pm.grow()  # (V = 0: the output is the model's)
    with torch.no_grad():
        assert torch.equal(pm.finalize()(x), model(x))
    # auto: torch.export captures the ops of a forward that pads ("same", as timm's tf_* convs), whose F.conv2d
    # of the module's weight is a site
    padded = nn.Sequential(_SamePaddedConv(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2)).eval()
    pm = pbp_fx.perforate(padded, (x,))
    assert len(pm.sites) == 2 and pm.graph_module.meta["pbp_frontend"] == "export"
    pm.grow()
    for site in pm.sites.values():
        site.out_weight.data.normal_()
    pm.start_dendrite_phase(pool=2)
    pm.train()(torch.randn(4, 3, 4, 4)).square().mean().backward()  # (the candidates' shapes fit)
    pm.abort_dendrite_phase()
    with torch.no_grad():
        assert torch.allclose(pm.finalize()(x), pm.eval()(x), atol=1e-6)


class _StandardizedInConvForward(nn.Conv2d):
    """Weight standardisation in _conv_forward, torch's forward kept (a diff reviewer)."""

    def _conv_forward(self, x, weight, bias):
        if x.dim() != 4:  # (a Proxy's truth value: fx keeps the module whole)
            raise ValueError("4-D input")
        w = (weight - weight.mean((1, 2, 3), keepdim=True)) / (weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return super()._conv_forward(x, w, bias)


def test_a_conv_whose_class_overrides_conv_forward_is_no_site_either():
    import pbp_fx

    model = nn.Sequential(_StandardizedInConvForward(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    x = torch.randn(2, 3, 4, 4)
    explained = {e.name: e for e in pbp_fx.explain_sites(model, (x,), frontend="fx")}
    assert explained["0.weight"].reason.startswith("its class _StandardizedInConvForward overrides forward (or "
                                                   "_conv_forward)")


class _SamePaddedConv(nn.Conv2d):
    """TensorFlow's "same" padding, computed from the input's size in Python (as timm's Conv2dSame)."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(reversed(x.shape[2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((-(-size // s) - 1) * s + k - size, 0)  # (max() of a Proxy: fx keeps the module whole)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride)


class OwnLinear(nn.Module):
    """A layer written with F.linear on its own weight (a LoRA- or weight-norm-style module)."""

    def __init__(self, i: int, o: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(o, i)), nn.Parameter(torch.zeros(o))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class WithOwnLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = OwnLinear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_type_rules_see_the_models_module_that_holds_a_functional_weight(frontend):
    """fx copies a functional layer's owner into the graph as a plain nn.Module: given the model, a type
    rule (and a callable) sees the model's own module, as with torch.export."""
    model = WithOwnLinear()
    gm = trace(model, (torch.randn(3, 4),), frontend=frontend)
    assert [s.name for s in find_sites(gm, exclude=OwnLinear, model=model)] == ["b"]
    assert [s.name for s in find_sites(gm, include=OwnLinear, model=model)] == ["a"]
    assert [s.name for s in find_sites(gm, include=lambda n, m: isinstance(m, OwnLinear), model=model)] == ["a"]


class TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight  # (tied, as GPT-2's and BERT's LM heads are)

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.emb(ids))))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_type_rule_sees_a_tied_heads_own_module_not_the_tensors_first_holder(frontend):
    """The embedding holds the head's weight first: a rule for nn.Linear saw it and dropped the head (export)."""
    model = TiedHead()
    gm = trace(model, (torch.randint(0, 10, (2, 5)),), frontend=frontend)
    assert sorted(s.name for s in find_sites(gm, include=nn.Linear, model=model)) == ["fc", "head"]
    assert sorted(s.name for s in find_sites(gm, exclude=nn.Embedding, model=model)) == ["fc", "head"]


def test_type_rules_see_a_bare_layer_and_the_layers_a_parts_capture_traced_alone():
    layer = nn.Linear(4, 3)
    assert find_sites(trace(layer, (torch.randn(2, 4),)), exclude=nn.Linear, model=layer) == []
    with pytest.warns(UserWarning, match="neither fx nor torch.export"):
        gm = trace(BranchingRoot(), (torch.randn(3, 4),))
    # parts `a` and `head` are Linears traced alone: each part's own module is what the rule sees
    assert [s.name for s in find_sites(gm, include=nn.Linear)] == ["a", "gate.b", "head"]
    assert [s.name for s in find_sites(gm, exclude=nn.Linear)] == ["gate"]
