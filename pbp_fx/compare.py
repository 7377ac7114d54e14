"""Did PB pay? The arms a fair comparison needs, trained alike, with paired differences.

    result = compare("model.py", width=0.25, seeds=5, out="runs/compare")
    print(result["verdict"])

Every arm trains on the model file's data (one split), with the same optimizer (Adam at
TrainConfig.lr), the same data order per seed and the same early-stopping rule (PhaseSchedule:
`patience` epochs without a gain of `improvement` on validation, at most `epochs`); the test
score is read at the best-validation epoch. Arms:

  plain          the model at `width`, trained to early stop
  restarts       the PB schedule with nothing installed: the same neuron phases, rewinds to the
                 best weights and optimizer restarts (a dendrite phase trains nothing here)
  pb, gd         PB with correlation-trained dendrites; dendrites trained by backprop
  plain-matched  a plain model scaled to the parameter count pb ended with (same seed, +-5%)
  original       with width < 1: the model at width 1 (the "N% smaller at equal accuracy" question)

Parameters are those the model's outputs depend on at the example inputs (`width.used_parameters`),
for every arm: a module `forward` never calls counts in no arm, as in PB's captured graph.

Outputs (with `out`): compare.md, compare.json, compare.png. While it runs, OUT/compare.partial.json keeps
every finished run: after an interrupt, the same command continues from them.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import types
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from .config import MAX_INT, PBConfig, TrainConfig
from .controller import NON_FINITE_STOP, all_finite, default_optimizer, nan_weights_before_best
from .errors import PBError, PBWarning, Terminated, TrainingError, warn_at_user
from .fileio import atomic_write, check_output_dir
from .job import (DEFAULT_MODEL, changed_since, check_data, digest_matches, load_job_module, make_loaders,
                  pyplot_or_none, refuse_frozen_model, run_identity, seed_everything, seeded_datasets)
from .modelfile import (check_metric_direction, example_kwargs, instantiate, keyword_collate, task_functions,
                        warn_unread_names)
from .passes.find_sites import site_filters
from .schedule import Kind, PhaseSchedule
from .signals import interrupts_kept, stops_held
from .tracing import copy_module
from .training import (IGNORED_LABEL, NonFiniteDataError, NonFiniteError, NonFiniteLossError, accuracy, class_indices,
                       evaluate, split_batch, train_epoch)
from .width import WidthBuilder, WidthError

__all__ = ["compare", "CompareError", "Score", "ARMS", "train_plain", "train_restarts", "train_perforated",
           "run_arm", "summarize", "paired", "verdict", "markdown", "plot", "KeptRuns"]

ARMS = ("plain", "restarts", "pb", "gd", "plain-matched", "original")
REFERENCE_ARM = "pb"


class CompareError(PBError, ValueError):
    """A compare request that cannot run (bad arms, seeds, width or output folder)."""


@dataclass(frozen=True)
class Score:
    """How the report writes the test score: the built-in accuracy in % and its differences in
    points; any other metric (the model file's own, or minus the loss) in its own units."""

    metric: str = "accuracy"
    maximize: bool = True
    percent: Optional[bool] = None  # None: the metric named "accuracy" is the built-in one

    def __post_init__(self) -> None:
        if self.percent is None:
            object.__setattr__(self, "percent", self.metric == "accuracy")

    @property
    def scale(self) -> float:
        return 100.0 if self.percent else 1.0

    @property
    def unit(self) -> str:
        return " %" if self.percent else ""

    @property
    def diff_unit(self) -> str:
        return " points" if self.percent else ""

    def num(self, x: float, sign: bool = False) -> str:
        """x (already scaled) as printed: 1 decimal for % (2 significant digits for a nonzero value that
        rounds to 0 there: a lead of a few hundredths of a point on a large test set is no tie),
        4 significant digits otherwise; never -0."""
        spec = ".1f" if self.percent else ".4g"
        if self.percent and math.isfinite(x) and abs(x) < 0.05:
            spec = ".2g" if abs(x) > 1e-9 else ".1f"  # (below 1e-9 points: float rounding of equal scores)
            x = x if abs(x) > 1e-9 else 0.0
        shown = float(f"{x:{spec}}") + 0.0 if math.isfinite(x) else x  # (+ 0.0: a rounded -0 prints 0)
        return f"{shown:{'+' if sign else ''}{spec}}"

    def rounded(self, x: float) -> float:
        """x as printed, so that words (ahead/level/behind) match the number."""
        return float(self.num(x))

    def value(self, mean: float, sd: Optional[float] = None, n: int = 2) -> str:
        """mean ± sd as printed, with the unit."""
        return self.spread(mean, sd, n) + self.unit

    def spread(self, mean: float, sd: Optional[float] = None, n: int = 2, sign: bool = False) -> str:
        """mean ± sd as printed, without the unit; one run (n < 2) has no spread to print."""
        return self.num(mean, sign=sign) + ("" if sd is None or n < 2 else f" ± {self.num(sd)}")

    def label(self) -> str:
        return "test %" if self.percent else f"test {self.metric}"


ACCURACY = Score()


# -- one training loop for every arm: training.train_epoch ------------------------------------
def _snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _neuron_training(model, loaders, loss_fn, config: PBConfig, training: TrainConfig, *,
                     restarts: bool, metric, params=None) -> dict:
    """Adam + PhaseSchedule's early-stopping rule. restarts=False: stop at the end of the first
    neuron phase (plain early stopping: `patience` epochs without a gain, at most `epochs`; a
    `neuron_epochs` cap on PB's phases does not apply, or plain would get a fraction of the other
    arms' budget). restarts=True: follow the PB schedule with nothing installed: rewind to the
    best weights at each switch, restart the optimizer at each "install", end when the schedule
    completes."""
    train, val, _test = loaders
    config = config.replace(mode="pb")
    if not restarts:
        config = config.replace(neuron_epochs=None)
    schedule = PhaseSchedule(config)
    trained = list(model.parameters() if params is None else params)
    new_optimizer = lambda: default_optimizer(trained, lr=training.lr)  # noqa: E731
    optimizer, best, rounds, epochs, diverged = new_optimizer(), _snapshot(model), 0, 0, []
    for epochs in range(1, training.epochs + 1):
        if schedule.phase == "neuron":
            try:
                train_epoch(model, train, loss_fn, optimizer, None)
                # NaN weights that the metric scores finite (accuracy: argmax of NaN is class 0) are no best
                finite = all_finite(trained)
                score = evaluate(model, val, metric, data="validation") if finite else math.nan
            except NonFiniteLossError as exc:
                if not (exc.diverged and schedule.takes_divergence):
                    raise
                score, finite = math.nan, True  # diverged after a best: the schedule goes back to it, as fit's does
            if not finite and not schedule.takes_divergence:
                raise NonFiniteError(nan_weights_before_best(epochs))
            if not math.isfinite(score):
                diverged.append(epochs)
        else:
            score = schedule.best_score  # a dendrite phase without dendrites changes nothing
        action = schedule.step(score, False)
        if action.new_best:
            best = _snapshot(model)
        if action.kind is Kind.COMPLETE or (action.kind is not Kind.CONTINUE and not restarts):
            break
        if action.kind in (Kind.START_DENDRITES, Kind.RETRY):
            model.load_state_dict(best)
        elif action.kind is Kind.INSTALL:
            optimizer, rounds = new_optimizer(), rounds + 1
    model.load_state_dict(best)
    return {"epochs": epochs, "restarts": rounds, "val": schedule.best_score, "diverged_epochs": diverged}


def train_plain(model, loaders, loss_fn, config: PBConfig, training: TrainConfig, metric=None, params=None) -> dict:
    """The plain arm: Adam (on `params`, default all) to early stop (the first neuron phase of
    the PB schedule); the best-validation weights are loaded at the end."""
    return _neuron_training(model, loaders, loss_fn, config, training, restarts=False, metric=metric or accuracy,
                            params=params)


def train_restarts(model, loaders, loss_fn, config: PBConfig, training: TrainConfig, metric=None) -> dict:
    """The restarts arm: the PB schedule's rewinds and optimizer restarts with nothing installed."""
    return _neuron_training(model, loaders, loss_fn, config, training, restarts=True, metric=metric or accuracy)


def train_perforated(model, example_inputs, loaders, loss_fn, config: PBConfig, training: TrainConfig,
                     include=None, exclude=None, metric=None, example_kwargs=None):
    """The pb / gd arm (config.mode): perforate and fit. Returns (perforated model, result)."""
    from .perforated import perforate
    from .training import fit

    pm = perforate(model, example_inputs, include=include, exclude=exclude, activation=config.activation,
                   mode=config.mode, example_kwargs=example_kwargs, frontend=training.frontend)
    history = fit(pm, loaders[0], loaders[1], loss_fn, config=config, epochs=training.epochs, lr=training.lr,
                  progress=False, metric=metric or accuracy)
    return pm, {"epochs": len(history.epochs), "val": history.best_val, "dendrites": pm.dendrites,
                **_course(history.epochs, training.epochs)}


def _course(epochs: list[dict], cap: int) -> dict:
    """What a run's epoch records (History.epochs) say of its rounds and divergence; cap: its --epochs."""
    return {"dendrite_epochs": sum(r["phase"] == "dendrite" for r in epochs),
            # (gd has no dendrite phase: a round grows dendrites, which a rewind may take back)
            "grew": any(r["dendrites"] for r in epochs),
            "diverged_epochs": [r["epoch"] for r in epochs if r["val"] is None],
            # (the cap, not the phase's own end, stopped its only dendrite phase: no round of it finished)
            "cap_ended_only_round": bool(epochs) and epochs[-1]["phase"] == "dendrite" and epochs[-1]["epoch"] == cap
            and sum(r["phase"] == "dendrite" and (i == 0 or epochs[i - 1]["phase"] != "dendrite")
                    for i, r in enumerate(epochs)) == 1}


# -- latency -------------------------------------------------------------------------------
def onnx_latency_ms(model, example_inputs, repeats: int = 200, example_kwargs: Optional[dict] = None) -> float:
    """Median ONNX Runtime (CPU, 1 thread) latency of one call at the example inputs' batch."""
    from .exporters import export_onnx, ort_session, run
    from .exporters.onnx import flat_call, graph_inputs
    from .perforated import PerforatedModel, perforate

    if example_kwargs and not isinstance(model, PerforatedModel):
        # Only a captured graph orders keyword inputs for the file; a capture without dendrites is exact.
        model = perforate(model, example_inputs, example_kwargs=example_kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        # (torch.export's and the ONNX exporter's notes on the model's internals are about a file made only to
        # be timed: `pbp-fx export` keeps them to --debug too; pbp-fx's own go on, through the caller's filters)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            path = export_onnx(model, example_inputs, os.path.join(tmp, "model.onnx"), example_kwargs=example_kwargs)
        for text in dict.fromkeys(str(w.message) for w in said if issubclass(w.category, PBWarning)):
            warnings.warn(text, PBWarning, stacklevel=2)
        session = ort_session(path, device="cpu", threads=1)
    _, inputs = flat_call(model, graph_inputs(model, example_inputs, example_kwargs))
    arrays = tuple(t.numpy() for t in inputs if isinstance(t, torch.Tensor))
    for _ in range(20):
        run(session, arrays)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(session, arrays)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


# -- one run -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One arm at one seed. width: the multiplier it is built at; target: plain-matched's parameter count."""

    arm: str
    seed: int
    width: float
    target: Optional[float] = None


def _model_file_error(spec: RunSpec, exc: Exception) -> CompareError:
    return CompareError(f"{spec.arm} at seed {spec.seed}: {type(exc).__name__}: {_first_line(exc)} (from the model "
                        "file's model, data, loss or metric)")


def run_arm(model_file: Optional[str], spec: RunSpec, config: PBConfig, training: TrainConfig,
            include=None, exclude=None, latency: bool = True) -> dict:
    """Train one arm at one seed on the model file's data; the row of compare.json."""
    mod = load_job_module(model_file)
    loss_fn, metric, _ = task_functions(mod)
    data = seeded_datasets(mod, training.seed)  # one split for every arm and seed
    with torch.random.fork_rng(devices=[]):  # (a model to read the inputs' signature from)
        model_of_file, inputs = instantiate(mod)
    loaders = make_loaders(data, training.batch_size, spec.seed,  # data order fixed by the seed
                           collate=keyword_collate(mod, model_of_file, len(inputs)))
    builder = WidthBuilder.from_module(mod)
    row = {"arm": spec.arm, "seed": spec.seed}
    seed_everything(spec.seed)
    try:
        scaled = builder.for_params(spec.target) if spec.arm == "plain-matched" else builder.scaled(spec.width)
    except WidthError as exc:
        return {**row, "skipped": str(exc)}
    except (PBError, OSError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - raised inside the model file's build_model or its forward
        raise _model_file_error(spec, exc) from exc
    model = scaled.model
    row.update(width=scaled.width, width_method=scaled.method)
    _warm_up(model, inputs, example_kwargs(mod))
    t0 = time.perf_counter()
    try:
        if spec.arm in ("pb", "gd"):
            model, out = train_perforated(model, inputs, loaders, loss_fn, config.replace(mode=spec.arm), training,
                                          include, exclude, metric=metric, example_kwargs=example_kwargs(mod))
            params = model.num_parameters()
        elif spec.arm == "restarts":
            out, params = train_restarts(model, loaders, loss_fn, config, training, metric), builder.params(model)
        else:
            out, params = train_plain(model, loaders, loss_fn, config, training, metric), builder.params(model)
        row.update(out, seconds=time.perf_counter() - t0, params=params)
        row["test"] = evaluate(model, loaders[2], metric, data="test")
    except TrainingError as exc:
        if _diverged(exc):  # this run's own outcome (deterministic at its seed): not ranked, the others go on
            return {"arm": spec.arm, "seed": spec.seed, "skipped": f"its training diverged ({_first_line(exc)})"}
        raise CompareError(f"{spec.arm} at seed {spec.seed}: {_first_line(exc)}") from exc
    except (PBError, OSError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - raised inside the model file's model, data, loss or metric
        raise _model_file_error(spec, exc) from exc
    if not math.isfinite(row["test"]):  # (a mean and sd over it would be meaningless): not ranked
        return {"arm": spec.arm, "seed": spec.seed, "skipped": f"its test score is {row['test']} (not finite)"}
    if spec.target is not None:
        row["target_params"] = spec.target
    if latency:
        model.eval()
        row["latency_ms"] = onnx_latency_ms(model, inputs, example_kwargs=example_kwargs(mod))
    return row


def _diverged(exc: BaseException) -> bool:
    """Whether a training error is a loss gone non-finite by diverged weights (not NaN/Inf in the data
    itself, nor a loss the data made NaN: a batch whose labels are all ignored)."""
    for e in (exc, exc.__cause__):
        if isinstance(e, NonFiniteError) and not isinstance(e, NonFiniteDataError):
            return not isinstance(e, NonFiniteLossError) or e.diverged
    return False


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def _warm_up(model: torch.nn.Module, inputs: tuple, kwargs: dict) -> None:
    """One untimed training step (forward, backward, optimizer) on a copy of the model, so that a
    process's one-time costs (kernel selection, lazy initialisation: ~2 s) are not counted in its
    first arm's train time.
    Draws nothing from the generators the arms use; a model the example inputs cannot train is left
    to the arm, which reports it."""
    with torch.random.fork_rng(devices=[]), contextlib.suppress(Exception):  # (a warm-up only)
        twin = copy_module(model).train()
        optimizer = default_optimizer(twin.parameters())
        out = [t for t in torch.utils._pytree.tree_leaves(twin(*inputs, **kwargs))
               if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
        if out:
            sum(t.float().sum() for t in out).backward()
            optimizer.step()


# -- statistics ----------------------------------------------------------------------------
def _mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sd."""
    xs = list(xs)
    if len(xs) < 2 or _all_equal(xs):  # (equal values: sd 0, not float noise such as 1.11e-16)
        return statistics.mean(xs), 0.0
    return statistics.mean(xs), statistics.stdev(xs)


def summarize(rows: list[dict], score: Score = ACCURACY) -> list[dict]:
    """Per arm: n, test/params/latency/seconds/epochs mean and sd (test and val in the score's units:
    percent for accuracy)."""
    out = []
    for arm in ARMS:
        rs = [r for r in rows if r["arm"] == arm and "skipped" not in r]
        skipped = [r["skipped"] for r in rows if r["arm"] == arm and "skipped" in r]
        if not rs:
            if skipped:
                out.append({"arm": arm, "n": 0, "skipped": skipped[0]})
            continue
        s = {"arm": arm, "n": len(rs), "test_by_seed": {r["seed"]: score.scale * r["test"] for r in rs}}
        if skipped:  # ran at some seeds only: said beside the table, and left out of the ranking
            seeds = sorted(r["seed"] for r in rows if r["arm"] == arm and "skipped" in r)
            s["partial"] = f"not run at seed(s) {', '.join(map(str, seeds))}: {skipped[0]}"
            s["seeds_not_run"] = seeds
        if arm in ("pb", "gd"):  # (where it is the plain model: a difference from plain measures nothing there)
            s["bare_seeds"] = sorted(r["seed"] for r in rs if not _installed(r))
        if arm in ("pb", "gd") and all(not _installed(r) and not r.get("dendrite_epochs") and not r.get("grew")
                                       for r in rs):
            # (its first neuron phase did not end within the epochs: the plain run, with nothing grown)
            s["no_round"] = (f"{arm} ran no dendrite round at any seed (its first neuron phase did not end within "
                             "the epochs), so it is the plain run here: raise --epochs, or lower --patience")
        elif not any(_installed(r) for r in rs) and arm in ("pb", "gd"):
            # (rounds ran, and every one ended with nothing installed)
            capped = [r["seed"] for r in rs if r.get("cap_ended_only_round")]
            longer = ("a longer dendrite phase (--max-dendrite-epochs, --dendrite-patience) or more rounds "
                      "(--retries) might keep one" if arm == "pb" else "more rounds (--retries) might keep one")
            if capped:
                where = "every seed" if len(capped) == len(rs) else f"seed(s) {', '.join(map(str, capped))}"
                longer = (f"the epoch cap ended its only dendrite phase at {where}: raise --epochs"
                          + ("" if len(capped) == len(rs) else f"; at the others {longer}"))
            s["no_round"] = (f"{arm} ran dendrite rounds but kept no dendrite at any of its {len(rs)} seed(s), so "
                             f"there it is the plain model and a difference from plain is no effect of PB: {longer}")
        went_back = [f"{r['seed']} (epoch {', '.join(map(str, r['diverged_epochs']))})" for r in rs
                     if r.get("diverged_epochs")]
        if went_back:  # (said beside the table: those runs ended a phase early, at their best weights)
            s["diverged"] = (f"diverged after a best at seed(s) {', '.join(went_back)} and went back to its best "
                             "weights there")
        for key, scale in (("test", score.scale), ("val", score.scale), ("params", 1.0), ("latency_ms", 1.0),
                           ("seconds", 1.0), ("epochs", 1.0), ("width", 1.0)):
            vals = [r[key] * scale for r in rs if r.get(key) is not None]
            if vals:
                s[key], s[key + "_sd"] = _mean_sd(vals)
        out.append(s)
    return out


def paired(rows: list[dict], reference: str = REFERENCE_ARM, score: Score = ACCURACY) -> list[dict]:
    """Per arm, the per-seed difference arm - reference in the score's units (points for accuracy):
    mean, sd, n, seeds ahead."""
    ref = {r["seed"]: r["test"] for r in rows if r["arm"] == reference and "skipped" not in r}
    out = []
    for arm in ARMS:
        if arm == reference:
            continue
        diffs = _differences([(score.scale * r["test"], score.scale * ref[r["seed"]]) for r in rows
                              if r["arm"] == arm and "skipped" not in r and r["seed"] in ref])
        if diffs:
            mean, sd = _mean_sd(diffs)
            out.append({"arm": arm, "vs": reference, "mean": mean, "sd": sd, "n": len(diffs),
                        "ahead": sum(d > 0 for d in diffs), "behind": sum(d < 0 for d in diffs)})
    return out


def verdict(summary: list[dict], pairs: list[dict], score: Score = ACCURACY,
            majority: Optional[tuple[int, float]] = None) -> str:
    """Which arm won and by how much, in plain words, with the paired differences vs pb, in the
    score's units (score.maximize False: the model file's metric is lower-is-better). majority: the
    test set's (most frequent class, its share), which always predicting it scores (`majority_class`)."""
    maximize = score.maximize
    ran = [s for s in summary if s["n"]]
    if not ran:
        return "no arm finished"
    lines = []
    every = set().union(*(set(s["test_by_seed"]) for s in ran))  # the seeds some arm ran at
    left_out = [s for s in ran if set(s["test_by_seed"]) != every]
    # The seeds an arm misses where others ran are not a random sample (a run that diverged there;
    # plain-matched not built where pb grew), so its mean over the rest, or every arm's over the seeds
    # all ran, would be biased: only the arms that ran at every such seed are ranked (a seed no arm
    # ran takes nothing from any arm).
    ranked = sorted((s for s in ran if s not in left_out), key=lambda s: -s["test"] if maximize else s["test"])
    win = ranked[0] if ranked else None
    by_arm = {p["arm"]: p for p in pairs}
    test = f"test {score.metric}" if not score.percent else "test"
    if win is None:
        lines.append("no arm ran at every seed: no ranking (see the paired differences).")
    elif len(ranked) > 1 and not score.rounded(win["test"] - ranked[1]["test"]):  # (level as printed)
        tied = [s["arm"] for s in ranked if not score.rounded(win["test"] - s["test"])]
        lines.append(f"**no arm won**: {', '.join(tied)} tied at {test} {score.value(win['test'])} over {win['n']} "
                     "seed(s).")
    elif len(ranked) > 1:
        second = ranked[1]
        margin = (f"{score.num(abs(win['test'] - second['test']))}{score.diff_unit} "
                  f"{'ahead of' if maximize else 'below'} the next arm "
                  f"({second['arm']}, {score.value(second['test'], second['test_sd'], second['n'])})")
        if win["n"] < 2:  # one run each: a ranking, not a result
            lines.append(f"**{win['arm']} ranked first** at one seed: {test} {score.value(win['test'])}, {margin}; "
                         "one seed cannot tell a win from run-to-run noise.")
        else:
            # A win is a lead over EVERY other arm that stands out of the seeds' noise (paired by seed):
            # an arm ranked lower but noisier can be as close as the next one.
            def leads(other: dict) -> list[float]:  # over the seeds both ran (all of them for a ranked arm)
                both = sorted(set(win["test_by_seed"]) & set(other["test_by_seed"]))
                sign = 1 if maximize else -1
                return _differences([(sign * win["test_by_seed"][k], sign * other["test_by_seed"][k]) for k in both])

            def lead_interval(other: dict) -> tuple[float, float]:
                lead = leads(other)
                return _interval(*_mean_sd(lead), len(lead)) if len(lead) > 1 else (-math.inf, math.inf)

            # An arm left out of the ranking is still another arm: a win needs a lead over it too,
            # over the seeds both ran (plain-matched misses exactly the seeds where pb grew most).
            unbeaten = [o for o in left_out if lead_interval(o)[0] <= 0]

            closest = min(ranked[1:], key=lambda o: lead_interval(o)[0])  # the weakest lead
            lo, hi = lead_interval(closest)
            over = "" if closest is second else f" over {closest['arm']}"
            interval = (f"95 % interval of the paired lead{over} [{score.num(lo, sign=True)}, "
                        f"{score.num(hi, sign=True)}]")
            # Equal leads at every seed (common on small test sets: whole samples) leave no spread to
            # measure the noise with: the interval is a point, not evidence.
            flat = [o for o in ranked[1:] + left_out if len(leads(o)) > 1 and _all_equal(leads(o))]
            if lo > 0 and flat:
                lines.append(f"**{win['arm']} ranked first** over {win['n']} seeds: {test} "
                             f"{score.value(win['test'], win['test_sd'])}, {margin}; its lead over {flat[0]['arm']} is "
                             f"the same at every seed ({score.num(leads(flat[0])[0], sign=True)}), which leaves no "
                             "spread to measure seed noise with, so no arm is shown to win: run more seeds.")
            elif lo > 0 and unbeaten:
                o = unbeaten[0]
                olo, ohi = lead_interval(o)
                shown = (f"95 % interval [{score.num(olo, sign=True)}, {score.num(ohi, sign=True)}]"
                         if math.isfinite(olo) else "one seed in common")
                how = "is negative beyond seed noise" if ohi < 0 else "is not beyond seed noise"
                lines.append(f"**{win['arm']} ranked first** over {win['n']} seeds: {test} "
                             f"{score.value(win['test'], win['test_sd'])}, {margin}; but its lead over {o['arm']}, which "
                             f"ran at {o['n']} of the seeds, {how} over those ({shown}), so no arm is shown to win.")
            elif lo > 0:
                lines.append(f"**{win['arm']} won**: {test} {score.value(win['test'], win['test_sd'])} over "
                             f"{win['n']} seeds, {margin}; beyond seed noise against every other arm (the weakest "
                             f"lead: {interval}).")
            else:
                lines.append(f"**{win['arm']} ranked first** over {win['n']} seeds: {test} "
                             f"{score.value(win['test'], win['test_sd'])}, {margin}; not distinguishable from seed "
                             f"noise ({interval}), so no arm is shown to win.")
    else:
        lines.append(f"only {win['arm']} {'ran at every seed' if left_out else 'finished'}: {test} "
                     f"{score.value(win['test'], win['test_sd'], win['n'])}")
    if left_out:
        names = ", ".join(f"{s['arm']} ({s['n']} of {len(every)})" for s in left_out)
        lines.append(f"(left out of the ranking, run at some seeds only: {names}; the seeds an arm misses are not a "
                     "random sample, so its mean over the rest is no fair rank; its paired difference below is over "
                     "the seeds it ran)")
    words = {"plain": "the same model without PB", "restarts": "the PB schedule with nothing installed",
             "gd": "dendrites trained by backprop", "plain-matched": "a plain model with pb's parameter count",
             "original": "the model at width 1"}
    arms = {s["arm"]: s for s in ran}
    bare = set(arms["pb"].get("bare_seeds", ())) if "pb" in arms else set()
    tests = 0  # the pb − arm lines with an interval: each its own 95 % test
    for arm, what in words.items():
        p = by_arm.get(arm)
        if p is None:
            continue
        seeds_here = set(arms[arm]["test_by_seed"]) & set(arms["pb"]["test_by_seed"]) if "pb" in arms else set()
        if (arm in ("plain", "gd", "restarts") and seeds_here and seeds_here <= bare
                and (arm != "gd" or seeds_here <= set(arms[arm].get("bare_seeds", ())))
                and arms[arm].get("params") == arms["pb"].get("params") and not p["mean"] and not p["sd"]):
            # (the plain model's architecture, not always its weights: pb may train on after a round it took
            # back, so more seeds could show a difference, which would be more training, not PB)
            where = "any seed" if len(seeds_here) > 1 else "its seed"
            if arm == "restarts":
                lines.append(f"pb − restarts compares nothing: pb kept no dendrite at {where}, so it ran the PB "
                             "schedule with nothing installed there, as restarts does, and they score the same at "
                             "every seed.")
                continue
            lines.append(f"pb − {arm} compares nothing: pb{'' if arm == 'plain' else ' and gd'} kept no dendrite at "
                         f"{where}, so both are the plain model there, "
                         "and they score the same at every seed (a difference would be no effect of PB either).")
            continue
        if arm == "plain-matched" and set(arms[arm]["test_by_seed"]) <= bare:
            seeds = ", ".join(map(str, sorted(arms[arm]["test_by_seed"])))
            if bare >= set(arms["pb"]["test_by_seed"]):
                lines.append("pb − plain-matched compares nothing: pb kept no dendrite at any seed, so both are the "
                             "plain model.")
            else:
                lines.append(f"pb − plain-matched compares nothing: plain-matched ran only at seed(s) {seeds}, where pb "
                             "kept no dendrite, so both are the plain model there (below: why it was not run where pb "
                             "grew).")
            continue
        tests += p["n"] >= 2 and p["sd"] > 1e-9 * abs(p["mean"])
        pb_side = score.rounded(-p["mean"])  # as printed, so the words match the number
        better = pb_side if maximize else -pb_side
        sign = "ahead of" if better > 0 else "behind" if better < 0 else "level with"
        ahead, behind = (p["behind"], p["ahead"]) if maximize else (p["ahead"], p["behind"])
        seeds = f"{p['n']} seed{'s' if p['n'] != 1 else ''}"
        gap = f"level with {arm}" if not better else f"{score.num(abs(pb_side))}{score.diff_unit} {sign} {arm}"
        lines.append(f"pb is {gap} ({what}): paired difference "
                     f"pb − {arm} = {score.spread(pb_side, p['sd'], p['n'], sign=True)}{score.diff_unit} over "
                     f"{seeds} (pb ahead in {ahead}, behind in {behind}{'' if maximize else '; lower is better'}); "
                     f"{_noise(-p['mean'], p['sd'], p['n'], score)}.")
    if tests >= 2 and any("beyond seed noise" in line for line in lines if line.startswith("pb is")):
        lines.append(f"(Each pb − arm interval above is its own 95 % test: where no arm differs, at least one of "
                     f"{tests} reads \"beyond seed noise\" by chance about {1 - 0.95 ** tests:.0%} of the time, so one "
                     "alone among them is weak evidence; more seeds narrow every interval.)")
    if majority is not None:
        level = score.value(score.scale * majority[1])
        best = max((s["test"] for s in ran), default=None)
        if best is not None and score.rounded(best) <= score.rounded(score.scale * majority[1]):
            lines.append(f"**no arm beats the majority class**: always predicting class {majority[0]} scores {level} on "
                         "the test set, at least as much as the best arm, so at these settings no model has learned "
                         "more than the class frequencies (check the data and labels, or try another --lr or a longer "
                         "budget)")
        else:
            lines.append(f"(Always predicting the test set's most frequent class, {majority[0]}, scores {level}.)")
    skipped = [s for s in summary if not s["n"]]
    for s in skipped:
        lines.append(f"{s['arm']} was not run: {s['skipped']}")
    for s in summary:
        if s.get("partial"):
            lines.append(f"{s['arm']} was {s['partial']}")
        if s.get("diverged"):
            lines.append(f"{s['arm']} {s['diverged']}")
        if s.get("no_round"):
            lines.append(s["no_round"])
    return "\n".join(lines)


# Two-sided 95 % quantiles of Student's t by degrees of freedom (rounded up in the third decimal).
_T95 = {1: 12.707, 2: 4.303, 3: 3.183, 4: 2.777, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.307, 9: 2.263, 10: 2.229,
        11: 2.201, 12: 2.179, 13: 2.161, 14: 2.145, 15: 2.132, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.094,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.049,
        29: 2.046, 30: 2.043, 40: 2.022, 50: 2.009, 60: 2.001, 80: 1.991, 100: 1.984, 120: 1.980, 200: 1.972,
        500: 1.965, 1000: 1.963}


def _installed(row: dict) -> int:
    """Dendrites per site the run kept (a --pb-run's row holds them per site)."""
    kept = row.get("dendrites") or 0
    return max(kept.values(), default=0) if isinstance(kept, dict) else kept


def _interval(mean: float, sd: float, n: int) -> tuple[float, float]:
    """The 95 % Student-t interval of a mean over n >= 2 paired differences; between the table's
    degrees of freedom the lower one's (wider) quantile, never a narrower interval than the exact."""
    t = _T95[max(df for df in _T95 if df <= max(1, n - 1))]
    half = t * sd / math.sqrt(n)
    return mean - half, mean + half


def _all_equal(values: list[float]) -> bool:
    """Whether the values are one number up to float rounding (relative to the largest)."""
    return max(values) - min(values) <= 1e-9 * max(map(abs, values))


def _differences(pairs: list[tuple[float, float]]) -> list[float]:
    """a - b of each seed's (a, b) scores, 0 where it is float rounding of equal scores: within 1e-9 of that
    seed's larger score (relative to the scores, not to the differences; one seed's scores, not another's:
    a seed's -2.8e9 erased another's real difference of 0.049)."""
    return [0.0 if abs(a - b) <= 1e-9 * max(abs(a), abs(b)) else a - b for a, b in pairs]


def _noise(mean: float, sd: float, n: int, score: Score = ACCURACY) -> str:
    """Whether a paired mean difference over n seeds stands out of the seeds' noise: its 95 %
    t interval, and what that says."""
    if n < 2:
        return ("one seed gives no estimate of the run-to-run spread, so this may be noise (compare the model file "
                "with --seeds 3 or more)")
    if sd <= 1e-9 * abs(mean):  # the same difference at every seed: a point, not an estimate of the noise
        return ("the same difference at every seed, which leaves no spread to measure seed noise with (run more "
                "seeds)")
    lo, hi = _interval(mean, sd, n)
    verdict = ("not distinguishable from seed noise" if lo <= 0 <= hi
               else "beyond seed noise")
    return f"95 % interval [{score.num(lo, sign=True)}, {score.num(hi, sign=True)}]: {verdict}"


def markdown(summary: list[dict], pairs: list[dict], text: str, header: str, score: Score = ACCURACY) -> str:
    def ms(s, key, fmt):  # (one run: no spread to print)
        return "–" if key not in s else (fmt if s["n"] > 1 else fmt.split(" ± ")[0]).format(s[key], s[key + "_sd"])

    by_arm = {p["arm"]: p for p in pairs}
    lines = [header, "", f"| arm | n | {score.label()} | Δ vs pb (paired) | params | ONNX Runtime ms (example inputs, 1 thread) | train s | "
             "epochs | width |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        if not s["n"]:
            lines.append(f"| {s['arm']} | 0 | not run: {s['skipped']} | | | | | | |")
            continue
        p = by_arm.get(s["arm"])
        delta = "–" if p is None else score.spread(p["mean"], p["sd"], p["n"], sign=True)
        lines.append(f"| {s['arm']} | {s['n']} | {score.spread(s['test'], s['test_sd'], s['n'])} | {delta} | "
                     f"{ms(s, 'params', '{:.0f} ± {:.0f}')} | {ms(s, 'latency_ms', '{:.3f} ± {:.3f}')} | "
                     f"{ms(s, 'seconds', '{:.3g} ± {:.2g}' if s.get('seconds', 0) < 100 else '{:.0f} ± {:.0f}')} | {ms(s, 'epochs', '{:.0f} ± {:.0f}')} | "
                     f"{ms(s, 'width', '{:.3g} ± {:.2g}')} |")
    return "\n".join(lines) + "\n\n" + text + "\n"


def plot(summary: list[dict], path: str, title: str = "", score: Score = ACCURACY) -> bool:
    """Test score vs parameters and vs ONNX Runtime latency, one point per arm, sd error bars;
    False when matplotlib is missing (nothing written)."""
    plt = pyplot_or_none(path)
    if plt is None:
        return False

    fig = figure(plt, summary, title, score)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110), CompareError, "plot")
    plt.close(fig)
    return True


# Each arm its own hollow marker, each smaller than the one before: arms at the same point (pb with no
# dendrite grown and plain) stay visible as nested shapes instead of the last one drawn hiding the others.
ARM_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")


def figure(plt, summary: list[dict], title: str, score: Score):
    """`plot`'s figure (pyplot as `plt`)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, s in enumerate(s for s in summary if s["n"]):
        style = {"marker": ARM_MARKERS[i % len(ARM_MARKERS)], "markersize": 13.0 * 0.82 ** i,
                 "markerfacecolor": "none", "markeredgewidth": 1.6, "linestyle": "none", "capsize": 3}
        for ax, key, label in ((axes[0], "params", "parameters"),
                               (axes[1], "latency_ms", "ONNX Runtime latency (ms, example inputs, 1 thread)")):
            if key in s:
                ax.errorbar(s[key], s["test"], xerr=s[key + "_sd"], yerr=s["test_sd"], label=s["arm"], **style)
                ax.set_xlabel(label)
    for ax in axes:
        ax.set_ylabel(f"test {score.metric} at best validation" + (" (%)" if score.unit else "")
                      + ("" if score.maximize else ", lower is better"))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
    axes[0].set_xscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# -- the comparison ------------------------------------------------------------------------
MAX_SEEDS = 10_000


def _check(model_file, arms, seeds, width, jobs, out, config, training, include, exclude) -> tuple[Score, dict, float]:
    """Refuse bad input before any training (one-line errors); returns how the report writes the
    score, the model file's and data's `run_identity`, and the width the model is built at (channel
    counts are whole numbers)."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise CompareError(f"arm {unknown[0]!r} is not an arm: use some of {', '.join(ARMS)}")
    if not arms:
        raise CompareError(f"no arms to run: use some of {', '.join(ARMS)}")
    twice = next((a for i, a in enumerate(arms) if a in arms[:i]), None)
    if twice is not None:  # (its runs would be counted as more seeds of one arm)
        raise CompareError(f"arm {twice!r} is given twice: give each arm once")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise CompareError(f"--seeds {seeds!r}: must be a whole number of at least 1")
    if seeds > MAX_SEEDS:  # (the seed list alone had filled the memory)
        raise CompareError(f"--seeds {seeds}: must be at most {MAX_SEEDS} (each seed trains every arm once)")
    last = training.seed + seeds - 1
    if last > MAX_INT:  # (`pbp-fx train --seed` could not repeat those runs)
        raise CompareError(f"--seed {training.seed} with --seeds {seeds} runs up to seed {last}, past the largest "
                           f"seed ({MAX_INT}): give a smaller --seed")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise CompareError(f"--jobs {jobs!r}: must be a whole number of at least 1")
    if not (isinstance(width, (int, float)) and not isinstance(width, bool) and math.isfinite(width) and width > 0):
        shown = f"{width:g}" if isinstance(width, float) else repr(width)  # (the flag's 0, not 0.0)
        raise CompareError(f"--width {shown}: must be a positive number (1: the model as built)")
    if not isinstance(config, PBConfig) or not isinstance(training, TrainConfig):
        raise CompareError("config must be a PBConfig and training a TrainConfig")
    if "original" in arms and width >= 1:  # (it would be plain again, ranked as another arm)
        raise CompareError(f"arm 'original' is the model at width 1 beside arms at --width below 1, but --width is "
                           f"{width:g}: drop it, or give a --width below 1")
    if out is not None:
        check_output_dir(out, CompareError)
    mod = load_job_module(model_file)
    check_metric_direction(mod, config.maximize, CompareError)
    warn_unread_names(mod)
    _, metric, name = task_functions(mod)
    # % and points for the built-in accuracy only; a name such as "<lambda>" reads as "metric"
    score = Score(name if name.isidentifier() or " " in name else "metric", config.maximize,
                  percent=metric is accuracy)
    builder = WidthBuilder.from_module(mod)
    _, inputs = instantiate(mod)
    torch.manual_seed(training.seed)
    try:
        scaled = builder.scaled(width)
    except WidthError as exc:
        raise CompareError(f"--width {width:g}: {exc}") from exc  # every arm needs this width
    model = scaled.model
    refuse_frozen_model(model, CompareError)
    if width != 1 and scaled.width == 1:  # (every arm would be the model as built, reported at another width)
        how = (f"rounds to build_model's own width {builder.base_width} (or the nearest it accepts)"
               if builder.base_width is not None else
               "leaves the model as built: its hidden channel counts round back to their own, or it has none to "
               "remove (its layers make its outputs), and build_model takes no width argument")
        raise CompareError(f"--width {width:g} {how}: give a --width further from 1 that changes the model"
                           f"{'' if builder.base_width is not None else ', or add a width argument'}")
    # The data `train` refuses (labels outside the classes, shapes the loss cannot take): refused here too,
    # before any warning (a refusal is one line).
    data = seeded_datasets(mod, training.seed)
    check_data(mod, data, model, inputs, training.batch_size)
    if any(a in ("pb", "gd") for a in arms):
        from .perforated import perforate

        perforate(model, inputs, include=include, exclude=exclude, activation=config.activation,
                  example_kwargs=example_kwargs(mod), frontend=training.frontend)  # errors now, not after the plain arms
    if "plain-matched" in arms and builder.base_width is None and width >= 1:
        warn_at_user(f"plain-matched widens the model to pb's parameter count, and {builder.no_width_argument()}: it "
                     "is built only at seeds where pb kept no dendrite, where it is the plain model; give build_model "
                     "an int width argument (its hidden channel count), or compare at a --width below 1")
    _refuse_too_few_samples(data)
    majority = None
    if score.percent:
        test = make_loaders(data, training.batch_size, training.seed,
                            collate=keyword_collate(mod, model, len(inputs)))[2]
        majority = majority_class(test)
        # (the training split by its label tensor only: reading a whole image dataset would cost an epoch)
        labels = data[0].tensors[-1] if isinstance(data[0], TensorDataset) and len(data[0].tensors) > 1 else None
        train = majority_class([(None, labels)]) if labels is not None and len(labels) else None
        for split, found in (("training", train), ("test", majority)):
            if found is not None and found[1] == 1.0:  # (one class: nothing to learn, or nothing to tell arms apart by)
                raise CompareError(f"the {split} labels are all class {found[0]}: a comparison of classifiers needs "
                                   f"two classes or more in every split; check datasets()")
    # (the loss and metric by their code: a file that picks them by an environment variable scores otherwise)
    identity = {**run_identity(model_file, data, model), "task": {
        "loss": code_digest(task_functions(mod)[0]), "metric": code_digest(metric), "score": name}}
    return score, identity, scaled.width, majority


def code_digest(fn) -> str:
    """A loss's or metric's qualified name and a digest of what it computes with, the same in every process: its
    code, default arguments and closure values; a callable object's class code and attributes; what a
    functools.partial binds. Two that compute otherwise differ here."""
    name = getattr(fn, "__qualname__", type(fn).__qualname__)
    return f"{name}:{hashlib.sha256(_callable_text(fn).encode()).hexdigest()[:16]}"


def _callable_text(fn) -> str:
    if isinstance(fn, functools.partial):
        return "partial " + _callable_text(fn.func) + _stable(fn.args) + _stable(fn.keywords)
    code = getattr(fn, "__code__", None)
    if isinstance(code, types.CodeType):  # a function: its code, defaults and the values it closes over
        cells = []
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                cells.append(cell.cell_contents)
            except ValueError:  # (a cell not yet set)
                cells.append(None)
        return _stable(code) + _stable(fn.__defaults__) + _stable(fn.__kwdefaults__) + _stable(tuple(cells))
    call = getattr(type(fn), "__call__", None)
    if isinstance(getattr(call, "__code__", None), types.CodeType):  # a callable object: its class's code and state
        return _callable_text(call) + _stable(getattr(fn, "__dict__", None))
    return _stable(fn)


def _stable(value) -> str:
    """`value` as text that does not depend on the process: object addresses and set orders left out."""
    if isinstance(value, types.CodeType):
        return value.co_code.hex() + _stable(value.co_consts) + repr(value.co_names)
    if isinstance(value, (frozenset, set)):  # (`x in {"a", "b"}`: its repr's order follows the string hash seed)
        return "{" + ",".join(sorted(_stable(v) for v in value)) + "}"
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_stable(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ",".join(f"{_stable(k)}:{_stable(v)}" for k, v in value.items()) + "}"
    if isinstance(value, types.FunctionType):  # (its code only: a closure can hold the function itself)
        return _stable(value.__code__)
    if isinstance(value, functools.partial):
        return _callable_text(value)
    return re.sub(r"0x[0-9a-fA-F]+", "0x", repr(value))


MIN_EVAL_SAMPLES = 10  # fewer validation or test samples than this tell no arm from another


def _refuse_too_few_samples(data) -> None:
    """Refuse validation or test splits too small to rank arms by (their size known: a sized dataset)."""
    for split, dataset in zip(("validation", "test"), data[1:]):
        try:
            n = len(dataset)
        except TypeError:
            continue
        if n < MIN_EVAL_SAMPLES:
            raise CompareError(f"the {split} split holds {n} sample(s): a score on fewer than {MIN_EVAL_SAMPLES} "
                               "tells no arm from another (each sample moves it by 1/n); give datasets() larger "
                               "validation and test splits")


def majority_class(loader) -> Optional[tuple[int, float]]:
    """(the most frequent class, its share of the labels) over a loader's integer class labels, the ignored
    ones (-100) left out: what always predicting one class scores. None for other targets (soft or
    one-hot probabilities, floats) or none at all."""
    counts = torch.zeros(0, dtype=torch.long)
    for batch in loader:
        target = split_batch(batch)[1]
        if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.dtype == torch.bool:
            return None
        labels = class_indices(target).flatten().cpu()
        labels = labels[labels != IGNORED_LABEL]
        if labels.numel() and int(labels.min()) < 0:
            return None
        batch_counts = torch.bincount(labels)
        size = max(counts.numel(), batch_counts.numel())
        counts = F.pad(counts, (0, size - counts.numel())) + F.pad(batch_counts, (0, size - batch_counts.numel()))
    total = int(counts.sum())
    if not total:
        return None
    k = int(counts.argmax())
    return k, int(counts[k]) / total


class KeptRuns:
    """The finished runs of a comparison with an output folder, kept in OUT/compare.partial.json
    after each run, so that the same command continues an interrupted comparison from them.

    `key` holds everything a run's result depends on (the model file's content and a fingerprint
    of its data, `job.run_identity`, with the loss and metric by their code; the arms, seeds, width, settings, include/exclude, latency):
    kept runs are taken only under the same key; another key starts over. The file goes once the report is written."""

    def __init__(self, out: Optional[str], key: dict, echo: Callable[[str], None]):
        self.path = None if out is None else os.path.join(out, PARTIAL)
        # Folders this comparison makes (the output folder and missing parents, deepest first): a
        # comparison that ends with no report removes them again.
        self.made: list[str] = []
        folder = None if out is None else os.path.abspath(out)
        while folder is not None and not os.path.exists(folder) and folder != os.path.dirname(folder):
            self.made.append(folder)
            folder = os.path.dirname(folder)
        # As read back (lists, not tuples); a rule that is a function or type by its repr (a function's
        # differs in each process: its runs are never taken, since its behaviour cannot be compared).
        self.key = json.loads(json.dumps(key, default=repr))
        self.entries: list[dict] = []
        if self.path is None or not os.path.isfile(self.path):
            return
        try:
            with open(self.path) as f:
                saved = json.load(f)
            entries = saved["runs"] if saved["key"] == self.key else None
            taken = [e for e in entries or () if isinstance(e["row"], dict) and len(e["spec"]) == 4]
        except (OSError, ValueError, KeyError, TypeError):
            entries = taken = None
        if entries is None:
            echo(f"{self.path} holds the runs of another comparison (other settings, model file, built model or "
                 "data), or is unreadable: this one starts over")
            return
        self.entries = taken
        echo(f"continuing the interrupted comparison in {out}: its {len(taken)} finished run(s) are kept (delete "
             f"{self.path} to run them again)")

    def row(self, spec: "RunSpec") -> Optional[dict]:
        """The kept row of `spec`, or None."""
        ident = _spec_ident(spec)
        return next((e["row"] for e in self.entries if e["spec"] == ident), None)

    def add(self, spec: "RunSpec", row: dict) -> None:
        self.entries.append({"spec": _spec_ident(spec), "row": row})
        if self.path is None:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        body = json.dumps({"key": self.key, "runs": self.entries}, indent=1) + "\n"

        def write(tmp):
            with open(tmp, "w") as f:
                f.write(body)
        atomic_write(self.path, write, CompareError, PARTIAL)

    def close(self) -> None:
        """The report is written (the kept runs are in compare.json now), or none will be: the kept
        runs go, and so do the folders this comparison made where they are empty."""
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        for folder in self.made:
            with contextlib.suppress(OSError):  # (not empty: the report, or files of the user's)
                os.rmdir(folder)


PARTIAL = "compare.partial.json"


def _spec_ident(spec: "RunSpec") -> list:
    return json.loads(json.dumps([spec.arm, spec.seed, spec.width, spec.target]))


def _run_all(model_file, specs, config, training, include, exclude, latency, jobs, echo,
             score: Score = ACCURACY, kept: Optional[KeptRuns] = None, told: Optional[set] = None) -> list[dict]:
    """Every spec's row, in order: a kept one as it was, the others trained (and kept). told: the
    warnings said so far in the comparison, (arm, text) (`_said`)."""
    told = set() if told is None else told
    rows: dict[int, dict] = {}
    for i, spec in enumerate(specs):
        row = kept.row(spec) if kept is not None else None
        if row is not None:
            rows[i] = row
            echo(_row_text(row, score) + " (kept)")
    todo = [i for i in range(len(specs)) if i not in rows]
    args = [(model_file, specs[i], config, training, include, exclude, latency) for i in todo]

    def finished(i: int, row: dict) -> None:
        rows[i] = row
        if kept is not None:
            kept.add(specs[i], row)
        echo(_row_text(row, score))

    try:
        if jobs == 1 or len(todo) <= 1:
            # One thread, as in the workers: every run's wall time is measured alike, and a loaded
            # machine does not stall on intra-op threads. The caller's setting is restored.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with interrupts_kept(sigterm=False) as seen:
                    for i, a in zip(todo, args):
                        finished(i, _said(*_arm_with_warnings(*a), told))
                        if seen.received:  # (a Ctrl-C dropped in a weakref callback or a __del__, or swallowed)
                            raise seen.received[-1]()
            finally:
                torch.set_num_threads(threads)
        else:
            _run_in_workers(min(jobs, len(todo)), args, lambda k, row: finished(todo[k], _said(*row, told)))
    except BaseException as exc:  # (an arm's error: the warnings it gave first, then the error)
        spec, said = getattr(exc, "pbp_fx_warnings", (None, ()))
        _said(None, spec, said, told)
        raise
    return [rows[i] for i in range(len(specs))]


def _arm_with_warnings(*args) -> tuple[dict, RunSpec, list]:
    """run_arm(*args), its warnings kept: (row, spec, [(category, message, filename, lineno)]), the
    categories of other modules than Python's and pbp-fx's as UserWarning named in the message (a
    worker's result must unpickle in the command's process)."""
    def kept(caught) -> list:
        said = []
        for w in caught:
            category, text = w.category, str(w.message)
            if category.__module__ != "builtins" and not issubclass(category, PBWarning):
                category, text = UserWarning, f"{category.__name__}: {text}"
            said.append((category, text, w.filename, w.lineno))
        return said

    with warnings.catch_warnings(record=True) as caught:
        try:
            row = run_arm(*args)
        except BaseException as exc:  # (the warnings that led to it are said with its error)
            with contextlib.suppress(Exception):  # (an exception that refuses attributes: its own error stands)
                exc.pbp_fx_warnings = (args[1], kept(caught))
            raise
    return row, args[1], kept(caught)


def _said(row: dict, spec: RunSpec, said: list, told: Optional[set] = None) -> dict:
    """Say a run's warnings in this process, each naming its arm and seed (the CLI prints them as
    its own one-line warnings; a worker's printed in Python's format, naming neither); the row.
    told: (arm, text) said already at another seed, left out (a setting's warning at every seed)."""
    for category, text, filename, lineno in said:
        if told is not None and (spec.arm, text) in told:
            continue
        if told is not None:
            told.add((spec.arm, text))
        warnings.warn_explicit(f"{spec.arm} at seed {spec.seed}: {text}", category, filename, lineno)
    return row


WORKER_STOP_SECONDS = 10.0  # a stopped worker's time to leave Python before it is killed


def _start_worker(parent: Optional[int] = None) -> None:
    """A compare worker's setup: one thread, and a SIGTERM (the command stopping it) that ends it
    through Python, whose exit releases its named semaphores (tqdm's lock, which torch.fx makes):
    killed outright, a worker left them to the resource tracker, which warned of them on stderr
    after the command's one line. On Linux the worker gets that SIGTERM when the command's process
    dies (kill -9): it waited for work forever, holding the caller's output open."""
    import signal

    import threading

    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, _stop_worker)
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if parent is not None and os.getppid() != parent:  # (it died before the line above)
            raise SystemExit(143)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid() if parent is None else parent,), daemon=True,
                     name="pbp-fx compare: exit when orphaned").start()


ORPHAN_GRACE_S = 10.0  # how long an orphaned worker's own SIGTERM exit may take before it is ended outright


def _exit_when_orphaned(parent: int, grace: Optional[float] = None) -> None:
    """End the worker outright once its command's process is gone and `grace` seconds have passed
    (a watchdog thread). The death signal's exit (`_stop_worker`) comes first; one worker of a
    killed `compare --jobs 2` still outlived it by 30 s in a loaded test run, holding the caller's
    output open. Elsewhere than on Linux this is the only way an orphaned worker ends."""
    while os.getppid() == parent:
        time.sleep(0.5)
    time.sleep(ORPHAN_GRACE_S if grace is None else grace)
    os._exit(143)


def _stop_worker(_signum, frame) -> None:
    """SIGTERM in a worker. In an arm: Terminated, which ends it; the handler is then `_stopped_worker`,
    so that an arm already queued to the worker ends at its start, and the worker goes on to the
    pool's stop and exits. Idle: SystemExit, which ends the process quietly."""
    import signal

    while frame is not None:
        if frame.f_code is _arm_in_worker.__code__:
            signal.signal(signal.SIGTERM, _stopped_worker)
            raise Terminated()
        frame = frame.f_back
    raise SystemExit(143)


def _stopped_worker(_signum, frame) -> None:
    """SIGTERM in a worker told to stop already: as the first."""
    _stop_worker(_signum, frame)


def _arm_in_worker(*args) -> tuple:
    """run_arm in a compare worker, unless the worker has been told to stop (`_stop_worker`)."""
    import signal

    if signal.getsignal(signal.SIGTERM) is _stopped_worker:
        raise Terminated()
    return _arm_with_warnings(*args)


@contextlib.contextmanager
def _cancelled_future_errors_quiet():
    """Threads' uncaught InvalidStateError dropped inside (others reported as before). Why: Python 3.11's
    process-pool manager thread, marking the pool broken once its workers were stopped, sets an exception on
    the futures the interrupted map had cancelled, and printed that error's traceback after the command's one
    line (seen under load; Python 3.12's manager ignores it)."""
    import threading
    from concurrent.futures import InvalidStateError

    report = threading.excepthook

    def quiet(args) -> None:
        if not (isinstance(args.exc_type, type) and issubclass(args.exc_type, InvalidStateError)):
            report(args)

    threading.excepthook = quiet
    try:
        yield
    finally:
        threading.excepthook = report


def _run_in_workers(processes: int, args: list, finished: Callable[[int, dict], None]) -> None:
    """run_arm(*a) for each of `args` on spawned workers with one thread each (the runs go side by
    side on the cores); finished(k, row) in order.

    The workers ignore Ctrl-C: a terminal's Ctrl-C reaches the whole process group, and a worker
    still starting (inside `import torch`) printed its traceback, or left the pool waiting on it
    for good. This process alone handles it (and SIGTERM, a failed arm), and stops them."""
    import multiprocessing
    import signal
    import threading
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    before = set(multiprocessing.active_children())
    ex = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                             initargs=(os.getpid(),))
    done = False
    try:
        main = threading.current_thread() is threading.main_thread()
        # The workers start as the tasks are submitted (map submits them all now). A blocked signal stays
        # blocked across exec, so they never see Ctrl-C. Here a Ctrl-C in that window is held (pending in
        # this thread, or recorded when another thread, tqdm's monitor, takes it) and raised after
        # (ignored instead, it was lost and the command ran on: seen under load). Without signal masks:
        # ignored, which also stays across exec.
        masks = main and hasattr(signal, "pthread_sigmask")
        held: list = []
        if masks:
            previous = signal.signal(signal.SIGINT, lambda *_: held.append(True))
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        else:
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            results = ex.map(_arm_in_worker, *zip(*args))
        finally:
            if masks:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # (a pending one is recorded now)
            if main:
                signal.signal(signal.SIGINT, previous)
        if held:
            raise KeyboardInterrupt
        for k, row in enumerate(results):
            finished(k, row)
        done = True
    except BrokenProcessPool:
        raise CompareError("a compare worker process died while it trained an arm (killed, out of memory, or the "
                           "model file ended the process): rerun with --jobs 1 to see where") from None
    except SystemExit as exc:  # (an arm's sys.exit, passed back from its worker)
        raise CompareError(f"an arm's code called sys.exit({exc.code!r}) while it trained: rerun with --jobs 1 to "
                           "see where") from None
    finally:
        if done:  # idle workers exit on their own (terminated ones left their queues' semaphores to the
            ex.shutdown(wait=True)  # resource tracker, which warned of them on stderr)
        else:
            with _cancelled_future_errors_quiet():
                ex.shutdown(wait=False, cancel_futures=True)
                workers = set(multiprocessing.active_children()) - before
                for worker in workers:  # (mid-arm after Ctrl-C or a failed arm: they would run on for minutes)
                    worker.terminate()
                for worker in workers:  # (they stop through Python: `_stop_worker`)
                    worker.join(WORKER_STOP_SECONDS)
                for worker in workers:  # (its signal came where Python drops exceptions, a __del__)
                    if worker.is_alive():
                        worker.kill()
                        worker.join()
                ex.shutdown(wait=True)  # (its manager thread sees the workers gone and ends before the pipes close)
            # Python 3.10-3.11: a manager thread that found its workers killed can end without closing its
            # wake-up pipe, and concurrent.futures' exit handler then writes to it and prints a traceback
            # after the command's one line (seen once under load). The thread is gone: closing it is safe.
            wakeup = getattr(ex, "_executor_manager_thread_wakeup", None)
            if wakeup is not None:
                with contextlib.suppress(OSError):
                    wakeup.close()


def _row_text(r: dict, score: Score = ACCURACY) -> str:
    if "skipped" in r:
        return f"  {r['arm']:<14} seed {r['seed']}: not run ({r['skipped']})"
    lat = f", {r['latency_ms']:.3f} ms" if "latency_ms" in r else ""
    took = f"{r['seconds']:.0f} s" if r.get("seconds") is not None else f"from {r.get('from', 'its own run')}"
    return (f"  {r['arm']:<14} seed {r['seed']}: test {score.value(score.scale * r['test'])}  params {r['params']}  "
            f"epochs {r['epochs']}  ({took}{lat})")


def read_pb_run(folder: str) -> tuple[Optional[str], PBConfig, TrainConfig, dict, dict]:
    """A finished `pbp-fx train` run: (model file, PBConfig, TrainConfig, include/exclude, its pb row)."""
    from .checkpoint import read_controller_history, read_extra
    from .job import CHECKPOINT

    path, summary_path = os.path.join(folder, CHECKPOINT), os.path.join(folder, "summary.json")
    if not os.path.isfile(path):
        raise CompareError(f"--pb-run {folder}: no {CHECKPOINT} there; pass the --out folder "
                           "of a finished pbp-fx train run")
    state = read_extra(path).get("job_state")
    if state is None:  # (a pbp_fx.save checkpoint: train --resume refuses it too)
        raise CompareError(f"--pb-run {folder}: its {CHECKPOINT} was not written by pbp-fx train (no job state): pass "
                           "the --out folder of a finished pbp-fx train run")
    if not os.path.isfile(summary_path):
        raise CompareError(f"--pb-run {folder}: that run is unfinished ({CHECKPOINT} but no summary.json): finish it "
                           f"with pbp-fx train --resume {folder}, then compare")
    if any(e.get("note") == NON_FINITE_STOP for e in read_controller_history(path)):
        raise CompareError(f"--pb-run {folder}: that run stopped at a non-finite value (pbp-fx train exited with an "
                           "error) before its schedule ended, so it is no finished run: remove the cause its error "
                           "named and train it again, or compare the model file (compare then trains pb itself)")
    summary = _read_summary(folder, summary_path, state)
    if summary.get("epochs") != len(state.get("history", {}).get("epochs", [])):
        raise CompareError(f"--pb-run {folder}: its summary.json ({summary.get('epochs')} epochs) is not the report "
                           f"of its {CHECKPOINT} ({len(state.get('history', {}).get('epochs', []))} epochs): finish "
                           f"that run (pbp-fx train --resume {folder}) or pass the folder of a finished one")
    processes = max(n for n in (state.get("processes"), state.get("most_processes"), 1) if n is not None)
    if processes > 1:  # (the controls train in one process: another data order, so no pairing per seed)
        raise CompareError(f"--pb-run {folder}: that run trained in {processes} processes (train --nproc "
                           f"{processes}) for some or all of its epochs, whose data order is not the one-process "
                           "controls', so pb would not be paired with them: drop --pb-run (compare trains pb itself), "
                           "or train the run in one process")
    threads = state.get("threads")
    if isinstance(threads, int) and threads != 1:  # (torch's sums run in another order: not step for step)
        warn_at_user(f"--pb-run {folder}: that run trained on {threads} CPU threads and compare trains its controls "
                     "on 1, whose arithmetic differs, so pb is not paired with them step for step (where pb kept no "
                     "dendrite it may not score as plain does): train the run with OMP_NUM_THREADS=1 to pair them")
    if "training" in (state.get("identity") or {}).get("own_randomness", ()):
        warn_at_user(f"--pb-run {folder}: that run's training data draws augmentation from a generator of the "
                     "dataset's own, which the run's checks had read before training, so compare's controls see "
                     "other draws and are not paired with pb step for step: draw it from torch's, numpy's or "
                     "Python's global generator, or drop --pb-run (compare then trains pb beside them)")
    config, training = PBConfig.from_dict(state["args"]["config"]), TrainConfig.from_dict(state["args"]["training"])
    if config.mode != "pb":
        raise CompareError(f"--pb-run {folder}: that run has mode {config.mode!r}; the pb arm needs mode 'pb'")
    model_file = None if state["model_file"] == DEFAULT_MODEL else state["model_file"]
    # No train seconds: the run's own clock also counts its perforation, a checkpoint and a test evaluation
    # every epoch, and maybe a GPU, where the arms trained here are timed over their training alone (it
    # read 4-8 times theirs for the same work; a reviewer). Kept apart, as the run's own.
    epochs = state["history"]["epochs"]
    row = {"arm": "pb", "seed": training.seed, "width": 1.0, "width_method": "as trained", "from": folder,
           "run_seconds": summary["seconds"],
           **{k: summary[k] for k in ("test", "val", "params", "epochs", "dendrites")},
           # (as train_perforated's row has them: what the report says of rounds and divergence reads them)
           **_course(epochs, training.epochs)}
    scope = {"include": state["args"].get("include"), "exclude": state["args"].get("exclude"),
             "identity": state.get("identity")}
    return model_file, config, training, scope, row



# What compare reads of a run's summary.json: the types it must have, and their names.
SUMMARY_FIELDS = {"test": ((int, float), "a number"), "val": ((int, float), "a number"),
                  "params": ((int,), "a whole number"), "epochs": ((int,), "a whole number"),
                  "dendrites": ((dict,), "a mapping of sites to dendrites"), "seconds": ((int, float), "a number")}


def _read_summary(folder: str, summary_path: str, state: dict) -> dict:
    """A --pb-run's summary.json, refused in one line where it is no summary pbp-fx train wrote or its
    scores are not its checkpoint's (the best epoch's val and test in the run's history)."""
    where = f"--pb-run {folder}: its summary.json"
    try:
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:  # (json.JSONDecodeError is a ValueError)
        raise CompareError(f"{where} is not readable JSON ({_first_line(exc)}): restore it, or train the run "
                           "again") from None
    if not isinstance(summary, dict):
        raise CompareError(f"{where} holds {json.dumps(summary)[:40]}, not a run's summary (a mapping): restore it, "
                           "or train the run again")
    for key, (types, kind) in SUMMARY_FIELDS.items():
        value = summary.get(key)
        if isinstance(value, bool) or not isinstance(value, types):
            got = f"no {key!r}" if key not in summary else f"{key!r} {json.dumps(value)[:40]}"
            raise CompareError(f"{where} has {got}, which pbp-fx train writes as {kind}: restore it, or train the "
                               "run again")
    history = state.get("history", {})
    best = next((r for r in history.get("epochs", []) if r.get("epoch") == history.get("best_epoch")), None)
    for key in ("val", "test"):
        kept = None if best is None else best.get(key)
        # (the summary's scores come from an evaluation after the run restored its best weights: the
        # history's to rounding, which a GPU's kernels or another device may change)
        if not math.isfinite(summary[key]) or not isinstance(kept, (int, float)) or not math.isclose(
                summary[key], kept, rel_tol=1e-5, abs_tol=1e-12):
            raise CompareError(f"{where} gives {key} {summary[key]!r}, but its checkpoint's history has "
                               f"{kept!r} at the best epoch ({history.get('best_epoch')}): the file was edited, or "
                               "the score is not finite; restore it, or train the run again")
    return summary

def _continues_from_kept(exc: KeyboardInterrupt, kept, runs: int) -> KeyboardInterrupt:
    """A stop (Ctrl-C, SIGTERM) with runs kept: the same kind, saying that the same command continues from them."""
    if kept.path is None or not kept.entries:
        return exc
    return type(exc)(f"after {len(kept.entries)} of {runs} runs: the same command continues from them ({kept.path})")


def _refuse_changed_run(folder: str, identity: Optional[dict], model_file: Optional[str]) -> None:
    """Before any work: a --pb-run resumed on another model file or data (its epochs are of two
    runs), or whose model file is not the one given or found now (a run of another model)."""
    if not identity:
        return  # (saved before pbp-fx recorded it)
    mixed = identity.get("resumed_on_other")
    if mixed:
        raise CompareError(f"--pb-run {folder}: that run was resumed on another {' and '.join(mixed)} than it "
                           "started with, so its epochs are of two runs and its pb row is no one run's: train the "
                           "run again")
    if not digest_matches(identity, model_file):
        raise CompareError(f"--pb-run {folder}: the run's model file changed since it trained, or "
                           f"{model_file or DEFAULT_MODEL} is another model's, so its pb row cannot be compared with "
                           "controls trained now; restore it, or train the run again")


def _check_types(arms, width) -> None:
    """compare()'s arguments of the wrong kind, refused before anything reads them (one line)."""
    if arms is not None and (not isinstance(arms, (list, tuple)) or not all(isinstance(a, str) for a in arms)):
        raise CompareError(f"arms {arms!r}: must be a list of arm names, e.g. ['pb', 'plain']"
                           + (" (not one string)" if isinstance(arms, str) else ""))
    if isinstance(width, bool) or not isinstance(width, (int, float)):
        raise CompareError(f"width {width!r}: must be a number (1: the model as built)")


def compare(model_file: Optional[str] = None, *, width: float = 1.0, seeds: Optional[int] = None,
            arms: Optional[Sequence[str]] = None, config: Optional[PBConfig] = None,
            training: Optional[TrainConfig] = None, out: Optional[str] = None, jobs: int = 1,
            include=None, exclude=None, latency: bool = True, pb_run: Optional[str] = None,
            echo: Callable[[str], None] = print) -> dict:
    """Train every arm at seeds training.seed .. training.seed + seeds - 1 and compare them.

    arms: a subset of ARMS (default: all that apply; "original" only with width < 1).
    seeds: seeds per arm (default 3).
    jobs: worker processes (runs of one wave go side by side; plain-matched waits for pb).
    pb_run: the --out folder of a finished `pbp-fx train` run: it is the pb arm, and its model
    file, settings and seed are used (default arms then: plain, restarts; one seed); a model_file
    given with it is the run's file at a new path (its content must be the run's).
    Returns {"runs", "summary", "paired", "verdict", ...}, the content of compare.json.
    """
    given, run_saved_identity = [], None
    # (a dict of settings, as fit and the callbacks take it; anything else refused in one line)
    config, training = PBConfig.coerce(config, "compare's config"), TrainConfig.coerce(training, "compare's training")
    _check_types(arms, width)
    if config is not None and config.mode != "pb":  # (each arm runs in its own mode: the setting would be ignored)
        raise CompareError(f"mode {config.mode!r}: compare trains each arm in its own mode (the pb and gd arms); drop "
                           "mode (--mode) and choose the arms, e.g. --arms pb,gd")
    if pb_run is not None:
        if config is not None or training is not None or seeds is not None or width != 1.0:
            raise CompareError("--pb-run uses the run's own settings, seed and width: "
                               "give no budget flags, --seeds or --width with it")
        moved_to = model_file
        model_file, config, training, scope, pb_row = read_pb_run(pb_run)
        if moved_to is not None and model_file is None:
            raise CompareError(f"--pb-run {pb_run}: that run trained the built-in model ({DEFAULT_MODEL}), which "
                               f"compare finds by itself: drop the model file {moved_to}")
        if moved_to is not None:
            model_file = moved_to
        elif model_file is not None and not os.path.isfile(model_file):
            raise CompareError(f"--pb-run {pb_run}: the run's model file {model_file} does not exist (moved or "
                               f"renamed?): give its path, pbp-fx compare FILE --pb-run {pb_run}")
        run_saved_identity = scope["identity"]
        _refuse_changed_run(pb_run, run_saved_identity, model_file)
        include, exclude, seeds, given = scope["include"], scope["exclude"], 1, [pb_row]
        if arms is not None and "original" in arms:  # (it stands beside arms narrower than width 1)
            raise CompareError(f"--pb-run {pb_run}: arm 'original' is the model at width 1 beside narrower arms, but "
                               "the run's arms are at its own width: drop it")
        arms = [a for a in (arms or ("plain", "restarts")) if a != "pb"]
        if not arms:
            raise CompareError(f"--pb-run {pb_run} is the pb arm: give the arms to compare it with, e.g. --arms "
                               "plain,restarts")
        latency = False  # the run's model is not rebuilt here; no arm gets a latency, to stay comparable
    seeds = 3 if seeds is None else seeds
    config, training = config or PBConfig(), training or TrainConfig()
    include, exclude = site_filters(include, exclude)  # (the check and every arm perforate: lists)
    if arms is None:
        arms = [a for a in ARMS if a != "original" or width < 1]
    arms = list(arms)
    if "plain-matched" in arms and "pb" not in arms and not given:
        raise CompareError("plain-matched is sized from pb's parameter count: add the pb arm")
    score, identity, built, majority = _check(model_file, arms if not given else arms + ["pb"], seeds, width, jobs, out, config,
                                    training, include, exclude)
    shown = f"{built:.4g}" + ("" if abs(built - width) < 1e-9 else f" (--width {width:g} in whole channels)")
    changed = changed_since(run_saved_identity, identity) if given else []
    if changed:  # its pb row was measured on them: the controls would train on others
        raise CompareError(f"--pb-run {pb_run}: the run's {' and '.join(changed)} changed since it trained, so its pb "
                           f"row cannot be compared with controls trained now; restore {'them' if len(changed) > 1 else 'it'}"
                           ", or train the run again")
    seed_list = [training.seed + i for i in range(seeds)]
    t0 = time.perf_counter()
    echo(f"compare {model_file or DEFAULT_MODEL}: arms {', '.join(arms)}; {seeds} seed(s); width {shown}")
    # (the model file by its content, in identity: the path as typed, ./m.py for m.py, dropped the kept runs)
    kept = KeptRuns(out, {"identity": identity, "pb_run": given, "width": width,
                          "seeds": seed_list, "arms": arms, "config": config.to_dict(), "training": training.to_dict(),
                          "include": include, "exclude": exclude, "latency": latency}, echo)
    # Seed by seed (all seeds at once with jobs > 1): every finished seed is a complete pairing.
    rows, told = list(given), set()  # (told: the warnings said, each once per arm whatever its seeds)
    try:
        for wave in ([seed_list] if jobs > 1 else [[s] for s in seed_list]):
            first = [RunSpec(a, s, 1.0 if a == "original" else width) for s in wave for a in arms
                     if a != "plain-matched"]
            rows += _run_all(model_file, first, config, training, include, exclude, latency, jobs, echo, score, kept,
                             told)
            if "plain-matched" in arms:
                pb = {r["seed"]: r["params"] for r in rows if r["arm"] == "pb" and "skipped" not in r}
                matched = [RunSpec("plain-matched", s, width, float(pb[s])) for s in wave if s in pb]
                rows += _run_all(model_file, matched, config, training, include, exclude, latency, jobs, echo, score,
                                 kept, told)
    except KeyboardInterrupt as exc:  # (Ctrl-C or SIGTERM)
        raise _continues_from_kept(exc, kept, len(seed_list) * len(arms)) from None
    except CompareError as exc:  # an arm's run failed: the finished ones are kept
        if kept.path is None or not kept.entries:
            raise
        raise CompareError(f"{exc}; {len(kept.entries)} finished run(s) are kept in {kept.path}: the same command "
                           "continues from them while the model file and data are unchanged") from exc
    if rows and all("skipped" in r for r in rows):  # (a table of "not run" rows would answer nothing)
        first = rows[0]
        kept.close()  # (kept, they would end the same command here again)
        raise CompareError(f"no run finished: {first['arm']} at seed {first['seed']}: {first['skipped']}, and every "
                           f"other run too: try a lower --lr (now {training.lr:g}) or check the data and model file")
    try:
        summary = summarize(rows, score)
        pairs = paired(rows, score=score)
        text = verdict(summary, pairs, score, majority)
        name = model_file or DEFAULT_MODEL
        header = (f"`{os.path.basename(name)}` at width {shown}: test {score.metric}{' (%)' if score.unit else ''} "
                  f"at best validation{'' if config.maximize else ' (lower is better)'}, mean ± sd over "
                  f"{seeds} seed(s){'; Δ = arm − pb per seed' if 'pb' in arms or given else ' (no pb arm: no Δ)'}. Budget: epochs ≤ {training.epochs}, patience "
                  f"{config.patience}{'' if config.neuron_epochs is None else f', neuron phases ≤ {config.neuron_epochs} epochs'}"
                  f", max_dendrites {config.max_dendrites}, retries {config.retries}, dendrite phase ≤ "
                  f"{config.max_dendrite_epochs} epochs (patience {config.dendrite_patience}), Adam lr {training.lr}, "
                  f"batch {training.batch_size}.")
        result = {"model": name, "width": width, "built_width": built, "seeds": seed_list, "arms": arms, "metric": score.metric,
                  "score_scale": score.scale, "config": config.to_dict(),
                  "training": training.to_dict(), "include": include, "exclude": exclude, "runs": rows, "summary": summary,
                  "paired": pairs, "majority_class": None if majority is None else {"class": majority[0],
                                                                                   "share": majority[1]},
                  "verdict": text, "seconds": time.perf_counter() - t0}
        md = markdown(summary, pairs, text, header, score)
        echo("")
        echo(md)
        if out is not None:
            os.makedirs(out, exist_ok=True)
            # The report's files belong together: a stop (Ctrl-C, SIGTERM) waits until all are written and the
            # kept runs are dropped, so a folder never holds a new compare.json beside the last one's plot; the
            # report is then whole, and the command ends as done
            with stops_held(deliver=False) as held:
                for fname, body in (("compare.md", md), ("compare.json", json.dumps(result, indent=1) + "\n")):
                    def write(tmp, body=body):
                        with open(tmp, "w") as f:
                            f.write(body)
                    atomic_write(os.path.join(out, fname), write, CompareError, fname)
                png = os.path.join(out, "compare.png")
                plotted = plot(summary, png, title=f"{os.path.basename(name)} (width {built:.4g})", score=score)
                if not plotted and os.path.exists(png):  # (an earlier comparison's)
                    os.remove(png)
                kept.close()
            echo(f"wrote {out}/compare.md, {out}/compare.json" + (f", {out}/compare.png" if plotted else ""))
            if held:
                echo("note: a stop (Ctrl-C or SIGTERM) came while the report was written: it waited, and the report "
                     "is whole")
    except KeyboardInterrupt as exc:  # (before the report's files: the kept runs are there to continue from)
        raise _continues_from_kept(exc, kept, len(seed_list) * len(arms)) from None
    return result
