"""Hugging Face `transformers.Trainer` integration: `PBCallback`.

A stock Trainer script gains three lines:

    import pbp_fx.integrations.hf
    model = pbp_fx.perforate(model, example_kwargs=batch)
    trainer = Trainer(model=model, args=args, ..., callbacks=[pbp_fx.integrations.hf.PBCallback()])

Each evaluation's metric goes to the phase schedule; at a restructure the Trainer's own
optimizer object (adopted, not replaced) gets the new parameter set, its LR scheduler keeps
stepping, and when PB is complete training stops with the best-validation model loaded.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Optional

import torch
from transformers import TrainerCallback
from transformers.utils import find_labels

from ..checkpoint import holds_weights_of, load_controller, read_meta, save
from ..config import ConfigError, PBConfig
from ..controller import Decision, PhaseController, group_index, model_fixed_settings
from ..errors import TrainingError, warn_at_user
from ..modelfile import reads_lower_is_better
from ..perforated import LOSS_KEYWORD, PerforatedModel, takes_loss_keyword
from ..site import Site
from .common import (StructureOnLoad, find_perforated, finished_run, refuse_another_metric, refused_restart,
                     unwrap_optimizer, unwrap_scheduler)

__all__ = ["PBCallback", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "pbp_fx.safetensors"  # the pbp_fx.save checkpoint written beside the Trainer's files


class PBCallback(TrainerCallback):
    """Runs PB's phase schedule on the Trainer's evaluations (eval_strategy "epoch" or "steps").

    metric: the evaluation metric the schedule follows ("eval_loss", or "eval_<name>" from
    compute_metrics; the "eval_" prefix may be left out); default: TrainingArguments'
    metric_for_best_model when set, else "eval_loss". greater_is_better: its direction (default:
    TrainingArguments.greater_is_better when the metric is metric_for_best_model, else lower is
    better for names ending in "loss", higher otherwise); it sets config.maximize. config: PB settings (default:
    PBConfig() with the model's mode and activation). group_of_name(name) -> group index: the rule
    by which you group your own optimizer (`Trainer(optimizers=...)`) over the names of the Trainer's
    model; PB's new parameters join the groups it gives them, so that the optimizer you rebuild by it
    on resume has the saved groups (default: a new parameter joins its neuron's group; the
    Trainer's own optimizer: its weight-decay rule). `self.controller` is the PhaseController once training has begun.
    Checkpoints: every Trainer checkpoint folder and, at the end, `args.output_dir` get a
    `pbp_fx.safetensors` that `pbp_fx.load` reads. One process (no multi-GPU DDP).
    """

    def __init__(self, config: Optional[PBConfig] = None, metric: Optional[str] = None,
                 greater_is_better: Optional[bool] = None, group_of_name: Optional[Callable[[str], int]] = None):
        if group_of_name is not None and not callable(group_of_name):
            raise ConfigError(f"PBCallback(group_of_name={group_of_name!r}): give a function of a parameter's name "
                              "that returns its optimizer group's index")
        self.config = PBConfig.coerce(config, "PBCallback's config")
        if metric is not None and not isinstance(metric, str):
            raise ConfigError(f"PBCallback(metric={metric!r}): give the name of a metric the Trainer's evaluation "
                              "logs, e.g. 'eval_accuracy'")
        if greater_is_better is not None and not isinstance(greater_is_better, bool):
            raise ConfigError(f"PBCallback(greater_is_better={greater_is_better!r}): give True (higher "
                              f"{metric or 'eval_loss'} is better), False or None (the Trainer's setting)")
        self._metric, self._greater_is_better = metric, greater_is_better
        self._group_of_name = group_of_name
        self.metric, self.maximize = _direction(metric or "eval_loss", greater_is_better)
        self.controller: Optional[PhaseController] = None
        self._training = False
        self._other_datasets: dict = {}  # evaluation prefix -> metric names, since the last step
        self._round_has_metric = False  # an evaluation since the last step had the metric
        self._round_due = False  # the Trainer evaluates after this step or epoch (control.should_evaluate)
        self._before_first_step = False  # eval_on_start's evaluation (of a fresh or a resumed run) comes now
        self._resumed_complete = False  # resumed from a checkpoint of a finished PB run
        self._applied_lr: Optional[float] = None
        self._decisions, self._first_step = 0, 0  # controller steps in this train(), its first global step
        self._budget_end: Optional[tuple] = None
        self._from_args = False  # the metric is the TrainingArguments' metric_for_best_model
        self._structure_hook: Optional[StructureOnLoad] = None
        self._user_groups_warned = False
        self._presaved: Optional[tuple] = None  # (step, pending file): `_save_before_the_trainer`

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if getattr(args, "neftune_noise_alpha", None) is not None:  # (train() attaches it before on_train_begin)
            raise TrainingError("PBCallback: neftune_noise_alpha adds noise through a forward hook on the model's "
                                "input embeddings, which a captured PerforatedModel neither exposes nor calls as a "
                                "module under torch.export: unset neftune_noise_alpha")
        # trainer.train(resume_from_checkpoint=...) loads the model's state dict before any callback
        # sees the checkpoint: the model first gets the structure it was saved with (a dendrite
        # phase's pools), so that the Trainer's optimizer is rebuilt with the saved groups.
        found = [m for m in model.modules() if isinstance(m, PerforatedModel)] if model is not None else []
        if len(found) == 1:
            self._watch_loads(model)

    def _watch_loads(self, model) -> None:
        """The hook on the Trainer's whole model (the perforated part of it or all): a dendrite phase
        also freezes what the model trains outside the perforated part."""
        if self._structure_hook is None:
            self._structure_hook = StructureOnLoad(
                model, lambda pm: model_fixed_settings(self.config or PBConfig(), pm),
                freeze_outside=True)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if args.load_best_model_at_end:
            raise TrainingError("PBCallback keeps the best-validation model itself: "
                                "set load_best_model_at_end=False in TrainingArguments")
        if getattr(args, "predict_with_generate", False):
            raise TrainingError("PBCallback: predict_with_generate=True evaluates with model.generate(), which a "
                                "PerforatedModel does not offer: set predict_with_generate=False (PB follows "
                                "eval_loss), and generate with the original model class after training")
        if args.eval_strategy == "no":
            raise TrainingError("PBCallback decides on evaluation metrics: set eval_strategy='epoch' or 'steps' "
                                "and pass an eval_dataset")
        # (the TrainerState is this train() call's own: a callback that began it is in the list twice)
        if getattr(state, "_pbp_fx_callback", None) is not None:
            raise TrainingError("two PBCallbacks (or one added twice) on one Trainer would each step the model's "
                                "phases at every evaluation: pass one")
        state._pbp_fx_callback = self
        if args.world_size > 1:
            raise TrainingError("PBCallback runs in one process: a restructure changes the parameters that the "
                                "Trainer's DDP wrapper was built on; train on one device")
        stoppers = [name for name, saved in (state.stateful_callbacks or {}).items() if _is_early_stopping(name, saved)]
        if stoppers:
            # Its counter grows at every evaluation of a dendrite phase (the score cannot change there) and
            # no callback can reach it to hold it: it would end the run and drop the candidates.
            raise TrainingError(f"PBCallback: {stoppers[0]} would end the run inside a dendrite phase, where the "
                                "evaluation score cannot change: remove it (PB stops the run itself when it is "
                                "complete; PBConfig(patience=...) is its neuron-phase patience)")
        ranked = _direction(args.metric_for_best_model, None)[0] if args.metric_for_best_model else None
        self._from_args = self._metric is None and ranked is not None
        own = self._greater_is_better
        ranked_by = (f"greater_is_better={own} given to it" if own is not None
                     else "the default for a name that does not end in 'loss'")
        if self._from_args or ranked == self.metric:  # the metric the user's Trainer ranks by
            trainers = bool(args.greater_is_better)
            self.metric, self.maximize = ranked, trainers if own is None else own  # (given here: it wins)
            if own is None:
                ranked_by = f"TrainingArguments' greater_is_better={trainers}"
            if own is not None and own != trainers and args.save_strategy != "no":
                warn_at_user(f"PBCallback(greater_is_better={own}) ranks {ranked} the other way round from the "
                             f"Trainer, which ranks its checkpoints by greater_is_better={trainers} (its default for "
                             f"the name, unless you set it): set TrainingArguments(greater_is_better={own}) too")
        elif (args.metric_for_best_model and args.save_strategy != "no"
              and ranked != self.metric):
            warn_at_user(
                f"PBCallback follows {self.metric} but the Trainer ranks checkpoints by metric_for_best_model="
                f"{args.metric_for_best_model}: a checkpoint saved at a PB rewind (a dendrite phase's start, a retry, "
                f"the end) holds PB's best weights by {self.metric}, not the weights that scored its recorded "
                f"{args.metric_for_best_model}; rank by the same metric, or use the model PB leaves at the end")
        if self.config is not None and not self.config.maximize and self.maximize:
            # (the callback sets the direction: the config's own was replaced without a word)
            raise ConfigError(f"PBCallback's config has maximize=False, but it ranks {self.metric} higher-is-better "
                              f"({ranked_by}): pass greater_is_better=False to PBCallback")
        # (as Lightning's mode='max' on a loss: the best is the worst)
        if self.maximize and reads_lower_is_better(self.metric):
            warn_at_user(f"PBCallback keeps the highest {self.metric}, which reads as lower-is-better, as its best "
                         f"({ranked_by}): pass greater_is_better=False if lower is better")
        pm = find_perforated(model, "PBCallback")
        source = pm.source_model
        if model is pm and source is not None and args.label_names is None:
            # (transformers' find_labels adds a QuestionAnswering model's start/end positions by its class name)
            theirs, ours = find_labels(type(source)), find_labels(type(pm))
            if theirs != ours:
                raise ConfigError(f"the Trainer takes the label names from the model's class, and finds {theirs} for "
                                  f"{type(source).__name__} but {ours} for the PerforatedModel (its evaluation would "
                                  f"report no loss): set TrainingArguments(label_names={theirs})")
        if args.gradient_accumulation_steps > 1 and not pm.accepts_loss_kwargs and source is not None \
                and takes_loss_keyword(source):
            warn_at_user(f"gradient_accumulation_steps={args.gradient_accumulation_steps}: the perforated model was "
                         f"traced without the Trainer's {LOSS_KEYWORD}, so the Trainer divides each micro-batch's loss "
                         f"by the accumulation steps itself, where for {type(source).__name__} it passes the count to "
                         "the model's loss (a causal LM's normalises by the tokens of the whole window; a loss that "
                         "ignores the count is not divided): the gradients can differ from the original's: perforate "
                         f"with example_kwargs holding '{LOSS_KEYWORD}': torch.tensor(<count>) to train as it does")
        if self._structure_hook is not None:  # the checkpoint (if any) is loaded: later loads are PB's own
            self._structure_hook.remove()
            self._structure_hook = None
        # fp16: accelerate's optimizer wrapper holds the GradScaler; the pools divide its scale out
        pm.grad_scaler = getattr(optimizer, "scaler", None)
        opt = unwrap_optimizer(optimizer)
        resuming = state.global_step > 0
        if resuming:
            # (the Trainer keeps the optimizer of an earlier train(): built over that run's model)
            ctl = self.controller
            trained_before = ctl is not None and ctl.pm is pm and ctl.optimizer is opt
            _refuse_misplaced_optimizer_state(opt, trained_before)
        # A train() that raised never reached on_train_end (`_training` still set): another call on the
        # same Trainer keeps its optimizer, whose rates the run's state has scaled already. A run that
        # raised before its first evaluation decided nothing and scaled no rate (auto_find_batch_size's
        # retry at a smaller batch): it starts afresh.
        untouched = self.controller is not None and not self.controller.history and pm.phase == "neuron"
        if untouched and not resuming:
            self.controller = None
        if self.controller is not None and self.controller.pm is pm and not self.controller.done and not resuming \
                and (self.controller.optimizer is not opt or self._training):
            raise TrainingError(refused_restart("trainer.train(resume_from_checkpoint=<a checkpoint of that run>)",
                                                self.controller.optimizer is opt))
        resumed = _resumed_file(args, state, pm) if resuming else None
        if resumed is not None:  # (none recorded: a file of an earlier pbp-fx)
            refuse_another_metric(read_meta(resumed)["extra"].get("metric", self.metric), self.metric,
                                  "follow it again (PBCallback(metric=...) or metric_for_best_model)")
        if self.controller is None or self.controller.pm is not pm or (resuming and self.controller.optimizer is not opt):
            self.controller = PhaseController(pm, self.config, optimizer=opt, maximize=self.maximize, root=model,
                                              parameter_groups=self._parameter_groups(model, opt, warn=not resuming))
        scheduler = unwrap_scheduler(lr_scheduler)
        # A checkpoint saved with save_only_model=True has no optimizer or scheduler state: the Trainer
        # resumes with both fresh (the scheduler at its start, its base rates without the phase's factor).
        scheduler_restored = resuming and (scheduler is None or getattr(scheduler, "last_epoch", 1) > 0)
        if resuming:  # trainer.train(resume_from_checkpoint=...): the Trainer restored the rest
            load_controller(resumed, self.controller)
            if not scheduler_restored:  # (the Trainer always has one; an optimizer's state may be empty: plain SGD)
                warn_at_user(f"PBCallback: the checkpoint resumed at step {state.global_step} holds no optimizer or "
                             "scheduler state (saved with save_only_model=True?): the optimizer's moments and the "
                             "learning-rate schedule start afresh, so the run does not repeat an uninterrupted one "
                             "(PB applies its phase's factor to the fresh schedule); save full checkpoints to resume "
                             "exactly")
        # PB finished already (a checkpoint written then, or train() called again): nothing left to train.
        # The Trainer still takes one step before it looks; `_hold_finished_run` undoes it.
        self._resumed_complete = self.controller.done
        if self._resumed_complete:
            control.should_training_stop = True
            warn_at_user(finished_run(self.controller.history[-1]["note"], "this train() stops after one step"))
        if scheduler is not None:
            self.controller.attach_scheduler(scheduler, scaled=scheduler_restored)
        self._before_first_step = bool(getattr(args, "eval_on_start", False))
        self._applied_lr = None  # group 0's rate at the last optimizer step (what the log shows)
        self._decisions, self._first_step = 0, state.global_step
        self._budget_end = None  # (score, log entry) of the evaluation the Trainer adds where its budget ends
        self._presaved = None
        self._training = True

    def _parameter_groups(self, model, optimizer, warn: bool) -> Optional[Callable]:
        """Where PB's new parameters go (PhaseController's parameter_groups): the user's rule, else the
        Trainer's own grouping, else (None) their neurons' groups; an optimizer of the user's own with
        several groups and no rule is warned of in a fresh run (its rebuild on resume would not fit the
        saved state)."""
        rule = self._group_of_name
        if rule is not None:  # (checked against the groups: the Trainer's own, or a subclass's create_optimizer, too)
            _check_rule(rule, model, optimizer)
            return lambda module: {n: _group_index(rule, n, len(optimizer.param_groups))
                                   for n, _ in module.named_parameters()}
        if _grouped_by_trainer(model, optimizer):
            return _trainer_groups
        if warn and len(optimizer.param_groups) > 1 and not self._user_groups_warned:
            self._user_groups_warned = True
            warn_at_user(f"PBCallback: your optimizer has {len(optimizer.param_groups)} parameter groups; PB puts each "
                         "new parameter (candidates, dendrites) in its neuron's group, which an optimizer rebuilt from "
                         "names on resume does not reproduce (the Trainer then refuses the saved state): pass the rule "
                         "that groups it as PBCallback(group_of_name=...)")
        return None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not self._training or self.controller.done:
            return  # trainer.evaluate() outside train(), or after PB finished
        if self._before_first_step:
            return  # eval_on_start: no epoch of the schedule (the run's own, or the one it resumes, was counted)
        metrics = metrics or {}
        prefix = next((k[:-len("_runtime")] for k in metrics if k.endswith("_runtime")), "eval")
        if prefix != "eval" and not prefix.startswith("eval_"):
            return  # an evaluation of the user's own (trainer.evaluate(..., metric_key_prefix="train"))
        if self.metric not in metrics:
            if self._round_has_metric:
                return  # another dataset of a round that has stepped already
            # eval_dataset as a dict: one evaluation per dataset, each with its own prefix (eval_<name>_...);
            # the metric comes with its own dataset's. A prefix seen twice without it: no dataset has it.
            if prefix != "eval" and not self._round_due:
                return  # trainer.evaluate(..., metric_key_prefix="eval_extra") of the user's own, between rounds
            if prefix != "eval" and prefix not in self._other_datasets:
                self._other_datasets[prefix] = set(metrics)
                return  # the round's other datasets come next; `_refuse_a_round_without_metric` checks after it
            self._refuse_missing_metric(metrics, args.prediction_loss_only)
        self._other_datasets, self._round_has_metric = {}, True
        entry = state.log_history[-1] if state.log_history else {}
        if _budget_end_off_grid(args, state):
            # The Trainer adds this evaluation because its budget ran out between two of its own: a step
            # here would put the checkpoint it saves next off the schedule of a run with a larger budget
            # (a resume from it then differs). on_train_end takes the score.
            self._budget_end = (float(metrics[self.metric]), entry)
            return
        self._step(float(metrics[self.metric]), entry, control)
        self._save_before_the_trainer(args, state, control)

    def _step(self, score: float, entry: dict, control=None) -> None:
        decision = self.controller.step(score)
        self._decisions += 1
        if decision is Decision.COMPLETE and control is not None:
            control.should_training_stop = True
        if self.metric in entry:  # the Trainer logged this evaluation already: PB's state beside it
            entry.update(_pb_state(self.controller.pm, decision))

    def _refuse_missing_metric(self, metrics: dict, loss_only: bool = False) -> None:
        # (the Trainer's bookkeeping entries are no metrics to follow)
        seen = sorted(k for k in set(metrics).union(*self._other_datasets.values())
                      if k != "epoch" and not k.endswith(("_runtime", "_samples_per_second", "_steps_per_second")))
        self._other_datasets = {}
        given = "metric_for_best_model=" if self._from_args else "metric="
        if not seen:  # (the Trainer reports no loss where no batch was evaluated)
            raise TrainingError(f"PBCallback: the evaluation gave no metrics, so no {self.metric!r}: it evaluated no "
                                "batch (an eval set smaller than per_device_eval_batch_size with "
                                "dataloader_drop_last=True, or an empty one): lower per_device_eval_batch_size or "
                                "unset dataloader_drop_last")
        why = (" (prediction_loss_only=True: the Trainer computes the loss alone; unset it for compute_metrics' "
               "metrics)" if loss_only and not self.metric.endswith("_loss") else "")
        raise TrainingError(f"PBCallback: metric {self.metric!r} is not among the evaluation metrics "
                            f"({', '.join(seen) or 'none'}){why}: pass {given} one of them")

    def _refuse_a_round_without_metric(self) -> None:
        """After an evaluation round (the Trainer saves, trains on or ends next): datasets were
        evaluated and none had the metric."""
        if self._training and self._other_datasets:
            self._refuse_missing_metric({})
        self._round_has_metric = self._round_due = False

    def on_step_end(self, args, state, control, **kwargs):
        # (the Trainer's DefaultFlowCallback, always the first callback, has decided by now)
        self._hold_finished_run(control)
        self._round_due = self._round_due or control.should_evaluate
        if not control.should_evaluate:  # (else on_evaluate saves, after its decision)
            self._save_before_the_trainer(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._hold_finished_run(control)
        self._round_due = self._round_due or control.should_evaluate
        if not control.should_evaluate:
            self._save_before_the_trainer(args, state, control)

    def _save_before_the_trainer(self, args, state, control) -> None:
        """Write PB's file for the checkpoint the Trainer saves next before it does, beside its folder
        (`_pending_file`), and move it in at on_save: the Trainer deletes its older checkpoints
        (save_total_limit) before on_save, so a run stopped between the two left no checkpoint to
        resume (a resume finds the pending file of its step). Not in the folder itself: a run stopped
        before the Trainer's files left a folder the Trainer takes for its latest checkpoint. Not for
        save_strategy='best', which decides after the evaluation whether it saves; a save the Trainer
        then skips is undone (`_drop_unsaved`)."""
        if not (self._training and control.should_save and args.save_strategy != "best"
                and state.is_world_process_zero and self._presaved is None):
            return
        os.makedirs(args.output_dir, exist_ok=True)
        path = _pending_file(args.output_dir, state.global_step)
        save(self.controller.pm, path, controller=self.controller, extra={"metric": self.metric})
        self._presaved = (state.global_step, path)

    def _drop_unsaved(self) -> None:
        """PB's pending file of a save that the Trainer did not make (a callback of the user's cleared
        control.should_save): removed."""
        if self._presaved is None:
            return
        _, path = self._presaved
        self._presaved = None
        if os.path.isfile(path):
            os.remove(path)

    def _hold_finished_run(self, control) -> None:
        """A train() of a finished run: the one step the Trainer takes before it stops is undone, and
        neither evaluated nor saved (its checkpoint would be the latest, holding no best weights)."""
        if self._training and self._resumed_complete:
            control.should_evaluate = control.should_save = False
            self.controller.restore_best()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._training:
            self._applied_lr = self.controller.applied_lr(self.controller.optimizer.param_groups[0]["lr"])

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The Trainer logs its scheduler's last rate, which lags PB's rescale for one step when a
        # phase begins or ends, and which a dendrite phase's step caps at candidate_lr (a warm
        # restart can lift the schedule above it): log the rate the last step applied.
        if not self._training or not logs or "learning_rate" not in logs or self._applied_lr is None:
            return
        scheduled = logs["learning_rate"]
        if self._applied_lr != scheduled:
            entry = state.log_history[-1] if state.log_history else {}
            if entry.get("learning_rate") == scheduled:
                entry["learning_rate"] = self._applied_lr
            logs["learning_rate"] = self._applied_lr

    def on_step_begin(self, args, state, control, **kwargs):
        self._drop_unsaved()
        self._before_first_step = False
        self._refuse_a_round_without_metric()

    def on_save(self, args, state, control, model=None, **kwargs):
        self._refuse_a_round_without_metric()
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        presaved, self._presaved = self._presaved, None
        if not (self.controller is not None and os.path.isdir(folder) and state.is_world_process_zero):
            return
        if presaved is not None and presaved[0] == state.global_step and os.path.isfile(presaved[1]):
            os.replace(presaved[1], os.path.join(folder, CHECKPOINT_NAME))  # (written before the Trainer's files)
        else:
            save(self.controller.pm, os.path.join(folder, CHECKPOINT_NAME), controller=self.controller,
                 extra={"metric": self.metric})
        for name in os.listdir(args.output_dir):  # (a stopped run's, which a resume has read since)
            if _PENDING.fullmatch(name):
                os.remove(os.path.join(args.output_dir, name))

    def on_train_end(self, args, state, control, **kwargs):
        if not self._training:
            return
        self._drop_unsaved()
        self._refuse_a_round_without_metric()
        self._training = False
        ctl = self.controller
        if self._budget_end is not None and not ctl.done:  # (a better last score is kept as the best)
            self._step(*self._budget_end)
        self._budget_end = None
        if not self._decisions and not self._resumed_complete and state.global_step > self._first_step:
            warn_at_user(f"PBCallback: {state.global_step - self._first_step} training step(s) and no evaluation of "
                         "the Trainer's own, so PB made no decision: evaluate within the run (eval_strategy, "
                         "eval_steps); a trainer.evaluate() of a callback's, where the Trainer would evaluate, resets "
                         "control.should_evaluate and takes the Trainer's place only with the default "
                         "metric_key_prefix")
        if not ctl.done:  # the Trainer stopped first
            budget = state.max_steps > 0 and state.global_step >= state.max_steps
            ctl.finish("the Trainer's step or epoch budget ran out" if budget else
                       "the Trainer stopped (control.should_training_stop: another callback)")
        elif self._resumed_complete:
            ctl.restore_best()
        # The log's last PB state is the model the user holds now (a finish rewinds to the best model)
        final = _pb_state(ctl.pm, Decision.COMPLETE)
        if state.log_history and "train_runtime" in state.log_history[-1]:
            state.log_history[-1].update(final)
        else:
            state.log_history.append({**final, "epoch": state.epoch, "step": state.global_step})
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            save(ctl.pm, os.path.join(args.output_dir, CHECKPOINT_NAME), controller=ctl, extra={"metric": self.metric})


def _budget_end_off_grid(args, state) -> bool:
    """Whether the Trainer evaluates now only because its step budget ran out between two of its
    evaluations: after a step off the eval_steps grid, or at the end of a part epoch."""
    if not (state.max_steps > 0 and state.global_step >= state.max_steps):
        return False
    if args.eval_strategy == "steps":
        return bool(state.eval_steps) and state.global_step % state.eval_steps != 0
    return args.eval_strategy == "epoch" and state.epoch is not None and state.epoch != int(state.epoch)


def _pb_state(pm: PerforatedModel, decision: Decision) -> dict:
    """PB's state for a log_history entry (trainer_state.json)."""
    return {"pb_dendrites": pm.dendrites, "pb_dendrite_phase": int(pm.phase == "dendrite"),
            "pb_parameters": pm.num_parameters(), "pb_decision": decision.value}


def _direction(metric: str, greater_is_better: Optional[bool]) -> tuple[str, bool]:
    """("eval_<name>", whether higher is better: given, else not for names ending in "loss")."""
    metric = metric if metric.startswith("eval_") else f"eval_{metric}"
    return metric, bool(not metric.endswith("loss") if greater_is_better is None else greater_is_better)


_PENDING = re.compile(r"\.pbp_fx-checkpoint-\d+\.safetensors")


def _pending_file(output_dir: str, step: int) -> str:
    """Where PB's file of checkpoint-<step> waits for the Trainer's folder (`_save_before_the_trainer`)."""
    return os.path.join(output_dir, f".pbp_fx-checkpoint-{step}.safetensors")


# (the Trainer does not tell callbacks the folder it resumes from: the user names it)
_LOAD_FIRST = (f"pbp_fx.load(os.path.join(FOLDER, '{CHECKPOINT_NAME}'), model) before "
               "trainer.train(resume_from_checkpoint=FOLDER), FOLDER being the checkpoint folder resumed from")


def _resumed_file(args, state, pm) -> str:
    """The PBCallback file of the checkpoint a Trainer resumes at state.global_step: the one
    pbp_fx.load read into the model, else `output_dir/checkpoint-<step>`'s, whichever holds the
    weights the Trainer just loaded (it does not tell callbacks which folder it resumed from,
    which may be another run's, renamed, or beside an older run's folder of the same step)."""
    folder = f"checkpoint-{state.global_step}"
    loaded = getattr(pm, "loaded_from", None)  # (a model pickled before it existed has none)
    # (the pending file: a run stopped after the Trainer's save, before on_save moved it in)
    found = [p for p in (loaded, os.path.join(args.output_dir, folder, CHECKPOINT_NAME),
                         _pending_file(args.output_dir, state.global_step))
             if p is not None and os.path.isfile(p)]
    for path in dict.fromkeys(found):
        if holds_weights_of(path, pm):
            return path
    if found:
        raise TrainingError(f"PBCallback: {found[-1]} holds other weights than the checkpoint the Trainer resumed "
                            f"from at step {state.global_step} (another run's): load the resumed checkpoint's own "
                            f"file first: {_LOAD_FIRST}")
    own = os.path.join(args.output_dir, folder)
    if loaded is None and os.path.isdir(own):
        raise TrainingError(f"PBCallback: resuming at step {state.global_step}: {own} holds no {CHECKPOINT_NAME} (it was "
                            "saved without PBCallback, or the run stopped while a save_strategy='best' save was "
                            f"written): resume from a checkpoint folder that holds one, after {_LOAD_FIRST}")
    raise TrainingError(f"PBCallback: resuming at step {state.global_step} needs the {CHECKPOINT_NAME} of the "
                        f"checkpoint resumed from (PBCallback writes it at every save), loaded into the model first: "
                        f"{_LOAD_FIRST}")


def _refuse_misplaced_optimizer_state(optimizer, trained_before: bool) -> None:
    """A resumed optimizer built over the model before it had the checkpoint's structure (the user's
    own, or the one a Trainer kept from an earlier train()): the Trainer loads the saved state by
    position, so a dendrite phase's candidate state lands on the neurons' parameters when the
    counts happen to match."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and not _state_fits(value, p):
                    restored = (f"PBCallback: the Trainer restored optimizer state of shape {tuple(value.shape)} "
                                f"onto a parameter of shape {tuple(p.shape)}: ")
                    load_first = (f"load the checkpoint first (pbp_fx.load('<checkpoint folder>/{CHECKPOINT_NAME}', "
                                  "model)), then build the optimizer over model.trainable_parameters()")
                    if trained_before:  # (the Trainer's own, or the user's given to a new Trainer: both read so)
                        raise TrainingError(
                            restored + "the optimizer is the one an earlier train() of this run used, built over "
                            "that run's model, not the checkpoint's structure (a Trainer keeps the optimizer it "
                            "built): resume with a new Trainer, and if you give it your own optimizer, " + load_first)
                    raise TrainingError(
                        restored + "the optimizer was built before the model had the checkpoint's structure; "
                        + load_first)


def _state_fits(value: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether an optimizer state tensor can be `p`'s: of its shape, or a reduced statistic of it:
    Adafactor's factored moments (p's shape with a dim dropped or set to 1) or a quantized optimizer's
    per-block scales (1-D, fewer elements)."""
    if value.shape == p.shape:
        return True
    if value.numel() >= p.numel():
        return False
    if value.dim() == 1:
        return True
    dims = iter(p.shape)
    return all(any(d == e for e in dims) for d in value.shape if d != 1)  # (a subsequence of p's dims)


def _check_rule(rule: Callable[[str], int], model, optimizer) -> None:
    """group_of_name must give each of the optimizer's parameters the group it is in: else it is not the
    rule the optimizer was built by, and its rebuild on resume would not fit either."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = len(optimizer.param_groups)
    for path, module in model.named_modules():  # (PB's new parameters, by their names, before any exists)
        if isinstance(module, Site):
            for part in ("candidates.copies.weight", "dendrites.weight", "out_weight"):
                _group_index(rule, f"{path}.{part}", groups)
    for index, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            name = names.get(id(p))
            given = None if name is None else _group_index(rule, name, groups)
            if given is not None and given != index:
                raise TrainingError(f"PBCallback(group_of_name=...) gives {name!r} group {given}, but the optimizer "
                                    f"holds it in group {index}: give the rule the optimizer's groups were built by")


def _group_index(rule: Callable[[str], int], name: str, groups: int) -> int:
    """rule(name), checked: an index of one of the optimizer's `groups` groups."""
    try:
        index = rule(name)
    except Exception as exc:  # noqa: BLE001 - the user's rule on a name it does not know (PB's pbp_sites.*)
        raise TrainingError(f"PBCallback(group_of_name=...) raised {type(exc).__name__} for {name!r}: the rule must "
                            "give every parameter a group, PB's new ones (named ...pbp_sites.<site>...) too") from exc
    checked = group_index(index, groups)
    if checked is None:
        raise TrainingError(f"PBCallback(group_of_name=...) gave {index!r} for {name!r}: it must return the index of "
                            f"one of the optimizer's {groups} parameter groups (0 to {groups - 1})")
    return checked


def _grouped_by_trainer(model, optimizer) -> bool:
    """Whether the optimizer's groups are those Trainer.create_optimizer makes (`_trainer_groups`):
    an optimizer passed in `optimizers=` may have two groups of its own (a head at another lr)."""
    if len(optimizer.param_groups) != 2:
        return False
    rule, names = _trainer_groups(model), {id(p): n for n, p in model.named_parameters()}
    return all(id(p) in names and rule[names[id(p)]] == i
               for i, g in enumerate(optimizer.param_groups) for p in g["params"])


def _trainer_groups(model) -> dict:
    """The groups Trainer.create_optimizer gives parameters by name: 0 with weight decay, 1 without.

    New parameters join the same groups, so that a resumed Trainer, which rebuilds its optimizer
    from names before loading the saved state, finds groups of the saved sizes."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))  # uses the model only, no Trainer state
    return {name: 0 if name in decay else 1 for name, _ in model.named_parameters()}


def _is_early_stopping(name: str, saved) -> bool:
    """Whether a Trainer's stateful callback is an EarlyStoppingCallback, subclasses included: its
    saved state holds early_stopping_patience (the state stores class names only)."""
    states = saved if isinstance(saved, list) else [saved]
    return "EarlyStopping" in name or any(
        isinstance(st, dict) and "early_stopping_patience" in (st.get("args") or {}) for st in states)
