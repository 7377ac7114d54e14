"""The covariance tap's backward as one native call, compiled at first use; the torch ops otherwise.

`covariance_kernel.c` does what `covariance_tap.candidate_gradient` does for a split pool in
float32 on the CPU: centre the site error, the covariance with each candidate, the fold into the
statistics (EMA, best, snapshots) and the candidates' gradient. Those are about forty small torch
ops a site and step, whose dispatch cost (150-400 us each time, whatever the tensors' size) was a
fifth of a small model's dendrite-phase step (bench/train_overhead.py).

The library is built once per source and compiler with the system's C compiler ($CC, else cc)
into $XDG_CACHE_HOME/pbp_fx (default ~/.cache/pbp_fx). Where it cannot be built or loaded (no
compiler, a read-only cache) the torch ops run, which give the same results to float32 rounding
(the sums are taken in float64 here). PBP_FX_NATIVE=0 turns it off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["kernel", "candidate_gradient"]

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "covariance_kernel.c")
# Above this many elements, with several threads, torch's parallel kernels win over one native thread.
SERIAL_LIMIT = 1 << 18
_MAX_DIMS = 8
# -fassociative-math (with the two it needs) lets the sums run vectorised, in another order than one by
# one; nothing here assumes finite values (the covariance's finiteness is checked).
FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math", "-fPIC",
         "-shared")
_P = ctypes.c_void_p


def _cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "pbp_fx")


def _build(compiler: list[str], target: str) -> None:
    """Compile SOURCE into `target` (via a temporary file renamed into place: processes building at once
    each finish with a whole library)."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(target))
    os.close(fd)
    try:
        subprocess.run([*compiler, *FLAGS, "-o", tmp, SOURCE, "-lm"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
        # Loaded once in a child first: a library that cannot load here (CC with -fsanitize=address) ended
        # the process that loaded it, mid-run.
        loads = subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({tmp!r})"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        if loads.returncode:
            raise OSError(f"the library built with {' '.join(compiler)} does not load (exit {loads.returncode})")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=None)  # (one build and load per process: the library does not change)
def kernel() -> Optional[ctypes.CDLL]:
    """The loaded library, or None where it is off or cannot be built (said once, at info level)."""
    if os.environ.get("PBP_FX_NATIVE", "1") == "0":
        return None
    try:
        # (CC="ccache cc" is a command with its arguments; a blank one is no choice)
        compiler = shlex.split((os.environ.get("CC") or "").strip() or "cc")
        with open(SOURCE, "rb") as f:
            source = f.read()
        # Which compiler, not only its name: another one on PATH, or an upgrade, builds anew.
        version = subprocess.run([*compiler, "--version"], check=True, capture_output=True, timeout=30).stdout
        tag = hashlib.sha256(source + version + " ".join((*compiler, *FLAGS, platform.machine())).encode()).hexdigest()
        target = os.path.join(_cache_dir(), f"covariance_kernel-{tag[:16]}.so")
        if not os.path.exists(target):
            _build(compiler, target)
        lib = ctypes.CDLL(target)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        log.info("pbp_fx.native: no native covariance kernel (%s); the torch ops run it", exc)
        return None
    fn = lib.pbp_candidate_gradient
    fn.restype = ctypes.c_int
    # (addresses as plain integers: ctypes.cast per pointer cost 2 us each)
    fn.argtypes = [_P, _P, _P, ctypes.c_int, _P, _P, ctypes.c_int64, ctypes.c_int64, _P, _P, _P, _P, _P, _P,
                   ctypes.c_double, ctypes.c_int64, ctypes.c_double, ctypes.c_int, ctypes.c_double, ctypes.c_double,
                   ctypes.c_int, _P, _P, _P, _P]
    return lib


def _runs(t: Tensor, copy_dim: int) -> Optional[tuple[list[int], list[int]]]:
    """t's dims in memory order, outermost first, as (sizes, roles: 0 a position, 1 the member, 2 the
    channel), dims of size 1 left out and neighbouring position dims merged; None unless t is dense
    (no gaps, no overlap)."""
    shape, strides = t.shape, t.stride()
    dims = sorted((k for k in range(len(shape)) if shape[k] > 1), key=lambda k: -strides[k])
    sizes: list[int] = []
    roles: list[int] = []
    expected = t.numel()
    for k in dims:
        expected //= shape[k]
        if strides[k] != expected:
            return None
        role = 1 if k == copy_dim else 2 if k == copy_dim + 1 else 0
        if role == 0 and roles and roles[-1] == 0:
            sizes[-1] *= shape[k]
        else:
            sizes.append(shape[k])
            roles.append(role)
    return sizes, roles


def candidate_gradient(c: Tensor, d: Tensor, stats: Sequence[Tensor], snapshots: Sequence[Tensor],
                       rows: Sequence[Tensor], copy_dim: int, scale: Optional[float], settings: tuple,
                       left_out: float) -> Optional[tuple[bool, Tensor]]:
    """(counted, g) for a split pool's batch (c and d [.., P, C, ..] alike, P at `copy_dim`), with the
    statistics updated in place; None where the native call does not apply (the caller runs the torch
    ops): no library, not float32 on the CPU, another layout, a large tensor with several threads."""
    lib = kernel()
    if lib is None or c.dtype != torch.float32 or d.dtype != torch.float32 or c.device.type != "cpu":
        return None
    if c.numel() > SERIAL_LIMIT and torch.get_num_threads() > 1:
        return None
    ema, ema_sq, best, steps, seen, last_improved = stats
    if any(t.dtype != torch.float32 or not t.is_contiguous() for t in (ema, ema_sq, best)) or any(
            t.dtype != torch.int64 for t in (steps, seen, last_improved)):
        return None
    pairs = [(s, r) for s, r in zip(snapshots, rows) if r.numel()]
    if any(t.dtype != torch.float32 or not t.is_contiguous() for pair in pairs for t in pair):
        return None
    copy_dim %= c.dim()  # (a Linear's -2)
    runs = _runs(c, copy_dim)
    if runs is None or not runs[0] or len(runs[0]) > _MAX_DIMS or d.shape != c.shape or d.stride() != c.stride():
        return None
    sizes, roles = runs
    members, channels = c.shape[copy_dim], c.shape[copy_dim + 1]
    g = torch.empty_like(c)
    nd = len(sizes)
    decay, warmup, threshold, bias_correction = settings
    n = len(pairs)
    status = lib.pbp_candidate_gradient(
        c.data_ptr(), d.data_ptr(), g.data_ptr(), nd, (ctypes.c_int64 * nd)(*sizes), (ctypes.c_int * nd)(*roles),
        members, channels, ema.data_ptr(), ema_sq.data_ptr(), best.data_ptr(), steps.data_ptr(), seen.data_ptr(),
        last_improved.data_ptr(), float(decay), int(warmup), float(threshold), int(bool(bias_correction)),
        0.0 if scale is None else float(scale), float(left_out), n, (_P * max(n, 1))(*(s.data_ptr() for s, _ in pairs)),
        (_P * max(n, 1))(*(r.data_ptr() for _, r in pairs)),
        (ctypes.c_int64 * max(n, 1))(*(r.numel() // (members * channels) for _, r in pairs)),
        (ctypes.c_double * (3 * members * channels))())
    if status < 0:
        raise RuntimeError(f"pbp_fx.native: the covariance kernel refused its arguments (shape {list(c.shape)})")
    return bool(status), g
