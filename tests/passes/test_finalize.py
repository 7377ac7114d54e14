"""passes.finalize: one FusedSite per site with K >= 1, plain layers for K = 0, input untouched."""
import collections
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from transformers.utils import ModelOutput

import pbp_fx
from parts_models import OrderedOut, ReadsItsLayer, grown_leaf_reader
from pbp_fx.exporters import ort_session
from pbp_fx.passes import finalize, fuse_site
from pbp_fx.passes.finalize import FUSED_ATTR
from pbp_fx.passes.insert_dendrites import SITES_ATTR
from pbp_fx.modes import ModeSwitch
from pbp_fx.site import CandidatePool, FusedSite, FusedSwappedNeuron, Site, SwappedNeuron

pytestmark = pytest.mark.usefixtures("seeded")


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else self.b(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, groups=3)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 6)
        self.leaf = Branchy()
        self.w = nn.Parameter(torch.randn(2, 6) * 0.3)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        h = F.relu(self.bn2(self.conv2(h)) + h)
        h = h.mean((2, 3))
        h = self.leaf(torch.tanh(self.fc(h)))
        return F.linear(h, self.w)


SITES = ["conv", "conv2", "fc", "w", "leaf.a", "leaf.b"]


def _prepared(k: dict, pb):
    """A perforated Net with k[name] dendrites per site, random V/U, warmed BN, in eval mode."""
    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 3, 6, 6)
    pm = pbp_fx.perforate(model, (x,))
    assert list(pm.sites) == SITES
    for name, site in pm.sites.items():
        for _ in range(k.get(name, 0)):
            site.grow()
    pb.randomize(pm, 0.5)
    pb.warm(pm, (x,))
    return pm.eval(), x


def _inputs(x):
    return [x, x.abs() + 0.1, -x.abs() - 0.1]  # both branches of the leaf


def _kinds(gm):
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out[n.target] = type(gm.get_submodule(n.target))
    return out


@pytest.mark.parametrize("k", [
    {name: 1 for name in SITES},
    {name: 3 for name in SITES},
    {"conv": 2, "fc": 1, "leaf.b": 3},         # mixed, some K = 0
    {},                                          # nothing grown: the plain model
], ids=["k1", "k3", "mixed", "k0"])
def test_postconditions_and_exactness(k, pb):
    pm, x = _prepared(k, pb)
    fused = finalize(pm.graph_module)
    assert isinstance(fused, fx.GraphModule)
    fused.graph.lint()
    assert not fused.training and not any(m.training for m in fused.modules())
    assert not any(p.requires_grad for p in fused.parameters())
    mods = dict(fused.named_modules())
    assert not any(isinstance(m, (Site, SwappedNeuron, CandidatePool)) for m in mods.values())
    assert not hasattr(fused, SITES_ATTR)
    grown = {n for n in SITES if k.get(n, 0)}
    fused_sites = {m.name: m for m in mods.values() if isinstance(m, FusedSite)}
    assert set(fused_sites) == grown
    assert all(fused_sites[n].num_dendrites == k[n] for n in grown)
    calls = _kinds(fused)
    # K = 0 sites are the plain layers (with their norms); K >= 1 neurons and norms are gone
    for name, norm in (("conv", "bn"), ("conv2", "bn2"), ("fc", None)):
        assert (name in calls) == (name not in grown)
        if norm:
            assert (norm in calls) == (name not in grown)
    for name in ("a", "b"):
        got = fused.get_submodule(f"leaf.{name}")
        if f"leaf.{name}" in grown:  # (a fused site that answers the leaf's reads of its layer's attributes)
            assert type(got) is FusedSwappedNeuron and type(got.fused) is FusedSite
            assert got.weight.shape == (6, 6) and got.out_features == 6
        else:
            assert type(got) is nn.Linear
    has_linear = any(n.op == "call_function" and n.target is F.linear for n in fused.graph.nodes)
    assert has_linear == ("w" not in grown)
    assert (FUSED_ATTR in dict(fused.named_children())) == bool(grown & {"conv", "conv2", "fc", "w"})
    for xi in _inputs(x):
        assert pb.max_diff(fused(xi), pm(xi)) <= 1e-5


def test_input_graph_is_not_modified(pb):
    pm, x = _prepared({n: 2 for n in SITES}, pb)
    gm = pm.graph_module
    code, names = gm.code, [n for n, _ in gm.named_modules()]
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    y = pm(x)
    pm.train()
    fused = finalize(gm)
    assert gm.training and fused is not gm
    assert gm.code == code and [n for n, _ in gm.named_modules()] == names
    assert all(torch.equal(state[k], v) for k, v in gm.state_dict().items())
    assert isinstance(gm.get_submodule("leaf.a"), SwappedNeuron)
    assert all(p.requires_grad for n, p in gm.named_parameters() if "out_weight" in n)
    pm.eval()
    assert pb.max_diff(pm(x), y) == 0.0
    assert pm.num_dendrites == {n: 2 for n in SITES}


def test_fused_site_holds_neuron_and_dendrites_as_one_layer(pb):
    pm, x = _prepared({"conv": 2}, pb)
    site = pm.sites["conv"]
    fused = finalize(pm.graph_module)
    fs = fused.get_submodule(f"{FUSED_ATTR}.conv")
    assert fs.weight.shape == (3 * 6, 3, 3, 3) and fs.bias.shape == (3, 6)  # 1+K blocks of C rows; BN folded: a bias
    assert torch.equal(fs.out_weight, site.out_weight) and torch.equal(fs.cascade, site.cascade)
    # Row 0 is the neuron with its BatchNorm folded in.
    bn, conv = pm.graph_module.bn, pm.graph_module.conv
    assert pb.max_diff(F.conv2d(x, fs.weight[:6], fs.bias[0], padding=1), bn(conv(x))) < 1e-5
    assert [n.target for n in fused.graph.nodes if n.op == "call_module"][0] == f"{FUSED_ATTR}.conv"


def test_fuse_site_on_its_own(pb):
    lin = nn.Linear(5, 4, bias=False)
    pm = pbp_fx.perforate(nn.Sequential(lin), (torch.randn(2, 5),))
    site = pm.sites["0"]
    site.grow()
    site.grow()
    pb.randomize(pm)
    fs = fuse_site(site, lin.weight.detach(), None)
    assert fs.weight.shape == (3 * 4, 5) and fs.bias is None  # dendrites copy the layer: no bias either
    assert torch.equal(fs.neuron_tensors()[0], lin.weight)
    assert torch.equal(fs.dendrite_tensors()[0], site.dendrites.weight)
    x = torch.randn(3, 7, 5)  # tokens
    assert pb.max_diff(fs(x), pm(x)) < 1e-6


def test_finalize_in_the_dendrite_phase_drops_candidates(pb):
    pm, x = _prepared({n: 1 for n in SITES}, pb)
    y = pm(x)
    pm.start_dendrite_phase(pool=2)
    fused = finalize(pm.graph_module)
    assert not any(isinstance(m, CandidatePool) for m in fused.modules())
    assert pb.max_diff(fused(x), y) <= 1e-5
    assert all(s.candidates is not None for s in pm.sites.values())  # the input keeps them


def test_perforated_model_finalize_is_the_pass(pb):
    pm, x = _prepared({"fc": 1, "leaf.a": 2}, pb)
    fused = pm.finalize()
    assert {m.name for m in fused.modules() if isinstance(m, FusedSite)} == {"fc", "leaf.a"}
    for xi in _inputs(x):
        assert pb.max_diff(fused(xi), pm(xi)) <= 1e-5


def test_sites_whose_names_share_a_key_fuse_separately(pb):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Module()
            self.a.b = nn.Linear(3, 3)
            self.a_b = nn.Linear(3, 2)

        def forward(self, x):
            return self.a_b(torch.relu(self.a.b(x)))

    x = torch.randn(4, 3)
    pm = pbp_fx.perforate(M(), (x,))
    pm.grow()
    pb.randomize(pm)
    fused = pm.eval().finalize()
    assert sorted(m.name for m in fused.modules() if isinstance(m, FusedSite)) == ["a.b", "a_b"]
    assert pb.max_diff(fused(x), pm(x)) <= 1e-6


class PartBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.3)
        self.leaf = Branchy()

    def forward(self, x):
        h = self.drop(F.relu(self.bn(self.conv(x)))).mean((2, 3))
        return self.leaf(h)


class UntraceableRoot(nn.Module):
    """The root keeps a data-dependent number of rows (no fx, no torch.export): its backbone
    (a norm, a dropout and an untraceable leaf inside) and head are perforated in place."""

    def __init__(self):
        super().__init__()
        self.backbone = PartBackbone()
        self.head = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))

    def forward(self, x):
        h = self.backbone(x)
        keep = max(int((h[:, 0] > 0).sum()), 1)
        return self.head(h[:keep])


@pytest.mark.parametrize("grow", ["all", "some"])
def test_parts_traced_in_place_are_fused(grow, pb):
    torch.manual_seed(0)
    x = torch.randn(5, 3, 6, 6)
    with pytest.warns(UserWarning, match="perforated in place"):
        pm = pbp_fx.perforate(UntraceableRoot(), (x,))
    assert pm.graph_module.meta["pbp_frontend"] == "parts"
    names = ["backbone.conv", "backbone.leaf.a", "backbone.leaf.b", "head.0", "head.2"]
    assert sorted(pm.sites) == names
    grown = names if grow == "all" else ["backbone.conv", "backbone.leaf.a", "head.2"]
    for name in grown:
        pm.sites[name].grow()
    pb.randomize(pm, 0.5)
    pb.warm(pm, (x,))
    pm.eval()
    fused = finalize(pm.graph_module)
    mods = list(fused.modules())
    assert not any(isinstance(m, (Site, SwappedNeuron, CandidatePool, ModeSwitch)) for m in mods)
    assert sorted(m.name for m in mods if isinstance(m, FusedSite)) == sorted(grown)
    assert not any(m.training for m in mods) and not any(p.requires_grad for p in fused.parameters())
    for xi in _inputs(x):
        assert pb.max_diff(fused(xi), pm(xi)) <= 1e-5
    assert any(isinstance(m, SwappedNeuron) for m in pm.graph_module.modules())  # the input is kept


def test_a_finalized_graph_is_refused_in_one_line():
    """finalize(finalize(gm)) replaced the fused modules with an empty dict, then looked the sites up
    in it: a raw AttributeError from torch's get_submodule."""
    pm = pbp_fx.perforate(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), (torch.randn(4, 8),))
    pm.grow()
    with pytest.raises(ValueError, match="finalized already") as err:
        finalize(finalize(pm.graph_module))
    assert "\n" not in str(err.value)


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm is deprecated")
@pytest.mark.parametrize("hooked", ["weight_norm", "spectral_norm", "prune"])
def test_weights_recomputed_by_forward_hooks_are_fused_as_the_parameters_give_them(hooked):
    """torch.nn.utils.weight_norm / spectral_norm / prune recompute the weight before each forward:
    fused right after an optimizer step, the site took the weight of the step before (2e-2 off;
    after a load into a fresh model, the fresh model's weight)."""
    def prune(layer):
        return nn.utils.prune.random_unstructured(layer, "weight", amount=0.5)

    wrap = prune if hooked == "prune" else getattr(nn.utils, hooked)
    model = nn.Sequential(wrap(nn.Conv2d(3, 8, 3)), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 3))
    x = torch.randn(5, 3, 8, 8)
    pm = pbp_fx.perforate(model, (x,))
    pm.grow()
    optimizer = torch.optim.SGD(pm.parameters(), lr=0.5)
    pm(torch.randn(16, 3, 8, 8)).pow(2).mean().backward()
    optimizer.step()
    final = finalize(pm.graph_module)  # no forward since the step
    pm.eval()
    torch.testing.assert_close(final(x), pm(x))


def test_a_leaf_reading_its_layers_attributes_reads_the_layers_after_finalize():
    """finalize swapped in a FusedSite: `out_features` raised AttributeError, and `weight.shape[0]` read the
    fused [1 + K, C, in] weight's 2 where the layer's is 3, silently."""
    pm, x = grown_leaf_reader()
    assert isinstance(pm.graph_module.get_submodule("0.fc"), SwappedNeuron)
    fused = pm.finalize()
    torch.testing.assert_close(fused(x), pm(x), rtol=1e-5, atol=1e-5)
    assert fused.get_submodule("0.fc").weight.shape == (3, 4)
    double = fused.double()  # (the layer the leaf reads follows the model's dtype)
    assert fused.get_submodule("0.fc").weight.dtype == torch.float64
    torch.testing.assert_close(double(x.double()), pm(x).double(), rtol=1e-5, atol=1e-5)


def _with_user_hooks(layer: nn.Module) -> nn.Module:
    layer.register_forward_pre_hook(lambda m, args: (args[0] + 1,))
    layer.register_forward_hook(lambda m, args, out: out * 2)
    return layer


def _grown(pm):
    pm.grow()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if name.endswith("out_weight"):
                p.fill_(0.3)
    return pm.eval()


def test_a_sites_layer_with_forward_hooks_keeps_them_after_finalize():
    """The fused site computed the neuron itself, so the layer's hooks (the user's: a pre-hook on
    its input, a hook on its output) did not run: 0.65 off with a dendrite at V = 0."""
    model = nn.Sequential(_with_user_hooks(nn.Linear(6, 8)), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(5, 6)
    pm = _grown(pbp_fx.perforate(model, (x,)))
    fused = pm.finalize()
    torch.testing.assert_close(fused(x), pm(x), rtol=1e-5, atol=1e-5)
    assert sum(isinstance(m, FusedSite) for m in fused.modules()) == 2  # (the hooked one adds its dendrites)


def test_a_hooked_layer_inside_an_untraceable_leaf_keeps_its_hooks_after_finalize():
    model = nn.Sequential(ReadsItsLayer(), nn.Linear(3, 2)).eval()
    _with_user_hooks(model[0].fc)
    x = torch.randn(5, 4)
    pm = _grown(pbp_fx.perforate(model, (x,)))
    assert isinstance(pm.graph_module.get_submodule("0.fc"), SwappedNeuron)
    fused = pm.finalize()
    assert isinstance(fused.get_submodule("0.fc"), FusedSwappedNeuron)
    torch.testing.assert_close(fused(x), pm(x), rtol=1e-5, atol=1e-5)


def test_a_model_that_keeps_a_module_training_finalizes():
    """Its train() keeps the BatchNorm training (batch statistics at inference): finalize refused it as a
    ContractError, a bug of pbp-fx (the diff review)."""
    class KeepsTraining(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn, self.fc2 = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)

        def train(self, mode=True):
            super().train(mode)
            self.bn.train(True)
            return self

        def forward(self, x):
            return self.fc2(self.bn(self.fc(x)))

    x = torch.randn(3, 4)
    pm = pbp_fx.perforate(KeepsTraining(), (x,), frontend="parts")
    pm.grow()
    assert pm.finalize()(x).shape == (3, 2)


def test_its_ensures_are_checked_and_a_graph_that_breaks_them_is_named(pb):
    from pbp_fx.passes import ContractError
    from pbp_fx.passes.finalize import ensures_finalized

    pm, x = _prepared({"conv": 1, "leaf.a": 1}, pb)
    fused = finalize(pm.graph_module)
    ensures_finalized(fused)  # (finalize ran it too)
    fused.train()
    with pytest.raises(ContractError, match="in train mode"):
        ensures_finalized(fused)
    fused.eval()
    fused.get_submodule("bn2").train()  # (the model's own module: its train() may keep it so)
    ensures_finalized(fused)
    fused.add_submodule("stray", pm.sites["fc"])
    node = next(n for n in fused.graph.nodes if n.op == "output")
    with fused.graph.inserting_before(node):
        fused.graph.call_module("stray", (node.args[0], node.args[0]))
    with pytest.raises(ContractError, match="calling a Site"):
        ensures_finalized(fused)
    fused = finalize(pm.graph_module)
    fused.leaf.a = SwappedNeuron(nn.Linear(6, 6), pm.sites["leaf.a"])
    with pytest.raises(ContractError, match="left a SwappedNeuron at 'leaf.a'"):
        ensures_finalized(fused.eval())


def test_a_finalized_conv_model_converts_to_channels_last(pb):
    """The fused conv2d weight was 5-D ([1+K, C, ...]): final.to(memory_format=torch.channels_last) raised
    "required rank 4 tensor to use channels_last format". A state_dict of that layout still loads."""
    pm, x = _prepared({"conv": 2}, pb)
    final = finalize(pm.graph_module)
    want = final(x)
    old_layout = {k: v.unflatten(0, (3, -1)) if k.endswith("conv.weight") and FUSED_ATTR in k else v
                  for k, v in final.state_dict().items()}
    final.to(memory_format=torch.channels_last)
    assert final.get_submodule(f"{FUSED_ATTR}.conv").weight.is_contiguous(memory_format=torch.channels_last)
    assert pb.max_diff(final(x.contiguous(memory_format=torch.channels_last)), want) < 1e-5
    twin = finalize(pm.graph_module)
    assert any(v.dim() == 5 for v in old_layout.values())
    twin.load_state_dict(old_layout)
    assert pb.max_diff(twin(x), want) < 1e-6



@dataclasses.dataclass
class _HeadOutput(ModelOutput):
    logits: torch.Tensor = None
    hidden: tuple = None


class _Head(OrderedOut):
    def forward(self, x):
        h = torch.relu(self.a(x))
        return _HeadOutput(logits=self.b(h), hidden=(x, h))


class _KeysNoIdentifiers(OrderedOut):
    def forward(self, x):
        h = torch.relu(self.a(x))
        return collections.OrderedDict([("layer1.out", h), (3, self.b(h)), ("class", h)])


@pytest.mark.parametrize("model_class", [OrderedOut, _Head, _KeysNoIdentifiers])
def test_a_finalized_fx_capture_returns_the_structure_the_model_returned(model_class, tmp_path):
    """fx writes a ModelOutput (an OrderedDict) as a plain dict: the finalized model returned that
    dict (`final(x).logits` failed), through pickling and torch.export alike."""
    model = model_class()
    x = torch.randn(5, 3)
    pm = pbp_fx.perforate(model, (x,), frontend="fx")
    pm.grow()
    final = pm.finalize()
    out, want = final(x), pm(x)
    assert type(out) is type(model(x)) and list(out) == list(want)
    key = list(want)[-2]  # (logits, or the int key)
    torch.testing.assert_close(out[key], want[key])
    torch.save(final, tmp_path / "final.pt")  # (unpickling traces the graph's code again)
    assert type(torch.load(tmp_path / "final.pt", weights_only=False)(x)) is type(out)
    assert type(torch.export.export(final, (x,)).module()(x)) is type(out)


def test_a_finalized_parts_capture_takes_the_forwards_parameters_so_torch_export_runs_it():
    """torch.export of a finalized frontend="parts" capture failed: its interpreter hands a graph its inputs flat, and
    the graph's `*args, **kwargs` placeholders each took a list ("argument after ** must be a mapping, not list")."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x, scale: float = 2.0, *, shift=None):
            h = self.b(torch.relu(self.a(x))) * scale
            return h if shift is None else h + shift

    class Open(Scaled):
        def forward(self, x, **kwargs):
            return super().forward(x)

    x, shift = torch.randn(3, 4), torch.randn(3, 2)
    pm = pbp_fx.perforate(Scaled(), (x,), frontend="parts")
    pm.grow()
    final = pm.finalize()
    assert [n.target for n in final.graph.nodes if n.op == "placeholder"] == ["x", "scale", "shift"]
    pm.eval()
    with torch.no_grad():
        for args, kwargs in (((x,), {}), ((x, 3.0), {}), ((x,), {"shift": shift})):
            torch.testing.assert_close(final(*args, **kwargs), pm(*args, **kwargs), rtol=0, atol=1e-6)
        exported = torch.export.export(final, (x,)).module()
        torch.testing.assert_close(exported(x), final(x), rtol=0, atol=0)
    opened = pbp_fx.perforate(Open(), (x,), frontend="parts").finalize()  # (**kwargs: the call as it was)
    assert [n.target for n in opened.graph.nodes if n.op == "placeholder"] == ["*args", "**kwargs"]
    assert opened(x).shape == (3, 2)


class _CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


class _OneWeightTwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("model_fn, keys", [(_CalledTwice, ("fc", "fc_at1")), (_OneWeightTwoLayers, ("a", "b"))])
def test_a_weight_that_several_sites_read_stays_one_parameter_after_finalize(model_fn, keys, tmp_path):
    """Each such site held its own copy once dendrites were fused: fine-tuning the finalized model trained the
    copies apart (README: tied weights stay tied after finalize)."""
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    pm = pbp_fx.perforate(model_fn(), x)
    pm.start_dendrite_phase(pool=2)
    pm.install_candidates(v_init=0.3)
    pm.eval()
    final = pm.finalize()
    torch.testing.assert_close(final(x), pm(x))
    first, second = (final.get_submodule(f"{FUSED_ATTR}.{k}") for k in keys)
    assert first.neuron_weight is second.neuron_weight
    final.requires_grad_(True)
    final(x).pow(2).mean().backward()
    torch.optim.SGD(final.parameters(), lr=0.1).step()
    assert torch.equal(first.neuron_tensors()[0], second.neuron_tensors()[0])
    final.requires_grad_(False)
    path = pbp_fx.export_onnx(final, (x,), str(tmp_path / "m.onnx"))
    got = ort_session(path).run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), final(x), rtol=1e-4, atol=1e-5)


class _TiedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return torch.tanh(self.fc(x))


class _UntraceableTiedRoot(nn.Module):
    """Two blocks sharing one weight under a root fx cannot trace: each block is its own part."""

    def __init__(self):
        super().__init__()
        self.b1, self.b2, self.out = _TiedBlock(), _TiedBlock(), nn.Linear(6, 3)
        self.b2.fc.weight = self.b1.fc.weight

    def forward(self, x):
        if float(x.sum()) > 1e9:  # (data-dependent: no symbolic trace of the root)
            return x
        return self.out(self.b2(self.b1(x)))


def test_a_weight_shared_across_parts_stays_one_parameter_after_finalize():
    """Each part was retied on its own: the two sites of one weight in two parts held copies (a reviewer)."""
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    pm = pbp_fx.perforate(_UntraceableTiedRoot(), (x,), frontend="parts")
    pm.start_dendrite_phase(pool=2)
    pm.install_candidates(v_init=0.3)
    pm.eval()
    final = pm.finalize()
    torch.testing.assert_close(final(x), pm(x))
    sites = [m for name, m in final.named_modules() if isinstance(m, FusedSite) and name.endswith("_fc")]
    assert len(sites) == 2 and sites[0].neuron_weight is sites[1].neuron_weight
