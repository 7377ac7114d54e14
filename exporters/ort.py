"""Run exported models with ONNX Runtime.

    sess = ort_session("model.onnx")          # CUDA when onnxruntime-gpu and a GPU are there
    print(sess.provider)                      # "CPUExecutionProvider" | "CUDAExecutionProvider"
    (logits,) = run(sess, (x_numpy,))

The fused `pbp::Perforated*` ops ship their own ONNX function bodies, so a stock
onnxruntime (or onnxruntime-gpu) runs the files; no custom-op library is needed.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from pbp_fx.config import ConfigError
from pbp_fx.errors import PBError

__all__ = ["ort_session", "run", "check_shapes", "available_providers", "output_difference", "RuntimeUnavailableError",
           "RunInputError", "OnnxLoadError", "BatchSizeError", "CPU", "CUDA"]

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_DEVICES = ("auto", "cuda", "cpu")

# ONNX tensor type strings -> numpy dtypes, for casting inputs like float64 arrays.
_NP_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
}


MIN_BATCH_KEY = "pbp_fx.min_batch"  # ONNX metadata: the smallest batch the file computes right
MAX_BATCH_KEY = "pbp_fx.max_batch"  # ... and the largest, where torch.export bounded it
AXIS_RANGES_KEY = "pbp_fx.axis_ranges"  # ... and {axis: [least, most or null]} of other named axes it bounded


class BatchSizeError(PBError, ValueError):
    """Inputs with fewer (or more) samples than the ONNX file computes right (its MIN_BATCH_KEY, MAX_BATCH_KEY),
    or a named dynamic axis of a size outside its AXIS_RANGES_KEY."""


class RunInputError(PBError, ValueError):
    """Inputs `run` cannot feed the file: unknown names, another count, fractions for an integer input."""


def one_line(text: str) -> str:
    """ONNX Runtime's message on one line, without terminal colour codes."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text).split())


# onnxruntime's exception classes for a file it cannot read or a graph it refuses (pybind classes, by name)
_LOAD_FAILURES = ("InvalidProtobuf", "InvalidGraph", "InvalidArgument", "Fail", "NoSuchFile")


class OnnxLoadError(PBError, RuntimeError):
    """A file ONNX Runtime cannot load: not an ONNX model, or a graph it refuses."""


class RuntimeUnavailableError(PBError, RuntimeError):
    """onnxruntime (or the requested execution provider) is not available."""


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise RuntimeUnavailableError("onnxruntime is not installed: pip install 'pbp-fx[ort]' "
                                      "(or 'pbp-fx[gpu]' for CUDA)") from e
    return onnxruntime


def available_providers() -> list[str]:
    """The execution providers this onnxruntime build offers."""
    return list(_ort().get_available_providers())


def ort_session(path: Union[str, os.PathLike, bytes], device: str = "auto", threads: Optional[int] = None):
    """An onnxruntime.InferenceSession for an ONNX file (or serialized model bytes).

    device: "auto" (CUDA when onnxruntime-gpu and a GPU are present, else CPU), "cuda"
        (CUDA or a RuntimeUnavailableError), or "cpu".
    threads: intra-op threads (None: onnxruntime's default, all physical cores).

    The returned session has a `.provider` attribute naming the execution provider that
    runs it ("CUDAExecutionProvider" or "CPUExecutionProvider"); the choice is also
    logged at INFO.
    """
    if device not in _DEVICES:
        raise ConfigError(f"device={device!r} is not supported: use one of {', '.join(_DEVICES)}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads={threads!r}: give a positive int, or None for onnxruntime's default")
    ort = _ort()
    model = path if isinstance(path, bytes) else os.fspath(path)
    if not isinstance(model, bytes) and not os.path.isfile(model):
        raise FileNotFoundError(f"ONNX file {model} does not exist: export it first with export_onnx()")
    available = ort.get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise RuntimeUnavailableError(
            f"device='cuda' but this onnxruntime has no {CUDA} (available: {', '.join(available)}): "
            "install onnxruntime-gpu in place of onnxruntime, or use device='cpu'")
    want_cuda = device in ("auto", "cuda") and CUDA in available
    opts = ort.SessionOptions()
    # Fatal only: the runtime's warnings (an initializer it removes, a node placed on the CPU) are
    # for people debugging the runtime and would print in colour on every session, and its errors
    # reach the caller as exceptions anyway (logged too, they made a second, coloured line).
    opts.log_severity_level = 4
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    providers = [CUDA, CPU] if want_cuda else [CPU]
    try:
        sess = ort.InferenceSession(model, sess_options=opts, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's pybind error classes
        where = "the ONNX model (bytes)" if isinstance(model, bytes) else model
        if type(exc).__name__ in _LOAD_FAILURES:  # (not a protobuf, a graph it refuses: its words, on one line)
            raise OnnxLoadError(f"ONNX Runtime cannot load {where}: {one_line(str(exc)) or type(exc).__name__}") \
                from exc
        if type(exc).__name__ != "NotImplemented":  # (an execution provider's failure, say: as it is)
            raise
        # e.g. a float64 Conv or a bfloat16 Sigmoid: the CPU provider covers float32, other types for some ops
        raise RuntimeUnavailableError(
            f"onnxruntime has no kernel for an op of {where} in its element type "
            f"({str(exc).splitlines()[0].split(' : ')[-1].strip()}): its CPU kernels cover float32, other types for "
            "some ops only; export a float32 graph: the model in float32 (model.float()), and no torch.autocast "
            "region in its forward while it exports (that computes its ops in bfloat16 or float16)") from exc
    active = sess.get_providers()
    chosen = CUDA if CUDA in active else CPU
    if device == "cuda" and chosen != CUDA:
        raise RuntimeUnavailableError(
            f"device='cuda' but onnxruntime could not start {CUDA} (no usable GPU or CUDA/cuDNN "
            "libraries missing): check `nvidia-smi` and the onnxruntime-gpu CUDA requirements, "
            "or use device='cpu'")
    sess.provider = chosen
    sess.batch_range = _batch_range(sess)  # (read once: run() checks it at every call)
    sess.axis_ranges = _axis_ranges(sess)
    log.info("ort_session: %s runs %s (device=%r, threads=%s)", chosen,
             "<bytes>" if isinstance(model, bytes) else model, device, threads or "default")
    return sess


def _to_numpy(value: Any, type_str: Optional[str] = None) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch.Tensor
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    want = _NP_TYPES.get(type_str or "")
    if want is not None and arr.dtype != want:
        if np.issubdtype(want, np.integer) and arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
            raise RunInputError(f"an input of {type_str} got floats with fractions ({arr.dtype}): pass whole numbers "
                                "(token ids, indices)")
        arr = arr.astype(want)
    return np.ascontiguousarray(arr)


def run(session, inputs: Union[Mapping[str, Any], Sequence[Any], np.ndarray]) -> list[np.ndarray]:
    """Run `session` and return its outputs as a list of numpy arrays (in graph order).

    inputs: {name: array}, or a tuple/list of arrays in the graph's input order, or one
    array. Torch tensors are accepted too; arrays are cast to the input's ONNX type.
    A BatchSizeError for a batch the file does not compute right (its MIN_BATCH_KEY, MAX_BATCH_KEY).
    """
    specs = session.get_inputs()
    types = {i.name: i.type for i in specs}
    if isinstance(inputs, Mapping):
        unknown = sorted(set(inputs) - set(types))
        if unknown:
            raise RunInputError(f"unknown input name(s) {unknown}: the model takes {list(types)}")
        missing = [n for n in types if n not in inputs]
        if missing:
            raise RunInputError(f"missing input(s) {missing}: the model takes {list(types)}")
        feed = {k: _to_numpy(v, types[k]) for k, v in inputs.items()}
    else:
        if not isinstance(inputs, (tuple, list)):
            inputs = (inputs,)
        if len(inputs) != len(specs):
            raise RunInputError(f"got {len(inputs)} input(s), the model takes {len(specs)}: {list(types)}")
        feed = {s.name: _to_numpy(v, s.type) for s, v in zip(specs, inputs)}
    check_shapes([feed[s.name] for s in specs], specs)
    _check_batch(session, feed)
    _check_axes(session, feed)
    return session.run(None, feed)


# How export_onnx makes a fixed size dynamic: the fix a shape refusal names (`check_shapes`).
_API_SHAPE_FIXES = {"batch": "export with dynamic_batch=True to make the batch dynamic",
                    "dim": "export with dynamic_axes={{{input!r}: {{{dim}: NAME}}}} to make that dim dynamic"}


def check_shapes(arrays: Sequence[np.ndarray], specs: Sequence, labels: Optional[Sequence[str]] = None,
                 model: str = "the file", fixes: Optional[dict] = None) -> None:
    """Each input's shape against the file's input `specs` (session.get_inputs()): its rank, its fixed sizes,
    and one size per named (dynamic) axis across the inputs; a RunInputError names the input, the dim and
    the fix (`fixes`: how to make a size dynamic, "batch" and "dim"; default: export_onnx's arguments).
    labels: what to call each input (default: its name in the file)."""
    fixes = fixes or _API_SHAPE_FIXES
    sizes: dict = {}
    for label, array, spec in zip(labels or [repr(s.name) for s in specs], arrays, specs):
        want = list(spec.shape or [])
        if len(want) != array.ndim:
            raise RunInputError(f"input {label} has shape {list(array.shape)} but {model} input {spec.name!r} has "
                                f"{len(want)} dims {want}: give it that shape")
        fixed, got_sizes = [s for s in want[1:] if isinstance(s, int)], list(array.shape[1:])
        if len(fixed) == len(want) - 1 > 1 and sorted(fixed) == sorted(got_sizes) and fixed != got_sizes:
            raise RunInputError(f"input {label} has shape {list(array.shape)}, {model} input {spec.name!r} takes "
                                f"{want}: the same sizes in another order (channels last?): give it in the file's "
                                "layout, e.g. np.moveaxis(x, -1, 1) for [N, H, W, C] to [N, C, H, W]")
        for dim, (got, size) in enumerate(zip(array.shape, want)):
            if isinstance(size, int) and size != got:
                fix = fixes["batch"] if dim == 0 else (fixes["dim"].format(input=spec.name, dim=dim) + ", where the "
                                                       "model does not fix it (a length, an image size; not its "
                                                       "channels or features)")
                raise RunInputError(f"input {label} has size {got} in dim {dim}, which {model} fixes to {size} "
                                    f"(input {spec.name!r}, {want}): pass that size, or {fix}")
            if isinstance(size, str) and size:
                seen = sizes.setdefault(size, (got, label))
                if seen[0] != got:
                    raise RunInputError(f"inputs {seen[1]} and {label} disagree on axis {size!r} ({seen[0]} and "
                                        f"{got}): give them one size there")


def _check_axes(session, feed: dict) -> None:
    """A BatchSizeError where an input's named dynamic axis has a size outside the range export_onnx recorded
    for it (a forward that branches on that size: the file computes the example's branch)."""
    ranges = getattr(session, "axis_ranges", None)
    ranges = _axis_ranges(session) if ranges is None else ranges
    for spec in session.get_inputs() if ranges else ():
        for dim, name in enumerate(spec.shape or ()):
            if name not in ranges or spec.name not in feed or dim >= feed[spec.name].ndim:
                continue
            least, most = ranges[name]
            size = feed[spec.name].shape[dim]
            if size < least or (most is not None and size > most):
                allowed = sizes_text(least, most)
                raise BatchSizeError(f"input {spec.name!r} has {name}={size}: this ONNX file computes the model's "
                                     f"outputs at {name} of {allowed} only (torch.export bounded that size: a branch "
                                     f"of the forward on it, or a limit of the model's own, such as a position "
                                     f"table); give {allowed}, or export the model with an example of {name}={size} "
                                     "where the forward branches")


def sizes_text(least: int, most: Optional[int]) -> str:
    """A range of sizes in words: "6 or more", "at most 5", "2 to 3"."""
    if most is None:
        return f"{least} or more"
    return f"at most {most}" if least <= 1 else f"{least} to {most}"


def _axis_ranges(session) -> dict:
    """The file's AXIS_RANGES_KEY as {axis: (least, most or None)}; {} where it has none."""
    meta = session.get_modelmeta().custom_metadata_map if hasattr(session, "get_modelmeta") else {}
    return {name: (int(low), None if high is None else int(high))
            for name, (low, high) in json.loads(meta.get(AXIS_RANGES_KEY, "{}")).items()}


def _check_batch(session, feed: dict) -> None:
    """A BatchSizeError where the inputs with a dynamic dim 0 have a batch outside the sizes the file
    computes right (written by export_onnx for a forward that branches on the batch size)."""
    bounds = getattr(session, "batch_range", None)
    least, most = bounds if bounds is not None else _batch_range(session)  # (a session ort_session did not make)
    if least <= 1 and most is None:
        return
    sizes = [feed[s.name].shape[0] for s in session.get_inputs()
             if s.shape and isinstance(s.shape[0], str) and s.name in feed and feed[s.name].ndim]
    if not sizes:
        return
    batch = max(sizes)
    if batch < least or (most is not None and batch > most):
        allowed = f"{least} or more" if most is None else f"{least} to {most}"
        raise BatchSizeError(f"a batch of {batch}: this ONNX file computes the model's outputs at batches of "
                             f"{allowed} only (the forward branches on the batch size, and torch.export captured the "
                             f"branch for those); give {allowed} samples, or export a model perforated with a "
                             f"batch-{batch} example for such calls")


def _batch_range(session) -> tuple[int, Optional[int]]:
    """The file's (MIN_BATCH_KEY, MAX_BATCH_KEY): (1, None) where it has neither."""
    meta = session.get_modelmeta().custom_metadata_map if hasattr(session, "get_modelmeta") else {}
    return int(meta.get(MIN_BATCH_KEY, 1)), (int(meta[MAX_BATCH_KEY]) if MAX_BATCH_KEY in meta else None)


def output_difference(got, want) -> tuple[float, float]:
    """(max abs difference, its bound) of one output, a runtime's `got` against PyTorch's `want`
    (torch tensors): inf/NaN entries must match exactly (inf when they do not); the finite ones
    within `tolerance` of the finite values; integer and bool outputs must be equal (bound 0)."""
    import torch

    if not (want.is_floating_point() and want.numel()):
        return _max_difference(got, want), 0.0
    got = got.to(want.dtype)
    finite = torch.isfinite(want)
    if not finite.all():
        same = torch.equal(torch.isfinite(got), finite) and torch.equal(
            torch.nan_to_num(got[~finite], nan=0.0), torch.nan_to_num(want[~finite], nan=0.0)) and bool(
            (torch.isnan(got[~finite]) == torch.isnan(want[~finite])).all())
        if not same:
            return math.inf, 0.0
        got, want = got[finite], want[finite]
        if not want.numel():
            return 0.0, 0.0
    return _max_difference(got, want), tolerance(want)


def tolerance(want) -> float:
    """The bound for one float output: 1e-4 (16 units in the last place of a half dtype) times the
    output's scale, at least 1; two runtimes' roundings grow with the output's size (an
    EfficientNet's logits near 100 differ by 2.8e-4 in float32, as torch's float32 and float64 do)."""
    import torch

    if not (want.is_floating_point() and want.numel()):
        return 0.0
    scale = max(1.0, float(want.detach().abs().max().float()))  # (finite: `output_difference` leaves out inf/NaN)
    return max(1e-4, 16 * torch.finfo(want.dtype).eps) * scale


def _max_difference(got, want) -> float:
    """Largest absolute difference; for integer and bool outputs, 0 or inf (they must be equal)."""
    import torch

    if not want.numel():
        return 0.0
    if want.is_floating_point() or want.is_complex():
        return float((got.to(want.dtype) - want).abs().max())
    return 0.0 if torch.equal(got.to(want.dtype), want) else float("inf")
