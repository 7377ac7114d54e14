"""PhaseSchedule: PB's phase decisions as plain data (docs/algorithm.md). No torch here.

One call per epoch: the validation score (and, in the dendrite phase, whether some site's
candidate correlation improved) goes in, an Action comes out. Whoever owns the model
carries the action out (PhaseController does):

    CONTINUE         keep training; `new_best` says to snapshot the weights as the best so far
    START_DENDRITES  rewind to the best weights, attach candidates (mode "pb")
    GROW             rewind to the best weights, add one random dendrite per site (mode "gd")
    RETRY            the round gave no new best: rewind to the best weights (dropping its
                     dendrite) and start the round again (START_DENDRITES or GROW by mode)
    INSTALL          install the best candidates as a new dendrite, back to the neuron phase
    COMPLETE         drop candidates if any, rewind to the best weights; the run is over
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Optional

from .config import ConfigError, PBConfig
from .errors import TrainingError

__all__ = ["PhaseSchedule", "Action", "Kind", "check_score", "score_of", "site_progressed"]


def site_progressed(counted: int, warmup: int, value: float, noise: float, reference: float, rel: float) -> bool:
    """Whether one site's candidates made progress in an epoch (its pool's `epoch_progress` gives the numbers).

    `value`: the mean over channels of the best member's current |correlation| (the current estimate, not best
    |C~|: a running maximum of a noisy estimate keeps rising by chance alone); `noise`: its standard error;
    `reference`: the value at the last progress. Progress is a rise beyond `rel` (relative) and beyond the
    noise. Per site, not per channel: with hundreds of channels one always gains by chance. While the pool
    warms up (`counted` <= `warmup` batches) an estimate that is not yet reliable cannot be called stale, so a
    pool that has counted a batch progresses.
    """
    if counted <= warmup:
        return counted > 0
    gain = value - reference
    return gain > rel * reference and gain > noise


def score_of(val_score) -> float:
    """A validation score as a float: anything float() takes (a Python, numpy or Decimal number, a
    0-d array, a one-element tensor) except text and bools; anything else (None, "0.5") is refused
    in one line before the schedule sees it."""
    if not isinstance(val_score, (str, bytes, bool)) and val_score is not None:
        try:
            return float(val_score)
        except (TypeError, ValueError):
            pass  # refused below
    raise ConfigError(f"step() takes the epoch's validation score as a number, got {type(val_score).__name__} "
                      f"{val_score!r}: pass e.g. float(accuracy)")


def check_score(score: float, diverged_ok: bool = False, phase: str = "neuron") -> None:
    """Refuse a validation score that is not finite, in one line; diverged_ok: a neuron phase
    after a finite best takes it (`PhaseSchedule.takes_divergence`)."""
    if math.isfinite(score) or diverged_ok:
        return
    if phase == "dendrite":  # (the frozen model scored finitely when the phase began)
        raise TrainingError(f"the validation score is {score} (not finite) in a dendrite phase, whose frozen model's "
                            "output the candidates do not change: check the validation data and the metric for "
                            "NaN/Inf")
    raise TrainingError(f"the validation score is {score} (not finite) before any finite best: check the "
                        "validation data and the metric for NaN/Inf, or a learning rate that diverges at once")


class Kind(str, enum.Enum):
    CONTINUE = "continue"
    START_DENDRITES = "start_dendrites"
    GROW = "grow"
    RETRY = "retry"
    INSTALL = "install"
    COMPLETE = "complete"


@dataclass(frozen=True)
class Action:
    """What to do after an epoch. `new_best`: this epoch's weights are the best so far."""

    kind: Kind
    note: str = ""
    new_best: bool = False

    @property
    def restructures(self) -> bool:
        """The trainable parameter set changes (the optimizer must be rebound)."""
        return self.kind in (Kind.START_DENDRITES, Kind.GROW, Kind.RETRY, Kind.INSTALL)


class PhaseSchedule:
    """Decides phase switches, installs, retries and the end of a run from scores alone.

    The neuron phase ends after `patience` epochs without a gain of more than `improvement`
    (or after `neuron_epochs`). A round that set no new best is retried with fresh dendrites
    while `retries` last; the run completes when none are left or `max_dendrites` is reached.
    The dendrite phase ends after `dendrite_patience` epochs without candidate progress or
    after `max_dendrite_epochs`.
    """

    def __init__(self, config: Optional[PBConfig] = None, *, phase: str = "neuron", dendrites: int = 0):
        """phase / dendrites: where the model starts (a model already in a dendrite phase, say)."""
        if phase not in ("neuron", "dendrite"):
            raise TrainingError(f"phase {phase!r} is not a PB phase: use 'neuron' or 'dendrite'")
        self.config = PBConfig.coerce(config, "PhaseSchedule's config") or PBConfig()
        self.epoch = 0
        self.phase = phase
        self.best_score: Optional[float] = None
        self.best_epoch = -1
        self.dendrites = dendrites   # dendrites per site now
        self.best_dendrites = dendrites  # ... in the best-scoring model
        self.phase_epochs = 0        # epochs in the current phase
        self.stale_epochs = 0        # epochs without progress in the current phase
        self.round_improved = True   # did this round set a new best (round 0 counts)
        self.retries_left = self.config.retries
        self.rounds = 0              # dendrite rounds carried out (accepted or not)
        self.done = False

    def _better(self, score: float) -> bool:
        if self.best_score is None:
            return True
        gain = score - self.best_score if self.config.maximize else self.best_score - score
        return gain > self.config.improvement

    @property
    def takes_divergence(self) -> bool:
        """Whether a non-finite score is taken now: in a neuron phase after a finite best, where it
        ends the phase at once (the weights diverged; the switch rewinds to the best ones). Else it
        is refused: before any best it points at the data or the metric, and in a dendrite phase,
        whose candidates do not reach the output, the score decides nothing and the base is frozen."""
        return self.phase == "neuron" and self.best_score is not None

    def step(self, score: float, candidate_progress: bool = False, cause: Optional[str] = None) -> Action:
        """The action after one epoch with validation `score` (candidate_progress: dendrite phase only;
        cause: what made a non-finite score, for the note, default "score nan")."""
        if self.done:
            return Action(Kind.COMPLETE, "already complete")
        score = score_of(score)  # (a numpy or tensor score kept as it is made state_dict() no JSON)
        # (also in a dendrite phase, where the score decides nothing: it would enter the history)
        check_score(score, self.takes_divergence, self.phase)
        self.epoch += 1
        self.phase_epochs += 1
        if self.phase == "dendrite":
            return self._dendrite_step(candidate_progress)
        diverged = not math.isfinite(score)
        new_best = not diverged and self._better(score)
        if new_best:
            self.best_score, self.best_epoch, self.best_dendrites = score, self.epoch, self.dendrites
            self.stale_epochs = 0
            self.round_improved = True
        else:
            self.stale_epochs += 1
        cfg = self.config
        if not diverged and self.stale_epochs < cfg.patience and (cfg.neuron_epochs is None
                                                                  or self.phase_epochs < cfg.neuron_epochs):
            return Action(Kind.CONTINUE, "", new_best)
        # The neuron phase is over: accept the round, retry it, or finish (docs/algorithm.md).
        action = self._phase_over(new_best)
        if diverged:
            return Action(action.kind, f"{cause or f'score {score}'}: diverged; " + action.note, new_best)
        return action

    def _phase_over(self, new_best: bool) -> Action:
        cfg = self.config
        retry = not self.round_improved
        if retry:
            if self.retries_left <= 0:
                tries = "" if cfg.retries == 0 else f" after {cfg.retries} retr{'y' if cfg.retries == 1 else 'ies'}"
                return self._complete(f"no new best{tries}", new_best)
            self.retries_left -= 1
            note = f"round gave no new best: retry ({self.retries_left} left)"
        else:
            self.retries_left = cfg.retries
            note = "neuron phase done"
        self.dendrites = self.best_dendrites  # every switch rewinds to the best weights
        if self.dendrites >= cfg.max_dendrites:
            return self._complete("max_dendrites reached", new_best)
        self.phase_epochs = self.stale_epochs = 0
        if cfg.mode == "gd":
            self.dendrites += 1
            self.rounds += 1
            self.round_improved = False
            return Action(Kind.RETRY if retry else Kind.GROW, note + "; grew random dendrites (gd)", new_best)
        self.phase = "dendrite"
        return Action(Kind.RETRY if retry else Kind.START_DENDRITES, note + "; dendrite phase started", new_best)

    def _dendrite_step(self, progress: bool) -> Action:
        cfg = self.config
        if self.dendrites >= cfg.max_dendrites:  # (a run resumed under a lower max_dendrites: no round's install fits)
            self.phase = "neuron"
            self.phase_epochs = self.stale_epochs = 0
            return self._complete(f"max_dendrites ({cfg.max_dendrites}) reached: the round's candidates dropped", False)
        self.stale_epochs = 0 if progress else self.stale_epochs + 1
        if self.stale_epochs < cfg.dendrite_patience and self.phase_epochs < cfg.max_dendrite_epochs:
            return Action(Kind.CONTINUE)
        self.phase = "neuron"
        self.dendrites += 1
        self.rounds += 1
        self.phase_epochs = self.stale_epochs = 0
        self.round_improved = False
        return Action(Kind.INSTALL, f"installed dendrite {self.dendrites}")

    def stop(self, note: str = "stopped") -> Action:
        """End the run now (an epoch cap, an error): COMPLETE, rewinding to the best weights."""
        if self.done:
            return Action(Kind.COMPLETE, note)
        self.phase = "neuron"
        self.phase_epochs = self.stale_epochs = 0
        return self._complete(note, False)

    def _complete(self, note: str, new_best: bool) -> Action:
        self.done = True
        self.dendrites = self.best_dendrites
        return Action(Kind.COMPLETE, note, new_best)

    # -- state ---------------------------------------------------------------------------
    _STATE = ("epoch", "phase", "best_score", "best_epoch", "dendrites", "best_dendrites", "phase_epochs",
              "stale_epochs", "round_improved", "retries_left", "rounds", "done")

    def state_dict(self) -> dict:
        """JSON-safe counters; with the same config, load_state_dict() continues identically."""
        return {**{k: getattr(self, k) for k in self._STATE}, "retries_used": self.config.retries - self.retries_left}

    def load_state_dict(self, state: dict) -> None:
        """The counters of `state_dict()`; under a config with other `retries`, the retries the round
        has used count against the new number (the saved number of retries left would keep the old)."""
        missing = [k for k in self._STATE if k not in state]
        if missing:
            raise TrainingError(f"schedule state lacks {missing[0]!r}: it was not written by PhaseSchedule.state_dict()")
        for k in self._STATE:
            setattr(self, k, state[k])
        used = state.get("retries_used")  # (a state written before it was saved: at most the new number)
        self.retries_left = (min(self.retries_left, self.config.retries) if used is None
                             else max(0, self.config.retries - used))
