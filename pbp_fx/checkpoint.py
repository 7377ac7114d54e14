"""save / load: safetensors tensors + JSON structure. No pickle: loading runs no code.

One file holds the model state ("model/..."), the controller's best weights ("best/..."),
optimizer tensors ("optim/...") and, in the safetensors metadata, JSON for what the
transformation was: the site specs (layer and norm of each neuron, dendrites, phase, mode,
activation), how the model was captured (frontend and its options, isolated leaves, the
input signature: names, shapes with the batch axis marked, dtypes), the PBConfig, the model
reference of a CLI run, the controller's schedule and history, the optimizer's non-tensor
state, and a SHA-256 of all tensor bytes.

Format 2 ("pbp-fx-checkpoint/2"). Format 1 files (pbp-fx 0.1 before PBConfig) hold no
capture record: load() reads their model when given example inputs (save it again to
convert); their controller state cannot be resumed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import warnings
from typing import Callable, Optional, Union

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .config import PBConfig
from .controller import inner_optimizer
from .errors import CheckpointError, NoSitesError, PBWarning, TraceError, TrainingError, warn_at_user
from .fileio import atomic_write
from .layers import LayerSpec
from .perforated import PerforatedModel, perforate, perforated_inside, set_module_modes
from .inputs import describe_inputs, inputs_from_signature, same_pattern
from .site import FusedSite, FusedSwappedNeuron, Site, is_wide_statistic, pool_settings
from .tracing import is_lifted_constant

__all__ = ["save", "load", "load_optimizer", "read_structure", "read_extra", "read_meta", "FORMAT"]

FORMAT = "pbp-fx-checkpoint/2"
FORMAT_V1 = "pbp-fx-checkpoint/1"
# Format 2 with tensors nested in a state (NESTED): a pbp-fx that reads format 2 only would load
# placeholders for them, so such a checkpoint says it is another format, which that one refuses.
FORMAT_NESTED = "pbp-fx-checkpoint/3"
READ_FORMATS = (FORMAT_V1, FORMAT, FORMAT_NESTED)
_GENERATOR_KEY = "controller/generator"  # the controller's candidate generator state


# A tensor inside a list or dict of a state (LBFGS keeps its history as lists of tensors) is
# stored as NESTED + its path, and the JSON in its place is {TENSOR: that name}.
NESTED = "nested/"
TENSOR = "__pbp_fx_tensor__"


def _split_state(prefix: str, state: dict, tensors: dict, plain: dict) -> None:
    """Tensors to `tensors` (shared storage stored once), everything else to `plain` (JSON)."""
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            tensors[f"{prefix}{k}"] = _stored(v)
        else:
            plain[f"{prefix}{k}"] = _tensors_named(v, tensors)


def _stored(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().clone()


def _tensors_named(value, tensors: dict):
    """`value` with each tensor inside its lists, tuples and str-keyed dicts moved to `tensors`,
    each under a name of its own, NESTED and a number (a path of keys could repeat: "h/0")."""
    if isinstance(value, torch.Tensor):
        name = f"{NESTED}{len(tensors)}"  # (unique: every entry adds one)
        tensors[name] = _stored(value)
        return {TENSOR: name}
    if isinstance(value, (list, tuple)):
        return [_tensors_named(v, tensors) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _tensors_named(v, tensors) for k, v in value.items()}
    return value


def _tensors_back(value, tensors: dict):
    """The inverse of `_tensors_named` (lists stay lists: JSON has no tuples)."""
    if isinstance(value, dict):
        if set(value) == {TENSOR} and isinstance(value[TENSOR], str) and value[TENSOR] in tensors:
            return tensors[value[TENSOR]]
        return {k: _tensors_back(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_tensors_back(v, tensors) for v in value]
    return value


def _digest(tensors: dict, meta: dict) -> str:
    """SHA-256 over every tensor's bytes and the metadata (without the digest itself)."""
    h = hashlib.sha256()
    # Over the metadata as JSON gives it back (keys are strings there, and "10" sorts before "2"
    # where 2 sorted before 10): an int key written had made the file read as corrupted.
    as_read = json.loads(json.dumps({k: v for k, v in meta.items() if k != "sha256"}))
    h.update(json.dumps(as_read, sort_keys=True).encode())
    for k in sorted(tensors):
        t = tensors[k]
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():  # the array's buffer itself: no copy of the bytes
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _jsonable(spec) -> Optional[dict]:
    return None if spec is None else json.loads(json.dumps(dataclasses.asdict(spec)))


def _structure(pm: PerforatedModel) -> dict:
    return {
        "mode": pm.mode, "activation": pm.activation, "phase": pm.phase,
        "sites": [_site_record(n, s) for n, s in pm.sites.items()], "ops": _graph_ops(pm),
    }


def _graph_ops(pm: PerforatedModel) -> list[str]:
    """The ops of the model's captured graphs in order (a module's type, a function's or method's name):
    what the sites' shapes do not show, such as the activation between two layers."""
    ops = []
    for gm in pm.graph_module.modules():
        if isinstance(gm, torch.fx.GraphModule):
            for node in gm.graph.nodes:
                if node.op == "call_module":
                    ops.append(type(gm.get_submodule(node.target)).__name__)
                elif node.op in ("call_function", "call_method"):
                    ops.append(node.target if isinstance(node.target, str) else getattr(node.target, "__name__",
                                                                                         str(node.target)))
    return ops


def _warn_other_graph(pm: PerforatedModel, saved: Optional[list], path: str) -> None:
    """Warn when the model's graph runs other ops than the saved one's where both have ops (a capture
    without the labels' loss ends earlier, and that is no difference): the weights would load into
    another function (a changed activation or forward) silently."""
    if not saved:
        return
    here = _graph_ops(pm)
    first = next((i for i, (a, b) in enumerate(zip(saved, here)) if a != b), None)
    if first is not None:
        warn_at_user(f"checkpoint {path} was saved from a model whose graph differs from this one's at op {first}: "
                     f"{saved[first]} there, {here[first]} here (another activation or forward?): its weights now "
                     "compute another function; load it into the model it was trained with")


def _same_inputs(saved: Optional[dict], pm: PerforatedModel, example_inputs, example_kwargs) -> bool:
    """Whether the model was captured on the saved model's inputs: the recorded stand-ins, or inputs of
    the same pattern (`same_pattern`; another pattern, such as a subset of the keyword inputs, captures
    another graph on purpose)."""
    if example_inputs is None and example_kwargs is None:
        return True
    args = () if example_inputs is None else example_inputs
    given = describe_inputs(pm, args if isinstance(args, tuple) else (args,), dict(example_kwargs or {}))
    return bool(saved) and "inputs" in saved and same_pattern(saved["inputs"], given)


def _site_record(name: str, s) -> dict:
    record = {"name": name, "kind": s.kind, "channels": s.channels, "weight_shape": list(s.layer.weight_shape),
              "norm": s.norm is not None, "layer": _jsonable(s.layer), "norm_spec": _jsonable(s.norm),
              "dendrites": s.num_dendrites, "pool": None if s.candidates is None else s.candidates.pool_size}
    # Only when not 1, so that files without strided pools keep the records they always had.
    if s.candidates is not None and s.candidates.stride != 1:
        record["pool_stride"] = s.candidates.stride
    return record


def save(pm: PerforatedModel, path: str, controller=None, optimizer: Optional[torch.optim.Optimizer] = None,
         extra: Optional[dict] = None, model_ref: Optional[str] = None) -> str:
    """Write a checkpoint atomically (a crash mid-save leaves the previous file intact).

    controller: its schedule, history, best weights and PBConfig are stored; optimizer: its
    state; model_ref: how to rebuild the base model (a model file path or a module name such
    as "pbp_fx.models.mnist1d_mlp"; a relative file path is stored absolute), recorded for the CLI;
    extra: any JSON-safe dict.
    """
    from safetensors.torch import save_file

    from . import __version__

    if not isinstance(pm, PerforatedModel) and isinstance(pm, nn.Module) and any(
            isinstance(m, (FusedSite, FusedSwappedNeuron)) for m in pm.modules()):
        raise CheckpointError(f"save() writes a PerforatedModel, got a finalized model ({type(pm).__name__}, made for "
                              "inference), which no pbp_fx.load rebuilds: save the PerforatedModel and finalize it "
                              "after pbp_fx.load, or torch.save(final.state_dict(), path) into a model finalized alike "
                              "(torch.export.save for a file that loads without pbp-fx)")
    if not isinstance(pm, PerforatedModel):
        raise CheckpointError(f"save() writes a PerforatedModel, got {type(pm).__name__}: "
                              + (perforated_inside(pm) or "perforate it first, or torch.save(model.state_dict(), path) "
                                 "for a plain model"))
    _check_belongs(pm, controller, optimizer, "save")
    tensors: dict = {}
    plain: dict = {}
    _split_state("model/", pm.state_dict(), tensors, plain)
    # Buffers as they were when the dendrite phase began: restored when it ends.
    _split_state("frozen/", pm.phase_buffers(), tensors, plain)
    if model_ref is not None and os.path.isfile(model_ref):  # a file path, not a module name: from any directory
        model_ref = os.path.abspath(model_ref)
    meta = {"format": FORMAT, "version": __version__, "structure": _structure(pm), "capture": pm.capture,
            "model": model_ref, "extra": _keys_kept(extra or {}), "frozen": pm.frozen_parameters()}
    if controller is not None:
        cs = controller.state_dict()
        best = cs.pop("best_state")
        if best is not None:
            _split_state("best/", best, tensors, plain)
        for key in ("best_outside", "held_outside", "outside"):  # (state outside pm: a head, a loss; PhaseController)
            if cs.get(key):
                _split_state(f"{key}/", cs[key], tensors, plain)
            cs.pop(key, None)
        tensors[_GENERATOR_KEY] = cs.pop("generator")  # (bytes: a tensor, not JSON)
        meta["controller"] = cs
        meta["config"] = controller.config.to_dict()
    if optimizer is not None:
        osd = optimizer.state_dict()
        for pid, st in osd["state"].items():
            _split_state(f"optim/{pid}/", st, tensors, plain)
        meta["optimizer"] = {"param_groups": osd["param_groups"], "classes": _optimizer_classes(optimizer)}
    meta["plain"] = plain
    if any(name.startswith(NESTED) for name in tensors):
        meta["format"] = FORMAT_NESTED
    try:
        meta["sha256"] = _digest(tensors, meta)
        header = {"pbp_fx": json.dumps(meta, sort_keys=True)}
    except TypeError as exc:
        raise CheckpointError(_not_json(meta, optimizer, exc)) from exc
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header), CheckpointError, "checkpoint")
    return path


# A dict with keys JSON would turn into strings (a MultiStepLR's milestones {50: 1}), in extra:
# {ITEMS: [[key, value], ...]}, so that read_extra gives the keys back as they were.
ITEMS = "__pbp_fx_items__"
_JSON_KEYS = (str, int, float, bool, type(None))


def _keys_kept(value, where: str = "extra"):
    """`value` (extra=) with each dict whose keys are not all strings as {ITEMS: [[key, value], ...]};
    a CheckpointError for a key JSON cannot hold."""
    if isinstance(value, dict):
        odd = next((k for k in value if not isinstance(k, _JSON_KEYS)), None)
        if odd is not None:
            raise CheckpointError(f"{where} has a key of type {type(odd).__name__} ({odd!r}): a checkpoint keeps "
                                  "str, int, float, bool and None keys: convert it (e.g. to str) before save()")
        if all(isinstance(k, str) for k in value) and ITEMS not in value:
            return {k: _keys_kept(v, f"{where}[{k!r}]") for k, v in value.items()}
        return {ITEMS: [[k, _keys_kept(v, f"{where}[{k!r}]")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_keys_kept(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _keys_back(value):
    """The inverse of `_keys_kept` on the JSON read back."""
    if isinstance(value, dict):
        if set(value) == {ITEMS} and isinstance(value[ITEMS], list):
            return {k: _keys_back(v) for k, v in value[ITEMS]}
        return {k: _keys_back(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_keys_back(v) for v in value]
    return value


def _not_json(meta: dict, optimizer, exc: TypeError) -> str:
    """The one line for metadata JSON cannot hold, naming the part that holds it."""
    def fails(value) -> bool:
        try:
            json.dumps(value, sort_keys=True)
        except TypeError:
            return True
        return False

    optimizer_state = {k: v for k, v in meta.get("plain", {}).items() if k.startswith("optim/")}
    if optimizer is not None and (fails(meta.get("optimizer")) or fails(optimizer_state)):
        return (f"the {type(optimizer).__name__} optimizer's state holds values a checkpoint cannot store ({exc}): "
                "save without optimizer= and keep its state with torch.save(optimizer.state_dict(), path)")
    if fails(meta.get("extra")):
        return f"extra= holds a value a checkpoint cannot store ({exc}): pass plain values (str, numbers, lists, dicts)"
    return f"checkpoint metadata is not JSON-serialisable ({exc}): report this with the model"


def _read(path: str) -> tuple[dict, dict]:
    from safetensors.torch import load as load_tensors

    if os.path.isdir(path):
        # (the names the Hugging Face callback and pbp-fx train give theirs in a Trainer's checkpoint-N / --out folder)
        inside = [os.path.join(path, f) for f in ("pbp_fx.safetensors", "checkpoint.safetensors")
                  if os.path.isfile(os.path.join(path, f))]
        raise CheckpointError(f"checkpoint {path} is a folder: pass the checkpoint file in it"
                              + (f", {inside[0]}" if inside else " (the file pbp_fx.save wrote)"))
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist: check the path")
    # One read through one file handle: a save that replaces the file meanwhile cannot mix
    # the header of one version with the tensors of the next (safe_open reopens the path).
    with open(path, "rb") as f:
        data = f.read()
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + size]).get("__metadata__") or {}
        tensors = load_tensors(data)
    except Exception as exc:  # noqa: BLE001 - any parse failure means a damaged file
        # A safetensors file starts with its header's size, then the JSON header. Tested first: a size
        # whose low byte is 0x80 (1 in 256) starts like a pickle; no zip or pickle has "{" there.
        if data[8:9] == b"{":
            raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({type(exc).__name__}): "
                                  "use an intact copy") from exc
        if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":  # a zip (torch.save) or a pickle
            raise CheckpointError(f"{path} is a torch.save / pickle file, not a pbp-fx checkpoint: write checkpoints "
                                  "with pbp_fx.save (or `pbp-fx train`), or load this file with torch.load") from exc
        raise CheckpointError(f"{path} is not a checkpoint (not a safetensors file): pass the "
                              "checkpoint.safetensors that pbp_fx.save or `pbp-fx train` wrote") from exc
    if "pbp_fx" not in header:
        raise CheckpointError(f"{path} is not a pbp-fx checkpoint (no pbp_fx metadata)")
    try:
        meta = json.loads(header["pbp_fx"])
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path} is corrupted (unreadable metadata): use an intact copy") from exc
    if not isinstance(meta, dict) or meta.get("format") not in READ_FORMATS:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path} has format {found!r}, expected one of {', '.join(map(repr, READ_FORMATS))}: "
                              "not a checkpoint of this pbp-fx (a newer pbp-fx's? upgrade pbp-fx)")
    if _digest(tensors, meta) != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupted (checksum mismatch): use an intact copy")
    return meta, tensors


def read_meta(path: str) -> dict:
    """The checkpoint's JSON metadata (format, structure, capture, config, model, controller, extra)."""
    meta = _read(path)[0]
    return {**meta, "extra": _keys_back(meta.get("extra", {}))}


def read_structure(path: str) -> dict:
    """The checkpoint's structure block (sites, dendrites, phase, mode, activation)."""
    return _read(path)[0]["structure"]


def read_extra(path: str) -> dict:
    """The `extra` dict given to save() (e.g. the model file a training run used), its keys as given."""
    return _keys_back(_read(path)[0].get("extra", {}))



def read_controller_history(path: str) -> list[dict]:
    """The saved controller's history (its decisions and their notes); [] for a checkpoint without one."""
    return list(_read(path)[0].get("controller", {}).get("history", []))

def _collect(prefix: str, tensors: dict, plain: dict) -> dict:
    out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    out.update({k[len(prefix):]: _tensors_back(v, tensors) for k, v in plain.items() if k.startswith(prefix)})
    return out


def _check_sites(pm: PerforatedModel, structure: dict, path: str, rebuilt: bool = False) -> None:
    """Refuse a checkpoint whose sites this model lacks, or holds otherwise; `rebuilt`: the model was perforated
    here with the checkpoint's own include/exclude (a missing site is then no other selection)."""
    # The dendrites' activation and the mode decide what the loaded weights compute: loaded onto
    # another, the model would run other functions with these weights, silently.
    for what in ("activation", "mode"):
        saved, here = structure.get(what), getattr(pm, what)
        if saved is not None and saved != here:
            raise CheckpointError(f"checkpoint {path} was trained with {what} {saved!r}, but this model is perforated "
                                  f"with {what} {here!r}: perforate with {what}={saved!r}, or pass a function that "
                                  "builds the model (pbp_fx.load(path, build_model)) to rebuild it as saved")
    have = {n: s for n, s in pm.sites.items()}
    layers = dict(pm.source_model.named_modules()) if pm.source_model is not None and not rebuilt else {}
    rebuild = "pass a function that builds the model (pbp_fx.load(path, build_model)) to rebuild it as saved"
    for rec in structure["sites"]:
        s = have.get(rec["name"])
        if s is None and _same_layer(layers.get(rec["name"]), rec):  # (the layer is here, as saved, but no site)
            raise CheckpointError(f"checkpoint {path} has a site {rec['name']!r}, a layer of this model (of the same "
                                  "shape) that is no site here: this model's site selection differs (perforate's "
                                  f"include/exclude): perforate with the ones it was trained with, or {rebuild}")
        if (s is None or s.kind != rec["kind"] or list(s.layer.weight_shape) != rec["weight_shape"]
                or rec.get("layer", _jsonable(s.layer)) != _jsonable(s.layer)):
            saved, here = rec.get("layer") or {}, {} if s is None else _jsonable(s.layer)
            # name what differs: the kind and weight shape, else the layer's other settings (bias, stride, ...)
            differ = [k for k in sorted(set(saved) | set(here)) if k not in ("kind", "weight_shape")
                      and saved.get(k) != here.get(k)] if saved and s is not None else []
            detail = "; ".join(f"{k} {saved.get(k)!r} there, {here.get(k)!r} here" for k in differ)
            found = "missing" if s is None else f"{s.kind} {list(s.layer.weight_shape)}"
            raise CheckpointError(
                f"checkpoint {path} belongs to another model: site {rec['name']!r} is {rec['kind']} "
                f"{rec['weight_shape']} in the checkpoint but {found} here" + (f" ({detail})" if detail else "")
                + "; load it onto the model it was trained on")
    extra = [n for n in have if n not in {r["name"] for r in structure["sites"]}]
    if extra:  # (a layer the checkpoint's model lacked, or one its include/exclude left out: the file cannot tell)
        raise CheckpointError(f"checkpoint {path} belongs to another model, or to this one perforated with other "
                              f"include/exclude: site {extra[0]!r} is not in the checkpoint; load it onto the model "
                              f"it was trained on, or {rebuild}")


def _same_layer(module: Optional[nn.Module], rec: dict) -> bool:
    """Whether `module` is a neuron layer of the kind and weight shape the checkpoint's site record holds."""
    try:
        spec = LayerSpec.from_module(module)
    except TypeError:  # (None, or no Linear/Conv)
        return False
    return spec.kind == rec["kind"] and list(spec.weight_shape) == rec["weight_shape"]


def _convert_hint(path: str) -> str:
    return (f"checkpoint {path} is format 1 (pbp-fx before PBConfig)")


def _legacy_site_name(name: str, parts: bool) -> str:
    """What earlier pbp-fx named a site: the root's own weight (a bare nn.Linear perforated alone,
    now `root`) was `weight`; in a "parts" capture a part's own weight (now the part's path `a`)
    was `a.weight`; `@i` uses alike."""
    base, at, use = name.partition("@")
    if base == "root":
        return f"weight{at}{use}"
    return f"{base}.weight{at}{use}" if parts else name


def _renamed_legacy_sites(meta: dict, tensors: dict, pm: PerforatedModel) -> tuple[dict, dict]:
    """(meta, tensors) of a checkpoint written with the old names of `_legacy_site_name`, renamed
    to `pm`'s; any other checkpoint as it is."""
    from pbp_fx.passes.insert_dendrites import SITES_ATTR, site_key

    parts = (meta.get("capture") or {}).get("captured_with") == "parts"
    saved = {r["name"] for r in meta["structure"]["sites"]}
    renames = {_legacy_site_name(n, parts): n for n in pm.sites
               if n not in saved and _legacy_site_name(n, parts) in saved}
    if not renames:
        return meta, tensors
    keys = {f"{SITES_ATTR}.{site_key(old)}.": f"{SITES_ATTR}.{site_key(new)}." for old, new in renames.items()}

    def renamed(key: str) -> str:
        for old, new in keys.items():
            if old in key:
                return key.replace(old, new)
        return key

    meta = json.loads(json.dumps(meta))
    for rec in meta["structure"]["sites"]:
        rec["name"] = renames.get(rec["name"], rec["name"])
    meta["plain"] = {renamed(k): v for k, v in meta.get("plain", {}).items()}
    return meta, {renamed(k): v for k, v in tensors.items()}


def _float_dtypes(named) -> set:
    """The floating dtypes of (key, tensor) pairs, the pools' float32 statistics left out."""
    return {t.dtype for k, t in named if t.is_floating_point() and not is_wide_statistic(k)}


def in_model_dtype(model: nn.Module, args, kwargs):
    """(args, kwargs) with floating tensors cast to the model's floating dtype, when it has one."""
    here = _float_dtypes(model.state_dict().items())
    if len(here) != 1:
        return args, kwargs
    dtype = next(iter(here))
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    return pytree.tree_map(cast, (args, kwargs))


def _to_saved_dtype(model: nn.Module, tensors: dict) -> None:
    """A model saved in one floating dtype (after `.to(torch.float64)`) comes back in it when the
    model is in torch's default dtype, as built: loading would otherwise cast the weights
    silently. A model the user put in another dtype (`.double()` before loading) keeps it, and
    models of mixed floating dtypes are left as they are."""
    saved = _float_dtypes((k, v) for k, v in tensors.items() if k.startswith("model/"))
    here = _float_dtypes(model.state_dict().items())
    if len(saved) == 1 and here == {torch.get_default_dtype()} and saved != here:
        model.to(next(iter(saved)))


def _perforate_like(path: str, meta: dict, model: nn.Module, example_inputs, example_kwargs) -> PerforatedModel:
    """Capture `model` as the checkpoint's model was captured: same frontend, options and inputs."""
    st = meta["structure"]
    names = [r["name"] for r in st["sites"]]
    # (format 1 has no capture record; a PerforatedModel built from the passes by hand an empty one)
    capture = meta.get("capture") or None
    if capture is None:
        if example_inputs is None and not example_kwargs:
            what = (f"{_convert_hint(path)} and records no input signature" if "capture" not in meta else
                    f"checkpoint {path} records no capture (its PerforatedModel was built from the passes, not by "
                    "perforate())")
            then = "convert it to format 2" if "capture" not in meta else "record its capture"
            raise CheckpointError(f"{what}: load it with pbp_fx.load(path, model, example_inputs), then "
                                  f"pbp_fx.save() it to {then}")
        frontend, dynamic = "auto", True
    else:
        # (a parts capture is rebuilt as one, also on a model whose root would now trace whole, under other
        # parameter names)
        frontend, dynamic = capture["captured_with"], capture["dynamic"]
        recorded = example_inputs is None and not example_kwargs
        if recorded:
            example_inputs, example_kwargs = inputs_from_signature(capture["inputs"])
    # The inputs (stand-ins or the caller's) in the model's floating dtype: a checkpoint saved in
    # float64 rebuilds its model in float64 (`_to_saved_dtype`) whatever dtype the inputs were made in.
    example_inputs, example_kwargs = in_model_dtype(model, example_inputs, example_kwargs)
    inputs = () if example_inputs is None else example_inputs
    parts = capture is not None and capture["captured_with"] == "parts"
    # A graph that follows one mode (a root forward branching on self.training) is rebuilt in the
    # saved one, and a model captured in mixed modes (a frozen encoder in eval mode) in those, not
    # in the modes the build function happens to return.
    one_mode, module_modes = (capture or {}).get("one_mode"), (capture or {}).get("module_modes")
    was = {m: m.training for m in model.modules()}
    try:
        if one_mode is not None:
            model.train(one_mode == "train")
        set_module_modes(model, module_modes or {})
        with warnings.catch_warnings():
            if module_modes:  # (set here on purpose: its mixed-modes warning was said at perforate)
                warnings.filterwarnings("ignore", message=r".* (is|are) in (train|eval) mode under a model in ")
            # (said when the run was perforated; the capture is the saved one, which no frontend choice changes)
            warnings.filterwarnings("ignore", message=r".*\.forward writes buffer\(s\) ")
            pm = perforate(model, inputs, include=lambda n, m: n in names or _legacy_site_name(n, parts) in names,
                           activation=st["activation"],
                           mode=st["mode"], example_kwargs=example_kwargs, frontend=frontend, dynamic=dynamic)
    except NoSitesError as exc:
        raise CheckpointError(f"checkpoint {path} belongs to another model: none of its sites "
                              f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) exists here; "
                              "load it onto the model it was trained on") from exc
    except TraceError as exc:
        if capture is None:
            raise
        if not recorded:  # (the parameter names follow the capture: load cannot take another frontend)
            raise TraceError(f"checkpoint {path} was captured with frontend {frontend!r}, which load takes again, and "
                             f"on the inputs given it fails: {exc}; give inputs on which it works (none: the recorded "
                             "ones), or change the model so that it captures (a Hugging Face cache in the outputs: "
                             "config.use_cache = False)") from exc
        # The stand-ins have the recorded shapes and dtypes, not the values: a forward that checks
        # its values (lengths > 0, ids in a range; pack_padded_sequence's lengths) refuses them as
        # another model would, also inside a capture that runs the root's Python (parts).
        raise CheckpointError(f"checkpoint {path}: {type(model).__name__} does not run on stand-ins of the inputs "
                              f"recorded with it (their shapes and dtypes; random floats, integers 0, booleans True: "
                              f"{exc}): pass example_inputs= (and example_kwargs=) that it runs on; if it refuses "
                              "those too, the checkpoint belongs to another model") from exc
    finally:
        for m, training in was.items():
            m.training = training
    if capture is not None:
        if pm.capture.get("leaves") != capture.get("leaves"):
            raise CheckpointError(f"checkpoint {path} was captured with leaves {capture.get('leaves')} but this model "
                                  f"gives {pm.capture.get('leaves')}: load it onto the model it was trained on")
        record = json.loads(json.dumps(capture))  # re-saving writes the same record
        if not recorded and not same_pattern(pm.capture["inputs"], capture["inputs"]):
            record["inputs"] = pm.capture["inputs"]  # (the caller's inputs of another pattern: a re-save records them)
        pm.capture = record
    return pm


def load(path: str, model: Union[PerforatedModel, nn.Module, Callable[[], nn.Module]], example_inputs=None,
         controller=None, optimizer: Optional[torch.optim.Optimizer] = None,
         example_kwargs: Optional[dict] = None) -> PerforatedModel:
    """Rebuild the checkpoint's model on `model` and load its state (bit for bit).

    `model`: a PerforatedModel (loaded in place), a fresh base nn.Module, or a function
    building one. A base model is captured as the saved one was (same frontend and options)
    on stand-in inputs built from the recorded input signature, so no example inputs are
    needed (pass example_inputs / example_kwargs to use your own). The controller (its state
    is loaded after the model's, and rebinds its optimizer) and the optimizer, when given,
    get their saved state too. Torch's random state is left as it was (a resume restores it
    before or after loading alike).
    """
    # Rebuilding draws: a base model's construction, a dendrite phase's candidates (overwritten).
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        return _load(path, model, example_inputs, controller, optimizer, example_kwargs)


def _check_belongs(pm, controller, optimizer, call: str) -> None:
    """CheckpointError unless `controller` (when given) controls `pm` and `optimizer` holds some of
    its parameters: another model's would be saved or restored beside this one, silently."""
    if call == "save" and controller is not None and controller.pm is pm:
        try:
            controller.check_model()
        except TrainingError as exc:  # (a state no controller could load back)
            raise CheckpointError(f"save(controller=): {exc}") from None
    if controller is not None and (not isinstance(pm, PerforatedModel) or controller.pm is not pm):
        if call == "save":
            raise CheckpointError("save(controller=) got the controller of another model than the one saved: pass "
                                  "the PhaseController built on this model")
        raise CheckpointError("load(controller=) needs the controller of the model it loads into, but this one "
                              "controls another" + ("" if isinstance(pm, PerforatedModel) else " (load makes a new "
                              "model from a base model or build function)") + ": pm = pbp_fx.load(path, build), then "
                              "ctl = PhaseController(pm, config) and pbp_fx.load(path, pm, controller=ctl, "
                              "optimizer=ctl.optimizer)")
    if optimizer is not None and not isinstance(pm, PerforatedModel):  # (load: a new model is made)
        raise CheckpointError("load(optimizer=) restores an optimizer of the model it loads into, but load makes a new "
                              "model from a base model or build function: pm = pbp_fx.load(path, build), then build "
                              "the optimizer over pm and pbp_fx.load(path, pm, optimizer=optimizer)")
    if optimizer is not None and isinstance(pm, PerforatedModel):
        held = {id(p) for g in inner_optimizer(optimizer).param_groups for p in g["params"]}
        if held and not any(id(p) in held for p in pm.parameters()):
            raise CheckpointError(f"{call}(optimizer=) got an optimizer that holds none of this model's parameters "
                                  "(one built over another model, or over the model before perforate copied it): "
                                  "pass the optimizer that trains this model (ctl.optimizer)")


def _load(path, model, example_inputs, controller, optimizer, example_kwargs) -> PerforatedModel:
    wrapped = perforated_inside(model)  # (else it would be taken for a base model and perforated again)
    if wrapped:
        raise CheckpointError(f"load() loads into a PerforatedModel or a base model, got {type(model).__name__}: "
                              f"{wrapped}")
    _check_belongs(model, controller, optimizer, "load")
    meta, tensors = _read(path)
    if controller is not None and meta["format"] == FORMAT_V1 and "controller" in meta:
        raise CheckpointError(f"{_convert_hint(path)}: its controller state cannot be resumed; load the model with "
                              "pbp_fx.load(path, model, example_inputs) and save it to convert it to format 2")
    if controller is not None and "controller" not in meta:
        raise CheckpointError(f"checkpoint {path} has no controller state (saved without controller=): load it "
                              "without controller=, then build the PhaseController on the loaded model")
    if optimizer is not None and "optimizer" not in meta:  # (it kept its fresh state, silently)
        raise CheckpointError(f"checkpoint {path} has no optimizer state (saved without optimizer=): load it "
                              "without optimizer=, and the optimizer starts fresh")
    if optimizer is not None:
        _check_optimizer_fits(meta, optimizer, path)
    if optimizer is not None and controller is None and meta["structure"]["phase"] == "dendrite" and not (
            isinstance(model, PerforatedModel) and model.phase == "dendrite"):
        # (an optimizer built over the model's weights took the candidates' state: its step ran on wrong shapes)
        raise CheckpointError(f"checkpoint {path} was saved inside a dendrite phase, where the optimizer trains the "
                              "candidates, which the model does not have before the load: load it with its "
                              "controller, pbp_fx.load(path, pm, controller=ctl, optimizer=ctl.optimizer), or "
                              "without optimizer= and then pbp_fx.checkpoint.load_optimizer(path, opt) with opt "
                              "built over pm.trainable_parameters()")
    if optimizer is not None and controller is None:
        # (nothing rebinds it during the load: torch would refuse its state after the model took the checkpoint's)
        saved = [len(g["params"]) for g in meta["optimizer"]["param_groups"]]
        here = [len(g["params"]) for g in optimizer.param_groups]
        if saved != here:
            raise CheckpointError(f"checkpoint {path} holds the state of an optimizer over {'+'.join(map(str, saved))} "
                                  f"parameters, and this one holds {'+'.join(map(str, here))} (the saved model had "
                                  "other trainable parameters, its dendrites'): load it without optimizer=, then "
                                  "pbp_fx.rebind_optimizer(opt, pm.trainable_parameters()) and "
                                  "pbp_fx.checkpoint.load_optimizer(path, opt)")
    if not isinstance(model, PerforatedModel):
        if not isinstance(model, nn.Module):
            if not callable(model):
                raise CheckpointError(f"load() needs a model or a function returning one, got {type(model).__name__}")
            model = model()
            if not isinstance(model, nn.Module):
                raise CheckpointError(f"load() needs a model or a function returning one, got {type(model).__name__}")
        _to_saved_dtype(model, tensors)
        stand_ins = example_inputs is None and not example_kwargs and (meta.get("capture") or {}).get(
            "captured_with") == "parts"
        name = type(model).__name__
        try:
            model = _perforate_like(path, meta, model, example_inputs, example_kwargs)
            _check_sites(model, _renamed_legacy_sites(meta, tensors, model)[0]["structure"], path, rebuilt=True)
        except CheckpointError as exc:
            if not stand_ins or "belongs to another model: " not in str(exc):
                raise
            # The root's Python runs on the stand-ins, whose values may take another branch than the example's.
            reason = str(exc).partition("belongs to another model: ")[2].partition("; load it onto")[0]
            raise CheckpointError(
                f"checkpoint {path}: {name}'s root forward is Python that ran on load's stand-in "
                f"inputs (random values of the recorded shapes) and reached other parts than when it was perforated "
                f"({reason}): pass example_inputs= (and example_kwargs=) like those it was perforated on") from exc
    pm = model
    meta, tensors = _renamed_legacy_sites(meta, tensors, pm)
    st = meta["structure"]
    _to_saved_dtype(pm, tensors)
    _check_sites(pm, st, path)
    if _same_inputs(meta.get("capture"), pm, example_inputs, example_kwargs):
        _warn_other_graph(pm, st.get("ops"), path)
    plain = meta.get("plain", {})
    # (constants torch.export lifted out of the forward, saved by pbp-fx before stop 49 under their capture's names)
    state = {k: v for k, v in _collect("model/", tensors, plain).items() if not is_lifted_constant(k)}
    _check_shapes(pm, state, path)  # (before restore_structure copies in every tensor that fits: a half-loaded model)
    try:
        restore_structure(pm, state, st, meta.get("config"), frozen=meta.get("frozen"))
        pm.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {load_error_detail(exc)} (the model differs "
                              "from the one saved)") from exc
    frozen = _collect("frozen/", tensors, plain)
    if frozen:
        pm.load_phase_buffers(frozen)
    pm.loaded_from = os.path.abspath(path)
    if controller is not None and "controller" in meta:
        _warn_changed_settings(meta, controller, path)
        if optimizer is None and "optimizer" in meta:  # (the run would go on from a fresh optimizer state)
            warn_at_user(f"checkpoint {path} holds the optimizer's state, which load(controller=) alone leaves out: "
                         "pass optimizer=ctl.optimizer too to resume the run exactly")
        # (an optimizer given has its whole state replaced next: what it holds now need not be cleared first)
        controller.load_state_dict(_controller_state(meta, tensors, plain), keep_optimizer_state=optimizer is not None)
    if optimizer is not None:
        _load_optimizer(meta, tensors, plain, optimizer)
    return pm


def _check_shapes(pm: PerforatedModel, state: dict, path: str) -> None:
    """Refuse a checkpoint whose tensors outside the sites (which it resizes) have other shapes than
    the model's, before any is loaded: another vocabulary or position table, say."""
    sites = tuple(f"{name}." for name, m in pm.named_modules() if isinstance(m, Site))
    here = pm.state_dict()
    missing = [k for k in here if k not in state and not k.startswith(sites)]
    unexpected = [k for k in state if k not in here and not k.startswith(sites)]
    if missing or unexpected:
        what = f"the model has {missing[0]}, which it lacks" if missing else f"it holds {unexpected[0]}, which the model lacks"
        # (a parts capture names its tensors by the submodules that traced, which a model's settings can change)
        parts = ("; or a setting changed what traces in this parts capture, such as a Hugging Face config's "
                 "use_cache: load onto the model as it was built for training, then change the setting"
                 if (pm.capture or {}).get("captured_with") == "parts" else "")
        raise CheckpointError(f"checkpoint {path} does not fit this model: {what} ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected; the model differs from the one saved{parts})")
    for key, value in state.items():
        if key in here and not key.startswith(sites) and isinstance(value, torch.Tensor) \
                and value.shape != here[key].shape:
            raise CheckpointError(f"checkpoint {path} does not fit this model: {key} is {list(value.shape)} there "
                                  f"and {list(here[key].shape)} here (the model differs from the one saved)")


def _controller_state(meta: dict, tensors: dict, plain: dict) -> dict:
    """The controller's state_dict as save() split it (JSON, best weights, generator state)."""
    cs = dict(meta["controller"])
    cs["best_state"] = _collect("best/", tensors, plain) or None
    cs["best_outside"] = _collect("best_outside/", tensors, plain) or None
    cs["held_outside"] = _collect("held_outside/", tensors, plain) or None
    cs["outside"] = _collect("outside/", tensors, plain) or None
    cs["generator"] = tensors.get(_GENERATOR_KEY)  # (None in a checkpoint saved before it existed)
    return cs


def _warn_changed_settings(meta: dict, controller, path: str) -> None:
    if meta.get("config"):
        warn_changed_settings(meta["config"], controller.config, f"checkpoint {path}",
                              in_dendrite_phase=meta["structure"]["phase"] == "dendrite")


def warn_changed_settings(saved: dict, config: PBConfig, what: str, in_dendrite_phase: bool = False) -> None:
    """A run resumed under other PB settings than it was saved with continues under the new ones:
    said once, naming them (`pbp-fx train --resume` uses the saved ones). saved: PBConfig.to_dict()."""
    saved_config = PBConfig.from_dict(saved)
    saved, now = saved_config.to_dict(), config.to_dict()
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]
    if changed:
        # A dendrite phase under way keeps the candidates it was started with (pool, init, statistics).
        later = (" (a dendrite phase under way keeps the candidates and statistics it started with: the candidate "
                 "settings apply from the next dendrite phase)"
                 if in_dendrite_phase and saved_config.dendrite_phase_kwargs() != config.dendrite_phase_kwargs() else "")
        warnings.warn(f"{what} was saved with other PB settings than the controller's, which the run continues "
                      f"with: {', '.join(changed)}{later}", PBWarning, stacklevel=4)


def load_error_detail(exc: Exception, limit: int = 240) -> str:
    """The first line of load_state_dict's error that names keys or shapes (its first line is a
    header, "Error(s) in loading state_dict for ...:"), cut to `limit` characters."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = next((ln for ln in lines[1:]), lines[0] if lines else type(exc).__name__)
    return detail if len(detail) <= limit else detail[:limit - 3].rstrip() + "..."


def holds_weights_of(path: str, pm: PerforatedModel) -> bool:
    """Whether the checkpoint's parameters equal the model's (on the names both have): a
    framework that loaded its own copy of the weights resumes from this file's run."""
    meta, tensors = _renamed_legacy_sites(*_read(path), pm)
    saved = _collect("model/", tensors, meta.get("plain", {}))
    params = dict(pm.named_parameters())
    common = [k for k in params if k in saved and isinstance(saved[k], torch.Tensor)]
    return bool(common) and all(saved[k].shape == params[k].shape
                                and torch.equal(saved[k], params[k].detach().to("cpu", saved[k].dtype)) for k in common)


def describe_structure(pm: PerforatedModel) -> dict:
    """The model's structure as JSON data: phase, and per site its layer, dendrites and pool."""
    return json.loads(json.dumps(_structure(pm)))


def restore_structure(pm: PerforatedModel, state: dict, structure: dict, config: Optional[dict] = None,
                      frozen: Optional[list] = None) -> None:
    """Give `pm` the structure a state dict was saved with (dendrites per site, a candidate
    pool in the dendrite phase), so that the state then loads strictly. The pools start with the
    settings their extra state records; config (a PBConfig as a dict) fills in those of a state
    written before the pools recorded them, and the candidates' init (their weights load after).
    frozen (`PerforatedModel.frozen_parameters` of the saved model; None: none): the parameters the
    run had frozen, frozen here too; the others keep the flags the caller gave them."""
    if pm.phase == "dendrite":
        pm.abort_dendrite_phase()
    # First the dendrites (sites resize to the stored K), then candidates on top of them.
    pm.load_state_dict({k: v for k, v in state.items() if ".candidates." not in k}, strict=False)
    if frozen:  # (before a dendrite phase starts: it thaws at its end what trains now)
        names = set(frozen)
        for name, p in pm.named_parameters():
            if name in names:
                p.requires_grad_(False)
    if structure["phase"] == "dendrite":
        pools = {r["pool"] for r in structure["sites"] if r["pool"]}
        settings = PBConfig.from_dict(config).dendrite_phase_kwargs() if config else {}
        settings["pool"] = max(pools) if pools else 1
        # The stride the pools asked for (a site without a strided form records none: 1).
        settings["stride"] = max((r.get("pool_stride", 1) for r in structure["sites"] if r["pool"]), default=1)
        recorded = [pool_settings(v) for k, v in state.items() if k.endswith(".candidates._extra_state")]
        recorded = [r for r in recorded if r is not None]
        if recorded:  # (the same for every pool but the stride, 1 where a site has no strided form)
            settings.update(recorded[0], stride=max(r["stride"] for r in recorded))
        pm.start_dendrite_phase(**settings)


def load_controller(path: str, controller) -> None:
    """Restore a checkpoint's controller state onto `controller`, whose model already holds the
    checkpoint's structure and weights (a training framework restored them, or `load`).

    The controller's optimizer keeps the state it has (the framework restored it too). A model
    with another structure is refused in one line naming the fix.
    """
    meta, tensors = _renamed_legacy_sites(*_read(path), controller.pm)
    if "controller" not in meta:
        raise CheckpointError(f"checkpoint {path} has no controller state: it was saved without a controller")
    here = describe_structure(controller.pm)
    if here != meta["structure"]:
        raise CheckpointError(f"checkpoint {path} holds another model structure (phase {meta['structure']['phase']}, "
                              f"dendrites {[r['dendrites'] for r in meta['structure']['sites']][:4]}...) than the model "
                              f"(phase {here['phase']}): load it onto the model first with pbp_fx.load(path, model)")
    _warn_changed_settings(meta, controller, path)
    controller.load_state_dict(_controller_state(meta, tensors, meta.get("plain", {})), keep_optimizer_state=True)


def load_optimizer(path: str, optimizer: torch.optim.Optimizer) -> None:
    """Load the optimizer state stored in a checkpoint (after the model's structure is in place)."""
    meta, tensors = _read(path)
    if "optimizer" not in meta:
        raise CheckpointError(f"checkpoint {path} has no optimizer state (saved without optimizer=)")
    _check_optimizer_fits(meta, optimizer, path)
    _load_optimizer(meta, tensors, meta.get("plain", {}), optimizer)


def _optimizer_classes(optimizer) -> list[str]:
    """The optimizer's classes below torch.optim.Optimizer, most derived first, of the optimizer
    itself (a wrapper's, accelerate's AcceleratedOptimizer, is its inner one's)."""
    optimizer = inner_optimizer(optimizer)
    return [c.__name__ for c in type(optimizer).__mro__ if c not in (torch.optim.Optimizer, object)
            and issubclass(c, torch.optim.Optimizer)] or [type(optimizer).__name__]


def _check_optimizer_fits(meta: dict, optimizer, path: str) -> None:
    """Refuse another optimizer family's state (torch loads Adam's groups into an SGD, whose next
    step then fails on a missing 'momentum'; a subclass or wrapper of the saved class is taken, and
    checkpoints saved before the classes were recorded are not checked), or another number of
    parameter groups."""
    saved = meta.get("optimizer", {}).get("classes")
    here = _optimizer_classes(optimizer)
    if saved and not set(saved) & set(here):
        raise CheckpointError(f"checkpoint {path} holds {saved[0]} optimizer state, which this {here[0]} cannot take: "
                              f"load it into a {saved[0]}, or without optimizer=")
    # (the groups' number stays through restructures, which swap their parameters: checked before
    # the model and controller load, not after, when torch refuses it)
    groups = meta.get("optimizer", {}).get("param_groups")
    if groups is not None and len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"checkpoint {path} holds the state of an optimizer with {len(groups)} parameter "
                              f"group(s), and this one has {len(optimizer.param_groups)}: build the optimizer with "
                              "the groups the run had, or load without optimizer=")


def _load_optimizer(meta: dict, tensors: dict, plain: dict, optimizer) -> None:
    if "optimizer" not in meta:
        return
    groups = meta["optimizer"]["param_groups"]
    ostate = {}
    for pid in range(sum(len(g["params"]) for g in groups)):
        s = _collect(f"optim/{pid}/", tensors, plain)
        if s:
            ostate[pid] = s
    try:
        optimizer.load_state_dict({"state": ostate, "param_groups": groups})
    except ValueError as exc:
        raise CheckpointError(f"the checkpoint's optimizer state does not fit this optimizer: {exc}") from exc
    _in_parameter_layout(optimizer)


def _in_parameter_layout(optimizer) -> None:
    """Each loaded state tensor of a parameter's shape in the parameter's memory layout (stored
    contiguous: against a channels_last weight, fused Adam paired other elements)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    optimizer.state[p][key] = torch.empty_like(p, dtype=v.dtype).copy_(v)
