"""fit(): a complete PB training loop around PhaseController (docs/algorithm.md).

The loop is ordinary PyTorch; PB adds only the controller's decision after each epoch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import itertools
import math
import os
import time
import traceback
import types
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from .config import ConfigError, PBConfig, TrainConfig
from .controller import Decision, PhaseController, default_optimizer
from .errors import (DataError, NonFiniteDataError, NonFiniteError, NonFiniteLossError, TargetError, TrainingError,
                     warn_at_user)
from .perforated import PerforatedModel

__all__ = ["fit", "History", "evaluate", "accuracy", "cross_entropy", "mean_squared_error", "negative_loss", "primary_output",
           "scored_tensor", "reaching_every_parameter", "class_indices", "split_batch", "call_model", "train_epoch", "training_device",
           "DEVICES"]

DEVICES = ("auto", "cpu", "cuda")  # what `pbp-fx train --device` takes


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


def training_device(name="auto", processes: int = 1) -> torch.device:
    """The device a run of `processes` processes trains on: "cpu", "cuda" (one GPU per process, as
    NCCL needs; a torch.device such as cuda:1 names one), or "auto": CUDA when torch sees a GPU for
    every process, else the CPU. A device this machine cannot serve is refused (ConfigError) before
    any work starts."""
    kind, index = (name, None) if isinstance(name, str) and name in DEVICES else (None, None)
    if kind is None and isinstance(name, (str, torch.device)):
        with contextlib.suppress(RuntimeError, TypeError):
            asked = torch.device(name)
            kind, index = (asked.type, asked.index) if asked.type in DEVICES else (None, None)
    if kind is None:
        raise ConfigError(f"--device {name}: use one of {', '.join(DEVICES)}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "cpu" or (kind == "auto" and gpus < processes):
        if kind == "auto" and gpus and int(os.environ.get("RANK", "0")) == 0:  # (said once, not by every rank)
            warn_at_user(f"{processes} processes but {gpus} GPU(s): training on the CPU (gloo); use --nproc {gpus} "
                         "to train on the GPUs")
        return torch.device("cpu")
    if not gpus:
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ConfigError(f"--device cuda: this torch ({torch.__version__}, {build}) sees no CUDA device: use "
                          "--device cpu, or run on a machine with a GPU and a CUDA build of torch")
    if gpus < processes:
        fewer = f"--nproc {gpus}" if gpus == 1 else f"--nproc {gpus} or fewer"
        raise ConfigError(f"--device cuda --nproc {processes}: each process needs a GPU of its own (NCCL) and this "
                          f"machine has {gpus}: use {fewer}, or --device cpu")
    if index is not None and index >= gpus:
        raise ConfigError(f"device {name}: this machine has {gpus} GPU(s), cuda:0 to cuda:{gpus - 1}")
    return torch.device("cuda", torch.cuda.current_device() if index is None else index)


def _autocast_keeps_casts() -> bool:
    """Whether an autocast region around this call keeps its weight casts: torch keeps them until the
    outermost region exits, so every forward after an optimizer step would read the first step's
    casts of the weights, and nothing would train (fit and evaluate then drop them per batch)."""
    return torch.is_autocast_cache_enabled() and any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))


def _to(batch, device):
    """The batch's tensors on `device`, in containers of the batch's own types (a namedtuple too)."""
    return pytree.tree_map(lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t, batch)


def _failed_step(exc: BaseException, loader) -> str:
    """Which step of making a batch raised `exc`: "dataset" (reading a sample), "collate_fn" (a
    collate function of the user's own) or "collate" (torch's default: samples that differ). By
    the outermost of their frames in the traceback (a worker's is text): a collate_fn of one's
    own may call torch's inside it."""
    collate = getattr(loader, "collate_fn", None)
    while isinstance(collate, functools.partial):
        collate = collate.func
    # (a function's code, else a callable object's __call__)
    own = getattr(collate, "__code__", None) or getattr(getattr(type(collate), "__call__", None), "__code__", None)
    if own is not None and own.co_filename.startswith(os.path.dirname(torch.__file__)):
        own = None  # (torch's default collate; a callable object's frames say "collate" by name or not at all)
    reader = getattr(getattr(type(getattr(loader, "dataset", None)), "__getitem__", None), "__code__", None)
    text = str(exc)
    if "Original Traceback" in text:  # a worker's: its frames are text, 'File "path", line N, in name'
        frames = []
        for line in text.splitlines():
            parts = line.strip().split('"')
            if line.strip().startswith("File ") and len(parts) >= 3:
                frames.append((parts[1], parts[2].rsplit(" in ", 1)[-1].strip()))
    else:
        frames = [(f.filename, f.name) for f in traceback.extract_tb(exc.__traceback__)]
    if not frames:
        return "collate"
    for filename, name in frames:  # outermost first
        if own is not None and (filename, name) == (own.co_filename, own.co_name):
            return "collate_fn"
        if reader is not None and (filename, name) == (reader.co_filename, reader.co_name):
            return "dataset"
        if "collate" in os.path.basename(filename) or "collate" in name:
            return "collate"
    return "dataset"


def batches(loader, data: str):
    """The loader's batches. An error while the loader makes one (samples of different shapes, a
    dataset's __getitem__ failing) is a TrainingError naming the `data` ("training", "validation"),
    not an internal error: it is the data's, found only when that batch is made."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError, OSError) as exc:
            lines = str(exc).strip().splitlines() or [""]
            # A DataLoader worker's error carries the original traceback: its last line ("Type: message") says why.
            why = lines[-1] if "Original Traceback" in str(exc) else f"{type(exc).__name__}: {lines[0]}"
            step = _failed_step(exc, loader)
            if step == "dataset":  # the dataset's own __getitem__ (or sampler) raised it
                raise DataError(f"the {data} dataset raised an error while reading a sample ({why}): fix the "
                                "dataset or what it reads") from exc
            if step == "collate_fn":
                raise DataError(f"the collate_fn raised an error making a batch of the {data} data ({why}): fix "
                                "collate_fn") from exc
            raise DataError(f"the {data} data could not be made into a batch ({why}): give every sample the same "
                            "structure and shapes") from exc
        yield batch


class _ZeroGradient(torch.autograd.Function):
    """The loss, unchanged; its backward also gives each tensor in `others` a zero gradient."""

    @staticmethod
    def forward(ctx, loss, *others):
        ctx.save_for_backward(*others)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        # In each tensor's own layout: DDP's buckets copy gradients laid out like their parameters
        return (grad, *[torch.zeros_like(t, memory_format=torch.preserve_format) for t in ctx.saved_tensors])


def autograd_nodes(edges, sinks: Optional[dict] = None, skip: Optional[dict] = None) -> dict:
    """The autograd nodes reachable from `edges` ((node, output number) pairs), keyed by (id, output
    number) for the nodes in `sinks` ({id: {output number: input index}}: DDP's sink, one node for
    all outputs that passes each output on from one input) and (id, None) for the others; those in
    `skip` are not entered. A leaf's node (AccumulateGrad) holds its tensor as `.variable`."""
    sinks, skip = sinks or {}, skip or {}
    found, stack = {}, list(edges)
    while stack:
        node, nr = stack.pop()
        if node is None:
            continue
        sink = sinks.get(id(node))
        key = (id(node), nr if sink is not None else None)
        if key in found or key in skip:
            continue
        found[key] = node
        if sink is None:
            stack.extend(node.next_functions)
        elif nr in sink:
            stack.append(node.next_functions[sink[nr]])
    return found


def parameters_the_loss_misses(loss: torch.Tensor, output) -> Optional[list]:
    """The trainable parameters that DDP would see without a gradient: those that only outputs the
    loss does not read reach (an auxiliary head beside the "logits" the loss reads), and parameters
    returned as outputs that it does not read; [] when the loss reads everything. One walk of the
    autograd graph. None where DDP's sink does not have the layout this walk knows: then every
    output needs its zero gradient.

    Why: DDP (static graph) stops at the next step when a parameter that took part in the forward
    got no gradient. The zero goes to the parameters themselves, not through the unread output,
    whose backward may turn it into NaN (a where + sqrt head).
    """
    leaves = pytree.tree_flatten(output)[0]  # DDP's own flattening: its sink's output order
    outputs = [(k, t) for k, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
    if loss.grad_fn is None or not outputs or (len(outputs) < 2 and outputs[0][1].grad_fn is not None):
        return []
    tensor_index = {k: i for i, k in enumerate(k for k, t in enumerate(leaves) if isinstance(t, torch.Tensor))}
    sinks = {}
    for _, t in outputs:
        node = t.grad_fn
        if node is not None and type(node).__name__ == "_DDPSinkBackward":
            if len(node.next_functions) != len(tensor_index):
                return None
            sinks[id(node)] = tensor_index
    read = autograd_nodes([(loss.grad_fn, 0)], sinks)
    read_leaves = {id(n.variable) for n in read.values() if getattr(n, "variable", None) is not None}
    unread = autograd_nodes([(t.grad_fn, t.output_nr) for _, t in outputs if t.grad_fn is not None], sinks, read)
    params = [n.variable for n in unread.values() if getattr(n, "variable", None) is not None and n.variable.requires_grad]
    return params + [t for _, t in outputs if t.grad_fn is None and id(t) not in read_leaves]


def reaching_every_parameter(model, loss: torch.Tensor, output) -> torch.Tensor:
    """`loss`, whose backward also gives a zero gradient to each trainable parameter of the DDP wrapper
    `model` that the loss does not reach (an auxiliary head beside the "logits" it reads, a parameter
    returned as an output); `loss` itself when `model` is no DDP wrapper. In a loop of one's own,
    between forward and backward: `loss = reaching_every_parameter(ctl.model, loss, output)`; fit does.

    Why: DDP (static graph) stops at the next step when a parameter that took part in the forward got
    no gradient. They are found at the wrapper's first step (one walk of the autograd graph) and kept
    on it as `unread_parameters`; every restructure builds a new wrapper.
    """
    if not isinstance(model, nn.parallel.DistributedDataParallel) or loss.grad_fn is None:
        return loss  # (one process; or no graph, an evaluation under no_grad: nothing to find from it)
    if not hasattr(model, "unread_parameters"):
        model.unread_parameters = parameters_the_loss_misses(loss, output)
    missed = model.unread_parameters
    zero = missed if missed is not None else [  # (this step's outputs: DDP's usual remedy)
        t for t in pytree.tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
    # a zero gradient straight into them: nothing runs through their branch
    return _ZeroGradient.apply(loss, *zero) if zero else loss


def split_batch(batch):
    """(inputs, target) from a (x, y) or (x1, ..., xn, y) batch."""
    if isinstance(batch, dict):
        raise TrainingError(f"each batch must be a tuple (inputs..., target), and the samples are dicts (keys "
                            f"{', '.join(map(repr, list(batch)[:4]))}): return (input, ..., target) tuples from the "
                            "dataset, or give the model file a collate_fn that makes such batches of them")
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise TrainingError("each batch must be a tuple (inputs..., target): wrap the data in a TensorDataset")
    return tuple(batch[:-1]), batch[-1]


def call_model(model, inputs: tuple):
    """model(*inputs); a dict as the last input holds keyword inputs (a batch (x, {"ids": ids}, y)),
    unless forward takes it as one argument and not as keywords (forward(self, batch) that reads
    batch["img"])."""
    if inputs and isinstance(inputs[-1], dict) and not _dict_is_one_input(model, inputs):
        return model(*inputs[:-1], **inputs[-1])
    return model(*inputs)


def _dict_is_one_input(model, inputs: tuple) -> bool:
    """Whether forward binds `inputs` as they are but not with their last dict as keywords, and
    none of the dict's keys is one of its parameters (a keyword batch with an extra column, a
    dataset's `idx`, stays keywords: its error names that key)."""
    while True:  # (DDP's module; torch.compile's wrapper shows (*args, **kwargs) and has no public accessor)
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else getattr(
            model, "_orig_mod", None)
        if inner is None:
            break
        model = inner
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return False
    if any(key in signature.parameters for key in inputs[-1]):
        return False
    try:
        signature.bind(*inputs[:-1], **inputs[-1])
        return False
    except TypeError:
        pass
    try:
        bound = signature.bind(*inputs)
    except TypeError:
        return False
    # Into a parameter without a default only (an optional mask would take a stray keyword dict);
    # a forward(*args) takes it whole as before.
    name = next((n for n, v in bound.arguments.items() if v is inputs[-1]), None)
    return name is None or signature.parameters[name].default is inspect.Parameter.empty


def primary_output(output) -> torch.Tensor:
    """The tensor a default loss and metric score (`scored_tensor`); a ValueError for an output
    that holds none (TargetError, a ValueError)."""
    found = scored_tensor(output)
    if found is None:
        raise TargetError(f"the model's output is a {type(output).__name__} with no tensor the built-in loss and metric "
                          "can score (they read a tensor, a dict's or dataclass's \"logits\" or first tensor, a tuple's "
                          "first element): give a loss and a metric of your own (loss_fn=, metric=)")
    return found


def scored_tensor(output) -> Optional[torch.Tensor]:
    """The output itself, a dict's or a dataclass's "logits" (else its first tensor), or a tuple's /
    list's first element (Hugging Face models return such structures); None where there is none."""
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        output = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
    if isinstance(output, dict):
        if "logits" in output:
            output = output["logits"]
        else:
            output = [v for v in output.values() if isinstance(v, torch.Tensor)]
    if isinstance(output, (list, tuple)):
        return scored_tensor(output[0]) if output else None
    return output if isinstance(output, torch.Tensor) else None


# F.cross_entropy's default ignore_index: a label that counts in no loss (padding, an unlabelled token).
IGNORED_LABEL = -100
# Integer label dtypes F.cross_entropy (and comparisons with int64) refuse, widened to int64.
NARROW_LABELS = (torch.int8, torch.int16, torch.int32, torch.uint16, torch.uint32, torch.uint64)


def class_indices(target: torch.Tensor) -> torch.Tensor:
    """Integer class labels of any width (numpy's int32, uint16) as F.cross_entropy takes them."""
    return target.long() if target.dtype in NARROW_LABELS else target


def accuracy(output, target: torch.Tensor) -> tuple[float, int]:
    """(number correct, count) for class logits (of `primary_output`) with the classes on dim 1, as
    the default cross-entropy reads them ([N, C] or [N, C, *positions]); labels of IGNORED_LABEL
    (-100) count in neither. Class probabilities as targets (one-hot or soft, the output's shape,
    which cross-entropy also takes) count their most likely class. A ValueError for what it cannot
    score: one logit per sample, multi-label targets."""
    logits = primary_output(output)
    if logits.dim() < 2 or logits.shape[1] < 2:
        raise TargetError(f"the built-in accuracy scores class logits [N, C, ...] with C >= 2 classes on dim 1, but "
                          f"the output has shape {list(logits.shape)}: give a metric of your own (for one logit per "
                          "sample, e.g. ((logit > 0) == (target > 0.5)).sum())")
    if target.is_floating_point() and target.shape == logits.shape:
        rows = target.sum(1)
        if not bool(torch.isclose(rows, torch.ones_like(rows), atol=1e-3).all()):
            raise TargetError("the targets have the output's shape but do not sum to 1 over the classes (multi-label "
                              "targets?): the built-in accuracy scores one class per sample; give a metric of your own")
        target = target.argmax(1)
    expected = logits.shape[:1] + logits.shape[2:]
    if target.shape != expected:
        classes_last = logits.dim() >= 3 and tuple(target.shape) == tuple(logits.shape[:-1])
        hint = ("the classes look last ([N, ..., C]): return them on dim 1 (logits.movedim(-1, 1)) or give a metric of "
                "your own" if classes_last else "give labels of that shape (y.squeeze(1) for [N, 1]) or a metric of your own")
        raise TargetError(f"the built-in accuracy reads logits {list(logits.shape)} as [N, C, ...] with classes on dim 1 "
                          f"and wants labels of shape {list(expected)}, not {list(target.shape)}: {hint}")
    target = class_indices(target)
    outside = _labels_outside(target, logits.shape[1])
    if outside is not None:  # (scored as wrong, they lowered the score without a word)
        raise outside
    kept = target != IGNORED_LABEL
    right = (logits.argmax(1) == target) & kept
    return float(right.sum()), int(kept.sum())


def _labels_outside(target: torch.Tensor, classes: int) -> Optional[TargetError]:
    """A TargetError naming the first class label outside 0..classes-1 (IGNORED_LABEL counts in no score), or None."""
    outside = (target != IGNORED_LABEL) & ((target < 0) | (target >= classes))
    if not bool(outside.any()):
        return None
    return TargetError(f"class label {int(target[outside][0])} is outside 0..{classes - 1}, the classes of logits with "
                       f"{classes} on dim 1: give labels in that range ({IGNORED_LABEL} for a sample that counts in no "
                       "score), or a model with an output per class")


def cross_entropy(output, target: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy of `primary_output` (a dict's "logits", a tuple's first element): fit's default loss.
    A batch whose labels are all IGNORED_LABEL has loss 0 (F.cross_entropy's mean is 0/0 = NaN there).
    Integer labels of any width (numpy's int32) count as class indices."""
    logits = primary_output(output)
    target = class_indices(target)
    _check_class_targets(logits, target)
    if target.is_floating_point() or not target.numel():
        return F.cross_entropy(logits, target)
    if target.device.type != "cpu":  # (no host sync per batch: the mean over the kept labels, 0 when none is)
        kept = (target != IGNORED_LABEL).sum().clamp(min=1)  # (summed in float32: a float16 sum overflows at 65504)
        return F.cross_entropy(logits, target, reduction="none").float().sum() / kept
    if bool((target == IGNORED_LABEL).all()):
        return logits.sum() * 0.0  # (keeps the graph: every parameter gets a zero gradient)
    try:
        return F.cross_entropy(logits, target)
    except IndexError:  # ("Target 7 is out of bounds": which range, and the fix)
        outside = _labels_outside(target, logits.shape[1])
        if outside is None:
            raise
        raise outside from None


def _check_class_targets(logits: torch.Tensor, target: torch.Tensor) -> None:
    """TargetError for targets F.cross_entropy cannot take as class indices or class probabilities, named with
    the fix (torch's own errors name neither: 'expected target dtype to be Long', 'multi-target not supported')."""
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor) or logits.dim() < 2:
        return
    n, classes = list(logits.shape[:1]), logits.shape[1]
    if target.is_floating_point() and target.shape != logits.shape:
        raise TargetError(f"float targets of shape {list(target.shape)} for logits of shape {list(logits.shape)}: "
                          "give class indices as integers (y.long()), or class probabilities in the logits' shape")
    if not target.is_floating_point() and target.shape == logits.shape and classes > 1:
        raise TargetError(f"integer targets in the logits' shape {list(logits.shape)} (one-hot?): give class "
                          "indices (y.argmax(1)) or class probabilities as floats (y.float())")
    if not target.is_floating_point() and logits.dim() == 2 and list(target.shape) == n + [1]:
        raise TargetError(f"integer targets of shape {list(target.shape)} for logits of shape {list(logits.shape)}: "
                          "give one class index per sample, shape [N] (y.squeeze(1))")


def mean_squared_error(output, target: torch.Tensor) -> torch.Tensor:
    """F.mse_loss of `primary_output`: a regression model file's default loss. Output and target
    must have one shape: broadcasting [N, 1] against [N] would train on every pair."""
    output = primary_output(output)
    if output.shape != target.shape:
        raise TargetError(f"output shape {list(output.shape)} and target shape {list(target.shape)} differ: give "
                          "the targets the output's shape (y[:, None] for one output)")
    return F.mse_loss(output, target)


def samples_in(target, inputs=()) -> int:
    """A batch's sample count: dim 0 of a tensor target; for a tuple, list or dict target (a two-head model's
    labels, a detector's per-image dicts, whose first tensor may hold boxes, not images), dim 0 of the first
    batched input, else of the target's first batched tensor (1 without any)."""
    if isinstance(target, torch.Tensor) and target.dim():
        return target.shape[0]
    for part in (inputs, target):
        for t in torch.utils._pytree.tree_leaves(part):
            if isinstance(t, torch.Tensor) and t.dim():
                return t.shape[0]
    return 1


def negative_loss(loss_fn: Callable) -> Callable:
    """A metric for regression (higher is better): minus loss_fn's value, weighted by the batch's samples."""

    def metric(output, target) -> tuple[float, int]:
        n = samples_in(target)
        return -float(loss_fn(output, target)) * n, n

    return metric


def _check_finite_inputs(inputs, data: str, what: str = "data holds") -> None:
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise NonFiniteDataError(f"the {data} {what} NaN/Inf values: remove or replace them before training")


@torch.no_grad()
def evaluate(model: nn.Module, loader, metric: Callable = accuracy, device=None, *, distributed=None,
             data: str = "evaluation") -> float:
    """Mean metric over a loader, in eval mode (the model's mode is restored afterwards).

    NaN/Inf in a floating-point input is an error (naming `data`, e.g. "validation"): a
    metric such as accuracy would otherwise score it silently.
    distributed (a pbp_fx.distributed.Distributed): the metric's sums and counts are summed
    over the ranks, so every rank gets the score of all shards (Distributed.loader(train=False)).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # evaluation needs no gradient synchronisation
    was = model.training
    model.eval()
    total, count, seen = 0.0, 0, 0
    name = getattr(metric, "__name__", None)  # (a callable object or a partial has none)
    the_metric = f"the metric {name}" if name else "the metric"
    if _autocast_keeps_casts():  # (those of the last training step's weights)
        torch.clear_autocast_cache()
    try:
        for batch in batches(loader, data):
            inputs, target = split_batch(_to(batch, device) if device is not None else batch)
            _check_finite_inputs(inputs, data)
            scored = metric(call_model(model, inputs), target)
            try:  # (a tuple, or a tensor or array of two numbers)
                s, n = scored
            except (TypeError, ValueError):
                raise TrainingError(f"{the_metric} returned {type(scored).__name__}, not a "
                                    "(sum, count) pair: return e.g. (number correct, number of samples)") from None
            if float(n) < 0:  # (the mean's sign would flip, and the best epoch be the worst)
                raise TrainingError(f"{the_metric} returned a negative count ({float(n):g}) "
                                    f"on the {data} data: return (sum, count) with count the number of samples scored")
            # Python numbers: a metric's tensor or numpy sums would flow into the history and checkpoints.
            total, count, seen = total + float(s), count + float(n), seen + 1
    finally:
        model.train(was)
    if distributed is not None:
        total, count, seen = distributed.all_reduce_sum([total, count, seen])
    if count == 0:
        if seen:  # batches came, and the metric counted none of their samples (a recall without positives)
            if metric is accuracy:  # (the built-in one counts every label but the ignored ones)
                raise TrainingError(f"every label of the {data} data is {IGNORED_LABEL} (ignored), so accuracy "
                                    f"scores no sample: give the {data} data labelled samples")
            raise TrainingError(f"{the_metric} counted no sample of the {data} data "
                                "(every batch returned count 0): return (sum, count) with count > 0, e.g. the "
                                "number of samples scored")
        raise TrainingError(f"the {data} dataset is empty: give it at least one sample")
    return total / count


def _one_shot(loader) -> bool:
    """Whether the loader is an iterator that cannot start over: a generator, a DataLoader's iterator
    (iter(loader)), or one whose __iter__ is not Python's (map, zip, iter(list)). A class of one's own whose
    __iter__ returns self may reset itself there first, so it is left alone; a DataLoader has no __next__
    (and no worker starts here)."""
    if not hasattr(loader, "__next__") or iter(loader) is not loader:
        return False
    return (inspect.isgenerator(loader) or type(loader).__module__ == torch.utils.data.dataloader.__name__
            or not isinstance(inspect.getattr_static(type(loader), "__iter__", None), types.FunctionType))


def _check_loader(loader, what: str, passes: int = 2) -> None:
    """Refuse a loader that gives no batches, or is no iterable at all (None), or, where `passes` (epochs
    left) exceeds 1, one that cannot start over, before any training."""
    if not hasattr(loader, "__iter__") and not hasattr(loader, "__getitem__"):  # (iter() would start workers)
        raise TrainingError(f"the {what} loader is {type(loader).__name__}, not an iterable of batches: give a "
                            "DataLoader")
    if passes > 1 and _one_shot(loader):
        raise TrainingError(f"the {what} loader is a one-shot iterator ({type(loader).__name__}), which the second "
                            "epoch would find empty: give one that starts over each epoch (a DataLoader, a list of "
                            "batches, or an object whose __iter__ starts anew)")
    try:
        n = len(loader)
    except TypeError:
        return
    if n == 0:
        raise TrainingError(f"the {what} loader is empty: give the {what} dataset at least one batch")


def fit(pm: PerforatedModel, train_loader, val_loader, loss_fn: Callable = cross_entropy, *,
        config: Optional[PBConfig] = None, training: Optional[TrainConfig] = None,
        controller: Optional[PhaseController] = None, optimizer_factory: Optional[Callable] = None,
        metric: Callable = accuracy, test_loader=None, device=None, progress: bool = True,
        callbacks: Iterable[Callable[[dict], None]] = (), distributed=None,
        history: Optional[History] = None, epochs: Optional[int] = None, lr: Optional[float] = None) -> History:
    """Train `pm` with Perforated Backpropagation until the controller says COMPLETE.

    config: the PB settings (PBConfig); training: epochs and lr (TrainConfig; `epochs=` and
    `lr=` override its fields). Without `controller`, one is built from `config` with
    `optimizer_factory(params)` (default `default_optimizer(params, training.lr)`: Adam); with one, its config and optimizer
    are used (then pass neither config, optimizer_factory nor lr). `test_loader`, when given,
    is evaluated every epoch for reporting only. Each callback receives the epoch's history row.

    distributed (a pbp_fx.distributed.Distributed; every rank calls fit): the model moves to
    its device, trains through a DDP wrapper that the controller rebuilds at every
    restructure, the loaders should come from Distributed.loader (each rank must have as
    many training batches), scores and losses are summed over the ranks, and every rank
    takes rank 0's decisions. A rank's error is reported by the others.

    A NaN/Inf loss or validation score in a neuron phase after a best is taken as divergence: the
    controller warns, goes back to the best weights and on (the epoch's row has no score). Any
    other (a loss with `distributed`: the ranks would wait on the one that left its epoch) stops the
    run at the best-validation state and raises TrainingError.
    """
    config = PBConfig.coerce(config, "fit's config")
    training = (TrainConfig.coerce(training, "fit's training") or TrainConfig()).replace(
        **{k: v for k, v in {"epochs": epochs, "lr": lr}.items() if v is not None})
    _warn_unused_training(training)
    # (each loader is read once an epoch: a one-shot iterator serves one epoch)
    left = training.epochs - (len(history.epochs) if history is not None else 0)
    if distributed is None:  # (a rank's shard may be empty where the others' are not: checked together below)
        _check_loader(train_loader, "training", left)
        _check_loader(val_loader, "validation", left)
    if test_loader is not None:
        _check_loader(test_loader, "test", left)
    if controller is not None:
        # (an lr in `training` too: the controller's optimizer has its own)
        given = [n for n, v in (("config", config), ("optimizer_factory", optimizer_factory)) if v is not None]
        given += ["lr"] if lr is not None or training.lr != TrainConfig().lr else []
        if given:
            raise ConfigError(f"fit(controller=...) trains with the controller's settings and optimizer: pass "
                              f"{given[0]} to PhaseController instead"
                              + (" (through its optimizer_factory)" if given[0] == "lr" else ""))
        if controller.pm is not pm:  # (it trained the other model, and this one not at all)
            raise ConfigError("fit(controller=...) got the controller of another model than the one it trains: pass "
                              "the PhaseController built on this model (PhaseController(pm, config))")
        if controller.root is not None:  # (it trained pm's output alone: the head took no gradient)
            raise ConfigError("fit() trains and scores pm alone, and this PhaseController has root= (a module of "
                              "your own around pm, which fit would neither train nor score): train it in a loop of "
                              "your own through ctl.model, or perforate the whole model (exclude= the head's layers)")
    if optimizer_factory is not None and (lr is not None or training.lr != TrainConfig().lr):
        raise ConfigError("fit(optimizer_factory=...) builds the optimizer with the factory's own learning rate, so "
                          f"lr={training.lr:g} would do nothing: give the rate to the factory (lambda params: "
                          "torch.optim.SGD(params, lr=...)) and leave lr out")
    if distributed is not None and device is None:
        device = distributed.device
    if device is not None:
        pm.to(device)  # before any DDP wrapper is built over the parameters
    history = History() if history is None else history  # a given history: resume after its last epoch
    bar = _progress(training.epochs, progress and (distributed is None or distributed.is_main)
                    and not (controller is not None and controller.done), initial=len(history.epochs))
    # Building the DDP wrapper is collective work too: inside the guard, so a rank that is
    # slow or gone is reported as such.
    with distributed.guard() if distributed is not None else nullcontext():
        if controller is None:
            factory = optimizer_factory or (lambda params: default_optimizer(params, lr=training.lr))
            controller = PhaseController(pm, config, optimizer_factory=factory, distributed=distributed)
        elif distributed is not None and controller.distributed is not distributed:
            controller.set_distributed(distributed)
        elif device is not None:
            controller.rebind(keep_state=True)  # (a resumed run's optimizer state stays)
        _check_plateau(controller)
        if distributed is not None and _length(train_loader) is not None:
            distributed.check_same("number of training batches", _length(train_loader))
        if distributed is not None:  # (every rank as many training batches: an empty shard is everyone's)
            _check_loader(train_loader, "training", left)
        try:
            _loop(pm, controller, history, bar, train_loader, val_loader, loss_fn, training.epochs, metric,
                  test_loader, device, callbacks, distributed)
        finally:
            if bar is not None:
                bar.close()  # (also when interrupted: what is printed next starts on a line of its own)
    return history


# TrainConfig fields that only pbp-fx train applies (it builds the loaders, seeds and captures).
_TRAIN_COMMAND_ONLY = {"batch_size": "build the loaders with that batch size",
                       "seed": "call torch.manual_seed before building the model and the loaders",
                       "frontend": "pass frontend= to perforate"}


def _warn_unused_training(training: TrainConfig) -> None:
    """fit takes epochs and lr from a TrainConfig; other fields set away from their defaults did nothing."""
    default = TrainConfig()
    for name in (f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("epochs", "lr")):
        value = getattr(training, name)
        if value != getattr(default, name):
            fix = _TRAIN_COMMAND_ONLY.get(name)
            warn_at_user(f"fit(training=...) uses only epochs and lr: {name}={value!r} applies to pbp-fx train "
                         "only, and fit trains on the loaders and model it is given" + (f"; {fix}" if fix else ""))


def _plateau(controller) -> bool:
    return isinstance(controller.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def _check_plateau(controller) -> None:
    """A ReduceLROnPlateau steps on the validation score: its mode must say which way is better."""
    if _plateau(controller):
        want = "max" if controller.config.maximize else "min"
        if controller.scheduler.mode != want:
            raise ConfigError(f"the ReduceLROnPlateau has mode={controller.scheduler.mode!r} but fit's validation "
                              f"score is {'maximized' if want == 'max' else 'minimized'} (PBConfig.maximize="
                              f"{controller.config.maximize}): build it with mode={want!r}")


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
        diverged = None  # what made the epoch's score non-finite when the controller takes it
        try:
            try:
                train_loss = train_epoch(controller.model, train_loader, loss_fn, controller.optimizer, device,
                                          distributed, phase)
            except NonFiniteLossError as exc:
                # One process only: a rank leaving its epoch alone would leave the others waiting.
                if not exc.diverged or distributed is not None or not controller.takes_divergence:
                    raise
                train_loss, diverged = None, f"the loss is {exc.loss}"
            _check_statistics(pm)
            if controller.scheduler is not None and phase == "neuron" and not _plateau(controller):
                controller.scheduler.step()
            if distributed is not None:
                distributed.sync_buffers(pm)  # rank 0's BatchNorm statistics: one model to evaluate
            val = (math.nan if diverged else
                   evaluate(pm, val_loader, metric, device, distributed=distributed, data="validation"))
            if not math.isfinite(val) and controller.takes_divergence:
                diverged = diverged or f"the validation score is {val}"  # the controller goes back to the best weights
            elif not math.isfinite(val):
                raise NonFiniteError(f"the validation score is {val} in epoch {epoch} ({phase} phase): check the "
                                     "validation data and the metric for NaN/Inf")  # (evaluate checked the inputs)
            test = (evaluate(pm, test_loader, metric, device, distributed=distributed, data="test")
                    if test_loader is not None and not diverged else None)
            if test is not None and not math.isfinite(test):  # (the history and its JSON would hold it)
                raise NonFiniteError(f"the test score is {test} in epoch {epoch} ({phase} phase): check the test "
                                     "data (its targets too) and the metric for NaN/Inf")
            row = {"epoch": epoch, "phase": phase, "dendrites": controller.num_dendrites,
                   "train_loss": train_loss, "val": None if diverged else val, "test": test,  # (JSON: no NaN)
                   "params": pm.num_parameters(), "seconds": time.perf_counter() - t0}
            # (the controller refuses NaN weights before any best, and NaN candidates)
            decision = controller.step(val, cause=diverged)
        except NonFiniteError as exc:
            # (the controller stops the run itself at NaN weights before any best and at NaN candidates)
            message = str(exc) if controller.done else f"{exc}; {controller.stop_non_finite()}"
            if history.epochs:  # the stop ends the run after the last epoch: its row says so, as the controller's history does
                history.epochs[-1]["decision"] = Decision.COMPLETE.value
            raise TrainingError(message) from exc
        if phase == "neuron" and controller.history and controller.history[-1]["score"] is None:
            # The controller took the epoch as diverged (NaN/Inf weights that the metric scored): no score.
            diverged, row["val"], row["test"] = diverged or "the weights", None, None
        if _plateau(controller) and decision is not Decision.COMPLETE and not diverged:
            # After the controller, as the trainers do (the controller holds it in a dendrite phase).
            controller.scheduler.step(val)
        if epoch == epochs and decision is not Decision.COMPLETE:
            # the cap ends the run here: this epoch's row says so, as the controller's history does
            controller.finish(f"epoch cap ({epochs}) reached")
            decision = Decision.COMPLETE
        row["decision"] = decision.value
        history.append(**row)
        history.best_epoch, history.best_val = controller.best_epoch, controller.best_score
        for cb in callbacks:
            cb(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(phase=phase, dendrites=row["dendrites"], loss=_shown(train_loss),
                            val=_shown(row["val"]), best=_shown(controller.best_score))
        if decision is Decision.COMPLETE:
            break
    else:
        controller.finish(f"epoch cap ({epochs}) reached")


def train_epoch(pm, loader, loss_fn, optimizer, device, distributed=None, phase=None) -> float:
    """One epoch; `pm` is the module to call (the model, or its DDP wrapper)."""
    pm.train()
    phase = phase or getattr(pm, "phase", "")
    total, count = 0.0, 0
    recast = _autocast_keeps_casts()  # (an autocast region around the epoch: decided once)
    made = batches(loader, "training")
    if distributed is not None and _length(loader) is None:
        made = _batches_agreed(made, distributed)
    for batch in made:
        if device is not None:
            batch = _to(batch, device)
        inputs, target = split_batch(batch)
        if recast:  # (the weights changed since the last forward: a step, a restructure)
            torch.clear_autocast_cache()
        output = call_model(pm, inputs)
        loss = reaching_every_parameter(pm, loss_fn(output, target), output)
        value = float(loss.detach())  # (one read of the loss per step: on a GPU, one wait)
        if not math.isfinite(value):
            raise _non_finite_loss(loss, inputs, target, phase)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = samples_in(target, inputs)
        total += value * n
        count += n
    if distributed is not None:
        total, count = distributed.all_reduce_sum([total, count])
    if count == 0:
        raise TrainingError("the training loader produced no batch: give the training dataset at least one sample")
    return total / count


def _batches_agreed(made, distributed):
    """A loader without len() under `distributed`: before each batch the ranks check that every one has it
    (else the one with more would wait in a gradient all-reduce the others never join, then fail in gloo's
    C++ with "Received data size doesn't match" or hang); a rank short of batches raises on every rank."""
    sentinel = object()
    for taken in itertools.count():
        batch = next(made, sentinel)
        distributed.check_same("whether a training batch is left", int(batch is not sentinel),
                               fix=f"the training loader has no len(), and some ranks ran out after {taken} batches "
                                   "while others had more: give every rank as many batches (shard the data with "
                                   "Distributed.loader, or have the IterableDataset give each rank the same number)")
        if batch is sentinel:
            return
        yield batch


def _non_finite_loss(loss: torch.Tensor, inputs, target, phase: str) -> NonFiniteError:
    """The error for a NaN/Inf loss. The data's on evidence: NaN/Inf in the batch's inputs or floating
    targets (a NonFiniteDataError), a batch whose labels are all IGNORED_LABEL (cross_entropy is nan
    there), or a dendrite phase, whose model is frozen at its best weights. Else diverged weights
    (`diverged`; a loss that overflows on finite outputs, exp of a logit past 88, counts too)."""
    _check_finite_inputs(pytree.tree_leaves(inputs), "training")
    _check_finite_inputs(pytree.tree_leaves(target), "training", "targets hold")  # (a tuple of targets too)
    value, where = loss.item(), f" in the {phase} phase" if phase else ""
    if isinstance(target, torch.Tensor) and not target.is_floating_point() and target.numel() \
            and bool((target == IGNORED_LABEL).all()):
        return NonFiniteLossError(value, f"the loss is {value}{where} on a batch whose labels are all "
                                         f"{IGNORED_LABEL} (ignore_index, as cross_entropy reads them): leave such "
                                         "batches out, or give the loss a value for them", diverged=False)
    if phase == "dendrite":
        return NonFiniteLossError(value, f"the loss is {value}{where}, whose model is frozen at its best weights: "
                                         "check the data and the loss for NaN/Inf", diverged=False)
    half = loss.dtype in (torch.float16, torch.bfloat16)
    return NonFiniteLossError(value, f"the loss is {value}{where}: lower the learning rate ("
                                     + (f"or compute the loss in float32: it is {str(loss.dtype)[6:]}; " if half
                                        else "") + "the batch's inputs and targets are finite: else check the "
                                     "loss)", diverged=True)


def _check_statistics(pm: PerforatedModel) -> None:
    for name, s in pm.sites.items():
        if s.candidates is not None and not bool(torch.isfinite(s.candidates.ema).all()):
            raise NonFiniteError(f"the correlation statistics of site {name!r} are not finite: lower "
                                 "candidate_lr or check the data for NaN/Inf")


def _shown(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4f}"


def _progress(total: int, enabled: bool, initial: int = 0):
    """A tqdm bar over the epochs (from `initial`: a resumed run's), or None."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="epoch", dynamic_ncols=True, leave=False)
