"""A candidate pool's own work as native calls, compiled at first use; the torch ops otherwise.

`candidate_kernels.c`, for float32 on the CPU:
- `candidate_gradient`: what `covariance_tap.candidate_gradient` does for a split pool: centre the
  site error, the covariance with each candidate, the fold into the statistics (EMA, best,
  snapshots) and the candidates' gradient. Those are about forty small torch ops a site and step,
  whose dispatch cost (150-400 us each time, whatever the tensors' size) was a fifth of a small
  model's dendrite-phase step (bench/train_overhead.py).
- `norm_sigmoid`: the candidates' BatchNorm in training form and their sigmoid, forward and
  backward, one pass over the data for each step where torch's kernels take several (its CPU
  BatchNorm alone took 2.3 ns an element).
- `candidate_norm_backward`: `candidate_gradient` and then norm_sigmoid's backward as one call where
  the candidates' positions are innermost (a conv's): the candidates' gradient is used where it is
  formed, not written and read back.
- `norm_cascade_sigmoid`: the installed dendrites' BatchNorm, cascade and sigmoid, forward only
  (frozen, behind a stop-gradient: nothing to save for a backward).
- `columns_1d`: a split pool's input columns for a 1-D conv in one pass, where the pad, unfold and
  copy took two passes over strided views.

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
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["kernel", "PreparedArguments", "candidate_gradient", "positions_innermost", "candidate_norm_backward",
           "norm_sigmoid", "norm_sigmoid_arguments", "norm_sigmoid_apply", "norm_sigmoid_forward",
           "norm_sigmoid_backward", "norm_cascade_sigmoid", "columns_1d"]

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "candidate_kernels.c")
# Above this many elements, with several threads, torch's parallel kernels win over one native thread.
SERIAL_LIMIT = 1 << 18
_MAX_DIMS = 8
# -fassociative-math (with the two it needs) lets the sums run vectorised, in another order than one by
# one; nothing here assumes finite values (the covariance's finiteness is checked).
FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math", "-fPIC",
         "-shared")
# Tried first: the machine's own vector width. The sigmoid's polynomial ran 3.5x faster with AVX2 and FMA than
# with x86-64's baseline SSE2 (a 2-core AMD EPYC; the whole norm-and-sigmoid forward 93 us against 266 us
# for 102,400 elements). A compiler that refuses it builds with FLAGS alone.
NATIVE_FLAGS = ("-march=native",)
_P = ctypes.c_void_p


def _processor() -> str:
    """The processor's model and feature flags (Linux: /proc/cpuinfo), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "pbp_fx")


def _build(compiler: list[str], target: str) -> None:
    """Compile SOURCE into `target` (via a temporary file renamed into place: processes building at once
    each finish with a whole library)."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(target))
    os.close(fd)
    try:
        try:
            subprocess.run([*compiler, *FLAGS, *NATIVE_FLAGS, "-o", tmp, SOURCE, "-lm"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
        except subprocess.CalledProcessError:
            subprocess.run([*compiler, *FLAGS, "-o", tmp, SOURCE, "-lm"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
        # Loaded once in a child first: a library that cannot load here (CC with -fsanitize=address) ended
        # the process that loaded it, mid-run.
        loads = subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({tmp!r})"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        if loads.returncode:
            raise OSError(f"the library built with {' '.join(compiler)} does not load (exit {loads.returncode})")
        with open(tmp, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        os.replace(tmp, target)
        # The digest after the library: a reader that sees it finds the library it describes, or another
        # process's whole build (then it rebuilds once more).
        with open(tmp, "w") as f:
            f.write(digest)
        os.replace(tmp, _digest_path(target))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _digest_path(target: str) -> str:
    return target + ".sha256"


def _intact(target: str) -> bool:
    """Whether the cached library is the whole file a build wrote (its digest matches). A truncated one
    ended the process that loaded it with SIGBUS; one of garbage bytes turned the kernels off for good."""
    try:
        with open(_digest_path(target)) as f:
            expected = f.read().strip()
        with open(target, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest() == expected
    except OSError:
        return False


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
        # Which processor too: a library built for one machine's vector units must not load on another's
        # (a cache folder shared between machines).
        machine = " ".join((*compiler, *FLAGS, *NATIVE_FLAGS, platform.machine(), _processor()))
        tag = hashlib.sha256(source + version + machine.encode()).hexdigest()
        target = os.path.join(_cache_dir(), f"candidate_kernels-{tag[:16]}.so")
        if not _intact(target):
            _build(compiler, target)
        lib = ctypes.CDLL(target)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        log.info("pbp_fx.native: no native candidate kernels (%s); the torch ops run them", exc)
        return None
    fn = lib.pbp_candidate_gradient
    fn.restype = ctypes.c_int
    # (addresses as plain integers: ctypes.cast per pointer cost 2 us each)
    fn.argtypes = [_P, _P, _P, ctypes.c_int, _P, _P, ctypes.c_int64, ctypes.c_int64, _P, _P, _P, _P, _P, _P,
                   ctypes.c_double, ctypes.c_int64, ctypes.c_double, ctypes.c_int, ctypes.c_double, ctypes.c_double,
                   ctypes.c_int, _P, _P, _P, _P, _P]
    fused = lib.pbp_candidate_norm_backward
    fused.restype = ctypes.c_int
    fused.argtypes = [_P, _P, _P, _P, _P, *fn.argtypes[3:25], _P, _P, _P, _P, _P, _P]
    layout = [ctypes.c_int, _P, _P, ctypes.c_int64, ctypes.c_int64]
    lib.pbp_norm_sigmoid_forward.restype = ctypes.c_int
    lib.pbp_norm_sigmoid_forward.argtypes = [_P, _P, _P, *layout, _P, _P, _P, _P, ctypes.c_double,
                                             ctypes.c_double, _P, _P, _P]
    lib.pbp_norm_sigmoid_backward.restype = ctypes.c_int
    lib.pbp_norm_sigmoid_backward.argtypes = [_P, _P, _P, _P, _P, *layout, _P, _P, _P, _P, _P, _P]
    lib.pbp_norm_cascade_sigmoid.restype = ctypes.c_int
    lib.pbp_norm_cascade_sigmoid.argtypes = [_P, _P, *[ctypes.c_int64] * 4, _P, _P, _P, _P, ctypes.c_int,
                                             ctypes.c_double, ctypes.c_double, _P, _P]
    lib.pbp_columns_1d.restype = ctypes.c_int
    lib.pbp_columns_1d.argtypes = [_P, *[ctypes.c_int64] * 3, _P, *[ctypes.c_int64] * 8]
    return lib


@functools.lru_cache(maxsize=256)  # (a site's layout is the same every step; building it took ~15 us)
def _layout(shape: tuple, strides: tuple, copy_dim: int) -> Optional[tuple]:
    """A dense tensor's dims in memory order for the kernels: (nd, sizes, roles) as ctypes arrays, sizes
    outermost first, roles 0 a position, 1 the member (`copy_dim`), 2 the channel (the next dim); dims of
    size 1 left out and neighbouring position dims merged; and each merged dim's tensor dims, outermost first.
    None unless dense (no gaps, no overlap) with at most _MAX_DIMS such dims."""
    dims = sorted((k for k in range(len(shape)) if shape[k] > 1), key=lambda k: -strides[k])
    sizes: list[int] = []
    roles: list[int] = []
    groups: list[list[int]] = []
    expected = math.prod(shape)
    for k in dims:
        expected //= shape[k]
        if strides[k] != expected:
            return None
        role = 1 if k == copy_dim else 2 if k == copy_dim + 1 else 0
        if role == 0 and roles and roles[-1] == 0:
            sizes[-1] *= shape[k]
            groups[-1].append(k)
        else:
            sizes.append(shape[k])
            roles.append(role)
            groups.append([k])
    if not sizes or len(sizes) > _MAX_DIMS:
        return None
    nd = len(sizes)
    return nd, (ctypes.c_int64 * nd)(*sizes), (ctypes.c_int * nd)(*roles), tuple(map(tuple, groups))


@functools.lru_cache(maxsize=256)
def _strides_in(groups: tuple, shape: tuple, strides: tuple) -> Optional[ctypes.Array]:
    """Another tensor of `shape` read in a layout's dim order (`_layout`'s groups): its stride along each
    merged dim, or None where a merged dim's tensor dims do not merge in it, or its innermost is not contiguous
    (the covariance kernel reads it so only where positions are innermost)."""
    out = []
    for group in groups:
        for outer, inner in zip(group, group[1:]):
            if strides[outer] != strides[inner] * shape[inner]:
                return None
        out.append(strides[group[-1]])
    if out[-1] != 1:
        return None
    return (ctypes.c_int64 * len(out))(*out)


class PreparedArguments:
    """A module's own tensors checked and packed for a kernel once, reused while they are the same tensors at the
    same addresses: checking and packing a pool's statistics, snapshots and rows cost more than the covariance
    kernel itself on small sites. Held by the module that owns the tensors; not state (a copy or a pickle of
    the module starts with an empty one). A tensor whose dtype, shape or strides change in place at the same
    address (as_strided_, resize_, t_() on the module's own buffers) is not noticed: its memory stays in bounds,
    but the kernel would read and write it in the old layout."""

    __slots__ = ("_entry",)

    def __init__(self):
        self._entry = (None, None)  # (key, value): one tuple, replaced whole

    def get(self, key: tuple):
        """What was put for this key, else None."""
        stored, value = self._entry
        return value if key == stored else None

    def put(self, key: tuple, value):
        self._entry = (key, value)
        return value

    def __deepcopy__(self, memo):
        return PreparedArguments()

    def __reduce__(self):
        return PreparedArguments, ()


def _identity(tensors: Sequence[Tensor]) -> tuple:
    """Which tensors, at which addresses: a key for PreparedArguments (the entry holds the tensors, so the
    ids stay theirs; .to() or a reassigned .data moves the address)."""
    return (*map(id, tensors), *(t.data_ptr() for t in tensors))


def _statistics_arguments(stats: Sequence[Tensor], snapshots: Sequence[Tensor], rows: Sequence[Tensor],
                          members: int, channels: int, settings: tuple,
                          prepared: Optional[PreparedArguments]) -> Optional[tuple]:
    """The covariance kernel's arguments from a pool's own tensors and settings (between d_strides' place and
    the work space), or None where they do not apply; kept in `prepared` while the tensors stay the same."""
    own = (*stats, *snapshots, *rows)
    if any(type(t) not in _PLAIN for t in own):
        return None
    key = (members, channels, *settings, *_identity(own))
    found = None if prepared is None else prepared.get(key)
    if found is not None:
        return found[1]
    ema, ema_sq, best, steps, seen, last_improved = stats
    pairs = [(s, r) for s, r in zip(snapshots, rows) if r.numel()]
    floats = (ema, ema_sq, best, *(t for pair in pairs for t in pair))
    if any(t.dtype != torch.float32 or not t.is_contiguous() for t in floats):
        return None
    if any(t.dtype != torch.int64 for t in (steps, seen, last_improved)):
        return None
    decay, warmup, threshold, bias_correction = settings
    n = len(pairs)
    packed = (ema.data_ptr(), ema_sq.data_ptr(), best.data_ptr(), steps.data_ptr(), seen.data_ptr(),
              last_improved.data_ptr(), float(decay), int(warmup), float(threshold), int(bool(bias_correction)), n,
              (_P * max(n, 1))(*(s.data_ptr() for s, _ in pairs)), (_P * max(n, 1))(*(r.data_ptr() for _, r in pairs)),
              (ctypes.c_int64 * max(n, 1))(*(r.numel() // (members * channels) for _, r in pairs)))
    if prepared is not None:
        prepared.put(key, (own, packed))
    return packed


def candidate_gradient(c: Tensor, d: Tensor, stats: Sequence[Tensor], snapshots: Sequence[Tensor],
                       rows: Sequence[Tensor], copy_dim: int, scale: Optional[float], settings: tuple,
                       left_out: float, prepared: Optional[PreparedArguments] = None) -> Optional[tuple[bool, Tensor]]:
    """(counted, g) for a split pool's batch (c and d [.., P, C, ..] alike, P at `copy_dim`), with the
    statistics updated in place; None where the native call does not apply (the caller runs the torch
    ops): no library, not float32 on the CPU, another layout, a large tensor with several threads.
    prepared: where the pool keeps its tensors' checked arguments from one step to the next."""
    lib = _kernel_for((c, d))
    if lib is None or c.dtype != torch.float32 or d.dtype != torch.float32:
        return None
    if c.numel() > SERIAL_LIMIT and torch.get_num_threads() > 1:
        return None
    copy_dim %= c.dim()  # (a Linear's -2)
    members, channels = c.shape[copy_dim], c.shape[copy_dim + 1]
    own = _statistics_arguments(stats, snapshots, rows, members, channels, settings, prepared)
    if own is None:
        return None
    layout = _layout(tuple(c.shape), c.stride(), copy_dim)
    if layout is None or d.shape != c.shape:
        return None
    nd, sizes, roles, _ = layout
    d, d_strides = _error_in_layout(d, c, layout)
    g = torch.empty_like(c)
    status = lib.pbp_candidate_gradient(
        c.data_ptr(), d.data_ptr(), g.data_ptr(), nd, sizes, roles, members, channels, *own[:10],
        0.0 if scale is None else float(scale), float(left_out), *own[10:], d_strides,
        (ctypes.c_double * (3 * members * channels))())
    _check(status, "covariance", c)
    return bool(status), g


def _error_in_layout(d: Tensor, c: Tensor, layout: tuple) -> tuple[Tensor, Optional[ctypes.Array]]:
    """d for the covariance kernels beside c (c's `_layout`): (d, None) where it has c's strides, (d, its strides in
    the layout's dims) where the kernel can read it in place (positions innermost: a split site error is a view),
    else (a copy of d in c's layout, None)."""
    if d.stride() == c.stride():
        return d, None
    nd, _, roles, groups = layout
    d_strides = _strides_in(groups, tuple(d.shape), d.stride()) if roles[nd - 1] == 0 else None
    return (d, d_strides) if d_strides is not None else (torch.empty_like(c).copy_(d), None)


def positions_innermost(layout: tuple) -> bool:
    """Whether candidates in this norm layout (`norm_sigmoid_arguments`' last) hold their positions innermost in
    memory (a conv's), where `candidate_norm_backward` can apply."""
    (nd, _, roles, _), *_ = layout
    return roles[nd - 1] == 0


def candidate_norm_backward(d: Tensor, stats: Sequence[Tensor], snapshots: Sequence[Tensor], rows: Sequence[Tensor],
                            scale: Optional[float], settings: tuple, left_out: float, saved: tuple, layout: tuple,
                            needs: tuple, prepared: Optional[PreparedArguments] = None
                            ) -> Optional[tuple[bool, Optional[tuple]]]:
    """`candidate_gradient` and then `norm_sigmoid_backward` as one kernel call, for candidates made by
    `norm_sigmoid_forward` (saved, layout and needs as norm_sigmoid_backward takes them) with positions innermost
    (a conv's): (True, (dz, g, dweight, dbias)); (False, None) where the batch is not counted (its statistics
    unchanged but for the batches seen); None where it does not apply (the caller makes the two calls)."""
    z, c, weight, _, extra, mean, invstd = saved
    (nd, sizes, roles, _), members, channels, _ = layout
    if not positions_innermost(layout) or d.shape != c.shape or d.dtype != torch.float32 or torch.is_grad_enabled():
        return None
    lib = _kernel_for((c, d))
    if lib is None or c.numel() > SERIAL_LIMIT and torch.get_num_threads() > 1:
        return None
    own = _statistics_arguments(stats, snapshots, rows, members, channels, settings, prepared)
    if own is None:
        return None
    d, d_strides = _error_in_layout(d, c, layout[0])
    dz, g, dweight, dbias = _norm_gradients(z, extra, weight, needs)
    status = lib.pbp_candidate_norm_backward(
        c.data_ptr(), d.data_ptr(), z.data_ptr(), _address(g), dz.data_ptr(), nd, sizes, roles, members, channels,
        *own[:10], 0.0 if scale is None else float(scale), float(left_out), *own[10:], d_strides,
        _address(weight), mean.data_ptr(), invstd.data_ptr(), _address(dweight), _address(dbias),
        (ctypes.c_double * (5 * members * channels))())
    _check(status, "covariance", c)
    return (True, (dz, g, dweight, dbias)) if status else (False, None)


def _check(status: int, kernel_name: str, t: Tensor) -> None:
    """Raise for a kernel's failure status: -2 its work space could not be had (MemoryError, as torch's own
    allocations), another negative value arguments it cannot take (a defect here: the callers check them)."""
    if status == -2:
        raise MemoryError(f"pbp_fx.native: the {kernel_name} kernel could not allocate its work space (shape "
                          f"{list(t.shape)}): free memory, or use a smaller batch")
    if status < 0:
        raise RuntimeError(f"pbp_fx.native: the {kernel_name} kernel refused its arguments (shape {list(t.shape)})")


def _address(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _kernel_for(data: Sequence[Tensor], own: Sequence[Tensor] = ()) -> Optional[ctypes.CDLL]:
    """The library where the kernels can read these tensors' memory, else None: not while torch.compile traces
    (checked first: tracing into kernel() broke the graph), and only plain tensors: not a FakeTensor or other
    subclass (their data_ptr() is 0: the kernel would read address 0). `data` (a batch's activations) must also
    be in CPU memory and not wrapped by a torch.func transform; `own` (a module's parameters and buffers, beside
    them) is checked for its type only (a few us a site and step)."""
    if torch.compiler.is_compiling():
        return None
    for t in data:
        if type(t) is not Tensor or t.device.type != "cpu" or torch._C._functorch.is_functorch_wrapped_tensor(t):
            return None
    for t in own:
        if type(t) not in _PLAIN:
            return None
    return kernel()


_PLAIN = (Tensor, torch.nn.Parameter)


def _differentiable_backward(grad_out: Tensor, z: Tensor, extra: Optional[Tensor], weight: Optional[Tensor],
                             bias: Optional[Tensor], layout: tuple, eps: float, needs: tuple) -> tuple:
    """norm_sigmoid's backward as torch ops that autograd can differentiate again (create_graph=True): the
    batch-statistics norm and the sigmoid recomputed from the saved inputs; needs: whether (z, extra, weight,
    bias) each need their gradient."""
    cd = layout[3]
    rows = z.shape[cd] * z.shape[cd + 1]
    flat = z.flatten(cd, cd + 1) if cd == 1 else z.reshape(-1, rows)
    pre = F.batch_norm(flat, None, None, None if weight is None else weight.reshape(rows),
                       None if bias is None else bias.reshape(rows), True, 0.0, eps).reshape(z.shape)
    out = torch.sigmoid(pre if extra is None else pre + extra)
    inputs = (z, extra, weight, bias)
    wanted = [i for i, t in enumerate(inputs) if t is not None and needs[i]]
    grads = torch.autograd.grad(out, [inputs[i] for i in wanted], grad_out, create_graph=True, allow_unused=True)
    result = [None] * 4
    for i, g in zip(wanted, grads):
        result[i] = g
    return tuple(result)


def norm_sigmoid(z: Tensor, extra: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                 running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float, eps: float,
                 copy_dim: int, batches_tracked: Optional[Tensor] = None) -> Optional[Tensor]:
    """sigmoid(batch_norm(z) + extra) for a candidate pool's layer output z ([.., P, C, ..], P at
    `copy_dim`), the norm in training form (batch statistics; the running ones updated in place), as
    native calls forward and backward; None where they do not apply (`norm_sigmoid_arguments`; nothing
    changed: the caller runs F.batch_norm and torch.sigmoid)."""
    args = norm_sigmoid_arguments(z, extra, weight, bias, running_mean, running_var, momentum, eps, copy_dim,
                                  batches_tracked)
    return None if args is None else norm_sigmoid_apply(args)


def norm_sigmoid_apply(args: tuple) -> Tensor:
    """norm_sigmoid on its arguments (`norm_sigmoid_arguments`), as an autograd node."""
    return _NormSigmoid.apply(*args)


def norm_sigmoid_arguments(z: Tensor, extra: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                           running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
                           eps: float, copy_dim: int, batches_tracked: Optional[Tensor] = None) -> Optional[tuple]:
    """norm_sigmoid's arguments for its kernels, (z, extra, weight, bias, running_mean, running_var, momentum,
    eps, layout) as `norm_sigmoid_forward` takes them, with the norm's batch counted; None where they do not
    apply (nothing counted): no library, not float32 on the CPU, a layout with gaps, fewer than two positions a
    channel, a large tensor with several threads, torch.compile tracing.

    weight, bias, running_mean, running_var: [P, C] (or None); extra: z's shape (or None);
    batches_tracked: the norm's counter, counted here (before the kernel: a checkpointed forward's recompute
    stops once its last saved tensor is made, after the running statistics' update)."""
    own = [t for t in (weight, bias, running_mean, running_var) if t is not None]
    lib = _kernel_for((z,) if extra is None else (z, extra), own)
    if lib is None or z.dtype != torch.float32 or z.numel() > SERIAL_LIMIT and torch.get_num_threads() > 1:
        return None
    copy_dim %= z.dim()
    members, channels = z.shape[copy_dim], z.shape[copy_dim + 1]
    if any(t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != members * channels for t in own):
        return None
    if (running_mean is None) != (running_var is None) or (weight is None) != (bias is None):
        return None
    layout = _layout(tuple(z.shape), z.stride(), copy_dim)
    if layout is None or z.numel() < 2 * members * channels:
        return None
    if extra is not None:
        if extra.dtype != torch.float32 or extra.shape != z.shape:
            return None
        if extra.stride() != z.stride():  # (one layout for the kernel's walk)
            extra = torch.empty_like(z).copy_(extra)
    if batches_tracked is not None:
        batches_tracked.add_(1)
    return (z, extra, weight, bias, running_mean, running_var, float(momentum), float(eps),
            (layout, members, channels, copy_dim))


def norm_sigmoid_forward(z: Tensor, extra: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                         running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float, eps: float,
                         layout: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """The forward kernel on `norm_sigmoid_arguments`: (the output, the batch's mean and 1/std per row)."""
    (nd, sizes, roles, _), members, channels, _ = layout
    rows = members * channels
    out = torch.empty_like(z)
    mean, invstd = torch.empty(2, rows, dtype=torch.float32).unbind()  # (whatever torch's default dtype)
    status = kernel().pbp_norm_sigmoid_forward(
        z.data_ptr(), _address(extra), out.data_ptr(), nd, sizes, roles, members, channels, _address(weight),
        _address(bias), _address(running_mean), _address(running_var), momentum, eps, mean.data_ptr(),
        invstd.data_ptr(), (ctypes.c_double * (2 * rows))())
    _check(status, "norm", z)
    return out, mean, invstd


def norm_sigmoid_backward(grad_out: Tensor, saved: tuple, layout: tuple, eps: float,
                          needs: tuple) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The gradients (z, extra, weight, bias) of `norm_sigmoid_forward` for grad_out; saved: (z, out, weight,
    bias, extra, mean, invstd); needs: whether each of those four needs its gradient. Under create_graph
    (a second-order gradient) as torch ops that autograd can differentiate again."""
    z, out, weight, bias, extra, mean, invstd = saved
    if torch.is_grad_enabled():
        return _differentiable_backward(grad_out, z, extra, weight, bias, layout, eps, needs)
    (nd, sizes, roles, _), members, channels, _ = layout
    if grad_out.stride() != z.stride():
        grad_out = torch.empty_like(z).copy_(grad_out)
    dz, g, dweight, dbias = _norm_gradients(z, extra, weight, needs)
    status = kernel().pbp_norm_sigmoid_backward(
        grad_out.data_ptr(), out.data_ptr(), z.data_ptr(), _address(g), dz.data_ptr(), nd, sizes, roles,
        members, channels, _address(weight), mean.data_ptr(), invstd.data_ptr(), _address(dweight),
        _address(dbias), (ctypes.c_double * (2 * members * channels))())
    _check(status, "norm", z)
    return dz, g, dweight, dbias


def _norm_gradients(z: Tensor, extra: Optional[Tensor], weight: Optional[Tensor], needs: tuple) -> tuple:
    """The native norm backward's outputs, to be written: dz, and the gradients of extra, weight and bias where
    they are needed (else None); float32 whatever torch's default dtype."""
    dz = torch.empty_like(z)
    g = torch.empty_like(z) if extra is not None and needs[1] else None
    wants_affine = weight is not None and (needs[2] or needs[3])
    dweight, dbias = torch.empty(2, *weight.shape, dtype=torch.float32).unbind() if wants_affine else (None, None)
    return dz, g, dweight, dbias


class _NormSigmoid(torch.autograd.Function):
    """norm_sigmoid's autograd node: saves z, the output and the batch's mean and 1/std, as BatchNorm and
    the sigmoid save theirs."""

    @staticmethod
    def forward(ctx, z, extra, weight, bias, running_mean, running_var, momentum, eps, layout):
        out, mean, invstd = norm_sigmoid_forward(z, extra, weight, bias, running_mean, running_var, momentum, eps,
                                                 layout)
        ctx.layout, ctx.eps = layout, eps
        ctx.save_for_backward(z, out, weight, bias, extra, mean, invstd)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grads = norm_sigmoid_backward(grad_out, ctx.saved_tensors, ctx.layout, ctx.eps, ctx.needs_input_grad[:4])
        return (*grads, None, None, None, None, None)


def norm_cascade_sigmoid(z: Tensor, cascade: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                         running_mean: Tensor, running_var: Tensor, training: bool, momentum: float, eps: float,
                         axis: int, batches_tracked: Optional[Tensor] = None) -> Optional[Tensor]:
    """The K installed dendrites' activations s_k = sigmoid(norm_k(z_k) + sum_{j<k} cascade[k, :, j] * s_j), in
    z's stacked layout ([B, K, C, *S] for axis 1, [..., K, C] for -1), as one native call; the norm's batch
    statistics when training (the running ones updated in place), else its running ones. None where it does
    not apply (nothing changed; the caller runs the torch ops): no library, not float32 on the CPU, z not
    contiguous, something needing a gradient, fewer than two positions a channel in training, a large tensor
    with several threads, torch.compile tracing.

    cascade: [K, C, K] (or None); weight, bias, running_mean, running_var: [K, C]; batches_tracked: the
    norm's counter, counted here when training."""
    own = [t for t in (cascade, weight, bias, running_mean, running_var) if t is not None]
    lib = _kernel_for((z,), own)
    if lib is None or z.dtype != torch.float32 or z.numel() > SERIAL_LIMIT and torch.get_num_threads() > 1:
        return None
    if any(t.dtype != torch.float32 or not t.is_contiguous() for t in own):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (z, *own)):
        return None
    if running_mean is None or running_var is None or (weight is None) != (bias is None) or not z.is_contiguous():
        return None
    cd = 1 if axis == 1 else z.dim() - 2
    copies, channels = z.shape[cd], z.shape[cd + 1]
    outer, inner = math.prod(z.shape[:cd]), math.prod(z.shape[cd + 2:])
    if any(t.numel() != copies * channels for t in own if t is not cascade):
        return None
    if cascade is not None and cascade.numel() not in (0, copies * channels * copies):
        return None
    if training and outer * inner < 2:
        return None
    if training and batches_tracked is not None:
        batches_tracked.add_(1)
    out = torch.empty_like(z)
    status = lib.pbp_norm_cascade_sigmoid(
        z.data_ptr(), out.data_ptr(), outer, copies, channels, inner, _address(weight), _address(bias),
        running_mean.data_ptr(), running_var.data_ptr(), int(training), float(momentum), float(eps),
        None if cascade is None or cascade.numel() == 0 else cascade.data_ptr(),
        (ctypes.c_double * (2 * copies * channels))())
    _check(status, "cascade", z)
    return out


def columns_1d(x: Tensor, members: int, kernel_size: int, stride: int, padding: int,
               out_length: int) -> Optional[Tensor]:
    """`layers.split_columns`' columns of a 1-D conv (no dilation, zero padding `padding` on the left) over
    x [B, Cin, L] dealt to `members` contiguous slices of b = B // members samples: [members, Cin * k, b *
    out_length], column (c, j) of sample i's position l holding x[m * b + i, c, l * stride + j - padding] (0
    in the padding). One native pass, exactly the torch ops' values; None where it does not apply: no
    library, not float32 on the CPU, x needing a gradient (the "gd" mode), a large x with several threads,
    torch.compile tracing."""
    lib = _kernel_for((x,))
    if lib is None or x.dtype != torch.float32 or x.dim() != 3 or x.requires_grad and torch.is_grad_enabled():
        return None
    if x.numel() > SERIAL_LIMIT and torch.get_num_threads() > 1:
        return None
    batch, cin, length = x.shape
    b = batch // members
    if b < 1 or out_length < 1 or padding < 0:
        return None
    out = torch.empty(members, cin * kernel_size, b * out_length, dtype=torch.float32)
    status = lib.pbp_columns_1d(x.data_ptr(), *x.stride(), out.data_ptr(), members, b, cin, length, kernel_size,
                                stride, padding, out_length)
    _check(status, "columns", x)
    return out
