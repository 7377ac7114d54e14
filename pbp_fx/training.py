"""fit(): a complete PB training loop around PhaseController (PB_SPEC §5).

The loop is ordinary PyTorch; PB adds only the controller's decision after each epoch.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .controller import Decision, PhaseController
from .errors import TrainingError
from .perforated import PerforatedModel

__all__ = ["fit", "History", "evaluate", "accuracy"]


@dataclass
class History:
    """Per-epoch records (epoch, phase, dendrites, train_loss, val, test, params, decision, seconds)."""

    epochs: list = field(default_factory=list)
    best_epoch: int = -1
    best_val: Optional[float] = None

    def append(self, **row) -> None:
        self.epochs.append(row)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls(epochs=list(d["epochs"]), best_epoch=d["best_epoch"], best_val=d["best_val"])

    @property
    def switches(self) -> list[dict]:
        """Epochs at which the structure changed (dendrite phase started, dendrites installed)."""
        return [r for r in self.epochs if r["decision"] == Decision.RESTRUCTURED.value]


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _split(batch):
    """(inputs, target) from a (x, y) or (x1, ..., xn, y) batch."""
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise TrainingError("each batch must be a tuple (inputs..., target): wrap the data in a TensorDataset")
    return tuple(batch[:-1]), batch[-1]


def accuracy(output: torch.Tensor, target: torch.Tensor) -> tuple[float, int]:
    """(number correct, count) for class logits."""
    return float((output.argmax(-1) == target).sum()), target.numel()


@torch.no_grad()
def evaluate(model: nn.Module, loader, metric: Callable = accuracy, device=None, *, distributed=None) -> float:
    """Mean metric over a loader, in eval mode (the model's mode is restored afterwards).

    distributed (a pbp_fx.distributed.Distributed): the metric's sums and counts are summed
    over the ranks, so every rank gets the score of all shards (Distributed.loader(train=False)).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # evaluation needs no gradient synchronisation
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in loader:
            inputs, target = _split(_to(batch, device) if device is not None else batch)
            s, n = metric(model(*inputs), target)
            total, count = total + s, count + n
    finally:
        model.train(was)
    if distributed is not None:
        total, count = distributed.all_reduce_sum([total, count])
    if count == 0:
        raise TrainingError("the evaluation dataset is empty: give it at least one sample")
    return total / count


def _check_loader(loader, what: str) -> None:
    try:
        n = len(loader)
    except TypeError:
        return
    if n == 0:
        raise TrainingError(f"the {what} loader is empty: give the {what} dataset at least one batch")


def fit(pm: PerforatedModel, train_loader, val_loader, loss_fn: Callable = F.cross_entropy, *,
        controller: Optional[PhaseController] = None, epochs: int = 200,
        lr: float = 1e-3, candidate_lr: Optional[float] = None,
        optimizer_factory: Optional[Callable] = None, candidate_optimizer_factory: Optional[Callable] = None,
        metric: Callable = accuracy, test_loader=None, device=None, progress: bool = True,
        callbacks: Iterable[Callable[[dict], None]] = (), distributed=None,
        history: Optional[History] = None) -> History:
    """Train `pm` with Perforated Backpropagation until the controller says COMPLETE.

    The optimizer is rebuilt from `optimizer_factory(params)` (default Adam(lr)) at every
    restructure, and from `candidate_optimizer_factory` (or Adam(candidate_lr); default:
    the controller's) for each dendrite phase. `test_loader`, when given, is evaluated every epoch for reporting
    only. Each callback receives the epoch's history row.

    distributed (a pbp_fx.distributed.Distributed; every rank calls fit): the model moves to
    its device, trains through a DDP wrapper that the controller rebuilds with the
    optimizer at every restructure, the loaders should come from Distributed.loader (each
    rank must have as many training batches), scores and losses are summed over the ranks,
    and every rank takes rank 0's decisions. A rank's error is reported by the others.
    """
    _check_loader(train_loader, "training")
    _check_loader(val_loader, "validation")
    if distributed is not None and device is None:
        device = distributed.device
    if device is not None:
        pm.to(device)  # before any DDP wrapper is built over the parameters
    if controller is None:
        controller = PhaseController(pm, distributed=distributed)
    elif distributed is not None:
        controller.distributed = distributed
    controller.optimizer_factory = controller.optimizer_factory or optimizer_factory or (
        lambda params: torch.optim.Adam(params, lr=lr))
    if candidate_optimizer_factory is not None:
        controller.candidate_optimizer_factory = candidate_optimizer_factory
    elif candidate_lr is not None:
        controller.candidate_optimizer_factory = lambda params: torch.optim.Adam(params, lr=candidate_lr)
    if controller._optimizer is None:
        controller._rebuild()
    elif distributed is not None:
        controller._wrap()
    history = History() if history is None else history  # a given history: resume after its last epoch
    bar = _progress(epochs, progress and (distributed is None or distributed.is_main))
    with distributed.guard() if distributed is not None else nullcontext():
        if distributed is not None and _length(train_loader) is not None:
            distributed.check_same("number of training batches", _length(train_loader))
        _loop(pm, controller, history, bar, train_loader, val_loader, loss_fn, epochs, metric, test_loader,
              device, callbacks, distributed)
    if bar is not None:
        bar.close()
    return history


def _length(loader) -> Optional[int]:
    try:
        return len(loader)
    except TypeError:
        return None


def _loop(pm, controller, history, bar, train_loader, val_loader, loss_fn, epochs, metric, test_loader,
          device, callbacks, distributed) -> None:
    if controller.done:
        return  # a finished run (e.g. resumed after it completed): nothing left to train
    for epoch in range(len(history.epochs) + 1, epochs + 1):
        t0 = time.perf_counter()
        phase = pm.phase
        if distributed is not None and hasattr(getattr(train_loader, "sampler", None), "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        try:
            train_loss = _train_epoch(controller.model, train_loader, loss_fn, controller.optimizer, device,
                                      distributed, phase)
            _check_statistics(pm)
        except NonFiniteError as exc:
            raise TrainingError(f"{exc}; {_stop_and_restore(pm, controller)}") from exc
        if controller.scheduler is not None and phase == "neuron":
            controller.scheduler.step()
        if distributed is not None:
            distributed.sync_buffers(pm)  # rank 0's BatchNorm statistics: one model to evaluate
        val = evaluate(pm, val_loader, metric, device, distributed=distributed)
        test = (evaluate(pm, test_loader, metric, device, distributed=distributed)
                if test_loader is not None else None)
        row = {"epoch": epoch, "phase": phase, "dendrites": controller._dendrites(),
               "train_loss": train_loss, "val": val, "test": test,
               "params": pm.num_parameters(), "seconds": time.perf_counter() - t0}
        decision = controller.step(val)
        row["decision"] = decision.value
        history.append(**row)
        history.best_epoch, history.best_val = controller.best_epoch, controller.best_score
        for cb in callbacks:
            cb(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(phase=phase, dendrites=row["dendrites"], loss=f"{train_loss:.4f}",
                            val=f"{val:.4f}", best=f"{controller.best_score:.4f}")
        if decision is Decision.COMPLETE:
            break
    else:
        if pm.phase == "dendrite":
            pm.abort_dendrite_phase()
        controller._restore_best()


def _train_epoch(pm, loader, loss_fn, optimizer, device, distributed=None, phase=None) -> float:
    """One epoch; `pm` is the module to call (the model, or its DDP wrapper)."""
    pm.train()
    phase = phase or getattr(pm, "phase", "")
    total, count = 0.0, 0
    for batch in loader:
        if device is not None:
            batch = _to(batch, device)
        inputs, target = _split(batch)
        loss = loss_fn(pm(*inputs), target)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"the loss is {loss.item()} in the {phase} phase: lower the learning rate "
                                 "or check the data for NaN/Inf")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * target.shape[0]
        count += target.shape[0]
    if distributed is not None:
        total, count = distributed.all_reduce_sum([total, count])
    if count == 0:
        raise TrainingError("the training loader produced no batch: give the training dataset at least one sample")
    return total / count


class NonFiniteError(TrainingError):
    """A NaN/Inf loss or correlation statistic: the phase stops and the last good state returns."""


def _check_statistics(pm: PerforatedModel) -> None:
    for name, s in pm.sites.items():
        if s.candidates is not None and not bool(torch.isfinite(s.candidates.ema).all()):
            raise NonFiniteError(f"the correlation statistics of site {name!r} are not finite: lower "
                                 "candidate_lr or check the data for NaN/Inf")


def _stop_and_restore(pm: PerforatedModel, controller: PhaseController) -> str:
    """Stop the phase and go back to the best-validation state; say what was restored."""
    if pm.phase == "dendrite":
        pm.abort_dendrite_phase()
    if controller.best_state is None:
        return "no good state to restore yet (it failed before the first validation)"
    controller._restore_best()
    return f"stopped and restored the best-validation model (epoch {controller.best_epoch})"


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="epoch", dynamic_ncols=True, leave=False)
