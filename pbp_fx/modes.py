"""ModeSwitch: an op of a captured graph whose arguments follow the module's train/eval mode.

The train_eval pass (`pbp_fx.passes.merge_train_eval`) puts one in the graph per node whose
constant arguments differ between a train-mode and an eval-mode capture; this module holds the
runtime module the graph calls.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import fx, nn
from torch.fx.node import map_aggregate

__all__ = ["ModeSwitch", "Slot"]


class Slot:
    """Position of a node input inside a ModeSwitch template."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __repr__(self) -> str:
        return f"${self.index}"

    def __eq__(self, other) -> bool:
        return isinstance(other, Slot) and other.index == self.index

    def __hash__(self) -> int:
        return hash(("Slot", self.index))


class ModeSwitch(nn.Module):
    """An op whose arguments depend on the train/eval mode (dropout, batch norm, SDPA).

    Called with the node's tensor inputs; `forms[True]` / `forms[False]` are the
    (args, kwargs) templates of the train and eval captures, inputs marked by slots.
    An eval form of None: the op runs in train mode only (a state update such as
    `num_batches_tracked.add_(1)`, a stochastic-depth mask), and returns None in eval mode.
    An eval form that is one slot: eval mode passes that input through (`x * mask` -> x).
    """

    def __init__(self, kind: str, target: Any, train_form: tuple, eval_form: Optional[tuple]):
        super().__init__()
        if kind not in ("call_function", "call_method"):
            raise ValueError(f"ModeSwitch wraps call_function / call_method nodes, not {kind}")
        self.kind, self.target = kind, target
        self.forms = {True: train_form, False: eval_form}

    def forward(self, *inputs):
        form = self.forms[self.training]
        if form is None:
            return None
        if isinstance(form, Slot):
            return inputs[form.index]
        fill = lambda a: inputs[a.index] if isinstance(a, Slot) else a  # noqa: E731
        args, kwargs = map_aggregate(form[0], fill), map_aggregate(form[1], fill)
        if self.kind == "call_method":
            return getattr(args[0], self.target)(*args[1:], **kwargs)
        return self.target(*args, **kwargs)

    def bound_form(self, node: fx.Node, training: bool) -> Optional[tuple]:
        """(args, kwargs) of one mode with the graph nodes of `node` (this module's call) filled in;
        for a passthrough form, the node passed through."""
        form = self.forms[training]
        if form is None:
            return None
        if isinstance(form, Slot):
            return node.args[form.index]
        fill = lambda a: node.args[a.index] if isinstance(a, Slot) else a  # noqa: E731
        return map_aggregate(form[0], fill), map_aggregate(form[1], fill)

    def extra_repr(self) -> str:
        return f"{getattr(self.target, '__name__', self.target)}, train={self.forms[True]}, eval={self.forms[False]}"
