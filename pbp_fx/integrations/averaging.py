"""Averaged copies (EMA, SWA) of a perforated model across restructures.

An averaged copy (`torch.optim.swa_utils.AveragedModel`, a timm `ModelEmaV3`-style EMA: any
object holding the copied model as `.module`) is a deep copy of the model's structure at the
time it was made. A restructure (dendrite phase started, dendrites installed, best state
restored) changes that structure, and averaging over mismatched parameter lists is silently
wrong (`zip` pairs the wrong tensors, or stops early). So:

    ema = pbp_fx.integrations.averaging.track(AveragedModel(pm, ...), pm)
    ...
    if ctl.step(score) == "restructured":
        pbp_fx.integrations.averaging.follow(ema, pm)

`follow` rebuilds the copy on the model's new structure (resizing it): every entry with the
same name and shape keeps its average, every new or reshaped entry (a new dendrite, V, U,
candidates) starts from the live model's value; `reset=True` restarts the average from the
live model. `track` makes a forward through a stale copy raise StaleAverageError instead.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from ..errors import PBError
from ..perforated import PerforatedModel
from ..tracing import copy_module

__all__ = ["StaleAverageError", "follow", "track", "check", "structure"]


class StaleAverageError(PBError):
    """An averaged copy still has the structure the model had before a restructure."""


def structure(model: nn.Module) -> dict[str, tuple]:
    """Name -> shape of every parameter and buffer: what must match for averaging to pair tensors right."""
    return {n: tuple(t.shape) for n, t in list(model.named_parameters()) + list(model.named_buffers())}


def _copied(averaged) -> nn.Module:
    module = getattr(averaged, "module", None)
    if not isinstance(module, nn.Module):
        raise TypeError(f"{type(averaged).__name__} holds no copied model as .module: "
                        "pass an AveragedModel or an EMA object with a .module attribute")
    return module


def check(averaged, pm: PerforatedModel) -> None:
    """Raise StaleAverageError naming the first difference when the copy's structure is not the model's."""
    have, want = structure(_copied(averaged)), structure(pm)
    if have == want:
        return
    diff = next((n for n in want if have.get(n) != want[n]), None) or next(n for n in have if n not in want)
    raise StaleAverageError(
        f"the averaged copy is stale: {diff!r} is {have.get(diff, 'missing')} there but {want.get(diff, 'missing')} "
        "in the model (it was restructured): call pbp_fx.integrations.averaging.follow(averaged, model) "
        "after every restructure")


def track(averaged, pm: PerforatedModel):
    """Make every forward through `averaged` check that its structure is still the model's; returns it."""
    live = weakref.ref(pm)

    def guard(_module, _args):
        model = live()
        if model is not None:
            check(averaged, model)

    averaged.register_forward_pre_hook(guard)
    return averaged


@torch.no_grad()
def follow(averaged, pm: PerforatedModel, reset: bool = False):
    """Rebuild the averaged copy on the model's current structure (see the module docstring); returns it."""
    old = _copied(averaged)
    kept = {} if reset else {**dict(old.named_parameters()), **dict(old.named_buffers())}
    new = copy_module(pm)
    for name, t in list(new.named_parameters()) + list(new.named_buffers()):
        avg = kept.get(name)
        if avg is not None and avg.shape == t.shape:
            t.copy_(avg)
    new.requires_grad_(False)
    new.train(old.training)
    if new.phase == "dendrite":  # (the live model's phase-start buffers would overwrite the averaged ones)
        new.load_phase_buffers({})
    averaged.module = new
    if reset and isinstance(getattr(averaged, "n_averaged", None), torch.Tensor):
        averaged.n_averaged.zero_()  # AveragedModel: the next update copies the live weights
    return averaged
