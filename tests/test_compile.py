"""Whole training steps of a perforated model under torch.compile (dynamo + AOTAutograd, aot_eager backend).

The same steps run eagerly on a deep copy: losses, weights and candidate statistics must agree,
each restructure must cost one compilation and later steps none (bench/compile.py times inductor).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pbp_fx


class Counting:
    """aot_eager, counting the graphs dynamo compiles."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        self.graphs += 1
        return aot_eager(gm, example_inputs)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 6, 5, stride=2), nn.BatchNorm1d(6), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 18, 5))


def _step(model, opt, x, y) -> float:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _sgd(pm):
    # SGD, not Adam: Adam turns float noise in near-zero gradients (a bias before BatchNorm) into
    # full-size steps, so compiled and eager weights would part for reasons unrelated to PB.
    return torch.optim.SGD(list(pm.trainable_parameters()), lr=0.1)


@pytest.fixture
def twins():
    pm = pbp_fx.perforate(_cnn(), torch.zeros(2, 1, 40))
    return pm, copy.deepcopy(pm)


def _run(pm, twin, compiled, backend, x, y, steps=4):
    """`steps` steps on both; returns the graphs compiled at the first step and after it."""
    opt_c, opt_e = _sgd(pm), _sgd(twin)
    before = backend.graphs
    for i in range(steps):
        lc, le = _step(compiled, opt_c, x, y), _step(twin, opt_e, x, y)
        assert lc == pytest.approx(le, rel=1e-5, abs=1e-6)
        if i == 0:
            first = backend.graphs - before
    return first, backend.graphs - before - first


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 1, 40, generator=g), torch.randint(0, 5, (32,), generator=g)


def _same_state(pm, twin):
    for (n, a), (_, b) in zip(pm.state_dict().items(), twin.state_dict().items()):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.slow  # dynamo + AOTAutograd compile twice: 15-45 s on this shared 2-core machine
def test_neuron_phase_compiles_once_per_structure(twins):
    torch._dynamo.reset()
    pm, twin = twins
    x, y = _data()
    backend = Counting()
    compiled = torch.compile(pm, backend=backend)
    assert _run(pm, twin, compiled, backend, x, y) == (1, 0)  # one graph, no recompiles
    pm.grow()  # a restructure: one dendrite per site (as mode "gd" does), random weights...
    twin = copy.deepcopy(pm)  # ...which the eager twin copies
    assert _run(pm, twin, compiled, backend, x, y) == (1, 0)
    _same_state(pm, twin)


# The covariance tap is a custom op whose backward (another custom op) updates the statistics in
# place: the compiled backward must update them exactly as the eager one.
@pytest.mark.slow  # ~1 min: the dendrite-phase graph (pool copies, custom backward) compiles slowly
def test_dendrite_phase_statistics_match_eager_and_install_recompiles_once(twins):
    torch._dynamo.reset()
    pm, twin = twins
    x, y = _data()
    backend = Counting()
    compiled = torch.compile(pm, backend=backend)
    assert _run(pm, twin, compiled, backend, x, y, steps=1) == (1, 0)
    pm.start_dendrite_phase(pool=2)
    twin = copy.deepcopy(pm)  # the same random candidates
    first, later = _run(pm, twin, compiled, backend, x, y, steps=8)
    assert (first, later) == (1, 0)  # the restructure compiles once, later steps reuse it
    for name in pm.sites:
        torch.testing.assert_close(pm.sites[name].correlation(), twin.sites[name].correlation())
    for m in (pm, twin):
        m.install_candidates()
    assert _run(pm, twin, compiled, backend, x, y) == (1, 0)  # neuron phase with a dendrite
    _same_state(pm, twin)


def _graph_breaks(pm, x) -> list[str]:
    torch._dynamo.reset()
    out = torch._dynamo.explain(pm.train())(x)
    torch._dynamo.reset()
    return [r.reason.splitlines()[0] for r in out.break_reasons]


@pytest.mark.slow  # explain traces twice: 10-30 s here
def test_no_graph_break_in_the_neuron_phase(twins):
    pm, _ = twins
    x, _ = _data()
    assert _graph_breaks(pm, x) == []
    pm.grow()
    assert _graph_breaks(pm, x) == []


# No graph break inside a Site in either phase (issue 11).
@pytest.mark.slow
def test_no_graph_break_in_the_dendrite_phase(twins):
    pm, _ = twins
    x, _ = _data()
    pm.start_dendrite_phase(pool=2)
    assert _graph_breaks(pm, x) == []
