"""What the framework callbacks share: finding the perforated model and the torch optimizer and
scheduler a framework holds (PhaseController adopts them), and giving the model the structure of
a checkpoint the framework loads on resume."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..checkpoint import load_error_detail, restore_structure
from ..config import PBConfig
from ..controller import inner_optimizer
from ..errors import CheckpointError, TrainingError
from ..perforated import PerforatedModel
from ..site import Site

__all__ = ["find_perforated", "unwrap_optimizer", "unwrap_scheduler", "StructureOnLoad"]


def find_perforated(model: nn.Module, who: str) -> PerforatedModel:
    """The PerforatedModel inside `model` (itself, a DDP/compile wrapper, or a LightningModule attribute)."""
    found = [m for m in model.modules() if isinstance(m, PerforatedModel)] if isinstance(model, nn.Module) else []
    if len(found) != 1:
        what = "no perforated model" if not found else f"{len(found)} perforated models"
        raise TrainingError(f"{who} found {what} in {type(model).__name__}: perforate exactly one model with "
                            "model = pbp_fx.perforate(model, example_inputs) before training")
    return found[0]


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer itself (accelerate's AcceleratedOptimizer and the like hold it as `.optimizer`)."""
    optimizer = inner_optimizer(optimizer)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TrainingError(f"the trainer's optimizer is a {type(optimizer).__name__}, not a torch.optim.Optimizer: "
                            "PB needs one it can give the new parameters to at each restructure")
    return optimizer


def unwrap_scheduler(scheduler):
    """The torch LR scheduler itself (accelerate's AcceleratedScheduler holds it as `.scheduler`), or None."""
    while scheduler is not None and hasattr(scheduler, "scheduler") and not hasattr(scheduler, "base_lrs"):
        scheduler = scheduler.scheduler
    return scheduler


class StructureOnLoad:
    """A load_state_dict pre-hook on a module holding one PerforatedModel (or on the model itself)
    for a framework's own resume, which loads the model's state dict before any callback sees the
    checkpoint: a state dict saved in the other phase first gets its structure (dendrites resize by
    themselves; a candidate pool needs the dendrite phase started, with `config(pm)`'s statistics
    settings; freeze_outside: root's trainable parameters outside pm are frozen too, as the phase
    froze them). The model is looked up when the hook fires, so a LightningModule may build it after
    the hook is set (`configure_model`, `setup`). `remove()` it once the checkpoint is loaded: later
    loads are PB's own."""

    def __init__(self, root: nn.Module, config: Callable[[PerforatedModel], PBConfig],
                 freeze_outside: bool = False):
        self.config, self.freeze_outside = config, freeze_outside
        self._restoring = False  # restore_structure loads a state dict itself
        self._handle = root.register_load_state_dict_pre_hook(self)

    def __call__(self, root, state_dict, prefix, *args) -> None:
        if self._restoring:
            return
        found = [(path, m) for path, m in root.named_modules() if isinstance(m, PerforatedModel)]
        if len(found) != 1:
            return  # none or several: the framework's callback refuses that model in its own words
        path, pm = found[0]
        prefix = prefix + (f"{path}." if path else "")
        state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        pools = {k.split(".candidates.")[0]: v.shape[0] for k, v in state.items()
                 if k.endswith(".candidates.copies.weight")}
        if bool(pools) == (pm.phase == "dendrite") and not (pools and _other_structure(pm, state, pools)):
            return  # (a pool over other dendrites, or of another size, than the model's: restored too)
        self._restoring = True
        config = self.config(pm)
        try:
            # A state dict does not show the pools' position stride: the run's config says it.
            sites = [{"pool": p, "pool_stride": config.candidate_stride} for p in pools.values()]
            restore_structure(pm, state, {"phase": "dendrite" if pools else "neuron", "sites": sites},
                              config.to_dict())
        except RuntimeError as exc:  # load_state_dict's many-line report of another model's tensors
            raise CheckpointError(f"the checkpoint does not fit this model: {load_error_detail(exc)}") from exc
        finally:
            self._restoring = False
        if pools and self.freeze_outside:
            # The run's dendrite phase froze what it trains outside pm (PhaseController(root=)): a
            # framework that builds its optimizer over the trainable parameters before the callbacks
            # see the checkpoint (the HF Trainer) then builds the phase's groups; the controller's
            # state thaws them.
            own = {id(p) for p in pm.parameters()}
            for p in root.parameters():
                if id(p) not in own and p.requires_grad:
                    p.requires_grad_(False)

    def remove(self) -> None:
        self._handle.remove()


def _other_structure(pm: PerforatedModel, state: dict, pools: dict) -> bool:
    """Whether the state holds another number of dendrites than pm at some site, or a candidate pool of
    another size (`pools`: the state's, by site path)."""
    for path, site in pm.named_modules():
        if isinstance(site, Site):
            saved = state.get(f"{path}.out_weight")
            if (0 if saved is None else saved.shape[0]) != site.num_dendrites:
                return True
            if site.candidates is not None and pools.get(path) != site.candidates.copies.weight.shape[0]:
                return True
    return False


def finished_run(note: str, call: str) -> str:
    """The warning of a training call (`call`: what it does now) on a PBCallback whose PB run is
    complete (`note`: how it ended), a budget that ran out included."""
    return (f"PBCallback: this PB run is complete ({note}), so {call} and keeps the best model; for more "
            "training start a new run (a new PBCallback), or resume from a checkpoint taken before the end")


def refuse_another_metric(saved: str, following: str, fix: str) -> None:
    """TrainingError where a resumed run's state was kept on the metric `saved` and the callback now follows
    another: its best score and patience, counted in `saved`, are not comparable (fix: how to follow `saved`)."""
    if saved != following:
        raise TrainingError(f"the checkpoint's PB run followed {saved!r}, but this PBCallback follows {following!r}: "
                            f"its best score and patience are counted in {saved!r}; {fix} to resume it, or start anew")


def refused_restart(resume: str, same_optimizer: bool) -> str:
    """The one-line refusal of a training call that would continue a PBCallback's unfinished run: with the new
    optimizer the framework built (the run's state holds the old one), or with the old one, whose rates
    that run had already scaled for its phase (a second call on the same trainer)."""
    why = ("goes on with that run's optimizer, whose rates it had already scaled for the phase it stopped in" if
           same_optimizer else "built a new optimizer, which that run's state does not hold")
    return (f"PBCallback: its PB run stopped inside an earlier training call (an exception?), and this call {why}: "
            f"resume it with {resume}, or start again with a new PBCallback on a newly built model")
