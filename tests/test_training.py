"""fit(): the loop, its history, optimizer rebuilding and its errors."""
import dataclasses
import functools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import pbp_fx
from pbp_fx.errors import TargetError
from pbp_fx.controller import PhaseController
from pbp_fx.training import evaluate, fit


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = ((x[:, 0] * x[:, 1] + x[:, 2].sin()) > 0).long()
    return TensorDataset(x, y)


def _pm(mode="pb"):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    return pbp_fx.perforate(m, (torch.randn(2, 6),), mode=mode)


@pytest.mark.parametrize("mode", ["pb", "gd"])
def test_fit_runs_phases_and_records_history(mode):
    pm = _pm(mode)
    train = DataLoader(_data(), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(_data(128, 1), batch_size=128)
    ctl = PhaseController(pm, patience=2, dendrite_patience=1, max_dendrite_epochs=2, max_dendrites=1)
    seen = []
    h = fit(pm, train, val, controller=ctl, epochs=40, progress=False, callbacks=[seen.append],
            test_loader=val)
    assert ctl.done
    assert len(seen) == len(h.epochs) < 40
    phases = {r["phase"] for r in h.epochs}
    assert phases == ({"neuron", "dendrite"} if mode == "pb" else {"neuron"})
    assert h.switches, "at least one restructure must have happened"
    assert h.best_val == ctl.best_score == pytest.approx(evaluate(pm, val))
    assert all(r["test"] is not None for r in h.epochs)
    assert pm.phase == "neuron"


def test_the_epoch_the_cap_ends_the_run_at_is_recorded_complete():
    """history.json's last row read 'continue' while the controller's history said the cap ended the run."""
    pm = _pm()
    loader = DataLoader(_data(), batch_size=64)
    ctl = PhaseController(pm, patience=50)
    seen = []
    h = fit(pm, loader, loader, controller=ctl, epochs=3, progress=False, callbacks=[seen.append])
    assert [r["decision"] for r in h.epochs] == ["continue", "continue", "complete"] and seen[-1]["decision"] == "complete"
    assert ctl.done and [e["note"] for e in ctl.history].count("epoch cap (3) reached") == 1
    assert fit(pm, loader, loader, controller=ctl, epochs=3, progress=False).epochs == []  # finished: no epoch


def test_fit_trains_only_candidates_in_the_dendrite_phase():
    pm = _pm()
    train = DataLoader(_data(), batch_size=32)
    val = DataLoader(_data(64, 1), batch_size=64)
    ctl = PhaseController(pm, patience=1, dendrite_patience=50, max_dendrite_epochs=50, max_dendrites=1)
    snapshots = []

    def record(row):
        if row["phase"] == "dendrite":
            snapshots.append({k: v.clone() for k, v in pm.state_dict().items() if ".candidates." not in k})

    fit(pm, train, val, controller=ctl, epochs=6, progress=False, callbacks=[record])
    assert len(snapshots) >= 2
    assert all(torch.equal(snapshots[0][k], snapshots[-1][k]) for k in snapshots[0])


def test_empty_loaders_are_reported():
    pm = _pm()
    empty = DataLoader(TensorDataset(torch.empty(0, 6), torch.empty(0, dtype=torch.long)), batch_size=4)
    full = DataLoader(_data(16), batch_size=4)
    with pytest.raises(pbp_fx.TrainingError, match="training"):
        fit(pm, empty, full, progress=False)
    with pytest.raises(pbp_fx.TrainingError, match="validation"):
        fit(pm, full, empty, progress=False)
    # (None trained a whole epoch, then failed with "'NoneType' object is not iterable"; a reviewer)
    before = [p.detach().clone() for p in pm.parameters()]
    with pytest.raises(pbp_fx.TrainingError, match="^the validation loader is NoneType, not an iterable of batches"):
        fit(pm, full, None, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, pm.parameters()))


@pytest.mark.parametrize("which", ["training", "validation"])
def test_a_one_shot_iterator_as_a_loader_is_refused_before_any_step(which):
    """A generator trained epoch 1, then stopped with 'the training loader produced no batch: give the training
    dataset at least one sample' (or 'the validation dataset is empty'), naming the wrong cause."""
    pm = _pm()
    full = DataLoader(_data(16), batch_size=4)
    once = (batch for batch in full)
    before = [p.detach().clone() for p in pm.parameters()]
    with pytest.raises(pbp_fx.TrainingError, match=rf"^the {which} loader is a one-shot iterator \(generator\).*give "
                                                   r"one that starts over each epoch"):
        fit(pm, *((once, full) if which == "training" else (full, once)), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, pm.parameters()))
    fit(pm, list(full), list(full), progress=False, epochs=2)  # (a list of batches starts over)
    with pytest.raises(pbp_fx.TrainingError, match=r"^the training loader is a one-shot iterator "
                                                   r"\(_SingleProcessDataLoaderIter\)"):
        fit(_pm(), iter(full), full, progress=False, epochs=2)
    with pytest.raises(pbp_fx.TrainingError, match=r"^the test loader is a one-shot iterator \(generator\)"):
        fit(_pm(), full, full, test_loader=(b for b in full), progress=False, epochs=2)
    # One epoch reads each loader once: a generator serves it (it trained so before the check; a reviewer)
    assert len(fit(_pm(), (b for b in full), (b for b in full), progress=False, epochs=1).epochs) == 1


def test_a_metric_that_counts_no_sample_is_named_not_the_dataset():
    """A recall-like metric on data without positives returned count 0: 'the validation dataset is empty'."""
    def recall(output, target):
        return 0.0, 0

    full = DataLoader(_data(16), batch_size=4)
    with pytest.raises(pbp_fx.TrainingError, match="the metric recall counted no sample of the validation data"):
        evaluate(_pm(), full, recall, data="validation")


def test_a_metric_that_returns_no_pair_is_named():
    """A metric returning a mean: "cannot unpack non-iterable float object" from evaluate (a reviewer)."""
    def mean_accuracy(output, target):
        return float((output.argmax(1) == target).float().mean())

    full = DataLoader(_data(16), batch_size=4)
    with pytest.raises(pbp_fx.TrainingError, match=r"^the metric mean_accuracy returned float, not a \(sum, count\) "
                                                   r"pair"):
        evaluate(_pm(), full, mean_accuracy, data="validation")
    # (a pair as a tensor or an array is a pair: the first form of this check refused it; the diff review)
    for pair in (torch.tensor, np.array):
        def paired(output, target, pair=pair):
            return pair([float((output.argmax(1) == target).sum()), float(len(target))])

        assert 0 <= evaluate(_pm(), full, paired, data="validation") <= 1


def test_a_metric_with_a_negative_count_is_refused():
    """(correct, -n) made every score negative: rising accuracy read as falling, and the run kept its worst
    epoch, exit 0 (a reviewer)."""
    def flipped(output, target):
        return float((output.argmax(1) == target).sum()), -len(target)

    with pytest.raises(pbp_fx.TrainingError, match=r"the metric flipped returned a negative count \(-4\) on the "
                                                   r"validation data"):
        evaluate(_pm(), DataLoader(_data(16), batch_size=4), flipped, data="validation")


class _LateOddSample(torch.utils.data.Dataset):
    """Samples of shape [6], but from sample 12 on [7]: found only when that batch is made."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.randn(7 if i >= 12 else 6), torch.tensor(i % 2)


def test_a_sample_of_another_shape_is_a_data_error_naming_the_data():
    full = DataLoader(_data(16), batch_size=4)
    odd = DataLoader(_LateOddSample(), batch_size=8)
    with pytest.raises(pbp_fx.TrainingError, match="the training data could not be made into a batch .*stack expects"):
        fit(_pm(), odd, full, progress=False, epochs=1)
    with pytest.raises(pbp_fx.TrainingError, match="the validation data could not be made into a batch"):
        evaluate(_pm(), odd, data="validation")
    # From a worker process: the worker's own error, not "Caught RuntimeError in DataLoader worker process 0"
    class Unreadable(_LateOddSample):
        def __getitem__(self, i):
            raise OSError("cannot read shard_3.bin")

    with pytest.raises(pbp_fx.TrainingError, match=r"the validation dataset raised an error while reading a sample "
                                                   r"\(OSError: cannot read shard_3.bin\): fix the dataset"):
        evaluate(_pm(), DataLoader(Unreadable(), batch_size=8), data="validation")
    workers = DataLoader(_LateOddSample(), batch_size=8, num_workers=1)
    with pytest.raises(pbp_fx.TrainingError, match=r"batch \(RuntimeError: stack expects.*same structure and shapes"):
        evaluate(_pm(), workers, data="validation")

    # A RuntimeError of the dataset itself was blamed on the samples' shapes (a collation error)
    class Broken(_LateOddSample):
        def __getitem__(self, i):
            raise RuntimeError("disk read failed")

    for loader in (DataLoader(Broken(), batch_size=8), DataLoader(Broken(), batch_size=8, num_workers=1)):
        with pytest.raises(pbp_fx.TrainingError, match=r"dataset raised an error while reading a sample \(RuntimeError: "
                                                       r"disk read failed\): fix the dataset") as info:
            evaluate(_pm(), loader, data="validation")
        assert "shapes" not in str(info.value)

    # A collate_fn of one's own that raises was 'the dataset raised an error while reading a sample'
    def pad(samples):
        return torch.stack([x for x, _ in samples]), torch.tensor([int(y["label"]) for _, y in samples])

    class Pad:  # (a callable object and a partial are named too)
        def __call__(self, samples, scale=1):
            return pad(samples)

    for workers, collate in ((0, pad), (1, pad), (0, Pad()), (0, functools.partial(Pad(), scale=2))):
        loader = DataLoader(_data(16), batch_size=8, collate_fn=collate, num_workers=workers)
        with pytest.raises(pbp_fx.TrainingError, match=r"the collate_fn raised an error making a batch of the "
                                                       r"validation data \(.*IndexError.*\): fix collate_fn"):
            evaluate(_pm(), loader, data="validation")


def test_nan_in_training_data_is_reported_as_the_data():
    """A NaN loss from NaN inputs said 'lower the learning rate or check the data'; after a best it
    read as diverged weights, and fit went back to them and on."""
    pm = _pm()
    x = torch.full((8, 6), float("nan"))
    bad = DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long)), batch_size=4)
    with pytest.raises(pbp_fx.TrainingError, match="the training data holds NaN/Inf values: remove or replace them"):
        fit(pm, bad, bad, progress=False, epochs=1)
    pm = _pm()  # after a best too: the data, not diverged weights
    train = _PoisonedAfter(DataLoader(_data(), batch_size=32), after=2)
    with pytest.raises(pbp_fx.TrainingError, match=r"the training data holds NaN/Inf values.*restored the "
                                                   r"best-validation model"):
        fit(pm, train, DataLoader(_data(64, 1), batch_size=64), controller=PhaseController(pm, patience=50),
            epochs=6, progress=False)


def test_batches_without_targets_are_reported():
    pm = _pm()
    loader = DataLoader(torch.randn(8, 6), batch_size=4)
    with pytest.raises(pbp_fx.TrainingError, match="tuple"):
        fit(pm, loader, loader, progress=False, epochs=1)


class _PoisonedAfter:
    """A loader whose batches turn NaN from its `after`-th pass on."""

    def __init__(self, loader, after):
        self.loader, self.after, self.passes = loader, after, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.passes += 1
        for x, y in self.loader:
            yield (x * float("nan") if self.passes > self.after else x), y


def test_non_finite_loss_in_a_dendrite_phase_stops_the_run_and_restores_the_best_state():
    pm = _pm()
    val = DataLoader(_data(64, 1), batch_size=64)
    train = _PoisonedAfter(DataLoader(_data(), batch_size=32), after=4)
    ctl = PhaseController(pm, patience=2, dendrite_patience=50, max_dendrite_epochs=50)
    with pytest.raises(pbp_fx.TrainingError, match="the training data holds NaN/Inf values.*restored the "
                                                   "best-validation model"):
        fit(pm, train, val, controller=ctl, epochs=20, progress=False)
    assert pm.phase == "neuron", "the dendrite phase must be stopped"
    assert all(torch.equal(v, ctl.best_state[k]) for k, v in pm.state_dict().items())
    assert any("dendrite phase started" in e["note"] for e in ctl.history)


def test_candidates_gone_nan_stop_the_dendrite_phase_before_they_are_installed():
    """Their NaN batches were skipped by the statistics, which stayed finite: the NaN candidate
    was installed, and the next neuron phase read as diverged weights."""
    pm = _pm()
    train, val = DataLoader(_data(), batch_size=32), DataLoader(_data(64, 1), batch_size=64)
    ctl = PhaseController(pm, patience=1, dendrite_patience=50, max_dendrite_epochs=50)

    def poison(row):
        if pm.phase == "dendrite":
            with torch.no_grad():
                for s in pm.sites.values():
                    for p in s.candidates.parameters():
                        p.fill_(float("nan"))

    with pytest.raises(pbp_fx.TrainingError, match=r"the candidates' weights of site '0' are not finite: lower "
                                                   r"candidate_lr; stopped and restored the best-validation model"):
        fit(pm, train, val, controller=ctl, epochs=20, progress=False, callbacks=[poison])
    assert pm.phase == "neuron" and ctl.num_dendrites == 0


def test_a_loss_the_targets_make_nan_on_a_finite_output_is_not_taken_for_divergence():
    """cross_entropy of a batch whose labels are all ignored is nan on finite weights: it was
    warned of as 'the weights diverged' and the run went on, its phase cut short."""
    x, y = _data().tensors
    y = y.clone()
    y[64:96] = -100  # the third batch of every epoch
    for epochs_before in (0, 2):  # before and after a best: the same error
        pm, calls = _pm(), [0]

        def loss_fn(out, target):
            calls[0] += 1
            return F.cross_entropy(out, target if calls[0] > 8 * epochs_before else target.clamp(min=0))

        with pytest.raises(pbp_fx.TrainingError, match=r"the loss is nan in the neuron phase on a batch whose labels "
                                                       r"are all -100 \(ignore_index, as cross_entropy reads them\): "
                                                       r"leave such batches out"):
            fit(pm, DataLoader(TensorDataset(x, y), batch_size=32), DataLoader(_data(64, 1), batch_size=64),
                loss_fn, controller=PhaseController(pm, patience=50), epochs=6, progress=False)


def test_weights_gone_nan_at_an_epochs_last_step_are_not_scored_as_a_best():
    """Accuracy scores NaN logits as class 0: on data mostly of class 0 such an epoch became the best,
    and the rewind went back to NaN weights."""
    x, _ = _data().tensors
    y = (torch.arange(len(x)) % 4 == 0).long()  # 75 % class 0
    pm, calls = _pm(), [0]

    def loss_fn(out, target):  # a NaN gradient (a finite loss) at the last step of epoch 2
        calls[0] += 1
        loss = F.cross_entropy(out, target)
        return loss + torch.sqrt(out.sum() * 0) if calls[0] == 16 else loss

    data = DataLoader(TensorDataset(x, y), batch_size=32)
    ctl = PhaseController(pm, patience=50, dendrite_patience=1, max_dendrite_epochs=1, max_dendrites=1)
    with pytest.warns(pbp_fx.PBWarning, match=r"the weights hold NaN/Inf at epoch 2: the weights diverged"):
        h = fit(pm, data, data, loss_fn, controller=ctl, epochs=5, progress=False)
    assert [r["val"] is None for r in h.epochs[:3]] == [False, True, False] and h.epochs[2]["phase"] == "dendrite"
    assert all(bool(torch.isfinite(p).all()) for p in pm.parameters()) and h.best_epoch != 2


class _Diverge:
    """A fit callback that turns every weight NaN after epoch `at` (what a too-high learning rate does)."""

    def __init__(self, pm, at):
        self.pm, self.at = pm, at

    def __call__(self, row):
        if row["epoch"] == self.at:
            with torch.no_grad():
                for p in self.pm.parameters():
                    p.fill_(float("nan"))


def test_a_loss_gone_nan_after_a_best_goes_back_to_the_best_weights_and_on():
    """fit ended the run at its best model with an error, where the controller's own loop, the HF
    Trainer and Lightning go back to the best weights and on with a dendrite round."""
    pm = _pm()
    train, val = DataLoader(_data(), batch_size=32), DataLoader(_data(64, 1), batch_size=64)
    ctl = PhaseController(pm, patience=50, dendrite_patience=1, max_dendrite_epochs=2, max_dendrites=1)
    with pytest.warns(pbp_fx.PBWarning, match=r"the loss is nan at epoch 3: the weights diverged, so the neuron "
                                              r"phase ends here and the model is back at its best weights"):
        h = fit(pm, train, val, controller=ctl, epochs=8, progress=False, callbacks=[_Diverge(pm, 2)],
                test_loader=val)
    row = h.epochs[2]
    assert (row["train_loss"], row["val"], row["test"], row["decision"]) == (None, None, None, "restructured")
    assert ctl.history[2]["note"].startswith("the loss is nan: diverged; ")  # (no score was taken)
    assert h.epochs[3]["phase"] == "dendrite" and ctl.num_dendrites == 1 and len(h.epochs) == 8
    assert all(bool(torch.isfinite(p).all()) for p in pm.parameters())
    assert all(r["val"] is not None for r in h.epochs[3:])
    json.dumps(h.to_dict(), allow_nan=False)  # (history.json holds no NaN)


def test_nan_in_validation_data_is_reported_like_nan_in_training_data():
    pm = _pm()
    train = DataLoader(_data(), batch_size=32)
    x, y = _data(64, 1).tensors
    x = x.clone()
    x[5, 2] = float("inf")
    val = DataLoader(TensorDataset(x, y), batch_size=64)
    ctl = PhaseController(pm, patience=50)
    with pytest.raises(pbp_fx.TrainingError, match="validation data holds NaN/Inf.*no good state"):
        fit(pm, train, val, controller=ctl, epochs=3, progress=False)


def test_a_test_score_gone_nan_stops_the_run_as_a_validation_score_does():
    """NaN in a test target (no input holds it) made the per-epoch test score nan, silently: the
    run reported 'test nan' and wrote NaN into its JSON reports."""
    pm = _pm()
    train, val = DataLoader(_data(), batch_size=32), DataLoader(_data(64, 1), batch_size=64)
    samples = [(x, y.float()) for x, y in _data(64, 2)]
    samples[7] = (samples[7][0], torch.tensor(float("nan")))
    test = DataLoader(samples, batch_size=64)
    metric = lambda out, y: (-float(((out[:, 1] - y) ** 2).sum()), len(y))  # noqa: E731
    with pytest.raises(pbp_fx.TrainingError, match=r"the test score is nan in epoch 1 \(neuron phase\): check the test data"):
        fit(pm, train, val, test_loader=test, metric=metric, controller=PhaseController(pm, patience=50), epochs=3,
            progress=False)


def test_fit_with_a_controller_refuses_settings_it_would_ignore():
    pm = _pm()
    loader = DataLoader(_data(16), batch_size=4)
    with pytest.raises(pbp_fx.ConfigError, match="pass lr to PhaseController"):
        fit(pm, loader, loader, controller=PhaseController(pm), lr=0.1, progress=False)
    with pytest.raises(pbp_fx.ConfigError, match=r"pass lr to PhaseController instead \(through its optimizer_factory"):
        fit(pm, loader, loader, controller=PhaseController(pm), training=pbp_fx.TrainConfig(lr=0.5), progress=False)
    # another model's controller trained that model, and this one not at all (a reviewer)
    with pytest.raises(pbp_fx.ConfigError, match=r"^fit\(controller=...\) got the controller of another model"):
        fit(pm, loader, loader, controller=PhaseController(_pm()), progress=False)


def test_fit_takes_a_config_and_stops_at_the_epoch_cap():
    pm = _pm()
    loader = DataLoader(_data(64), batch_size=32)
    h = fit(pm, loader, loader, config=pbp_fx.PBConfig(patience=50), training=pbp_fx.TrainConfig(epochs=3),
            progress=False)
    assert len(h.epochs) == 3 and pm.phase == "neuron"


def test_fit_warns_of_train_settings_only_the_train_command_applies(recwarn):
    """fit(training=TrainConfig(batch_size=8, seed=3)) trained on the given loaders, unseeded, without a word."""
    pm = _pm()
    loader = DataLoader(_data(16), batch_size=4)
    with pytest.warns(UserWarning, match=r"uses only epochs and lr: batch_size=8 applies to pbp-fx train only.*"
                                         r"build the loaders with that batch size") as caught:
        fit(pm, loader, loader, training=pbp_fx.TrainConfig(epochs=1, batch_size=8, seed=3), progress=False)
    assert [str(w.message).split(":")[1].split("=")[0].strip() for w in caught
            if "uses only epochs" in str(w.message)] == ["batch_size", "seed"]
    recwarn.clear()
    fit(_pm(), loader, loader, training=pbp_fx.TrainConfig(epochs=1, lr=0.01), progress=False)
    assert not [w for w in recwarn if "uses only epochs" in str(w.message)]


class _DictOut(nn.Module):
    """A model returning a dict, as Hugging Face models do."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(6, 4), nn.Linear(4, 2)

    def forward(self, x):
        return {"hidden": self.body(x), "logits": self.head(torch.relu(self.body(x)))}


@dataclasses.dataclass
class _Scores:
    hidden: torch.Tensor
    logits: torch.Tensor


class _DataclassOut(_DictOut):
    """A model returning a dataclass (a user's own output type)."""

    def forward(self, x):
        return _Scores(**super().forward(x))


@pytest.mark.parametrize("model", [_DictOut, _DataclassOut], ids=["dict", "dataclass"])
def test_fit_defaults_score_a_dict_or_dataclass_output_by_its_logits(model):
    """A dataclass output: the default loss got the dataclass itself, torch's TypeError from inside the loop."""
    torch.manual_seed(0)
    pm = pbp_fx.perforate(model(), (torch.randn(2, 6),))
    train, val = DataLoader(_data(), batch_size=32), DataLoader(_data(64, 1), batch_size=64)
    h = fit(pm, train, val, epochs=3, progress=False, config=pbp_fx.PBConfig(patience=1, max_dendrites=1))
    assert len(h.epochs) == 3 and all(0.0 <= r["val"] <= 1.0 for r in h.epochs)
    x = torch.randn(3, 6)
    logits = pm(x)["logits"] if model is _DictOut else pm(x).logits
    assert torch.equal(pbp_fx.training.primary_output(pm(x)), logits)


def test_an_output_with_no_tensor_to_score_names_the_fix():
    with pytest.raises(TargetError, match=r"output is a str with no tensor .*\(loss_fn=, metric=\)"):
        pbp_fx.training.cross_entropy("logits", torch.zeros(2, dtype=torch.long))
    with pytest.raises(TargetError, match="output is a tuple with no tensor"):
        pbp_fx.training.primary_output(())


def test_fit_steps_a_plateau_scheduler_on_the_validation_score():
    """ReduceLROnPlateau from scheduler_factory: stepped with the score after the controller's decision
    (held through the dendrite phase); a mode that contradicts PBConfig.maximize is refused first."""
    train = DataLoader(_data(), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(_data(128, 1), batch_size=128)
    pm = _pm()
    ctl = PhaseController(pm, patience=2, dendrite_patience=1, max_dendrite_epochs=2, max_dendrites=1,
                          scheduler_factory=lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(
                              o, "max", patience=0, factor=0.5))
    seen = []
    fit(pm, train, val, controller=ctl, epochs=30, progress=False,
        callbacks=[lambda row: seen.append((pm.phase, ctl.optimizer.param_groups[0]["lr"]))])  # the next epoch's
    neuron = [lr for phase, lr in seen if phase == "neuron"]
    assert len(neuron) > 2 and min(neuron) < 1e-3  # stale epochs cut the rate (patience 0)
    dendrite = [lr for phase, lr in seen if phase == "dendrite"]
    assert dendrite and dendrite == [pytest.approx(ctl.config.candidate_lr)] * len(dendrite)
    pm = _pm()
    wrong = PhaseController(pm, scheduler_factory=lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, "min"))
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    with pytest.raises(pbp_fx.ConfigError, match="mode='min' but fit's validation score is maximized.*mode='max'"):
        fit(pm, train, val, controller=wrong, epochs=3, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in pm.state_dict().items())  # refused before any work


@pytest.mark.parametrize("device", [None, "cpu"])
def test_a_resumed_fit_on_a_device_keeps_the_optimizer_state(tmp_path, device):
    """fit(..., device=...) after pbp_fx.load(..., optimizer=ctl.optimizer) cleared Adam's moments and step
    count (every distributed run passes its device): the resumed run left the uninterrupted one."""
    from pbp_fx.training import History

    train, val = DataLoader(_data(), batch_size=32), DataLoader(_data(64, 1), batch_size=64)
    config, path = pbp_fx.PBConfig(patience=50), str(tmp_path / "c.safetensors")
    pm = _pm()
    ctl = PhaseController(pm, config)

    def save_after_the_first(row):
        if row["epoch"] == 1:
            pbp_fx.save(pm, path, controller=ctl, optimizer=ctl.optimizer)

    whole = fit(pm, train, val, controller=ctl, epochs=3, progress=False, callbacks=[save_after_the_first])
    pm = _pm()
    ctl = PhaseController(pm, config)
    pbp_fx.load(path, pm, controller=ctl, optimizer=ctl.optimizer)
    history = History()
    history.append(**whole.epochs[0])
    resumed = fit(pm, train, val, controller=ctl, epochs=3, progress=False, history=history, device=device)
    assert [r["train_loss"] for r in resumed.epochs] == [r["train_loss"] for r in whole.epochs]


def test_the_built_in_accuracy_reads_classes_where_cross_entropy_does_and_refuses_what_it_cannot_score():
    """It took argmax(-1): a [B, C, L] output (cross-entropy's layout) scored against the wrong axis, a
    single logit per sample scored 1.0 (or 0.0), and multi-hot targets scored argmax of the first."""
    from pbp_fx.training import accuracy

    logits = torch.zeros(2, 3, 4)  # [B, C, L]: class 2 everywhere but one position
    logits[:, 2] = 1.0
    logits[0, 0, 0] = 5.0
    target = torch.full((2, 4), 2)
    assert accuracy(logits, target) == (7.0, 8)
    with pytest.raises(TargetError, match=r"C >= 2 classes on dim 1, but the output has shape \[4, 1\]"):
        accuracy(torch.randn(4, 1), torch.ones(4, 1))
    with pytest.raises(TargetError, match=r"the output has shape \[4\]"):
        accuracy(torch.randn(4), torch.ones(4))
    with pytest.raises(TargetError, match="do not sum to 1 over the classes \\(multi-label targets\\?\\)"):
        accuracy(torch.randn(2, 3), torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))
    smoothed = torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.05, 0.9]])  # soft targets still score
    assert accuracy(torch.tensor([[3.0, 0.0, 0.0], [3.0, 0.0, 0.0]]), smoothed) == (1.0, 2)
    # a tagger's [B, T, C] with its own loss: argmax(1) read the time axis (or broadcast and failed)
    with pytest.raises(TargetError, match=r"labels of shape \[2, 4\], not \[2, 5\]: the classes look last"):
        accuracy(torch.randn(2, 5, 4), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TargetError, match=r"labels of shape \[4\], not \[4, 1\]: give labels of that shape"):
        accuracy(torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long))  # [N, 1] broadcast to [N, N]


def test_labels_of_minus_100_count_in_neither_the_default_loss_nor_the_accuracy():
    """-100 (F.cross_entropy's ignore_index) was refused as an out-of-range label by train and
    compare, and the built-in accuracy would have counted it wrong."""
    from pbp_fx.job import _check_labels
    from pbp_fx.training import accuracy, cross_entropy

    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    assert accuracy(logits, torch.tensor([0, 1, -100, 0])) == (2.0, 3)
    # class probabilities as targets (cross-entropy takes them): a broadcast error before
    assert accuracy(logits, torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.0, 1.0], [0.0, 1.0]])) == (3.0, 4)
    _check_labels(torch.tensor([0, 1, -100]), 2, "training")
    logits.requires_grad_(True)
    assert torch.equal(cross_entropy(logits, torch.tensor([0, 1, -100, 0])),
                       F.cross_entropy(logits[[0, 1, 3]], torch.tensor([0, 1, 0])))
    every = cross_entropy(logits, torch.full((4,), -100))  # a batch of ignored labels only: 0, not NaN
    every.backward()
    assert every.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    with pytest.raises(pbp_fx.TrainingError, match=r"class label -1, .*or -100 to leave a sample out"):
        _check_labels(torch.tensor([0, -1]), 2, "training")
    # validation data whose every label is ignored: the fix is in the data, not "return count > 0" from a metric
    ignored = DataLoader(TensorDataset(torch.randn(8, 6), torch.full((8,), -100)), batch_size=4)
    with pytest.raises(pbp_fx.TrainingError, match="every label of the validation data is -100 .*give the validation "
                                                   "data labelled samples"):
        evaluate(_pm(), ignored, data="validation")


def test_a_keyword_batch_with_an_extra_key_stays_keywords():
    """A dict batch holding forward's inputs and one more column (a dataset's idx) was passed whole as
    the first input: the error then read 'x was traced with Tensor, this call passes dict'."""
    from pbp_fx.training import call_model

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x, gain=None):
            return self.fc(x) * (1 if gain is None else gain[:, None])

    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'idx'"):
        call_model(TwoInputs(), ({"x": x, "gain": torch.ones(4), "idx": torch.arange(4)},))
    assert call_model(TwoInputs(), ({"x": x, "gain": torch.ones(4)},)).shape == (4, 2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'idx'"):  # (not into the optional gain)
        call_model(TwoInputs(), (x, {"idx": torch.arange(4)}))


def test_a_validation_score_gone_nan_after_a_best_is_taken_as_divergence():
    """Finite validation data and a finite best, then a NaN score: the error said 'check the
    validation data and the metric', which were fine; the weights had diverged (the controller
    goes back to the best weights and on)."""
    pm = _pm()
    train, val = DataLoader(_data(), batch_size=32), DataLoader(_data(64, 1), batch_size=64)
    calls = [0]

    def metric(out, y):
        calls[0] += 1
        return (float("nan") if calls[0] == 3 else float((out.argmax(1) == y).sum())), len(y)

    with pytest.warns(pbp_fx.PBWarning, match=r"the validation score is nan at epoch 3: the weights diverged"):
        h = fit(pm, train, val, metric=metric, controller=PhaseController(pm, patience=50), epochs=5, progress=False)
    assert h.epochs[2]["val"] is None and h.epochs[2]["decision"] == "restructured" and h.epochs[3]["phase"] == "dendrite"
    pm, calls[0] = _pm(), 0  # in a dendrite phase the model is frozen: no divergence to name
    with pytest.raises(pbp_fx.TrainingError, match=r"the validation score is nan in epoch 3 \(dendrite phase\): "
                                                   r"check the validation data"):
        fit(pm, train, val, metric=metric, controller=PhaseController(pm, patience=1), epochs=5, progress=False)


def test_a_dict_a_compiled_model_takes_whole_goes_in_whole():
    """torch.compile's wrapper shows forward(*args, **kwargs): the dict was spread into keywords."""
    from pbp_fx.training import call_model

    class WholeDict(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, batch):
            return self.fc(batch["img"])

    compiled = torch.compile(WholeDict(), backend="eager")
    assert call_model(compiled, ({"img": torch.randn(4, 3)},)).shape == (4, 2)

    class Varargs(nn.Module):  # (the dict lands in *args: no parameter named for it; it raised StopIteration)
        def forward(self, *args):
            return args[0]["img"]

    assert call_model(Varargs(), ({"img": torch.ones(2)},)).shape == (2,)


class _Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_a_squared_error_that_overflows_on_finite_outputs_is_divergence():
    """MSE is inf where the outputs pass 1.8e19 while weights and outputs are finite: that was read
    as the targets' doing (it is exploding weights)."""
    torch.manual_seed(0)
    pm = pbp_fx.perforate(_Regression(), (torch.randn(2, 6),))
    x, _ = _data().tensors
    y = x[:, :1].clone()
    data = DataLoader(TensorDataset(x, y), batch_size=64)

    def blow_up(row):  # finite weights whose outputs square past float32's range
        if row["epoch"] == 2:
            with torch.no_grad():
                for p in pm.parameters():
                    p.mul_(1e12)

    metric = lambda out, t: (-float(((out - t) ** 2).sum()), len(t))  # noqa: E731
    ctl = PhaseController(pm, patience=50, dendrite_patience=1, max_dendrite_epochs=1, max_dendrites=1,
                          maximize=True)
    with pytest.warns(pbp_fx.PBWarning, match=r"the loss is inf at epoch 3: the weights diverged"):
        h = fit(pm, data, data, F.mse_loss, controller=ctl, metric=metric, epochs=5, progress=False,
                callbacks=[blow_up])
    assert h.epochs[2]["val"] is None and h.epochs[3]["phase"] == "dendrite"


def test_nan_weights_before_any_best_stop_the_run_as_a_non_finite_value():
    """The controller's refusal was a plain TrainingError outside fit's handling: the run was left
    unfinished, and compare took it for a model-file error."""
    pm = _pm()
    train, val = DataLoader(_data(), batch_size=32), DataLoader(_data(64, 1), batch_size=64)
    calls = [0]

    def loss_fn(out, target):  # a NaN gradient at the first epoch's last step (a finite loss)
        calls[0] += 1
        loss = F.cross_entropy(out, target)
        return loss + torch.sqrt(out.sum() * 0) if calls[0] == 8 else loss

    ctl = PhaseController(pm, patience=50)
    with pytest.raises(pbp_fx.TrainingError, match=r"^the model's weights hold NaN/Inf after epoch 1, before any "
                                                   r"best: lower the learning rate; stopped: no best weights kept "
                                                   r"yet") as info:
        fit(pm, train, val, loss_fn, controller=ctl, epochs=3, progress=False)
    assert isinstance(info.value.__cause__, pbp_fx.errors.NonFiniteError) and ctl.done


def test_nan_targets_are_the_datas_and_a_loss_overflowing_on_finite_outputs_is_divergence():
    """NaN regression targets were called diverged weights (or, on finite outputs, the loss's doing);
    a Poisson loss, exp of an output past 88, is inf on finite weights and outputs: it was blamed on the
    targets, and the run stopped where the weights had diverged."""
    x, _ = _data().tensors
    y = x[:, :1].abs().clone()
    y[40] = float("nan")
    pm = pbp_fx.perforate(_Regression(), (torch.randn(2, 6),))
    with pytest.raises(pbp_fx.TrainingError, match="the training targets hold NaN/Inf values: remove or replace"):
        fit(pm, DataLoader(TensorDataset(x, y), batch_size=64), DataLoader(TensorDataset(x, y.nan_to_num()), batch_size=64),
            torch.nn.PoissonNLLLoss(), metric=lambda o, t: (0.0, len(t)), epochs=2, progress=False)

    torch.manual_seed(0)
    pm = pbp_fx.perforate(_Regression(), (torch.randn(2, 6),))
    y = x[:, :1].abs()
    data = DataLoader(TensorDataset(x, y), batch_size=64)

    def far(row):  # finite weights whose outputs pass 88: exp overflows
        if row["epoch"] == 2:
            with torch.no_grad():
                for p in pm.parameters():
                    p.add_(100.0)

    ctl = PhaseController(pm, patience=50, dendrite_patience=1, max_dendrite_epochs=1, max_dendrites=1,
                          maximize=True)
    with pytest.warns(pbp_fx.PBWarning, match=r"the loss is inf at epoch 3: the weights diverged"):
        h = fit(pm, data, data, torch.nn.PoissonNLLLoss(), controller=ctl, metric=lambda o, t: (-float(o.sum()), len(t)),
                epochs=4, progress=False, callbacks=[far])
    assert h.epochs[2]["val"] is None and h.epochs[3]["phase"] == "dendrite"


def test_nan_in_any_part_of_a_structured_target_is_the_datas():
    """A tuple of targets (multi-task labels) holding NaN was read as diverged weights, 'the batch's
    inputs and targets are finite'."""
    from pbp_fx.training import _non_finite_loss

    targets = (torch.tensor([1.0, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(pbp_fx.errors.NonFiniteDataError, match="the training targets hold NaN/Inf values"):
        _non_finite_loss(torch.tensor(float("nan")), (torch.randn(2, 3),), targets, "neuron")
    err = _non_finite_loss(torch.tensor(float("inf")), (torch.randn(2, 3),), (targets[1],), "neuron")
    assert err.diverged and "inputs and targets are finite" in str(err)


def test_training_device_is_the_cpu_or_a_gpu_every_process_can_have():
    from pbp_fx.training import training_device

    assert training_device("cpu", 4) == torch.device("cpu")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert training_device("auto").type == ("cuda" if gpus else "cpu")
    assert training_device(torch.device("cpu")) == torch.device("cpu")
    for bad in ("tpu", "meta", torch.device("meta"), 3):
        with pytest.raises(pbp_fx.ConfigError, match=r"--device .*: use one of auto, cpu, cuda"):
            training_device(bad)
    if not gpus:
        for cuda in ("cuda", "cuda:0", torch.device("cuda", 0)):
            with pytest.raises(pbp_fx.ConfigError, match=r"--device cuda: this torch .* sees no CUDA device: use "
                                                         r"--device cpu"):
                training_device(cuda)
        return
    assert training_device("cuda").type == "cuda" and training_device(f"cuda:{gpus - 1}") == torch.device("cuda", gpus - 1)
    with pytest.raises(pbp_fx.ConfigError, match=rf"device cuda:{gpus}: this machine has {gpus} GPU\(s\)"):
        training_device(f"cuda:{gpus}")
    fewer = f"--nproc {gpus}" + ("" if gpus == 1 else " or fewer")
    with pytest.raises(pbp_fx.ConfigError, match=rf"--device cuda --nproc {gpus + 1}: each process needs a GPU of its own "
                                                 rf"\(NCCL\) and this machine has {gpus}: use {fewer}, or --device cpu"):
        training_device("cuda", gpus + 1)
    with pytest.warns(pbp_fx.PBWarning, match=rf"{gpus + 1} processes but {gpus} GPU\(s\): training on the CPU"):
        assert training_device("auto", gpus + 1) == torch.device("cpu")


def test_fit_inside_an_autocast_region_trains():
    """torch keeps an autocast region's weight casts until the outermost region exits: fit called inside
    one read the first step's bfloat16 weights at every forward, and its loss stayed at 1.39."""
    torch.manual_seed(0)
    x, w = torch.randn(400, 16), torch.randn(16, 4)
    y = (x @ w).argmax(1)
    train, val = DataLoader(TensorDataset(x[:300], y[:300]), batch_size=50), DataLoader(TensorDataset(x[300:], y[300:]))

    def run(loss_fn):
        torch.manual_seed(0)
        pm = pbp_fx.perforate(nn.Sequential(nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 4)), (x[:2],))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            history = fit(pm, train, val, loss_fn=loss_fn, config=pbp_fx.PBConfig(patience=50), epochs=4, lr=1e-2,
                          progress=False)
        return [r["train_loss"] for r in history.epochs]

    def recast(output, target):  # what a loop of one's own does: each forward casts the current weights
        torch.clear_autocast_cache()
        return F.cross_entropy(output, target)

    losses = run(F.cross_entropy)
    assert losses == run(recast) and losses[-1] < 0.9 * losses[0], losses


def test_a_batch_moves_to_a_device_in_containers_of_its_own_types():
    from collections import namedtuple

    from pbp_fx.training import _to

    Sample = namedtuple("Sample", "x y")
    batch = [Sample(torch.ones(2), {"mask": torch.zeros(2), "n": 3}), "text"]
    moved = _to(batch, "meta")
    assert type(moved[0]) is Sample and moved[0].x.device.type == "meta" and moved[0].y["mask"].is_meta
    assert moved[0].y["n"] == 3 and moved[1] == "text"


def test_fit_refuses_an_lr_beside_an_optimizer_factory():
    """fit(optimizer_factory=f, lr=0.5) trained at the factory's rate, silently (a reviewer)."""
    pm = _pm()
    loader = DataLoader(_data(16), batch_size=4)
    factory = lambda params: torch.optim.SGD(params, lr=0.01)  # noqa: E731
    for kw in ({"lr": 0.5}, {"training": pbp_fx.TrainConfig(lr=0.5)}):
        with pytest.raises(pbp_fx.ConfigError, match=r"lr=0.5 would do nothing: give the rate to the factory"):
            fit(pm, loader, loader, optimizer_factory=factory, progress=False, epochs=1, **kw)
    fit(pm, loader, loader, optimizer_factory=factory, progress=False, epochs=1)


def test_fit_takes_a_tuple_or_dict_target_for_a_two_head_model():
    """train_epoch weighted the loss by target.shape[0]: a (labels, values) target failed with
    "'tuple' object has no attribute 'shape'", though evaluate took it (a reviewer)."""
    class TwoHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.cls, self.reg = nn.Linear(12, 16), nn.Linear(16, 4), nn.Linear(16, 1)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return self.cls(h), self.reg(h).squeeze(-1)

    g = torch.Generator().manual_seed(0)
    for as_dict in (False, True):
        pm = pbp_fx.perforate(TwoHead(), (torch.randn(4, 12),))
        labels = [(torch.randint(0, 4, (8,), generator=g), torch.randn(8, generator=g)) for _ in range(3)]
        data = [(torch.randn(8, 12, generator=g), {"c": c, "r": r} if as_dict else (c, r)) for c, r in labels]
        pick = (lambda t: (t["c"], t["r"])) if as_dict else (lambda t: t)

        def loss(out, t):
            c, r = pick(t)
            return F.cross_entropy(out[0], c) + F.mse_loss(out[1], r)

        def metric(out, t):
            c, _ = pick(t)
            return float((out[0].argmax(1) == c).sum()), len(c)

        history = pbp_fx.fit(pm, data, data, loss, metric=metric, epochs=2, progress=False)
        assert len(history.epochs) == 2 and math.isfinite(history.epochs[0]["train_loss"])


def test_a_list_of_per_image_dicts_counts_images_not_boxes():
    """samples_in took the first batched tensor of any structured target: a detector's first image with no
    boxes counted 0 samples, and every such batch made 'the training loader produced no batch' (a reviewer)."""
    from pbp_fx.training import samples_in

    images = torch.randn(2, 8)
    target = [{"boxes": torch.zeros(0, 4)}, {"boxes": torch.zeros(3, 4)}]
    assert samples_in(target, (images,)) == 2
    assert samples_in(torch.zeros(5), (images,)) == 5  # (a tensor target: its own dim 0, as before)
    assert samples_in(None, ()) == 1


def test_a_divergence_after_an_install_with_a_large_v_init_names_v_init():
    """v_init=1e300 trained to the end, every round diverging with the advice "a lower learning rate avoids
    it" (a reviewer)."""
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16)
    pm = pbp_fx.perforate(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)), (x[:2],))
    config = dict(patience=1, max_dendrites=1, v_init=1e38, max_dendrite_epochs=2, dendrite_patience=1, retries=0)
    with pytest.warns(pbp_fx.PBWarning, match=r"the weights diverged.*a lower learning rate avoids it, or a "
                                             r"smaller v_init \(new dendrites start at \|V\| = 1e\+38\)"):
        fit(pm, loader, loader, config=config, training=dict(epochs=10), progress=False)


def test_fit_refuses_a_controller_with_a_root_it_would_neither_train_nor_score():
    """fit trained pm's output alone and scored pm: a head of one's own (root=) took no gradient."""
    body = pbp_fx.perforate(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6)), torch.randn(2, 4))
    net = nn.Sequential(body, nn.Linear(6, 2))
    ctl = PhaseController(body, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), root=net)
    assert ctl.model is net  # the module the loop trains through
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))))
    with pytest.raises(pbp_fx.ConfigError, match=r"fit\(\) trains and scores pm alone, and this PhaseController has "
                                                 r"root="):
        pbp_fx.fit(body, data, data, controller=ctl, epochs=1, progress=False)


@pytest.mark.parametrize("target, words", [
    (torch.tensor([0.0, 1.0, 2.0]), r"float targets of shape \[3\] for logits of shape \[3, 4\]: give class indices as "
                                    r"integers \(y.long\(\)\)"),
    (torch.tensor([[0], [1], [2]]), r"integer targets of shape \[3, 1\] .*shape \[N\] \(y.squeeze\(1\)\)"),
    (torch.nn.functional.one_hot(torch.tensor([0, 1, 2]), 4), r"integer targets in the logits' shape \[3, 4\] "
                                                            r"\(one-hot\?\): give class indices \(y.argmax\(1\)\)"),
])
def test_the_built_in_loss_names_targets_it_cannot_take(target, words):
    """fit's default loss passed them to torch: 'expected target dtype to be Long or Byte, but got Float',
    '0D or 1D target tensor expected, multi-target not supported' (a reviewer)."""
    from pbp_fx.training import cross_entropy

    with pytest.raises(TargetError, match=words):
        cross_entropy(torch.randn(3, 4), target)
    probabilities = torch.softmax(torch.randn(3, 4), 1)  # (what it takes: indices, and probabilities in the shape)
    assert torch.isfinite(cross_entropy(torch.randn(3, 4), probabilities))
    assert torch.isfinite(cross_entropy(torch.randn(3, 4, 5), torch.randint(0, 4, (3, 5))))


@pytest.mark.parametrize("where", ["train", "val"])
def test_class_labels_outside_the_logits_classes_are_refused_in_one_line(where):
    """Validation labels 5..7 for 3 classes were scored as wrong without a word (val 0.0); training ones raised
    torch's IndexError 'Target 5 is out of bounds' (a reviewer)."""
    from pbp_fx.training import accuracy, cross_entropy

    logits = torch.randn(4, 3)
    for labels in (torch.tensor([0, 1, 5, -100]), torch.tensor([0, -1, 2, 1])):
        for score in (accuracy, cross_entropy):
            with pytest.raises(TargetError, match=rf"^class label {int(labels[2] if labels[2] == 5 else -1)} is "
                                                  r"outside 0\.\.2, the classes of logits with 3 on dim 1: give"):
                score(logits, labels)
    assert accuracy(logits, torch.tensor([0, 1, 2, -100]))[1] == 3
    torch.manual_seed(0)
    x, y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    pm = pbp_fx.perforate(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)), (x[:2],))
    wrong = TensorDataset(x, y + 5)
    train, val = (wrong, TensorDataset(x, y)) if where == "train" else (TensorDataset(x, y), wrong)
    with pytest.raises(TargetError, match="^class label [5-7] is outside 0..2"):
        fit(pm, DataLoader(train, batch_size=10), DataLoader(val, batch_size=10), epochs=2, progress=False)
