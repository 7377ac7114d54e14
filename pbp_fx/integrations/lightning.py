"""Lightning integration: `PBCallback` for `lightning.pytorch.Trainer`.

The LightningModule holds the perforated model (`self.model = pbp_fx.perforate(...)`) and
keeps its `configure_optimizers` as written; the callback adopts the optimizer the Trainer
built from it, gives it the new parameter set at each restructure (its LR schedulers keep
stepping) and stops the Trainer when PB is complete, with the best-validation model loaded.
"""
from __future__ import annotations

from typing import Optional

from lightning.pytorch import Callback
from lightning.pytorch.trainer.states import TrainerFn

from ..config import ConfigError, PBConfig
from ..controller import Decision, PhaseController
from ..errors import TrainingError
from .common import find_perforated, unwrap_optimizer

__all__ = ["PBCallback"]


class PBCallback(Callback):
    """Runs PB's phase schedule on the logged validation metric `monitor` after every validation run.

    mode: "min" (a loss) or "max" (an accuracy); it sets config.maximize. config: PB settings
    (default: PBConfig() with the model's mode and activation). Works with one
    optimizer (automatic optimization) on one device. `self.controller` is the
    PhaseController once fitting has begun.
    """

    def __init__(self, config: Optional[PBConfig] = None, monitor: str = "val_loss", mode: str = "min"):
        if mode not in ("min", "max"):
            raise ConfigError(f"mode={mode!r}: use 'min' (lower {monitor} is better) or 'max'")
        self.monitor = monitor
        self.config, self.maximize = config, mode == "max"
        self.controller: Optional[PhaseController] = None

    def on_fit_start(self, trainer, pl_module):
        if len(trainer.optimizers) != 1:
            raise TrainingError(f"PBCallback works with one optimizer, but configure_optimizers returned "
                                f"{len(trainer.optimizers)}: return one optimizer over self.parameters()")
        if trainer.world_size > 1:
            raise TrainingError("PBCallback runs on one device: a restructure changes the parameters that "
                                "Lightning's DDP wrapper was built on; use devices=1")
        pm = find_perforated(pl_module, "PBCallback")
        opt = unwrap_optimizer(trainer.optimizers[0])
        if self.controller is None or self.controller.pm is not pm:
            self.controller = PhaseController(pm, self.config, optimizer=opt, maximize=self.maximize)
        for scheduler_config in trainer.lr_scheduler_configs:
            self.controller.attach_scheduler(scheduler_config.scheduler)

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or self.controller.done:
            return
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise TrainingError(f"PBCallback: {self.monitor!r} was not logged in validation "
                                f"(logged: {', '.join(sorted(metrics)) or 'nothing'}): self.log({self.monitor!r}, ...) "
                                "in validation_step, or pass monitor= one of those")
        decision = self.controller.step(float(metrics[self.monitor]))
        if decision is Decision.COMPLETE:
            trainer.should_stop = True

    def on_fit_end(self, trainer, pl_module):
        ctl = self.controller
        if ctl is not None and not ctl.done:  # max_epochs / max_steps ran out first
            ctl.finish("the Trainer's epoch or step budget ran out")
