"""A small pass manager: run GraphModule -> GraphModule passes, checking their contracts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from torch import fx

__all__ = ["Pass", "PassManager", "ContractError"]


class ContractError(RuntimeError):
    """A pass left its graph outside what it Ensures: a bug in pbp-fx (or in a user's pass), not in the model."""


@dataclass
class Pass:
    """A pass with optional pre/post-condition checks (`gm -> None`, raising on violation)."""

    fn: Callable[[fx.GraphModule], fx.GraphModule]
    requires: Optional[Callable[[fx.GraphModule], None]] = None
    ensures: Optional[Callable[[fx.GraphModule], None]] = None

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        if self.requires is not None:
            self.requires(gm)
        out = self.fn(gm)
        if not isinstance(out, fx.GraphModule):
            raise TypeError(f"pass {getattr(self.fn, '__name__', self.fn)!r} returned {type(out).__name__}, "
                            "not a GraphModule")
        out.graph.lint()
        if self.ensures is not None:
            self.ensures(out)
        return out


class PassManager:
    """Runs passes in order; each output graph is linted before the next pass sees it."""

    def __init__(self, passes: Sequence[Callable[[fx.GraphModule], fx.GraphModule]]):
        self.passes = [p if isinstance(p, Pass) else Pass(p) for p in passes]

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        for p in self.passes:
            gm = p(gm)
        return gm
