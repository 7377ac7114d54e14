"""passes.insert_dendrites: every site output routed through a Site node; leaf neurons swapped."""
import json

import pytest
import torch
from torch import fx, nn

from pbp_fx import Site, trace
from pbp_fx.passes import SiteSpec, find_sites, insert_dendrites, site_key
from pbp_fx.passes.insert_dendrites import SITES_ATTR
from pbp_fx.site import SwappedNeuron

pytestmark = pytest.mark.usefixtures("seeded")


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


class Net(nn.Module):
    """conv+BN site, a site feeding a neuron directly, a reused Linear, a leaf, the output a site."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.pw = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 4)
        self.leaf = Branchy()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.pw(self.bn(self.conv(x)))           # bn output -> pw directly
        h = h.mean((2, 3))
        h = self.fc(torch.relu(self.fc(h)))          # reused; fc -> fc through relu
        return self.head(self.leaf(h))


def _perforate_graph(model, x, **kw):
    gm = trace(model, (x,))
    specs = find_sites(gm)
    return insert_dendrites(gm, specs, **kw), specs


def _site_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Site)]


def test_postconditions(pb):
    model, x = Net().eval(), torch.randn(2, 2, 5, 5)
    want = model(x)
    gm, specs = _perforate_graph(model, x, activation="tanh", mode="gd")
    gm.graph.lint()
    nodes = {n.name: n for n in gm.graph.nodes}
    site_nodes = _site_nodes(gm)
    graph_specs = [s for s in specs if not s.in_leaf]
    assert len(site_nodes) == len(graph_specs) == 5
    for spec, node in zip(graph_specs, site_nodes):
        site = gm.get_submodule(node.target)
        assert site.name == spec.name and site.spec is spec
        assert site.activation == "tanh" and site.mode == "gd"
        assert node.target == f"{SITES_ATTR}.{site_key(spec.name)}"
        out = nodes[spec.output_node]
        assert node.args[1] is out
        assert list(out.users) == [node]  # the Site node took over every use
        # x is what the neuron reads now (an upstream Site node where sites are chained)
        assert node.args[0] is nodes[spec.neuron_node].args[0]
    assert site_nodes[1].args[0] is site_nodes[0]  # bn -> pw: pw's dendrites see the conv site's output
    leaf = gm.get_submodule("leaf.fc")
    assert isinstance(leaf, SwappedNeuron) and leaf.site.name == "leaf.fc" and isinstance(leaf.neuron, nn.Linear)
    assert pb.max_diff(gm(x), want) == 0.0


def test_sites_follow_weight_dtype():
    model = nn.Sequential(nn.Linear(3, 3)).double()
    gm, _ = _perforate_graph(model, torch.randn(2, 3, dtype=torch.float64))
    site = gm.get_submodule(f"{SITES_ATTR}.0")
    site.grow()
    assert site.dendrites.weight.dtype == torch.float64


def test_running_twice_is_refused():
    model, x = Net(), torch.randn(2, 2, 5, 5)
    gm = trace(model, (x,))
    specs = find_sites(gm)
    insert_dendrites(gm, specs)
    with pytest.raises(ValueError, match="already perforated"):
        insert_dendrites(gm, [s for s in specs if not s.in_leaf])
    with pytest.raises(ValueError, match="already perforated"):
        insert_dendrites(gm, [s for s in specs if s.in_leaf])


def test_names_that_share_a_key_keep_separate_sites():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Module()
            self.a.b = nn.Linear(3, 3)
            self.a_b = nn.Linear(3, 3)

        def forward(self, x):
            return self.a_b(self.a.b(x))

    assert site_key("a.b") == site_key("a_b")
    gm, _ = _perforate_graph(M(), torch.randn(2, 3))
    assert [gm.get_submodule(n.target).name for n in _site_nodes(gm)] == ["a.b", "a_b"]
    assert len({n.target for n in _site_nodes(gm)}) == 2


def test_site_key_is_attribute_safe():
    assert site_key("layer1.0.conv") == "layer1_0_conv"
    assert site_key("fc@2") == "fc_at2"
    assert site_key("fc@2").isidentifier()


@pytest.mark.parametrize("train", [True, False])
def test_dendrites_with_zero_v_change_nothing(train, pb):
    model, x = Net().train(train), torch.randn(3, 2, 5, 5)
    gm, _ = _perforate_graph(model, x)
    for m in gm.modules():
        if isinstance(m, Site):
            m.grow()
            m.grow()
    gm.train(train)
    for xi in (x, -x.abs()):
        assert pb.max_diff(gm(xi), model(xi)) <= 1e-6


def test_specs_found_on_another_graph_are_refused_before_any_site_is_inserted():
    """A bare AttributeError ('B has no attribute c1') left the precondition unnamed (a reviewer)."""
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.c2(torch.relu(self.c1(x)))

    import dataclasses

    specs = find_sites(trace(Two(), (torch.randn(2, 4),)))
    moved = [specs[0], dataclasses.replace(specs[1], neuron_node="gone")]
    single = trace(nn.Sequential(nn.Linear(4, 2)), (torch.randn(2, 4),))
    for other, given, what in [(single, specs, "'c1' names module 'c1'"),
                               (trace(Two(), (torch.randn(2, 4),)), moved, "'c2' names node 'gone'")]:
        before = str(other.graph)
        with pytest.raises(ValueError, match=f"site spec {what}, which this graph lacks: the specs come from "
                                             r"find_sites on another graph; pass find_sites\(gm\) of this one"):
            insert_dendrites(other, given)
        assert str(other.graph) == before and not hasattr(other, SITES_ATTR)


def test_its_ensures_are_checked_and_a_graph_that_breaks_them_is_named():
    from pbp_fx.passes import ContractError
    from pbp_fx.passes.insert_dendrites import ensures_inserted

    model, x = Net().eval(), torch.randn(2, 2, 5, 5)
    gm, specs = _perforate_graph(model, x)
    ensures_inserted(gm, specs)  # (insert_dendrites ran it too)
    out = next(n for n in gm.graph.nodes if n.name == specs[0].output_node)
    with gm.graph.inserting_after(out):
        gm.graph.call_function(torch.relu, (out,))  # a second reader the Site does not see
    with pytest.raises(ContractError, match=f"site '{specs[0].name}'.s output {out.name} read by"):
        ensures_inserted(gm, specs)
    gm, specs = _perforate_graph(model, x)
    site_node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith(SITES_ATTR))
    site_node.replace_all_uses_with(site_node.args[0])  # (the Site bypassed: its output read by nothing)
    gm.graph.erase_node(site_node)
    with pytest.raises(ContractError, match="read by no Site"):
        ensures_inserted(gm, specs)
    gm, specs = _perforate_graph(model, x)
    leaf = next(s for s in specs if s.in_leaf)
    owner, _, child = leaf.module.rpartition(".")
    setattr(gm.get_submodule(owner), child, gm.get_submodule(leaf.module).neuron)  # swapped back
    with pytest.raises(ContractError, match="unswapped"):
        ensures_inserted(gm, specs)


def test_find_sites_requires_a_captured_graph():
    with pytest.raises(TypeError, match="find_sites takes a captured graph, not a Net: pass pbp_fx.trace"):
        find_sites(Net())


class TwoLayers(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.fc, self.o = nn.Linear(4, hidden), nn.Conv1d(hidden, 2, 3, padding="same")

    def forward(self, x):
        return self.o(torch.relu(self.fc(x)).transpose(1, 2))


def test_specs_of_a_graph_with_other_widths_are_refused_before_any_edit():
    """The names matched, so specs of TwoLayers(6) went into TwoLayers(9) and failed at the first forward
    after a dendrite grew."""
    gm = fx.symbolic_trace(TwoLayers(9))
    before = gm.code
    with pytest.raises(ValueError, match=r"site spec 'fc' names a 'fc.weight' of shape \(6, 4\) \(it is \(9, 4\) "
                                         r"here\).*pass find_sites\(gm\) of this one"):
        insert_dendrites(gm, find_sites(fx.symbolic_trace(TwoLayers(6))))
    assert gm.code == before


def test_specs_round_trip_through_json_and_a_dict_spec_is_refused():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4)
    specs = find_sites(fx.symbolic_trace(TwoLayers(6)))
    data = json.loads(json.dumps([s.to_dict() for s in specs]))
    assert [SiteSpec.from_dict(d) for d in data] == specs
    outs = []
    for given in (specs, [SiteSpec.from_dict(d) for d in data]):
        torch.manual_seed(1)
        model = TwoLayers(6)
        gm = insert_dendrites(fx.symbolic_trace(model), given)
        for site in getattr(gm, SITES_ATTR).values():
            site.grow()
        outs.append(gm(x))
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(TypeError, match="a spec whose layer is a dict: pass find_sites.*SiteSpec.from_dict"):
        insert_dendrites(fx.symbolic_trace(TwoLayers(6)), [SiteSpec(**d) for d in data])
