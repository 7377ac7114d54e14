"""passes.manager: Pass contracts and the PassManager pipeline."""
import functools

import pytest
import torch
from torch import fx, nn

import pbp_fx
from pbp_fx.passes import Pass, PassManager, finalize, find_sites, insert_dendrites
from pbp_fx.site import FusedSite, Site

pytestmark = pytest.mark.usefixtures("seeded")


def _gm():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))
    return model, pbp_fx.trace(model, (torch.randn(2, 2, 4, 4),))


def _has_sites(gm):
    if not any(isinstance(m, Site) for m in gm.modules()):
        raise AssertionError("no Site modules")


def _no_sites(gm):
    if any(isinstance(m, Site) for m in gm.modules()):
        raise AssertionError("Site modules left")


def _perforate(gm):
    return insert_dendrites(gm, find_sites(gm))


def _grow(gm):
    for m in gm.modules():
        if isinstance(m, Site):
            m.grow()
    return gm


def test_pipeline_runs_in_order_and_checks_contracts(pb):
    model, gm = _gm()
    x = torch.randn(2, 2, 4, 4)
    order = []

    def log(name, fn):
        @functools.wraps(fn)
        def run(g):
            order.append(name)
            return fn(g)
        return run

    pm = PassManager([
        Pass(log("perforate", _perforate), requires=_no_sites, ensures=_has_sites),
        log("grow", _grow),  # a plain callable is wrapped in a Pass
        Pass(log("finalize", finalize), requires=_has_sites, ensures=_no_sites),
    ])
    assert all(isinstance(p, Pass) for p in pm.passes)
    out = pm(gm)
    assert order == ["perforate", "grow", "finalize"]
    assert sum(isinstance(m, FusedSite) for m in out.modules()) == 2
    assert pb.max_diff(out(x), model.eval()(x)) <= 1e-5  # V = 0 after grow


def test_requires_is_checked_before_the_pass_runs():
    _, gm = _gm()
    ran = []
    p = Pass(lambda g: ran.append(1) or g, requires=_has_sites)
    with pytest.raises(AssertionError, match="no Site modules"):
        p(gm)
    assert ran == []


def test_ensures_is_checked_on_the_output():
    _, gm = _gm()
    with pytest.raises(AssertionError, match="no Site modules"):
        PassManager([Pass(lambda g: g, ensures=_has_sites)])(gm)


def test_a_pass_must_return_a_graph_module():
    _, gm = _gm()

    def broken(g):
        g.recompile()

    with pytest.raises(TypeError, match="'broken' returned NoneType, not a GraphModule"):
        PassManager([broken])(gm)


def test_output_graphs_are_linted():
    _, gm = _gm()

    def misordered(g):
        first = next(n for n in g.graph.nodes if n.op == "call_module")
        first.prepend(next(iter(first.users)))  # a user moved before its producer
        return g

    with pytest.raises(RuntimeError, match="used before it has been defined"):
        PassManager([misordered])(gm)


def test_lint_rejects_a_graph_using_a_missing_module():
    _, gm = _gm()

    def bad_target(g):
        node = next(n for n in g.graph.nodes if n.op == "call_module")
        node.target = "no_such_module"
        return g

    with pytest.raises(RuntimeError, match="no_such_module"):
        PassManager([bad_target])(gm)


def test_manager_matches_perforate(pb):
    model, gm = _gm()
    x = torch.randn(2, 2, 4, 4)
    by_hand = PassManager([_perforate])(gm)
    pm = pbp_fx.perforate(model, (x,))
    assert by_hand.code == pm.code
