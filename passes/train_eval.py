"""train_eval: one graph that follows the module's train/eval mode, from two captures.

A captured graph freezes the mode it was captured in: dropout's `train` flag, batch norm's
`training` flag and scaled-dot-product attention's `dropout_p` become constants, and the
train-mode bookkeeping (`num_batches_tracked += 1`) is a node of its own. Functional code
traced by fx (`F.dropout(x, p, training=self.training)`) freezes the same way.

`merge_train_eval(train_gm, eval_gm)` walks a train-mode and an eval-mode capture of one
model side by side. Where a node's constant arguments differ between the two, the node
becomes `call_module pbp_modes.<name>`, a `ModeSwitch` that calls the op with the train
arguments when `.training` is set and with the eval arguments otherwise; a state update
that only the train capture performs runs only in train mode. `model.train()` /
`model.eval()` then switch the graph like the original model. Layout-only nodes that one
capture has and the other has not (`contiguous`, `clone`: strides differ with dropout) and
value-free checks are tolerated. Train-only noise (stochastic depth / drop path: a mask
computed from shapes and random ops, `x * mask`) is tolerated too: the nodes that compute the
mask from nothing but shapes and constants run in train mode only, and the node that combines it
with the value (`gate`) passes the value through in eval mode, when the eval capture reads that
value where the train capture reads the gate. Any other difference means the forward takes
another path in the other mode, and the merge gives up (with the reason) rather than guess.
The edit is made on a copy of the graph: a refused merge leaves both captures untouched.

Requires: two GraphModules traced from the same model with the same inputs, one in train
and one in eval mode.
Ensures: the train graph, edited in place, with one ModeSwitch per mode-dependent node under
`pbp_modes` (set to the mode `training`); its eval-mode behaviour is the eval capture's.
"""
from __future__ import annotations

import copy
import operator
from typing import NamedTuple, Optional

import torch
from torch import fx, nn
from torch.fx.node import map_arg
from torch.fx.operator_schemas import normalize_function

from pbp_fx.modes import ModeSwitch, Slot
from pbp_fx.tracing import spec_copy_warnings_ignored

from .patterns import target_name
from .submodules import delete_unused_submodules

__all__ = ["merge_train_eval", "merge_modes", "MergeResult", "lower_to_eval", "MODES_ATTR"]

MODES_ATTR = "pbp_modes"
_Slot = Slot  # (whole-model pickles written before ModeSwitch moved to pbp_fx.modes name it here)

_aten = torch.ops.aten
# Ops that return their input's value (possibly with another memory layout).
_IDENTITY_FUNCTIONS = {_aten.contiguous.default, _aten.clone.default, _aten.alias.default}
_IDENTITY_METHODS = {"contiguous", "clone"}


# -- comparing two captures ---------------------------------------------------------------------

_SAME, _CONST, _MISMATCH = 0, 1, 2


def _normalized(node: fx.Node) -> tuple:
    """args/kwargs with defaults filled in (dropout_p=0.0 written or not), when the op has a schema."""
    if node.op == "call_function":
        try:
            pair = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
        except Exception:  # noqa: BLE001 - no usable signature: compare as written
            pair = None
        if pair is not None:
            return (), dict(pair.kwargs)
    return node.args, dict(node.kwargs)


def _is_identity(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _IDENTITY_FUNCTIONS:
        return bool(node.args) and isinstance(node.args[0], fx.Node)
    if node.op == "call_method" and node.target in _IDENTITY_METHODS:
        return bool(node.args) and isinstance(node.args[0], fx.Node)
    return False


def _mutates(node: fx.Node) -> bool:
    if node.op == "call_method":
        return str(node.target).endswith("_")
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _attribute_under(node: fx.Node) -> Optional[str]:
    """The module attribute an op's first input comes from (following first inputs back), if any."""
    seen = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    while seen is not None and seen.op != "get_attr":
        seen = seen.args[0] if seen.args and isinstance(seen.args[0], fx.Node) else None
    return None if seen is None else str(seen.target)


def _feeds_only_updates(node: fx.Node) -> bool:
    """Whether every reader of `node` updates it in place and feeds nothing else, transitively.

    A batch norm called twice captures `num_batches_tracked.add_(1)` then `add_.add_(1)`: the
    first update's one reader is the second update, so both are train-only bookkeeping."""
    return all(_mutates(u) and u.args and u.args[0] is node and _feeds_only_updates(u) for u in node.users)


# Ops that read only the shape of their tensor input: a mask sized like x is not computed from x.
_SIZE_FUNCTIONS = {_aten.sym_size.int, _aten.size.default, getattr}
_SIZE_METHODS = {"size", "dim"}


def _reads_shape_only(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in ("shape", "ndim", "dtype", "device")
    return (node.op == "call_function" and node.target in _SIZE_FUNCTIONS
            or node.op == "call_method" and node.target in _SIZE_METHODS)


_SHAPE_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
                     operator.neg, operator.getitem}


def _is_shape(node: fx.Node) -> bool:
    """A size (or sizes) of some tensor, or arithmetic on sizes: reading it reads no tensor data."""
    if _reads_shape_only(node):
        return True
    return (node.op == "call_function" and node.target in _SHAPE_ARITHMETIC
            and all(_is_shape(n) for n in node.all_input_nodes))


def _is_noise(node: fx.Node, noise: set) -> bool:
    """A train-only value computed from shapes, constants and other noise (a random mask). The
    shapes may be nodes both captures share (export reads a batch size once for the whole graph)."""
    if node.op not in ("call_function", "call_method") or not node.users:
        return False
    if _reads_shape_only(node):
        return True
    if _creates(node):  # (`x.new_empty(shape)` reads x's dtype and device only)
        return True
    inputs = node.all_input_nodes
    return all(n in noise or _is_shape(n) for n in inputs) and any(n in noise for n in inputs)


# Factories that read only the metadata (shape, dtype, device) of their tensor input.
_LIKE_FUNCTIONS = {_aten.new_empty.default, _aten.new_zeros.default, _aten.new_ones.default, _aten.new_full.default,
                   _aten.empty_like.default, _aten.zeros_like.default, _aten.ones_like.default,
                   _aten.full_like.default, _aten.rand_like.default, _aten.randn_like.default,
                   torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like, torch.rand_like,
                   torch.randn_like}
_LIKE_METHODS = {"new_empty", "new_zeros", "new_ones", "new_full"}


def _creates(node: fx.Node) -> bool:
    """A tensor factory (empty, rand, bernoulli on a new tensor, `x.new_empty(...)`...): no tensor
    input, or one whose metadata alone it reads."""
    if node.target in _LIKE_FUNCTIONS or node.op == "call_method" and node.target in _LIKE_METHODS:
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return not any(isinstance(a.type, torch.TensorType) for a in schema.arguments)
    return node.target in (torch.empty, torch.rand, torch.ones, torch.zeros, torch.full)


def _gated(node: fx.Node, noise: set) -> Optional[fx.Node]:
    """The value a train-only gate combines with noise (`x * mask`), or None for any other node."""
    if node.op not in ("call_function", "call_method") or _mutates(node):
        return None
    inputs = node.all_input_nodes
    values = [n for n in inputs if n not in noise]
    if len(values) == 1 and len(inputs) > 1:
        return values[0]
    return None


def _of_one_value(node: fx.Node, noise: set) -> Optional[fx.Node]:
    """The one tensor a train-only op reads besides constants (`x / keep` after or before a
    drop-path gate, `x.div(keep)` in Hugging Face's), or None. Where the eval capture reads that
    tensor in its place, the op is the identity in eval mode; the walk checks that it does."""
    if node.op not in ("call_function", "call_method") or _mutates(node) or not node.users:
        return None
    inputs = node.all_input_nodes
    if len(inputs) == 1 and inputs[0] not in noise and not _is_shape(inputs[0]):
        return inputs[0]
    return None


class _Walk:
    def __init__(self, train_gm: fx.GraphModule, eval_gm: fx.GraphModule):
        self.gms = (train_gm, eval_gm)
        self.e2t: dict[fx.Node, fx.Node] = {}  # eval node -> train node with the same value
        self.t_alias: dict[fx.Node, fx.Node] = {}  # train-only identity node -> its input
        self.e_alias: dict[fx.Node, fx.Node] = {}
        # attributes an in-place op of either capture updates (through any chain of ops on them)
        self.updated = {_attribute_under(n) for gm in self.gms for n in gm.graph.nodes if _mutates(n)} - {None}

    def canon_t(self, n: fx.Node) -> fx.Node:
        while n in self.t_alias:
            n = self.t_alias[n]
        return n

    def canon_e(self, n: fx.Node) -> fx.Node:
        while n in self.e_alias:
            n = self.e_alias[n]
        return n

    def train_of(self, e: fx.Node) -> Optional[fx.Node]:
        return self.e2t.get(self.canon_e(e))

    def compare(self, a, b) -> int:
        """_SAME, _CONST (only non-node constants differ) or _MISMATCH."""
        if isinstance(a, fx.Node) or isinstance(b, fx.Node):
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                return _MISMATCH
            if a.op == b.op == "get_attr" and a.target == b.target and a.target not in self.updated:
                return _SAME  # the same attribute, read at another place (one no op of either capture updates)
            return _SAME if self.train_of(b) is self.canon_t(a) and self.train_of(b) is not None else _MISMATCH
        if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
            if len(a) != len(b):
                return _CONST if not (_has_node(a) or _has_node(b)) else _MISMATCH
            return max((self.compare(x, y) for x, y in zip(a, b)), default=_SAME)
        if isinstance(a, slice) and isinstance(b, slice):  # (x[..., :n] with n a node: a slice holds nodes too)
            return self.compare((a.start, a.stop, a.step), (b.start, b.stop, b.step))
        if isinstance(a, dict) and isinstance(b, dict):
            if set(a) != set(b):
                return _CONST if not (_has_node(a) or _has_node(b)) else _MISMATCH
            return max((self.compare(a[k], b[k]) for k in a), default=_SAME)
        if _has_node(a) or _has_node(b):
            return _MISMATCH
        try:
            same = a is b or type(a) is type(b) and bool(a == b)
        except Exception:  # noqa: BLE001 - values without a plain equality
            same = False
        return _SAME if same else _CONST

    def same_constant(self, t: fx.Node, e: fx.Node) -> bool:
        """Two get_attr of equal tensor constants (fx stores each trace's constants anew)."""
        try:
            a, b = (_attr(gm, n.target) for gm, n in zip(self.gms, (t, e)))
        except AttributeError:
            return False
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and not isinstance(a, nn.Parameter)
                and a.dtype == b.dtype and a.shape == b.shape and a.device == b.device and torch.equal(a, b))

    def nodes_match(self, t: fx.Node, e: fx.Node) -> int:
        if t.op == e.op == "get_attr" and t.target != e.target:
            return _SAME if self.same_constant(t, e) else _MISMATCH
        if t.op != e.op or t.target != e.target:
            return _MISMATCH
        if t.op in ("placeholder", "get_attr"):
            return _SAME
        ta, tk = _normalized(t)
        ea, ek = _normalized(e)
        r = max(self.compare(ta, ea), self.compare(tk, ek))
        if r == _CONST and t.op not in ("call_function", "call_method"):
            return _MISMATCH  # a module call or the output: modes are the module's business
        return r


def _plain(x):
    """fx's immutable containers as plain tuples / lists / dicts (for copying and pickling)."""
    if isinstance(x, tuple):
        return tuple(_plain(v) for v in x)
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _attr(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _has_node(x) -> bool:
    found = []
    map_arg(x, lambda n: found.append(n))
    return bool(found)


class MergeResult(NamedTuple):
    """The merged graph (None: not merged) and, when not merged, why and where: the train and
    eval captures' nodes at which they part (either may be None)."""

    graph_module: Optional[fx.GraphModule]
    reason: str = ""
    parted_at: tuple = ()


def _describe(n: Optional[fx.Node]) -> str:
    if n is None:
        return "nothing"
    return f"{n.name} ({n.op} {target_name(n.target)})"


def _inputs_of(n: fx.Node) -> str:
    """A node's arguments as a short text: nodes by what they are (a module attribute by its path)."""
    def said(a) -> str:
        if isinstance(a, fx.Node):
            return str(a.target) if a.op in ("get_attr", "placeholder") else a.name
        if isinstance(a, (tuple, list)):
            return "(" + ", ".join(said(x) for x in a) + ")"
        return repr(a) if len(repr(a)) <= 40 else type(a).__name__
    return said(tuple(n.args))


def merge_modes(train_gm: fx.GraphModule, eval_gm: fx.GraphModule, training: bool = True) -> MergeResult:
    """Make `train_gm` follow the mode (see the module docstring), or say why it cannot.

    The edit is made on a copy of the train graph and installed only when that copy is a valid
    graph, so a refused merge leaves `train_gm` as it was."""
    tn, en = list(train_gm.graph.nodes), list(eval_gm.graph.nodes)
    w = _Walk(train_gm, eval_gm)
    switched: dict[fx.Node, fx.Node] = {}  # train node -> its eval twin, constants differing
    train_only: list[fx.Node] = []
    noise: set[fx.Node] = set()  # train-only values (a stochastic-depth mask)
    gates: dict[fx.Node, fx.Node] = {}  # train-only node combining noise with a value -> that value
    parted: Optional[tuple] = None  # the first train-only op taken as the identity in eval mode, and its eval twin
    i = j = 0
    while i < len(tn) or j < len(en):
        t = tn[i] if i < len(tn) else None
        e = en[j] if j < len(en) else None
        if t is not None and e is not None:
            r = w.nodes_match(t, e)
            if r != _MISMATCH:
                w.e2t[e] = t
                if r == _CONST:
                    switched[t] = e
                i, j = i + 1, j + 1
                continue
        if t is not None and _is_noise(t, noise):
            noise.add(t)
            i += 1
            continue
        if t is not None and noise and _gated(t, noise) is not None:
            gates[t] = w.t_alias[t] = _gated(t, noise)  # eval mode: the value itself
            i += 1
            continue
        if t is not None and _is_identity(t):
            w.t_alias[t] = t.args[0]
            i += 1
            continue
        if t is not None and t.op == "get_attr":
            i += 1  # read by train-only nodes (else a node using it does not match)
            continue
        if t is not None and t.op in ("call_function", "call_method") and (
                not t.users or _mutates(t) and _feeds_only_updates(t)):
            if _mutates(t) or any(n in noise for n in t.all_input_nodes):
                train_only.append(t)  # e.g. num_batches_tracked.add_(1), or a check of a mask eval mode lacks
            i += 1  # otherwise a check without a value: harmless in eval mode too
            continue
        if e is not None and _is_identity(e):
            w.e_alias[e] = e.args[0]
            j += 1
            continue
        if e is not None and not e.users and e.op in ("call_function", "call_method") and not _mutates(e):
            j += 1
            continue
        if e is not None and e.op == "get_attr":
            j += 1
            continue
        if t is not None and (value := _of_one_value(t, noise)) is not None:
            gates[t] = w.t_alias[t] = value  # eval mode: the value it reads
            parted = parted or (t, e)  # (where the captures first differ, for a refusal further on)
            i += 1
            continue
        # The message names where the captures first differ; parted_at, where the walk stopped.
        first_t, first_e = parted or (t, e)
        said_t, said_e = _describe(first_t), _describe(first_e)
        if said_t == said_e:  # (the same op by name: what it is applied to differs)
            said_t, said_e = f"{said_t} of {_inputs_of(first_t)}", f"{said_e} of {_inputs_of(first_e)}"
        return MergeResult(None, f"the train capture has {said_t} where the eval capture has {said_e}", (t, e))
    for n in noise:  # the mask must feed nothing but masks, gates and checks: eval mode computes none of it
        stray = [u for u in n.users if u not in noise and u not in gates and (u.users or _mutates(u))]
        if stray:
            return MergeResult(None, f"the train capture's {_describe(n)} (train-only) feeds {_describe(stray[0])}",
                               (n, None))
    if not switched and not train_only and not gates:
        return MergeResult(train_gm)
    return _install(train_gm, w, switched, train_only + sorted(noise, key=tn.index), training, gates)


def _install(train_gm: fx.GraphModule, w: _Walk, switched: dict, train_only: list, training: bool,
             gates: dict) -> MergeResult:
    """Replace the switched, train-only and gate nodes by ModeSwitch calls, on a copy of the graph."""
    old = train_gm.graph
    graph = fx.Graph(owning_module=train_gm, tracer_cls=old._tracer_cls, tracer_extras=old._tracer_extras)
    with spec_copy_warnings_ignored():
        graph._codegen = copy.deepcopy(old._codegen)
    env: dict[fx.Node, fx.Node] = {}
    out, out_node = graph.graph_copy(old, env, return_output_node=True)
    graph.output(out, type_expr=getattr(out_node, "type", None))
    # A switched node feeding another (two chained dropouts): the second one's eval form must
    # read the first one's ModeSwitch call, not the node it replaced.
    current: dict[fx.Node, fx.Node] = {}

    def now(n: fx.Node) -> fx.Node:
        n = env[n]
        return current.get(n, n)

    added_modes = not hasattr(train_gm, MODES_ATTR)
    if added_modes:
        train_gm.add_submodule(MODES_ATTR, nn.ModuleDict())
    modes: nn.ModuleDict = getattr(train_gm, MODES_ATTR)
    new_keys: list[str] = []
    order = {n: i for i, n in enumerate(old.nodes)}
    for t_old in sorted(list(switched) + train_only + list(gates), key=order.__getitem__):  # graph order
        t = env[t_old]
        e = switched.get(t_old)
        inputs: list[fx.Node] = []

        def slot(n: fx.Node) -> Slot:
            if n not in inputs:
                inputs.append(n)
            return Slot(inputs.index(n))

        train_form = (_plain(map_arg(t.args, slot)), _plain(map_arg(dict(t.kwargs), slot)))
        eval_form = None
        if t_old in gates:
            eval_form = slot(now(gates[t_old]))
        elif e is not None:
            to_train = lambda n: slot(now(w.canon_t(w.train_of(n))))  # noqa: E731
            eval_form = (_plain(map_arg(e.args, to_train)), _plain(map_arg(dict(e.kwargs), to_train)))
        key = t.name
        while key in modes or hasattr(modes, key):  # (a node named `to` or `train`: a ModuleDict attribute)
            key += "_"
        modes[key] = ModeSwitch(t.op, t.target, train_form, eval_form).train(training)
        new_keys.append(key)
        with graph.inserting_before(t):
            new = graph.call_module(f"{MODES_ATTR}.{key}", tuple(inputs))
        new.meta.update(t.meta)
        t.replace_all_uses_with(new)
        graph.erase_node(t)
        current[t] = new
    try:
        graph.lint()
    except Exception as exc:  # noqa: BLE001 - any invalid graph: refuse, keep the train graph as it was
        for key in new_keys:
            del modes[key]
        if added_modes:
            delattr(train_gm, MODES_ATTR)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return MergeResult(None, f"the merged graph is not valid ({first})")
    train_gm.graph = graph
    train_gm.recompile()
    return MergeResult(train_gm)


def merge_train_eval(train_gm: fx.GraphModule, eval_gm: fx.GraphModule,
                     training: bool = True) -> Optional[fx.GraphModule]:
    """`merge_modes` without the reason: the merged graph, or None when the captures differ."""
    return merge_modes(train_gm, eval_gm, training).graph_module


def lower_to_eval(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace every ModeSwitch call by its eval-mode op (in place); train-only updates go."""
    graph = gm.graph
    changed = False
    for node in reversed(list(graph.nodes)):  # users first: a train-only mask goes after its gate
        if node.op != "call_module":
            continue
        try:
            m = gm.get_submodule(node.target)
        except AttributeError:
            continue
        if not isinstance(m, ModeSwitch):
            continue
        form = m.bound_form(node, training=False)
        changed = True
        if form is None:
            if not node.users:
                graph.erase_node(node)
            continue
        if isinstance(form, fx.Node):  # passthrough
            node.replace_all_uses_with(form)
            graph.erase_node(node)
            continue
        with graph.inserting_before(node):
            new = graph.create_node(m.kind, m.target, tuple(form[0]), dict(form[1]))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    if changed:
        graph.lint()
        delete_unused_submodules(gm)
        gm.recompile()
    return gm
