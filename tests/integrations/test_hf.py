"""pbp_fx.integrations.hf.PBCallback in a real transformers.Trainer (tiny random BERT, CPU, offline)."""
import copy
import os
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from safetensors.torch import load_file  # noqa: E402
from transformers import (EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments,  # noqa: E402
                          default_data_collator)

import pbp_fx  # noqa: E402
from pbp_fx.config import ConfigError  # noqa: E402
from pbp_fx.errors import TrainingError  # noqa: E402
from pbp_fx.integrations.hf import CHECKPOINT_NAME, PBCallback  # noqa: E402

from synthetic import parity_tokens, tiny_bert  # noqa: E402

# Short phases (at most 3 neuron-phase epochs): one dendrite round, then a neuron phase.
QUICK = pbp_fx.PBConfig(patience=2, neuron_epochs=3, max_dendrites=1, dendrite_patience=2, max_dendrite_epochs=3, pool=2,
                        retries=0)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), num_train_epochs=40, per_device_train_batch_size=32,
                per_device_eval_batch_size=128, learning_rate=3e-3, lr_scheduler_type="linear",
                eval_strategy="epoch", save_strategy="no", logging_strategy="epoch", report_to=[],
                use_cpu=True, disable_tqdm=True, seed=0)
    return TrainingArguments(**{**base, **kw})


@pytest.fixture(scope="module")
def perforated_bert():
    """A fresh perforated tiny BERT per call (traced once: torch.export takes seconds)."""
    template = pbp_fx.perforate(tiny_bert(), example_kwargs=default_data_collator(parity_tokens(8, 0)))
    return lambda: copy.deepcopy(template)


def _trainer(tmp_path, callback, model, train_size=128, **kw):
    train, val = parity_tokens(train_size, 0), parity_tokens(64, 1)
    return Trainer(model=model, args=_args(tmp_path, **kw), train_dataset=train, eval_dataset=val,
                   callbacks=[callback]), val


def _notes(ctl) -> list[str]:
    return [h["note"] for h in ctl.history]


@pytest.mark.parametrize("where", ["callback", "trainer"])
def test_greater_is_better_on_a_loss_is_warned_of(tmp_path, perforated_bert, where):
    """PBCallback(greater_is_better=True) on the default eval_loss kept the highest loss as its best, silently
    (Lightning's mode='max' on a loss warns; a reviewer)."""
    cb = PBCallback(QUICK, greater_is_better=True) if where == "callback" else PBCallback(QUICK)
    extra = {} if where == "callback" else {"metric_for_best_model": "eval_loss", "greater_is_better": True}
    trainer, _ = _trainer(tmp_path, cb, perforated_bert(), max_steps=1, **extra)
    with pytest.warns(pbp_fx.PBWarning, match=r"PBCallback keeps the highest eval_loss, which reads as lower-is-better, as its best"):
        trainer.train()


def test_the_callbacks_config_is_checked_when_built_and_its_direction_against_the_callbacks(tmp_path, perforated_bert):
    """PBCallback("patience=2") was refused only in train(), naming PhaseController; an explicit
    PBConfig(maximize=False) was replaced by the callback's direction without a word (a reviewer)."""
    with pytest.raises(ConfigError, match="PBCallback's config must be a PBConfig .or a dict of its settings., got str"):
        PBCallback("patience=2")
    # greater_is_better="false" read as True: PB kept the highest error as its best (a reviewer)
    with pytest.raises(ConfigError, match=r"^PBCallback\(greater_is_better='false'\): give True \(higher eval_wer is "
                                          r"better\), False or None"):
        PBCallback(metric="eval_wer", greater_is_better="false")
    with pytest.raises(ConfigError, match=r"^PBCallback\(metric=3\): give the name of a metric"):
        PBCallback(metric=3)
    trainer, _ = _trainer(tmp_path, PBCallback(QUICK.replace(maximize=False), metric="err"), perforated_bert(),
                          max_steps=1)
    with pytest.raises(ConfigError, match="config has maximize=False, but it ranks eval_err higher-is-better .the "
                                          "default for a name that does not end in 'loss'.: pass greater_is_better=False"):
        trainer.train()
    assert trainer.state.global_step == 0
    # a name that reads as lower-is-better, ranked the other way by default, is warned of
    trainer, _ = _trainer(tmp_path, PBCallback(QUICK, metric="err"), perforated_bert(), max_steps=1)
    with pytest.warns(pbp_fx.PBWarning, match="PBCallback keeps the highest eval_err, which reads as lower-is-better"):
        with pytest.raises(TrainingError, match="'eval_err' is not among the evaluation metrics"):
            trainer.train()


def test_trainer_runs_a_dendrite_phase_installs_and_stops_with_the_best_model(tmp_path, perforated_bert):
    cb = PBCallback(QUICK)
    trainer, val = _trainer(tmp_path, cb, perforated_bert())
    # Default TrainingArguments: the Trainer reads BERT's own signature from the perforated model.
    assert trainer.label_names == ["labels"] and trainer.args.remove_unused_columns
    trainer.train()
    ctl, pm = cb.controller, trainer.model
    notes = _notes(ctl)
    assert any("dendrite phase started" in n for n in notes), notes
    assert any("installed dendrite 1" in n for n in notes), notes
    assert ctl.done and trainer.state.epoch < 40  # stopped by PB, not by the epoch budget
    # The Trainer's own optimizer was adopted and serves the final parameter set.
    inner = trainer.optimizer.optimizer
    assert inner is ctl.optimizer
    held = {id(p) for g in inner.param_groups for p in g["params"]}
    assert held == {id(p) for p in pm.trainable_parameters()}
    assert len(inner.param_groups) == 2  # the Trainer's decay / no-decay groups survive restructures
    # The linear schedule kept stepping: the candidate rate in the dendrite phase, decaying neuron rates.
    lrs = [(r["epoch"], r["learning_rate"]) for r in trainer.state.log_history if "learning_rate" in r]
    dendrite_epochs = {h["epoch"] for h in ctl.history if h["phase"] == "dendrite"}
    in_dendrite = [lr for e, lr in lrs if round(e) in dendrite_epochs]
    assert in_dendrite and min(in_dendrite) > 3e-3 and max(in_dendrite) <= QUICK.candidate_lr
    neuron = [lr for e, lr in lrs if round(e) not in dendrite_epochs]
    assert neuron == sorted(neuron, reverse=True) and neuron[-1] < 3e-3
    # PB's state beside each evaluation in the Trainer's log (trainer_state.json)
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    assert [r["pb_decision"] for r in evals] == [h["decision"] for h in ctl.history]
    assert {r["pb_dendrite_phase"] for r in evals} == {0, 1} and evals[-1]["pb_parameters"] == pm.num_parameters()
    # The best-validation model is loaded.
    assert trainer.evaluate()["eval_loss"] == pytest.approx(ctl.best_score, abs=1e-6)
    # Checkpoints: pbp_fx.load reads the callback's; the Trainer's state dict loads onto a perforated copy.
    batch = default_data_collator(val[:16])
    pm.eval()
    with torch.no_grad():
        want = pm(**batch).logits
    loaded = pbp_fx.load(os.path.join(tmp_path, CHECKPOINT_NAME), perforated_bert()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, want)
    trainer.save_model(str(tmp_path / "saved"))  # the Trainer's own file: a state dict with every dendrite
    fresh = perforated_bert().eval()
    fresh.load_state_dict(load_file(str(tmp_path / "saved" / "model.safetensors")))
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, want)
    # train() again: PB has finished, so it stops at once with the best model (it trained on without PB
    # for the whole budget and saved the worse model over the best).
    entries = len(ctl.history)
    with pytest.warns(UserWarning, match=r"this PB run is complete \(.*\), so this train\(\) stops after one step"):
        trainer.train()
    assert trainer.state.global_step <= 1 and len(ctl.history) == entries
    assert trainer.evaluate()["eval_loss"] == pytest.approx(ctl.best_score, abs=1e-6)
    again = pbp_fx.load(os.path.join(tmp_path, CHECKPOINT_NAME), perforated_bert()).eval()
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, want)


def test_an_evaluation_before_training_is_not_an_epoch_of_the_schedule(tmp_path, perforated_bert):
    """eval_on_start=True: the evaluation before the first step was counted as a neuron epoch, in a
    fresh run and in a resumed one (where global_step is not 0)."""
    cb = PBCallback(QUICK)
    trainer, _ = _trainer(tmp_path, cb, perforated_bert(), num_train_epochs=3, eval_on_start=True,
                          save_strategy="epoch")
    trainer.train()
    assert [h["epoch"] for h in cb.controller.history] == [1, 2, 3, 3], _notes(cb.controller)  # (+ the budget's end)
    assert len([r for r in trainer.state.log_history if "eval_loss" in r]) == 4
    folder = tmp_path / "checkpoint-4"  # after epoch 2
    model = pbp_fx.load(str(folder / CHECKPOINT_NAME), perforated_bert())
    resumed = PBCallback(QUICK)
    trainer, _ = _trainer(tmp_path / "resumed", resumed, model, num_train_epochs=3, eval_on_start=True)
    trainer.train(resume_from_checkpoint=str(folder))
    assert [(h["epoch"], h["note"]) for h in resumed.controller.history] == [
        (h["epoch"], h["note"]) for h in cb.controller.history]


@pytest.mark.parametrize("prefix", ["train", "eval_extra"])
def test_an_evaluation_of_the_users_own_under_another_prefix_is_not_the_schedules(tmp_path, perforated_bert, prefix):
    """trainer.evaluate(train, metric_key_prefix="train" or "eval_extra") from a callback, at steps without the
    Trainer's evaluation: it was taken for a dict eval_dataset's round without the metric, and training was refused."""
    from transformers import TrainerCallback

    class TrainSetEvaluation(TrainerCallback):
        trainer = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % 2 == 1:
                self.trainer.evaluate(eval_dataset=parity_tokens(64, 0), metric_key_prefix=prefix)

    own, cb = TrainSetEvaluation(), PBCallback(QUICK)
    trainer, _ = _trainer(tmp_path, cb, perforated_bert(), num_train_epochs=3, eval_strategy="steps", eval_steps=2)
    trainer.add_callback(own)
    own.trainer = trainer
    trainer.train()
    assert trainer.state.global_step == 12
    assert [h["epoch"] for h in cb.controller.history][:6] == [1, 2, 3, 4, 5, 6]  # one per eval_loss evaluation
    assert len([r for r in trainer.state.log_history if f"{prefix}_loss" in r and f"{prefix}_runtime" in r]) >= 6


def test_a_callbacks_evaluation_that_takes_the_trainers_place_is_warned_of(tmp_path, perforated_bert):
    """trainer.evaluate(metric_key_prefix="test") in on_epoch_end, where the Trainer would evaluate:
    it reset control.should_evaluate, the Trainer's evaluations never ran, and PB made no decision
    in the whole run, without a word."""
    from transformers import TrainerCallback

    class TestSetEvaluation(TrainerCallback):
        trainer = None

        def on_epoch_end(self, args, state, control, **kwargs):
            self.trainer.evaluate(eval_dataset=parity_tokens(32, 2), metric_key_prefix="test")

    own, cb = TestSetEvaluation(), PBCallback(QUICK)
    trainer, _ = _trainer(tmp_path, cb, perforated_bert(), num_train_epochs=2)
    trainer.add_callback(own)
    own.trainer = trainer
    with pytest.warns(UserWarning, match=r"PBCallback: 8 training step\(s\) and no evaluation of the Trainer's own, "
                                         r"so PB made no decision: .* resets control.should_evaluate"):
        trainer.train()
    assert _notes(cb.controller) == ["the Trainer's step or epoch budget ran out"]  # (no decision of PB's before)


def test_bf16_on_cpu(tmp_path, perforated_bert):
    cb = PBCallback(QUICK)
    trainer, _ = _trainer(tmp_path, cb, perforated_bert(), bf16=True)
    trainer.train()
    notes = _notes(cb.controller)
    assert any("installed dendrite 1" in n for n in notes), notes
    assert cb.controller.done
    assert all(torch.isfinite(torch.tensor(h["score"])) for h in cb.controller.history)


def test_activation_checkpointing_through_the_trainer(tmp_path, perforated_bert):
    """TrainingArguments(activation_checkpointing=True) calls the perforated model's own method;
    the run matches the same run without checkpointing (same seed, same batches)."""
    runs = {}
    for flag in (True, False):
        cb = PBCallback(QUICK)
        trainer, _ = _trainer(tmp_path / str(flag), cb, perforated_bert(), activation_checkpointing=flag)
        trainer.train()
        assert trainer.model.is_gradient_checkpointing is flag
        runs[flag] = cb.controller.history
    assert any("installed dendrite 1" in h["note"] for h in runs[True])
    assert [h["note"] for h in runs[True]] == [h["note"] for h in runs[False]]
    for a, b in zip(runs[True], runs[False]):
        assert a["score"] == pytest.approx(b["score"], rel=1e-4, abs=1e-6)


def _accuracy(pred):
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


@pytest.mark.parametrize("named_by", ["callback", "metric_for_best_model"])
def test_steps_strategy_gradient_accumulation_and_a_named_metric(tmp_path, perforated_bert, named_by):
    # "eval_accuracy", greater is better: named to the callback, or the Trainer's own setting
    by_args = named_by == "metric_for_best_model"
    cb = PBCallback(QUICK) if by_args else PBCallback(QUICK, metric="accuracy")
    more = {"metric_for_best_model": "accuracy"} if by_args else {}
    trainer, _ = _trainer(tmp_path, cb, perforated_bert(), eval_strategy="steps", eval_steps=3, logging_strategy="steps",
                          logging_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=16,
                          num_train_epochs=20, **more)
    trainer.compute_metrics = _accuracy
    trainer.train()
    ctl = cb.controller
    assert ctl.config.maximize and cb.metric == "eval_accuracy"
    evaluations = [r for r in trainer.state.log_history if "eval_accuracy" in r]
    assert len(ctl.history) == len(evaluations)  # one schedule step per evaluation
    assert any("installed dendrite 1" in n for n in _notes(ctl))


def test_refusals_are_one_line_pb_errors(tmp_path, perforated_bert):
    trainer, _ = _trainer(tmp_path, PBCallback(QUICK), perforated_bert(), load_best_model_at_end=True, save_strategy="epoch",
                          metric_for_best_model="eval_loss")
    with pytest.raises(TrainingError, match="load_best_model_at_end=False"):
        trainer.train()
    trainer, _ = _trainer(tmp_path, PBCallback(QUICK, metric="f1"), perforated_bert())
    with pytest.raises(TrainingError, match="'eval_f1' is not among the evaluation metrics .*eval_loss.*pass metric=") \
            as refused:
        trainer.train()
    assert "runtime" not in str(refused.value) and "epoch," not in str(refused.value)  # (no bookkeeping entries)
    assert "prediction_loss_only" not in str(refused.value)
    trainer, _ = _trainer(tmp_path, PBCallback(QUICK, metric="f1"), perforated_bert(), prediction_loss_only=True)
    with pytest.raises(TrainingError, match=r"\(eval_loss\) \(prediction_loss_only=True: the Trainer computes the "
                                            r"loss alone; unset it"):
        trainer.train()
    # the Trainer's own metric_for_best_model, mistyped: the message names that argument, not metric=
    trainer, _ = _trainer(tmp_path, PBCallback(QUICK), perforated_bert(), metric_for_best_model="acuracy")
    with pytest.raises(TrainingError, match="'eval_acuracy' is not among .*: pass metric_for_best_model= one of them"):
        trainer.train()
    from transformers import Seq2SeqTrainingArguments

    args = Seq2SeqTrainingArguments(**{**_args(tmp_path).to_dict(), "predict_with_generate": True})
    trainer = Trainer(model=perforated_bert(), args=args, train_dataset=parity_tokens(64, 0),
                      eval_dataset=parity_tokens(64, 1), callbacks=[PBCallback(QUICK)])
    with pytest.raises(TrainingError, match="predict_with_generate=True evaluates with model.generate"):
        trainer.train()
    assert trainer.state.global_step == 0
    for second in ("another", "the same"):
        cb = PBCallback(QUICK)
        trainer, _ = _trainer(tmp_path, cb, perforated_bert())
        trainer.add_callback(PBCallback(QUICK) if second == "another" else cb)
        with pytest.raises(TrainingError, match="two PBCallbacks .or one added twice. on one Trainer"):
            trainer.train()
    train = parity_tokens(64, 0)
    plain = Trainer(model=tiny_bert(), args=_args(tmp_path), train_dataset=train, eval_dataset=train,
                    callbacks=[PBCallback(QUICK)])
    with pytest.raises(TrainingError, match="pbp_fx.perforate"):
        plain.train()


class PatientStopper(EarlyStoppingCallback):
    """A subclass: the check matched the class name, so it got past and ended PB in its first dendrite epoch."""


@pytest.mark.parametrize("stopper", [EarlyStoppingCallback, PatientStopper])
def test_early_stopping_callback_is_refused_before_any_step(tmp_path, perforated_bert, stopper):
    # Its patience would run out inside a dendrite phase (the score is constant there), ending the run
    # with the candidates dropped and "the budget ran out" recorded as the reason.
    trainer, _ = _trainer(tmp_path, PBCallback(QUICK), perforated_bert(), metric_for_best_model="eval_loss")
    trainer.add_callback(stopper(early_stopping_patience=2))
    with pytest.raises(TrainingError, match=f"{stopper.__name__} would end the run inside a dendrite phase.*remove it"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_neftune_is_refused_when_the_trainer_is_built(tmp_path, perforated_bert):
    """neftune_noise_alpha crashed train() with an AttributeError (no get_input_embeddings); its hook
    would not run on an exported graph anyway."""
    with pytest.raises(TrainingError, match="PBCallback: neftune_noise_alpha adds noise .*: unset neftune_noise_alpha"):
        _trainer(tmp_path, PBCallback(QUICK), perforated_bert(), neftune_noise_alpha=5.0)


def test_a_checkpoint_ranking_by_another_metric_is_warned_of(tmp_path, perforated_bert):
    # PB rewinds by its own metric; a checkpoint ranked by another holds weights that did not score its label.
    trainer, _ = _trainer(tmp_path, PBCallback(QUICK, metric="eval_loss"), perforated_bert(), num_train_epochs=1,
                          metric_for_best_model="eval_runtime", greater_is_better=False, save_strategy="epoch")
    with pytest.warns(UserWarning, match="follows eval_loss but the Trainer ranks checkpoints by metric_for_best_model") \
            as caught:
        trainer.train()
    assert [w.filename for w in caught if "follows eval_loss" in str(w.message)] == [__file__]  # the user's line



def test_a_metric_the_trainer_ranks_by_takes_the_trainers_direction(tmp_path, perforated_bert):
    # PBCallback(metric=X) beside metric_for_best_model=X followed the name's default direction ("mae":
    # higher is better) against the Trainer's greater_is_better=False, and so kept the worst model.
    cb = PBCallback(QUICK, metric="loss")  # eval_loss, given without its prefix
    trainer, _ = _trainer(tmp_path, cb, perforated_bert(), num_train_epochs=1, metric_for_best_model="eval_loss",
                          greater_is_better=True)
    trainer.train()
    assert cb.maximize and cb.controller.config.maximize
    # Given here, the direction wins (HF fills in greater_is_better by the name when it is not set): the
    # Trainer's checkpoint ranking the other way is warned of, with its fix.
    cb = PBCallback(QUICK, metric="eval_loss", greater_is_better=True)
    trainer, _ = _trainer(tmp_path, cb, perforated_bert(), num_train_epochs=1, metric_for_best_model="loss",
                          save_strategy="epoch")
    with pytest.warns(UserWarning, match=r"PBCallback\(greater_is_better=True\) ranks eval_loss the other way round "
                                         r"from the Trainer, .*set TrainingArguments\(greater_is_better=True\) too"):
        trainer.train()
    assert cb.maximize

# The Trainer saves model.state_dict() with safetensors, which takes tensors only: that holds in
# the dendrite phase too (CandidatePool keeps its batch count as a tensor extra state).
def test_trainer_checkpoints_in_the_dendrite_phase(tmp_path, perforated_bert):
    cb = PBCallback(QUICK)
    trainer, _ = _trainer(tmp_path, cb, perforated_bert(), save_strategy="epoch", num_train_epochs=6)
    trainer.train()
    saved = sorted(d for d in os.listdir(tmp_path) if d.startswith("checkpoint-"))
    assert len(saved) == 6 and all(os.path.isfile(tmp_path / d / CHECKPOINT_NAME) for d in saved)
    phases = {pbp_fx.checkpoint.read_structure(str(tmp_path / d / CHECKPOINT_NAME))["phase"] for d in saved}
    assert phases == {"neuron", "dendrite"}


def _same_run(again: list, history: list) -> None:
    assert [h["note"] for h in again] == [h["note"] for h in history]
    for a, b in zip(again, history):
        assert a["score"] == pytest.approx(b["score"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("phase", ["neuron", "dendrite", "complete"])
def test_resume_from_a_trainer_checkpoint_continues_the_schedule(tmp_path, perforated_bert, phase):
    """trainer.train(resume_from_checkpoint=...) after pbp_fx.load of the callback's file gives the
    uninterrupted run's decisions and scores: from a neuron phase (the Trainer's restored Adam
    state must survive the callback's start; resumed into another output_dir) and from inside a
    dendrite phase (candidates, scaled lr)."""
    whole = PBCallback(QUICK)
    trainer, _ = _trainer(tmp_path / "whole", whole, perforated_bert(), save_strategy="epoch")
    trainer.train()
    history = whole.controller.history
    steps = {int(d.split("-")[1]) for d in os.listdir(tmp_path / "whole") if d.startswith("checkpoint-")}
    if phase == "complete":  # the checkpoint of the evaluation where PB finished
        step = max(steps)
    else:
        epoch = 2 if phase == "neuron" else next(h["epoch"] for h in history if h["phase"] == "dendrite") + 1
        step = sorted(steps)[epoch - 1]
    folder = tmp_path / "whole" / f"checkpoint-{step}"
    if phase != "complete":
        assert pbp_fx.checkpoint.read_structure(str(folder / CHECKPOINT_NAME))["phase"] == phase
    model = pbp_fx.load(str(folder / CHECKPOINT_NAME), perforated_bert())
    resumed = PBCallback(QUICK)
    trainer, _ = _trainer(tmp_path / ("other" if phase == "neuron" else "whole"), resumed, model, save_strategy="epoch")
    trainer.train(resume_from_checkpoint=str(folder))
    _same_run(resumed.controller.history, history)
    if phase == "complete":  # nothing left to train: the best model comes back
        assert resumed.controller.done and trainer.state.global_step <= step + 1
        # and no checkpoint of the one step the Trainer takes before it stops (it was the latest one,
        # holding the weights after that step, not the best: a reviewer)
        assert {d for d in os.listdir(tmp_path / "whole") if d.startswith("checkpoint-")} == \
            {f"checkpoint-{s}" for s in steps}
        assert [r for r in trainer.state.log_history if "eval_loss" in r][-1]["step"] <= step
        best = resumed.controller.best_state
        assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items() if k in best)
    if phase == "neuron":
        return
    # Without the pbp_fx.load line: the callback gives the model the checkpoint's structure when
    # the Trainer loads its state dict (the Trainer refused a dendrite phase's optimizer state).
    plain = PBCallback(QUICK)
    trainer, _ = _trainer(tmp_path / "whole", plain, perforated_bert(), save_strategy="epoch")
    trainer.train(resume_from_checkpoint=str(folder))
    _same_run(plain.controller.history, history)
    # A model without the checkpoint's structure: one line naming the fix (the Trainer itself
    # refuses first when its optimizer groups differ in size).
    with pytest.raises(pbp_fx.CheckpointError, match=r"pbp_fx.load\(path, model\)") as err:
        pbp_fx.checkpoint.load_controller(str(folder / CHECKPOINT_NAME), pbp_fx.PhaseController(perforated_bert()))
    assert "\n" not in str(err.value)


def test_a_resume_that_follows_another_metric_is_refused(tmp_path, perforated_bert):
    """The saved best score and patience were of eval_loss; a resume following another metric compared that
    metric's values with them, without a word."""
    trainer, _ = _trainer(tmp_path, PBCallback(QUICK), perforated_bert(), save_strategy="epoch", num_train_epochs=1)
    trainer.train()
    folder = next(str(tmp_path / d) for d in os.listdir(tmp_path) if d.startswith("checkpoint-"))
    trainer, _ = _trainer(tmp_path, PBCallback(QUICK, metric="eval_accuracy", greater_is_better=True),
                          perforated_bert(), save_strategy="epoch", num_train_epochs=2)
    with pytest.raises(TrainingError, match=r"the checkpoint's PB run followed 'eval_loss', but this PBCallback "
                                            r"follows 'eval_accuracy'.*follow it again \(PBCallback\(metric=...\) or metric_for_best_model\) to "
                                            r"resume it, or start anew"):
        trainer.train(resume_from_checkpoint=folder)


def test_a_head_outside_the_perforated_encoder_is_rewound_with_it_and_resumed(tmp_path):
    """Only model.bert perforated: the classifier is rewound with the encoder (it kept its latest
    weights: the model train() left scored 0.766 where PB's best was 0.693), also after a resume."""
    from synthetic import parity_tokens, tiny_bert
    from transformers import default_data_collator

    def headed():
        model = tiny_bert()
        example = {k: v for k, v in default_data_collator(parity_tokens(8, 0)).items() if k != "labels"}
        model.bert = pbp_fx.perforate(model.bert, example_kwargs=example)
        return model

    kw = dict(num_train_epochs=12, learning_rate=2e-2, lr_scheduler_type="constant", save_strategy="epoch")
    whole = PBCallback(QUICK)
    trainer, _ = _trainer(tmp_path / "whole", whole, headed(), **kw)
    trainer.train()
    assert whole.controller.best_outside and "classifier.weight" in whole.controller.best_outside
    assert trainer.evaluate()["eval_loss"] == pytest.approx(whole.controller.best_score, abs=1e-6)
    dendrite = next(h["epoch"] for h in whole.controller.history if h["phase"] == "dendrite")
    folder = tmp_path / "whole" / f"checkpoint-{4 * (dendrite + 1)}"  # (128 samples, batch 32: 4 steps an epoch)
    resumed = PBCallback(QUICK)
    trainer, _ = _trainer(tmp_path / "whole", resumed, headed(), **kw)
    trainer.train(resume_from_checkpoint=str(folder))
    _same_run(resumed.controller.history, whole.controller.history)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(whole.controller.best_score, abs=1e-6)


class _TiedClassifier(torch.nn.Module):
    """Embedding and output layer share one matrix (as GPT-2's wte and lm_head do)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(8, 16)
        self.fc = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 8, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.out(torch.relu(self.fc(self.emb(input_ids).mean(1))))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def test_trainer_saves_a_model_with_tied_weights(tmp_path):
    """The Trainer writes a model that is not a PreTrainedModel with safetensors' save_file, which
    refuses shared storage: the tied matrix's second name comes as a copy and loads back tied."""
    torch.manual_seed(0)
    batch = default_data_collator(parity_tokens(8, 0))
    pm = pbp_fx.perforate(_TiedClassifier(), example_kwargs=batch)
    trainer, _ = _trainer(tmp_path, PBCallback(QUICK), pm, save_strategy="epoch", num_train_epochs=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    again = pbp_fx.perforate(_TiedClassifier(), example_kwargs=batch)
    again.load_state_dict(load_file(str(tmp_path / "final" / "model.safetensors")))
    gm = again.graph_module
    assert gm.out.weight is gm.emb.weight
    pm.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(again(**batch)["logits"], pm(**batch)["logits"])


def test_trainer_trains_a_causal_lm(tmp_path):
    """GPT-2 with labels: the Trainer would pass its loss keyword num_items_in_batch, which the
    traced graph cannot take; the model says it does not accept it (accepts_loss_kwargs)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=20, n_positions=16, use_cache=False))
    ids = torch.randint(0, 20, (64, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": i, "labels": i} for i in ids]
    pm = pbp_fx.perforate(model, example_kwargs=default_data_collator(data[:4]))
    assert pm.accepts_loss_kwargs is False
    cb = PBCallback(QUICK)
    trainer = Trainer(model=pm, args=_args(tmp_path, num_train_epochs=8, per_device_train_batch_size=16,
                                           gradient_accumulation_steps=2),
                      train_dataset=data, eval_dataset=data[:16], callbacks=[cb])
    # (the Trainer then averages micro-batch means, where GPT-2 divides by the window's token count)
    with pytest.warns(UserWarning, match="gradient_accumulation_steps=2: the perforated model was traced without "
                                         "the Trainer's num_items_in_batch"):
        trainer.train()
    assert {h["phase"] for h in cb.controller.history} == {"neuron", "dendrite"}


@pytest.mark.parametrize("count", [28, 28.0])
def test_a_causal_lm_traced_with_the_loss_keyword_takes_the_trainers_count(tmp_path, count):
    """The advice 'example_kwargs holding num_items_in_batch: torch.tensor(<count>)' with an int
    count: this Trainer passes the count divided by its parallel sizes, a float, and torch.export's
    graph failed with 'Tensor dtype mismatch! Expected: Long, Got: float'."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=20, n_positions=16, use_cache=False))
    ids = torch.randint(0, 20, (32, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": i, "labels": i} for i in ids]
    batch = default_data_collator(data[:4])
    pm = pbp_fx.perforate(model, example_kwargs={**batch, "num_items_in_batch": torch.tensor(count)})
    assert pm.accepts_loss_kwargs
    model.eval(), pm.eval()
    for given in (torch.tensor(56), torch.tensor(56.0)):  # the original's loss with either dtype
        with torch.no_grad():
            want = model(**batch, num_items_in_batch=given).loss
            assert torch.allclose(pm(**batch, num_items_in_batch=given)["loss"], want, rtol=1e-5, atol=1e-6)
    if isinstance(count, int):  # a fractional count (parallel sizes > 1) was truncated to the graph's int64
        with pytest.raises(pbp_fx.CallError, match=r"num_items_in_batch=2.5 is fractional .* torch.tensor\(float"):
            pm(**batch, num_items_in_batch=torch.tensor(2.5))
    cb = PBCallback(QUICK)
    trainer = Trainer(model=pm, args=_args(tmp_path, num_train_epochs=2, per_device_train_batch_size=8,
                                           gradient_accumulation_steps=2),
                      train_dataset=data, eval_dataset=data[:8], callbacks=[cb])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*traced without the Trainer's num_items_in_batch")
        trainer.train()
    assert trainer.state.global_step == 4 and {h["epoch"] for h in cb.controller.history} == {1, 2}


def test_a_two_group_optimizer_of_the_users_own_keeps_its_groups_for_new_parameters():
    """Only the Trainer's own decay / no-decay split places new parameters by the Trainer's naming
    rule; an optimizer passed in `optimizers=` with two groups of its own (a head at 10x lr) does not."""
    from pbp_fx.integrations.hf import _grouped_by_trainer, _trainer_groups

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    pm = pbp_fx.perforate(model, (torch.randn(2, 4),))
    rule = _trainer_groups(pm)
    named = list(pm.named_parameters())
    trainers = torch.optim.AdamW([{"params": [p for n, p in named if rule[n] == 0], "weight_decay": 0.01},
                                  {"params": [p for n, p in named if rule[n] == 1], "weight_decay": 0.0}])
    head = [p for n, p in named if "3" in n]
    own = torch.optim.AdamW([{"params": [p for n, p in named if "3" not in n], "lr": 1e-3},
                             {"params": head, "lr": 1e-2}])
    assert _grouped_by_trainer(pm, trainers) and not _grouped_by_trainer(pm, own)


def test_a_dict_of_eval_datasets_follows_the_named_datasets_metric(tmp_path, perforated_bert):
    """eval_dataset={"a": ..., "b": ...}: the Trainer evaluates each with its own prefix; PB steps
    once per round on eval_a_loss, and a metric no dataset has is refused naming all of them."""
    train, val = parity_tokens(64, 0), parity_tokens(32, 1)

    def trainer(metric, epochs, **kw):
        cb = PBCallback(QUICK, metric=metric)
        return cb, Trainer(model=perforated_bert(), args=_args(tmp_path, num_train_epochs=epochs, **kw),
                           train_dataset=train, eval_dataset={"a": val, "b": parity_tokens(32, 2)}, callbacks=[cb])

    cb, t = trainer("a_loss", 3)
    t.train()
    assert len(cb.controller.history) >= 3  # one step per epoch: the "b" evaluations are skipped
    # Refused right after the first round: before the next step, at the save, or at the end of a one-epoch run.
    for epochs, save in ((3, "no"), (3, "epoch"), (1, "no")):
        out = tmp_path / f"{epochs}_{save}"
        cb, t = trainer("c_loss", epochs, save_strategy=save, output_dir=str(out))
        with pytest.raises(TrainingError, match="metric 'eval_c_loss' is not among .*eval_a_loss.*eval_b_loss"):
            t.train()
        assert t.state.global_step == 2  # 64 samples, batches of 32: one epoch
        # (the Trainer writes its own checkpoint folder before it calls on_save)
        assert not [f for _, _, files in os.walk(out) for f in files if f == CHECKPOINT_NAME]


def test_label_smoothing_trains_a_model_perforated_without_labels(tmp_path):
    """The Trainer reads model.config and, smoothing labels, calls the model without them."""
    bert = tiny_bert()
    batch = default_data_collator(parity_tokens(8, 0))
    batch.pop("labels")
    pm = pbp_fx.perforate(bert, example_kwargs=batch)
    assert pm.config.to_dict() == bert.config.to_dict()
    cb = PBCallback(QUICK)
    trainer = Trainer(model=pm, args=_args(tmp_path, num_train_epochs=2, label_smoothing_factor=0.1),
                      train_dataset=parity_tokens(64, 0), eval_dataset=parity_tokens(32, 1), callbacks=[cb])
    trainer.train()
    assert len(cb.controller.history) >= 2
    with pytest.raises(AttributeError):
        pbp_fx.perforate(torch.nn.Linear(2, 2), (torch.randn(1, 2),)).config


def test_label_smoothing_shifts_a_perforated_causal_lms_labels_as_the_originals(tmp_path):
    """Trainer.compute_loss shifts the labels for label smoothing only when the model's _get_name() is a causal LM
    class: for "PerforatedModel" it smoothed the unshifted loss (2.61 against the original's 2.78), and PB picked
    its best model on it (a reviewer)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=16, n_positions=16, use_cache=False))
    ids = torch.randint(0, 16, (8, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    pm = pbp_fx.perforate(model, example_kwargs={"input_ids": ids}).eval()
    model.eval()
    assert repr(pm).startswith("PerforatedModel(") and pm._get_name() == "GPT2LMHeadModel"
    args = _args(tmp_path, label_smoothing_factor=0.1, eval_strategy="no")
    with torch.no_grad():
        want = Trainer(model=model, args=args).compute_loss(model, dict(batch))
        got = Trainer(model=pm, args=args).compute_loss(pm, dict(batch))
    torch.testing.assert_close(got, want)


def test_a_question_answering_models_label_names_are_asked_for(tmp_path):
    """transformers' find_labels adds start/end positions by the class's name: none for a perforated
    BertForQuestionAnswering, whose evaluation then reported no loss, and PBCallback blamed an empty
    evaluation set (a reviewer)."""
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=32, max_position_embeddings=16))
    rows = [{"input_ids": torch.randint(2, 8, (8,)), "start_positions": torch.tensor(1),
             "end_positions": torch.tensor(2)} for _ in range(16)]
    pm = pbp_fx.perforate(model, example_kwargs=default_data_collator(rows[:4]))
    trainer = Trainer(model=pm, args=_args(tmp_path, max_steps=1), train_dataset=rows, eval_dataset=rows,
                      callbacks=[PBCallback(QUICK)])
    with pytest.raises(ConfigError, match=r"finds \['start_positions', 'end_positions'\] for "
                                          r"BertForQuestionAnswering but \[\] for the PerforatedModel .*: set "
                                          r"TrainingArguments\(label_names=\['start_positions', 'end_positions'\]\)"):
        trainer.train()
    trainer = Trainer(model=pm, args=_args(tmp_path, max_steps=1, label_names=["start_positions", "end_positions"]),
                      train_dataset=rows, eval_dataset=rows, callbacks=[PBCallback(QUICK)])
    trainer.train()
    assert "eval_loss" in trainer.evaluate()


def test_the_finish_note_says_whether_the_budget_or_another_callback_ended_the_run(tmp_path, perforated_bert):
    class StopAtEpochTwo(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.epoch >= 2

    cb = PBCallback(QUICK)
    trainer, _ = _trainer(tmp_path, cb, perforated_bert())
    trainer.add_callback(StopAtEpochTwo())
    trainer.train()
    assert cb.controller.history[-1]["note"] == "the Trainer stopped (control.should_training_stop: another callback)"
    cb = PBCallback(QUICK)
    trainer, _ = _trainer(tmp_path, cb, perforated_bert(), num_train_epochs=2)
    trainer.train()
    assert cb.controller.history[-1]["note"] == "the Trainer's step or epoch budget ran out"


class _NormedNet(torch.nn.Module):
    """BatchNorm running statistics: held in a dendrite phase, given back at its end."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 2)

    def forward(self, x, labels=None):
        logits = self.fc2(torch.relu(self.norm(self.fc1(x))))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


@pytest.mark.parametrize("optim", [None, "adafactor"])
def test_resume_inside_a_dendrite_phase_without_loading_first_on_a_batchnorm_model(tmp_path, optim):
    """adafactor: its factored moments (a [16] row statistic of a [16, 8] weight) were taken for another
    parameter's state, and every resume was refused. Its run gets its config as a dict, which crashed on
    resume (AttributeError in the structure hook; a reviewer)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 8, generator=g)
    y = ((x[:, 0] * x[:, 1] > 0) ^ (x[:, 2] > 0.5)).long()
    rows = [{"x": a, "labels": b} for a, b in zip(x, y)]

    def run(folder, resume=None):
        torch.manual_seed(0)
        model = pbp_fx.perforate(_NormedNet(), example_kwargs={"x": x[:4], "labels": y[:4]})
        cb = PBCallback(QUICK.to_dict() if optim else QUICK)
        trainer = Trainer(model=model, args=_args(folder, save_strategy="epoch", per_device_train_batch_size=64,
                                                  **({"optim": optim} if optim else {})),
                          train_dataset=rows[:256], eval_dataset=rows[256:], callbacks=[cb])
        trainer.train(resume_from_checkpoint=resume)
        return cb.controller, model

    whole, model = run(tmp_path)
    epoch = next(h["epoch"] for h in whole.history if h["phase"] == "dendrite") + 1
    folder = sorted((d for d in os.listdir(tmp_path) if d.startswith("checkpoint-")), key=lambda d: int(d[11:]))[epoch - 1]
    assert pbp_fx.checkpoint.read_structure(str(tmp_path / folder / CHECKPOINT_NAME))["phase"] == "dendrite"
    resumed, again = run(tmp_path, resume=str(tmp_path / folder))
    _same_run(resumed.history, whole.history)
    for k, v in model.state_dict().items():  # the BatchNorm buffers too
        torch.testing.assert_close(again.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)



class _StopAt(TrainerCallback):
    """Ends the run at `step` in the Trainer's call of `hook`, before the callbacks after it: in on_save
    (where the Trainer has written its checkpoint and deleted the older ones, save_total_limit), or in
    on_evaluate after PBCallback's (a later dataset's evaluation, another callback)."""

    def __init__(self, step, hook):
        self.step = step
        setattr(self, hook, self._stop)

    def _stop(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


class _SkipSaves(TrainerCallback):
    """A user's callback after PBCallback that cancels the Trainer's saves."""

    def on_step_end(self, args, state, control, **kwargs):
        control.should_save = False

    on_epoch_end = on_step_end


@pytest.mark.parametrize("save_steps", [4, 6], ids=["saves at evaluations", "saves between evaluations"])
def test_a_run_stopped_inside_the_trainers_save_resumes_from_its_only_checkpoint(tmp_path, save_steps):
    """save_total_limit=1: the Trainer deleted the older checkpoint before PBCallback's on_save wrote its
    file into the new one, so a run stopped between the two had no checkpoint to resume, and the
    refusal named a file that did not exist (a reviewer)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 8, generator=g)
    y = ((x[:, 0] * x[:, 1] > 0) ^ (x[:, 2] > 0.5)).long()
    rows = [{"x": a, "labels": b} for a, b in zip(x, y)]

    def run(folder, resume=None, before=(), after=()):
        torch.manual_seed(0)
        model = pbp_fx.perforate(_NormedNet(), example_kwargs={"x": x[:4], "labels": y[:4]})
        cb = PBCallback(QUICK)
        trainer = Trainer(model=model, args=_args(folder, max_steps=40, lr_scheduler_type="constant",
                                                  eval_strategy="steps", eval_steps=4, save_strategy="steps",
                                                  save_steps=save_steps, save_total_limit=1,
                                                  per_device_train_batch_size=64),
                          train_dataset=rows[:256], eval_dataset=rows[256:], callbacks=[*before, cb, *after])
        trainer.train(resume_from_checkpoint=resume)
        return cb.controller, model

    whole, model = run(tmp_path / "whole")
    stop = 12 if save_steps == 4 else 18
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", before=[_StopAt(stop, "on_save")])
    assert sorted(d for d in os.listdir(tmp_path / "cut") if d.startswith("checkpoint-")) == [f"checkpoint-{stop}"]
    resumed, again = run(tmp_path / "cut", resume=True)
    _same_run(resumed.history, whole.history)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert not [n for n in os.listdir(tmp_path / "cut") if n.startswith(".pbp_fx")]  # (moved in, or cleared)
    # Stopped after PB's evaluation, before the Trainer's save: no folder of PB's file alone, which the Trainer
    # took for its latest checkpoint and could not resume (a diff reviewer)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "eval", after=[_StopAt(12, "on_evaluate")])
    assert sorted(d for d in os.listdir(tmp_path / "eval") if d.startswith("checkpoint-")) == [
        f"checkpoint-{max(s for s in range(save_steps, 12, save_steps))}"]
    run(tmp_path / "eval", resume=True)
    # PB's file is written for the Trainer's saves only: none where a callback cancels them
    run(tmp_path / "unsaved", after=[_SkipSaves()])
    assert [d for d in os.listdir(tmp_path / "unsaved") if d.startswith(("checkpoint-", ".pbp_fx"))] == []


def test_a_checkpoint_saved_without_the_callback_is_refused_naming_its_folder(tmp_path, perforated_bert):
    """The refusal named a file of '<that checkpoint folder>' only, as if one had not been loaded."""
    trainer, _ = _trainer(tmp_path, TrainerCallback(), perforated_bert(), max_steps=4, save_strategy="steps",
                          save_steps=4, eval_strategy="no")
    trainer.train()
    trainer, _ = _trainer(tmp_path, PBCallback(QUICK), perforated_bert(), max_steps=8)
    with pytest.raises(TrainingError, match=rf"resuming at step 4: {tmp_path / 'checkpoint-4'} holds no "
                                            rf"{CHECKPOINT_NAME} \(it was saved without PBCallback") as err:
        trainer.train(resume_from_checkpoint=True)
    assert "\n" not in str(err.value)
    # (a placeholder path, '<that folder>/...', read as if it were one: FOLDER is named as what to pass; a reviewer)
    assert str(err.value).endswith(f"after pbp_fx.load(os.path.join(FOLDER, '{CHECKPOINT_NAME}'), model) before "
                                   "trainer.train(resume_from_checkpoint=FOLDER), FOLDER being the checkpoint folder "
                                   "resumed from")


@pytest.mark.parametrize("strategy", ["steps", "epoch"])
def test_a_budget_that_ends_between_evaluations_resumes_as_an_uninterrupted_run(tmp_path, strategy):
    """The Trainer adds an evaluation where max_steps ends off its evaluation grid: it stepped PB's
    schedule, so the checkpoint saved there, resumed with a larger budget, gave another model (1.08 off)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 8, generator=g)
    y = ((x[:, 0] * x[:, 1] > 0) ^ (x[:, 2] > 0.5)).long()
    rows = [{"x": a, "labels": b} for a, b in zip(x, y)]

    def run(folder, max_steps, resume=None):
        torch.manual_seed(0)
        model = pbp_fx.perforate(_NormedNet(), example_kwargs={"x": x[:4], "labels": y[:4]})
        cb = PBCallback(QUICK)
        trainer = Trainer(model=model, args=_args(folder, max_steps=max_steps, lr_scheduler_type="constant",
                                                  eval_strategy=strategy, eval_steps=4, save_strategy=strategy,
                                                  save_steps=4, per_device_train_batch_size=64),
                          train_dataset=rows[:256], eval_dataset=rows[256:], callbacks=[cb])
        trainer.train(resume_from_checkpoint=resume)
        return cb.controller, model

    whole, model = run(tmp_path / "whole", 40)
    assert any(h["phase"] == "dendrite" and h["epoch"] > 4 for h in whole.history)
    cut, _ = run(tmp_path / "cut", 18)  # inside the dendrite phase, 2 steps past an evaluation
    assert cut.done and cut.history[-1]["phase"] == "dendrite"
    resumed, again = run(tmp_path / "cut", 40, resume=str(tmp_path / "cut" / "checkpoint-18"))
    _same_run(resumed.history, whole.history)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_an_own_optimizer_grouped_by_a_name_rule_resumes_with_the_rule_given_to_the_callback(tmp_path):
    """PB put new parameters in their neuron's group; the rule rebuilt on resume put them elsewhere
    (site parameters are named pbp_sites.*), and the Trainer refused the saved state (a raw ValueError)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 8, generator=g)
    y = ((x[:, 0] * x[:, 1] > 0) ^ (x[:, 2] > 0.5)).long()
    rows = [{"x": a, "labels": b} for a, b in zip(x, y)]

    def rule(name):  # the first layer's own weights at a lower rate
        return 0 if name.endswith(("fc1.weight", "fc1.bias")) else 1

    def run(folder, resume=None, give_rule=True):
        torch.manual_seed(0)
        model = pbp_fx.perforate(_NormedNet(), example_kwargs={"x": x[:4], "labels": y[:4]})
        if resume is not None:
            model = pbp_fx.load(os.path.join(resume, CHECKPOINT_NAME), model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        opt = torch.optim.Adam([{"params": [p for n, p in named if rule(n) == i], "lr": lr}
                                for i, lr in enumerate((1e-3, 3e-3))])
        cb = PBCallback(QUICK, group_of_name=rule if give_rule else None)
        trainer = Trainer(model=model, args=_args(folder, save_strategy="epoch", per_device_train_batch_size=64),
                          train_dataset=rows[:256], eval_dataset=rows[256:], callbacks=[cb], optimizers=(opt, None))
        trainer.train(resume_from_checkpoint=resume)
        return cb.controller

    whole = run(tmp_path)
    saved = sorted((d for d in os.listdir(tmp_path) if d.startswith("checkpoint-")), key=lambda d: int(d[11:]))
    structures = [pbp_fx.checkpoint.read_structure(str(tmp_path / d / CHECKPOINT_NAME)) for d in saved]
    inside = next(d for d, st in zip(saved, structures) if st["phase"] == "dendrite")
    installed = next(d for d, st in zip(saved, structures) if any(site["dendrites"] for site in st["sites"]))
    for folder in (inside, installed):
        _same_run(run(tmp_path, resume=str(tmp_path / folder)).history, whole.history)
    with pytest.warns(UserWarning, match=r"your optimizer has 2 parameter groups; PB puts each new parameter .* "
                                         r"PBCallback\(group_of_name=...\)"):
        run(tmp_path / "no_rule", give_rule=False)
    with pytest.raises(ConfigError, match="give a function of a parameter's name"):
        PBCallback(QUICK, group_of_name=1)
    # Refused at the start, before any step: a rule that is not the optimizer's, one that fails on PB's
    # names (it placed nothing until the first restructure, then raised a KeyError), and a rule for an
    # optimizer the Trainer built.
    known = {}

    def by_table(name):
        return known[name]

    for bad, words in ((lambda n: 0, r"gives '.*' group 0, but the optimizer holds it in group 1: give the rule"),
                       (lambda n: 2, r"gave 2 for '.*': it must return the index of one of the optimizer's 2 "
                                     r"parameter groups \(0 to 1\)"),
                       (by_table, r"raised KeyError for '.*': the rule must give every parameter a group, PB's new "
                                  r"ones \(named ...pbp_sites.<site>...\) too")):
        torch.manual_seed(0)
        model = pbp_fx.perforate(_NormedNet(), example_kwargs={"x": x[:4], "labels": y[:4]})
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        known.update({n: rule(n) for n, _ in named})
        opt = torch.optim.Adam([{"params": [p for n, p in named if rule(n) == i]} for i in range(2)])
        trainer = Trainer(model=model, args=_args(tmp_path / "bad"), train_dataset=rows[:256], eval_dataset=rows[256:],
                          callbacks=[PBCallback(QUICK, group_of_name=bad)], optimizers=(opt, None))
        with pytest.raises(TrainingError, match=words):
            trainer.train()
        assert trainer.state.global_step == 0
    # The Trainer's own optimizer (decay / no decay) with a rule that is not its grouping: refused alike, also
    # when the callback is added after the Trainer was built.
    trainer = Trainer(model=pbp_fx.perforate(_NormedNet(), example_kwargs={"x": x[:4], "labels": y[:4]}),
                      args=_args(tmp_path / "own"), train_dataset=rows[:256], eval_dataset=rows[256:])
    trainer.add_callback(PBCallback(QUICK, group_of_name=rule))
    with pytest.raises(TrainingError, match=r"group_of_name=...\) gives '.*' group \d, but the optimizer holds it"):
        trainer.train()

def test_resume_finds_the_callbacks_file_by_the_weights_the_trainer_loaded(tmp_path):
    """A renamed checkpoint folder was refused after pbp_fx.load (only `checkpoint-<step>` names were
    trusted), and an older run's folder of the same step in output_dir was read silently."""
    import shutil

    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 8, generator=g)
    y = ((x[:, 0] * x[:, 1] > 0) ^ (x[:, 2] > 0.5)).long()
    rows = [{"x": a, "labels": b} for a, b in zip(x, y)]

    def run(folder, seed=0, resume=None, model=None):
        torch.manual_seed(seed)
        model = model or pbp_fx.perforate(_NormedNet(), example_kwargs={"x": x[:4], "labels": y[:4]})
        cb = PBCallback(QUICK)
        trainer = Trainer(model=model, args=_args(folder, save_strategy="epoch", per_device_train_batch_size=64,
                                                  seed=seed),
                          train_dataset=rows[:256], eval_dataset=rows[256:], callbacks=[cb])
        trainer.train(resume_from_checkpoint=resume)
        return cb.controller

    whole = run(tmp_path / "a")
    epoch = next(h["epoch"] for h in whole.history if h["phase"] == "dendrite") + 1
    step = sorted(int(d[11:]) for d in os.listdir(tmp_path / "a") if d.startswith("checkpoint-"))[epoch - 1]
    backup = tmp_path / "backup_of_a"
    shutil.copytree(tmp_path / "a" / f"checkpoint-{step}", backup)
    model = pbp_fx.load(str(backup / CHECKPOINT_NAME), pbp_fx.perforate(_NormedNet(), example_kwargs={
        "x": x[:4], "labels": y[:4]}))
    _same_run(run(tmp_path / "other", resume=str(backup), model=model).history, whole.history)
    run(tmp_path / "b", seed=1)  # another run, with a checkpoint folder of the same step
    with pytest.raises(TrainingError, match=r"holds other weights than the checkpoint the Trainer resumed") as err:
        run(tmp_path / "b", resume=str(backup))
    assert "\n" not in str(err.value)


def test_an_own_optimizer_resumed_without_loading_first_is_refused(tmp_path):
    """Built over the neuron-phase model, it received the dendrite phase's candidate state by position
    (the counts matched), which PB then dropped: a silently different run."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 8, generator=g)
    y = ((x[:, 0] * x[:, 1] > 0) ^ (x[:, 2] > 0.5)).long()
    rows = [{"x": a, "labels": b} for a, b in zip(x, y)]

    def trainer(folder):
        torch.manual_seed(0)
        model = pbp_fx.perforate(_NormedNet(), example_kwargs={"x": x[:4], "labels": y[:4]})
        opt = torch.optim.Adam(model.trainable_parameters(), lr=3e-3)
        return Trainer(model=model, args=_args(folder, save_strategy="epoch", per_device_train_batch_size=64),
                       train_dataset=rows[:256], eval_dataset=rows[256:], callbacks=[PBCallback(QUICK)],
                       optimizers=(opt, None))

    whole = trainer(tmp_path)
    whole.train()
    ctl = next(c for c in whole.callback_handler.callbacks if isinstance(c, PBCallback)).controller
    epoch = next(h["epoch"] for h in ctl.history if h["phase"] == "dendrite") + 1
    folder = sorted((d for d in os.listdir(tmp_path) if d.startswith("checkpoint-")), key=lambda d: int(d[11:]))[epoch - 1]
    with pytest.raises(TrainingError, match=r"restored optimizer state of shape .* load the checkpoint first") as err:
        trainer(tmp_path).train(resume_from_checkpoint=str(tmp_path / folder))
    assert "\n" not in str(err.value)


class _DigitsNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(64, 8), torch.nn.Linear(8, 10)

    def forward(self, pixels, labels=None):
        logits = self.fc2(torch.relu(self.fc1(pixels)))
        return {"logits": logits, **({} if labels is None else {"loss": torch.nn.functional.cross_entropy(logits, labels)})}


def test_a_second_train_of_the_trainer_that_trained_from_a_dendrite_phase_checkpoint_says_to_use_a_new_trainer(tmp_path):
    """The Trainer keeps the optimizer it built over the finished model; the candidates' state landed on a
    dendrite of the same count, and the refusal said to load the checkpoint first and build the optimizer
    (the user built none, and loading first did not help)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = torch.tensor(digits.data[:600], dtype=torch.float32) / 16, torch.tensor(digits.target[:600])
    rows = [{"pixels": a, "labels": b} for a, b in zip(x, y)]
    torch.manual_seed(0)
    pm = pbp_fx.perforate(_DigitsNet(), example_kwargs={"pixels": x[:4], "labels": y[:4]})
    cb = PBCallback(pbp_fx.PBConfig(patience=2, max_dendrites=2, dendrite_patience=2, max_dendrite_epochs=4, retries=1))
    trainer = Trainer(model=pm, args=_args(tmp_path, num_train_epochs=30, learning_rate=5e-2,
                                           per_device_train_batch_size=25, save_strategy="epoch",
                                           lr_scheduler_type="constant"),
                      train_dataset=rows[:400], eval_dataset=rows[400:], callbacks=[cb])
    trainer.train()
    history = cb.controller.history
    # the second round's first epoch: a dendrite installed and a pool, as many tensors as the finished model
    epoch = [h["epoch"] for h, before in zip(history[1:], history)
             if (h["phase"], before["phase"]) == ("dendrite", "neuron")][1]
    folder = tmp_path / f"checkpoint-{epoch * 16}"
    assert pbp_fx.checkpoint.read_structure(str(folder / CHECKPOINT_NAME))["phase"] == "dendrite"
    with pytest.raises(TrainingError, match=r"^PBCallback: the Trainer restored optimizer state of shape .*: the "
                                            r"optimizer is the one an earlier train\(\) of this run used, .*: resume "
                                            r"with a new Trainer, and if you give it your own optimizer, load the "
                                            r"checkpoint first") as err:
        trainer.train(resume_from_checkpoint=str(folder))
    assert "\n" not in str(err.value)


def test_a_new_train_of_a_callback_whose_run_crashed_is_refused(tmp_path, perforated_bert):
    """A new Trainer with the crashed run's callback kept the old optimizer: dendrites with V = 0 were installed."""
    class Crash(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            if state.epoch >= 2:
                raise RuntimeError("simulated crash")

    cb, model = PBCallback(QUICK), perforated_bert()
    trainer, _ = _trainer(tmp_path, cb, model)
    trainer.add_callback(Crash())
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train()
    again, _ = _trainer(tmp_path, cb, model)
    with pytest.raises(TrainingError, match="stopped inside an earlier training call.*built a new optimizer.*"
                                            "resume_from_checkpoint"):
        again.train()


def test_another_train_on_the_same_trainer_after_a_crash_is_refused(tmp_path, perforated_bert):
    """The Trainer keeps its optimizer between train() calls: the run went on with its rates scaled twice."""
    class Crash(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            if state.epoch >= 2:
                raise RuntimeError("simulated crash")

    cb = PBCallback(QUICK)
    trainer, _ = _trainer(tmp_path, cb, perforated_bert())
    crash = Crash()
    trainer.add_callback(crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train()
    trainer.remove_callback(crash)
    # (the reason given was "built a new optimizer": this Trainer kept its own; a reviewer)
    with pytest.raises(TrainingError, match="stopped inside an earlier training call .*, and this call goes on with "
                                            "that run's optimizer, whose rates it had already scaled"):
        trainer.train()


def test_auto_find_batch_size_retries_a_run_that_decided_nothing(tmp_path, perforated_bert):
    """The Trainer retries its loop at a smaller batch after an out-of-memory error at the first step: PBCallback
    refused the retry as a call after one that raised, though nothing was evaluated or rescaled (a reviewer)."""
    class OutOfMemoryOnce(TrainerCallback):  # (the message accelerate's should_reduce_batch_size reads as one)
        fired = False

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.fired:
                self.fired = True
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    cb = PBCallback(QUICK)
    trainer, _ = _trainer(tmp_path, cb, perforated_bert(), num_train_epochs=3, auto_find_batch_size=True)
    trainer.add_callback(OutOfMemoryOnce())
    trainer.train()
    assert trainer._train_batch_size < 32 and [h["epoch"] for h in cb.controller.history][:3] == [1, 2, 3]


def test_the_logged_rate_in_a_dendrite_phase_is_the_capped_rate_the_steps_applied(tmp_path, perforated_bert):
    """A warm restart lifted the scheduler's rate above candidate_lr in a dendrite phase: the step
    ran at candidate_lr, but the log showed the scheduler's rate (0.067 logged, 0.02 applied); and a
    phase's first step logged the rate of the phase before (the scheduler's last rate lags the rescale)."""
    applied, above_cap = {}, []  # step -> the rate the optimizer step ran at; steps scheduled above the cap
    cb = PBCallback(QUICK)

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            # registered after PB's own pre-step hook (PBCallback's on_train_begin runs first): sees the cap
            optimizer.optimizer.register_step_pre_hook(
                lambda opt, a, k: applied.__setitem__(state.global_step + 1, float(opt.param_groups[0]["lr"])))

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            scheduled = float(cb.controller.optimizer.param_groups[0]["lr"])  # (the cap is undone after the step)
            if cb.controller.pm.phase == "dendrite" and scheduled > QUICK.candidate_lr:
                above_cap.append(state.global_step + 1)

    trainer, _ = _trainer(tmp_path, cb, perforated_bert(), num_train_epochs=30, logging_strategy="steps",
                          logging_steps=1, lr_scheduler_type="cosine_with_restarts",
                          lr_scheduler_kwargs={"num_cycles": 15})  # 8-step cycles: a restart inside the phase
    trainer.add_callback(Record())
    trainer.train()
    logged = {r["step"]: r["learning_rate"] for r in trainer.state.log_history if "learning_rate" in r}
    assert above_cap and all(applied[s] == QUICK.candidate_lr for s in above_cap)
    assert all(logged[s] == pytest.approx(lr) for s, lr in applied.items() if s in logged)


def test_the_last_logged_pb_state_is_the_model_held_after_the_budget_ran_out(tmp_path, perforated_bert):
    """The budget ended inside a dendrite phase: the finish rewound to the best model, but the log's
    last PB entry still described the dendrite phase (or a just-installed dendrite the rewind dropped)."""
    cb = PBCallback(QUICK)
    trainer, _ = _trainer(tmp_path, cb, perforated_bert(), num_train_epochs=4)  # 3 neuron epochs, then a dendrite one
    trainer.train()
    pm = trainer.model
    assert any(h["phase"] == "dendrite" for h in cb.controller.history) and pm.phase == "neuron"
    last = [r for r in trainer.state.log_history if "pb_dendrites" in r][-1]
    assert last is trainer.state.log_history[-1] and "train_runtime" in last
    assert (last["pb_dendrite_phase"], last["pb_dendrites"], last["pb_parameters"], last["pb_decision"]) == (
        0, pm.dendrites, pm.num_parameters(), "complete")


@pytest.mark.parametrize("saved", ["model only", "full, PB file read from a copy"])
def test_a_resume_keeps_the_phase_rates_whether_the_trainer_restored_its_scheduler_or_not(tmp_path, perforated_bert,
                                                                                          saved):
    """save_only_model=True: the Trainer resumed with a fresh scheduler, which the callback took for the
    saved one (carrying the phase's factor): the candidates trained at the Trainer's rate, and after the
    install the neurons at lr * lr / candidate_lr for the rest of the run, without a word. A full checkpoint
    whose PB file was loaded from elsewhere: the scheduler was restored, whatever that folder holds."""
    import shutil

    rates = {}  # (phase, step) -> group 0's rate at the optimizer step

    class Record(TrainerCallback):
        def __init__(self, cb):
            self.cb = cb

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            rates[(self.cb.controller.pm.phase, state.global_step + 1)] = float(optimizer.param_groups[0]["lr"])

    model_only = saved == "model only"
    whole = PBCallback(QUICK)
    trainer, _ = _trainer(tmp_path / "whole", whole, perforated_bert(), save_strategy="epoch",
                          save_only_model=model_only, lr_scheduler_type="constant")
    trainer.train()
    first = next(h["epoch"] for h in whole.controller.history if h["phase"] == "dendrite")
    step = sorted(int(d.split("-")[1]) for d in os.listdir(tmp_path / "whole") if d.startswith("checkpoint-"))[first]
    folder = tmp_path / "whole" / f"checkpoint-{step}"
    assert pbp_fx.checkpoint.read_structure(str(folder / CHECKPOINT_NAME))["phase"] == "dendrite"
    pb_file = str(folder / CHECKPOINT_NAME)
    if not model_only:
        os.makedirs(tmp_path / "copy")
        pb_file = shutil.copy(pb_file, tmp_path / "copy" / CHECKPOINT_NAME)
    model = pbp_fx.load(pb_file, perforated_bert())
    resumed = PBCallback(QUICK)
    trainer, _ = _trainer(tmp_path / "other", resumed, model, save_strategy="no", lr_scheduler_type="constant")
    trainer.add_callback(Record(resumed))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=str(folder))
    fresh = [w for w in said if "holds no optimizer or scheduler state (saved with save_only_model=True?): the "
             "optimizer's moments and the learning-rate schedule start afresh" in str(w.message)]
    assert len(fresh) == (1 if model_only else 0)
    phases = {phase for phase, _ in rates}
    assert phases == {"dendrite", "neuron"}
    assert all(rate == (QUICK.candidate_lr if phase == "dendrite" else 3e-3) for (phase, _), rate in rates.items())


@pytest.mark.slow  # (default suite under ~10 minutes: T5 through the Trainer, ~50 s)
def test_t5_captured_in_parts_trains_with_the_trainers_loss_keyword(tmp_path):
    """T5's forward (captured in parts) hands the Trainer's num_items_in_batch on to its encoder,
    traced without it: the first training step failed with 'encoder was traced without the keyword
    input(s)'. The encoder ignores it, so it is dropped, and the run equals one traced with it."""
    from transformers import T5Config, T5ForConditionalGeneration

    ids = torch.randint(0, 20, (64, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": i, "attention_mask": torch.ones(8, dtype=torch.long), "labels": i.flip(0)} for i in ids]
    example = default_data_collator(data[:8])
    runs = []
    for traced in ({}, {"num_items_in_batch": torch.tensor(64)}):
        torch.manual_seed(0)
        model = T5ForConditionalGeneration(T5Config(vocab_size=20, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                    num_heads=2, decoder_start_token_id=0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = pbp_fx.perforate(model, example_kwargs={**example, **traced})
        assert pm.graph_module.meta["pbp_frontend"] == "parts" and pm.accepts_loss_kwargs
        cb = PBCallback(QUICK)
        trainer = Trainer(model=pm, args=_args(tmp_path / str(len(runs)), num_train_epochs=6,
                                               per_device_train_batch_size=16),
                          train_dataset=data, eval_dataset=data[:16], callbacks=[cb])
        trainer.train()
        runs.append(([(h["phase"], h["score"]) for h in cb.controller.history], {k: v.clone() for k, v in pm.state_dict().items()}))
    assert runs[0][0] == runs[1][0] and {phase for phase, _ in runs[0][0]} == {"neuron", "dendrite"}
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_an_evaluation_of_no_batches_is_named_as_such(tmp_path, perforated_bert):
    """dataloader_drop_last with an eval set (64) smaller than its batch (128): the Trainer reports no
    loss, and the refusal said to pass metric= one of 'none'."""
    trainer, _ = _trainer(tmp_path, PBCallback(QUICK), perforated_bert(), num_train_epochs=1,
                          dataloader_drop_last=True)
    with pytest.raises(TrainingError, match=r"^PBCallback: the evaluation gave no metrics, so no 'eval_loss': it "
                                            r"evaluated no batch .*: lower per_device_eval_batch_size or unset "
                                            r"dataloader_drop_last$"):
        trainer.train()


class _OwnClassifier(torch.nn.Module):
    """A model of the user's own that returns a ModelOutput: symbolic tracing captures it (fx)."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = torch.nn.Embedding(8, 16), torch.nn.Linear(16, 2)

    def forward(self, input_ids, attention_mask=None, labels=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.fc(torch.relu(self.emb(input_ids).mean(1)))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class _OwnLoss(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        out = model(**inputs)
        loss = torch.nn.functional.cross_entropy(out.logits, labels)  # (the output's attribute)
        return (loss, out) if return_outputs else loss


def test_a_model_output_captured_by_fx_comes_back_as_that_class(tmp_path):
    """fx wrote the ModelOutput as a plain dict: a compute_loss reading out.logits raised AttributeError."""
    batch = default_data_collator(parity_tokens(8, 0))
    batch.pop("labels")
    model = _OwnClassifier()
    pm = pbp_fx.perforate(model, example_kwargs=batch)
    assert pm.graph_module.meta["pbp_frontend"] == "fx"
    out, want = pm(**batch), model(**batch)
    assert type(out) is type(want) and torch.equal(out.logits, want.logits) and out.loss is None
    cb = PBCallback(QUICK)
    trainer = _OwnLoss(model=pm, args=_args(tmp_path, num_train_epochs=6), train_dataset=parity_tokens(64, 0),
                       eval_dataset=parity_tokens(32, 1), callbacks=[cb])
    trainer.train()
    assert "installed dendrite 1" in _notes(cb.controller)


def test_the_metrics_direction_follows_its_name_by_default():
    """Without greater_is_better a metric named *loss is lower-is-better (eval_loss, the default), any
    other higher-is-better: PB must not keep the run's highest loss as its best."""
    assert (PBCallback().metric, PBCallback().maximize) == ("eval_loss", False)
    assert PBCallback(metric="val_loss").maximize is False
    assert (PBCallback(metric="accuracy").metric, PBCallback(metric="accuracy").maximize) == ("eval_accuracy", True)
    assert PBCallback(metric="eval_loss", greater_is_better=True).maximize is True
