"""What the framework callbacks share: finding the perforated model and the torch optimizer and
scheduler a framework holds (PhaseController adopts them)."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import TrainingError
from ..perforated import PerforatedModel

__all__ = ["find_perforated", "unwrap_optimizer", "unwrap_scheduler"]


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
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TrainingError(f"the trainer's optimizer is a {type(optimizer).__name__}, not a torch.optim.Optimizer: "
                            "PB needs one it can give the new parameters to at each restructure")
    return optimizer


def unwrap_scheduler(scheduler):
    """The torch LR scheduler itself (accelerate's AcceleratedScheduler holds it as `.scheduler`), or None."""
    while scheduler is not None and hasattr(scheduler, "scheduler") and not hasattr(scheduler, "base_lrs"):
        scheduler = scheduler.scheduler
    return scheduler
