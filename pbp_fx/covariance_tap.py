"""The covariance tap: identity on a site's output y; in backward, delta = dL/dy trains the candidates.

docs/algorithm.md, "The dendrite phase". The candidates' gradient is that of -sum_i sign(C~_i) C_i, with
dC_i/dc_{p,i} = delta_{p,i} - mean_p delta_i, so only candidate parameters (reached through c,
whose inputs are detached) receive it; the same backward folds the batch's covariance into the
pool's statistics (EMA, best |C~|, snapshots).

Two forms, one backward (`candidate_gradient`): under torch.compile (one process) the tap is
the custom op `pbp_fx::covariance_tap` and its backward the custom op
`pbp_fx::candidate_update`, opaque to the compiler, so a compiled dendrite-phase step has no
graph break at a site and the compiled backward updates the statistics in place. Eager runs
use the autograd.Function `EagerTap`, which skips the custom ops' dispatch cost (measured:
about +25% on a dendrite-phase step of a small CNN) and can sum the statistics over the ranks
of a distributed run (a Python reducer).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from . import native
from .errors import warn_at_user
from .layers import copy_dim, every_nth_position, per_position, split_members

__all__ = ["STAT_NAMES", "StatsSettings", "batch_covariance", "fold_batch", "candidate_gradient",
           "covariance_tap", "EagerTap", "EagerNormTap"]

# The pool's statistics tensors, in the order the ops take them (CandidatePool buffers).
STAT_NAMES = ("ema", "ema_sq", "best", "steps", "batches_seen", "last_improved")

# (decay, warmup, threshold, bias_correction): plain scalars, so that the ops can take them.
StatsSettings = tuple


def batch_covariance(c: Tensor, d: Tensor, axis: int, channels: int,
                     reducer: Optional[Callable] = None) -> tuple[Tensor, Tensor]:
    """A batch's covariance C [P, C] of the candidates c with the site error d, and e.

    Both in the stacked layout of `axis` ([B, P, C, *S] for 1, [..., P, C] for -1), d with
    P members (split: each member's own slice) or 1 (every member saw every position);
    float32 at least whatever the autocast dtype. dC/dc = share * e, share = P when split (C
    is then P x the slice's covariance, in whole-batch units), else 1. In one process
    e = d - mean d. With a reducer over R ranks, each rank's d is the gradient of its own
    mean loss, R times that of DDP's objective (1/R) sum_r L_r, so the rank sums
    S_cd = sum c d / R, S_c = sum c, S_d = sum d / R and the position count n are all-reduced
    and C = S_cd - S_c * m with m = S_d / n, the global mean of d / R: the global batch's
    covariance, the same on every rank. e = d - R m is R times the exact, because DDP divides
    the summed candidate gradients by R.
    """
    # float32 at least: counts exact to 2**24 (decided in Python: torch.promote_types is a dispatch)
    acc = d.dtype if d.dtype in (torch.float32, torch.float64) else torch.float32
    if c.dtype != acc:  # (a no-op .to still costs a dispatch per site and step)
        c = c.to(acc)
    if d.dtype != acc:
        d = d.to(acc)
    cd = copy_dim(axis)
    share = d.shape[cd]  # P when split, else 1
    if reducer is None:
        n = d.numel() // (share * channels)
        e = d - per_position(sum_positions(d, axis) / n, d, axis)
        # A second pass: float32's mean of d is off by up to half a unit of d's offset, and every
        # position's c carries that error into C (relative error growing with the offset: 3e-4 at an
        # error mean 1e4 x its spread). e's own mean is at e's scale, so e is centred to its precision.
        e = e.sub_(per_position(sum_positions(e, axis) / n, e, axis))
        cov = sum_positions(c * e, axis)
        return (cov if share == 1 else cov.mul_(share)), e
    r = reducer.world_size
    p = c.shape[cd]
    # C = S_cd - S_c m cancels the error's mean out of two large sums, and float32 products c d lose
    # that mean's precision (0.03 % of C at a mean 1e4 x the error's spread). So each rank sums
    # c (d - k) about its own mean k, at d's spread, and adds S_c k back: the large terms, as every
    # sum here, in float64 (one collective: a second centring pass would need a second one).
    wide = torch.float64
    s_d = sum_positions(d, axis, wide)  # [share, C]
    n = d.numel() // s_d.numel()
    k = (s_d / n).to(acc)
    s_c = sum_positions(c, axis, wide)
    d_k = d - per_position(k, d, axis)
    s_cd = sum_positions(c * d_k, axis, wide) + s_c * k
    sums = reducer(torch.cat([s_cd.reshape(-1) / r, s_c.reshape(-1), s_d.reshape(-1) / r, s_d.new_full((1,), n)]))
    s_cd, s_c, s_d, n = sums.split([p * channels, p * channels, share * channels, 1])
    m = s_d.view(share, channels) / n
    cov = s_cd.view(p, channels) - s_c.view(p, channels) * m
    # e = d - R m, taken from d - k: R m - k is at the error's spread, so e keeps float32 precision too
    return (cov * share).to(acc), d_k.sub_(per_position((r * m - k).to(acc), d, axis))


def sum_positions(t: Tensor, axis: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Sum over every position: [B, M, C, *S] (axis 1) or [..., M, C] (axis -1) -> [M, C], in `dtype`
    (default t's).

    The batch dim first, then the small rest: on the CPU one reduction over dims (0, 3, ...)
    measured 3-4x slower than the two (an outer-dim sum runs vectorised over M * C * S).
    """
    if axis == 1:
        copies_first = t.movedim(0, 2)  # [M, C, B, *S]: contiguous in split_columns' layout
        if copies_first.is_contiguous():
            return copies_first.flatten(2).sum(-1, dtype=dtype)
        s = t.sum(0, dtype=dtype)
        return s if s.dim() == 2 else s.flatten(2).sum(-1)
    return t.sum(list(range(t.dim() - 2)), dtype=dtype)


def fold_batch(stats: list[Tensor], snapshots: list[Tensor], rows: list[Tensor], cov: Tensor,
               settings: StatsSettings, new: Union[bool, Tensor, None] = None,
               host: Optional[bool] = None) -> Optional[Tensor]:
    """Fold one batch's covariance [P, C] into the statistics (in place); returns sign(ema), or None
    for a batch skipped as not finite when deciding in Python (`host`).

    new: a bool (or bool tensor), False when this batch was counted already (a retained graph's second
    backward): then nothing changes. A batch with an inf/NaN covariance (a step GradScaler
    skips) is seen but not counted. host: decide in Python (default: on the CPU). With bias
    correction, ema is the decay-weighted mean of the batches counted so far (the first gets
    weight 1, not the decay's 0.01); without, it starts from 0. After the warm-up (counted batches), each
    (member, channel) whose |ema| beats its best by the threshold snapshots its row of
    weights. Off the CPU, tensor ops only: no host sync.
    """
    ema, ema_sq, best, steps, seen, last_improved = stats
    decay, warmup, threshold, bias_correction = settings
    # On the CPU host reads are free: the scalar bookkeeping (counted already? finite? warm?)
    # runs in Python there, which saves a dozen small ops per site and step. Elsewhere the
    # same decisions are masks, so that the device never waits for the host.
    if host if host is not None else cov.device.type == "cpu":
        if new is not None and not bool(new):
            return torch.sign(ema)
        seen.add_(1)
        # One reduction and one read instead of isfinite's five ops: a NaN or inf entry makes the
        # float64 sum non-finite, and float32 entries cannot overflow it.
        if not math.isfinite(float(cov.sum(dtype=torch.float64))):
            return None
        steps.add_(1)
        # Counted batches, not seen ones: a skipped batch must not age the average (its weight
        # would go to the zero start) nor count towards the warm-up.
        n = int(steps)
        w = (1.0 - decay) / (1.0 - decay ** n) if bias_correction else 1.0 - decay
        if cov.dtype != ema.dtype:
            cov = cov.to(ema.dtype)
        ema_sq.lerp_(cov * cov, w)
        ema.lerp_(cov, w)
        if n <= warmup:
            return torch.sign(ema)
        score = ema.abs()
        improved = score > best * (1.0 + threshold)
        if bool(improved.any()):
            _snapshot(best, score, improved, snapshots, rows)
            last_improved.copy_(steps)
        return torch.sign(ema)
    new = torch.ones((), dtype=torch.bool, device=cov.device) if new is None else new
    seen.add_(new)
    finite = torch.isfinite(cov).all() & new
    steps.add_(finite)
    if bias_correction:
        # steps >= 1 in the weight: a batch before any counted one (steps 0) must change nothing, not NaN
        w = ((1.0 - decay) / (1.0 - torch.pow(decay, steps.clamp(min=1).double()))).to(ema.dtype)
    else:
        w = 1.0 - decay
    cov = cov.to(ema.dtype)
    ema_sq.lerp_(torch.where(finite, cov * cov, ema_sq), w)  # NaN-free: a skipped batch changes nothing
    ema.lerp_(torch.where(finite, cov, ema), w)
    score = ema.abs()
    improved = (score > best * (1.0 + threshold)) & (steps > warmup) & new
    any_improved = improved.any()
    _snapshot(best, score, improved, snapshots, rows)
    last_improved.copy_(torch.where(any_improved, steps, last_improved))
    return torch.sign(ema)


def _snapshot(best: Tensor, score: Tensor, improved: Tensor, snapshots: list[Tensor], rows: list[Tensor]) -> None:
    """best and the snapshot rows take the current values where `improved` [P, C]."""
    mask = improved.to(best.dtype)
    best.lerp_(score, mask)  # weight 0 or 1: exact
    pairs = [(snap, row) for snap, row in zip(snapshots, rows) if row.numel()]
    if not pairs:
        return
    # One weight per (dtype, ndim), not per row: each view or cast is a dispatch per site and step.
    weights: dict[tuple, Tensor] = {(best.dtype, 2): mask}
    for _, row in pairs:
        key = (row.dtype, row.dim())
        if key not in weights:
            w = mask if row.dtype == best.dtype else improved.to(row.dtype)
            weights[key] = w.view(*mask.shape, *([1] * (row.dim() - 2)))
    # One foreach call for all rows (a pool has up to seven row tensors); no_grad instead of a
    # detach per row (rows are the candidates' parameters).
    with torch.no_grad():
        torch._foreach_lerp_([s for s, _ in pairs], [r for _, r in pairs],
                             [weights[(r.dtype, r.dim())] for _, r in pairs])


def candidate_gradient(grad_y: Tensor, c: Tensor, stats: list[Tensor], snapshots: list[Tensor],
                       rows: list[Tensor], new: Union[bool, Tensor], axis: int, split: bool, stride: int,
                       scale: Optional[float], settings: StatsSettings,
                       reducer: Optional[Callable] = None,
                       prepared: Optional[native.PreparedArguments] = None) -> Tensor:
    """The candidates' gradient for one backward; `new` False: the batch was counted already.

    split: c holds each member's own slice of the batch, and delta is dealt the same way.
    stride: c holds every stride-th position (CandidatePool), and so does delta; C is then
    scaled by the positions left out (whole-batch units), and so is dC/dc.
    scale: GradScaler's loss scale (None without one), divided out of delta before the
    statistics and kept in the gradient. A second backward through the same graph (retain_graph) does
    not count the batch again. prepared: the pool's tensors' checked arguments for the native kernel.
    """
    p = c.shape[copy_dim(axis)]
    if c.numel() == p * stats[0].shape[1]:
        # One value per (member, channel): centred, it is 0, and so is every covariance.
        per = f"a batch dealt to a pool of {p} one sample each" if split else "a batch of 1 sample"
        # (a conv's [B', P, C, *S] or a Linear's [B', *mid, P, C]: positions where c has more than 3 dims)
        where = "with one position left by the candidate stride" if stride > 1 and c.dim() > 3 else "without positions"
        warn_at_user(f"{per} gives each candidate one value per channel at a site {where}, so that "
                     "batch adds nothing to their correlations; a last batch this small (a dataset just over a "
                     "multiple of the batch size) costs only itself, DataLoader(drop_last=True) leaves it out; if "
                     f"every batch is, the dendrite phase learns nothing: use batches of {2 * p if split else 2} "
                     "or more samples")
    with torch.no_grad():  # (instead of a detach per tensor: one dispatch each, per site and step)
        d, left_out = _dealt_error(grad_y, p, axis, split, stride)
        # One native call where it applies (a split pool in float32 on the CPU, one process, a batch seen
        # the first time): the same arithmetic without forty ops' dispatch (pbp_fx.native); it reads d's
        # view in place, or copies it
        done = (native.candidate_gradient(c, d, stats, snapshots, rows, copy_dim(axis), scale, settings, left_out,
                                          prepared)
                if split and reducer is None and new is True else None)
        if done is not None:
            counted, g = done
            return g if counted else _uncounted_gradient(c, scale)
        # e (and so the gradient into the candidates' sigmoid, norm and layer backward) takes d's
        # strides: a layout other than c's sends those kernels down slow paths.
        if d.shape == c.shape and d.stride() != c.stride():
            d = torch.empty_like(c, dtype=d.dtype).copy_(d)  # c's layout (layers.split_columns: copies first)
        elif c.is_contiguous() and not d.is_contiguous():
            d = d.contiguous()
        cov, e = batch_covariance(c, d if scale is None else d / scale, axis, stats[0].shape[1], reducer)
        if left_out != 1.0:
            cov.mul_(left_out)
        sign = fold_batch(stats, snapshots, rows, cov, settings, new=new)
        # A batch not counted (inf/NaN covariance) gives the candidates a zero gradient: its own would be
        # NaN, and an optimizer without a GradScaler (which skips such a step itself: it needs the NaN)
        # would take it into the candidates' weights and moments for good.
        if sign is None:
            return _uncounted_gradient(c, scale)
        # dC/dc = share * left_out * e; GradScaler's scale kept
        k = sign.mul_(-((1.0 if scale is None else scale) * (p if split else 1) * left_out))
        g = e * per_position(k, e, axis)
        if scale is None and cov.device.type != "cpu":  # (decided on the device: a mask, no host sync)
            g.masked_fill_(~torch.isfinite(cov).all(), 0.0)
    return g if g.dtype == c.dtype else g.to(c.dtype)


def _dealt_error(grad_y: Tensor, p: int, axis: int, split: bool, stride: int) -> tuple[Tensor, float]:
    """The site error as the candidates saw their input (every stride-th position; each member's own slice when
    split, else one copy for all), and the positions per position seen."""
    left_out = 1.0
    if stride != 1:
        seen = every_nth_position(grad_y, stride, axis)
        left_out = grad_y.numel() / seen.numel()
        grad_y = seen
    return (split_members(grad_y, p, axis) if split else grad_y.unsqueeze(copy_dim(axis))), left_out


def _uncounted_gradient(c: Tensor, scale: Optional[float]) -> Tensor:
    """The candidates' gradient for a batch not counted (a non-finite covariance): zero, or NaN under a
    GradScaler, which then skips the step itself."""
    return torch.zeros_like(c) if scale is None else torch.full_like(c, math.nan)


def _warn_second_backward() -> None:
    warn_at_user("a second backward through one forward of a dendrite phase (a loss of its own backward after "
                 "another, retain_graph=True, or a backward after torch.autograd.grad): the candidates' statistics "
                 "count each batch once, from its first backward, so this one's error does not reach their "
                 "correlations; where the losses can be summed, backward the sum once, (loss_a + loss_b).backward() "
                 "(a gradient penalty's autograd.grad of the loss counts the loss's own error)")


# -- one process: custom ops ----------------------------------------------------------------

@torch.library.custom_op("pbp_fx::candidate_update", mutates_args=("stats", "snapshots", "counted"))
def _candidate_update(grad_y: Tensor, c: Tensor, stats: list[Tensor], snapshots: list[Tensor],
                      rows: list[Tensor], counted: Tensor, axis: int, split: bool, stride: int,
                      scale: Optional[float],
                      decay: float, warmup: int, threshold: float, bias_correction: bool) -> Tensor:
    if counted.device.type == "cpu" and bool(counted):  # (a host read is free on the CPU only)
        _warn_second_backward()
    # Contiguous, as the fake says: compiled code is planned with the fake's strides.
    grad_c = candidate_gradient(grad_y, c, stats, snapshots, rows, ~counted, axis, split, stride, scale,
                                (decay, warmup, threshold, bias_correction))
    counted.fill_(True)
    return grad_c.contiguous()


@_candidate_update.register_fake
def _(grad_y, c, stats, snapshots, rows, counted, axis, split, stride, scale, decay, warmup, threshold,
      bias_correction):
    return c.new_empty(c.shape)


@torch.library.custom_op("pbp_fx::covariance_tap", mutates_args=())
def _covariance_tap(y: Tensor, c: Tensor, stats: list[Tensor], snapshots: list[Tensor], rows: list[Tensor],
                    axis: int, split: bool, stride: int, scale: Optional[float], decay: float, warmup: int,
                    threshold: float, bias_correction: bool) -> Tensor:
    # A copy, not a view: user graphs may modify the site output in place (ReLU(inplace)).
    return y.clone()


@_covariance_tap.register_fake
def _(y, c, stats, snapshots, rows, axis, split, stride, scale, decay, warmup, threshold, bias_correction):
    return torch.empty_like(y)  # the strides clone() gives


def _setup(ctx, inputs, output) -> None:
    y, c, stats, snapshots, rows, *options = inputs
    ctx.save_for_backward(c)
    # The statistics are ctx attributes, not saved tensors: they change in place at every
    # backward, and a saved tensor's version check would refuse a second forward's backward.
    ctx.stats, ctx.snapshots, ctx.rows, ctx.options = stats, snapshots, rows, options
    ctx.counted = torch.zeros((), dtype=torch.bool, device=y.device)


def _backward(ctx, grad_y: Tensor):
    (c,) = ctx.saved_tensors
    grad_c = _candidate_update(grad_y, c, ctx.stats, ctx.snapshots, ctx.rows, ctx.counted, *ctx.options)
    lists = tuple([None] * len(t) for t in (ctx.stats, ctx.snapshots, ctx.rows))
    return grad_y, grad_c, *lists, *([None] * len(ctx.options))


_covariance_tap.register_autograd(_backward, setup_context=_setup)


def covariance_tap(y: Tensor, c: Tensor, stats: list[Tensor], snapshots: list[Tensor], rows: list[Tensor],
                   axis: int, split: bool, stride: int, scale: Optional[float], settings: StatsSettings) -> Tensor:
    """y, unchanged (a copy); its backward trains c's candidates and updates the statistics."""
    decay, warmup, threshold, bias_correction = settings
    return _covariance_tap(y, c, stats, snapshots, rows, axis, split, int(stride), scale, float(decay), int(warmup),
                           float(threshold), bool(bias_correction))


# -- eager (and distributed): the same backward as an autograd.Function ----------------------

class EagerTap(torch.autograd.Function):
    """covariance_tap for eager runs; with a reducer, the statistics are summed over the ranks."""

    @staticmethod
    def forward(ctx, y: Tensor, c: Tensor, stats, snapshots, rows, axis, split, stride, scale, settings, reducer,
                prepared=None, unheld=False):
        ctx.save_for_backward(c)
        return _tap_forward(ctx, y, (stats, snapshots, rows, axis, split, stride, scale, settings, reducer, prepared),
                            unheld)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        (c,) = ctx.saved_tensors
        return grad_y, _tap_backward(ctx, grad_y, c), *([None] * 11)


class EagerNormTap(torch.autograd.Function):
    """EagerTap over c = sigmoid(norm(z) + extra) made inside it by `native.norm_sigmoid`'s kernels: the
    candidates' norm, sigmoid and tap as one autograd node (as two, their Python calls cost ~40 us a site and
    step). norm: `native.norm_sigmoid_arguments` after its first four; tap: EagerTap's arguments after c."""

    @staticmethod
    def forward(ctx, y: Tensor, z: Tensor, extra: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                norm: tuple, tap: tuple, unheld: bool):
        c, mean, invstd = native.norm_sigmoid_forward(z, extra, weight, bias, *norm)
        ctx.save_for_backward(z, c, weight, bias, extra, mean, invstd)
        ctx.layout, ctx.eps = norm[4], norm[3]
        return _tap_forward(ctx, y, tap, unheld)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:5]
        grads = _tap_and_norm_backward(ctx, grad_y, saved, needs)
        if grads is None:
            grad_c = _tap_backward(ctx, grad_y, saved[1])
            grads = native.norm_sigmoid_backward(grad_c, saved, ctx.layout, ctx.eps, needs)
        return grad_y, *grads, None, None, None


def _tap_and_norm_backward(ctx, grad_y: Tensor, saved: tuple, needs: tuple) -> Optional[tuple]:
    """EagerNormTap's backward as one native call (`native.candidate_norm_backward`) where it applies: a split
    pool's first backward in one process; else None."""
    stats, snapshots, rows, axis, split, stride, scale, settings, reducer, prepared = ctx.options
    # (decided before the error is dealt: a declined call would deal it a second time, every step at Linear sites)
    if (ctx.counted or not split or reducer is not None or torch.is_grad_enabled()  # (create_graph: torch ops)
            or not native.positions_innermost(ctx.layout)):
        return None
    c = saved[1]
    with torch.no_grad():
        d, left_out = _dealt_error(grad_y, c.shape[copy_dim(axis)], axis, split, stride)
    done = native.candidate_norm_backward(d, stats, snapshots, rows, scale, settings, left_out, saved, ctx.layout,
                                          needs, prepared)
    if done is None:
        return None
    ctx.counted = True
    counted, grads = done
    if counted:
        return grads
    return native.norm_sigmoid_backward(_uncounted_gradient(c, scale), saved, ctx.layout, ctx.eps, needs)


def _tap_forward(ctx, y: Tensor, options: tuple, unheld: bool) -> Tensor:
    """The eager taps' forward: y, or a copy of it (not `unheld`); options: (stats, snapshots, rows, axis, split,
    stride, scale, settings, reducer, prepared)."""
    ctx.options = options
    ctx.counted = False  # eager: a Python flag, not a device tensor (no op per site and step)
    if not unheld:
        return y.clone()
    # y itself, declared modified: an input returned as is would be a view that a later in-place op
    # (ReLU(inplace)) may not modify, and a copy cost 1-2 % of a small model's step. Only where nothing else
    # holds y (the site made it, or `Site.neuron_output_unheld`): marking a hooked layer's own output modified
    # broke a backward hook's view of it and any op that had saved it (an activation penalty in a forward hook).
    ctx.mark_dirty(y)
    return y


def _tap_backward(ctx, grad_y: Tensor, c: Tensor) -> Tensor:
    """The eager taps' candidate gradient for grad_y, the batch counted at the first backward only."""
    stats, snapshots, rows, axis, split, stride, scale, settings, reducer, prepared = ctx.options
    if ctx.counted:
        _warn_second_backward()
    grad_c = candidate_gradient(grad_y, c, stats, snapshots, rows, not ctx.counted, axis, split, stride, scale,
                                settings, reducer, prepared)
    ctx.counted = True
    return grad_c
