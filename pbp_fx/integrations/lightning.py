"""Lightning integration: `PBCallback` for `lightning.pytorch.Trainer`.

The LightningModule holds the perforated model (`self.model = pbp_fx.perforate(...)`) and
keeps its `configure_optimizers` as written; the callback adopts the optimizer the Trainer
built from it, gives it the new parameter set at each restructure (its LR schedulers keep
stepping) and stops the Trainer when PB is complete, with the best-validation model loaded.
Its state (schedule, history, best weights, the model's structure) goes into Lightning's
checkpoints, so `trainer.fit(module, ckpt_path=...)` resumes a PB run.
"""
from __future__ import annotations

import difflib
from typing import Optional

import torch
from lightning.pytorch import Callback
from lightning.pytorch import callbacks as lightning_callbacks
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.trainer.states import TrainerFn

from ..checkpoint import warn_changed_settings
from ..config import ConfigError, PBConfig
from ..controller import Decision, PhaseController, model_fixed_settings
from ..errors import TrainingError, warn_at_user
from ..modelfile import reads_lower_is_better
from .common import (StructureOnLoad, find_perforated, finished_run, refuse_another_metric, refused_restart,
                     unwrap_optimizer)

__all__ = ["PBCallback"]

_HELD_PATIENCE = 2**31 - 1  # an EarlyStopping's patience while a dendrite phase holds it
# Callbacks that keep an averaged copy of the model (WeightAveraging, with its EMA subclass, is Lightning >= 2.5's).
_AVERAGING = tuple(getattr(lightning_callbacks, n) for n in ("StochasticWeightAveraging", "WeightAveraging")
                   if hasattr(lightning_callbacks, n))


class PBCallback(Callback):
    """Runs PB's phase schedule on the logged validation metric `monitor` after every validation run.

    mode: "min" (a loss; the default, as Lightning's own callbacks) or "max" (an accuracy); it sets
    config.maximize. config: PB settings (a PBConfig or a dict of its fields; default: PBConfig() with the model's
    mode and activation). Works with one
    optimizer (automatic or manual optimization) on one device. `self.controller` is the
    PhaseController once fitting has begun.
    """

    def __init__(self, config: Optional[PBConfig] = None, monitor: str = "val_loss", mode: Optional[str] = None):
        config = PBConfig.coerce(config, "PBCallback's config")
        if not isinstance(monitor, str):
            raise ConfigError(f"PBCallback(monitor={monitor!r}): give the name of a metric the LightningModule logs "
                              "with self.log, e.g. 'val_loss'")
        if mode not in (None, "min", "max"):
            raise ConfigError(f"mode={mode!r}: use 'min' (lower {monitor} is better) or 'max'")
        if config is not None and not config.maximize and mode == "max":
            raise ConfigError(f"PBCallback(mode='max') ranks {monitor} higher-is-better, but its config has "
                              "maximize=False: pass mode='min' (the callback sets the direction)")
        if mode == "max" and reads_lower_is_better(monitor):  # (mode given, monitor left at its default: the best is the worst)
            warn_at_user(f"PBCallback(mode='max') keeps the highest {monitor}, which reads as lower-is-better, as its "
                         f"best: pass the metric to maximise as monitor= (e.g. monitor='val_acc'), or mode='min'")
        if mode is None and not reads_lower_is_better(monitor) and (config is None or config.maximize):
            warn_at_user(f"PBCallback minimises {monitor} (mode='min', the default, as Lightning's callbacks): pass "
                         "mode='max' if higher is better (an accuracy), or mode='min' to say it is not")
        self.monitor = monitor
        self.config, self.maximize = config, mode == "max"
        self.controller: Optional[PhaseController] = None
        self._resumed: Optional[dict] = None  # state from a checkpoint, applied at fit start
        self._stage: Optional[str] = None  # the stage Lightning set up last ("fit", "validate", ...)
        self._fitting = False  # between on_fit_start and on_fit_end (still set after a fit that raised)
        self._structure_hook = None  # while fitting starts: see setup()
        self._held_stoppers: dict = {}  # EarlyStopping index -> its patience, while a dendrite phase holds it
        self._unchecked_finite: list = []  # EarlyStopping indices whose check_finite the fit holds (see below)
        self._before_validation: dict = {}  # callback_metrics as a validation run began (see on_validation_end)
        self._warned_not_validation = False
        self._steps_at_check = 0  # trainer.global_step at the last validation (or the training's start)
        self._pm_had_gradients = False  # since then, after a backward (automatic optimization)

    # -- checkpoints: Lightning saves and restores a callback's state_dict -----------------
    def state_dict(self) -> dict:
        ctl = self.controller
        if ctl is None:
            return {}
        # The CPU generator too: the training step's dropout and augmentation draw from it (Lightning
        # does not restore it on resume; `pbp-fx train --resume` does); candidates draw from the
        # controller's own generator, in its state.
        return {"controller": ctl.state_dict(), "frozen": ctl.pm.phase_buffers(), "rng": torch.get_rng_state(),
                "held_stoppers": dict(self._held_stoppers), "config": ctl.config.to_dict(), "monitor": self.monitor}

    def load_state_dict(self, state_dict: dict) -> None:
        # Lightning restores callbacks for validate/test/predict(ckpt_path=...) too: only a fit resumes PB.
        self._resumed = (dict(state_dict) or None) if self._stage in (None, "fit") else None
        if self._resumed is not None and "rng" in self._resumed:
            # The next candidates' initial weights, as the uninterrupted run's: restored now, before
            # configure_optimizers, where estimated_stepping_batches starts the first epoch's DataLoader
            # iterator (its seed a draw from this generator), not at on_fit_start, after that draw.
            torch.set_rng_state(self._resumed["rng"])

    def setup(self, trainer, pl_module, stage):
        self._stage = stage
        # On resume Lightning loads the module's state dict strictly before any callback sees the
        # checkpoint: a pre-hook first gives the model the structure that state was saved with
        # (dendrites resize by themselves; a candidate pool needs the dendrite phase started).
        # Any stage: trainer.validate/test(module, ckpt_path=...) loads a checkpoint the same way.
        # On the LightningModule, not the model: a module may build its model in configure_model or
        # setup, which Lightning calls after this hook and before it loads the checkpoint.
        if self._structure_hook is not None:  # (a validate/test/predict's, maybe on another module)
            self._structure_hook.remove()
        self._structure_hook = StructureOnLoad(
            pl_module, lambda pm: model_fixed_settings(self.config or PBConfig(), pm))

    def on_fit_start(self, trainer, pl_module):
        if len(trainer.optimizers) != 1:
            raise TrainingError(f"PBCallback works with one optimizer, but configure_optimizers returned "
                                f"{len(trainer.optimizers)}: return one optimizer over self.parameters()")
        if trainer.world_size > 1:
            raise TrainingError("PBCallback runs on one device: a restructure changes the parameters that "
                                "Lightning's DDP wrapper was built on; use devices=1")
        if not trainer.enable_validation:
            raise TrainingError(f"PBCallback decides on the validation metric {self.monitor!r}, but this fit runs no "
                                "validation: define validation_step, pass val_dataloaders (or a datamodule's "
                                "val_dataloader) and keep limit_val_batches > 0")
        if getattr(trainer, "barebones", False):  # (found after a whole epoch, as "not logged")
            raise TrainingError(f"PBCallback decides on the logged {self.monitor!r}, but Trainer(barebones=True) turns "
                                "self.log off: drop barebones=True")
        averagers = [type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, _AVERAGING)]
        if averagers:
            raise TrainingError(f"PBCallback: {averagers[0]} averages a copy of the model made before PB restructures "
                                "it (candidates, dendrites), so its average pairs the wrong tensors, and PB ends the "
                                "run on its own best weights: remove it, or average in a training loop of your own "
                                "with pbp_fx.integrations.averaging (docs/integrations.md)")
        for saver in trainer.checkpoint_callbacks:
            monitored = getattr(saver, "monitor", None)
            if monitored is not None and monitored != self.monitor:
                warn_at_user(f"PBCallback follows {self.monitor!r} but a ModelCheckpoint ranks by {monitored!r}: a "
                               f"checkpoint saved at a PB rewind (a dendrite phase's start, a retry, the end) holds "
                               f"PB's best weights by {self.monitor!r}, not the weights that scored its recorded "
                               f"{monitored!r}; monitor the same metric, or use the model PB leaves at fit end")
        config = self.config or PBConfig()  # (the controller's default config has PBConfig's)
        patience = config.patience
        for stopper in trainer.early_stopping_callbacks:
            # (a larger min_delta counts more validations as no gain than PB does: it runs out first at PB's patience)
            stricter = abs(stopper.min_delta) > config.improvement
            if stopper.monitor == self.monitor and (stopper.patience < patience or
                                                    (stricter and stopper.patience <= patience)):
                why = (f"with patience={stopper.patience}" if not stricter else
                       f"with patience={stopper.patience} and min_delta={abs(stopper.min_delta):g} (a gain below it "
                       f"counts as none; PB's improvement is {config.improvement:g})")
                warn_at_user(f"EarlyStopping on {self.monitor!r} {why} can end the run before "
                               f"PB's neuron phase does (PBConfig.patience={patience} validations without "
                               "gain start a dendrite phase), so no dendrite is added: give EarlyStopping a patience "
                               "above PB's, or leave the run's end to PBCallback")
        pm = find_perforated(pl_module, "PBCallback")
        _refuse_model_changing_callbacks(trainer, pl_module, pm, self._resumed)
        if self._structure_hook is not None:  # the checkpoint (if any) is loaded: later loads are PB's own
            self._structure_hook.remove()
            self._structure_hook = None
        # "16-mixed": the precision plugin holds the GradScaler; the pools divide its scale out
        pm.grad_scaler = getattr(trainer.precision_plugin, "scaler", None)
        opt = unwrap_optimizer(trainer.optimizers[0])
        if not opt.param_groups:  # configure_optimizers returned None: Lightning's stand-in has no groups
            raise TrainingError("PBCallback needs an optimizer, but configure_optimizers returned none: return "
                                "one optimizer over self.parameters()")
        # A fit that raised never reached on_fit_end (`_fitting` still set): see PBCallback (HF).
        if self.controller is not None and self.controller.pm is pm and not self.controller.done \
                and self._resumed is None and (self.controller.optimizer is not opt or self._fitting):
            raise TrainingError(refused_restart("trainer.fit(..., ckpt_path=<a checkpoint of that fit>)",
                                                self.controller.optimizer is opt))
        if self._resumed is not None:  # (none recorded: a checkpoint of an earlier pbp-fx)
            refuse_another_metric(self._resumed.get("monitor", self.monitor), self.monitor,
                                  f"pass PBCallback(monitor={self._resumed.get('monitor')!r})")
        self._fitting = True
        if self.controller is None or self.controller.pm is not pm or (
                self._resumed is not None and self.controller.optimizer is not opt):
            self.controller = PhaseController(pm, self.config, optimizer=opt, maximize=self.maximize, root=pl_module,
                                              parameter_groups=_groups_of_configure_optimizers(pl_module))
        if self._resumed is not None:  # Lightning restores the optimizer and schedulers after this hook
            if "config" in self._resumed:
                warn_changed_settings(self._resumed["config"], self.controller.config, "the checkpoint",
                                      in_dendrite_phase=pm.phase == "dendrite")  # (its structure is restored)
            self.controller.load_state_dict(self._resumed["controller"])
            if self._resumed["frozen"]:  # only a dendrite phase has them
                pm.load_phase_buffers(self._resumed["frozen"])
            self._held_stoppers = {int(i): p for i, p in self._resumed.get("held_stoppers", {}).items()}
            self._resumed = None
        self._hold_finite_checks(trainer)
        if self.controller.done:  # PB finished (a checkpoint written then, or fit() again): nothing left to train
            # (min_epochs may still train on: on_fit_end loads the best model back)
            trainer.should_stop = True
            warn_at_user(finished_run(self.controller.history[-1]["note"], "this fit trains nothing"))
            return  # (this fit's schedulers drive a new optimizer, not the finished run's)
        for scheduler_config in trainer.lr_scheduler_configs:
            self.controller.attach_scheduler(scheduler_config.scheduler)

    def on_validation_start(self, trainer, pl_module):
        self._before_validation = dict(trainer.callback_metrics)

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn != TrainerFn.FITTING or self.controller.done:
            return
        metrics = trainer.callback_metrics
        if trainer.sanity_checking:
            # Before any training step, a near miss of a logged name (a typo?) is said at once. Not
            # refused: modules may log the monitored metric only after the sanity check, beside a
            # sibling name (val_wer and val_cer); a metric still missing is refused at the first validation.
            near = difflib.get_close_matches(self.monitor, list(metrics), n=1, cutoff=0.85)
            if self.monitor not in metrics and near:
                warn_at_user(f"PBCallback: {self.monitor!r} was not logged in the sanity check (did you mean "
                               f"{near[0]!r}?); it is refused at the first validation if it is still missing")
            return
        if self.monitor not in metrics:
            raise TrainingError(self._not_logged(metrics, trainer.logged_metrics))
        if self._before_validation.get(self.monitor) is metrics[self.monitor] and not self._warned_not_validation:
            # Lightning computes each logged validation value anew at the run's end; this one is the
            # object it was before: training_step (or another hook) logged it.
            self._warned_not_validation = True
            warn_at_user(f"PBCallback follows {self.monitor!r}, which this validation run did not log (it comes "
                           "from training): PB's rounds should rest on held-out scores; self.log a metric in "
                           "validation_step and pass monitor= it")
        if trainer.fast_dev_run:
            # Lightning's smoke test (a batch or a few, then one validation) checks the wiring: the
            # metric is logged. It is no epoch of the run: a fit after it starts PB afresh.
            return
        self._refuse_untrained(trainer, pl_module)
        decision = self.controller.step(float(metrics[self.monitor]))
        self._hold_early_stopping(trainer)
        if decision is Decision.COMPLETE:
            trainer.should_stop = True

    def on_train_start(self, trainer, pl_module):
        self._steps_at_check = trainer.global_step  # (after a resume's restore: on_fit_start comes before it)
        self._pm_had_gradients = False

    def on_after_backward(self, trainer, pl_module):
        if not self._pm_had_gradients and self.controller is not None:  # (once a validation interval)
            self._pm_had_gradients = any(p.grad is not None for p in self.controller.pm.parameters() if p.requires_grad)

    def _refuse_untrained(self, trainer, pl_module) -> None:
        """The optimizer stepped since the last validation, but no backward reached the perforated model:
        training_step trains another module (the model perforate copied), and PB's first dendrite phase would
        end in torch's "does not require grad" a whole neuron phase later. Automatic optimization only (a
        manual loop may call backward where Lightning does not see it)."""
        stepped, trained = trainer.global_step > self._steps_at_check, self._pm_had_gradients
        self._steps_at_check, self._pm_had_gradients = trainer.global_step, False
        if stepped and not trained and pl_module.automatic_optimization:
            raise TrainingError("PBCallback: the optimizer stepped, but no backward reached the perforated model "
                                "since the last validation: training_step trains another module (perforate returns "
                                "a copy and leaves the model it was given as it was): call the perforated model "
                                "(self.model = pbp_fx.perforate(...); self.model(x)) in training_step")

    def _not_logged(self, metrics, logged) -> str:
        if self.monitor in logged:  # sent to the loggers, but not aggregated over the run
            return (f"PBCallback: {self.monitor!r} was logged per step only (on_step=True, on_epoch=False), so a "
                    f"validation run gives no one score: self.log({self.monitor!r}, ..., on_epoch=True) in "
                    "validation_step (the default there)")
        return (f"PBCallback: {self.monitor!r} was not logged in validation (the run's logged metrics: "
                f"{', '.join(sorted(metrics)) or 'nothing'}): self.log({self.monitor!r}, ...) in validation_step, "
                "or pass monitor= one of those")

    def _hold_early_stopping(self, trainer) -> None:
        """EarlyStopping callbacks wait while a dendrite phase runs: the validation score cannot
        change there (the model's output does not), so they would end the run and drop the
        candidates. Their patience is held at the phase's start and given back, whole, at the
        first training batch after its end (`_give_back_patience`)."""
        stoppers = trainer.early_stopping_callbacks
        if self.controller.pm.phase == "dendrite" and not self._held_stoppers:
            self._held_stoppers = {i: es.patience for i, es in enumerate(stoppers)}
            # A stopper that checks at validation end and comes before this callback has already counted the
            # validation that starts the phase: with PB's own patience, its ran out there, and it stopped the fit.
            undone = [es for es in stoppers if es.stopped_epoch == trainer.current_epoch and es.wait_count >= es.patience]
            for es in undone:
                es.stopped_epoch = 0
                if hasattr(es, "stopping_reason"):  # (Lightning 2.6: why it stopped, read by the user after fit)
                    es.stopping_reason, es.stopping_reason_message = type(es.stopping_reason).NOT_STOPPED, None
            if undone:
                trainer.should_stop = False
            for es in stoppers:
                es.patience = _HELD_PATIENCE

    def _hold_finite_checks(self, trainer) -> None:
        """For the fit: EarlyStopping(check_finite=True) on PB's metric would end it at a non-finite
        score after a best (diverged weights), where PB goes back to its best weights and on (a
        non-finite score PB cannot take raises). Off from the fit's start, whatever the callbacks'
        order and wherever the stopper checks; given back at its end (`_give_back_finite_checks`)."""
        for i, es in enumerate(trainer.early_stopping_callbacks):
            if es.monitor == self.monitor and es.check_finite:
                es.check_finite = False
                self._unchecked_finite.append(i)

    def _give_back_finite_checks(self, trainer) -> None:
        stoppers = trainer.early_stopping_callbacks
        for i in self._unchecked_finite:
            if i < len(stoppers):
                stoppers[i].check_finite = True
        self._unchecked_finite = []

    def _give_back_patience(self, trainer) -> None:
        """After a dendrite phase: not at the install's validation, whose score (the model before the
        install) an EarlyStopping checking at the training epoch's end counts after this callback's
        on_validation_end; at the next training batch every stopper has seen that validation."""
        if self._held_stoppers and (self.controller is None or self.controller.pm.phase != "dendrite"):
            stoppers = trainer.early_stopping_callbacks
            for i, patience in self._held_stoppers.items():
                if i < len(stoppers):
                    stoppers[i].patience, stoppers[i].wait_count = patience, 0
            self._held_stoppers = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._give_back_patience(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        # PB's state beside the module's own metrics, for the loggers (TensorBoard, CSV, W&B): the
        # dendrites per site, whether a dendrite phase runs, and the parameters the outputs use.
        if self.controller is not None:
            pm = self.controller.pm
            pl_module.log_dict({"pb/dendrites": float(pm.dendrites), "pb/dendrite_phase": float(pm.phase == "dendrite"),
                                "pb/parameters": float(pm.num_parameters())}, on_step=False, on_epoch=True)

    def on_exception(self, trainer, pl_module, exception):
        self._give_back_finite_checks(trainer)
        self._give_back_patience(trainer)  # (a stop inside a dendrite phase: the controller is back in a neuron one)

    def on_fit_end(self, trainer, pl_module):
        self._fitting = False
        ctl = self.controller
        if trainer.fast_dev_run and ctl is not None and not ctl.history:
            self.controller = None  # (not finished: the next fit builds its own on its own optimizer)
            self._give_back_finite_checks(trainer)
            return
        if ctl is not None and ctl.done:
            # PB may have finished before the Trainer did (min_epochs trains on; a resumed finished run):
            # the best-validation model is the one fit leaves.
            ctl.restore_best()
        elif ctl is not None:  # the Trainer stopped first
            budget = (trainer.max_epochs not in (None, -1) and trainer.current_epoch >= trainer.max_epochs) or (
                trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps)
            timed_out = any(isinstance(c, Timer) and (c.time_remaining() or 0.0) <= 0.0 and c.time_remaining() is not None
                            for c in trainer.callbacks)
            ctl.finish("the Trainer's epoch or step budget ran out" if budget else
                       "the Trainer's time limit (max_time) ran out" if timed_out else
                       "the Trainer stopped (trainer.should_stop: EarlyStopping or another callback)")
        self._give_back_patience(trainer)  # (after finish: a run ended in a dendrite phase holds them still)
        self._give_back_finite_checks(trainer)


def _refuse_model_changing_callbacks(trainer, pl_module, pm, resumed: Optional[dict]) -> None:
    """Callbacks that change the model where PB cannot follow (resumed: the checkpoint's PB state, None in a fresh
    fit): a pruning that reparametrises the weights PB keeps and rewinds (its permanent form, at train end, renamed
    them before PB loaded its best state); a finetuning callback that thaws parameters outside pm mid-run (PB keeps
    neither them still in a dendrite phase, nor them in the optimizer at a restructure), that holds all of pm frozen,
    or whose saved parameter groups of its first epoch a resume puts back over PB's regrouped ones."""
    for cb in trainer.callbacks:
        name = type(cb).__name__
        if isinstance(cb, lightning_callbacks.ModelPruning):
            raise TrainingError(f"PBCallback: {name} reparametrises the weights that PB keeps as its best state and "
                                "restructures (weight_orig, weight_mask), and makes them permanent before PB loads its "
                                "best weights: remove it, and prune the model after fit")
        if not isinstance(cb, lightning_callbacks.BaseFinetuning):
            continue
        schedule = (resumed or {}).get("controller", {}).get("schedule", {})
        if schedule.get("rounds") or schedule.get("phase") == "dendrite":
            raise TrainingError(f"PBCallback: a ckpt_path resume beside {name} after PB restructured the model is not "
                                f"supported: {name} puts back the optimizer's parameter groups of its first epoch, "
                                "which no longer hold the model's parameters; train from the start, or resume "
                                f"without {name}")
        inside = {id(p) for p in pm.parameters()}
        # (BackboneFinetuning thaws pl_module.backbone; another finetuning callback, what it chooses: any frozen one)
        held = getattr(pl_module, "backbone", None) if isinstance(cb, lightning_callbacks.BackboneFinetuning) else None
        if held is not None and inside <= {id(p) for p in held.parameters()}:
            raise TrainingError(f"PBCallback: {name} freezes the perforated model (its backbone holds all of it) until "
                                "it thaws it, so PB's phases would train nothing: perforate the part that trains from "
                                "the start (the head), or the module holding both")
        frozen = [n for n, p in (pl_module if held is None else held).named_parameters()
                  if id(p) not in inside and not p.requires_grad]
        if not frozen:
            continue
        said = (f"PBCallback: {name} {'will thaw' if held is not None else 'may thaw'} parameters outside the "
                f"perforated model ({frozen[0]}, ...), which PB neither holds still in a dendrite phase nor keeps in "
                "the optimizer at a restructure: perforate the module that holds them with the rest (one "
                "PerforatedModel), or thaw them before fit")
        if held is None:
            warn_at_user(said)
        else:
            raise TrainingError(said)


def _groups_of_configure_optimizers(pl_module):
    """parameter_groups for the controller: {name: group index} as the module's own
    configure_optimizers groups the model's parameters now. On resume Lightning builds the
    optimizer from it over the restored structure; new parameters must be in the same groups
    when the optimizer state is saved, or it no longer fits (a weight-decay split by name)."""
    warned = []

    def groups(module) -> dict:
        opt = _first_optimizer(pl_module.configure_optimizers())
        if opt is None:
            return {}
        live = _live_optimizer(pl_module)
        if live is not None and len(live.param_groups) > len(opt.param_groups) and not warned:
            warned.append(True)  # (BackboneFinetuning's unfrozen backbone, an add_param_group)
            warn_at_user(f"the optimizer has {len(live.param_groups)} parameter groups but configure_optimizers() "
                           f"makes {len(opt.param_groups)}: at each restructure PB regroups the parameters by "
                           "configure_optimizers(), so the added groups' parameters join its groups and their "
                           "learning rates; give them a group there (filtered by requires_grad if they thaw later)")
        index = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
        return {n: index[id(p)] for n, p in module.named_parameters() if id(p) in index}
    return groups


def _live_optimizer(pl_module) -> Optional[torch.optim.Optimizer]:
    """The Trainer's first optimizer now (None: no trainer or none yet)."""
    try:
        optimizers = pl_module.trainer.optimizers
    except RuntimeError:  # (not attached to a Trainer)
        return None
    return unwrap_optimizer(optimizers[0]) if optimizers else None


def _first_optimizer(made):
    """The first optimizer in any form configure_optimizers may return (None: none)."""
    while not isinstance(made, torch.optim.Optimizer):
        if isinstance(made, dict):
            made = made.get("optimizer")
        elif isinstance(made, (list, tuple)) and made:
            made = made[0]
        else:
            return None
    return made

