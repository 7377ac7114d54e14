"""passes.train_eval: merging a train-mode and an eval-mode capture into one graph that follows the mode."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import pbp_fx
from pbp_fx.passes import finalize
from pbp_fx.modes import ModeSwitch
from pbp_fx.passes.train_eval import MODES_ATTR, lower_to_eval, merge_modes, merge_train_eval
from pbp_fx.tracing import trace

pytestmark = pytest.mark.usefixtures("seeded")


class Functional(nn.Module):
    """Mode-dependent functional calls: fx freezes `self.training` as a constant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.register_buffer("rm", torch.zeros(4))
        self.register_buffer("rv", torch.ones(4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.batch_norm(self.conv(x), self.rm, self.rv, None, None, self.training, 0.1, 1e-5)
        h = F.dropout(torch.relu(h).mean((2, 3)), 0.5, training=self.training)
        return self.fc(h)


def _switches(gm):
    return [m for m in gm.modules() if isinstance(m, ModeSwitch)]


@pytest.mark.parametrize("start_in_train", [True, False])
def test_fx_functional_dropout_and_batch_norm_follow_the_mode(start_in_train, pb):
    model, x = Functional().train(start_in_train), torch.randn(4, 2, 6, 6)
    gm = trace(model, (x,))
    assert gm.meta["pbp_modes"] == "train+eval" and len(_switches(gm)) == 2
    assert model.training == start_in_train  # the model's own mode is left alone
    pm = pbp_fx.perforate(model, (x,))
    assert pm.sites["conv"].norm is not None  # the functional batch norm joins in its eval form
    for training in (True, False):
        model.train(training)
        pm.train(training)
        torch.manual_seed(1)
        want = model(x)
        torch.manual_seed(1)
        assert pb.max_diff(pm(x), want) < 1e-6
    assert torch.allclose(pm.graph_module.rm, model.rm)  # the running mean moved alike in train mode


def test_no_mode_dependence_leaves_the_graph_as_traced():
    m = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))
    gm = trace(m, (torch.randn(5, 3),))
    assert not hasattr(gm, MODES_ATTR) and gm.meta["pbp_modes"] == "train+eval"
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1", "2"]


def test_another_path_in_eval_mode_warns_and_follows_the_traced_mode():
    class EvalOnlyScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            y = self.fc(x)
            return y if self.training else y * 2

    m = EvalOnlyScale().train()
    with pytest.warns(UserWarning, match="eval-mode graph takes another path: .*the graph follows train mode"):
        gm = trace(m, (torch.randn(3, 2),))
    assert gm.meta["pbp_modes"] == "train" and "train capture has" in gm.meta["pbp_modes_reason"]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_train_only_op_on_one_value_is_the_identity_in_eval_mode(frontend):
    """`y * 2 if self.training else y` (and a drop path's `x * mask / keep`, Hugging Face's
    `x.div(keep) * floor(keep + rand)`): the eval capture reads y where the train capture reads
    the op, so the op runs in train mode only."""
    class TrainOnlyScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            y = self.fc(x)
            if not self.training:
                return y
            keep = 1 - 0.3
            return y.div(keep) * torch.floor(keep + torch.rand_like(y[:, :1])) * 2

    m, x = TrainOnlyScale().train(), torch.randn(64, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        gm = trace(m, (x,), frontend=frontend)
    assert gm.meta["pbp_modes"] == "train+eval"
    for training in (True, False):
        m.train(training), gm.train(training)
        torch.manual_seed(0)
        want = m(x)
        torch.manual_seed(0)
        torch.testing.assert_close(gm(x), want, rtol=0, atol=0)


def _graph(build) -> fx.GraphModule:
    root = nn.Module()
    root.register_buffer("count", torch.tensor(0))
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(build(g, x))
    return fx.GraphModule(root, g)


def test_layout_only_nodes_in_one_capture_are_tolerated():
    aten = torch.ops.aten
    train = _graph(lambda g, x: g.call_function(aten.relu.default, (g.call_function(aten.contiguous.default, (x,)),)))
    evl = _graph(lambda g, x: g.call_function(aten.relu.default, (x,)))
    assert merge_train_eval(train, evl) is train
    assert merge_train_eval(evl, train) is evl  # and the other way round


def test_differing_constants_become_a_mode_switch_and_train_only_updates_run_in_train_mode():
    aten = torch.ops.aten

    def build(train):
        def f(g, x):
            if train:
                g.call_function(aten.add_.Tensor, (g.get_attr("count"), 1))
            return g.call_function(aten.dropout.default, (x, 0.5, train))
        return f

    gm = merge_train_eval(_graph(build(True)), _graph(build(False)), training=False)
    assert gm is not None and len(_switches(gm)) == 2
    x = torch.ones(1000)
    assert torch.equal(gm(x), x) and int(gm.count) == 0  # eval: no dropout, no update
    gm.train()
    y = gm(x)
    assert 0.3 < (y == 0).float().mean() < 0.7 and int(gm.count) == 1
    lower_to_eval(gm)
    assert not _switches(gm) and not hasattr(gm, MODES_ATTR)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [aten.dropout.default]
    assert torch.equal(gm(x), x) and int(gm.count) == 1


def test_other_differences_give_up():
    aten = torch.ops.aten
    train = _graph(lambda g, x: g.call_function(aten.relu.default, (x,)))
    evl = _graph(lambda g, x: g.call_function(aten.sigmoid.default, (x,)))
    assert merge_train_eval(train, evl) is None
    result = merge_modes(train, evl)
    assert result.graph_module is None and "relu" in result.reason and "sigmoid" in result.reason


class ChainedModes(nn.Module):
    """A mode-dependent op feeding another (swin_t: shifted_window_attention -> stochastic_depth)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = F.dropout(self.fc(x), 0.3, self.training)
        h = F.dropout(h, 0.2, self.training)
        return self.out(torch.relu(h))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("start_in_train", [True, False])
def test_chained_mode_dependent_ops_merge(frontend, start_in_train, pb):
    model, x = ChainedModes().train(start_in_train), torch.randn(16, 6)
    pm = pbp_fx.perforate(model, (x,), frontend=frontend)
    assert pm.graph_module.meta["pbp_modes"] == "train+eval" and len(_switches(pm.graph_module)) == 2
    for training in (True, False):
        model.train(training)
        pm.train(training)
        torch.manual_seed(3)
        want = model(x)
        torch.manual_seed(3)
        assert pb.max_diff(pm(x), want) == 0
    assert not _switches(pm.finalize())


class SharedBatchNorm(nn.Module):
    """One conv + batch norm block applied to two inputs (a siamese encoder)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Linear(12, 2)

    def forward(self, a, b):
        encode = lambda x: torch.relu(self.bn(self.conv(x))).mean((2, 3))  # noqa: E731
        return self.head(torch.cat([encode(a), encode(b)], 1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_batch_norm_called_twice_follows_the_mode(frontend, pb):
    """torch.export captures its second `num_batches_tracked` update as `add_.add_(1)`: the merge gave
    up on the first update (it has a reader), so eval mode updated the running statistics."""
    model, a, b = SharedBatchNorm(), torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pbp_fx.PBWarning)
        pm = pbp_fx.perforate(model, (a, b), frontend=frontend)
    assert pm.graph_module.meta["pbp_modes"] == "train+eval"
    for training in (True, False, True):
        model.train(training)
        pm.train(training)
        assert pb.max_diff(pm(a, b), model(a, b)) == 0
    assert int(pm.graph_module.get_submodule("bn").num_batches_tracked) == 4
    assert pb.max_diff(pm.finalize()(a, b), model.eval()(a, b)) == 0


def test_a_refused_merge_leaves_the_train_graph_untouched():
    aten = torch.ops.aten
    train = _graph(lambda g, x: g.call_function(aten.relu.default, (g.call_function(aten.dropout.default,
                                                                                    (x, 0.5, True)),)))
    before = train.code
    evl = _graph(lambda g, x: g.call_function(aten.sigmoid.default, (g.call_function(aten.dropout.default,
                                                                                     (x, 0.5, False)),)))
    assert merge_modes(train, evl).graph_module is None
    assert train.code == before and not hasattr(train, MODES_ATTR)


def test_finalize_lowers_mode_switches_to_their_eval_ops(pb):
    model, x = Functional().eval(), torch.randn(2, 2, 6, 6)
    pm = pbp_fx.perforate(model, (x,))
    pm.grow()
    pb.randomize(pm)
    pm.eval()
    fin = finalize(pm.graph_module)
    assert not _switches(fin)
    with torch.no_grad():
        assert pb.max_diff(fin(x), pm(x)) < 1e-5


def _stochastic_depth(x, p: float, training: bool):
    """torchvision.ops.stochastic_depth's "row" mode, written out: a train-only random mask."""
    if not training or p == 0.0:
        return x
    mask = torch.empty([x.shape[0], 1], dtype=x.dtype, device=x.device).bernoulli_(1 - p)
    return x * mask.div_(1 - p)


class StochasticDepth(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        b = x.shape[0]  # the mainline reads the batch size too: export shares one sym_size node
        h = x + _stochastic_depth(self.fc(x).reshape(b, 2, 3).reshape(b, 6), 0.3, self.training)
        h = h + _stochastic_depth(F.dropout(torch.relu(self.fc2(h)), 0.2, self.training), 0.3, self.training)
        return self.out(h)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("start_in_train", [True, False])
def test_train_only_masks_merge(frontend, start_in_train, pb):
    """Stochastic depth: the train capture has a mask and `x * mask` where the eval capture has x."""
    model, x = StochasticDepth().train(start_in_train), torch.randn(16, 6)
    pm = pbp_fx.perforate(model, (x,), frontend=frontend)
    assert pm.graph_module.meta["pbp_modes"] == "train+eval", pm.graph_module.meta.get("pbp_modes_reason")
    for training in (True, False, True):
        model.train(training)
        pm.train(training)
        torch.manual_seed(3)
        want = model(x)
        torch.manual_seed(3)
        got = pm(x)
        assert pb.max_diff(got, want) == 0
    pm.eval()
    fin = pm.finalize()
    assert not _switches(fin)
    assert not any(n.op == "call_function" and "bernoulli" in str(n.target) for n in fin.graph.nodes)
    assert pb.max_diff(fin(x), pm(x)) == 0


def test_a_value_free_node_reading_the_mask_runs_in_train_mode_only():
    """A check or reduction of the mask that nothing reads (torch.export's _assert_tensor_metadata
    of `(rand < p).to(dtype)`): eval mode has no mask to hand it, so it runs in train mode only."""
    aten = torch.ops.aten

    def build(g, x, train):
        if not train:
            return g.call_function(aten.relu.default, (x,))
        mask = g.call_function(aten.bernoulli.p, (g.call_function(aten.empty.memory_format, ([4, 6],)), 0.5))
        g.call_function(aten.sum.default, (mask,))
        return g.call_function(aten.relu.default, (g.call_function(aten.mul.Tensor, (x, mask)),))

    result = merge_modes(_graph(lambda g, x: build(g, x, True)), _graph(lambda g, x: build(g, x, False)),
                         training=False)
    gm = result.graph_module
    assert gm is not None and "sum_default" in dict(gm.get_submodule(MODES_ATTR).named_children())
    x = torch.randn(4, 6)
    torch.testing.assert_close(gm(x), torch.relu(x), rtol=0, atol=0)
    assert gm.train()(x).shape == (4, 6)




class TrimmedByLength(nn.Module):
    """A causal conv trimmed to the input's length (a slice whose bound is a node) before functional dropout."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3, padding=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv(x.unsqueeze(1))[..., : x.shape[-1]]
        return self.fc(F.dropout(torch.relu(h), 0.5, self.training).mean(-1))


def test_a_slice_bounded_by_a_node_matches_in_both_captures():
    """The slice's node inside a slice object counted as a mismatch: the merge gave up ("train capture has
    getitem_1 where the eval capture has getitem_1"), and the graph kept dropout on in eval mode."""
    model, x = TrimmedByLength(), torch.randn(3, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = trace(model, (x,), frontend="fx")
    assert gm.meta["pbp_modes"] == "train+eval" and len(_switches(gm)) == 1
    pm = pbp_fx.perforate(model, (x,), frontend="fx").eval()
    with torch.no_grad():
        assert torch.equal(pm(x), model.eval()(x)) and torch.equal(pm.finalize()(x), model(x))



class PicksByMode(nn.Module):
    """The same op in both modes on other module attributes: the refusal names what it is applied to."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("train_idx", torch.tensor([0, 1]))
        self.register_buffer("eval_idx", torch.tensor([2, 3]))

    def forward(self, x):
        return self.fc(x)[:, self.train_idx if self.training else self.eval_idx]


def test_a_refusal_at_ops_of_the_same_name_says_what_each_is_applied_to():
    """It read "the train capture has getitem (call_function getitem) where the eval capture has getitem
    (call_function getitem)": nothing that told them apart."""
    with pytest.warns(UserWarning, match=r"the train capture has getitem \(call_function getitem\) of \(fc, "
                                         r"\(slice\(None, None, None\), train_idx\)\) where the eval capture has getitem "
                                         r"\(call_function getitem\) of \(fc, \(slice\(None, None, None\), eval_idx\)\)"):
        trace(PicksByMode(), (torch.randn(3, 4),), frontend="fx")



def test_merging_an_exported_model_with_dropout_prints_no_torch_pytree_warning():
    """merge_modes copied the exported graph's in/out spec, and torch's pytree printed 'isinstance(treespec,
    LeafSpec) is deprecated' (a FutureWarning, shown to users) at every export capture of a model with dropout."""
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.3), nn.Linear(8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        gm = trace(model, (torch.randn(4, 6),), frontend="export")
    assert gm.meta["pbp_modes"] == "train+eval"


def test_a_pickle_of_the_modes_as_they_were_named_before_they_moved_loads():
    """ModeSwitch and its slots moved to pbp_fx.modes: a whole model pickled before named
    pbp_fx.passes.train_eval._Slot, and did not load (the diff review)."""
    import pickle

    from pbp_fx.modes import Slot

    switch = ModeSwitch("call_function", torch.relu, ((Slot(0),), {}), None)
    old = pickle.dumps(switch, protocol=2).replace(b"cpbp_fx.modes\nSlot\n", b"cpbp_fx.passes.train_eval\n_Slot\n")
    old = old.replace(b"cpbp_fx.modes\nModeSwitch\n", b"cpbp_fx.passes.train_eval\nModeSwitch\n")
    assert b"passes.train_eval\n_Slot" in old
    loaded = pickle.loads(old)
    assert loaded.forms[True][0][0] == Slot(0) and loaded(torch.tensor([-1.0, 2.0])).tolist() == [0.0, 2.0]
