"""pbp_fx.explain: every Linear/Conv-like op with "site" or the reason it is not one."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pbp_fx
from no_grad_model import FrozenByNoGrad

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Everything(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.unused = nn.Linear(6, 6)
        self.conv = nn.Conv1d(6, 6, 1)
        self.register_buffer("frozen", torch.randn(6, 6))

    def forward(self, x):
        h = self.fc(x)
        h = F.linear(h, self.frozen)  # weight is a buffer
        h = self.conv(h[0].t()).t().unsqueeze(0).expand_as(h)  # unbatched conv
        return self.head(self.attn(h, h, h)[0])


def _by_name(rows):
    return {r.name: r for r in rows}


def test_every_linear_conv_like_op_has_site_or_a_reason():
    x = torch.randn(2, 4, 6)
    rows = _by_name(pbp_fx.explain_sites(Everything(), (x,), exclude=["head"], frontend="fx"))
    assert rows["fc"].status == "site" and rows["fc"].kind == "linear"
    assert rows["head"].status == "not a site" and "excluded" in rows["head"].reason
    assert rows["frozen"].status == "not a site" and "buffer" in rows["frozen"].reason
    assert "unbatched" in rows["conv.weight"].reason
    assert "frontend='export'" in rows["attn.in_proj_weight"].reason
    assert "MultiheadAttention" in rows["attn.out_proj.weight"].reason
    assert rows["unused.weight"].reason == "not used on the example inputs"


def test_the_export_frontend_reaches_inside_the_attention():
    rows = _by_name(pbp_fx.explain_sites(Everything(), (torch.randn(2, 4, 6),), frontend="export"))
    assert rows["attn.in_proj_weight"].status == "site" and rows["attn.out_proj"].status == "site"


def test_cli_transform_explain_and_export_frontend(tmp_path, capsys):
    from pbp_fx.cli import main

    model_file = tmp_path / "attn.py"
    model_file.write_text(
        "import torch\nfrom torch import nn\n\n\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)\n"
        "        self.fc = nn.Linear(8, 3)\n\n"
        "    def forward(self, x):\n"
        "        return self.fc(self.attn(x, x, x)[0].mean(1))\n\n\n"
        "def build_model():\n    return M()\n\n\n"
        "def example_inputs():\n    return (torch.randn(2, 5, 8),)\n")
    assert main(["transform", str(model_file), "--frontend", "fx", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "attn.in_proj_weight" in out and "frontend='export' reaches it" in out
    assert main(["export", str(model_file), "--frontend", "export", "-o", str(tmp_path / "m.onnx")]) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "Warning" not in captured.err


class RecurrentAndTransposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(4, 8, batch_first=True)
        self.up = nn.ConvTranspose1d(8, 3, 2, stride=2)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        h, _ = self.gru(x)
        return self.fc(self.up(h.transpose(1, 2)).mean(-1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_layer_kinds_pbp_fx_does_not_perforate_are_named_as_such(frontend):
    """Not "not used" (they are used) nor "frontend='export' reaches it" (it does not)."""
    rows = {r.name: r for r in pbp_fx.explain_sites(RecurrentAndTransposed(), (torch.randn(2, 5, 4),),
                                                    frontend=frontend)}
    assert rows["fc"].status == "site"
    for name, kind in [("gru.weight_ih_l0", "GRU"), ("gru.weight_hh_l0", "GRU"), ("up.weight", "ConvTranspose1d")]:
        assert rows[name].status == "not a site"
        assert rows[name].reason.startswith(f"{kind} is not a layer kind pbp-fx perforates"), rows[name]


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        h = self.b(x)
        return h if h.sum() > 0 else -h  # untraceable: a leaf, its Linear swapped in place


class _WithLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.gate, self.head = nn.Linear(4, 4), _Branchy(), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.gate(torch.relu(self.a(x))))


def test_a_perforated_leaf_site_is_explained_under_its_own_name():
    from pbp_fx.explain import explain_graph

    model, x = _WithLeaf(), torch.randn(3, 4)
    pm = pbp_fx.perforate(model, (x,), include=["gate.b", "a"])
    assert list(pm.sites) == ["a", "gate.b"]
    rows = _by_name(explain_graph(pm.graph_module, pm.source_model, ["gate.b", "a"], None))
    assert set(rows) == {"a", "gate.b", "head"}  # not gate.b.neuron
    assert rows["gate.b"].status == "site" and rows["a"].status == "site"
    assert "excluded" in rows["head"].reason


def test_a_weight_normed_layer_is_one_site_and_its_originals_are_not_listed():
    """weight_norm keeps the Linear's weight as two originals under fc.parametrizations.weight; they
    were listed as "not used on the example inputs" beside the site fc."""
    from torch.nn.utils.parametrizations import weight_norm

    model = nn.Sequential(weight_norm(nn.Linear(4, 8)), nn.ReLU(), nn.Linear(8, 2))
    rows = pbp_fx.explain_sites(model, (torch.randn(2, 4),))
    assert [(r.name, r.status) for r in rows] == [("0", "site"), ("2", "site")]


def test_a_discarded_call_says_nothing_reads_it():
    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.dead = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x):
            self.dead(x)
            return self.fc(x)

    rows = {r.name: r for r in pbp_fx.explain_sites(Dead(), torch.randn(3, 4))}
    assert rows["fc"].status == "site"
    assert (rows["dead"].status, rows["dead"].reason) == ("not a site", "its result is not used: no output depends on it")


class _StandardizedConv(nn.Conv2d):
    """timm's ScaledStdConv2d: the weight is standardized in forward, so the conv reads a computed tensor."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_a_weight_changed_before_its_layer_is_not_said_to_be_unused():
    """timm NFNet: every conv's weight row read "not used on the example inputs", though the forward reads it."""
    model = nn.Sequential(_StandardizedConv(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    rows = {r.name: r for r in pbp_fx.explain_sites(model, (torch.randn(2, 3, 6, 6),))}
    assert rows["3"].status == "site"
    assert rows["0.weight"].status == "not a site"
    assert rows["0.weight"].reason.startswith("the layer's weight is computed at run time from this parameter")
    assert rows["0.weight"].kind == "conv2d" and "0.bias" not in rows  # (the row was the bias's, its weight's a second)


class _HyperConv(nn.Module):
    """A conv whose weight a Linear computes from the input (a hypernetwork)."""

    def __init__(self):
        super().__init__()
        self.hyper = nn.Linear(3, 4 * 3 * 3 * 3)

    def forward(self, x):
        w = self.hyper(x.mean((0, 2, 3))).reshape(4, 3, 3, 3)
        return F.conv2d(x, w)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_weight_computed_by_another_layer_is_not_named_after_that_layers_weight(frontend):
    rows = pbp_fx.explain_sites(_HyperConv(), (torch.randn(2, 3, 6, 6),), frontend=frontend)
    assert [(r.name, r.status) for r in rows if r.name == "hyper"] == [("hyper", "site")]
    assert not [r for r in rows if r.name == "hyper.weight"]


def test_a_layer_in_torch_exports_grad_mode_region_is_not_said_to_be_reached_by_export():
    """It read "read by wrap_with_set_grad_enabled(), ...: frontend='export' reaches it", of export's own graph."""
    rows = {r.name: r for r in pbp_fx.explain_sites(FrozenByNoGrad(), (torch.randn(2, 8),), frontend="export")}
    assert rows["head"].status == "site"
    assert rows["feat.weight"].reason.startswith("inside a region the forward runs under another grad mode or "
                                                 "autocast, which torch.export keeps as one call")


class _EinsumLinear(nn.Linear):
    def forward(self, x):
        return torch.einsum("bi,oi->bo", x, self.weight) + self.bias


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_weight_read_by_a_torch_op_that_is_no_layer_is_not_said_to_be_reached_by_export(frontend):
    """It read "read by einsum.default(), ...: frontend='export' reaches it", under export itself."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix, self.fc = _EinsumLinear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.mix(x))

    rows = {r.name: r for r in pbp_fx.explain_sites(Net(), (torch.randn(2, 3),), frontend=frontend)}
    assert rows["fc"].status == "site"
    assert "which is no Linear/Conv op pbp-fx perforates" in rows["mix.weight"].reason, rows["mix.weight"]


class _EinsumLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.E = nn.Parameter(torch.randn(3, 6))  # [out, in], a layer in einsum form

    def forward(self, x):
        return torch.einsum("bi,oi->bo", torch.relu(self.fc(x)), self.E)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_parameter_read_by_einsum_is_listed_with_the_form_that_makes_it_a_site(frontend):
    """A raw parameter multiplied in by torch.einsum was in no row: no site, no reason, no warning (under
    torch.export too, whose graph calls aten's einsum, not torch.einsum)."""
    rows = _by_name(pbp_fx.explain_sites(_EinsumLayer(), (torch.randn(2, 4),), frontend=frontend))
    assert rows["fc"].status == "site"
    assert rows["E"].status == "not a site" and rows["E"].kind == "einsum"
    assert rows["E"].reason.startswith("read by einsum(), which is no Linear/Conv op pbp-fx perforates: write the "
                                       "product as F.linear(x, W) or x @ W")


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_norms_wide_affine_is_no_candidate_weight(frontend):
    """LayerNorm([8, 6, 6]) holds a 3-D weight: listed as a missed neuron weight, with fx's hint that
    frontend='export' would reach it (where it is no site either)."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.ln, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.LayerNorm([8, 6, 6]), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.ln(self.c(x))).mean((2, 3)))

    rows = pbp_fx.explain_sites(M(), (torch.randn(2, 3, 6, 6),), frontend=frontend)
    assert [r.name for r in rows if r.name.startswith("ln")] == []
    assert {r.name for r in rows if r.status == "site"} == {"c", "fc"}


class _LeftProjection(nn.Module):
    """W @ x over [B, C, T]: a per-position channel projection (a 1x1 conv in all but form)."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(7, 5))
        self.o = nn.Linear(7, 2)

    def forward(self, x):
        return self.o(torch.tanh(torch.matmul(self.W, x)).mean(-1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_parameter_multiplied_from_the_left_is_listed_with_the_form_that_makes_it_a_site(frontend):
    """torch.matmul(W, x) was in no row at all (einsum beside it was listed), a reviewer."""
    rows = _by_name(pbp_fx.explain_sites(_LeftProjection(), (torch.randn(2, 5, 3),), frontend=frontend))
    assert rows["o"].status == "site"
    assert rows["W"].status == "not a site", rows
    assert rows["W"].reason.startswith("read by ") and "write the product as F.linear(x, W) or x @ W" in rows["W"].reason


class _ViewedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4 * 3 * 9))
        self.o = nn.Linear(4, 2)

    def forward(self, img):
        return self.o(F.conv2d(img, self.w.view(4, 3, 3, 3), padding=1).mean((2, 3)))


def test_a_conv_weight_viewed_from_a_flat_parameter_is_said_to_be_a_view_and_perforate_warns():
    """It read "its weight is not a parameter (a buffer or ...)" and perforate said nothing; a weight sliced from a
    2-D parameter got a reason and the warning."""
    rows = _by_name(pbp_fx.explain_sites(_ViewedConv(), (torch.randn(2, 3, 5, 5),)))
    assert rows["w"].status == "not a site" and rows["w"].kind == "conv2d"
    assert rows["w"].reason.startswith("the layer's weight is a part or view of this parameter taken at run time")
    with pytest.warns(pbp_fx.PBWarning, match="not sites, so PB adds no dendrites there: w"):
        pbp_fx.perforate(_ViewedConv(), (torch.randn(2, 3, 5, 5),))


def test_cross_attentions_packed_projection_is_said_to_be_split_not_computed():
    """nn.MultiheadAttention splits its packed in_proj_weight where query and key/value differ: the row said the
    weight was "computed at run time (e.g. standardized in forward)", which gave the user nothing to act on
    (torch.export's graph: symbolic tracing keeps the attention whole)."""
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, q, kv):
            return self.head(self.attn(q, kv, kv, need_weights=False)[0])

    rows = _by_name(pbp_fx.explain_sites(Cross(), (torch.randn(2, 3, 8), torch.randn(2, 5, 8)), frontend="export"))
    packed = rows["attn.in_proj_weight"]
    assert packed.status == "not a site", rows
    assert packed.reason.startswith("the layer's weight is a part or view of this parameter taken at run time"), packed


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_transposed_copy_of_a_parameter_is_said_to_be_a_view(frontend):
    """F.linear(x, W.T.contiguous()) read 'computed at run time (e.g. standardized in forward)' (a reviewer)."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(4, 3))
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(F.linear(x, self.W.T.contiguous()))

    rows = _by_name(pbp_fx.explain_sites(M(), (torch.randn(2, 4),), frontend=frontend))
    assert rows["W"].reason.startswith("the layer's weight is a part or view of this parameter"), rows["W"]
