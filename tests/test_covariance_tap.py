"""pbp_fx.covariance_tap: the statistics update, decided on the host (CPU) or by masks (devices)."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pbp_fx
from pbp_fx.covariance_tap import batch_covariance, candidate_gradient, fold_batch
from pbp_fx.layers import copy_dim, every_nth_position, split_members
from pbp_fx.site import Site


def _state(p=3, c=4, rows=((3, 4, 2, 5), (3, 4))):
    stats = [torch.zeros(p, c), torch.zeros(p, c), torch.zeros(p, c), torch.tensor(0), torch.tensor(0), torch.tensor(0)]
    params = [torch.randn(*shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(rows)]
    snapshots = [t.clone() for t in params]
    return stats, snapshots, params


def test_host_and_masked_decisions_give_the_same_statistics():
    g = torch.Generator().manual_seed(0)
    settings = (0.9, 4, 0.01, True)  # decay, warm-up, threshold, bias correction
    runs = {host: _state() for host in (True, False)}
    for host, (stats, snapshots, rows) in runs.items():  # not new before any batch: nothing changes
        fold_batch(stats, snapshots, rows, torch.randn(3, 4, generator=g), settings, new=False, host=host)
        assert all(not t.any() for t in stats)
    for step in range(40):
        cov = torch.randn(3, 4, generator=g) * (1 + step / 10)
        if step == 7:
            cov[1, 2] = float("nan")  # a step GradScaler skips: seen, not counted
        for rows in (runs[True][2], runs[False][2]):
            for r in rows:
                r.add_(0.01 * step)  # the candidates train: snapshots must pick the right rows
        for host, (stats, snapshots, rows) in runs.items():
            sign = fold_batch(stats, snapshots, rows, cov.clone(), settings, host=host)
            again = fold_batch(stats, snapshots, rows, cov.clone() * 5, settings, new=torch.tensor(False), host=host)
            assert (sign is None) is (host and step == 7)  # (on the host: skipped, said as None)
            assert sign is None or torch.equal(sign, again)  # a retained graph's second backward changes nothing
    (a, sa, _), (b, sb, _) = runs[True], runs[False]
    assert int(a[4]) == int(b[4]) == 40 and int(a[3]) == int(b[3]) == 39  # seen, counted
    for x, y in zip(a + sa, b + sb):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert int(a[5]) > 4  # some snapshot was taken after the warm-up


@pytest.mark.parametrize("host", [True, False])
def test_a_skipped_batch_neither_ages_the_average_nor_counts_to_the_warm_up(host):
    """A first batch GradScaler skipped still advanced the bias correction: the zero start kept
    16 % of the weight, and every ema entry ended 0.84 x the run's without that batch."""
    g = torch.Generator().manual_seed(0)
    settings = (0.9, 3, 0.01, True)
    covs = [torch.randn(3, 4, generator=g) for _ in range(6)]
    runs = {}
    for skipped_first in (False, True):
        stats, snapshots, rows = _state()
        if skipped_first:
            fold_batch(stats, snapshots, rows, torch.full((3, 4), float("inf")), settings, host=host)
        for cov in covs:
            fold_batch(stats, snapshots, rows, cov.clone(), settings, host=host)
        runs[skipped_first] = stats
    clean, skipped = runs[False], runs[True]
    assert int(skipped[4]) == int(clean[4]) + 1 and int(skipped[3]) == int(clean[3]) == 6  # seen, counted
    for name, a, b in zip(("ema", "ema_sq", "best"), clean[:3], skipped[:3]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
    assert int(skipped[5]) == int(clean[5])  # the last snapshot at the same counted batch


@pytest.mark.parametrize("shape, axis, split", [
    ((12, 3, 5, 7), 1, True),       # conv1d: [B', P, C, L]
    ((12, 3, 5, 4, 6), 1, True),    # conv2d
    ((12, 3, 5), 1, True),          # conv without spatial dims left
    ((12, 3, 5), -1, True),         # linear: [B', P, C]
    ((6, 4, 3, 5), -1, True),       # linear over a sequence: [B', T, P, C]
    ((12, 3, 5, 7), 1, False),      # full batch: every member saw every sample
    ((6, 4, 3, 5), -1, False),
])
def test_covariance_and_gradient_equal_the_centred_formula(shape, axis, split):
    g = torch.Generator().manual_seed(0)
    c = torch.rand(*shape, generator=g)
    cd = copy_dim(axis)
    p, ch = shape[cd], shape[cd + 1] if axis == 1 else shape[-1]
    d_shape = list(shape)
    if not split:
        d_shape[cd] = 1
    d = torch.randn(*d_shape, generator=g) + 0.5  # an offset: the centring must remove it
    pos = [0, *range(3, c.dim())] if axis == 1 else list(range(c.dim() - 2))
    share = p if split else 1
    want_e = d - d.mean(pos, keepdim=True)
    want_cov = share * ((c - c.mean(pos, keepdim=True)) * want_e).sum(pos)
    cov, e = batch_covariance(c, d, axis, ch)
    torch.testing.assert_close(cov, want_cov, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e, want_e, rtol=1e-6, atol=1e-6)

    # The gradient is that of -sum sign(ema) * C with respect to c, ema after this batch.
    stats, snapshots, rows = _state(p, ch, rows=((p, ch, 2), (p, ch)))
    grad_y = d if split else d.squeeze(cd)
    if split:  # candidate_gradient deals grad_y [B, ...] to the members itself
        grad_y = d.movedim(cd, 0).flatten(0, 1)
    got = candidate_gradient(grad_y, c, stats, snapshots, rows, True, axis, split, 1, None, (0.99, 100, 0.01, True))
    sign = torch.sign(stats[0])
    cc = c.clone().requires_grad_()
    dd = d.movedim(cd, 0).flatten(0, 1) if split else d
    if split:
        dd = split_members(dd, p, axis)
    objective = -(sign * share * ((cc - cc.mean(pos, keepdim=True)) * (dd - dd.mean(pos, keepdim=True))).sum(pos)).sum()
    objective.backward()
    torch.testing.assert_close(got, cc.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [None, 1.0, 1024.0])
def test_a_batch_not_counted_steps_no_candidate_without_a_grad_scaler(scale):
    """A NaN error (a model whose backward makes 0 * inf) was skipped by the statistics, but its NaN
    gradient reached the candidates: without a GradScaler (scale None), Adam took it into their weights
    for good. With one, the NaN stays: the scaler skips that step and lowers its scale, also a scale
    backed off to exactly 1 (which read as no scaler)."""
    g = torch.Generator().manual_seed(0)
    c, grad_y = torch.rand(8, 3, 5, generator=g), torch.randn(8, 5, generator=g)
    grad_y[2, 1] = float("nan")
    stats, snapshots, rows = _state(3, 5, rows=((3, 5),))
    got = candidate_gradient(grad_y, c, stats, snapshots, rows, True, -1, False, 1, scale, (0.99, 0, 0.01, True))
    assert int(stats[4]) == 1 and int(stats[3]) == 0  # seen, not counted
    assert not got.any() if scale is None else got.isnan().all()


@pytest.mark.parametrize("shape, axis, left_out", [
    ((8, 5, 9), 1, 9 / 5),          # conv1d: 5 of 9 positions seen
    ((8, 5, 6, 7), 1, 42 / 12),     # conv2d: 3 x 4 of 6 x 7
    ((4, 5, 3), -1, 5 / 3),         # linear over 5 tokens: 3 seen
    ((8, 5), -1, 1.0),              # linear without positions: nothing left out
])
def test_a_strided_gradient_is_the_subsampled_one_in_whole_batch_units(shape, axis, left_out):
    """stride 2: delta is read at every 2nd position, and C and dC/dc count the positions left out."""
    g = torch.Generator().manual_seed(0)
    grad_y = torch.randn(*shape, generator=g) + 0.3
    seen = every_nth_position(grad_y, 2, axis)
    p, ch = 2, shape[1] if axis == 1 else shape[-1]
    c = torch.rand(*split_members(seen, p, axis).shape, generator=g)
    settings = (0.99, 0, 0.01, True)
    strided, plain = _state(p, ch, rows=((p, ch),)), _state(p, ch, rows=((p, ch),))
    got = candidate_gradient(grad_y, c, *strided, True, axis, True, 2, None, settings)
    want = candidate_gradient(seen.contiguous(), c, *plain, True, axis, True, 1, None, settings)
    torch.testing.assert_close(strided[0][0], plain[0][0] * left_out)  # ema
    torch.testing.assert_close(got, want * left_out)


def test_a_batch_of_one_value_per_channel_is_warned_of():
    """Batches of 1 sample at a Linear site: every covariance is 0, the candidates never learn, and a
    random pool member was installed without a word."""
    import warnings

    import pbp_fx

    pm = pbp_fx.perforate(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)),
                          (torch.randn(2, 4),))
    pm.start_dendrite_phase(pool=2)
    with pytest.warns(pbp_fx.PBWarning, match=r"^a batch of 1 sample gives each candidate one value per channel at "
                                              r"a site without positions, so that batch adds nothing .*"
                                              r"DataLoader\(drop_last=True\) leaves it out; if every batch is, the "
                                              r"dendrite phase learns nothing: use batches of 2 or more") as caught:
        pm(torch.randn(1, 4)).sum().backward()
    assert {w.filename for w in caught} == {__file__}  # (the user's line, not the tap's)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm(torch.randn(3, 4)).sum().backward()


@pytest.mark.parametrize("shape, axis, d_members", [
    ((25, 4, 8, 19), 1, 4),   # conv1d, split: [B', P, C, L]
    ((100, 4, 8), -1, 1),     # linear, full batch: [B, P, C], d [B, 1, C]
])
@pytest.mark.parametrize("offset", [1.0, 100.0, 1e4])
def test_an_error_with_a_large_mean_keeps_the_covariance_to_float32_precision(shape, axis, d_members, offset):
    """A site error with a large constant part (an output site under a loss with an offset): float32's
    mean of d was off by up to half a unit of the offset, and that error times every position's c went
    into C (0.03 % off at an offset 1e4 x the error's spread, 1.6-2.8 % in a reviewer's run)."""
    g = torch.Generator().manual_seed(1)
    c = torch.rand(*shape, generator=g)
    d_shape = list(shape)
    d_shape[copy_dim(axis)] = d_members
    c_part = c.narrow(copy_dim(axis), 0, d_members)
    d = offset + 0.01 * torch.randn(*d_shape, generator=g) + 0.003 * c_part
    pos = [0, *range(3, c.dim())] if axis == 1 else list(range(c.dim() - 2))
    c64, d64 = c.double(), d.double()
    want = d_members * ((c64 - c64.mean(pos, keepdim=True)) * (d64 - d64.mean(pos, keepdim=True))).sum(pos)
    cov, e = batch_covariance(c, d, axis, shape[copy_dim(axis) + 1])
    assert ((cov.double() - want).abs().max() / want.abs().max()).item() < 1e-6
    assert (e.double().sum(pos).abs().max() / e.abs().max()).item() < 1e-4  # e centred to its own precision


# (a global full backward hook fails the plain model's ReLU(inplace=True) itself: torch's view+inplace error)
@pytest.mark.parametrize("hook, hooked", [(h, m) for h in ("full_backward_hook", "full_backward_pre_hook")
                                          for m in ("4", "1")] + [("forward_hook_penalty", m)
                                                                  for m in ("4", "1", "global")])
@pytest.mark.parametrize("grows", [0, 1])
def test_a_hooked_neuron_trains_its_candidates_whether_the_tap_copies_or_returns_the_site_output(hook, grows, hooked):
    """Without dendrites the site output is the neuron layer's own (here the Linear's, or the conv's norm's): a
    backward hook makes it a view, and a forward hook's penalty saves it, so the tap must not declare it modified
    (it returned it so once, and the step failed); with dendrites the site made it, and the tap returns it
    without a copy. "global": torch's hook for every module."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 6, 6), torch.arange(16) % 4
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(8 * 36, 4))
    pm = pbp_fx.perforate(model, (x[:2],))
    for _ in range(grows):
        pm.grow()
    penalty = []
    register = {"full_backward_hook": ("register_full_backward_hook", lambda mod, grad_in, grad_out: None),
                "full_backward_pre_hook": ("register_full_backward_pre_hook", lambda mod, grad_out: None),
                "forward_hook_penalty": ("register_forward_hook",
                                         lambda mod, inputs, out: penalty.append(1e-3 * out.pow(2).mean()))}[hook]
    if hooked == "global":  # (the norm's and the Linear's outputs among every module's)
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda mod, inputs, out: penalty.append(1e-3 * out.pow(2).mean()) if type(mod) in (
                nn.BatchNorm2d, nn.Linear) else None)
    else:
        handle = getattr(getattr(pm.graph_module, hooked), register[0])(register[1])
    try:
        pm.train()
        pm.start_dendrite_phase(pool=4)
        loss = F.cross_entropy(pm(x), y) + sum(penalty)
        loss.backward()
    finally:
        handle.remove()
    for site in ("0", "4"):
        grad = pm.sites[site].candidates.copies.weight.grad
        assert grad is not None and bool(grad.isfinite().all()) and bool(grad.abs().sum() > 0)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_site_without_dendrites_passes_its_neurons_own_output_on_where_nothing_else_holds_it(frontend):
    """The dendrite phase's tap returns an unheld neuron output itself (declared modified, not copied: a copy
    cost 1.5-2 % of a step), and the step's gradients are those of a copy; a forward hook on the neuron's
    norm brings the copy back. ReLU(inplace=True) after the site modifies the returned output. Under
    torch.export the norm runs in pbp_fx's mode switch, not torch's module: its output is copied."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 6, 6), torch.arange(16) % 4
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(8 * 36, 4))
    pm = pbp_fx.perforate(model, (x[:2],), frontend=frontend)
    pm.train()
    pm.start_dendrite_phase(pool=4, generator=torch.Generator().manual_seed(1))
    sites = [m for m in pm.graph_module.modules() if isinstance(m, Site)]
    assert len(sites) == 2
    seen = []
    handles = [s.register_forward_hook(lambda mod, inputs, out: seen.append(out is inputs[1])) for s in sites]

    def grads():
        pm.zero_grad(set_to_none=True)
        F.cross_entropy(pm(x), y).backward()
        return [s.candidates.copies.weight.grad.clone() for s in sites]

    state = copy.deepcopy(pm.state_dict())
    passed_on = grads()
    # (export: the Linear is a function node, whose output no module hook can reach)
    assert seen == [frontend == "fx", True]
    if frontend == "export":
        return
    pm.load_state_dict(state)
    seen.clear()
    norm = next(m for m in pm.graph_module.modules() if isinstance(m, nn.BatchNorm2d))
    hook = norm.register_forward_hook(lambda mod, inputs, out: None)
    copied = grads()
    assert seen == [False, True]  # (the norm's output copied, the Linear's still passed on)
    hook.remove()
    for h in handles:
        h.remove()
    for a, b in zip(passed_on, copied):
        assert torch.equal(a, b)


def _conv_bn_linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))


def _candidate_grads(pm, x, y, penalty: list = ()) -> list:
    """The candidates' gradients of one step, its loss plus what `penalty` holds after the forward."""
    pm.zero_grad(set_to_none=True)
    loss = F.cross_entropy(pm(x), y)
    (loss + sum(penalty)).backward()
    return [s.candidates.copies.weight.grad.clone() for s in pm.sites.values()]


@pytest.mark.parametrize("change", ["swapped_for_sigmoid_tail", "swapped_before_the_phase", "site_pre_hook",
                                    "global_pre_hook"])
def test_what_the_recorded_neuron_cannot_show_keeps_the_copy(change, monkeypatch):
    """Review of stop 56: a module swapped into the graph after perforating (its output saved by a Sigmoid; a Linear
    whose forward hook saves its output, swapped in before the dendrite phase, which records the modules anew) and
    a pre-hook that sees the site's inputs (and may save the neuron output) failed the step ("modified by an inplace
    operation") once the tap passed the recorded module's output on; they keep the copy, with the copy's gradients."""
    x, y = torch.randn(16, 3, 6, 6), torch.arange(16) % 4
    pm = pbp_fx.perforate(_conv_bn_linear(), (x[:2],))
    pm.train()
    penalty = []
    if change == "swapped_before_the_phase":
        head = copy.deepcopy(getattr(pm.graph_module, "4"))
        head.register_forward_hook(lambda mod, inputs, out: penalty.append(out.pow(2).mean()))
        pm.graph_module.add_module("4", head)
    pm.start_dendrite_phase(pool=4, generator=torch.Generator().manual_seed(1))
    if change == "swapped_for_sigmoid_tail":
        pm.graph_module.add_module("4", nn.Sequential(getattr(pm.graph_module, "4"), nn.Sigmoid()))
    elif change == "site_pre_hook":
        pm.sites["4"].register_forward_pre_hook(lambda mod, inputs: penalty.append(inputs[1].pow(2).mean()))
    state = copy.deepcopy(pm.state_dict())
    handle = (torch.nn.modules.module.register_module_forward_pre_hook(
        lambda mod, inputs: penalty.append(inputs[1].pow(2).mean()) if isinstance(mod, Site) else None)
        if change == "global_pre_hook" else None)
    try:
        passed = _candidate_grads(pm, x, y, penalty)
        assert len(penalty) == {"swapped_for_sigmoid_tail": 0, "global_pre_hook": 2}.get(change, 1)
        penalty.clear()
        pm.load_state_dict(state)
        monkeypatch.setattr(Site, "neuron_output_unheld", lambda self, n: False)
        copied = _candidate_grads(pm, x, y, penalty)
    finally:
        if handle is not None:
            handle.remove()
    for a, b in zip(passed, copied):
        assert torch.equal(a, b)


class _FunctionalConv(nn.Module):
    """A conv called as a function: its site's output node is no module's."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.w, padding=1).flatten(1)


def test_a_function_made_neuron_output_is_still_passed_on_after_a_pickle_round_trip():
    """The record that a function made the output survives pickling (it was compared by identity: after a round
    trip every such site copied again)."""
    x = torch.randn(8, 3, 6, 6)
    pm = pickle.loads(pickle.dumps(pbp_fx.perforate(_FunctionalConv(), (x[:2],))))
    pm.train()
    pm.start_dendrite_phase(pool=2)
    site = next(iter(pm.sites.values()))
    seen = []
    site.register_forward_hook(lambda mod, inputs, out: seen.append(out is inputs[1]))
    pm(x).square().mean().backward()
    assert seen == [True]


def test_no_neuron_output_is_passed_on_while_compiling(monkeypatch):
    """mark_dirty breaks a compiled graph (dynamo: unsupported autograd.Function context): compiled steps copy."""
    x = torch.randn(4, 3, 6, 6)
    pm = pbp_fx.perforate(_conv_bn_linear(), (x[:2],))
    site = pm.sites["4"]
    n = torch.randn(4, 4)
    assert site.neuron_output_unheld(n)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not site.neuron_output_unheld(n)
