"""perforate() and PerforatedModel end to end: exactness, sites, module behaviour, filters,
phases, and property-based checks over random architectures."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import pbp_fx
from parts_models import FunctionalDropout, OrderedOut
from pbp_fx.config import ConfigError
from pbp_fx.site import CandidatePool, FusedSite, SwappedNeuron

pytestmark = pytest.mark.usefixtures("seeded")


# ---------------------------------------------------------------------------------------
# A zoo of architectures: (factory, input shape, expected site names)
# ---------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, bn=False, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(6, 8, bias=bias)
        self.bn1 = nn.BatchNorm1d(8) if bn else nn.Identity()
        self.fc2 = nn.Linear(8, 8, bias=bias)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.bn1(self.fc1(x)))
        h = h + torch.tanh(self.fc2(h))  # residual
        return self.head(h)


class CNN(nn.Module):
    """conv-BN-ReLU, residual add, cat, pooling, flatten/view, grouped and depthwise convs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.dw_bn = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(16, 6, 1)
        self.fc = nn.Linear(6 * 2 * 2, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        y = F.gelu(self.grouped(x)) + x
        z = F.silu(self.dw_bn(self.dw(y)))
        h = self.pw(torch.cat([y, z], dim=1))
        h = F.max_pool2d(F.relu(h), 2)
        h = F.adaptive_avg_pool2d(h, 2)
        return self.fc(h.view(h.shape[0], -1))


class Attention(nn.Module):
    """Self-attention written with Linear + matmul + softmax, on tokens [B, T, C]."""

    def __init__(self, d=8):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.ff = nn.Linear(d, 2 * d)
        self.ff2 = nn.Linear(2 * d, d)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-2, -1) / 8 ** 0.5, dim=-1)
        x = x + self.proj(a @ self.v(x))
        return x + self.ff2(F.gelu(self.ff(x)))


class Shared(nn.Module):
    """One Linear called three times: one site per call."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        return self.out(self.fc(torch.relu(self.fc(torch.relu(self.fc(x))))))


class Functional(nn.Module):
    """F.linear / F.conv2d / F.batch_norm with get_attr parameters."""

    def __init__(self):
        super().__init__()
        self.cw = nn.Parameter(torch.randn(4, 2, 3, 3) * 0.3)
        self.cb = nn.Parameter(torch.randn(4) * 0.1)
        self.register_buffer("rm", torch.randn(4) * 0.1)
        self.register_buffer("rv", torch.rand(4) + 0.5)
        self.g = nn.Parameter(torch.rand(4) + 0.5)
        self.b = nn.Parameter(torch.randn(4) * 0.1)
        self.lw = nn.Parameter(torch.randn(3, 4 * 4 * 4) * 0.1)

    def forward(self, x):
        h = F.conv2d(x, self.cw, self.cb, stride=1, padding=1)
        h = F.relu(F.batch_norm(h, self.rm, self.rv, self.g, self.b, False, 0.1, 1e-5))
        h = torch.flatten(F.avg_pool2d(h, 2), 1)
        return F.linear(h, self.lw)


class Chain(nn.Module):
    """Site outputs feeding the next neuron directly (no activation in between)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(3, 6, 3)
        self.bn = nn.BatchNorm1d(6)
        self.b = nn.Conv1d(6, 4, 1)
        self.c = nn.Linear(7, 5)
        self.d = nn.Linear(5, 2)

    def forward(self, x):
        return self.d(self.c(self.b(self.bn(self.a(x)))))


class Nd(nn.Module):
    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv3d(2, 3, 3, padding=1)
        self.bn3 = nn.BatchNorm3d(3)
        self.pad = nn.Conv3d(3, 2, 3, padding=1, padding_mode="circular")

    def forward(self, x):
        return self.pad(torch.relu(self.bn3(self.c3(x))))


class WithLeaf(nn.Module):
    """An untraceable submodule: its neurons are perforated by module swapping."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.block = Branchy()
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.relu(self.block(self.inp(x))))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.conv = nn.Conv1d(1, 1, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return self.conv(x.unsqueeze(1)).squeeze(1)


class Nested(nn.Module):
    """An untraceable module holding an untraceable module."""

    def __init__(self):
        super().__init__()
        self.inner = Branchy()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.inner(x)
        if y.mean() > 0:
            return self.fc(y)
        return self.fc(-y)


ZOO = {
    "mlp": (lambda: MLP(), (5, 6), ["fc1", "fc2", "head"]),
    "mlp_bn_nobias": (lambda: MLP(bn=True, bias=False), (5, 6), ["fc1", "fc2", "head"]),
    "cnn": (lambda: CNN(), (2, 3, 8, 8), ["stem", "grouped", "dw", "pw", "fc"]),
    "attention": (lambda: Attention(), (2, 5, 8), ["q", "k", "v", "proj", "ff", "ff2"]),
    "shared": (lambda: Shared(), (4, 5), ["fc", "fc@1", "fc@2", "out"]),
    "functional": (lambda: Functional(), (2, 2, 8, 8), ["cw", "lw"]),
    "chain": (lambda: Chain(), (3, 3, 9), ["a", "b", "c", "d"]),
    "conv3d": (lambda: Nd(), (2, 2, 3, 4, 4), ["c3", "pad"]),
    "leaf": (lambda: WithLeaf(), (3, 3), ["inp", "out", "block.fc", "block.conv"]),
    "nested_leaf": (lambda: nn.Sequential(nn.Linear(4, 4), Nested()), (3, 4), ["0", "1.inner.fc", "1.inner.conv", "1.fc"]),
}
# Sites whose BatchNorm joins the site.
NORMS = {"mlp_bn_nobias": {"fc1"}, "cnn": {"stem", "dw"}, "functional": {"cw"}, "chain": {"a"}, "conv3d": {"c3"}}


def _make(name, seed=0):
    factory, shape, _ = ZOO[name]
    torch.manual_seed(seed)
    return factory(), torch.randn(shape)


def _inputs_both_branches(x):
    return [x, -x.abs() - 0.1, x.abs() + 0.1]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_sites_found(name):
    model, x = _make(name)
    pm = pbp_fx.perforate(model, (x,))
    assert list(pm.sites) == ZOO[name][2]
    assert {n for n, s in pm.sites.items() if s.norm is not None} == NORMS.get(name, set())
    assert all(s.num_dendrites == 0 for s in pm.sites.values())


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_exact_after_perforate_and_grow(name, train, pb):
    model, x = _make(name)
    pb.warm(model, (x,))
    model.train(train)
    pm = pbp_fx.perforate(model, (x,))
    pm.train(train)
    for xi in _inputs_both_branches(x):
        assert pb.max_diff(pm(xi), model(xi)) <= 1e-6
    pm.grow()
    pm.grow()
    assert all(s.num_dendrites == 2 for s in pm.sites.values())
    for xi in _inputs_both_branches(x):
        assert pb.max_diff(pm(xi), model(xi)) <= 1e-6  # V = 0: dendrites add nothing


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_finalize_matches_eval(name, k, pb):
    model, x = _make(name)
    pm = pbp_fx.perforate(model, (x,))
    for _ in range(k):
        pm.grow()
    pb.randomize(pm, scale=0.5)
    pb.warm(pm, (x,))  # neuron and dendrite BatchNorm statistics become non-trivial
    pm.eval()
    fused = pm.finalize()
    for xi in _inputs_both_branches(x):
        want = pm(xi)
        assert pb.max_diff(want, model.eval()(xi)) > 1e-3  # the dendrites do change the output
        assert pb.max_diff(fused(xi), want) <= 1e-5
    mods = list(fused.modules())
    assert sum(isinstance(m, FusedSite) for m in mods) == len(ZOO[name][2])
    assert not any(isinstance(m, (pbp_fx.Site, SwappedNeuron, CandidatePool)) for m in mods)


# ---------------------------------------------------------------------------------------
# The neuron axis
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,shape,axis", [
    (nn.Linear(4, 3), (2, 4), -1),
    (nn.Linear(4, 3), (2, 5, 4), -1),        # tokens [B, T, C]: the last dim
    (nn.Linear(4, 3), (2, 6, 5, 4), -1),
    (nn.Conv1d(4, 3, 1), (2, 4, 5), 1),     # [B, C, L]: dim 1
    (nn.Conv2d(4, 3, 1), (2, 4, 5, 5), 1),
], ids=["linear", "linear_tokens", "linear_4d", "conv1d", "conv2d"])
def test_dendrite_acts_along_the_neuron_axis(model, shape, axis):
    x = torch.randn(shape)
    pm = pbp_fx.perforate(nn.Sequential(model), (x,))
    (site,) = pm.sites.values()
    assert site.axis == axis
    pm.grow()
    with torch.no_grad():
        site.out_weight[0, 1] = 1.0  # only channel 1 gets a dendrite contribution
    diff = (pm(x) - model(x)).abs().movedim(axis, 0)
    assert diff[1].min().item() > 0  # sigmoid > 0 at every position of channel 1
    assert diff[0].max().item() == 0.0 and diff[2].max().item() == 0.0


def test_norm_joins_the_site_and_each_dendrite_has_its_own_copy(pb):
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    x = torch.randn(6, 2, 5, 5)
    pm = pbp_fx.perforate(model, (x,))
    site = pm.sites["0"]
    assert site.norm is not None
    pm.grow()
    pm.grow()
    assert site.dendrites.norm is not None and site.dendrites.running_mean.shape == (2, 4)
    # The dendrite sum is added after the norm: with V = 1 the output is BN(conv(x)) + sum_k s_k.
    with torch.no_grad():
        site.out_weight.fill_(1.0)
    pm.eval()
    model.eval()
    n = model[1](model[0](x))
    s = torch.sigmoid(site.dendrites(x))  # [B, K, C, H, W]
    with torch.no_grad():
        d = site.dendrites
        s0 = torch.sigmoid(F.batch_norm(F.conv2d(x, d.weight[0], d.bias[0]), d.running_mean[0], d.running_var[0],
                                        d.norm_weight[0], d.norm_bias[0], False, 0.0, d.norm.eps))
    assert pb.max_diff(s[:, 0], s0) < 1e-6
    assert pb.max_diff(pm(x), F.relu(n + s.sum(1))) < 1e-5


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_site_forward_is_pb_spec_section_2(activation, pb):
    """y = n + sum_k V[k] * s_k,  s_k = phi(D_k(x) + sum_{j<k} U[k, j] * s_j), per channel."""
    phi = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}[activation]
    lin = nn.Linear(4, 3)
    x = torch.randn(6, 4)
    pm = pbp_fx.perforate(lin, (x,), activation=activation)
    (site,) = pm.sites.values()
    for _ in range(3):
        site.grow()
    pb.randomize(pm)
    d = site.dendrites
    s = []
    for k in range(3):
        a = F.linear(x, d.weight[k], d.bias[k])
        for j in range(k):
            a = a + site.cascade[k, :, j] * s[j]
        s.append(phi(a))
    want = lin(x) + sum(site.out_weight[k] * s[k] for k in range(3))
    assert pb.max_diff(pm(x), want) < 1e-6
    with torch.no_grad():  # entries with j >= k are never read
        site.cascade[0].fill_(5.0)
        site.cascade[1, :, 1:].fill_(5.0)
        site.cascade[2, :, 2].fill_(5.0)
    assert pb.max_diff(pm(x), want) < 1e-6


# ---------------------------------------------------------------------------------------
# Behaving like a normal module
# ---------------------------------------------------------------------------------------
def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(36, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))


def test_original_model_is_not_modified():
    for model, x in (_make("leaf"), _make("cnn"), (_bn_model(), torch.randn(4, 2, 5, 5))):
        model.train()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        types = [(n, type(m)) for n, m in model.named_modules()]
        pm = pbp_fx.perforate(model, (x,))
        pm.grow()
        pm.train()
        pm(x)  # train-mode forward updates the copy's BN statistics only
        assert [(n, type(m)) for n, m in model.named_modules()] == types
        assert model.training
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert not any(p1 is p2 for p1 in pm.parameters() for p2 in model.parameters())


def test_buffers_and_train_eval_follow(pb):
    model, x = _bn_model(), torch.randn(4, 2, 5, 5)
    pm = pbp_fx.perforate(model, (x,))
    pm.grow()
    names = dict(pm.named_buffers())
    assert "graph_module.1.running_mean" in names
    assert any(n.endswith("dendrites.running_var") for n in names)
    pm.eval()
    assert not any(m.training for m in pm.modules())
    pm.train()
    assert all(m.training for m in pm.modules())
    before = pm.get_buffer("graph_module.1.running_mean").clone()
    pm(x)
    assert not torch.equal(before, pm.get_buffer("graph_module.1.running_mean"))


def test_to_float64(pb):
    model, x = _bn_model(), torch.randn(4, 2, 5, 5)
    pm = pbp_fx.perforate(model, (x,)).to(dtype=torch.float64)
    pm.grow()  # dendrites created after .to() take the new dtype
    pb.randomize(pm, 0.5)
    pm.eval()
    assert all(p.dtype == torch.float64 for p in pm.parameters())
    xd = x.double()
    y = pm(xd)
    assert y.dtype == torch.float64
    assert pb.max_diff(pm.finalize()(xd), y) <= 1e-10
    assert pb.max_diff(pm.float()(x), y) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_to_cuda(pb):
    model, x = _bn_model(), torch.randn(4, 2, 5, 5)
    pm = pbp_fx.perforate(model, (x,)).cuda()
    pm.grow()
    pb.randomize(pm, 0.5)
    pm.eval()
    y = pm(x.cuda())
    assert y.is_cuda
    assert pb.max_diff(pm.finalize()(x.cuda()), y) <= 1e-5
    assert pb.max_diff(pm.cpu()(x), y.cpu()) <= 1e-5


def test_state_dict_round_trip_into_a_fresh_model(pb):
    model, x = _bn_model(), torch.randn(4, 2, 5, 5)
    pm = pbp_fx.perforate(model, (x,))
    pm.grow()
    pm.grow()
    pb.randomize(pm, 0.5)
    pb.warm(pm, (x,))
    pm.eval()
    sd = pm.state_dict()
    fresh = pbp_fx.perforate(model, (x,))  # K = 0
    result = fresh.load_state_dict(sd)  # strict: Site resizes to K = 2 first
    assert not result.missing_keys and not result.unexpected_keys
    fresh.eval()
    assert fresh.num_dendrites == {"0": 2, "4": 2, "7": 2}
    assert pb.max_diff(fresh(x), pm(x)) == 0.0
    assert set(fresh.state_dict()) == set(sd)
    # and back to fewer dendrites
    fresh.load_state_dict(pbp_fx.perforate(model, (x,)).state_dict())
    assert fresh.num_dendrites == {"0": 0, "4": 0, "7": 0}
    assert pb.max_diff(fresh.eval()(x), model.eval()(x)) <= 1e-6


@pytest.mark.parametrize("strict", [True, False])
def test_a_state_of_other_dendrites_into_a_dendrite_phase_is_refused_in_one_line(strict):
    """A K=1 state loaded with strict=False into a model inside a dendrite phase at K=0 resized the sites under
    their pools, and the next training forward failed with an IndexError (strict=True: torch's long list of
    missing candidate keys; a reviewer)."""
    model, x = _bn_model(), torch.randn(4, 2, 5, 5)
    pm = pbp_fx.perforate(model, (x,))
    pm.grow()
    target = pbp_fx.perforate(model, (x,))
    target.start_dendrite_phase(pool=2)
    with torch.no_grad():
        for p in pm.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(pbp_fx.CheckpointError, match=r"^site \S+ has 0 dendrite.s. and a dendrite phase whose "
                                                     r"candidates build on them, and the state loaded into it holds 1: "
                                                     r"call pm.abort_dendrite_phase\(\) before loading it"):
        target.load_state_dict(pm.state_dict(), strict=strict)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # (refused before any tensor loads)
    target.abort_dendrite_phase()
    target.load_state_dict(pm.state_dict(), strict=strict)
    assert target.dendrites == 1


def test_grow_in_eval_mode_stays_in_eval_mode(pb):
    model, x = _bn_model(), torch.randn(4, 2, 5, 5)
    pm = pbp_fx.perforate(model, (x,)).eval()
    pm.grow()
    assert not any(m.training for m in pm.modules())
    pb.randomize(pm)
    before = {n: b.clone() for n, b in pm.named_buffers()}
    y = pm(x)
    assert pb.max_diff(pm(x[:1]), y[:1]) <= 1e-6  # eval: no batch statistics
    assert all(torch.equal(before[n], b) for n, b in pm.named_buffers())


def test_load_state_dict_into_eval_model_stays_in_eval_mode():
    model, x = _bn_model(), torch.randn(4, 2, 5, 5)
    pm = pbp_fx.perforate(model, (x,))
    pm.grow()
    fresh = pbp_fx.perforate(model, (x,)).eval()
    fresh.load_state_dict(pm.state_dict())
    assert not any(m.training for m in fresh.modules())


def test_no_grad_and_perforated_gradients(pb):
    model = nn.Linear(4, 3)
    x = torch.randn(5, 4, requires_grad=True)
    pm = pbp_fx.perforate(model, (x,))
    pm.grow()
    pb.randomize(pm)
    with torch.no_grad():
        y = pm(x)
    assert not y.requires_grad
    site = pm.sites[next(iter(pm.sites))]
    assert not any(p.requires_grad for p in site.dendrites.parameters()) and not site.cascade.requires_grad
    assert site.out_weight.requires_grad
    pm(x).sum().backward()
    # Perforated: the input's gradient comes through the neuron weights only.
    assert pb.max_diff(x.grad, model.weight.sum(0).expand(5, 4)) < 1e-6
    assert site.out_weight.grad is not None and site.out_weight.grad.abs().sum() > 0

    gd = pbp_fx.perforate(model, (x,), mode="gd")
    gd.grow()
    pb.randomize(gd)
    x.grad = None
    gd(x).sum().backward()
    assert pb.max_diff(x.grad, model.weight.sum(0).expand(5, 4)) > 1e-3  # gd: dendrites pass gradient too
    assert all(p.requires_grad for p in gd.sites[next(iter(gd.sites))].dendrites.parameters())


def test_summary_code_and_parameters():
    model, x = _bn_model(), torch.randn(4, 2, 5, 5)
    pm = pbp_fx.perforate(model, (x,))
    rows = pm.summary()
    assert [r["name"] for r in rows] == ["0", "4", "7"]
    assert rows[0] == {"name": "0", "kind": "conv2d", "channels": 4, "norm": True, "dendrites": 0,
                       "params_per_dendrite": 4 * 2 * 9 + 4 + 2 * 4 + 4}
    assert rows[2]["params_per_dendrite"] == 6 * 3 + 3 + 3
    assert pm.num_parameters() == sum(p.numel() for p in model.parameters())
    assert "pbp_sites" in pm.code and "def forward" in pm.code
    pm.grow()
    assert pm.num_parameters() > sum(p.numel() for p in model.parameters()) + sum(r["params_per_dendrite"] for r in rows) - 1


def test_parameter_count_grows_by_params_per_dendrite():
    model, x = _bn_model(), torch.randn(4, 2, 5, 5)
    pm = pbp_fx.perforate(model, (x,))
    for _ in range(3):
        before, expected = pm.num_parameters(), sum(r["params_per_dendrite"] for r in pm.summary())
        pm.grow()
        assert pm.num_parameters() - before == expected


# ---------------------------------------------------------------------------------------
# include / exclude
# ---------------------------------------------------------------------------------------
class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1))
        self.layer2 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.layer2(self.layer1(x)).mean((2, 3))
        return self.fc(self.fc.weight[:, :4].sum() * 0 + h) + self.fc(h)


ALL_BLOCKS = ["layer1.0", "layer1.2", "layer2.0", "fc", "fc@1"]


@pytest.mark.parametrize("include,exclude,expected", [
    (None, None, ALL_BLOCKS),
    ("layer1.*", None, ["layer1.0", "layer1.2"]),
    (["layer1.*", "fc"], None, ["layer1.0", "layer1.2", "fc", "fc@1"]),
    (None, "layer*", ["fc", "fc@1"]),
    (None, "fc@1", ["layer1.0", "layer1.2", "layer2.0", "fc"]),
    (nn.Conv2d, None, ["layer1.0", "layer1.2", "layer2.0"]),
    (None, nn.Conv2d, ["fc", "fc@1"]),
    (lambda name, m: name.endswith(".0"), None, ["layer1.0", "layer2.0"]),
    (None, lambda name, m: isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1), ["layer1.0", "layer2.0", "fc", "fc@1"]),
    ("layer1.*", "layer1.2", ["layer1.0"]),  # exclude wins
    (nn.Conv2d, ["layer2.*", lambda n, m: n == "layer1.2"], ["layer1.0"]),
], ids=["all", "glob", "globs", "exclude_glob", "exclude_reuse", "type", "exclude_type", "callable",
        "exclude_callable", "exclude_wins", "mixed"])
def test_include_exclude(include, exclude, expected):
    pm = pbp_fx.perforate(Blocks(), (torch.randn(2, 2, 5, 5),), include=include, exclude=exclude)
    assert list(pm.sites) == expected


@pytest.mark.parametrize("include,exclude", [
    (None, "*"), ("nothing*", None), (nn.Linear, nn.Linear), ("layer1.*", nn.Conv2d), (nn.LSTM, None)])
def test_nothing_selected_is_no_sites_error(include, exclude):
    # One line: a glob that matched nothing is named in the error itself, not in a warning before it.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(pbp_fx.NoSitesError, match="no Linear/Conv neuron sites in Blocks") as refused:
            pbp_fx.perforate(Blocks(), (torch.randn(2, 2, 5, 5),), include=include, exclude=exclude)
    if include == "nothing*":
        assert "; include pattern 'nothing*' matches no Linear/Conv layer (they are named layer1.0" in str(refused.value)


class _WeightComputedAtRunTime(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 4)

    def forward(self, x):
        return F.linear(x, self.lin.weight * 2, self.lin.bias)


def test_no_sites_names_why_the_models_layers_are_not_sites():
    """A model whose layers are all no sites was told to 'check include=/exclude=, or the model has no such
    layers': neither; explain_sites had the reason."""
    with pytest.raises(pbp_fx.NoSitesError, match=r"^no Linear/Conv neuron sites in _WeightComputedAtRunTime: its 1 "
                                                  r"Linear/Conv layer\(s\) are not sites \(lin: the layer's weight is "
                                                  r"computed at run time .*\); pbp_fx.explain_sites\(model, "
                                                  r"example_inputs\) or pbp-fx transform --explain") as refused:
        pbp_fx.perforate(_WeightComputedAtRunTime(), (torch.randn(2, 6),))
    assert "\n" not in str(refused.value)
    with pytest.raises(pbp_fx.NoSitesError, match=r"\(or all were excluded\): check include=/exclude="):
        pbp_fx.perforate(_WeightComputedAtRunTime(), (torch.randn(2, 6),), exclude="lin")
    # A site that exclude= removed is the reason, not the other layer that is no site
    with_a_site = nn.Sequential(nn.Linear(6, 6), _WeightComputedAtRunTime())
    with pytest.raises(pbp_fx.NoSitesError, match=r"\(or all were excluded\): check include=/exclude="):
        pbp_fx.perforate(with_a_site, (torch.randn(2, 6),), exclude="0")


def test_a_glob_that_matches_no_layer_is_warned_of_naming_the_layers():
    with pytest.warns(UserWarning, match=r"exclude pattern 'layer3\.\*' matches no Linear/Conv layer \(they are "
                                         r"named layer1\.0, layer1\.2, layer2\.0, fc, \.\.\."):
        pm = pbp_fx.perforate(Blocks(), (torch.randn(2, 2, 5, 5),), exclude=["layer3.*", "fc@1"])
    assert list(pm.sites) == ["layer1.0", "layer1.2", "layer2.0", "fc"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pbp_fx.perforate(Blocks(), (torch.randn(2, 2, 5, 5),), include=["layer1.*", nn.Linear], exclude="fc@1")
    # a module type that no module of the model is: exclude=[nn.Conv2d] on an MLP did nothing, silently (a reviewer)
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"exclude type Conv2d matches no module of the model"):
        pm = pbp_fx.perforate(mlp, (torch.randn(2, 4),), exclude=[nn.Conv2d])
    assert list(pm.sites) == ["0", "2"]


def test_model_without_neurons_is_no_sites_error():
    with pytest.raises(pbp_fx.NoSitesError):
        pbp_fx.perforate(nn.Sequential(nn.ReLU(), nn.Flatten()), (torch.randn(2, 3),))


def test_leaf_sites_are_filtered_too():
    model, x = _make("leaf")
    assert list(pbp_fx.perforate(model, (x,), exclude="block.*").sites) == ["inp", "out"]
    assert list(pbp_fx.perforate(model, (x,), include=nn.Conv1d).sites) == ["block.conv"]


def test_bad_arguments():
    with pytest.raises(ConfigError, match="include 3 is not a rule: pass module types, name globs"):
        pbp_fx.perforate(Blocks(), (torch.randn(2, 2, 5, 5),), include=[3])
    with pytest.raises(ValueError, match="activation"):
        pbp_fx.perforate(Blocks(), (torch.randn(2, 2, 5, 5),), activation="swish")
    with pytest.raises(ValueError, match="mode"):
        pbp_fx.perforate(Blocks(), (torch.randn(2, 2, 5, 5),), mode="sgd")


def test_untraceable_root_is_a_trace_error():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(pbp_fx.TraceError, match=r"cannot trace Root\.forward .* at .*test_perforated\.py:\d+"):
        pbp_fx.perforate(Root(), (torch.randn(2, 3),))


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_activations(activation, pb):
    model, x = _make("cnn")
    pm = pbp_fx.perforate(model, (x,), activation=activation)
    assert all(s.activation == activation for s in pm.sites.values())
    pm.grow()
    pb.randomize(pm, 0.5)
    pm.eval()
    assert pb.max_diff(pm.finalize()(x), pm(x)) <= 1e-5


# ---------------------------------------------------------------------------------------
# The dendrite phase (candidates add exactly 0; install with V = 0 changes nothing)
# ---------------------------------------------------------------------------------------
def test_dendrite_phase_keeps_the_output_and_trains_only_candidates(pb):
    model, x = _bn_model(), torch.randn(6, 2, 5, 5)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    pm = pbp_fx.perforate(model, (x,))
    pm.grow()
    pb.randomize(pm, 0.5)
    pm.train()
    y0 = pm(x)  # train mode: batch statistics, so running-stat updates do not matter
    pm.start_dendrite_phase(pool=3)
    assert pm.phase == "dendrite"
    frozen = {n: p.clone() for n, p in pm.named_parameters() if "candidates" not in n}
    cand = list(pm.trainable_parameters())
    assert cand and all(p.requires_grad for p in cand)
    assert not any(p.requires_grad for n, p in pm.named_parameters() if "candidates" not in n)
    opt = torch.optim.SGD(cand, lr=0.05)
    for _ in range(8):
        opt.zero_grad()
        y = pm(x)
        assert pb.max_diff(y, y0) == 0.0  # candidates add exactly 0
        F.cross_entropy(y, target).backward()
        opt.step()
    assert all(torch.equal(frozen[n], p) for n, p in pm.named_parameters() if n in frozen)
    corr = pm.correlations()
    assert set(corr) == set(pm.sites) and all((c > 0).all() for c in corr.values())
    pm.eval()
    fused = pm.finalize()  # candidates are dropped
    assert not any(isinstance(m, CandidatePool) for m in fused.modules())
    assert pb.max_diff(fused(x), pm(x)) <= 1e-5
    pm.install_candidates(v_init=0.0)
    assert pm.phase == "neuron" and pm.num_dendrites == {"0": 2, "4": 2, "7": 2}
    assert all(p.requires_grad for n, p in pm.named_parameters() if "out_weight" in n)
    pm.train()
    assert pb.max_diff(pm(x), y0) <= 1e-6  # the new dendrite's V row is 0


class InplaceBlock(nn.Module):
    """torchvision's BasicBlock style: ReLU(inplace=True) and `out += identity` on site outputs."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


def _inplace_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), InplaceBlock(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def test_inplace_ops_after_sites_in_the_neuron_phase(pb):
    model, x = _inplace_model(), torch.randn(4, 3, 6, 6)
    pm = pbp_fx.perforate(model, (x,))
    assert pb.max_diff(pm(x), model(x)) == 0.0
    pm.grow()
    pb.randomize(pm, 0.5)
    F.cross_entropy(pm(x), torch.tensor([0, 1, 0, 1])).backward()
    assert all(s.out_weight.grad is not None for s in pm.sites.values())


def test_inplace_ops_after_sites_in_the_dendrite_phase():
    model, x = _inplace_model(), torch.randn(4, 3, 6, 6)
    pm = pbp_fx.perforate(model, (x,))
    pm.start_dendrite_phase(pool=2)
    F.cross_entropy(pm(x), torch.tensor([0, 1, 0, 1])).backward()
    assert all(p.grad is not None for p in pm.trainable_parameters())


# ---------------------------------------------------------------------------------------
# Property-based: random MLP / CNN architectures with residuals
# ---------------------------------------------------------------------------------------
ACTS = {"relu": F.relu, "tanh": torch.tanh, "gelu": F.gelu, "none": lambda t: t}


class RandomNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.layers, self.norms = nn.ModuleList(), nn.ModuleList()
        c = cfg["in"]
        self.residual = []  # decided here from the shapes: traceable
        for blk in cfg["blocks"]:
            self.residual.append(blk["residual"] and blk["width"] == c and (cfg["kind"] == "mlp" or blk["stride"] == 1))
            if cfg["kind"] == "mlp":
                self.layers.append(nn.Linear(c, blk["width"], bias=blk["bias"]))
                self.norms.append(nn.BatchNorm1d(blk["width"]) if blk["bn"] else nn.Identity())
            else:
                conv = {1: nn.Conv1d, 2: nn.Conv2d}[cfg["dim"]]
                self.layers.append(conv(c, blk["width"], blk["kernel"], stride=blk["stride"],
                                        padding=blk["kernel"] // 2, groups=blk["groups"], bias=blk["bias"]))
                bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[cfg["dim"]]
                self.norms.append(bn(blk["width"]) if blk["bn"] else nn.Identity())
            c = blk["width"]
        self.head = nn.Linear(c, 3, bias=cfg["head_bias"])

    def forward(self, x):
        for layer, norm, blk, residual in zip(self.layers, self.norms, self.cfg["blocks"], self.residual):
            h = ACTS[blk["act"]](norm(layer(x)))
            x = x + h if residual else h
        if self.cfg["kind"] != "mlp":
            x = torch.flatten(F.adaptive_avg_pool1d(x.flatten(2), 1), 1)
        return self.head(x)


@st.composite
def architectures(draw):
    kind = draw(st.sampled_from(["mlp", "cnn"]))
    cfg = {"kind": kind, "dim": draw(st.sampled_from([1, 2])), "in": draw(st.integers(1, 6)),
           "head_bias": draw(st.booleans()), "blocks": []}
    c = cfg["in"]
    for _ in range(draw(st.integers(1, 4))):
        width = draw(st.sampled_from([c, 2, 3, 4, 6, 8]))
        groups = 1
        if kind == "cnn":
            groups = draw(st.sampled_from([g for g in (1, 2, 3, 4, 6, 8) if c % g == 0 and width % g == 0]))
        cfg["blocks"].append({
            "width": width, "bias": draw(st.booleans()), "bn": draw(st.booleans()),
            "act": draw(st.sampled_from(sorted(ACTS))), "residual": draw(st.booleans()),
            "kernel": draw(st.sampled_from([1, 3])), "stride": draw(st.sampled_from([1, 1, 2])), "groups": groups})
        c = width
    return cfg


def _random_case(cfg, seed):
    torch.manual_seed(seed)
    model = RandomNet(cfg)
    if cfg["kind"] == "mlp":
        x = torch.randn(4, cfg["in"])
    else:
        x = torch.randn(3, cfg["in"], *([9] * cfg["dim"]))
    return model, x


PROPERTY = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@PROPERTY
@given(cfg=architectures(), seed=st.integers(0, 2 ** 16), train=st.booleans())
def test_property_perforate_is_exact_at_zero_v(cfg, seed, train, pb):
    model, x = _random_case(cfg, seed)
    pb.warm(model, (x,))
    model.train(train)
    pm = pbp_fx.perforate(model, (x,))
    pm.train(train)
    assert len(pm.sites) == len(cfg["blocks"]) + 1
    assert pb.max_diff(pm(x), model(x)) <= 1e-6
    pm.grow()
    assert pb.max_diff(pm(x), model(x)) <= 1e-6


@PROPERTY
@given(cfg=architectures(), seed=st.integers(0, 2 ** 16), k=st.integers(1, 3),
       activation=st.sampled_from(["sigmoid", "tanh", "relu"]))
def test_property_finalize_matches_after_grow(cfg, seed, k, activation, pb):
    model, x = _random_case(cfg, seed)
    pm = pbp_fx.perforate(model, (x,), activation=activation)
    for _ in range(k):
        pm.grow()
    pb.randomize(pm, scale=0.5, seed=seed)
    pb.warm(pm, (x,))
    pm.eval()
    want = pm(x)
    tol = 1e-5 * max(1.0, want.abs().max().item())
    assert pb.max_diff(pm.finalize()(x), want) <= tol


class _Keywords(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, labels=None, *, scale: float = 1.0, **extra):
        return self.fc(x) * scale


def test_forward_shows_the_original_signature_and_pickles():
    import inspect
    import pickle

    pm = pbp_fx.perforate(_Keywords(), torch.randn(2, 4))
    want = str(inspect.signature(_Keywords().forward))
    assert str(inspect.signature(pm.forward)) == want
    # Frameworks read the class's forward (Hugging Face's label names): self, then the original's.
    assert list(inspect.signature(type(pm).forward).parameters)[:3] == ["self", "x", "labels"]
    assert isinstance(pm, pbp_fx.PerforatedModel) and type(pm).__name__ == "PerforatedModel"
    x = torch.randn(5, 4)
    clone = copy.deepcopy(pm)
    assert str(inspect.signature(clone.forward)) == want and torch.equal(clone(x), pm(x))
    # Pickles as a recipe (not by class name). Not unpickled here: torch.fx's GraphModule
    # unpickling leaves torch.fx's tracer patching in a state that breaks later traces in
    # this process (torch 2.13; it happened before the per-model class too).
    assert pickle.dumps(pm)


def test_pickling_a_torch_export_capture_is_refused_in_one_line_naming_pbp_fx_save():
    """torch.save(pm) of an export capture failed in pickle with "Can't pickle local object
    'wrap_dunder_call_ctx_manager.<locals>.inner'" (torch.export's input-guard function)."""
    import io

    pm = pbp_fx.perforate(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)), (torch.randn(4, 6),),
                          frontend="export")
    if not any(path.endswith("_guards_fn") for path, _ in pm.named_modules()):
        pytest.skip("this torch's export makes no input-guard module")
    with pytest.raises(pbp_fx.PBError, match=r"^this model was captured with torch.export, whose input-guard function "
                                             r"\(graph_module._guards_fn\) cannot be pickled, .* save it with "
                                             r"pbp_fx.save\(pm, path\)") as refused:
        torch.save(pm, io.BytesIO())
    assert "\n" not in str(refused.value)


def test_a_perforated_model_unpickled_keeps_its_signature_and_pickles_again():
    """torch's unpickled GraphModule starts with an empty meta: the model lost its input signature
    and output structure, and a second torch.save raised PicklingError ('not the same object'). It
    also registers every buffer its graph reads as persistent: fx's constants came back in the
    state dict, and a fresh model's state no longer loaded. In a fresh process (see above)."""
    import subprocess
    import sys

    code = """if True:
        import collections, io, torch, pbp_fx
        from torch import nn
        Out = collections.namedtuple("Out", "logits feat")
        class M(nn.Module):
            def __init__(self):
                super().__init__(); self.a = nn.Linear(4, 8); self.b = nn.Linear(8, 3)
            def forward(self, x):
                h = torch.relu(self.a(x)); return Out(self.b(h), h)
        pm = pbp_fx.perforate(M(), (torch.rand(2, 4),), frontend="fx")
        x = torch.rand(2, 4)
        for _ in range(2):
            buf = io.BytesIO(); torch.save(pm, buf); buf.seek(0)
            again = torch.load(buf, weights_only=False)
            assert str(again.forward_signature) == "(x)" and type(again(x)).__name__ == "Out"
            assert torch.equal(again(x).logits, pm(x).logits)
            pm = again
        class Indexed(nn.Module):  # (fx takes the index for a constant, kept out of the state dict)
            def __init__(self):
                super().__init__(); self.fc = nn.Linear(4, 4); self.table = nn.Parameter(torch.randn(7, 4))
                self.register_buffer("index", torch.arange(4) % 7)
            def forward(self, x):
                return self.fc(x) + self.table[self.index.view(-1)].sum(0)
        pm = pbp_fx.perforate(Indexed(), (torch.rand(2, 4),), frontend="fx")
        buf = io.BytesIO(); torch.save(pm, buf); buf.seek(0)
        again = torch.load(buf, weights_only=False)
        assert list(again.state_dict()) == list(pm.state_dict()), list(again.state_dict())
        print("ok")
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-1500:]


def test_activation_checkpointing_counts_each_batch_once_and_matches_the_plain_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    pm = pbp_fx.perforate(model, torch.randn(4, 6))
    pm.start_dendrite_phase(pool=2)
    twin = copy.deepcopy(pm)
    pm.activation_checkpointing_enable()
    assert pm.is_gradient_checkpointing and not twin.is_gradient_checkpointing
    g = torch.Generator().manual_seed(1)
    opts = [torch.optim.SGD(list(m.trainable_parameters()), lr=0.05) for m in (pm, twin)]
    for _ in range(120):  # past the statistics' warm-up, so snapshots are taken too
        x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
        for m, opt in zip((pm, twin), opts):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    for name, site in pm.sites.items():
        a, b = site.candidates, twin.sites[name].candidates
        assert int(a.batches_seen) == int(b.batches_seen) == 120 and int(a.steps) == 120
        for key in ("ema", "ema_sq", "best", "snapshot_weight"):
            torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=1e-5, atol=1e-7)
    # A second backward through a retained checkpointed graph does not count the batch again.
    loss = F.cross_entropy(pm(x), y)
    loss.backward(retain_graph=True)
    with pytest.warns(pbp_fx.PBWarning, match="a second backward through one forward"):
        loss.backward()
    assert all(int(s.candidates.batches_seen) == 121 for s in pm.sites.values())
    pm.activation_checkpointing_disable()
    assert not pm.is_gradient_checkpointing


@pytest.mark.parametrize("kwargs, word", [({"activation_checkpointing_kwargs": {"use_reentrant": True}}, "use_reentrant"),
                                          ({"every_n_layers": 2}, "every_n_layers"), ({"offload": True}, "offload")])
def test_activation_checkpointing_refusals_are_one_line(kwargs, word):
    pm = pbp_fx.perforate(nn.Linear(3, 2), torch.randn(2, 3))
    with pytest.raises(pbp_fx.TrainingError) as err:
        pm.activation_checkpointing_enable(**kwargs)
    assert word in str(err.value) and "\n" not in str(err.value)


def test_a_call_outside_a_static_capture_is_a_call_error():
    """A graph captured with static shapes (dynamic=False, or export's static fallback) refuses
    another batch size in one line naming the fix, not with torch.export's raw guard assertion."""
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    pm = pbp_fx.perforate(m, (torch.randn(3, 4),), frontend="export", dynamic=False)
    assert pm(torch.randn(3, 4)).shape == (3, 2)
    with pytest.raises(pbp_fx.CallError, match=r"captured with static shapes and this call breaks them .*Guard failed"):
        pm(torch.randn(5, 4))


class _MeansOverTime(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        if x.dim() == 3:
            x = x.mean(1)
        return self.c(F.relu(self.a(x)))


def test_an_input_of_another_rank_than_the_capture_is_a_call_error():
    """The graph failed inside its generated code with a bare 'IndexError: tuple index out of range' (a reviewer)."""
    model = _MeansOverTime().eval()
    pm = pbp_fx.perforate(model, (torch.randn(3, 4, 6),)).eval()
    assert pm.graph_module.meta["pbp_frontend"] == "export"
    with pytest.raises(pbp_fx.CallError, match=r"^_MeansOverTime was captured with x of 3 dims \[3, 4, 6\], and this "
                                               r"call gives it 2 \[3, 6\], which the graph fails on \(IndexError\): "
                                               r"call it with 3-dim inputs, or perforate it with an example of the rank"):
        pm(torch.randn(3, 6))
    x = torch.randn(2, 7, 6)
    torch.testing.assert_close(pm(x), model(x))


class _AnyRank(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 2), nn.Linear(6, 2)

    def forward(self, x, y):
        return self.a(x).flatten(0, -2).mean(0) + self.b(y).mean(0)


def test_a_symbolic_traces_failure_is_not_blamed_on_an_input_of_another_rank():
    """fx's graph takes any rank its model takes: a wrong width of y was blamed on x's rank (a reviewer)."""
    pm = pbp_fx.perforate(_AnyRank(), (torch.randn(3, 4), torch.randn(3, 6)), frontend="fx")
    assert pm(torch.randn(2, 3, 4), torch.randn(3, 6)).shape == (2,)
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied") as err:
        pm(torch.randn(2, 3, 4), torch.randn(3, 5))
    assert not isinstance(err.value, pbp_fx.CallError)


class _Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, mask):
        return self.fc(x) * mask.to(x.dtype).unsqueeze(-1)


@pytest.mark.parametrize("as_keyword", [False, True])
def test_an_input_of_another_dtype_than_torch_export_captured_is_a_call_error(as_keyword):
    """A bool mask where the example's was int64: torch.export's 'Tensor dtype mismatch! Expected:
    Long, Got: Bool', which names no input."""
    x, mask = torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.long)
    pm = pbp_fx.perforate(_Masked(), (x, mask), frontend="export")
    call = (lambda m: pm(x, mask=m)) if as_keyword else (lambda m: pm(x, m))
    assert call(mask).shape == (2, 5, 3)
    with pytest.raises(pbp_fx.CallError, match=r"^_Masked was captured by torch.export with mask of dtype torch.int64, "
                       r"this call passes torch.bool: pass mask.to\(torch.int64\), or perforate with an example "
                       r"whose mask is torch.bool$"):
        call(mask.bool())
    assert call(mask.bool().to(torch.int64)).shape == (2, 5, 3)  # the advice, followed


class _PositionalOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, /):
        return self.fc(x)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_forward_with_positional_only_inputs_is_perforated(frontend):
    """forward(self, x, /): the PerforatedModel's signature put its own `self` after the `/`
    ('wrong parameter order')."""
    x = torch.randn(2, 4)
    pm = pbp_fx.perforate(_PositionalOnly(), (x,), frontend=frontend)
    assert torch.equal(pm(x), pm.graph_module(x))


class _Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, pair, mask):
        a, b = pair
        return self.fc(a) * b.to(a.dtype).unsqueeze(-1) * mask.to(a.dtype).unsqueeze(-1)


def test_a_dtype_error_in_a_nested_input_names_the_input_that_differs():
    """((a, b), mask) with a bool mask: the error named b (the second placeholder), not the mask."""
    a, b, mask = torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)
    pm = pbp_fx.perforate(_Nested(), ((a, b), mask), frontend="export")
    with pytest.raises(pbp_fx.CallError, match=r"with mask of dtype torch.int64, this call passes torch.bool"):
        pm((a, b), mask.bool())
    with pytest.raises(pbp_fx.CallError, match=r"with pair_1 of dtype torch.int64, this call passes torch.bool"):
        pm((a, b.bool()), mask)


class _KeywordRoot(nn.Module):
    """Untraceable root (data-dependent Python) with Hugging Face-style keyword inputs."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = torch.relu(self.a(input_ids))
        if h.sum() > 0:
            h = h * 2
        return self.head(h)


def test_a_parts_capture_shows_the_original_signature_and_pickles():
    """The HF Trainer keeps only the dataset columns `forward` names: a parts capture must show them too."""
    import inspect
    import pickle

    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="neither fx nor torch.export"):
        pm = pbp_fx.perforate(_KeywordRoot(), (x,))
    assert list(inspect.signature(pm.forward).parameters) == ["input_ids", "attention_mask", "labels"]
    again = pickle.loads(pickle.dumps(pm))
    assert list(inspect.signature(again.forward).parameters) == ["input_ids", "attention_mask", "labels"]
    assert torch.equal(again(input_ids=x), pm(x))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_dendrite_phase_holds_the_frozen_norm_statistics(checkpointing):
    """Train-mode forwards in the dendrite phase moved the frozen BatchNorms' running statistics
    until the phase ended: evaluation, finalize and checkpoints in the phase saw another model."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 3))
    x, y = torch.randn(16, 2, 6, 6), torch.randint(0, 3, (16,))
    pm = pbp_fx.perforate(net, (x,))
    pm.train()
    for _ in range(3):  # running statistics away from their initial values
        pm(x + 1.0)
    if checkpointing:
        pm.activation_checkpointing_enable()
    before = pm.eval()(x)
    stats = {n: b.clone() for n, b in pm.named_buffers()}
    pm.train().start_dendrite_phase(pool=2)
    opt = torch.optim.SGD(list(pm.trainable_parameters()), 0.1)
    weights = pm.sites["0"].candidates.copies.weight.detach().clone()
    for _ in range(3):
        loss = F.cross_entropy(pm(2.0 * x - 1.0), y)  # another batch mean and variance
        opt.zero_grad()
        loss.backward()
        opt.step()
        held = dict(pm.named_buffers())
        for n, b in stats.items():
            assert torch.equal(held[n], b), n
    assert not torch.equal(pm.sites["0"].candidates.copies.weight, weights)  # the candidates trained
    assert torch.equal(pm.eval()(x), before)
    assert torch.equal(pm.finalize()(x), before)
    pm.double()  # the held values follow the buffers
    pm.train()(x.double())
    assert torch.equal(pm.get_buffer("graph_module.1.running_mean"), stats["graph_module.1.running_mean"].double())
    setattr(pm.graph_module, "1", copy.deepcopy(pm.graph_module.get_submodule("1")))  # a swapped BatchNorm
    pm(2.0 * x.double())
    assert torch.equal(pm.get_buffer("graph_module.1.running_mean"), stats["graph_module.1.running_mean"].double())
    pm.install_candidates()
    assert torch.allclose(pm.eval()(x.double()), before.double(), atol=1e-6)


@pytest.mark.parametrize("phase", ["dendrite", "installed"])
def test_channels_last_reaches_the_model_and_leaves_the_stacked_weights_as_they_are(phase):
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(4, 3, 8, 8)
    pm = pbp_fx.perforate(net, x)
    pm.start_dendrite_phase()
    if phase == "installed":
        pm.install_candidates(v_init=0.5)
    want = pm.eval()(x)
    holder = nn.ModuleDict({"pm": pm})  # a wrapper's .to() reaches the model through _apply
    for model in (pm, holder):
        model.to(memory_format=torch.channels_last)
    assert pm.graph_module.get_submodule("0").weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(pm(x.contiguous(memory_format=torch.channels_last)), want)
    pm.to(torch.float64, memory_format=torch.channels_last)  # the dtype still reaches the stacked weights
    assert {p.dtype for p in pm.parameters()} == {torch.float64}


def test_channels_last_mid_dendrite_phase_converts_the_candidates_gradients_too():
    """torch's _apply converts each parameter's .grad as well: the candidates' 5-D gradients met the
    channels_last format and the model was left half converted."""
    pm = pbp_fx.perforate(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)),
                          (torch.rand(2, 1, 8, 8),))
    pm.start_dendrite_phase(pool=2)
    pm(torch.rand(8, 1, 8, 8)).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    pm.to(memory_format=torch.channels_last)
    assert pm.graph_module.get_submodule("0").weight.is_contiguous(memory_format=torch.channels_last)
    for n, p in pm.named_parameters():
        if n in grads:
            assert torch.equal(p.grad, grads[n]), n
    pm(torch.rand(8, 1, 8, 8).contiguous(memory_format=torch.channels_last)).square().mean().backward()


def test_a_dendrite_phase_step_in_eval_mode_is_warned_of_at_the_users_line():
    """A loop that left the model in eval mode met torch's 'element 0 of tensors does not require grad'."""
    pm = pbp_fx.perforate(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(2, 4))
    pm.start_dendrite_phase(pool=2)
    pm.eval()
    with pytest.warns(UserWarning, match="eval mode with gradients on.*call model.train") as caught:
        pm(torch.randn(3, 4))
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm(torch.randn(3, 4))  # once per phase
        pm.abort_dendrite_phase()
        pm.start_dendrite_phase(pool=2)
        pm.train()(torch.randn(3, 4))
        with torch.no_grad():
            pm.eval()(torch.randn(3, 4))  # validation after training steps: nothing to say
        pm.eval()(torch.randn(3, 4))


@pytest.mark.parametrize("model, x, strided", [
    (nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), torch.randn(16, 8), False),
    (nn.Sequential(nn.Conv1d(2, 4, 4, padding="same"), nn.ReLU(), nn.Flatten(), nn.Linear(40, 3)),
     torch.randn(16, 2, 10), False),
    (nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), torch.randn(16, 5, 8), True),
    (nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(40, 3)), torch.randn(16, 2, 10),
     True),
], ids=["linear on [B, C]", "even 'same' conv", "linear on tokens", "conv"])
def test_a_candidate_stride_that_strides_no_site_is_warned_of_once_a_phase(model, x, strided):
    """stride=2 on sites without positions to stride was accepted silently: no cheaper phase."""
    pm = pbp_fx.perforate(model, (x,))
    pm.start_dendrite_phase(pool=2, stride=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm.train()(x).sum().backward()
        pm(x)
    said = [str(w.message) for w in caught if "candidate_stride" in str(w.message)]
    assert said == ([] if strided else ["candidate_stride=2 strides no site of Sequential: its Linear sites read no "
                                        "token dims ([B, C] inputs) and its convs have no strided form (an even "
                                        "kernel's 'same' padding), so every candidate sees every position and the "
                                        "dendrite phase costs what it costs at stride 1; drop the setting "
                                        "(candidate_stride=1)"])
    pm.abort_dendrite_phase()
    pm.start_dendrite_phase(pool=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm(x)  # stride 1: nothing to say


def test_a_memory_format_that_fits_none_of_the_models_own_weights_fails_as_in_torch():
    pm = pbp_fx.perforate(nn.Sequential(nn.Conv3d(2, 4, 3)), torch.randn(1, 2, 4, 4, 4))
    with pytest.raises(RuntimeError, match="required rank 4 tensor to use channels_last"):
        nn.Conv3d(2, 4, 3).to(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="required rank 4 tensor to use channels_last"):
        pm.to(memory_format=torch.channels_last)  # (it passed without a word)


@pytest.mark.parametrize("call", ["grow", "start", "install", "controller"])
def test_structure_changed_inside_inference_mode_still_trains(call):
    """An evaluation loop's `with torch.inference_mode(): ctl.step(acc)` made the new modules'
    tensors inference tensors: the next training step raised 'Inplace update to inference tensor'."""
    from pbp_fx.controller import PhaseController

    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    pm = pbp_fx.perforate(CNN(), (x[:2],)).train()
    ctl = PhaseController(pm, pbp_fx.PBConfig(patience=1, improvement=10.0)) if call == "controller" else None
    if call == "install":
        pm.start_dendrite_phase(pool=2)
        F.cross_entropy(pm(x), y).backward()
    with torch.inference_mode():
        if call == "controller":
            ctl.step(0.5), ctl.step(0.5)  # the second starts the dendrite phase
        else:
            {"grow": pm.grow, "start": lambda: pm.start_dendrite_phase(pool=2), "install": pm.install_candidates}[call]()
    assert pm.phase == ("neuron" if call in ("grow", "install") else "dendrite")
    opt = torch.optim.SGD(pm.trainable_parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(pm(x), y).backward()
        opt.step()
    assert not any(t.is_inference() for t in [*pm.parameters(), *pm.buffers()])


def test_checkpointing_inside_the_model_that_the_graph_drops_is_warned_of():
    """torch.utils.checkpoint in the model's own forward was traced through without a word: the
    perforated model stored 6x the activations."""
    import torch.utils.checkpoint as cp

    class Ckpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.blk = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(cp.checkpoint(self.blk, x, use_reentrant=False))

    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match=r"Ckpt.forward refers to torch.utils.checkpoint: activation checkpointing "
                                         r"inside the model is not kept .*pm.activation_checkpointing_enable\(\)"):
        pm = pbp_fx.perforate(Ckpt(), (x,))
    assert pm(x).shape == (3, 2)
    flagged = MLP()
    flagged.gradient_checkpointing = True  # (a Hugging Face model's switch)
    with pytest.warns(UserWarning, match="MLP has gradient_checkpointing on"):
        pbp_fx.perforate(flagged, (torch.randn(2, MLP().fc1.in_features),))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pbp_fx.perforate(MLP(), (torch.randn(2, MLP().fc1.in_features),))


def test_an_unbatched_conv_input_works_with_dendrites_as_without():
    """A [C, H, W] input, which nn.Conv2d takes, matched at K = 0 but failed with an unflatten error
    once a dendrite existed, and after finalize."""
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)))

    torch.manual_seed(0)
    x = torch.randn(3, 6, 6)
    pm = pbp_fx.perforate(Conv(), (x.unsqueeze(0),)).eval()
    pm.grow()
    with torch.no_grad():
        for s in pm.sites.values():
            s.out_weight.normal_()
        want = pm(x.unsqueeze(0)).squeeze(0)
        assert torch.allclose(pm(x), want, atol=1e-6) and pm(x).shape == (2, 6, 6)
        assert torch.allclose(pm.finalize()(x), want, atol=1e-6)


def test_an_unbatched_linear_input_trains_candidates_with_the_one_sample_warning_not_a_crash():
    """A [In] input, which nn.Linear takes: the split pool read the feature dim as the batch and
    failed in bmm ('Expected size for first two dimensions of batch2 tensor')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(4)
    pm = pbp_fx.perforate(model, (x,))
    pm.train()
    pm.start_dendrite_phase(pool=2)
    out = pm(x)
    assert torch.equal(out, model(x))
    with pytest.warns(pbp_fx.PBWarning, match="one value per channel"):
        out.pow(2).sum().backward()
    pm.install_candidates()
    pm.eval()
    with torch.no_grad():
        assert torch.allclose(pm.finalize()(x), pm(x), atol=1e-6) and pm(x).shape == (2,)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_deepcopy_is_exact_and_prints_no_torch_deprecation_notice(frontend):
    """Every copy.deepcopy of a perforated model printed torch's 'isinstance(treespec, LeafSpec) is
    deprecated' FutureWarning (from the graph's input/output specs)."""
    torch.manual_seed(0)
    pm = pbp_fx.perforate(MLP(), (torch.randn(2, 6),), frontend=frontend)
    pm.grow()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twin = copy.deepcopy(pm)
    x = torch.randn(3, 6)
    assert torch.equal(twin(x), pm(x)) and twin.num_dendrites == pm.num_dendrites
    assert all(a is not b for a, b in zip(twin.parameters(), pm.parameters()))
    twin.grow()
    assert pm.dendrites == 1 and twin.dendrites == 2


def test_install_candidates_on_named_sites_only():
    """sites= was matched with `in`: a misspelt name dropped every candidate, and a string matched
    by substring ("fc2" installed on "fc" too)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    pm = pbp_fx.perforate(model, torch.zeros(2, 6))
    names = list(pm.sites)
    pm.train()
    pm.start_dendrite_phase(pool=2)
    with pytest.raises(ConfigError, match=f"install_candidates\\(sites=\\) names no site 'fc_2': the sites are "
                                          f"{', '.join(names)}"):
        pm.install_candidates(sites=[names[0], "fc_2"])
    assert pm.phase == "dendrite"  # nothing changed
    pm.install_candidates(sites=names[2])  # one name as a string: that site only
    assert [pm.sites[n].num_dendrites for n in names] == [0, 0, 1]


def test_what_is_no_model_is_refused_in_one_line(tmp_path):
    """A perforated model perforated again nested silently (its dendrites got dendrites); other
    arguments of the wrong type ended in AttributeError/TypeError."""
    from pbp_fx.errors import CheckpointError

    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    pm = pbp_fx.perforate(model, torch.zeros(2, 6))
    with pytest.raises(ConfigError, match="got a model that is perforated already"):
        pbp_fx.perforate(pm, torch.zeros(2, 6))
    # ... also through torch.compile's wrapper or a module holding it (each layer got two sites, and
    # finalize failed with an AttributeError)
    with pytest.raises(ConfigError, match=r"holds a perforated model already \(model\._orig_mod\): its dendrites "
                                          r"would get dendrites"):
        pbp_fx.perforate(torch.compile(pm), torch.zeros(2, 6))
    with pytest.raises(ConfigError, match=r"holds a perforated model already \(model\[0\]\)"):
        pbp_fx.perforate(nn.Sequential(pm, nn.Linear(3, 2)), torch.zeros(2, 6))
    # (a finalized model: "no Linear/Conv neuron sites ... check include=/exclude="; a reviewer)
    pm.grow()
    with pytest.raises(ConfigError, match=r"got a model that is or holds a finalized model \(a fused site at "
                                          r"pbp_fused\.0\), made for inference"):
        pbp_fx.perforate(pm.finalize(), torch.zeros(2, 6))
    with pytest.raises(ConfigError, match="perforate\\(\\) takes an nn.Module, got function"):
        pbp_fx.perforate(lambda x: x, torch.zeros(2, 6))
    with pytest.raises(ConfigError, match="PhaseController controls a PerforatedModel, got Sequential"):
        pbp_fx.PhaseController(model)
    with pytest.raises(CheckpointError, match="save\\(\\) writes a PerforatedModel, got Sequential"):
        pbp_fx.save(model, str(tmp_path / "m.safetensors"))
    pbp_fx.save(pm, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match="needs a model or a function returning one, got str"):
        pbp_fx.load(str(tmp_path / "m.safetensors"), "Sequential")


def test_a_parts_graph_takes_the_trainers_loss_keyword_as_the_original_does():
    """A parts graph calls the original's forward as it is, so it takes num_items_in_batch when the
    original does; accepts_loss_kwargs said False, and the Trainer scaled the loss otherwise."""
    from parts_models import BranchingRoot

    class WithLossKeywords(BranchingRoot):
        def forward(self, x, **kwargs):
            return super().forward(x) / kwargs.get("num_items_in_batch", 1)

    for model, takes in ((WithLossKeywords(), True), (BranchingRoot(), False)):
        pm = pbp_fx.perforate(model, torch.ones(2, 4))
        assert pm.call_signature is None and pm.accepts_loss_kwargs is takes
    torch.manual_seed(0)
    original = WithLossKeywords()
    pm = pbp_fx.perforate(original, torch.ones(2, 4))
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(pm(x, num_items_in_batch=4), original(x, num_items_in_batch=4))


class _HandsOnKeywords(nn.Module):
    """An untraceable root that hands its **kwargs on to a part (as T5 hands the Trainer's
    num_items_in_batch to its encoder); the part reads `scale` and ignores the rest."""

    class Part(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, **kwargs):
            return torch.relu(self.fc(x)) * kwargs.get("scale", 1.0)

    def __init__(self):
        super().__init__()
        self.part, self.head = self.Part(), nn.Linear(4, 2)

    def forward(self, x, **kwargs):
        h = self.part(x, **kwargs)
        if h.sum() > 0:
            h = h * 2
        return self.head(h)


def test_a_keyword_the_root_hands_a_part_untraced_is_dropped_when_the_part_ignores_it():
    """The part was traced without the keyword: every call failed with 'traced without the keyword
    input(s)' (T5 with the Hugging Face Trainer's num_items_in_batch, at the first step), and gave
    no fix. Now: dropped when the part's output does not change, else refused with the fix."""
    torch.manual_seed(0)
    original = _HandsOnKeywords()
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="neither fx nor torch.export"):
        pm = pbp_fx.perforate(original, (torch.ones(2, 4),))
    assert pm.graph_module.meta["pbp_frontend"] == "parts"
    with torch.no_grad():
        assert torch.equal(pm(x, num_items_in_batch=torch.tensor(6)), original(x))
    with pytest.raises(pbp_fx.TraceError, match=r"part was traced without the keyword input 'scale', which the model hands "
                                         r"it and which changes its output: pass it in example_kwargs to perforate\(\)"):
        pm(x, scale=2.0)
    pm.train()
    pm(x, num_items_in_batch=torch.tensor(6)).sum().backward()  # (trains: the check keeps gradients off)
    assert all(p.grad is not None for p in pm.parameters() if p.requires_grad)
    with pytest.warns(UserWarning, match="neither fx nor torch.export"):  # traced with it: taken as given
        scaled = pbp_fx.perforate(original, (torch.ones(2, 4),), example_kwargs={"scale": 2.0})
    with torch.no_grad():
        assert torch.allclose(scaled(x, scale=2.0), original(x, scale=2.0))


class _PartWithItsOwnTable(nn.Module):
    """An untraceable root whose part reads a buffer of its own (fx reads it as an attribute, so
    the graph holds its own reference) and scales its input in place."""

    class Part(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("table", torch.randn(4, 4))

        def forward(self, x, **kwargs):
            x.mul_(0.5)
            return torch.relu(self.fc(x)) @ self.table

    def __init__(self):
        super().__init__()
        self.part, self.head = self.Part(), nn.Linear(4, 2)

    def forward(self, x, **kwargs):
        h = self.part(x * 1.0, **kwargs)
        if h.sum() > 0:
            h = h * 2
        return self.head(h)


def test_the_untraced_keyword_check_follows_the_models_dtype_and_copies_the_inputs():
    """The part's source kept its own buffer in float32 after pm.double() (the check then failed and
    refused the keyword), and the check ran the part twice on the caller's tensors, which it scales
    in place (so the two runs differed and the keyword was refused)."""
    torch.manual_seed(0)
    original = _PartWithItsOwnTable()
    with pytest.warns(UserWarning, match="neither fx nor torch.export"):
        pm = pbp_fx.perforate(original, (torch.ones(2, 4),))
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(pm(x, num_items_in_batch=torch.tensor(6)), original(x))
    with pytest.warns(UserWarning, match="neither fx nor torch.export"):
        doubled = pbp_fx.perforate(original, (torch.ones(2, 4),)).double()
    with torch.no_grad():  # (the keyword's first call: checked in float64)
        assert torch.allclose(doubled(x.double(), num_items_in_batch=torch.tensor(6)), original.double()(x.double()))


class WritesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(8, 8), nn.ReLU(inplace=True)

    def forward(self, x, extra=None):
        self.act(x)
        return self.fc(x) if extra is None else self.fc(x) + extra.relu_()


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_perforate_leaves_the_callers_example_inputs_as_they_were(frontend):
    """A model that writes its input in place changed the caller's example tensors."""
    x, extra = torch.randn(4, 8), torch.randn(4, 8)
    before = (x.clone(), extra.clone())
    pm = pbp_fx.perforate(WritesItsInput(), (x,), example_kwargs={"extra": extra}, frontend=frontend)
    assert torch.equal(x, before[0]) and torch.equal(extra, before[1])
    assert pm.sites  # (the copies were captured)


def test_a_torch_compiled_model_is_perforated_as_the_model_it_wraps():
    """Its sites were named "_orig_mod.fc1", so a checkpoint did not match the uncompiled model."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.warns(pbp_fx.PBWarning, match="torch.compile wraps"):
        pm = pbp_fx.perforate(torch.compile(model), (torch.randn(2, 4),))
    assert list(pm.sites) == list(pbp_fx.perforate(model, (torch.randn(2, 4),)).sites) == ["0", "2"]


def test_the_copy_keeps_buffers_that_reading_a_weight_updates():
    """spectral_norm advances its power iteration (_u) each time its weight is read in train mode:
    capture and site matching read it ~10 times, and the copy's outputs were 2.5 % off."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.spectral_norm(nn.Linear(16, 16)), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(4, 16)
    pm = pbp_fx.perforate(model, (x,))
    u = "0.parametrizations.weight.0._u"
    assert torch.equal(dict(pm.named_buffers())[f"graph_module.{u}"], dict(model.named_buffers())[u])
    model.eval(), pm.eval()
    assert torch.equal(model(x), pm(x))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_model_perforated_under_inference_mode_trains(frontend):
    """The copy perforate made inside torch.inference_mode held inference tensors: the first backward
    failed with 'Inference tensors cannot be saved for backward'."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), torch.randn(3, 4)
    with torch.inference_mode():
        pm = pbp_fx.perforate(model, (x,), frontend=frontend)
    pm.train()
    pm(x).pow(2).sum().backward()
    assert all(p.grad is not None for p in pm.trainable_parameters())
    assert torch.equal(pm(x), model(x))


def test_a_model_in_eval_mode_is_copied_in_eval_mode():
    """perforate() of an eval-mode model gave a PerforatedModel in training mode (its layers in eval
    mode): an evaluation that saved and restored model.training turned the copy's dropout and
    BatchNorm to training mode (outputs 1.29 off the original's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 6)
    for frontend in ("fx", "export"):
        pm = pbp_fx.perforate(model.eval(), (x,), frontend=frontend)
        assert not any(m.training for m in pm.modules())
        was = pm.training
        pm.eval()
        pm.train(was)
        with torch.no_grad():
            assert torch.equal(pm(x), model(x))
        assert all(m.training for m in pbp_fx.perforate(model.train(), (x,), frontend=frontend).modules())
        # ... and each part in its own: a frozen encoder in eval mode and a head training
        mixed = nn.Sequential(nn.Sequential(nn.Linear(6, 8), nn.ReLU()).eval(), nn.Linear(8, 3))
        pm = pbp_fx.perforate(mixed, (x,), frontend=frontend)
        assert pm.training and {n: s.training for n, s in pm.sites.items()} == {"0.0": False, "1": True}
        mixed.eval()[1].train()
        pm = pbp_fx.perforate(mixed, (x,), frontend=frontend)
        assert not pm.training and {n: s.training for n, s in pm.sites.items()} == {"0.0": False, "1": True}


class _DataDependent(nn.Module):
    """Untraceable by fx (a branch on values): a leaf whose layers get swapped neurons and sites."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        h = self.l1(x)
        return self.l2(h) if h.sum() > 0 else self.l2(-h)


class _LoopsOnValues(nn.Module):
    """A root no frontend captures whole (a loop count from values): captured by parts."""

    def __init__(self):
        super().__init__()
        self.enc, self.head = FunctionalDropout(6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.enc(x)
        for _ in range(int(h.detach().abs().sum().item() * 1000) % 2 + 1):
            h = h * 1.0
        return self.head(h)


@pytest.mark.parametrize("root_training", [True, False])
def test_modules_made_inside_leaves_and_parts_take_their_parts_mode(root_training):
    """A leaf's swapped neurons and sites stayed in training mode in an eval model; a parts capture's
    mode switch took the root's mode, not its part's, and the copy computed another function (0.68 off)."""
    x = torch.randn(5, 6)
    leafy = nn.Sequential(nn.Linear(6, 6), _DataDependent()).train(root_training)
    leafy[1].train(not root_training)
    pm = pbp_fx.perforate(leafy, (x,), frontend="fx")
    inside = [m for n, m in pm.graph_module.named_modules() if n.startswith("1.")]
    assert inside and all(m.training is (not root_training) for m in inside)
    assert pm.sites["0"].training is root_training
    parts = _LoopsOnValues().train(root_training)
    parts.enc.train(not root_training)
    pm = pbp_fx.perforate(parts, (x,))
    assert pm.graph_module.meta["pbp_frontend"] == "parts"
    with torch.no_grad():
        torch.manual_seed(0)
        want = parts(x)
        torch.manual_seed(0)
        assert torch.equal(pm(x), want)


class _UntraceableBody(nn.Module):
    """Neither frontend captures it (an int from values); it reads its own mode."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(6, 6)

    def forward(self, x):
        n = int((x > -100).sum())
        return F.dropout(self.l(x), 0.5, self.training) * (n > 0)


class _UntraceableRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = _UntraceableBody(), nn.Linear(6, 3)

    def forward(self, x):
        if int((x > -100).sum()) > 0:
            x = x + 0
        return self.head(self.body(x))


def test_a_parts_capture_keeps_the_modes_of_the_modules_it_copies():
    """The shallow copies a parts capture makes of the modules above its parts took the root's mode: a frozen
    body in eval mode ran its dropout (0.76 off right after perforate)."""
    torch.manual_seed(0)
    model, x = _UntraceableRoot(), torch.randn(4, 6)
    model.body.eval()
    pm = pbp_fx.perforate(model, (x,))
    assert pm.graph_module.meta["pbp_frontend"] == "parts"
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x), rtol=0, atol=0)


class _NormAndFunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.l, self.bn = nn.Linear(6, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        return F.dropout(self.bn(torch.relu(self.l(x))), 0.5, self.training)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_model_in_mixed_modes_is_captured_as_it_is_and_warned_of_where_that_matters(frontend, recwarn):
    """A frozen encoder in eval mode under a training root is captured as it is (exact right after perforate);
    its functional dropout (under export also its batch norm) then stays in eval mode after pm.train(),
    unlike the model's: said, where the graph holds such ops."""
    torch.manual_seed(0)
    model = nn.Sequential(_NormAndFunctionalDropout(), nn.Linear(6, 3))
    model[0].eval()
    x = torch.randn(16, 6)
    with pytest.warns(UserWarning, match=r"Sequential: 0 is in eval mode under a model in train mode, and the graph "
                                         r"holds mode-dependent code inside it .*: pm.train\(\) and pm.eval\(\) do not "
                                         r"switch that; call model.train\(\) before perforate"):
        pm = pbp_fx.perforate(model, (x,), frontend=frontend)
    assert [m.training for m in model.modules()] == [True, False, False, False, True]  # left as it was
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x), rtol=0, atol=0)
    recwarn.clear()  # layers fx keeps whole follow their own mode: nothing to say
    modules = nn.Sequential(nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Dropout(0.5)).eval(), nn.Linear(6, 3))
    pbp_fx.perforate(modules, (x,), frontend=frontend)
    said = [w for w in recwarn if "mode-dependent code inside" in str(w.message)]
    assert len(said) == (0 if frontend == "fx" else 1)


class _FirstOutput(nn.Module):
    def forward(self, out):
        return out[0]


class _NotLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm([4, 8, 8]), nn.Linear(4, 8)
        self.register_buffer("blur", torch.ones(4, 1, 3, 3) / 9)

    def forward(self, x):
        h = F.conv2d(self.ln(x), self.blur, padding=1, groups=4).flatten(2)  # [B, 4, 64]
        q = self.fc(h.transpose(1, 2)[:, :8])  # [B, 8, 8]
        return F.linear(q, q[0])


class _StandardizedConv(nn.Conv2d):
    """BiT's StdConv2d: the weight is standardized in forward, so the conv reads a computed tensor."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_layers_that_are_no_sites_for_a_reason_not_chosen_are_warned_of(frontend, recwarn):
    """A model of weight-standardized convs got one site, its head, without a word: PB grew nothing in its convs."""
    model = nn.Sequential(_StandardizedConv(3, 4, 3), nn.ReLU(), _StandardizedConv(4, 4, 3), nn.Flatten(),
                          nn.Linear(4 * 2 * 2, 2))
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match=r"2 Linear/Conv layer\(s\) of Sequential are not sites, so PB adds no "
                                         r"dendrites there: 0, 2 \(0.weight: the layer's weight is "
                                         r"computed at run time"):
        pm = pbp_fx.perforate(model, (x,), frontend=frontend)
    assert list(pm.sites) == ["4"]
    recwarn.clear()  # what include/exclude leave out is the user's choice, sites or not
    pbp_fx.perforate(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), (torch.randn(2, 3),),
                     exclude=["0"], frontend=frontend)
    pbp_fx.perforate(model, (x,), include=["4"], frontend=frontend)
    pbp_fx.perforate(model, (x,), exclude=["0", "2"], frontend=frontend)  # (a glob may name a non-site layer)
    pbp_fx.perforate(model, (x,), exclude=[lambda name, module: name != "4" and module.out_channels > 0],
                     frontend=frontend)
    # layers of a kind pbp-fx never perforates and ops that are no layer the user made are no news: an LSTM,
    # a LayerNorm's 2-D weight, a fixed filter held in a buffer, attention's F.linear(q, k)
    lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    pbp_fx.perforate(nn.Sequential(lstm, _FirstOutput(), nn.Linear(8, 2)), (torch.randn(2, 5, 3),), frontend=frontend)
    pbp_fx.perforate(_NotLayers(), (torch.randn(2, 4, 8, 8),), include=[lambda name, module: module.weight is not None],
                     frontend=frontend)
    # a layer that is a site at its module call, whose weight an op also reads computed (it was named as no site)
    assert list(pbp_fx.perforate(_AlsoMasked(), (torch.randn(4, 8),), frontend=frontend).sites) == ["b"]
    assert not [w for w in recwarn if "are not sites" in str(w.message) or "matches no" in str(w.message)]


class _OwnWeights(nn.Module):
    """Weights the model holds as bare parameters, taken by F.linear computed (sliced, masked) or as they are."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(12, 8))
        self.w3 = nn.Parameter(torch.randn(4, 4))
        self.register_buffer("mask", torch.tril(torch.ones(4, 4)))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(F.linear(x, self.w1))
        h = torch.relu(F.linear(h, self.w2[:4]))
        return self.head(F.linear(h, self.w3 * self.mask))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_bare_parameters_a_functional_layer_takes_computed_are_warned_of(frontend):
    """Only nn.Linear/Conv modules were named: F.linear(h, W[:4]) and F.linear(h, W * mask) were no sites without
    a word, though explain_sites lists them (a reviewer)."""
    with pytest.warns(UserWarning, match=r"^2 Linear/Conv layer\(s\) of _OwnWeights are not sites, so PB adds no "
                                         r"dendrites there: w2, w3 \(w2: the layer's weight is a part or view of this "
                                         r"parameter taken at run time \(a slice, split or reshape"):
        pm = pbp_fx.perforate(_OwnWeights(), (torch.randn(3, 6),), frontend=frontend)
    assert sorted(pm.sites) == ["head", "w1"]
    with warnings.catch_warnings():  # (left out by the user's choice: no word)
        warnings.simplefilter("error")
        pbp_fx.perforate(_OwnWeights(), (torch.randn(3, 6),), exclude=["w2", "w3"], frontend=frontend)
        # a bare weight that is a site where it is taken whole, and read masked elsewhere (was warned of; a reviewer)
        assert "w3" in pbp_fx.perforate(_TakenWholeAndMasked(), (torch.randn(3, 4),), frontend=frontend).sites


class _TakenWholeAndMasked(nn.Module):
    def __init__(self):
        super().__init__()
        self.w3, self.head = nn.Parameter(torch.randn(4, 4)), nn.Linear(4, 2)
        self.register_buffer("mask", torch.tril(torch.ones(4, 4)))

    def forward(self, x):
        return self.head(torch.relu(F.linear(torch.relu(F.linear(x, self.w3)), self.w3 * self.mask)))


class _AlsoMasked(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Linear(8, 3)
        self.register_buffer("mask", (torch.arange(24).reshape(3, 8) % 3 > 0).float())

    def forward(self, x):
        return F.linear(x, self.b.weight * self.mask, self.b.bias) + self.b(x)


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm is deprecated")
def test_a_model_with_torch_nn_utils_weight_norm_is_copied_and_perforated():
    """torch.nn.utils.weight_norm keeps the layer's weight as a computed tensor attribute, which
    copy.deepcopy refuses: perforate, copy.deepcopy(pm) and finalize raised torch's RuntimeError."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 8)), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(5, 4)
    pm = pbp_fx.perforate(model, (x,))
    assert list(pm.sites) == ["0", "2"] and torch.equal(pm(x), model(x))
    pm.grow()
    with torch.no_grad():
        for site in pm.sites.values():
            site.out_weight.fill_(0.5)
    pm.eval()
    assert torch.equal(copy.deepcopy(pm)(x), pm(x))
    torch.testing.assert_close(pm.finalize()(x), pm(x))


class _NormEvalBackbone(nn.Module):
    """mmdetection's pattern: train() keeps the BatchNorms in eval mode (norm_eval)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2, self.drop = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(torch.relu(self.bn2(self.conv2(torch.relu(self.bn(self.conv(x)))))))

    def train(self, mode=True):
        super().train(mode)
        if mode:
            for m in self.modules():
                if isinstance(m, (nn.BatchNorm2d, nn.Dropout)):
                    m.eval()
        return self


class _NormEvalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone, self.head = _NormEvalBackbone(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.backbone(x).mean((2, 3)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("trained_first", [False, True])
def test_pm_train_leaves_modules_in_the_modes_the_models_own_train_gives(frontend, trained_first):
    """pm.train() put the BatchNorms that the backbone's train() keeps in eval mode into training
    mode: outputs 0.2 off the model's after model.train(), and running statistics that moved."""
    torch.manual_seed(0)
    model, x = _NormEvalNet(), torch.randn(4, 3, 8, 8)
    if trained_first:
        model.train()
    pm = pbp_fx.perforate(model, (x,), frontend=frontend)
    model.train(), pm.train()
    stats = {n: b.clone() for n, b in pm.named_buffers() if "running" in n}
    torch.testing.assert_close(pm(x), model(x), rtol=0, atol=0)
    assert all(torch.equal(b, stats[n]) for n, b in pm.named_buffers() if n in stats)
    model.eval(), pm.eval()
    torch.testing.assert_close(pm(x), model(x), rtol=0, atol=0)
    pm.train()
    torch.testing.assert_close(copy.deepcopy(pm)(x), model.train()(x), rtol=0, atol=0)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_dendrite_and_candidate_norm_copies_take_the_mode_of_the_norm_they_copy(frontend):
    """The BatchNorms the model's train() keeps in eval mode (norm_eval) had dendrites and candidates whose
    norm copies trained on batch statistics: train and eval outputs 0.03 apart, their running statistics
    moving at every training forward."""
    torch.manual_seed(0)
    model, x = _NormEvalNet(), torch.randn(4, 3, 8, 8)
    pm = pbp_fx.perforate(model, (x,), frontend=frontend)
    pm.grow()
    with torch.no_grad():
        for site in pm.sites.values():
            site.out_weight.fill_(1.0)
    pm.train()
    normed = [s for s in pm.sites.values() if s.norm is not None]
    assert len(normed) == 2
    stats = {n: b.clone() for n, b in pm.named_buffers() if "running" in n}
    with torch.no_grad():
        trained = pm(x)
    assert not any(s.dendrites.training for s in normed)  # (set by the forward)
    assert all(torch.equal(b, stats[n]) for n, b in pm.named_buffers() if n in stats)
    assert torch.equal(trained, pm.eval()(x))
    pm.train()
    pm.start_dendrite_phase(pool=2)
    pm(x).sum().backward()
    assert all(not s.candidates.training for s in normed)
    if frontend == "export":
        return  # (its graph holds no BatchNorm module to put in eval mode by hand)
    # A norm put in eval mode by hand after train() (fine-tuning's bn.eval()) is followed too; its site's
    # copies train again with it.
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    pm = pbp_fx.perforate(plain, (x,), frontend=frontend).train()
    pm.grow()
    bn = next(m for m in pm.modules() if isinstance(m, nn.BatchNorm2d))
    site = next(s for s in pm.sites.values() if s.norm is not None)
    bn.eval()
    pm(x)
    assert not site.dendrites.training
    bn.train()
    pm(x)
    assert site.dendrites.training


def test_a_model_whose_train_sets_every_mode_gets_no_overrides():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 2))
    assert pbp_fx.perforate(model, (torch.randn(2, 3, 8, 8),)).train_overrides == {}


def test_a_partial_state_loaded_with_strict_false_leaves_the_sites_it_does_not_hold():
    """root.load_state_dict(head_only, strict=False) resized every site it had no key of to no
    dendrites (the output changed by 0.34), and missing_keys named none of them. A state that holds a
    site's neuron but none of its dendrites (saved before they grew) still takes the site down to 0."""
    torch.manual_seed(0)
    pm = pbp_fx.perforate(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()), (torch.randn(3, 4),))
    before_growth = copy.deepcopy(pm.state_dict())
    pm.grow()
    pm.grow()
    for site in pm.sites.values():
        with torch.no_grad():
            site.out_weight.normal_()
    root = nn.ModuleDict({"body": pm, "head": nn.Linear(8, 2)})
    x = torch.randn(5, 4)
    with torch.no_grad():
        want = root["head"](root["body"](x))
    head_only = {k: v.clone() for k, v in root.state_dict().items() if k.startswith("head.")}
    result = root.load_state_dict(head_only, strict=False)
    assert {s.num_dendrites for s in pm.sites.values()} == {2}
    assert any(".out_weight" in k for k in result.missing_keys)
    with torch.no_grad():
        assert torch.equal(root["head"](root["body"](x)), want)
    pm.load_state_dict(before_growth)
    assert {s.num_dendrites for s in pm.sites.values()} == {0}
    # Saved inside the first dendrite phase (no dendrite yet, a candidate pool): its pool keys are no
    # dendrites of the site, which goes down to 0 (they kept it at K=2 and strict loads failed).
    torch.manual_seed(0)
    first_phase = pbp_fx.perforate(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()),
                                   (torch.randn(3, 4),))
    first_phase.start_dendrite_phase(pool=2)
    pm.grow()
    with pytest.warns(UserWarning, match="its candidate pool .* is left out"):
        result = pm.load_state_dict(first_phase.state_dict())
    assert {s.num_dendrites for s in pm.sites.values()} == {0} and not result.missing_keys
    pm.eval(), first_phase.eval()
    with torch.no_grad():
        assert torch.equal(pm(x), first_phase(x))


def test_a_dict_subclass_output_keeps_its_class_under_fx_through_copy_and_checkpoint(tmp_path):
    """fx writes a dict subclass (OrderedDict, a Hugging Face ModelOutput) as a plain dict."""
    x = torch.randn(5, 3)
    model = OrderedOut()
    pm = pbp_fx.perforate(model, (x,), frontend="fx")
    out = pm(x)
    assert type(out) is type(model(x)) and list(out) == ["hidden", "logits"]
    assert torch.equal(out["logits"], model(x)["logits"])
    assert type(copy.deepcopy(pm)(x)) is type(out)
    pbp_fx.save(pm, str(tmp_path / "m.safetensors"))
    assert type(pbp_fx.load(str(tmp_path / "m.safetensors"), OrderedOut)(x)) is type(out)
    plain = pbp_fx.perforate(nn.Sequential(nn.Linear(3, 2)), (x,), frontend="fx")
    assert plain.graph_module.meta["pbp_out_spec"] is None  # (a tensor, a plain dict: nothing to rebuild)


class _UnknownDict(dict):
    """A dict subclass pytree does not know: to pytree a leaf, so its one-entry structure read as a
    bare tensor, and the perforated model returned the tensor."""


class _UnknownOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return _UnknownDict(logits=self.fc(x))


class _KnownHoldingUnknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        import collections

        h = self.fc(x)
        return collections.OrderedDict(logits=h, extra=_UnknownDict(a=h, b=2 * h))


def test_a_dict_subclass_pytree_does_not_know_comes_back_as_a_dict():
    x = torch.randn(4, 3)
    out = pbp_fx.perforate(_UnknownOut(), (x,), frontend="fx")(x)
    assert type(out) is dict and out["logits"].shape == (4, 2)
    # Inside a known one: one leaf to pytree, two as fx writes it (every call failed to unflatten)
    out = pbp_fx.perforate(_KnownHoldingUnknown(), (x,), frontend="fx")(x)
    assert type(out) is dict and torch.equal(out["extra"]["b"], 2 * out["logits"])


def test_hooks_on_the_model_itself_are_said_to_be_dropped_unless_torch_export_captures_them():
    """They run outside forward, where symbolic tracing starts: fx dropped them silently (0.87 off).
    Registered on the perforated model they run; frontend='export' captures them."""
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    model.register_forward_pre_hook(lambda m, args: (args[0] * 3,))
    model.register_forward_hook(lambda m, args, out: out.softmax(-1))
    x = torch.randn(5, 6)
    with pytest.warns(UserWarning, match="Sequential has forward hook.* on itself, .* the perforated model runs "
                                         "without them; register them on it"):
        pm = pbp_fx.perforate(model, (x,))
    assert len(model._forward_hooks) == len(model._forward_pre_hooks) == 1  # (the user's model keeps them)
    pm.register_forward_pre_hook(lambda m, args: (args[0] * 3,))
    pm.register_forward_hook(lambda m, args, out: out.softmax(-1))
    torch.testing.assert_close(pm(x), model(x))
    hooked = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    hooked.register_forward_hook(lambda m, args, out: out.softmax(-1))
    with pytest.warns(UserWarning, match="torch.export captures what they compute into the graph"):
        exported = pbp_fx.perforate(hooked, (x,), frontend="export")
    torch.testing.assert_close(exported(x), hooked(x))


class _HookedMasked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x, mask=None):
        y = self.fc(x)
        return y if mask is None else y * mask


def test_torch_export_captures_a_pre_hook_on_the_model_from_a_positional_example_and_else_says_it_drops_it():
    """frontend='export' exported each input by name, so a pre-hook on the root read empty args: refused as
    'example inputs do not run through the model: tuple index out of range', the inputs blamed."""
    x, mask = torch.randn(5, 6), torch.rand(5, 4)
    model = _HookedMasked()
    model.register_forward_pre_hook(lambda m, args: (args[0] * 3, *args[1:]))
    with pytest.warns(UserWarning, match=r"_HookedMasked has forward hook\(s\) or pre-hook\(s\) on itself: torch.export "
                                         r"captures what they compute into the graph, so one that only records"):
        pm = pbp_fx.perforate(model, (x, mask), frontend="export")
    y = torch.randn(7, 6)
    m = torch.rand(7, 4)
    torch.testing.assert_close(pm(y, m), model(y, m))
    torch.testing.assert_close(pm.finalize()(y, m), model(y, m))
    # mask left at its default: torch.export would hand the hook the inputs by name, so it is dropped, said
    with pytest.warns(UserWarning, match=r"_HookedMasked has forward hook.* on itself, .* the perforated model runs without "
                                         r"them; register them on it to keep them; torch.export captures them only "
                                         r"from an example that passes every input of forward positionally"):
        pm = pbp_fx.perforate(model, (x,), frontend="export")
    torch.testing.assert_close(pm(y), model.fc(y))


def test_a_lazy_layer_not_run_yet_gets_the_same_weights_in_the_model_and_its_perforated_copy():
    """The copy drew its own weights at capture, the model others at its first call: 0.35 apart (a lazy
    norm raised in the buffer snapshot before it ran)."""
    model = nn.Sequential(nn.LazyLinear(6), nn.LazyBatchNorm1d(), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(3, 4)
    pm = pbp_fx.perforate(model, (x,))
    assert isinstance(model[0], nn.Linear) and model[0].weight.shape == (6, 4)
    assert int(model[1].num_batches_tracked) == 0 and model.training  # (run in eval mode, buffers kept)
    torch.testing.assert_close(pm(x), model(x))


class _PositionTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("pos", torch.arange(4.0), persistent=False)  # (HF's position_ids are so)

    def forward(self, x):
        return self.fc(x) + self.pos


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_deep_copy_has_the_state_dict_keys_of_the_model_it_copies(frontend):
    """torch's GraphModule.__deepcopy__ registers the buffers its graph reads as persistent: the copy
    of an export capture held a key its original refuses (`model.load_state_dict(best.state_dict())`
    of a `best = copy.deepcopy(model)`; an EMA that zips the two state dicts pairs wrong tensors)."""
    pm = pbp_fx.perforate(_PositionTable(), (torch.randn(2, 4),), frontend=frontend)
    pm.grow()
    best = copy.deepcopy(pm)
    assert list(best.state_dict()) == list(pm.state_dict())
    pm.load_state_dict(best.state_dict())
    assert list(copy.deepcopy(best).state_dict()) == list(pm.state_dict())
    assert list(copy.deepcopy(pm.finalize()).state_dict()) == list(pm.finalize().state_dict())


def test_phase_buffers_loaded_into_a_moved_model_are_held_on_its_device():
    """A model moved (to a GPU) before a checkpoint's phase buffers were loaded held them where they were
    loaded, and copied them across devices at every forward."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    pm = pbp_fx.perforate(model, (torch.randn(2, 3, 8, 8),))
    pm.train()
    pm.start_dendrite_phase(pool=2)
    saved = pm.phase_buffers()
    assert saved and all(v.device.type == "cpu" for v in saved.values())
    pm.to("meta")
    pm.load_phase_buffers(saved)
    assert all(v.device.type == "meta" for v in pm.phase_buffers().values())


def test_save_pretrained_is_refused_in_one_line_naming_what_saves_the_dendrites():
    """pm.save_pretrained gave a bare AttributeError, and the next try, pm.source_model.save_pretrained, writes
    the neurons without the dendrites."""
    pm = pbp_fx.perforate(nn.Sequential(nn.Linear(3, 2)), (torch.randn(2, 3),))
    for method in (pm.save_pretrained, pm.push_to_hub):
        with pytest.raises(pbp_fx.PBError, match=r"a PerforatedModel has no save_pretrained or push_to_hub .*: save it with "
                                                 r"pbp_fx.save\(pm, path\)") as err:
            method("somewhere")
        assert "\n" not in str(err.value)


def test_a_layer_asked_of_the_perforated_model_names_where_it_is():
    """pm.fc after `model = pbp_fx.perforate(model, ...)` was a bare AttributeError (a reviewer); hasattr stays
    False (a framework probing pm for attributes of its own must not find the model's children)."""
    pm = pbp_fx.perforate(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), (torch.randn(2, 3),))
    with pytest.raises(AttributeError, match=r"^'PerforatedModel' object has no attribute '0': the model's layers are "
                                             r"its graph's, pm.graph_module.0$"):
        getattr(pm, "0")
    assert not hasattr(pm, "0") and getattr(pm.graph_module, "0").out_features == 4
    with pytest.raises(AttributeError, match=r"^'PerforatedModel' object has no attribute 'nothing'$"):
        pm.nothing


def _prepared_for_qat() -> nn.Module:
    import torch.ao.quantization as tq

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(96, 3))
    model.qconfig = tq.get_default_qat_qconfig("fbgemm")
    return tq.prepare_qat(tq.fuse_modules_qat(model.train(), [["0", "1", "2"]]))


def test_no_sites_under_auto_does_not_advise_auto():
    """A prepared-for-QAT model under auto (which had tried torch.export) was told "frontend='export', or
    'auto', captures the ops of that forward instead" (a reviewer)."""
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(pbp_fx.NoSitesError) as auto:
        pbp_fx.perforate(_prepared_for_qat(), (x,))
    assert "overrides forward" in str(auto.value) and "or 'auto'" not in str(auto.value), str(auto.value)
    with pytest.raises(pbp_fx.NoSitesError, match=r"frontend='export', or 'auto', captures the ops"):
        pbp_fx.perforate(_prepared_for_qat(), (x,), frontend="fx")


def test_put_back_reaches_a_buffer_through_any_module_on_its_name_path():
    """put_back writes the held value into the tensor at each name path: through plain and TorchScript modules
    (whose dicts are not dicts), and leaves a missing or reshaped one alone."""
    from pbp_fx.perforated import put_back

    root = nn.Sequential(nn.Linear(4, 4), torch.jit.script(nn.BatchNorm1d(4)), nn.BatchNorm1d(4))
    put_back(root, [(["1", "running_mean"], torch.full((4,), 7.0)), (["2", "running_var"], torch.full((4,), 3.0)),
                    (["3", "running_mean"], torch.zeros(4)), (["2", "running_mean"], torch.zeros(5))])
    assert torch.equal(root[1].running_mean, torch.full((4,), 7.0))
    assert torch.equal(root[2].running_var, torch.full((4,), 3.0))
    assert torch.equal(root[2].running_mean, torch.zeros(4))  # (its initial value: the reshaped one not written)


def test_a_dendrite_phase_resumed_from_a_checkpoint_may_evaluate_before_it_trains(tmp_path):
    """The warning is for a loop that left the model in eval mode; a phase loaded after it trained
    (its loop evaluates the resumed model first) warned all the same."""
    def model():
        torch.manual_seed(0)
        return pbp_fx.perforate(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(2, 4))

    pm = model()
    pm.start_dendrite_phase(pool=2)
    pm.train()(torch.randn(3, 4)).square().mean().backward()
    pbp_fx.save(pm, str(tmp_path / "c.pt"))
    resumed = pbp_fx.load(str(tmp_path / "c.pt"), model())
    assert resumed.phase == "dendrite"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.eval()(torch.randn(3, 4))
    fresh = model()
    fresh.start_dendrite_phase(pool=2)
    with pytest.warns(UserWarning, match="eval mode with gradients on"):
        fresh.eval()(torch.randn(3, 4))
