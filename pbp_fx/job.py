"""The main job behind `pbp-fx train`: a model file's datasets, PB training, a report.

    result = train_job("models/digits_mlp.py", out="runs/digits")

With no model file it runs the built-in default: the MNIST-1D MLP (data generated locally).
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib
import inspect
import json
import math
import os
import random
import re
import shlex
import time
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from .checkpoint import FORMAT_V1, load, read_meta, save
from .config import ConfigError, PBConfig, TrainConfig
from .controller import NOTHING_TRAINS, PhaseController, default_optimizer
from .errors import DataError, ModelFileError, PBError, PBWarning, TargetError, TrainingError, exited, warn_at_user
from .fileio import atomic_write, check_output_dir, folder_held, make_folders, remove_empty
from .modelfile import (check_metric_direction, example_kwargs, global_generators_kept, instantiate,
                        KeywordCollate, keyword_collate, load_model_file, task_functions, task_of, warn_unread_names)
from .distributed import last_batch_is_lone
from .passes.find_sites import site_filters
from .perforated import perforate
from .signals import stops_held
from .training import (IGNORED_LABEL, History, NonFiniteDataError, NonFiniteError, accuracy, call_model, class_indices,
                       evaluate, fit, scored_tensor, split_batch, training_device)

__all__ = ["train_job", "saved_run", "SavedRun", "run_identity", "model_digest", "data_fingerprint", "changed_since",
           "resumed_identity", "DEFAULT_MODEL", "load_job_module", "make_loaders"]

DEFAULT_MODEL = "pbp_fx.models.mnist1d_mlp"


def load_job_module(model_file: Optional[str]) -> ModuleType:
    mod = importlib.import_module(DEFAULT_MODEL) if model_file is None else load_model_file(model_file, as_script=True)
    if not callable(getattr(mod, "datasets", None)):
        where = model_file or DEFAULT_MODEL
        value = getattr(mod, "datasets", None)
        what = ("has no datasets()" if value is None else
                f"sets datasets to a value ({type(value).__name__}), not a function")
        raise ModelFileError(f"model file {where!r} {what}: training needs "
                             "datasets() -> (train, val, test) torch Datasets")
    return mod


SPLIT_NAMES = ("training", "validation", "test")


def _call_datasets(mod: ModuleType, seed: int):
    try:
        params = inspect.signature(mod.datasets).parameters
        data = mod.datasets(seed=seed) if "seed" in params else mod.datasets()
    except Exception as exc:  # noqa: BLE001 - user code
        raise ModelFileError(f"datasets() raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(data, (tuple, list)) or len(data) != 3:
        raise ModelFileError("datasets() must return (train, val, test)")
    for name, ds in zip(SPLIT_NAMES, data):
        if isinstance(ds, torch.utils.data.DataLoader):
            raise ModelFileError(f"datasets() returned a DataLoader for the {name} data: return the Dataset itself "
                                 "(pbp-fx makes the loaders, with --batch-size)")
        if isinstance(ds, torch.utils.data.IterableDataset):
            raise ModelFileError(f"the {name} dataset is an IterableDataset: datasets() must return map-style "
                                 "datasets (a TensorDataset, a list of (x, y) pairs)")
        # (a list of tensor samples is fine for a file's own collate_fn, which makes (input, target) batches of them)
        own_collate = isinstance(ds, list) and getattr(mod, "collate_fn", None) is not None
        if isinstance(ds, (tuple, list)) and ds and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in ds) \
                and not own_collate:
            arrays = any(isinstance(t, np.ndarray) for t in ds)
            wrapped = ("TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y))" if arrays
                       else "TensorDataset(x, y)")  # (numpy's float64 would meet float32 weights)
            raise ModelFileError(f"the {name} dataset is a {type(ds).__name__} of {'arrays' if arrays else 'tensors'}, "
                                 f"not of (input, target) samples: wrap them, {wrapped}, or return a Dataset or a "
                                 "list of (x, y) pairs")
        try:
            size = len(ds)
        except TypeError:
            raise ModelFileError(f"the {name} dataset ({type(ds).__name__}) has no len(): datasets() must return "
                                 "map-style datasets (a TensorDataset, a list of (x, y) pairs)") from None
        if size == 0:
            raise TrainingError(f"the {name} dataset is empty: datasets() must return non-empty datasets")
    return data


def seeded_datasets(mod: ModuleType, seed: int) -> tuple:
    """The model file's (train, val, test) datasets, with every global generator seeded with
    `seed` before datasets() runs, NaN/Inf in tensor datasets refused."""
    seed_everything(seed)
    data = _call_datasets(mod, seed)
    _check_finite_datasets(data)
    return data


def run_identity(model_file: Optional[str], data, model: Optional[nn.Module] = None) -> dict:
    """What a run's results depend on besides its settings: the model file's content (sha256; None
    for the built-in model), a fingerprint of its data (`data_fingerprint`) and of the model it
    builds (`architecture_digest`, when `model` is given). Saved with a run, so that a resume or
    `compare --pb-run` can tell when any changed since."""
    fingerprint, drawn = _fingerprint(data)
    identity = {"model_digest": model_digest(model_file), "digest_of": "file+imports",
                "file_digest": model_digest(model_file, with_imports=False), "data": fingerprint,
                "own_randomness": drawn}
    if model is not None:
        identity["architecture"] = architecture_digest(model)
    return identity


def architecture_digest(model: nn.Module) -> str:
    """sha256 of the model's module tree as printed (types and settings, object addresses left out)
    and of its tensors' names, dtypes and shapes: a model file that builds another model from the
    same code (a config file it reads, an environment variable) differs here."""
    h = hashlib.sha256(re.sub(r"0x[0-9a-fA-F]+", "0x", repr(model)).encode())
    for name, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor):
            h.update(f"{name}:{type(t).__name__};".encode())  # (an extra state)
            continue
        shape = "uninitialized" if isinstance(t, nn.parameter.UninitializedTensorMixin) else tuple(t.shape)
        h.update(f"{name}:{t.dtype}{shape};".encode())
    return h.hexdigest()


def digest_matches(identity: dict, model_file: Optional[str]) -> bool:
    """Whether `model_file` (with the modules of its folder it imports) is the one `identity`
    recorded; an identity recorded before those counted is checked against the file alone."""
    return model_digest(model_file, _digested_imports(identity)) == identity.get("model_digest")


def _digested_imports(identity: dict) -> bool:
    """Whether the identity's model digest covers the modules its file imports (not before stop 44)."""
    return identity.get("digest_of") == "file+imports"


def model_digest(model_file: Optional[str], with_imports: bool = True) -> Optional[str]:
    """sha256 of the model file's content and of the modules of its folder it imports (None for the
    built-in model): an edited neighbour changes the model as an edited file does."""
    if model_file in (None, DEFAULT_MODEL):
        return None
    with open(model_file, "rb") as f:
        digest = hashlib.sha256(f.read())
    folder = os.path.dirname(os.path.realpath(model_file))  # (local_imports': a symlinked file's target's)
    for path in local_imports(model_file) if with_imports else ():  # (none: the file's own digest)
        try:
            with open(path, "rb") as f:
                content = f.read()
        except OSError:
            content = b"<unreadable>"
        digest.update(os.path.relpath(path, folder).encode() + b"\0" + content)
    return digest.hexdigest()


_MOST_LOCAL_IMPORTS = 256  # (a model file beside a library's sources: what it reads is capped)


def local_imports(path: str) -> list[str]:
    """The files of `path`'s folder that it imports (`import x`, `from x.y import z`, a package's
    relative imports), and those they import, read from their source (whether loaded yet or not)."""
    import ast

    # (a symlinked model file imports the modules beside its target, as python does)
    folder = os.path.dirname(os.path.realpath(path))
    if any(part in ("site-packages", "dist-packages") for part in folder.split(os.sep)):
        return []  # (an installed library's folder: its modules are the library's, not the model's)
    root = os.path.realpath(path)
    found: set[str] = set()
    todo = [root]

    def module_files(base: str, dotted: list[str]) -> None:  # (each prefix: a module file or a package's)
        for depth in range(1, len(dotted) + 1):
            stem = os.path.join(base, *dotted[:depth])
            for candidate in (stem + ".py", os.path.join(stem, "__init__.py")):
                if os.path.isfile(candidate) and candidate not in found and candidate != root:
                    found.add(candidate)
                    todo.append(candidate)

    while todo and len(found) < _MOST_LOCAL_IMPORTS:
        current = todo.pop()
        try:
            with open(current, "rb") as f:
                tree = ast.parse(f.read())
        except (OSError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    module_files(folder, alias.name.split("."))
            elif isinstance(node, ast.ImportFrom):
                base = folder
                if node.level:  # (relative: from the importing file's package, inside the folder only)
                    base = os.path.dirname(current)
                    for _ in range(node.level - 1):
                        base = os.path.dirname(base)
                    if not base.startswith(folder):
                        continue
                module = node.module.split(".") if node.module else []
                module_files(base, module)
                for alias in node.names:  # (`from pkg import layers`: a submodule)
                    if alias.name != "*":
                        module_files(base, [*module, alias.name])
    return sorted(found)


def data_fingerprint(data, samples: int = 8) -> str:
    """sha256 over each split's length and content: a TensorDataset's tensors whole; of another
    dataset, up to `samples` evenly spaced samples (tensor bytes, other leaves' reprs), each read
    twice with the global generators restored, and left out when the reads differ (a dataset that
    augments from a generator of its own): a changed dataset, or one split otherwise, differs.
    Draws nothing from the global generators."""
    return _fingerprint(data, samples)[0]


def _fingerprint(data, samples: int = 8) -> tuple[str, list[str]]:
    """(data_fingerprint, the names of the splits whose samples differ at each read: drawn from a
    generator of the dataset's own, which a resume cannot restore). A sample the dataset cannot
    read is a DataError naming the split."""
    h = hashlib.sha256()
    drawn = []
    for name, split in zip(SPLIT_NAMES, data):
        n = len(split)
        h.update(f"{n};".encode())
        if isinstance(split, torch.utils.data.TensorDataset):
            for t in split.tensors:
                _hash_leaf(h, t)
            continue
        read = []
        for i in sorted({(n - 1) * k // max(1, samples - 1) for k in range(samples)} if n else ()):
            twice = []
            for _ in range(2):
                with global_generators_kept():
                    try:
                        sample = split[i]
                    except Exception as exc:  # noqa: BLE001 - the user's dataset
                        first = (str(exc).strip().splitlines() or [""])[0]
                        raise DataError(f"the {name} dataset raised an error reading sample {i} of its {n} "
                                        f"({type(exc).__name__}: {first}): fix the dataset (its __getitem__ "
                                        "must take every index below its __len__)") from exc
                    twice.append(torch.utils._pytree.tree_leaves(sample))
            if not _same_leaves(*twice):
                read = []  # random at each read: its samples say nothing about the data
                drawn.append(name)
                break
            read += twice[0]
        for leaf in read:
            _hash_leaf(h, leaf)
    return h.hexdigest(), drawn


def _hash_leaf(h, leaf) -> None:
    if isinstance(leaf, torch.Tensor):
        t = leaf.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(leaf, np.ndarray):
        h.update(f"{leaf.dtype}{leaf.shape}".encode() + np.ascontiguousarray(leaf).tobytes())
    else:
        h.update(repr(leaf).encode())


def _same_leaves(a: list, b: list) -> bool:
    def same(x, y):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            return x.shape == y.shape and x.dtype == y.dtype and bool(torch.equal(x, y))
        if isinstance(x, np.ndarray) and isinstance(y, np.ndarray):
            return x.shape == y.shape and x.dtype == y.dtype and bool(np.array_equal(x, y))
        return type(x) is type(y) and repr(x) == repr(y)
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def changed_since(saved: Optional[dict], now: dict) -> list[str]:
    """What differs between a run's saved `run_identity` and the current one: "model file", "built
    model", "data" (none when the run saved no identity, or no architecture: runs of pbp-fx before it)."""
    if not saved:
        return []
    # (an identity recorded before the model file's imports counted: its digest is of the file alone)
    model_now = now.get("model_digest") if _digested_imports(saved) else now.get("file_digest", now.get("model_digest"))
    changed = ["model file"] if saved.get("model_digest") != model_now else []
    if "architecture" in saved and "architecture" in now and saved["architecture"] != now["architecture"]:
        changed.append("built model")  # (the same file building another model: a config it reads)
    return changed + (["data"] if saved.get("data") != now.get("data") else [])


def resumed_identity(saved: dict, now: dict) -> dict:
    """The identity a resumed run saves: its start's, or, when the model file or data changed since
    (warned), the current one with what changed kept in "resumed_on_other" (the run's epochs are
    then of two models or datasets: `compare --pb-run` refuses it, also once they are restored)."""
    changed = changed_since(saved, now)
    if not changed:
        return saved
    return {**now, "resumed_on_other": sorted({*saved.get("resumed_on_other", ()), *changed})}


def refuse_frozen_model(model: nn.Module, error: type) -> None:
    """Before any work: a model with no trainable parameter (every arm and phase would have nothing to step)."""
    if next(model.parameters(), None) is None:  # (none at all: "every one is frozen" would mislead)
        raise error("the model has no parameters: nothing trains, and PB has no Linear or Conv layer to add "
                    "dendrites to; give build_model a model with Linear or Conv layers")
    if not any(p.requires_grad for p in model.parameters()):
        raise error(NOTHING_TRAINS)


def check_data(mod: ModuleType, data, model: nn.Module, inputs: tuple, batch_size: int, processes: int = 1):
    """Refuse, before any work, data that the model, its loss or its metric cannot take
    (`_preflight`); returns the batches' collate (`keyword_collate`). Draws no random number:
    a `train` run and compare's arms at one seed see the same random streams. batch_size: the
    global batch, which `processes` ranks share."""
    loss_fn, metric, _ = task_functions(mod)
    collate = keyword_collate(mod, model, len(inputs))
    with global_generators_kept():  # a dataset may draw as it loads a sample
        _preflight(model, data, min(batch_size, 8), loss_fn, metric, batch_size,
                   task_of(mod) == "classification" and getattr(mod, "loss_fn", None) is None, collate, processes)
    return collate


def _preflight(model, data, n: int, loss_fn, metric, batch_size: int, class_labels: bool, collate=None,
               processes: int = 1) -> None:
    """Refuse, before any work, data that the model, its loss or its metric cannot take (wrong shapes,
    targets out of range, an output the default loss cannot read, a metric that returns no
    (sum, count) pair): the first n samples of each dataset, batched, in eval mode and without
    gradients, so that no state and no random number changes. class_labels (the default
    classification loss): every label of a TensorDataset within the output's classes (dim 1).
    Training batches of one sample where a BatchNorm would see one value per channel."""
    from torch.utils.data import default_collate

    # Values per channel each BatchNorm sees from one sample (its input's positions), from the first forward.
    positions: dict = {}

    def seen(name: str):
        def hook(_module, args) -> None:  # (a pre-hook's return value would replace the inputs)
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.dim() > 1:
                positions.setdefault(name, x[0].numel() // max(x.shape[1], 1))
        return hook

    hooks = [m.register_forward_pre_hook(seen(name))
             for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    # The model file's own collate_fn makes the batches (alone, or under KeywordCollate)
    own_collate = collate is not None and not (isinstance(collate, KeywordCollate) and collate.own is None)
    was = model.training
    model.eval()
    try:
        for name, ds in zip(SPLIT_NAMES, data):
            size = len(ds)
            if size == 0:  # (refused with its own message where the loaders are checked)
                continue
            output = target = inputs = None
            try:
                samples = [ds[i] for i in range(min(n, size))]
                try:
                    batch = (collate or default_collate)(samples)
                except (ModelFileError, TrainingError):
                    raise
                except Exception as exc:  # noqa: BLE001 - the batching: named, not "the model"
                    first = (str(exc).strip().splitlines() or ["(no message)"])[0]
                    if not own_collate:
                        raise TrainingError(f"the first {name} samples do not batch ({type(exc).__name__}: {first}): "
                                            "torch's default batching stacks samples of one shape; give the model "
                                            "file a collate_fn(samples) that makes a batch of them (e.g. pads "
                                            "sequences to one length)") from exc
                    raise TrainingError(f"the model file's collate_fn raised {type(exc).__name__}: {first} on the "
                                        f"first {name} samples: fix collate_fn (it gets a list of the dataset's "
                                        "samples and returns a batch (input, ..., target))") from exc
                if own_collate and isinstance(batch, dict):
                    raise TrainingError(f"the model file's collate_fn returns a dict (keys "
                                        f"{', '.join(map(repr, list(batch)[:4]))}): return a tuple (input, ..., "
                                        "target), keyword inputs grouped in a dict before the target "
                                        "((ids, {'mask': mask}, y))")
                inputs, target = split_batch(batch)
                strings = [leaf for leaf in torch.utils._pytree.tree_leaves(target) if isinstance(leaf, str)]
                if strings:
                    raise TrainingError(f"the {name} targets are strings ({strings[0]!r}, ...), not numbers: map each "
                                        "class name to an integer label in datasets()")
                # Gradients on the training samples only, to see that the loss depends on the parameters
                # (eval mode still: no state changes)
                graded = name == SPLIT_NAMES[0] and any(p.requires_grad for p in model.parameters())
                with torch.set_grad_enabled(graded):
                    output = call_model(model, inputs)
                    loss = loss_fn(output, target)
                    if not isinstance(loss, torch.Tensor):
                        raise TrainingError(f"the loss_fn returns a {type(loss).__name__}, not a tensor, on the "
                                            f"first {name} samples: return the loss tensor itself (not loss.item() "
                                            "or float(loss)), which training differentiates")
                    if loss.numel() != 1:
                        raise TrainingError(f"the loss_fn returns a tensor of shape {list(loss.shape)} on the first "
                                            f"{name} samples, not one number: reduce it (.mean(), or "
                                            "reduction='mean')")
                    if graded and not loss.requires_grad:
                        raise TrainingError(f"the loss_fn returns a tensor that does not depend on the model's "
                                            f"parameters on the first {name} samples (detached: .detach(), .item(), "
                                            "torch.tensor(...) or numpy inside it): compute it from the output with "
                                            "torch ops")
                    value = float(loss.detach())
                    if not math.isfinite(value):  # (no learning rate helps there: said before any training)
                        raise TrainingError(f"the loss is {value:g} on the first {name} samples at the model's "
                                            "initial weights, before any training: check the model file's loss_fn "
                                            "and those samples' inputs and targets")
                    if graded and metric is accuracy:
                        _check_the_loss_reads_what_accuracy_scores(model, output, loss)
                    with torch.no_grad():
                        scored = metric(output, target)
                if not (isinstance(scored, (tuple, list)) and len(scored) == 2):
                    raise TypeError(f"metric returned {type(scored).__name__}, not a (sum, count) pair")
                float(scored[0]), float(scored[1])  # numbers (or one-element tensors): else a TypeError here
                if not math.isfinite(float(scored[0])) or not math.isfinite(float(scored[1])):
                    raise TrainingError(f"the metric returned ({float(scored[0]):g}, {float(scored[1]):g}) on the "
                                        f"first {name} samples: return a finite (sum, count) pair (a NaN score is "
                                        "no epoch's best, so the run could keep none)")
                if float(scored[1]) < 0:  # (its mean's sign flips: the run would keep its worst epoch)
                    raise TrainingError(f"the metric returned a negative count ({float(scored[1]):g}) on the first "
                                        f"{name} samples: return (sum, count) with count the number of samples "
                                        "scored (0 or more)")
                if name == SPLIT_NAMES[0]:
                    _warn_broadcast_targets(scored_tensor(output), target)
            except TargetError:  # (the built-in loss's: the job's own words name the split and TASK too)
                _diagnose_targets(target, scored_tensor(output), name, class_labels)
                raise
            except (ModelFileError, TrainingError):
                raise  # the samples do not fit the model file's inputs, or a loss of many numbers: said as it is
            except Exception as exc:  # noqa: BLE001 - whatever the user's code raises, said in one line
                first = (str(exc).strip().splitlines() or ["(no message)"])[0]
                out = scored_tensor(output)
                layout = ("; the built-in loss and accuracy read the classes from dim 1 ([N, C, ...], as "
                          "F.cross_entropy): put them there, or give the model file a loss_fn and metric"
                          if class_labels and isinstance(out, torch.Tensor) and out.dim() >= 3 else "")
                _diagnose_targets(target, out, name, class_labels)
                if output is None and inputs is not None:
                    _diagnose_input_dtypes(model, inputs, name)
                raise TrainingError(f"the first {name} samples fail in the model, its loss or its metric "
                                    f"({type(exc).__name__}: {first}): check that the data's shapes, dtypes and "
                                    "targets match the model, its outputs and the model file's TASK / loss_fn / "
                                    f"metric (a sample is (input, ..., target); a last dict input gives keyword inputs, "
                                    f"unless forward takes it whole){layout}") from exc
            out = scored_tensor(output)
            labels = _tensor_labels(ds) if class_labels else None
            if labels is not None and isinstance(out, torch.Tensor) and out.dim() >= 2:
                _check_labels(labels, out.shape[1], name)
    finally:
        model.train(was)
        for hook in hooks:
            hook.remove()
    local = min(batch_size // processes, len(data[0]))  # (what one rank's BatchNorm sees)
    single = [layer for layer, per_sample in positions.items() if local * per_sample < 2]
    if single and processes > 1:
        raise TrainingError(f"training batches of {local} sample per process: BatchNorm layer {single[0]!r} would see "
                            f"one value per channel and cannot train: use --batch-size {2 * processes} or more for "
                            f"--nproc {processes} (the global batch is shared), or fewer processes")
    if single:
        raise TrainingError(f"training batches of {local} sample: BatchNorm layer {single[0]!r} "
                            "would see one value per channel and cannot train: use --batch-size 2 or more "
                            "(and at least 2 training samples)")


def _warn_broadcast_targets(output, target) -> None:
    """Warn where float targets and the output broadcast to more values than either holds ([N, 1]
    against [N]: [N, N]): a loss of the model file's own that subtracts them trains every output
    towards every sample's target, and the run ends well with a constant model (the built-in loss
    refuses such shapes)."""
    if not (isinstance(output, torch.Tensor) and isinstance(target, torch.Tensor) and target.is_floating_point()
            and output.shape != target.shape):
        return
    try:
        both = torch.broadcast_shapes(output.shape, target.shape)
    except RuntimeError:
        return
    if math.prod(both) > max(output.numel(), target.numel()):
        warn_at_user(f"the model's output {list(output.shape)} and its targets {list(target.shape)} broadcast to "
                     f"{list(both)}: a loss that subtracts them trains on every pair of samples; give the targets "
                     "the output's shape (y[:, None] for one output), or the output theirs (.squeeze(-1))")


def _check_the_loss_reads_what_accuracy_scores(model: nn.Module, output, loss: torch.Tensor) -> None:
    """TrainingError when the built-in accuracy scores an output the loss does not train (a dict of
    heads without "logits", whose first is an auxiliary one): it would pick the best epoch, and
    drive the schedule, by an untrained head."""
    scored = scored_tensor(output)
    if scored is output or not isinstance(scored, torch.Tensor) or not scored.requires_grad:
        return  # one tensor: the loss reads it (or it does not depend on the parameters at all)
    # Computed by parameters the loss trains (the logits it reads; probabilities beside them: the same
    # argmax) is fine; a head of its own the loss leaves untrained is not.
    params = [p for p in model.parameters() if p.requires_grad]
    by_loss = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    by_scored = torch.autograd.grad(scored.sum(), params, retain_graph=True, allow_unused=True)
    if all(s is None or l is not None for s, l in zip(by_scored, by_loss)):
        return
    where = next((f"output[{k!r}]" for k, v in output.items() if v is scored), "output[0]") \
        if isinstance(output, dict) else "output[0]"
    raise TrainingError(f"the built-in accuracy scores {where} (a dict's 'logits', else its first tensor; a tuple's "
                        "first), which the model file's loss_fn does not train: define metric(output, target) -> "
                        "(sum, count) in the model file for the output the loss trains, or return it first")


def _diagnose_input_dtypes(model: nn.Module, inputs, name: str) -> None:
    """TrainingError naming floating inputs of another dtype than the model's parameters (numpy's
    float64 arrays for a float32 model), when the first batch failed in the model and runs once
    those inputs take the parameters' dtype (else the dtype is not why)."""
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(floats) != 1:
        return
    want = floats.pop()
    other = next((t.dtype for t in torch.utils._pytree.tree_leaves(inputs)
                  if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != want), None)
    if other is None:
        return
    cast = torch.utils._pytree.tree_map(
        lambda t: t.to(want) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, inputs)
    try:
        with torch.no_grad():
            call_model(model, cast)
    except Exception:  # noqa: BLE001 - it fails in the parameters' dtype too: another reason, said as it is
        return
    raise TrainingError(f"the {name} inputs are {other} where the model's parameters are {want}: make the "
                        f"datasets yield {want} inputs (torch.as_tensor(x, dtype={want}), or numpy's "
                        f"x.astype('{str(want).split('.')[-1]}'))")


def _diagnose_targets(target, out, name: str, class_labels: bool) -> None:
    """TrainingError naming targets that the built-in cross-entropy cannot take (floats in the
    layout of class indices, labels beyond the output's classes), when these are why the first
    batch failed."""
    if not (class_labels and isinstance(target, torch.Tensor) and isinstance(out, torch.Tensor) and out.dim() >= 2):
        return
    if out.dim() == 2 and tuple(target.shape) == (out.shape[0], 1) and not target.dtype.is_floating_point:
        raise TrainingError(f"the {name} labels have shape {list(target.shape)}, where the built-in cross-entropy "
                            f"takes one class index per sample, [{out.shape[0]}]: yield y.squeeze(1) (or y[:, 0])")
    if tuple(target.shape) != (out.shape[0], *out.shape[2:]):
        return  # not class indices for classes on dim 1 (a [B, T, C] tagger): the layout is said after
    if target.dtype.is_floating_point:
        raise TrainingError(f"the {name} targets are floats ({target.dtype}) where the built-in cross-entropy takes "
                            "class indices: yield integer labels (y.long()), or set TASK = \"regression\" in the "
                            "model file for numeric targets")
    _check_labels(target, out.shape[1], name)  # (it leaves bool labels alone)


def _tensor_labels(ds):
    """The labels of a TensorDataset, also under (nested) Subsets (random_split's), else None."""
    index = None
    while isinstance(ds, Subset):
        # (a tensor of indices as it is: list() of one makes a 0-d tensor per sample, seconds for millions)
        idx = (ds.indices if isinstance(ds.indices, torch.Tensor) else torch.as_tensor(ds.indices)).long()
        index = idx if index is None else idx[index]
        ds = ds.dataset
    if not isinstance(ds, TensorDataset):
        return None
    labels = ds.tensors[-1]
    return labels if index is None else labels[index]


def _check_labels(labels: torch.Tensor, classes: int, name: str) -> None:
    """Every class label of a dataset within the model's classes (a TensorDataset: one cheap pass)."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        return
    labels = class_indices(labels)
    labels = labels[labels != IGNORED_LABEL]  # (the default loss and accuracy leave them out)
    if labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        bad = low if low < 0 else high
        raise TrainingError(f"the {name} dataset has class label {bad}, but the model outputs {classes} classes "
                            f"(labels 0..{classes - 1}, or {IGNORED_LABEL} to leave a sample out): fix the labels or the "
                            "model's number of outputs")


def seed_everything(seed: int) -> None:
    """Seed torch, numpy's global generator and Python's `random`: a model file's own code
    (augmentation, a random split) may draw from any of them."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _host_rng_states() -> dict:
    """numpy's and Python's global generator states as JSON data (the checkpoint's job state)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(internal), gauss_next]}


def _set_host_rng_states(states: dict) -> None:
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


def make_loaders(data, batch_size: int, seed: int, eval_batch_size: int = 1000, distributed=None, collate=None,
                 pin_memory: bool = False):
    """Train (shuffled), validation and test loaders. distributed: this rank's shards, with
    `batch_size` the global batch (see pbp_fx.distributed.Distributed.loader). collate: the
    loaders' collate_fn (`modelfile.keyword_collate`; None: torch's default). pin_memory: batches
    in page-locked memory, so that their copy to a GPU overlaps its work."""
    train, val, test = data
    extra = {} if collate is None else {"collate_fn": collate}
    if pin_memory:
        extra["pin_memory"] = True

    def own():  # an iterator over a loader without a generator draws its base seed from torch's global one:
        return {"generator": torch.Generator().manual_seed(seed)}  # evaluations then shifted dropout's stream

    if distributed is not None:
        return (distributed.loader(train, batch_size, shuffle=True, seed=seed, **extra),
                distributed.loader(val, eval_batch_size, train=False, **own(), **extra),
                distributed.loader(test, eval_batch_size, train=False, **own(), **extra))
    lone = last_batch_is_lone(len(train), batch_size)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=lone, **own(), **extra),
            DataLoader(val, batch_size=eval_batch_size, **own(), **extra),
            DataLoader(test, batch_size=eval_batch_size, **own(), **extra))


def train_job(model_file: Optional[str] = None, *, config: Optional[PBConfig] = None,
              training: Optional[TrainConfig] = None, out: Optional[str] = None, include=None, exclude=None,
              progress: bool = True, echo: Callable[[str], None] = print, distributed=None,
              resume: Optional[str] = None, device=None) -> dict:
    """Train a model file's model with PB (or gd) and report; returns the summary dict.

    config: the PB settings; training: epochs, lr, batch size, seed, capture frontend.
    With `out`, a resumable checkpoint is written after every epoch; `resume=DIR` continues
    the run saved in DIR with its own settings (same seeds: the same final model as a run that
    was never interrupted). device: where it trains ("auto", "cpu", "cuda" or a torch.device, checked
    by training.training_device before any work; None: a resumed run's own device, else the CPU;
    with `distributed`, the rank's device).

    distributed (a pbp_fx.distributed.Distributed; every rank calls train_job): the data is
    sharded (`batch_size` stays the global batch), training runs on DDP, and only rank 0
    prints, shows progress and writes `out`. Every rank returns the same summary.
    """
    resume_from, saved = None, None
    if resume is not None:
        resume_from = os.path.join(resume, CHECKPOINT)
        saved = _saved_job(resume_from)
        model_file = _resumed_model_file(saved.model_file, model_file, resume)
        config, training, include, exclude, out = saved.config, saved.training, saved.include, saved.exclude, resume
    config, training = config or PBConfig(), training or TrainConfig()
    if distributed is None:
        device = training_device(device or (saved.device if saved is not None and saved.device else "cpu"))
        with _interrupted_resume_says_so(resume, 1, progress), contextlib.ExitStack() as held:
            return _train_job(model_file, config, training, out, include, exclude, progress, echo, None, device,
                              held, resume_from, saved)
    if device is not None and training_device(device, distributed.world_size).type != distributed.device.type:
        raise ConfigError(f"device={device}: this rank trains on {distributed.device}, the process group's device: "
                          f"drop device=, or give {distributed.device.type!r}")
    if not distributed.is_main:
        echo = _silent  # (its bar too: `_train_job` shows rank 0's; `progress` stays the run's flag for the hints)
    with (_interrupted_resume_says_so(resume, distributed.world_size, progress), distributed.guard(),
          contextlib.ExitStack() as held):
        return _train_job(model_file, config, training, out, include, exclude, progress, echo, distributed,
                          distributed.device, held, resume_from, saved)


@contextlib.contextmanager
def _interrupted_resume_says_so(resume: Optional[str], processes: int, progress: bool):
    """A resume stopped by Ctrl-C or SIGTERM before it saved an epoch (in its start-up: the model, data and
    loss checks) names the resume command too, as a later interrupt does: its checkpoint is as it was."""
    try:
        yield
    except KeyboardInterrupt as exc:
        if resume is None or exc.args:  # (a later interrupt names the epochs saved already)
            raise
        raise type(exc)("before the resumed run saved an epoch (its checkpoint is as it was)"
                        + _resumes(resume, 1, processes, progress, lead="it resumes with")) from None


def _warn_resumed_otherwise(saved: SavedRun, identity: dict, processes: int, device: torch.device) -> None:
    """Say what makes a resume differ from the run it continues: an edited model file or other
    data, another process count (which deals the data otherwise), another CPU thread count, or another device."""
    changed = changed_since(saved.identity, identity)
    if changed:
        warn_at_user(f"the run's {' and '.join(changed)} changed since it started: the resumed run trains on the "
                     "current one, so it is not the run the checkpoint began (restore them to continue it exactly)")
    if "training" in identity.get("own_randomness", ()):
        warn_at_user("the training data differs at each read of a sample (augmentation drawn from a generator of "
                     "the dataset's own, which the checkpoint does not hold): the resumed run sees other samples than "
                     "the uninterrupted run would; draw augmentation from torch's, numpy's or Python's global "
                     "generator, which a resume restores, to continue a run exactly")
    if saved.processes is not None and saved.processes != processes:
        warn_at_user(f"the run trained on {saved.processes} process(es) and resumes on {processes}: the data is dealt "
                     f"otherwise from here on (resume with --nproc {saved.processes} to continue it exactly)")
    if saved.threads is not None and saved.threads != torch.get_num_threads() and device.type == "cpu":
        warn_at_user(f"the run trained on {saved.threads} CPU thread(s) and resumes on {torch.get_num_threads()}: "
                     "torch's kernels sum in another order, so it differs from the uninterrupted run from here on "
                     f"(resume with OMP_NUM_THREADS={saved.threads} to continue it exactly)")
    if saved.device is not None and saved.device != device.type:
        warn_at_user(f"the run trained on {saved.device} and resumes on {device.type}: its arithmetic (and a GPU's "
                     f"random numbers) differ from here on (resume with --device {saved.device} to continue it "
                     "exactly)")


def _resumed_model_file(saved: Optional[str], given: Optional[str], run_dir: str) -> Optional[str]:
    """The model file a resume trains: the one given (the run's file at a new path), else the run's own."""
    if given is not None:
        return given
    if saved is not None and not os.path.isfile(saved):
        raise TrainingError(f"the run's model file {saved} does not exist (moved or renamed?): give its path, "
                            f"pbp-fx train FILE --resume {shlex.quote(run_dir)}")
    return saved


@dataclass(frozen=True)
class SavedRun:
    """A `pbp-fx train` run's job state, as `resume` reads it."""

    model_file: Optional[str]
    config: PBConfig
    training: TrainConfig
    include: Optional[list]
    exclude: Optional[list]
    processes: Optional[int]  # None: saved before pbp-fx recorded it
    identity: Optional[dict]  # run_identity() when the run started; None: saved before it was recorded
    most_processes: Optional[int] = None  # the most it trained on over its resumes (None: not recorded)
    complete: bool = False  # PB had finished: a resume only makes its report again
    device: Optional[str] = None  # the device type it last trained on, "cpu" or "cuda" (None: not recorded)
    devices: tuple = ()  # every device type it trained on over its resumes
    threads: Optional[int] = None  # torch's CPU threads it last trained with (None: not recorded)


def _silent(*_args) -> None:
    pass


def refuse_unrunnable(model_file: Optional[str], config: PBConfig, out: Optional[str],
                      resumed: bool = False) -> ModuleType:
    """The loaded model file, once what a run is refused for up front holds: its output folder (a long
    run must not fail at its last step), the model file, the metric's direction. The launcher of several
    processes checks it too, before it starts them."""
    if out is not None:
        check_output_dir(out, TrainingError, resumed=resumed)
        if not resumed:
            _refuse_files_of_no_run(out)
    mod = load_job_module(model_file)
    check_metric_direction(mod, config.maximize, ConfigError)
    return mod


def _train_job(model_file, config: PBConfig, training: TrainConfig, out, include, exclude, progress, echo,
               distributed, device: torch.device, held: contextlib.ExitStack, resume_from=None,
               saved: Optional[SavedRun] = None) -> dict:
    main = distributed is None or distributed.is_main
    seed = training.seed
    include, exclude = site_filters(include, exclude)  # (perforate, resume and the checkpoint's args: lists)
    processes = 1 if distributed is None else distributed.world_size
    mod = refuse_unrunnable(model_file, config, out if main else None, resumed=resume_from is not None)
    loss_fn, metric, metric_name = task_functions(mod)
    if main:
        warn_unread_names(mod)
        unused = config.unused_settings()
        if unused:
            warn_at_user(f"mode 'gd' grows random dendrites and runs no dendrite phase: {', '.join(unused)} "
                         f"{'is' if len(unused) == 1 else 'are'} not used (drop {'it' if len(unused) == 1 else 'them'}, "
                         "or train with mode 'pb')")
    data = seeded_datasets(mod, seed)
    seed_everything(seed)  # the model's initial weights do not depend on what datasets() drew
    model, inputs = instantiate(mod)
    refuse_frozen_model(model, TrainingError)
    identity = run_identity(model_file, data, model)
    changed = changed_since(saved.identity, identity) if saved is not None and saved.complete else []
    if changed:  # (its report would be made again of another model or data, beside the checkpoint of this one)
        raise TrainingError(f"the run in {out} is complete, and its {' and '.join(changed)} changed since it started: "
                            f"a resume would make its report again of another run; restore "
                            f"{'it' if len(changed) == 1 else 'them'}, or train a new run (another --out)")
    if saved is not None and main:
        _warn_resumed_otherwise(saved, identity, processes, device)
    collate = check_data(mod, data, model, inputs, training.batch_size,
                         1 if distributed is None else distributed.world_size)
    train_loader, val_loader, test_loader = make_loaders(data, training.batch_size, seed, distributed=distributed,
                                                         pin_memory=device.type == "cuda",
                                                         collate=collate)
    t0 = time.perf_counter()
    pm = perforate(model, inputs, include=include, exclude=exclude, activation=config.activation, mode=config.mode,
                   example_kwargs=example_kwargs(mod), frontend=training.frontend)
    base_params = pm.num_parameters()  # with no dendrite yet: what the forward uses, as compare counts
    _check_pool_fits(pm, config, device)
    pm.to(device)  # before the controller's optimizer and a resume's state: both then live there
    moved_to = None if device.type == "cpu" and distributed is None else device  # (CPU batches: left as they are)
    ctl = PhaseController(pm, config, optimizer_factory=lambda params: default_optimizer(params, lr=training.lr),
                          distributed=distributed)
    history = History()
    earlier = 0.0  # seconds the run trained before this process (a resumed run's summary counts them too)
    if resume_from is not None:
        history, earlier = _resume(resume_from, pm, ctl, train_loader)
    finished = resume_from is not None and ctl.done
    # every device type the run trained on, over its resumes (compare says when its seconds are a GPU's)
    earlier_devices = set() if saved is None else {*saved.devices, *filter(None, [saved.device])}
    devices = sorted(earlier_devices if finished and earlier_devices else {*earlier_devices, device.type})
    if resume_from is not None:
        if finished:
            echo(f"the run in {out} is complete ({len(history.epochs)} epochs, {ctl.history[-1]['note']}): "
                 "nothing left to train; its report follows")
        else:
            echo(f"resuming {resume_from} after epoch {len(history.epochs)} ({pm.phase} phase, "
                 f"dendrites {pm.dendrites})")
    stopped: list[float] = []  # the run's seconds once training ended: the summary's and the final save's
    non_finite: Optional[TrainingError] = None  # training stopped on a non-finite value (the best model restored)

    def run_seconds() -> float:
        if stopped:
            return stopped[0]
        return earlier if finished else earlier + time.perf_counter() - t0

    callbacks = []
    saver = None
    created: list[str] = []
    if out is not None:
        stale: list[str] = []
        if main:
            created, stale = _make_out(out, fresh=resume_from is None, echo=echo, held=held)
        args = {"config": config.to_dict(), "training": training.to_dict(), "include": include, "exclude": exclude}
        if saved is not None and saved.identity is not None:
            identity = resumed_identity(saved.identity, identity)
        # The most processes the run trained on, over its resumes: compare pairs only runs always on one.
        earlier_counts = [] if saved is None else [n for n in (saved.processes, saved.most_processes) if n is not None]
        most_processes = max([processes, *earlier_counts])
        saver = _epoch_saver(os.path.join(out, CHECKPOINT), pm, ctl, history, args,
                             _model_ref(model_file), seed, train_loader, distributed,
                             clock=run_seconds, run_record={"identity": identity, "processes": processes,
                                                            "most_processes": most_processes, "device": device.type,
                                                            "threads": torch.get_num_threads(),
                                                            "devices": devices})
        callbacks.append(saver)
        if stale:
            callbacks.append(_replace_stale(out, stale))
    try:
        try:
            history = fit(pm, train_loader, val_loader, loss_fn, controller=ctl, epochs=training.epochs, metric=metric,
                          test_loader=test_loader, progress=progress and main, distributed=distributed, history=history,
                          callbacks=callbacks, device=moved_to)
        except DataError as exc:  # the dataset's own error: which epoch, and how to go on
            done = len(history.epochs)
            raise TrainingError(f"training stopped in epoch {done + 1}: {exc}"
                                + _resumes(out, done, processes, progress)) from exc
        except TrainingError as exc:
            if not (isinstance(exc.__cause__, NonFiniteError) and not isinstance(exc.__cause__, NonFiniteDataError)
                    and ctl.done and ctl.best_state is not None):
                raise
            # A loss or value gone non-finite: fit stopped and restored the best-validation model. The run
            # is over; its report and that model are written as for any finished run, then the error stands.
            non_finite = exc
        except (PBError, OSError, MemoryError):
            raise
        except SystemExit as exc:  # (the model file's data, loss or metric ended the process: say so, and how to go on)
            raise TrainingError(f"training stopped in epoch {len(history.epochs) + 1}: {exited(exc)}"
                                + _resumes(out, len(history.epochs), processes, progress)) from exc
        except Exception as exc:  # noqa: BLE001 - raised inside the model file's model, data, loss or metric
            text = str(exc).strip().splitlines()
            done = len(history.epochs)
            if isinstance(exc, RuntimeError) and any(m in str(exc) for m in ("can't allocate memory", "out of memory")):
                raise TrainingError(f"training stopped in epoch {done + 1}: out of memory ({text[0][:160]}); use a "
                                    "smaller --pool, --batch-size or model"
                                    + _resumes(out, done, processes, progress)) from exc
            raise TrainingError(
                f"training stopped in epoch {done + 1}: {type(exc).__name__}: {text[0] if text else ''} (from the "
                f"model file's model, data, loss or metric; --debug shows where)"
                + _resumes(out, done, processes, progress)) from exc
    except KeyboardInterrupt as exc:
        remove_empty(created)  # failed before its first checkpoint: leave nothing behind
        # The epochs this run's checkpoint holds (a save ends whole, or not at all where it raised; before its
        # first save the folder may hold another run's): what a resume continues
        done = saver.epochs if saver is not None else 0
        if done:
            # (Ctrl-C or SIGTERM)
            raise type(exc)(f"after epoch {done}{_resumes(out, done, processes, progress)}") from None
        raise
    except BaseException:
        remove_empty(created)  # failed before its first checkpoint: leave nothing behind
        raise
    try:
        seconds = run_seconds()  # a run resumed complete trains nothing: its time is what it took before
        stopped.append(round(seconds, 2))
        test = evaluate(pm, test_loader, metric, device=moved_to, distributed=distributed, data="test")
        val = evaluate(pm, val_loader, metric, device=moved_to, distributed=distributed, data="validation")
        summary = {
            "model": _model_ref(model_file), "mode": config.mode, "seed": seed,
            "epochs": len(history.epochs), "seconds": round(seconds, 2),
            "params_plain": base_params, "params": pm.num_parameters(),
            "dendrites": pm.num_dendrites, "best_epoch": ctl.best_epoch,
            "metric": metric_name, "maximize": config.maximize, "val": val, "test": test,
            "device": str(device),
            "devices": devices,
            # the settings it ran with: `config` and `training` together are a --config file of them
            "config": config.to_dict(), "training": training.to_dict(), "include": include, "exclude": exclude,
            "events": [e for e in ctl.history if e["decision"] != "continue"],
        }
        if distributed is not None:
            summary["processes"] = distributed.world_size
        _print_report(summary, echo)
        if out is not None and not finished:  # (a run resumed complete: its checkpoint holds that state already)
            saver(None)  # the final state (best-validation model), still resumable; every rank calls it
        if out is not None and main:
            plotted = _write_outputs(out, history, summary)
            names = ["history.json", "summary.json", *(["plot.png"] if plotted else []), CHECKPOINT]
            echo("wrote " + ", ".join(os.path.join(out, name) for name in names))  # (`--out dir/`: no dir//)
        if distributed is not None:
            distributed.barrier()  # the outputs are complete when any rank returns
    except KeyboardInterrupt as exc:  # (Ctrl-C or SIGTERM while the report is made: training is over)
        raise type(exc)(f"after training ({len(history.epochs)} epochs), before its report was all written"
                        + _resumes(out, saver.epochs if saver is not None else 0, processes, progress,
                                   "its checkpoint holds the run, and its report is written by")) from None
    if non_finite is not None:
        where = f": its report and that model are in {out}" if out is not None else ""
        raise TrainingError(f"{non_finite}{where}") from non_finite.__cause__
    return summary


CHECKPOINT = "checkpoint.safetensors"


def _model_ref(model_file: Optional[str]) -> str:
    return DEFAULT_MODEL if model_file in (None, DEFAULT_MODEL) else os.path.abspath(model_file)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def _epoch_saver(path: str, pm, ctl, history, args: dict, model_ref: str, seed: int, train_loader, distributed,
                 clock: Callable[[], float] = lambda: 0.0, run_record: Optional[dict] = None):
    """After every epoch: a checkpoint that `resume` continues from (model, controller, optimizer,
    history, settings, the random states that decide what comes next, `clock()`: the seconds
    the run has taken so far, and `run_record`: the run's identity and process count)."""
    gen = getattr(train_loader, "generator", None)

    def save_epoch(_row: dict) -> None:
        state = {"args": args, "model_file": model_ref, "history": history.to_dict(), "seconds": round(clock(), 2),
                 **(run_record or {}),
                 "rng": {"torch": _b64(torch.get_rng_state()),
                         "loader": None if gen is None else _b64(gen.get_state()), **_host_rng_states(),
                         **_cuda_rng_state(pm)}}
        kwargs = {"controller": ctl, "optimizer": ctl.optimizer, "model_ref": model_ref,
                  "extra": {"seed": seed, "job_state": state}}
        # Ctrl-C and SIGTERM wait for the save and its count: one landing after the file was replaced, before the
        # count, named the epoch before the one the checkpoint holds.
        with stops_held():
            if distributed is None:
                save(pm, path, **kwargs)
            else:
                distributed.save(pm, path, **kwargs)
            save_epoch.epochs = len(history.epochs)

    save_epoch.epochs = len(history.epochs)  # what the checkpoint holds of this run (a resumed run's epochs)
    return save_epoch


# Bytes per candidate parameter in a dendrite phase: its value, gradient, two Adam moments and snapshot.
_POOL_BYTES_PER_PARAM = 5 * 4


def _check_pool_fits(pm, config: PBConfig, device: torch.device = torch.device("cpu")) -> None:
    """Refuse, before any training, a pool whose candidates (at the most dendrites the run may
    install) cannot fit in this machine's memory (the GPU's, training on one): it would fail at
    the first dendrite phase."""
    if config.mode != "pb":
        return
    cascade = sum(s.channels * config.max_dendrites for s in pm.sites.values())  # (weights from earlier dendrites)
    per_candidate = sum(s.layer.params_per_copy + 3 * s.channels for s in pm.sites.values()) + cascade
    need = config.pool * per_candidate * _POOL_BYTES_PER_PARAM
    where = "this machine's"
    try:
        if device.type == "cuda":
            have, where = torch.cuda.get_device_properties(device).total_memory, f"{device}'s"
        else:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # (no sysconf: not checked)
        return
    if need > have:
        fix = ("a smaller --max-dendrites (each candidate holds a weight per channel for every earlier dendrite)"
               if 2 * cascade > per_candidate else "a smaller --pool")
        raise ConfigError(f"pool={config.pool}, max_dendrites={config.max_dendrites}: the candidates need about "
                          f"{need / 2**30:.3g} GiB ({config.pool} x {per_candidate} parameters with their gradients, "
                          f"Adam state and snapshots), more than {where} {have / 2**30:.3g} GiB; use {fix}")


def saved_run(run_dir: str) -> SavedRun:
    """The job state of the run saved in `run_dir` (its --out folder), checked as `resume` checks
    it: a launcher reads it before it starts any process."""
    return _saved_job(os.path.join(run_dir, CHECKPOINT))


def _saved_job(path: str) -> SavedRun:
    """The job state of the run saved at `path`, every part of it checked before any work (a state
    written by another version, or edited, and re-hashed would otherwise fail midway with an
    internal error)."""
    saved, meta = _job_state(path)
    try:
        model_file = None if saved["model_file"] == DEFAULT_MODEL else saved["model_file"]
        args = saved["args"]
        config, training = PBConfig.from_dict(args["config"]), TrainConfig.from_dict(args["training"])
        include, exclude = args["include"], args["exclude"]
        processes, identity, most = saved.get("processes"), saved.get("identity"), saved.get("most_processes")
        threads = saved.get("threads")
        if not all(n is None or (type(n) is int and n >= 1) for n in (processes, most, threads)) or not (
                identity is None or isinstance(identity, dict)):
            raise ValueError("processes or identity")
        # (a run saved before pbp-fx recorded it: one process trained on the CPU, several maybe on GPUs)
        device = saved.get("device") or ("cpu" if (processes or 1) == 1 else None)
        devices = tuple(saved.get("devices", [device] if device else ()))
        if device not in (None, "cpu", "cuda") or not set(devices) <= {"cpu", "cuda"}:
            raise ValueError("device")
        for value in saved["rng"].get("cuda") or []:
            _unb64(value)
        History.from_dict(saved["history"])
        float(saved.get("seconds", 0.0))
        _unb64(saved["rng"]["torch"])
        if saved["rng"]["loader"] is not None:
            _unb64(saved["rng"]["loader"])
        if "numpy" in saved["rng"]:  # (runs saved before they were kept have none)
            with global_generators_kept():
                _set_host_rng_states(saved["rng"])
    except ConfigError as exc:
        raise ConfigError(f"cannot resume from {path}: {exc}") from None
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise TrainingError(f"cannot resume from {path}: its job state is malformed ({type(exc).__name__}: {exc}), "
                            "written by another pbp-fx version or edited; start a new run") from None
    if not all(p is None or isinstance(p, str) or (isinstance(p, list) and all(isinstance(q, str) for q in p))
               for p in (include, exclude)):
        raise TrainingError(f"cannot resume from {path}: its job state is malformed (include/exclude), "
                            "written by another pbp-fx version or edited; start a new run")
    schedule = (meta.get("controller") or {}).get("schedule") or {}
    return SavedRun(model_file, config, training, include, exclude, processes, identity, most,
                    complete=schedule.get("done") is True, device=device, devices=devices, threads=threads)


def _job_state(path: str) -> tuple[dict, dict]:
    """(the job state `pbp-fx train` saved in the checkpoint at `path`, the checkpoint's metadata)."""
    if not os.path.isfile(path):
        raise TrainingError(f"cannot resume: {path} does not exist (pass the --out folder of an earlier run)")
    meta = read_meta(path)
    if meta["format"] == FORMAT_V1:
        raise TrainingError(f"cannot resume {path}: it is a {meta['format']} checkpoint (pbp-fx before PBConfig), "
                            "whose training state cannot be continued; start a new run (its model still loads with "
                            "pbp_fx.load(path, model, example_inputs))")
    state = meta.get("extra", {}).get("job_state")
    if state is None:
        raise TrainingError(f"cannot resume from {path}: it was not written by pbp-fx train (no job state)")
    return state, meta


def _gpu_of(pm) -> Optional[torch.device]:
    """The CUDA device the model's parameters are on (None: the CPU, or no parameters)."""
    device = next((t.device for t in pm.parameters()), None)
    return device if device is not None and device.type == "cuda" else None


def _cuda_rng_state(pm) -> dict:
    """{"cuda": [the generator state of the GPU the model is on]} ({} on the CPU): dropout on a GPU
    draws from it, so a resume must restore it to continue the run exactly."""
    gpu = _gpu_of(pm)
    return {} if gpu is None else {"cuda": [_b64(torch.cuda.get_rng_state(gpu))]}


def _resume(path: str, pm, ctl, train_loader) -> tuple[History, float]:
    """Load the model, controller, optimizer and random states saved after the last epoch; returns
    the history and the seconds the run took before."""
    state, _ = _job_state(path)
    # the model, then the controller (which rebinds its optimizer to it in place), then that optimizer's state
    load(path, pm, controller=ctl, optimizer=ctl.optimizer)
    torch.set_rng_state(_unb64(state["rng"]["torch"]))
    gpu = _gpu_of(pm)
    if state["rng"].get("cuda") and gpu is not None:  # (saved on a GPU, resumed on one)
        torch.cuda.set_rng_state(_unb64(state["rng"]["cuda"][0]), gpu)
    if "numpy" in state["rng"]:
        _set_host_rng_states(state["rng"])
    gen = getattr(train_loader, "generator", None)
    if gen is not None and state["rng"]["loader"] is not None:
        gen.set_state(_unb64(state["rng"]["loader"]))
    return History.from_dict(state["history"]), float(state.get("seconds", 0.0))


# What a run writes to --out: a new run replaces an earlier run's, so that no report describes another run.
RUN_OUTPUTS = (CHECKPOINT, "summary.json", "history.json", "plot.png",
               "compare.md", "compare.json", "compare.png", "compare.partial.json")  # (compare --pb-run DIR: beside the run)


def _refuse_files_of_no_run(out: str) -> None:
    """A fresh run replaces an earlier run's outputs in --out; files of those names in a folder that
    holds no run (no checkpoint) may be the user's own, and are refused before any work."""
    if os.path.isfile(os.path.join(out, CHECKPOINT)):
        return
    found = [n for n in RUN_OUTPUTS if os.path.isfile(os.path.join(out, n))]
    if found:
        raise TrainingError(f"--out {out!r} holds {', '.join(found)} but no run ({CHECKPOINT}): a run writes files "
                            "of those names; move them, or choose another --out")


def _make_out(out: str, fresh: bool, echo, held: contextlib.ExitStack) -> tuple[list[str], list[str]]:
    """Create --out and hold it for this run (`held` releases it); returns (the folders created, --out and
    parents, deepest first; an earlier run's outputs there that a fresh run replaces: `_replace_stale` removes
    them once this run has its first checkpoint)."""
    try:
        created = make_folders(out)
    except OSError as exc:
        raise TrainingError(f"cannot create output folder {out}: {exc.strerror or exc}") from exc
    try:
        held.enter_context(folder_held(out, TrainingError))
    except BaseException:
        remove_empty(created)
        raise
    # A process killed inside an atomic write leaves its temporary file (`.NAME.XXXX.tmp`, as big as the
    # checkpoint); no other process writes this folder now (held), so any there is such a leftover.
    for name in os.listdir(out):
        if name.endswith(".tmp") and any(name.startswith(f".{n}.") for n in RUN_OUTPUTS):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(out, name))
    stale = [n for n in RUN_OUTPUTS if fresh and os.path.isfile(os.path.join(out, n))]
    if stale:
        echo(f"{out} holds an earlier run ({', '.join(stale)}): this run replaces it from its first checkpoint on "
             f"(--resume {out} continues a run)")
    return created, stale


def _replace_stale(out: str, stale: list[str]) -> Callable[[dict], None]:
    """An epoch callback (after the checkpoint saver) that removes the earlier run's reports on its
    first call: until then a failed run leaves the earlier run as it was."""
    left = [n for n in stale if n != CHECKPOINT]  # the saver has replaced the checkpoint itself

    def remove(_row: dict) -> None:
        while left:
            path = os.path.join(out, left.pop())
            if os.path.isfile(path):
                os.remove(path)

    return remove


def _check_finite_datasets(data) -> None:
    """NaN/Inf in tensor datasets is refused before training (other datasets: when a batch shows it)."""
    for name, ds in zip(SPLIT_NAMES, data):
        for t in getattr(ds, "tensors", ()):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise TrainingError(f"the {name} data holds NaN/Inf values: remove or replace them before training")


def _print_report(s: dict, echo) -> None:
    echo("")
    echo("phase history")
    echo(f"  {'epoch':>5}  {'phase':<8} {'dendrites':>9}  {'val':>7}  note")
    for e in s["events"]:
        score = "-" if e["score"] is None else f"{e['score']:.4f}"  # (None: a diverged epoch)
        note = f"{e['note']}: back to the best model (its val and dendrites)" if e.get("restored_best") else e["note"]
        echo(f"  {e['epoch']:>5}  {e['phase']:<8} {e['dendrites']:>9}  {score:>7}  {note}")
    if s["events"] and all(e.get("decision") in ("continue", "complete") for e in s["events"]) \
            and s["events"][-1].get("note", "").startswith("epoch cap"):
        echo(_no_round(s))
    echo("dendrites per site")
    width = max([32, *(len(name) for name in s["dendrites"])])
    for name, k in s["dendrites"].items():
        echo(f"  {name:<{width}} {k}")
    echo(f"params: {s['params_plain']} plain -> {s['params']} perforated "
         f"({s['params'] / max(s['params_plain'], 1):.2f}x)")
    echo(f"best validation epoch {s['best_epoch']} of {s['epochs']}: val {s['val']:.4f}  test {s['test']:.4f}  "
         f"({s.get('metric', 'accuracy')}; {s['seconds']:.1f} s on {s.get('device', 'cpu')}, mode {s['mode']})")


def _no_round(s: dict) -> str:
    """Why a run that reached its epoch cap in its first neuron phase added no dendrite, and what to change."""
    config = s["config"]
    ends = f"patience {config['patience']} epochs without a gain above {config['improvement']}" + (
        "" if config.get("neuron_epochs") is None else f", or at neuron_epochs {config['neuron_epochs']}")
    return (f"note: no dendrite round ran: the epoch cap ({s['training']['epochs']}) came before the first neuron "
            f"phase ended (it ends after {ends}): raise --epochs, or lower --patience")


def _resumes(out: Optional[str], done: int, processes: int = 1, progress: bool = True,
             lead: str = "the run so far resumes with") -> str:
    """"; the run so far resumes with ..." when `done` epochs were checkpointed in `out` (with the
    run's --nproc: on another process count the data order differs; and its --no-progress, which
    the checkpoint does not keep)."""
    flags = (f" --nproc {processes}" if processes > 1 else "") + ("" if progress else " --no-progress")
    return f"; {lead} pbp-fx train --resume {shlex.quote(out)}{flags}" if out and done else ""


def _write_outputs(out: str, history, summary) -> bool:
    """history.json, summary.json and plot.png; False when the plot was not written."""

    def text(name: str, body: str) -> None:
        def w(tmp):
            with open(tmp, "w") as f:
                f.write(body)
        atomic_write(os.path.join(out, name), w, TrainingError)

    text("history.json", json.dumps(history.to_dict(), indent=1))
    text("summary.json", json.dumps(summary, indent=1))
    return plot_history(history, os.path.join(out, "plot.png"), title=f"{summary['model']} ({summary['mode']})",
                 metric=summary.get("metric", "accuracy"), maximize=summary.get("maximize", True))


def pyplot_or_none(path: str):
    """matplotlib.pyplot on the Agg backend, or None with a one-line warning that `path` is not
    written (matplotlib is an optional dependency: the train extra)."""
    try:
        import matplotlib
    except ImportError:
        warnings.warn(f"{os.path.basename(path)} not written: matplotlib is not installed (pip install matplotlib, "
                      "or pbp-fx[train])", PBWarning, stacklevel=3)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history, path: str, title: str = "", metric: str = "accuracy", maximize: bool = True) -> bool:
    """Validation/test metric per epoch with phase switches marked; the metric vs params. False
    when matplotlib is missing (nothing written)."""
    plt = pyplot_or_none(path)
    if plt is None:
        return False

    rows = history.epochs
    ep = [r["epoch"] for r in rows]
    gap = lambda x: math.nan if x is None else x  # noqa: E731 - a diverged epoch has no score: a gap in the line
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(ep, [gap(r["val"]) for r in rows], label="validation")
    if rows and rows[0].get("test") is not None:
        a.plot(ep, [gap(r["test"]) for r in rows], label="test", alpha=0.8)
    for r in rows:
        if r["phase"] == "dendrite":
            a.axvspan(r["epoch"] - 1, r["epoch"], color="tab:orange", alpha=0.15, lw=0)
        if r["decision"] == "restructured":
            a.axvline(r["epoch"], color="grey", ls="--", lw=0.8)
    a.set_xlabel("epoch")
    a.set_ylabel(metric)
    a.set_title(f"{metric} per epoch (orange: dendrite phase, dashed: restructure)")
    a.legend()
    # Accuracy against parameters: per structure, the epoch with the best validation score; the run's own
    # best epoch for its structure (a later epoch better by less than `improvement` is no new best there).
    best: dict[int, dict] = {}
    for r in (r for r in rows if r["val"] is not None):
        better = r["params"] not in best or (r["val"] > best[r["params"]]["val"] if maximize
                                             else r["val"] < best[r["params"]]["val"])
        if r["phase"] == "neuron" and better:
            best[r["params"]] = r
    kept = next((r for r in rows if r["epoch"] == history.best_epoch and r["val"] is not None), None)
    if kept is not None:
        best[kept["params"]] = kept
    pts = sorted(best.values(), key=lambda r: r["params"])
    b.plot([r["params"] for r in pts], [r["val"] for r in pts], "o-", label="validation")
    if pts and pts[0].get("test") is not None:
        b.plot([r["params"] for r in pts], [r["test"] for r in pts], "s-", label="test")
    b.set_xlabel("parameters")
    b.set_ylabel(f"{metric} at best validation")
    b.set_title(f"{metric} vs parameter count")
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110), TrainingError, "plot")
    plt.close(fig)
    return True
