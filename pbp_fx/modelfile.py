"""Model files: a Python file with `build_model() -> nn.Module` and `example_inputs() -> tuple`.

    mod = load_model_file("model.py")          # imports it, checks the contract
    model, inputs = instantiate(mod)           # calls build_model() and example_inputs()
    kwargs = example_kwargs(mod)               # optional example_kwargs() -> dict, else {}

A model that takes keyword inputs (Hugging Face: `input_ids=..., attention_mask=...`) defines
`example_kwargs()` returning them as a dict; `example_inputs()` may then return `()`.

Every failure is a `ModelFileError` with a one-line message naming the file and the problem.
Optional names a model file may define: `datasets` (read by its users), and `TASK`, `loss_fn` and
`metric` (`task_functions`).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import inspect
import os
import re
import sys
from types import ModuleType
from typing import Callable, Optional

import torch
import torch.utils._pytree as pytree
from torch import nn

from .errors import ModelFileError, warn_at_user

__all__ = ["load_model_file", "instantiate", "example_kwargs", "keyword_collate", "KeywordCollate", "task_functions",
           "task_of", "REQUIRED", "TASKS"]

REQUIRED = ("build_model", "example_inputs")
TASKS = ("classification", "regression")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def load_model_file(path: str | os.PathLike, as_script: bool = False) -> ModuleType:
    """Import the model file at `path` as a fresh module and check that it follows the contract.

    The file's neighbours import while it is imported and inside its functions. as_script: its folder
    also stays on sys.path (last) for the rest of the process, as `python model.py` keeps it (first),
    so that a neighbour imported later inside a method of the file's classes (a forward, a Dataset's
    __getitem__) is found; the CLI loads files so.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError(f"model file {path!r} does not exist")
    if not os.path.isfile(path):
        raise ModelFileError(f"model file {path!r} is not a regular file")
    if not os.access(path, os.R_OK):
        raise ModelFileError(f"model file {path!r} is not readable (check its permissions)")
    full = os.path.abspath(path)
    stem = os.path.splitext(os.path.basename(full))[0]
    # One module name per file: two model files called model.py do not replace each other.
    name = f"pbp_model_{stem}_{hashlib.sha1(full.encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, full)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"model file {path!r} cannot be imported (is it a .py file?)")
    mod = importlib.util.module_from_spec(spec)
    folder = os.path.dirname(os.path.realpath(full))  # (a symlinked file imports beside its target, as python does)
    sys.modules[name] = mod
    try:
        with _importable(folder):  # so the file can import its neighbours
            spec.loader.exec_module(mod)
    except BaseException as exc:  # noqa: BLE001 - any failure of user code is reported, SystemExit included
        sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        if isinstance(exc, SyntaxError):
            elsewhere = exc.filename and os.path.abspath(exc.filename) != full
            what = f"{exc.msg} ({os.path.basename(exc.filename) + ', ' if elsewhere else ''}line {exc.lineno})"
        else:
            what = _first_line(exc)
        raise ModelFileError(f"importing model file {path!r} raised {type(exc).__name__}: {what}") from exc
    # ... also from inside its functions (`from layers import block` in build_model), when they run
    # (not generators: their bodies run after the call returns)
    for n, f in list(vars(mod).items()):
        if inspect.isfunction(f) and f.__module__ == name and not (
                inspect.isgeneratorfunction(f) or inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f)):
            setattr(mod, n, _run_importable(f, folder))
    if as_script and folder not in sys.path:
        sys.path.append(folder)  # (last: the process's own imports keep finding what they found)
    return check_contract(mod, f"model file {path!r}")


def check_contract(mod: ModuleType, what: str) -> ModuleType:
    """`mod` itself, when it defines build_model() and example_inputs() as functions; ModelFileError
    naming `what` ("model file 'm.py'") otherwise."""
    modules = [n for n in REQUIRED if isinstance(getattr(mod, n, None), nn.Module)]
    if modules:
        raise ModelFileError(f"{what} sets {modules[0]} to a module, not a function: define "
                             f"def {modules[0]}(): return ... (a new model for each call)")
    values = [n for n in REQUIRED if getattr(mod, n, None) is not None and not callable(getattr(mod, n))]
    if values:  # (`example_inputs = (x,)`: a value where a function is asked)
        kind = type(getattr(mod, values[0])).__name__
        raise ModelFileError(f"{what} sets {values[0]} to a value ({kind}), not a function: define "
                             f"def {values[0]}(): return ...")
    missing = [n for n in REQUIRED if not callable(getattr(mod, n, None))]
    if missing:
        raise ModelFileError(
            f"{what} does not define {' and '.join(f'{n}()' for n in missing)}: "
            "a model file needs build_model() -> nn.Module and example_inputs() -> tuple")
    return mod


@contextlib.contextmanager
def _importable(folder: str):
    """The model file's folder first on sys.path for the block (the file's neighbours import), and
    off it again after: the caller's imports stay as they were."""
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def _run_importable(f: Callable, folder: str) -> Callable:
    @functools.wraps(f)
    def call(*args, **kwargs):
        with _importable(folder):
            return f(*args, **kwargs)
    return call


def instantiate(mod: ModuleType) -> tuple[nn.Module, tuple]:
    """Call the file's build_model() and example_inputs(); check what they return."""
    where = getattr(mod, "__file__", None) or mod.__name__
    try:
        model = mod.build_model()
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(f"build_model() in {where!r} raised {type(exc).__name__}: {_first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ModelFileError(f"build_model() in {where!r} returned {type(model).__name__}, not an nn.Module")
    return model, example_inputs(mod)


def example_inputs(mod: ModuleType) -> tuple:
    """The file's example_inputs() as a tuple, drawing no number from the global generators (a
    training run at a seed draws the same numbers whether or not an example was made first)."""
    where = getattr(mod, "__file__", None) or mod.__name__
    try:
        with global_generators_kept():
            inputs = mod.example_inputs()
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(f"example_inputs() in {where!r} raised {type(exc).__name__}: {_first_line(exc)}") from exc
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)):
        raise ModelFileError(f"example_inputs() in {where!r} returned {type(inputs).__name__}, not a tuple of inputs")
    if inputs and not hasattr(mod, "example_kwargs") and not any(
            isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(tuple(inputs))):
        shown = repr(inputs) if len(repr(inputs)) <= 40 else repr(inputs)[:37] + "..."
        raise ModelFileError(f"example_inputs() in {where!r} returned {shown}, which holds no tensor: return the "
                             "model's inputs as tensors, e.g. (torch.randn(2, 8),)")
    return tuple(inputs)


@contextlib.contextmanager
def global_generators_kept():
    """torch's, numpy's and Python's global random states as they were, after the block."""
    import random

    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def example_kwargs(mod: ModuleType) -> dict:
    """The file's optional `example_kwargs()` (keyword example inputs), or {} when it has none."""
    where = getattr(mod, "__file__", None) or mod.__name__
    fn = getattr(mod, "example_kwargs", None)
    if fn is None:
        return {}
    if not callable(fn):
        raise ModelFileError(f"example_kwargs in {where!r} is not a function: define example_kwargs() -> dict")
    try:
        with global_generators_kept():
            kwargs = fn()
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(f"example_kwargs() in {where!r} raised {type(exc).__name__}: {_first_line(exc)}") from exc
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ModelFileError(f"example_kwargs() in {where!r} returned {type(kwargs).__name__}, "
                             "not a dict of keyword inputs")
    return dict(kwargs)


class KeywordCollate:
    """The file's collate_fn (else default_collate), then the keyword inputs of a model file with
    `example_kwargs()` grouped into one dict: a batch (x..., k..., y) (the inputs in the
    forward's order, target last) becomes (x..., {name: k...}, y), called as
    model(x..., **{...}). Inputs that are no tensors in example_kwargs() (flags, None) are
    passed as their example values. A batch that holds a dict already gets only those."""

    def __init__(self, positional: int, names: list, constants: dict, own: Optional[Callable] = None):
        self.positional, self.names, self.constants, self.own = positional, list(names), dict(constants), own

    def __call__(self, samples):
        from torch.utils.data import default_collate

        batch = (self.own or default_collate)(samples)
        if isinstance(batch, (list, tuple)) and any(isinstance(b, dict) for b in batch):
            # a sample (or the file's collate_fn) that groups its inputs itself: the constants join them
            grouped = next(b for b in batch if isinstance(b, dict))
            missing = [n for n in self.names if n not in grouped]
            if missing:
                made = "collate_fn's batches" if self.own is not None else "datasets()' samples"
                raise ModelFileError(f"the {made} group keyword inputs {', '.join(map(repr, grouped))} in a dict "
                                     f"without {', '.join(map(repr, missing))}, which example_kwargs() has: add "
                                     f"{'it' if len(missing) == 1 else 'them'} to that dict")
            return type(batch)({**self.constants, **b} if isinstance(b, dict) else b for b in batch)
        if not isinstance(batch, (list, tuple)):
            return batch
        want = self.positional + len(self.names) + 1
        if len(batch) != want:
            made = "collate_fn returns batches" if self.own is not None else "datasets() yields samples"
            raise ModelFileError(f"{made} of {len(batch)} values, but the model takes "
                                 f"{self.positional} positional input(s) (example_inputs) and keyword input(s) "
                                 f"{', '.join(self.names)} (example_kwargs): {'return' if self.own else 'yield'} "
                                 f"{want} values, the inputs in the forward's order, target last")
        k = self.positional
        return (*batch[:k], {**self.constants, **dict(zip(self.names, batch[k:-1]))}, batch[-1])


def keyword_collate(mod: ModuleType, model: nn.Module, positional: int) -> Optional[Callable]:
    """The batches' collate: for a file with keyword inputs `KeywordCollate` (over the file's own
    `collate_fn(samples) -> batch`, when it has one: samples of different lengths, padded per
    batch), else the file's collate_fn, else None (torch's default)."""
    own = getattr(mod, "collate_fn", None)
    if own is not None and not callable(own):
        raise ModelFileError(f"{_name(mod)}: collate_fn is a {type(own).__name__}, not a function of a list of "
                             "samples")
    kwargs = example_kwargs(mod)
    if not kwargs:
        return own
    tensors = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    try:
        order = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        order = []
    tensors.sort(key=lambda k: order.index(k) if k in order else len(order))
    return KeywordCollate(positional, tensors, {k: v for k, v in kwargs.items() if k not in tensors}, own)


def task_of(mod: ModuleType) -> str:
    """The model file's TASK ("classification" when it sets none)."""
    return getattr(mod, "TASK", "classification")


def task_functions(mod: ModuleType) -> tuple[Callable, Callable, str]:
    """(loss_fn, metric, metric name) for training on a model file's data.

    TASK: "classification" (the default) or "regression". loss_fn: the file's, else cross-entropy /
    MSE (of `training.primary_output`). metric (output, target) -> (sum, count), higher is better,
    which picks the best epoch: the file's, else accuracy / minus the mean loss.
    """
    from .training import accuracy, cross_entropy, mean_squared_error, negative_loss

    task = task_of(mod)
    if task not in TASKS:
        raise ModelFileError(f"{_name(mod)}: TASK = {task!r} is not one of {', '.join(TASKS)}: set one, or define "
                             "metric(output, target) -> (sum, count) for another task")
    for name in ("loss_fn", "metric"):
        value = getattr(mod, name, None)
        if value is not None and not callable(value):
            raise ModelFileError(f"{_name(mod)}: {name} is not callable: define it as a function")
        if isinstance(value, type):  # (called on (output, target), a class makes an object of them)
            raise ModelFileError(f"{_name(mod)}: {name} = {value.__name__} is a class, not a {name}: give an instance "
                                 f"({name} = {value.__name__}()) or a function")
    loss_fn = getattr(mod, "loss_fn", None) or (cross_entropy if task == "classification" else mean_squared_error)
    metric = getattr(mod, "metric", None)
    if metric is not None:
        return loss_fn, metric, getattr(metric, "__name__", "metric")
    if task == "classification":
        return loss_fn, accuracy, "accuracy"
    return loss_fn, negative_loss(loss_fn), "minus the loss"


# Words that name a lower-is-better score (an error, a distance), as parts of a metric's name.
LOWER_IS_BETTER_WORDS = {"loss", "error", "err", "mae", "mse", "rmse", "wer", "cer", "perplexity", "ppl", "nll",
                         "distance", "dist", "ce", "bce", "xent", "crossentropy"}


# ... and words of a higher-is-better score ("score" itself says nothing of the direction: mse_score is an
# error, val_score reads as higher-is-better only for want of another word).
HIGHER_IS_BETTER_WORDS = {"acc", "accuracy", "f1", "auc", "auroc", "precision", "recall", "iou", "bleu", "rouge"}


def reads_lower_is_better(name: str) -> bool:
    """Whether a metric's name reads as lower-is-better: its last word of LOWER_IS_BETTER_WORDS or
    HIGHER_IS_BETTER_WORDS, or ending in "loss", decides (val_loss, val/loss, valLoss, val_logloss,
    eval_err, error_rate, mae, mse_score; not gloss_acc, val_ce_acc, val_score). The last such word,
    because a metric's name ends in what it measures: val_ce_acc is an accuracy, ce_loss a loss."""
    words = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower())
    for w in reversed(words):
        if w in LOWER_IS_BETTER_WORDS or w.endswith("loss"):
            return True
        if w in HIGHER_IS_BETTER_WORDS:
            return False
    return False


def check_metric_direction(mod: ModuleType, maximize: bool, error: type = ModelFileError) -> None:
    """Refuse maximize=False (--no-maximize) with a built-in metric: accuracy and minus the loss grow as
    the model gets better, and the run would keep its worst epoch. Warn of maximize with a file's
    own metric whose name reads as lower-is-better (mae, error_rate, val_loss): the same mistake."""
    name = task_functions(mod)[2]
    if not maximize and getattr(mod, "metric", None) is None:
        raise error(f"maximize is false (--no-maximize, or maximize: false in a --config file), but the built-in "
                    f"metric ({name}) is higher-is-better: drop it, or define metric(output, target) in the model file")
    if maximize and getattr(mod, "metric", None) is not None and reads_lower_is_better(name):
        warn_at_user(f"{_name(mod)}: its metric {name!r} reads as lower-is-better, but a higher score counts as "
                     "better (each run keeps the epoch where it is highest): pass --no-maximize (maximize: false in "
                     "a --config file) if lower is better")


# Names a model file might define for training that pbp-fx train and compare do not read.
UNREAD_TRAINING_NAMES = ("optimizer", "configure_optimizers", "build_optimizer", "make_optimizer", "optimizer_fn",
                         "scheduler", "lr_scheduler", "configure_scheduler")


def warn_unread_names(mod: ModuleType) -> None:
    """Say so when the file defines an optimizer or schedule of its own: train and compare use
    Adam at --lr for every run (the same optimizer for every arm), not the file's."""
    # (defined in the file: an import such as `from torch.optim import lr_scheduler` is no schedule of its own)
    given = [n for n in UNREAD_TRAINING_NAMES if callable(getattr(mod, n, None))
             and getattr(getattr(mod, n), "__module__", None) == mod.__name__]
    if given:
        warn_at_user(f"{_name(mod)} defines {given[0]}, which pbp-fx train and compare do not read: they train with "
                     "Adam at --lr (the same for every arm); use the Python API (PhaseController with your optimizer) "
                     "for another")


def _name(mod: ModuleType) -> str:
    return f"model file {getattr(mod, '__file__', None) or mod.__name__!r}"
