"""pbp_fx.integrations.lightning.PBCallback in a real lightning.pytorch.Trainer (small CNN, CPU)."""
import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

L = pytest.importorskip("lightning")
from sklearn.datasets import load_digits  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import pbp_fx  # noqa: E402
from pbp_fx.config import ConfigError  # noqa: E402
from pbp_fx.errors import TrainingError  # noqa: E402
from pbp_fx.integrations.lightning import PBCallback  # noqa: E402

QUICK = pbp_fx.PBConfig(patience=2, neuron_epochs=3, max_dendrites=1, dendrite_patience=2, max_dendrite_epochs=3, pool=2,
                        retries=0)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 10))


def digits_loaders():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    train, val = TensorDataset(x[:600], y[:600]), TensorDataset(x[600:900], y[600:900])
    return (DataLoader(train, batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(0)),
            DataLoader(val, batch_size=300))


class Classifier(L.LightningModule):
    """An ordinary LightningModule; configure_optimizers is the user's own (Adam + StepLR)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        logits = self.model(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=3e-3)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)]


class GroupedClassifier(Classifier):
    """configure_optimizers with a weight-decay split by name (its rule also places PB's new parameters)."""

    def configure_optimizers(self):
        named = list(self.named_parameters())
        decay = [p for n, p in named if n.endswith("weight") and p.dim() > 1]
        rest = [p for n, p in named if not (n.endswith("weight") and p.dim() > 1)]
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                                 lr=3e-3)


class OneCycleClassifier(Classifier):
    """Lightning's OneCycleLR idiom: configure_optimizers reads estimated_stepping_batches, which
    starts the first epoch's DataLoader iterator (a draw from the global generator) before on_fit_start."""

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=3e-3)
        total = self.trainer.estimated_stepping_batches
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=3e-3, total_steps=int(total)), "interval": "step"}}


class LazyClassifier(Classifier):
    """The model attached in configure_model, Lightning's hook for building a model lazily (after
    the callbacks' setup): PBCallback refused it as 'no perforated model'."""

    def __init__(self, model: nn.Module):
        L.LightningModule.__init__(self)
        self._build = lambda: model

    def configure_model(self):
        if not hasattr(self, "model"):
            self.model = self._build()


def _trainer(callback, max_epochs=60, **kw):
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(max_epochs=max_epochs, callbacks=[callback], accelerator="cpu", devices=1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)


def test_lightning_trainer_runs_pb_through_an_install(tmp_path):
    train, val = digits_loaders()
    pm = pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))
    module, cb = Classifier(pm), PBCallback(QUICK, monitor="val_acc", mode="max")
    trainer = _trainer(cb)
    trainer.fit(module, train, val)
    ctl = cb.controller
    notes = [h["note"] for h in ctl.history]
    assert any("dendrite phase started" in n for n in notes), notes
    assert any("installed dendrite 1" in n for n in notes), notes
    assert ctl.done and ctl.config.maximize and trainer.current_epoch < 60
    assert len(ctl.history) == trainer.current_epoch  # one schedule step per validation run
    # The optimizer configure_optimizers built is the one PB rebinds; its StepLR kept stepping.
    opt = trainer.optimizers[0]
    assert opt is ctl.optimizer
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in pm.trainable_parameters()}
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == trainer.current_epoch
    # The best-validation model is loaded.
    assert trainer.validate(module, val, verbose=False)[0]["val_acc"] == pytest.approx(ctl.best_score, abs=1e-6)
    # Lightning's checkpoint loads onto a freshly perforated module; so does pbp_fx.save/load.
    x = next(iter(val))[0][:16]
    pm.eval()
    with torch.no_grad():
        want = pm(x)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    fresh = Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8)))
    fresh.load_state_dict(torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"])
    fresh.eval()
    pbp_fx.save(pm, str(tmp_path / "pb.safetensors"))
    loaded = pbp_fx.load(str(tmp_path / "pb.safetensors"), small_cnn, torch.zeros(2, 1, 8, 8)).eval()
    with torch.no_grad():
        assert torch.equal(fresh.model(x), want) and torch.equal(loaded(x), want)
    # fit() again with the same callback: PB has finished, so it stops at once with the best model (it
    # trained on without PB for the whole budget).
    entries = len(ctl.history)
    again = _trainer(cb)
    again.fit(module, train, val)
    assert again.global_step <= 1 and len(ctl.history) == entries
    pm.eval()
    with torch.no_grad():
        assert torch.equal(pm(x), want)


def test_lightning_refusals():
    with pytest.raises(ConfigError, match="mode='up'"):
        PBCallback(mode="up")
    # mode given, monitor left at its default: PB would keep the highest loss as its best
    with pytest.warns(UserWarning, match="PBCallback.mode='max'. keeps the highest val_loss, which reads as lower-is-better, as its best"):
        PBCallback(mode="max")
    train, val = digits_loaders()
    module = Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8)))
    with pytest.raises(TrainingError, match="'val_f1' was not logged .*val_acc"):
        _trainer(PBCallback(QUICK, monitor="val_f1", mode="max"), max_epochs=1).fit(module, train, val)
    # A near miss of a logged name is said at Lightning's sanity check (its default), before any training
    # step, and refused at the first validation.
    module = Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8)))
    trainer = L.Trainer(max_epochs=1, callbacks=[PBCallback(QUICK, monitor="val_los", mode="min")], accelerator="cpu", devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=1)
    with pytest.warns(UserWarning, match="'val_los' was not logged in the sanity check .did you mean 'val_loss'"):
        with pytest.raises(TrainingError, match="'val_los' was not logged in validation"):
            trainer.fit(module, train, val)

    class QuietSanityCheck(Classifier):  # logs nothing in the sanity check, as many modules do
        def validation_step(self, batch, i):
            if not self.trainer.sanity_checking:
                super().validation_step(batch, i)

    trainer = L.Trainer(max_epochs=1, callbacks=[PBCallback(QUICK, monitor="val_acc", mode="max")], accelerator="cpu", devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=1)
    trainer.fit(QuietSanityCheck(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))), train, val)
    assert trainer.global_step > 0
    with pytest.raises(TrainingError, match="pbp_fx.perforate"):
        _trainer(PBCallback(QUICK), max_epochs=1).fit(Classifier(small_cnn()), train, val)

    class NoOptimizer(Classifier):
        def configure_optimizers(self):
            return None

    with pytest.raises(TrainingError, match="configure_optimizers returned none"):
        _trainer(PBCallback(QUICK), max_epochs=1).fit(NoOptimizer(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))),
                                                      train, val)


def test_the_callbacks_config_and_direction():
    """A dict config crashed at fit start (AttributeError); an accuracy monitored with the default mode='min'
    was minimised, silently; mode='max' replaced an explicit PBConfig(maximize=False) (a reviewer)."""
    assert PBCallback(QUICK.to_dict(), monitor="val_loss").config == QUICK
    with pytest.raises(ConfigError, match="PBCallback's config must be a PBConfig .or a dict of its settings., got str"):
        PBCallback("patience=2")
    with pytest.raises(ConfigError, match="ranks val_acc higher-is-better, but its config has maximize=False: pass "
                                          "mode='min'"):
        PBCallback(QUICK.replace(maximize=False), monitor="val_acc", mode="max")
    with pytest.warns(UserWarning, match="PBCallback minimises val_acc .mode='min', the default"):
        PBCallback(QUICK, monitor="val_acc")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for quiet in (PBCallback(QUICK), PBCallback(QUICK, monitor="val_acc", mode="min"),
                      PBCallback(QUICK.replace(maximize=False), monitor="val_acc"),
                      PBCallback(QUICK, monitor="val_error_rate"), PBCallback(QUICK, monitor="val/loss"),
                      PBCallback(QUICK, monitor="valLoss"), PBCallback(QUICK, monitor="val_logloss"),
                      PBCallback(QUICK, monitor="val_bce")):
            assert not quiet.maximize
    with pytest.warns(UserWarning, match="keeps the highest val/loss, which reads as lower-is-better"):
        PBCallback(QUICK, monitor="val/loss", mode="max")
    with pytest.raises(ConfigError, match=r"^PBCallback\(monitor=3\): give the name of a metric the LightningModule"):
        PBCallback(QUICK, monitor=3)  # (a raw TypeError from a name check; a reviewer)
    train, val = digits_loaders()
    trainer = _trainer(PBCallback(QUICK.to_dict(), monitor="val_acc", mode="max"), max_epochs=1)
    trainer.fit(Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))), train, val)
    assert trainer.global_step > 0


def test_a_monitor_logged_per_step_or_in_training_is_named():
    """Logged with on_step=True only in validation, the message said it was not logged at all; a
    training metric was followed in silence."""
    train, val = digits_loaders()

    class PerStep(Classifier):
        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self.model(x), y), on_step=True, on_epoch=False)

    with pytest.raises(TrainingError, match=r"^PBCallback: 'val_loss' was logged per step only \(on_step=True, "
                                            r"on_epoch=False\).*on_epoch=True\) in validation_step"):
        _trainer(PBCallback(QUICK), max_epochs=1).fit(PerStep(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))),
                                                      train, val)

    class LogsTraining(Classifier):
        def training_step(self, batch, i):
            loss = super().training_step(batch, i)
            self.log("train_loss", loss)
            return loss

    pm = pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))
    with pytest.warns(UserWarning, match="PBCallback follows 'train_loss', which this validation run did not log"):
        _trainer(PBCallback(QUICK, monitor="train_loss"), max_epochs=2).fit(LogsTraining(pm), train, val)
    with warnings.catch_warnings():  # a validation metric: no such warning
        warnings.filterwarnings("error", message="PBCallback follows")
        _trainer(PBCallback(QUICK, monitor="val_loss"), max_epochs=2).fit(
            LogsTraining(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))), train, val)


@pytest.mark.parametrize("phase,module,stride,every", [
    ("neuron", Classifier, 1, 1), ("dendrite", Classifier, 1, 1), ("neuron", OneCycleClassifier, 1, 1),
    ("dendrite", LazyClassifier, 1, 1), ("dendrite", GroupedClassifier, 1, 1), ("complete", Classifier, 1, 1),
    ("dendrite", Classifier, 2, 1), ("neuron", Classifier, 1, 2)])
def test_lightning_resumes_from_its_own_checkpoint(tmp_path, phase, module, stride, every):
    """trainer.fit(..., ckpt_path=...) from a checkpoint taken in a neuron phase (the candidates are
    drawn after the resume) or inside a dendrite phase makes the uninterrupted run's decisions with
    its scores; candidate_stride=2: the pools came back at stride 1; OneCycleClassifier: the generator
    was restored after the resumed epoch's DataLoader had drawn from it, one draw behind;
    check_val_every_n_epoch=2: Lightning draws a DataLoader seed from torch's generator once more on
    restart, so candidates drawn from that generator differed (they come from the controller's own)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt_path=None, save=False, **kw):
        # Unshuffled: a fresh DataLoader's shuffle generator would not continue where the saved run's was.
        _, val = digits_loaders()
        train = DataLoader(TensorDataset(*val.dataset.tensors), batch_size=100)
        pm = pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))
        cb = PBCallback(QUICK.replace(candidate_stride=stride), monitor="val_acc", mode="max")
        saver = [ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")] if save else []
        trainer = L.Trainer(max_epochs=60, callbacks=[cb, *saver], accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=save, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, check_val_every_n_epoch=every, **kw)
        trainer.fit(module(pm), train, val, ckpt_path=ckpt_path)
        runs.append((trainer, pm, cb.controller))
        return cb.controller.history

    runs = []
    whole = run(save=True)
    epoch = next(h["epoch"] for h in whole if h["phase"] == "dendrite")  # 1-based: the first dendrite epoch
    # 0-based file names: after the first epoch, after the second dendrite-phase epoch, after the last
    ckpt = tmp_path / f"epoch={ {'neuron': every - 1, 'dendrite': epoch, 'complete': len(whole) - 1}[phase] }.ckpt"
    finished = pytest.warns(UserWarning, match=r"this PB run is complete \(.*\), so this fit trains nothing")
    with finished if phase == "complete" else contextlib.nullcontext():
        again = run(ckpt_path=str(ckpt))
    if phase == "complete":  # PB had finished: the resumed run stops at once, with the best model
        (first, first_pm, _), (trainer, pm, ctl) = runs
        assert ctl.done and trainer.global_step == first.global_step
        assert all(torch.equal(v, first_pm.state_dict()[k]) for k, v in pm.state_dict().items())
        # With min_epochs Lightning trains on past the stop; the best model still comes back at the end.
        run(ckpt_path=str(ckpt), min_epochs=len(whole) + 2)
        (_, _, _), (_, _, _), (trainer, pm, ctl) = runs
        assert trainer.current_epoch >= len(whole) + 2 and ctl.done
        assert all(torch.equal(v, first_pm.state_dict()[k]) for k, v in pm.state_dict().items())
    assert [h["note"] for h in again] == [h["note"] for h in whole]
    for a, b in zip(again, whole):
        assert a["score"] == pytest.approx(b["score"], rel=1e-5, abs=1e-6)


def test_lightning_16_mixed_scaler_reaches_the_pools():
    """A real GradScaler (Lightning's "16-mixed" plugin on the CPU): the pools divide its scale out,
    so their statistics have the size of a 32-bit run's, not scale x that."""
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.plugins.precision import MixedPrecision

    class PoolSize(Callback):
        """The largest |ema| the candidate pools reach in the first dendrite phase."""

        def __init__(self):
            self.largest = 0.0

        def on_train_batch_end(self, trainer, pl_module, *args):
            pm = pl_module.model
            if pm.phase == "dendrite":
                self.largest = max(self.largest, max(float(s.candidates.ema.abs().max()) for s in pm.sites.values()))

    def run(plugins):
        train, val = digits_loaders()
        pm = pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))
        cb, size = PBCallback(QUICK, monitor="val_acc", mode="max"), PoolSize()
        trainer = L.Trainer(max_epochs=8, callbacks=[cb, size], accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, plugins=plugins)
        trainer.fit(Classifier(pm), train, val)
        assert any(h["phase"] == "dendrite" for h in cb.controller.history)
        return pm, trainer, size.largest

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    pm, trainer, fp16 = run([MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert trainer.precision_plugin.scaler is scaler and pm.grad_scaler is scaler
    _, _, fp32 = run([])
    assert 0 < fp32 and 0.25 < fp16 / fp32 < 4, (fp16, fp32)  # unscaled: 4096x


def test_a_fresh_module_validates_from_a_dendrite_phase_checkpoint(tmp_path):
    """trainer.validate(fresh_module, ckpt_path=...) outside fit: the checkpoint's candidate pool
    is restored (not an unexpected-keys error), and the scores are the fitted model's."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    train, val = digits_loaders()
    config = QUICK.replace(dendrite_patience=5, max_dendrite_epochs=10)
    pm = pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    cb = PBCallback(config, monitor="val_acc", mode="max")
    trainer = L.Trainer(max_epochs=6, callbacks=[cb, saver], accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(Classifier(pm), train, val)
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert any(".candidates." in k for k in last["state_dict"]), "the run must end inside a dendrite phase"
    assert cb.controller.history[-1]["note"] == "the Trainer's epoch or step budget ran out"
    fresh = Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8)))
    score = _trainer(PBCallback(config, monitor="val_acc", mode="max")).validate(
        fresh, val, ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)[0]["val_acc"]
    assert fresh.model.phase == "dendrite"
    assert score == pytest.approx(cb.controller.history[-2]["score"], abs=1e-6)
    # Outside a Trainer (load_from_checkpoint's strict load_state_dict): the pool's tensors were refused
    # in torch's many-line unexpected-keys report; they add nothing to the output, so they are left out.
    plain = Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8)))
    with pytest.warns(UserWarning, match=r"saved inside a dendrite phase: its candidate pool \(\d+ tensors\) is "
                                         r"left out, as it adds nothing to the output; to train on from it, resume "
                                         r"the run itself \(Lightning: trainer.fit\(..., ckpt_path=...\) with the "
                                         r"PBCallback in the Trainer's callbacks; Hugging Face: "
                                         r"trainer.train\(resume_from_checkpoint=...\) with its PBCallback;"):
        result = plain.load_state_dict(last["state_dict"])
    assert not result.unexpected_keys and not result.missing_keys and plain.model.phase == "neuron"
    x = next(iter(val))[0]
    fresh.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(plain.model(x), fresh.model(x))
    # The same callback then resumes the fit on another fresh module: validate's load hook stayed on the first
    # module, and the fit's module loaded the pool's state without its structure (a reviewer: LightningCLI with
    # run=False reuses one callback)
    again = PBCallback(config, monitor="val_acc", mode="max")
    _trainer(again).validate(Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))), val,
                             ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)
    resumed = Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8)))
    _trainer(again, max_epochs=7).fit(resumed, train, val, ckpt_path=str(tmp_path / "last.ckpt"))
    assert again.controller.history[:len(cb.controller.history) - 1] == cb.controller.history[:-1]


def test_early_stopping_waits_through_a_dendrite_phase():
    """The validation score is constant in a dendrite phase: a Lightning EarlyStopping is held there
    (it would stop the run and drop the candidates) and gets its patience back after the install."""
    from lightning.pytorch.callbacks import EarlyStopping

    train, val = digits_loaders()
    torch.manual_seed(0)  # no BatchNorm: its running statistics would move the score in the dendrite phase
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    pm = pbp_fx.perforate(mlp, torch.zeros(2, 1, 8, 8))
    stopper = EarlyStopping("val_acc", mode="max", patience=2)
    cb = PBCallback(QUICK.replace(dendrite_patience=4, max_dendrite_epochs=6), monitor="val_acc", mode="max")

    class Watch(L.Callback):  # after cb: what the stopper and the loggers see
        seen, logged = [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                self.seen.append((pm.phase, stopper.wait_count))

        def on_train_epoch_end(self, trainer, pl_module):
            metrics = trainer.callback_metrics
            self.logged.append((pm.phase, float(metrics["pb/dendrite_phase"]), float(metrics["pb/dendrites"])))

    trainer = L.Trainer(max_epochs=40, callbacks=[stopper, cb, Watch()], accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(Classifier(pm), train, val)
    notes = [h["note"] for h in cb.controller.history]
    dendrite_epochs = sum(h["phase"] == "dendrite" for h in cb.controller.history)
    assert any("installed dendrite 1" in n for n in notes) and dendrite_epochs > stopper.patience, cb.controller.history
    assert stopper.patience == 2
    # The first epoch after the phase starts with the whole patience: what the held stopper counted is dropped.
    after = next(i for i in range(1, len(Watch.seen))
                 if Watch.seen[i - 1][0] == "dendrite" and Watch.seen[i][0] == "neuron")
    assert max(w for _, w in Watch.seen[:after]) > 0 and Watch.seen[after][1] == 0, Watch.seen
    # The loggers' pb/ metrics say the phase as the training epoch ends.
    assert [(phase == "dendrite") * 1.0 for phase, _, _ in Watch.logged] == [d for _, d, _ in Watch.logged]
    assert Watch.logged[-1][2] == float(pm.dendrites) and {d for _, _, d in Watch.logged} >= {0.0, float(pm.dendrites)}
    # A fit that ends inside a dendrite phase gives the held patience back too.
    stopper = EarlyStopping("val_acc", mode="max", patience=2)
    cb = PBCallback(QUICK.replace(dendrite_patience=4, max_dendrite_epochs=6), monitor="val_acc", mode="max")
    trainer = L.Trainer(max_epochs=5, callbacks=[stopper, cb], accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(Classifier(pbp_fx.perforate(copy.deepcopy(mlp), torch.zeros(2, 1, 8, 8))), train, val)
    assert cb.controller.history[-2]["phase"] == "dendrite" and stopper.patience == 2, cb.controller.history


class _LossClassifier(L.LightningModule):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def training_step(self, batch, _):
        return F.cross_entropy(self.model(batch[0]), batch[1])

    def validation_step(self, batch, _):
        self.log("val_loss", F.cross_entropy(self.model(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_early_stopping_at_validation_end_with_pbs_patience_before_the_callback_waits_too():
    """Listed first and checking at validation end (Lightning's default with val_check_interval < 1), a stopper
    with PB's own patience counted the validation that starts the dendrite phase before PB held it, ran out,
    and ended the fit there: no dendrite, no word; listed after PBCallback it ran (a reviewer)."""
    from lightning.pytorch.callbacks import EarlyStopping

    from pbp_fx.models import digits_mlp

    train, val, _ = digits_mlp.datasets(seed=0)
    config = pbp_fx.PBConfig(patience=3, max_dendrite_epochs=4, dendrite_patience=1, max_dendrites=1, retries=0,
                             warmup=5)
    runs = []
    for first in (True, False):
        L.seed_everything(0, verbose=False)
        pm = pbp_fx.perforate(digits_mlp.build_model(width=8), digits_mlp.example_inputs())
        stopper, cb = EarlyStopping("val_loss", patience=config.patience), PBCallback(config)
        trainer = L.Trainer(max_epochs=40, val_check_interval=0.5, callbacks=[stopper, cb] if first else [cb, stopper],
                            accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(_LossClassifier(pm), DataLoader(train, batch_size=64), DataLoader(val, batch_size=400))
        runs.append([(h["phase"], h["note"]) for h in cb.controller.history])
        assert any("installed dendrite 1" in note for _, note in runs[-1]), runs[-1]
        assert stopper.patience == config.patience
    assert runs[0] == runs[1]


class ManualClassifier(Classifier):
    """Manual optimization: self.optimizers() wraps the optimizer PB rebinds at every restructure."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.automatic_optimization = False

    def training_step(self, batch, _):
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()

    def on_train_epoch_end(self):
        self.lr_schedulers().step()


def test_manual_optimization_makes_the_automatic_runs_decisions():
    histories = []
    for module_class in (Classifier, ManualClassifier):
        L.seed_everything(0)
        train, val = digits_loaders()
        pm = pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))
        cb = PBCallback(QUICK, monitor="val_acc", mode="max")
        _trainer(cb).fit(module_class(pm), train, val)
        histories.append([(h["phase"], h["note"], h["score"]) for h in cb.controller.history])
        assert cb.controller.done and pm.dendrites == 1
    assert histories[0] == histories[1]


def test_early_stopping_checking_at_epoch_end_gets_its_patience_whole_after_the_install():
    """EarlyStopping's default check runs at the training epoch's end, after this callback's
    on_validation_end: the install's validation (the model before the install) must not count
    against the patience given back, or patience=1 ends the run at the install and drops the dendrite."""
    from lightning.pytorch.callbacks import EarlyStopping

    train, val = digits_loaders()
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    stopper = EarlyStopping("val_acc", mode="max", patience=1)
    cb = PBCallback(QUICK, monitor="val_acc", mode="max")
    trainer = L.Trainer(max_epochs=40, callbacks=[cb, stopper], accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(Classifier(pbp_fx.perforate(mlp, torch.zeros(2, 1, 8, 8))), train, val)
    history = cb.controller.history
    installed = next(i for i, h in enumerate(history) if "installed dendrite 1" in h["note"])
    assert "the Trainer stopped" not in history[installed + 1]["note"], history  # it trained on after the install
    assert min(cb.controller.pm.num_dendrites.values()) >= 1 and stopper.patience == 1


def test_the_best_model_is_loaded_when_min_epochs_trains_on_after_pb_finished():
    train, val = digits_loaders()
    pm = pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))
    cb = PBCallback(QUICK, monitor="val_acc", mode="max")
    trainer = _trainer(cb, max_epochs=40, min_epochs=14)
    trainer.fit(Classifier(pm), train, val)
    assert cb.controller.done and len(cb.controller.history) < trainer.current_epoch  # Lightning trained on
    best = cb.controller.best_state
    assert all(torch.equal(v, best[k]) for k, v in pm.state_dict().items())


class HeadOutside(Classifier):
    """Only the backbone is perforated; the head is the module's own, at its own lr."""

    def __init__(self):
        torch.manual_seed(0)
        body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 16), nn.ReLU())
        super().__init__(pbp_fx.perforate(body, torch.zeros(2, 1, 8, 8)))
        self.head = nn.Linear(16, 10)
        self.model_and_head = nn.Sequential(self.model, self.head)

    def training_step(self, batch, _):
        return F.cross_entropy(self.model_and_head(batch[0]), batch[1])

    def validation_step(self, batch, _):
        self.log("val_loss", F.cross_entropy(self.model_and_head(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD([{"params": self.model.parameters(), "lr": 0.05},
                                {"params": self.head.parameters(), "lr": 0.5}], momentum=0.9)


def test_a_head_outside_the_perforated_model_is_rewound_with_it(tmp_path):
    """The model fit leaves scores PB's best value: the head is rewound with the backbone (it kept
    its latest weights beside the backbone's best ones: 1.26 where the best was 0.93). A resume
    inside the dendrite phase (the head frozen for it) makes the same decisions."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    _, val = digits_loaders()
    train = DataLoader(TensorDataset(*val.dataset.tensors), batch_size=100)  # (unshuffled: resumable)
    cb = PBCallback(QUICK)
    trainer = _trainer(cb, max_epochs=12, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}"))
    module = HeadOutside()
    trainer.fit(module, train, val)
    assert cb.controller.done and cb.controller.best_outside
    score = trainer.validate(module, val, verbose=False)[0]["val_loss"]
    assert score == pytest.approx(cb.controller.best_score, abs=1e-6)
    dendrite = next(h["epoch"] for h in cb.controller.history if h["phase"] == "dendrite")
    again = PBCallback(QUICK)
    trainer = _trainer(again, max_epochs=12)
    resumed = HeadOutside()
    trainer.fit(resumed, train, val, ckpt_path=tmp_path / f"epoch={dendrite}.ckpt")  # (0-based names)
    assert [h["score"] for h in again.controller.history] == pytest.approx([h["score"] for h in cb.controller.history])
    assert all(p.requires_grad for p in resumed.head.parameters())
    # validate from a checkpoint inside the phase gives the module the phase's structure, not a frozen head
    fresh = HeadOutside()
    _trainer(PBCallback(QUICK)).validate(fresh, val, ckpt_path=tmp_path / f"epoch={dendrite}.ckpt", verbose=False)
    assert fresh.model.phase == "dendrite" and all(p.requires_grad for p in fresh.head.parameters())


def test_a_callback_with_the_default_config_beside_early_stopping():
    """PBCallback() read its config's patience when there was none (AttributeError on None)."""
    from lightning.pytorch.callbacks import EarlyStopping

    train, val = digits_loaders()
    trainer = _trainer(PBCallback(), max_epochs=1)
    trainer.callbacks.append(EarlyStopping("val_loss", patience=50))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="EarlyStopping on")
        trainer.fit(Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))), train, val)
    trainer = _trainer(PBCallback(), max_epochs=1)
    trainer.callbacks.append(EarlyStopping("val_loss", patience=2))
    with pytest.warns(UserWarning, match=f"PBConfig.patience={pbp_fx.PBConfig().patience} "):
        trainer.fit(Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))), train, val)


def test_a_fit_without_validation_is_refused_before_any_step():
    train, val = digits_loaders()
    for loaders, kw in [((train,), {}), ((train, val), {"limit_val_batches": 0})]:
        trainer = _trainer(PBCallback(QUICK), max_epochs=2, **kw)
        with pytest.raises(TrainingError, match="this fit runs no validation: define validation_step, pass "
                                                "val_dataloaders"):
            trainer.fit(Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))), *loaders)
        assert trainer.global_step == 0


class TrainsTheOriginal(Classifier):
    """Keeps the model it perforated and trains that one: perforate returns a copy."""

    def __init__(self, net: nn.Module):
        super().__init__(pbp_fx.perforate(net, torch.zeros(2, 1, 8, 8)))
        self.net = net

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self.net(x), y)


def test_a_perforated_model_that_never_trains_is_refused_at_the_first_validation():
    """It went through a whole neuron phase on the original's scores, then died in the first dendrite
    phase's backward with torch's "does not require grad" (a reviewer)."""
    train, val = digits_loaders()
    trainer = _trainer(PBCallback(QUICK), max_epochs=6)
    with pytest.raises(TrainingError, match="no backward reached the perforated model since the last validation: "
                                            "training_step trains another module"):
        trainer.fit(TrainsTheOriginal(small_cnn()), train, val)
    assert trainer.current_epoch == 0 and trainer.callbacks[0].controller.history == []


class CallsForward(Classifier):
    """training_step calls self.model.forward(x), which runs no module hook (a check by forward hook refused it)."""

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self.model.forward(x), y)


def test_a_perforated_model_trained_through_forward_is_not_refused_and_pickles_while_fitting(tmp_path):
    class Pickles(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            torch.save(pl_module.model, tmp_path / "pm.pt")  # (a hook of the check's own on pm did not pickle)

    train, val = digits_loaders()
    trainer = L.Trainer(max_epochs=2, callbacks=[PBCallback(QUICK), Pickles()], accelerator="cpu", devices=1,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        enable_checkpointing=False)
    trainer.fit(CallsForward(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))), train, val)
    assert trainer.current_epoch == 2 and (tmp_path / "pm.pt").exists()
    assert type(torch.load(tmp_path / "pm.pt", weights_only=False)).__name__ == "PerforatedModel"


def test_a_barebones_fit_is_refused_before_any_step():
    """barebones=True turns self.log off: refused after a whole epoch as "'val_loss' was not logged" (a reviewer)."""
    train, val = digits_loaders()
    trainer = L.Trainer(max_epochs=2, callbacks=[PBCallback(QUICK)], accelerator="cpu", devices=1, barebones=True)
    with pytest.raises(TrainingError, match=r"Trainer\(barebones=True\) turns self.log off: drop barebones=True"):
        trainer.fit(Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))), train, val)
    assert trainer.global_step == 0


def test_a_model_checkpoint_ranking_by_another_metric_is_warned_of(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    train, val = digits_loaders()
    trainer = L.Trainer(max_epochs=1, callbacks=[PBCallback(QUICK, monitor="val_acc", mode="max"),
                                                 ModelCheckpoint(dirpath=tmp_path, monitor="val_loss")],
                        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match="follows 'val_acc' but a ModelCheckpoint ranks by 'val_loss'"):
        trainer.fit(Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))), train, val)


def test_an_early_stopping_more_impatient_than_pb_is_warned_of():
    """EarlyStopping(patience=2) on PB's metric with PBConfig.patience=3 ended every run before its
    first dendrite phase, silently (the history said only 'the Trainer stopped')."""
    from lightning.pytorch.callbacks import EarlyStopping

    train, val = digits_loaders()
    trainer = _trainer(PBCallback(QUICK.replace(patience=3)), max_epochs=1)
    trainer.callbacks.append(EarlyStopping("val_loss", patience=2))
    with pytest.warns(UserWarning, match="EarlyStopping on 'val_loss' with patience=2 can end the run before PB's "
                                         "neuron phase does") as caught:
        trainer.fit(Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))), train, val)
    # at the user's fit line, as the Hugging Face callback's are (it named pbp_fx/integrations/lightning.py)
    assert [w.filename for w in caught if "EarlyStopping on" in str(w.message)] == [__file__]
    # PB's own patience, but a min_delta above PB's improvement: more validations count as no gain (a reviewer)
    trainer = _trainer(PBCallback(QUICK.replace(patience=3)), max_epochs=1)
    trainer.callbacks.append(EarlyStopping("val_loss", patience=3, min_delta=0.05))
    with pytest.warns(UserWarning, match=r"EarlyStopping on 'val_loss' with patience=3 and min_delta=0.05 \(a gain "
                                         r"below it counts as none; PB's improvement is 0.001\) can end the run"):
        trainer.fit(Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))), train, val)
    trainer = _trainer(PBCallback(QUICK.replace(patience=3)), max_epochs=1)
    trainer.callbacks.append(EarlyStopping("val_loss", patience=3))  # (PB's patience, no min_delta: no word)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "EarlyStopping on", UserWarning)
        trainer.fit(Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))), train, val)


def test_a_run_the_trainers_time_limit_ends_says_so():
    from lightning.pytorch.callbacks import Timer

    train, val = digits_loaders()
    cb = PBCallback(QUICK)
    trainer = _trainer(cb, max_epochs=50)
    trainer.callbacks.append(Timer(duration={"seconds": 0.001}))
    trainer.fit(Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))), train, val)
    assert cb.controller.history[-1]["note"] == "the Trainer's time limit (max_time) ran out"


def test_resuming_under_other_settings_is_warned_of(tmp_path):
    """Lightning resumed under a changed PBConfig (even maximize flipped) without a word."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    train, val = digits_loaders()

    def fit(config, ckpt_path=None, epochs=2):
        saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
        trainer = L.Trainer(max_epochs=epochs, callbacks=[PBCallback(config, monitor="val_acc", mode="max"), saver],
                            accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))), train, val, ckpt_path=ckpt_path)

    fit(QUICK)
    with pytest.warns(UserWarning, match="other PB settings .*patience 2 -> 5"):
        fit(QUICK.replace(patience=5), ckpt_path=str(tmp_path / "last.ckpt"), epochs=3)


def test_resuming_under_another_monitor_is_refused(tmp_path):
    """The saved best score and history were of val_acc; the resumed run compared val_loss with them."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    train, val = digits_loaders()

    def fit(monitor, mode, ckpt_path=None, epochs=2):
        saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
        trainer = L.Trainer(max_epochs=epochs, callbacks=[PBCallback(QUICK, monitor=monitor, mode=mode), saver],
                            accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))), train, val, ckpt_path=ckpt_path)

    fit("val_acc", "max")
    with pytest.raises(TrainingError, match=r"the checkpoint's PB run followed 'val_acc', but this PBCallback follows "
                                            r"'val_loss'.*pass PBCallback\(monitor='val_acc'\) to resume it"):
        fit("val_loss", "min", ckpt_path=str(tmp_path / "last.ckpt"), epochs=3)


def test_a_dendrite_phase_checkpoint_of_another_model_is_one_line():
    """The structure pre-hook passed on load_state_dict's many-line size-mismatch report."""
    from pbp_fx.errors import CheckpointError

    pm = pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))
    pm.start_dendrite_phase(pool=2)
    state = {"model." + k: v for k, v in pm.state_dict().items()}
    wider = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 10))
    module = Classifier(pbp_fx.perforate(wider, torch.zeros(2, 1, 8, 8)))
    PBCallback(QUICK).setup(None, module, "fit")  # what Lightning calls before it loads a checkpoint
    with pytest.raises(CheckpointError, match="does not fit this model: size mismatch") as err:
        module.load_state_dict(state)
    assert "\n" not in str(err.value)


class _Crash(L.Callback):
    """An exception inside fit (an out-of-memory, say) at the given epoch."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def test_a_new_fit_of_a_callback_whose_run_crashed_is_refused():
    """It kept the crashed fit's optimizer: the candidates never trained and dendrites with V = 0 were installed."""
    train, val = digits_loaders()
    module = Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8)))
    cb = PBCallback(QUICK, monitor="val_acc", mode="max")
    trainer = L.Trainer(max_epochs=60, callbacks=[cb, _Crash(4)], accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(module, train, val)
    with pytest.raises(TrainingError, match="stopped inside an earlier training call.*ckpt_path"):
        _trainer(cb).fit(module, train, val)


def test_testing_from_a_checkpoint_does_not_rewind_the_finished_run(tmp_path):
    """trainer.test(ckpt_path=...) restored the callback's state, and the next fit resumed PB from it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    train, val = digits_loaders()
    module = Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8)))
    module.test_step = module.validation_step
    cb = PBCallback(QUICK, monitor="val_acc", mode="max")
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")  # one per epoch
    trainer = L.Trainer(max_epochs=60, callbacks=[cb, saver], accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, train, val)
    entries, dendrites = len(cb.controller.history), module.model.num_dendrites
    trainer.test(module, val, ckpt_path=str(tmp_path / "epoch=1.ckpt"), verbose=False)  # a neuron phase's
    # and one of a dendrite phase's (the model takes its pool): the next fit crashed restoring the best model
    inside = next(p for p in sorted(tmp_path.glob("epoch=*.ckpt"))
                  if any(".candidates." in k for k in torch.load(p, weights_only=True)["state_dict"]))
    trainer.test(module, val, ckpt_path=str(inside), verbose=False)
    steps = trainer.global_step
    trainer.fit_loop.max_epochs = trainer.current_epoch + 20
    trainer.fit(module, train, val)  # PB finished: it stops at once
    assert trainer.global_step <= steps + 1
    assert len(cb.controller.history) == entries and module.model.num_dendrites == dendrites


def test_pb_state_reaches_the_loggers(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    train, val = digits_loaders()
    pm = pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))
    cb = PBCallback(QUICK, monitor="val_acc", mode="max")
    trainer = L.Trainer(max_epochs=60, callbacks=[cb], accelerator="cpu", devices=1, logger=CSVLogger(tmp_path),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(Classifier(pm), train, val)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("pb/dendrites")]
    assert len(rows) == trainer.current_epoch
    assert {float(r["pb/dendrite_phase"]) for r in rows} == {0.0, 1.0}
    assert float(rows[0]["pb/dendrites"]) == 0 and float(rows[-1]["pb/dendrites"]) == pm.dendrites == 1
    assert float(rows[-1]["pb/parameters"]) == pm.num_parameters()


def test_another_fit_on_the_same_trainer_after_a_crash_is_refused():
    train, val = digits_loaders()
    module = Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8)))
    cb, crash = PBCallback(QUICK, monitor="val_acc", mode="max"), _Crash(4)
    trainer = L.Trainer(max_epochs=60, callbacks=[cb, crash], accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(module, train, val)
    crash.epoch = -1
    with pytest.raises(TrainingError, match="stopped inside an earlier training call"):
        trainer.fit(module, train, val)


class ThawingClassifier(Classifier):
    """A frozen backbone that Lightning's BackboneFinetuning thaws (it adds an optimizer group)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.backbone = getattr(model.graph_module, "0")  # (the first conv: Lightning's callback needs `backbone`)

    def configure_optimizers(self):
        return torch.optim.Adam(filter(lambda p: p.requires_grad, self.parameters()), lr=3e-3)


def test_an_optimizer_group_added_after_configure_optimizers_is_warned_of_at_a_restructure():
    """BackboneFinetuning's backbone group was merged into configure_optimizers' group at the first
    restructure (its rate jumped from 0.00084 to 0.003), without a word."""
    from lightning.pytorch.callbacks import BackboneFinetuning

    train, val = digits_loaders()
    pm = pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))
    cb = PBCallback(pbp_fx.PBConfig(patience=1, improvement=10.0, max_dendrite_epochs=2, max_dendrites=1, retries=0),
                    monitor="val_acc", mode="max")
    trainer = _trainer(cb, max_epochs=6)
    trainer.callbacks.append(BackboneFinetuning(unfreeze_backbone_at_epoch=1))
    with pytest.warns(UserWarning, match=r"the optimizer has 2 parameter groups but configure_optimizers\(\) makes 1: "
                                         r"at each restructure PB regroups"):
        trainer.fit(ThawingClassifier(pm), train, val)
    assert any("dendrite phase started" in h["note"] for h in cb.controller.history)


@pytest.mark.parametrize("averager", ["StochasticWeightAveraging", "EMAWeightAveraging"])
def test_a_weight_averaging_callback_is_refused_before_any_step(averager):
    # Its averaged copy keeps the structure of the fit's start: after an install it paired the wrong
    # tensors (n_averaged grew while the copy had no dendrite), and SWA's scheduler overrode candidate_lr.
    callbacks = pytest.importorskip("lightning.pytorch.callbacks")
    if not hasattr(callbacks, averager):
        pytest.skip(f"this Lightning has no {averager}")
    make = getattr(callbacks, averager)
    train, val = digits_loaders()
    module = Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8)))
    trainer = _trainer(PBCallback(QUICK), max_epochs=2)
    trainer.callbacks.append(make(swa_lrs=1e-3) if averager == "StochasticWeightAveraging" else make())
    with pytest.raises(TrainingError, match=f"^PBCallback: {averager} averages a copy of the model made before PB "
                                            "restructures it .*pbp_fx.integrations.averaging"):
        trainer.fit(module, train, val)
    assert trainer.global_step == 0


class BackboneOutside(Classifier):
    """Lightning's BackboneFinetuning idiom with a backbone outside the perforated model."""

    def __init__(self):
        super().__init__(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8)))
        self.backbone = nn.Conv2d(1, 1, 1)

    def training_step(self, batch, _):
        return F.cross_entropy(self.model(self.backbone(batch[0])), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(filter(lambda p: p.requires_grad, self.parameters()), lr=3e-3)


@pytest.mark.parametrize("callback", ["ModelPruning", "BackboneFinetuning"])
def test_a_callback_that_changes_the_model_where_pb_cannot_follow_is_refused_before_any_step(callback):
    """ModelPruning (permanent at train end) renamed the weights before PB loaded its best state: fit crashed at its
    end, leaving the last epoch's pruned model; BackboneFinetuning thawed a backbone outside pm that trained inside a
    dendrite phase and left the optimizer at the next restructure for good (a reviewer)."""
    from lightning.pytorch.callbacks import BackboneFinetuning, ModelPruning

    train, val = digits_loaders()
    if callback == "ModelPruning":
        module = Classifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8)))
        made = ModelPruning("l1_unstructured", amount=0.3)
        said = "^PBCallback: ModelPruning reparametrises the weights that PB keeps as its best state"
    else:
        module, made = BackboneOutside(), BackboneFinetuning(unfreeze_backbone_at_epoch=2)
        said = ("^PBCallback: BackboneFinetuning will thaw parameters outside the perforated model \\(weight, ...\\), "
                "which PB neither holds still")
    trainer = _trainer(PBCallback(QUICK), max_epochs=2)
    trainer.callbacks.append(made)
    with pytest.raises(TrainingError, match=said):
        trainer.fit(module, train, val)
    assert trainer.global_step == 0


class BackboneIsPM(Classifier):
    """Lightning's BackboneFinetuning idiom with the perforated model as the backbone, a head of its own."""

    def __init__(self):
        super().__init__(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8)))
        self.backbone = self.model
        self.head = nn.Linear(10, 10)

    def training_step(self, batch, _):
        return F.cross_entropy(self.head(self.model(batch[0])), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(filter(lambda p: p.requires_grad, self.parameters()), lr=3e-3)


def test_backbone_finetuning_that_freezes_all_of_pm_or_a_resume_after_a_restructure_is_refused_in_one_line(tmp_path):
    """BackboneFinetuning with pm as its backbone read "the optimizer holds none of the perforated model's parameters
    (perforate copies the model ...)"; a ckpt_path resume beside it after a restructure failed in torch's "loaded state
    dict contains a parameter group that doesn't match" (BaseFinetuning puts back its first epoch's groups; the
    diff review)."""
    from lightning.pytorch.callbacks import BackboneFinetuning, ModelCheckpoint

    train, val = digits_loaders()
    trainer = _trainer(PBCallback(QUICK), max_epochs=2)
    trainer.callbacks.append(BackboneFinetuning(unfreeze_backbone_at_epoch=1))
    with pytest.raises(TrainingError, match="^PBCallback: BackboneFinetuning freezes the perforated model \\(its "
                                            "backbone holds all of it\\)"):
        trainer.fit(BackboneIsPM(), train, val)
    config = pbp_fx.PBConfig(patience=1, improvement=10.0, max_dendrite_epochs=2, max_dendrites=1, retries=0)
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = _trainer(PBCallback(config, monitor="val_acc", mode="max"), max_epochs=4, enable_checkpointing=True,
                       default_root_dir=tmp_path)
    trainer.callbacks += [BackboneFinetuning(unfreeze_backbone_at_epoch=1), saver]
    trainer.fit(ThawingClassifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))), train, val)
    resumed = _trainer(PBCallback(config, monitor="val_acc", mode="max"), max_epochs=6)
    resumed.callbacks.append(BackboneFinetuning(unfreeze_backbone_at_epoch=1))
    with pytest.raises(TrainingError, match="^PBCallback: a ckpt_path resume beside BackboneFinetuning after PB "
                                            "restructured the model is not supported"):
        resumed.fit(ThawingClassifier(pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))), train, val,
                    ckpt_path=str(tmp_path / "epoch=3.ckpt"))


def test_a_fast_dev_run_leaves_the_run_to_the_fit_after_it():
    """Lightning's smoke test (one batch, one validation) was PB's epoch 1 and finished the run
    ('budget ran out'), so the real fit after it with the same callback trained nothing."""
    train, val = digits_loaders()
    pm = pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))
    module, cb = Classifier(pm), PBCallback(QUICK, monitor="val_acc", mode="max")
    L.Trainer(fast_dev_run=True, callbacks=[cb], accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, train, val)
    assert cb.controller is None and pm.phase == "neuron"
    trainer = _trainer(cb)
    trainer.fit(module, train, val)
    assert trainer.global_step > 0 and len(cb.controller.history) == trainer.current_epoch
    assert any("installed dendrite 1" in h["note"] for h in cb.controller.history)


class DivergingClassifier(Classifier):
    """Its validation loss is NaN at epoch 2 (as diverged weights give), finite otherwise."""

    def validation_step(self, batch, _):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("val_loss", loss * float("nan") if self.current_epoch == 2 else loss)


@pytest.mark.parametrize("first", [False, True])
def test_early_stopping_leaves_a_divergence_to_pb(first):
    """EarlyStopping's check_finite (on by default) ended the fit at the NaN score, where PB had gone
    back to its best weights to go on with a dendrite round: the run ended with 0 dendrites (also
    when the stopper comes first and checks at validation end)."""
    from lightning.pytorch.callbacks import EarlyStopping

    train, val = digits_loaders()
    pm = pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))
    cb = PBCallback(QUICK.replace(patience=5))
    stopper = EarlyStopping("val_loss", patience=50, check_on_train_epoch_end=not first)
    trainer = _trainer(cb, max_epochs=12)
    trainer.callbacks.insert(0 if first else len(trainer.callbacks), stopper)
    with pytest.warns(UserWarning, match="the validation score is nan at epoch 3: the weights diverged"):
        trainer.fit(DivergingClassifier(pm), train, val)
    notes = [h["note"] for h in cb.controller.history]
    assert notes[2].startswith("score nan: diverged; neuron phase done; dendrite phase started"), notes
    assert any("installed dendrite 1" in n for n in notes) and trainer.current_epoch > 4
    assert stopper.check_finite  # (given back)


class NaNCandidatesClassifier(Classifier):
    """Its candidates' weights turn NaN at the end of the dendrite phase's first training epoch."""

    def on_train_epoch_end(self):
        if self.model.phase == "dendrite":
            with torch.no_grad():
                for s in self.model.sites.values():
                    for p in s.candidates.parameters():
                        p.fill_(float("nan"))


def test_nan_candidates_stop_the_fit_with_the_best_model_and_the_stoppers_given_back():
    """The controller installed NaN candidates; stopped there, the fit held EarlyStopping's patience
    for good."""
    from lightning.pytorch.callbacks import EarlyStopping

    train, val = digits_loaders()
    pm = pbp_fx.perforate(small_cnn(), torch.zeros(2, 1, 8, 8))
    cb = PBCallback(QUICK)
    stopper = EarlyStopping("val_loss", patience=50)
    trainer = _trainer(cb, max_epochs=12)
    trainer.callbacks.append(stopper)
    with pytest.raises(pbp_fx.errors.NonFiniteError, match=r"the candidates' weights of site '.*' are not finite: "
                                                           r"lower candidate_lr; stopped and restored the best"):
        trainer.fit(NaNCandidatesClassifier(pm), train, val)
    assert cb.controller.done and pm.phase == "neuron" and cb.controller.num_dendrites == 0
    assert all(bool(torch.isfinite(p).all()) for p in pm.parameters())
    assert stopper.patience == 50 and stopper.check_finite  # (given back)
