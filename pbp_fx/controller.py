"""PhaseController: when to switch phases, install, retry or finish (PB_SPEC §5).

Decisions come from validation scores alone; the only tensors held are the best-validation
weights. Call `step(val_score)` once per epoch:

    ctl = PhaseController(pm, patience=10, max_dendrites=3)
    for epoch in range(epochs):
        train_one_epoch(pm, optimizer)
        decision = ctl.step(evaluate(pm))
        if decision is Decision.RESTRUCTURED:
            optimizer = torch.optim.Adam(pm.trainable_parameters(), lr=1e-3)
        elif decision is Decision.COMPLETE:
            break

Distributed runs pass `distributed=` (a pbp_fx.distributed.Distributed): every rank then
decides on rank 0's validation score and candidate mark (and the ranks are checked to be
at the same epoch, phase and dendrite count), and `self.model` is the DDP wrapper to train
with, rebuilt with the optimizer at every RESTRUCTURED decision.
"""
from __future__ import annotations

import copy
import enum
import math
from typing import Callable, Optional

import torch

from .perforated import PerforatedModel

__all__ = ["PhaseController", "Decision", "CurrentOptimizer"]


class Decision(str, enum.Enum):
    CONTINUE = "continue"          # keep training as before
    RESTRUCTURED = "restructured"  # the parameter set changed: rebuild optimizer and scheduler
    COMPLETE = "complete"          # done; the best-validation model is loaded


class CurrentOptimizer:
    """A stable handle on a controller's current optimizer, rebuilt at every restructure.

    Take it once (`optimizer = ctl.optimizer`) and use it as the optimizer: zero_grad(),
    step(), param_groups, state_dict() all go to whichever optimizer the phase needs now.
    """

    def __init__(self, controller: "PhaseController"):
        self._controller = controller

    @property
    def current(self):
        opt = self._controller._optimizer
        if opt is None:
            raise RuntimeError("the PhaseController has no optimizer: pass optimizer_factory=")
        return opt

    def __getattr__(self, name):
        return getattr(self.current, name)

    def __repr__(self) -> str:
        return f"CurrentOptimizer({self._controller._optimizer!r})"


class PhaseController:
    """Pure decisions from validation scores; owns the best-validation weights.

    patience / improvement: neuron phase ends after `patience` epochs without a gain of
    more than `improvement` (absolute, in score units). dendrite_patience /
    max_dendrite_epochs: dendrite phase ends when no candidate correlation has improved for
    that many epochs, or at the cap. retries: fresh-candidate attempts after a round that
    gave no new best. optimizer_factory(params) / scheduler_factory(optimizer), when given,
    rebuild `self.optimizer` / `self.scheduler` at every RESTRUCTURED decision; the dendrite
    phase's optimizer comes from candidate_optimizer_factory (default Adam(candidate_lr)).
    distributed: see the module docstring; `self.model` is the module to call in training
    (`pm` itself, or its DDP wrapper).
    """

    def __init__(self, pm: PerforatedModel, patience: int = 30, improvement: float = 1e-3,
                 dendrite_patience: int = 3, max_dendrite_epochs: int = 60, max_dendrites: int = 3,
                 dendrite_improvement: float = 0.01,
                 retries: int = 2, maximize: bool = True, pool: int = 4,
                 candidate_init: str = "kaiming", v_init: float = 0.0,
                 neuron_epochs: Optional[int] = None,
                 optimizer_factory: Optional[Callable] = None,
                 candidate_optimizer_factory: Optional[Callable] = None, candidate_lr: float = 0.02,
                 scheduler_factory: Optional[Callable] = None,
                 distributed=None):
        if max_dendrites < 1:
            raise ValueError(f"max_dendrites={max_dendrites}: it must be at least 1 (use plain training for 0)")
        if patience < 1 or dendrite_patience < 1:
            raise ValueError("patience and dendrite_patience must be at least 1 epoch")
        self.pm = pm
        self.patience, self.improvement, self.maximize = patience, improvement, maximize
        self.dendrite_patience, self.max_dendrite_epochs = dendrite_patience, max_dendrite_epochs
        self.dendrite_improvement = dendrite_improvement
        self.max_dendrites, self.retries = max_dendrites, retries
        self.pool, self.candidate_init, self.v_init = pool, candidate_init, v_init
        self.neuron_epochs = neuron_epochs
        self.optimizer_factory = optimizer_factory
        # Candidates are PB's own parameters: Adam well above the model's rate (PB_NOTES).
        self.candidate_optimizer_factory = candidate_optimizer_factory or (
            lambda params: torch.optim.Adam(params, lr=candidate_lr))
        self.scheduler_factory = scheduler_factory
        self._optimizer = self.scheduler = None
        self.distributed = distributed
        self.model = pm
        # -- state (all in state_dict) --
        self.epoch = 0
        self.best_score: Optional[float] = None
        self.best_epoch = -1
        self.best_state: Optional[dict] = None
        self.phase_epochs = 0          # epochs in the current phase
        self.stale_epochs = 0          # epochs without improvement in the current phase
        self.round_improved = True     # did the current round set a new best (round 0 counts)
        self.retries_left = retries
        self.rounds = 0                # dendrite rounds installed so far (accepted or not)
        self.candidate_best: dict[str, float] = {}  # per site, best mean |C~| this dendrite phase
        self.history: list[dict] = []
        self.done = False
        self._rebuild()

    @property
    def optimizer(self) -> CurrentOptimizer:
        """A handle that always reaches the optimizer of the current phase."""
        return CurrentOptimizer(self)

    # -- helpers ---------------------------------------------------------------------
    def _better(self, score: float) -> bool:
        if self.best_score is None:
            return True
        gain = score - self.best_score if self.maximize else self.best_score - score
        return gain > self.improvement

    def _snapshot(self) -> dict:
        return {k: v.detach().clone() for k, v in self.pm.state_dict().items()}

    def _restore_best(self) -> None:
        if self.best_state is not None:
            self.pm.load_state_dict(self.best_state)

    def _dendrites(self) -> int:
        counts = self.pm.num_dendrites.values()
        return max(counts) if counts else 0

    def _wrap(self) -> None:
        """`self.model`: `pm`, or in distributed runs the DDP wrapper over its current parameters."""
        self.model = self.pm if self.distributed is None else self.distributed.wrap(self.pm)

    def _agree(self, score: float, mark: int) -> tuple[float, int]:
        """Distributed runs: rank 0's score and mark on every rank, all at the same step."""
        if self.distributed is None:
            return score, mark
        state = [self.epoch, self._dendrites(), int(self.pm.phase == "dendrite"), int(self.done)]
        score, mark = self.distributed.agree([score, mark], state)
        return score, int(mark)

    def _rebuild(self) -> None:
        self._wrap()
        factory = (self.candidate_optimizer_factory if self.pm.phase == "dendrite"
                   else self.optimizer_factory)
        if factory is not None:
            self._optimizer = factory(list(self.pm.trainable_parameters()))
            if self.scheduler_factory is not None and self.pm.phase == "neuron":
                self.scheduler = self.scheduler_factory(self._optimizer)

    def _candidate_progress(self) -> int:
        """1 when some site's mean best |C~| rose by more than `dendrite_improvement` (relative).

        Per site, not per channel: with hundreds of channels one of them almost always gains
        1%, and the phase would never end before its cap (measured: bench/results/ablations.md).
        """
        improved = 0
        for name, s in self.pm.sites.items():
            if s.candidates is None:
                continue
            value = float(s.correlation().mean())
            if value > self.candidate_best.get(name, 0.0) * (1.0 + self.dendrite_improvement):
                self.candidate_best[name] = value
                improved = 1
        return improved

    def _event(self, score, decision: Decision, note: str) -> None:
        self.history.append({"epoch": self.epoch, "phase": self._epoch_phase, "score": score,
                             "dendrites": self._dendrites(), "decision": decision.value, "note": note})

    def _grow_or_start(self) -> str:
        if self.pm.mode == "gd":
            self.pm.grow("random")
            self.rounds += 1
            return "grew random dendrites (gd)"
        self.pm.start_dendrite_phase(pool=self.pool, init=self.candidate_init)
        self.candidate_best = {}
        return "dendrite phase started"

    def _finish(self, score, note: str) -> Decision:
        self._restore_best()
        self.done = True
        self._event(score, Decision.COMPLETE, note)
        return Decision.COMPLETE

    # -- the decision ------------------------------------------------------------------
    def step(self, val_score: float) -> Decision:
        """Record one epoch's validation score and decide what happens next."""
        if self.done:
            return Decision.COMPLETE
        mark = self._candidate_progress() if self.pm.phase == "dendrite" else 0
        val_score, mark = self._agree(float(val_score), mark)
        self._epoch_phase = self.pm.phase  # the phase this epoch ran in, for the history
        self.epoch += 1
        self.phase_epochs += 1
        if self.pm.phase == "dendrite":
            return self._dendrite_step(val_score, mark)
        if not math.isfinite(val_score):
            raise ValueError(f"validation score {val_score} is not finite: check the loss and the data")
        if self._better(val_score):
            self.best_score, self.best_epoch = val_score, self.epoch
            self.best_state = self._snapshot()
            self.stale_epochs = 0
            self.round_improved = True
        else:
            self.stale_epochs += 1
        switch = (self.stale_epochs >= self.patience or
                  (self.neuron_epochs is not None and self.phase_epochs >= self.neuron_epochs))
        if not switch:
            self._event(val_score, Decision.CONTINUE, "")
            return Decision.CONTINUE
        # The neuron phase is over: accept the round, retry it, or finish (PB_SPEC §5).
        if not self.round_improved:
            if self.retries_left <= 0:
                return self._finish(val_score, "no new best after retries")
            self.retries_left -= 1
            note = f"round gave no new best: retry ({self.retries_left} left)"
        else:
            self.retries_left = self.retries
            note = "neuron phase done"
        self._restore_best()
        if self._dendrites() >= self.max_dendrites:
            return self._finish(val_score, "max_dendrites reached")
        note += "; " + self._grow_or_start()
        self.phase_epochs = self.stale_epochs = 0
        if self.pm.mode == "gd":
            self.round_improved = False
        self._rebuild()
        self._event(val_score, Decision.RESTRUCTURED, note)
        return Decision.RESTRUCTURED

    def _dendrite_step(self, val_score: float, mark: int) -> Decision:
        if mark:
            self.stale_epochs = 0
        else:
            self.stale_epochs += 1
        if self.stale_epochs < self.dendrite_patience and self.phase_epochs < self.max_dendrite_epochs:
            self._event(val_score, Decision.CONTINUE, "")
            return Decision.CONTINUE
        self.pm.install_candidates(v_init=self.v_init)
        self.rounds += 1
        self.phase_epochs = self.stale_epochs = 0
        self.round_improved = False
        self._rebuild()
        self._event(val_score, Decision.RESTRUCTURED, f"installed dendrite {self._dendrites()}")
        return Decision.RESTRUCTURED

    # -- state ---------------------------------------------------------------------------
    _SCALARS = ("epoch", "best_score", "best_epoch", "phase_epochs", "stale_epochs", "round_improved",
                "retries_left", "rounds", "candidate_best", "done")

    def state_dict(self) -> dict:
        """Everything needed to resume: counters, history and the best-validation weights."""
        sd = {k: getattr(self, k) for k in self._SCALARS}
        sd["history"] = copy.deepcopy(self.history)
        sd["best_state"] = self.best_state
        return sd

    def load_state_dict(self, sd: dict) -> None:
        for k in self._SCALARS:
            setattr(self, k, sd[k])
        self.history = copy.deepcopy(sd["history"])
        self.best_state = sd["best_state"]
