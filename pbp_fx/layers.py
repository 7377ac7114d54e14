"""Neuron-layer descriptions and M stacked copies of a layer evaluated as one wider layer.

A dendrite has the same layer type and shape as its neuron (docs/algorithm.md). K installed
dendrites, or a pool of P candidates, are therefore one Linear/Conv with K*C (P*C) outputs.
Every stacked tensor is stored as [M, C, ...]: copy first, channel second, so that a row
(m, c) is exactly the weights one copy holds for one neuron.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from . import native
from .config import ConfigError

__all__ = ["WEIGHT_HOOKS", "has_user_hooks", "own_tensor", "LayerSpec", "NormSpec", "LayerCopies", "per_position",
           "stacked_apply", "split_apply", "split_members", "runs_as_columns", "split_columns", "columns_to_stacked",
           "every_nth_position", "cascade_chain", "fold_norm", "copy_dim", "dendrite_call_sizes", "dendrite_rows", "dendrite_calls",
           "apply_dendrites", "StandIn", "conv_output_length", "conv_pads", "columns_pay"]

# Forward pre-hooks that recompute a layer's weight attribute from its parameters before each
# forward (torch.nn.utils.weight_norm, spectral_norm, prune): the fused weight is read from them.
WEIGHT_HOOKS = (WeightNorm, SpectralNorm, BasePruningMethod)


def has_user_hooks(m: nn.Module) -> bool:
    """Whether `m` has forward hooks or pre-hooks other than `WEIGHT_HOOKS`: code that a graph which
    computes `m` itself (a fused site, the direct ONNX emitter) would skip."""
    return bool(m._forward_hooks) or any(not isinstance(h, WEIGHT_HOOKS) for h in m._forward_pre_hooks.values())


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_pads(padding, kernel: tuple, dilation: tuple) -> tuple[list[int], list[int]]:
    """A conv's padding (int, tuple, "valid" or "same") as its begin and end pads per spatial dim, as nn.ConvNd
    pads (ONNX's pads are these; F.pad's list is them reversed and interleaved)."""
    nd = len(kernel)
    if padding == "valid":
        return [0] * nd, [0] * nd
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        begins = [t // 2 for t in total]  # torch puts the odd extra pixel at the end
        return begins, [t - b for t, b in zip(total, begins)]
    if isinstance(padding, int):
        padding = (padding,) * nd
    return list(padding), list(padding)


@dataclass(frozen=True)
class LayerSpec:
    """Hyper-parameters of a Linear/ConvNd neuron layer: enough to build same-shaped copies."""

    kind: str  # "linear" | "conv1d" | "conv2d" | "conv3d"
    weight_shape: tuple  # the neuron's weight: (C, in) or (C, in/groups, *kernel)
    bias: bool
    stride: tuple = ()
    padding: Union[tuple, str] = ()
    dilation: tuple = ()
    groups: int = 1
    padding_mode: str = "zeros"

    @property
    def channels(self) -> int:
        return self.weight_shape[0]

    @property
    def axis(self) -> int:
        """The neuron axis: last dim for Linear, dim 1 for convolutions."""
        return -1 if self.kind == "linear" else 1

    @property
    def params_per_copy(self) -> int:
        return math.prod(self.weight_shape) + (self.channels if self.bias else 0)

    def apply(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], groups: Optional[int] = None) -> Tensor:
        """The layer on x; `groups` overrides the conv's own (split_apply runs copies as groups)."""
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        conv = _CONV[int(self.kind[-2])]
        groups = self.groups if groups is None else groups
        if max(self.stride) > 1 and not x.is_contiguous() and self._unpadded_pointwise():
            # torch 2.13's oneDNN weight gradient of a strided 1x1 conv over a channels_last input corrupted the
            # heap (one thread; the candidates' stride makes such convs). Its positions, then an unstrided conv:
            # the same output.
            x = x[(Ellipsis, *(slice(None, None, t) for t in self.stride))]
            return conv(x, weight, bias, 1, 0, 1, groups)
        if self.padding_mode != "zeros":
            # Same as nn.ConvNd: explicit padding with the mode, then an unpadded conv.
            x = F.pad(x, self._reversed_padding(), mode=self.padding_mode)
            return conv(x, weight, bias, self.stride, 0, self.dilation, groups)
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def every_nth(self, n: int) -> Optional["LayerSpec"]:
        """A layer whose output is this one's at every n-th position of each spatial dim
        (`every_nth_position` of it) and costs about 1/n^d of it; None when no such conv exists
        (asymmetric "same" padding). A Linear reads its positions from its input: itself."""
        if n == 1 or self.kind == "linear":
            return self
        stride = tuple(n * t for t in self.stride)
        if self.padding_mode != "zeros":  # (apply pads explicitly with the mode: the stride is all that changes)
            return dataclasses.replace(self, stride=stride)
        pad = self._reversed_padding()
        left, right = pad[0::2], pad[1::2]
        if left != right:  # an even kernel's "same": torch's strided convs pad both sides alike
            return None
        # Output position o of a conv with stride n * t is position n * o of the stride-t conv.
        return dataclasses.replace(self, stride=stride, padding=tuple(reversed(left)))

    def _unpadded_pointwise(self) -> bool:
        """A conv whose kernel is 1 everywhere and that pads nothing."""
        kernel = self.weight_shape[2:]
        begins, ends = conv_pads(self.padding, kernel, self.dilation)
        return all(k == 1 for k in kernel) and not any(begins) and not any(ends)

    def _reversed_padding(self) -> list:
        """F.pad's [last dim left, right, ...] list, as nn.ConvNd computes it (also for "same"/"valid")."""
        begins, ends = conv_pads(self.padding, self.weight_shape[2:], self.dilation)
        return [p for b, e in reversed(list(zip(begins, ends))) for p in (b, e)]

    @staticmethod
    def from_module(m: nn.Module) -> "LayerSpec":
        if isinstance(m, nn.Linear):
            return LayerSpec("linear", tuple(m.weight.shape), m.bias is not None)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return LayerSpec(
                f"conv{len(m.kernel_size)}d", tuple(m.weight.shape), m.bias is not None,
                tuple(m.stride), m.padding if isinstance(m.padding, str) else tuple(m.padding),
                tuple(m.dilation), m.groups, m.padding_mode)
        raise TypeError(f"not a neuron layer: {type(m).__name__}")


@dataclass(frozen=True)
class NormSpec:
    """A per-channel affine norm that joins a site (BatchNorm with running statistics)."""

    eps: float = 1e-5
    momentum: Optional[float] = 0.1
    affine: bool = True

    @staticmethod
    def from_module(m: nn.Module) -> "NormSpec":
        return NormSpec(m.eps, m.momentum, m.affine)


def copy_dim(axis: int) -> int:
    """Where the copy index sits in a stacked output: [B, M, C, *S] or [..., M, C]."""
    return 1 if axis == 1 else -2


def channel_view(t: Tensor, ndim: int, axis: int) -> Tensor:
    """Shape a [..., C] tensor to broadcast along the neuron axis of an ndim-d activation."""
    if axis == 1:
        return t.reshape(*t.shape, *([1] * (ndim - 2)))
    return t


# Spatial positions below which per_position materialises (a few SIMD vectors' worth).
SHORT_INNER_LOOP = 32


def per_position(t: Tensor, like: Tensor, axis: int) -> Tensor:
    """A per-channel tensor [..., C] shaped to broadcast against `like` ([B, ..., C, *S] for
    axis 1, [..., C] for axis -1).

    With few spatial positions (fewer than SHORT_INNER_LOOP), t is materialised as
    [..., C, *S] so that it broadcasts over the batch dim only: on the CPU, broadcasting a
    stride-0 innermost dim of a few elements runs element by element (measured 2-4x slower for
    S of 4 to 19 elements, no difference at 64), and so do the reductions for t's gradient.
    """
    spatial = like.shape[1 + t.dim():] if axis == 1 else ()
    if not spatial:
        return t
    view = t.reshape(*t.shape, *([1] * len(spatial)))
    if math.prod(spatial) >= SHORT_INNER_LOOP:
        return view
    return view.expand(*t.shape, *spatial).contiguous()


def stacked_apply(layer: LayerSpec, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Run M copies ([M, C, ...] weights) on x; returns [B, M, C, *S] or [..., M, C].

    Ungrouped layers run as one layer of M*C outputs. Grouped convs run one call per copy,
    stacked: one call would give each group M x its outputs (a channel multiplier), which is off
    the fast depthwise kernels (MobileNetV2's depthwise shapes, CPU, forward + backward: 1.4-10x
    slower than M calls; its neuron-phase step at K = 2 is 15 % faster this way). The fused layout
    (`dendrite_call_sizes`) runs them per copy for the same reason.
    """
    m, c = weight.shape[:2]
    if layer.groups > 1:
        return torch.stack([layer.apply(x, weight[k], None if bias is None else bias[k]) for k in range(m)], 1)
    z = layer.apply(x, weight.reshape(m * c, *weight.shape[2:]), None if bias is None else bias.reshape(m * c))
    return z.unflatten(1, (m, c)) if layer.axis == 1 else z.unflatten(-1, (m, c))


def cascade_chain(pre: Tensor, cascade: Optional[Tensor], phi: Callable[[Tensor], Tensor], axis: int) -> list[Tensor]:
    """a_k = pre_k + sum_{j<k} U[k, :, j] * s_j, s_k = phi(a_k); returns [s_0 .. s_{K-1}] (pre stacked:
    [B, K, C, *S] or [..., K, C]).

    addcmul: one pass over the activation instead of a Mul and an Add (the small ResNet's neuron-phase
    step, two interleaved A/B runs: 1-8 % faster at K = 1-3, never slower)."""
    cd = copy_dim(axis)
    acts: list[Tensor] = []
    for k in range(pre.shape[cd]):
        a = pre.select(cd, k)
        for j in range(k):
            a = torch.addcmul(a, channel_view(cascade[k, :, j], a.dim(), axis), acts[j])
        acts.append(phi(a))
    return acts


def every_nth_position(t: Tensor, n: int, axis: int) -> Tensor:
    """Every n-th position of each spatial or token dim (a view): [B, C, *S] (axis 1) or
    [B, *mid, C] (axis -1); the batch and the neuron axis stay whole."""
    if n == 1:
        return t
    step = slice(None, None, n)
    if axis == 1:
        return t[(slice(None), slice(None)) + (step,) * (t.dim() - 2)]
    return t[(slice(None),) + (step,) * (t.dim() - 2)]


def split_members(t: Tensor, m: int, axis: int) -> Tensor:
    """Deal a batch [B, ...] to M copies: copy p gets the p-th contiguous B // M samples.

    Returns the stacked layout with B // M samples: [B//M, M, C, *S] (axis 1) or
    [B//M, *mid, M, C] (last axis); a remainder of B mod M samples is left out. Contiguous,
    so that R ranks fed by a DistributedSampler (rank r reads samples r, r+R, ...) deal
    their batches exactly as one process deals the global batch, when B // R is a multiple of M.
    """
    t = _members_first(t, m)
    return t.movedim(0, 1) if axis == 1 else t.movedim(0, -2)


def _members_first(t: Tensor, m: int) -> Tensor:
    """[B, ...] -> [M, B // M, ...] (a view): copy p's contiguous slice at index p."""
    b = t.shape[0] // m
    if b * m != t.shape[0]:  # (narrow only when needed: each op is a dispatch per site and step)
        t = t.narrow(0, 0, b * m)
    return t.unflatten(0, (m, b))


# A split pool runs an ungrouped 2-D conv on the CPU as columns and one bmm where each member's output positions
# (samples x spatial positions: the weight gradient's reduction) times WIDE_COLUMNS are at most a column's width
# (input channels x kernel positions). Measured (forward and weight gradient, 1 thread, oneDNN's grouped conv
# against the bmm, bench/results/columns_2d.md): the columns took 0.32-0.49 of the grouped conv's time at 8-32
# positions and 2304-4608 wide, 0.87-0.97 at 64-128 positions and 1152-2304 wide; with narrower columns or more
# positions they lost (1.06-1.4 at 64-128 positions, 1.7-3.6 from 400 up) or came out even at 32.
WIDE_COLUMNS = 16


def runs_as_columns(layer: LayerSpec, x: Optional[Tensor] = None, members: int = 1) -> bool:
    """Whether split_apply runs the copies as one batched matmul over each copy's input columns
    (`split_columns`): ungrouped 1-D convs and convs whose kernel is 1 everywhere, zero padding,
    no dilation. Their columns are views or strided slices of the input (no k x copy), and one
    bmm measured faster than the grouped conv it replaces, with the copies' BatchNorm then
    running over contiguous positions (MNIST-1D CNN shapes, CPU, 1 thread, candidate conv + norm
    + sigmoid forward and backward: 0.5-0.8 of the time; bench/results/train_overhead_stop22.md).
    Other 2-D convs would copy k x their input: they stay grouped convs, but where x (on the CPU, dealt to
    `members`) makes the columns pay (`columns_pay`)."""
    if layer.kind == "linear" or layer.groups != 1 or layer.padding_mode != "zeros":
        return False
    if all(d == 1 for d in layer.dilation) and (layer.kind == "conv1d" or all(k == 1 for k in layer.weight_shape[2:])):
        return True
    return (layer.kind == "conv2d" and x is not None and x.device.type == "cpu" and x.dim() == 4
            and columns_pay(layer, x, members))


def columns_pay(layer: LayerSpec, x: Tensor, members: int) -> bool:
    """Whether an ungrouped 2-D conv on x, dealt to `members`, runs faster as columns and one bmm than as the
    grouped conv: few output positions a member for its columns' width (WIDE_COLUMNS)."""
    width, samples = math.prod(layer.weight_shape[1:]), x.shape[0] // members
    if samples * WIDE_COLUMNS > width:  # (at least one position a sample: the output size need not be worked out)
        return False
    return samples * math.prod(_conv_out_size(layer, tuple(x.shape[2:]))) * WIDE_COLUMNS <= width


def conv_output_length(n, before, after, kernel: int, dilation: int, stride: int):
    """A conv's output length along one spatial dim of input length n (an int or a symbolic one) padded by
    `before` and `after`."""
    return (n + before + after - dilation * (kernel - 1) - 1) // stride + 1


def _conv_out_size(layer: LayerSpec, size: tuple) -> tuple:
    """A conv's output spatial size for input spatial `size` (zero padding)."""
    pad = layer._reversed_padding()
    nd = len(size)
    return tuple(conv_output_length(n, pad[2 * (nd - 1 - i)], pad[2 * (nd - 1 - i) + 1], layer.weight_shape[2 + i],
                                    layer.dilation[i], layer.stride[i]) for i, n in enumerate(size))


def split_columns(layer: LayerSpec, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, tuple]:
    """split_apply's result for a `runs_as_columns` layer as [M, C, N], N = (B // M) x positions
    (copy p's samples in order, each with its positions), and the output's spatial shape."""
    m, c = weight.shape[:2]
    cols, spatial = _columns(layer, x, m)  # [M, Cin * k, b * positions]
    w = weight.reshape(m, c, -1)
    z = torch.bmm(w, cols) if bias is None else torch.baddbmm(bias.unsqueeze(-1), w, cols)
    return z, spatial


def _columns(layer: LayerSpec, x: Tensor, m: int) -> tuple[Tensor, tuple]:
    """split_columns' input columns [M, Cin * k, b * positions] and the output's spatial shape: a 1-D conv's
    as one native pass where it applies (`native.columns_1d`), else views of x copied once (twice with
    padding)."""
    pad = layer._reversed_padding()
    kernel = layer.weight_shape[2:]
    if layer.kind == "conv2d" and (any(k != 1 for k in kernel) or any(d != 1 for d in layer.dilation)):
        # (F.unfold pads both sides alike: an even kernel's "same" padding goes first)
        even = pad[0::2] == pad[1::2]
        if x.shape[0] % m:  # (the samples no member sees: no columns)
            x = x.narrow(0, 0, x.shape[0] // m * m)
        cols = F.unfold(x if even else F.pad(x, pad), kernel, layer.dilation, tuple(pad[2::-2]) if even else 0,
                        layer.stride)  # [B, Cin * kh * kw, positions]
        spatial = _conv_out_size(layer, tuple(x.shape[2:]))
        cols = _members_first(cols, m).transpose(1, 2)  # [M, Cin * kh * kw, b, positions]
        return cols.reshape(m, cols.shape[1], -1), spatial
    if layer.kind == "conv1d":
        spatial = _conv_out_size(layer, (x.shape[-1],))
        cols = native.columns_1d(x, m, kernel[0], layer.stride[0], pad[0], spatial[0])
        if cols is not None:
            return cols, spatial
    xm = _members_first(x, m)  # [M, b, Cin, *S]
    if any(pad):
        xm = F.pad(xm, pad)
    if layer.kind == "conv1d" and kernel[0] != 1:
        cols = xm.unfold(-1, kernel[0], layer.stride[0])  # [M, b, Cin, Lout, k]
        spatial = (cols.shape[3],)
        cols = cols.permute(0, 2, 4, 1, 3)  # [M, Cin, k, b, Lout]
    else:  # a kernel of 1 everywhere: the columns are the strided positions themselves
        cols = xm[(slice(None),) * 3 + tuple(slice(None, None, t) for t in layer.stride)]
        spatial = tuple(cols.shape[3:])
        cols = cols.transpose(1, 2)  # [M, Cin, b, *S]
    return cols.reshape(m, -1, cols.shape[-len(spatial) - 1:].numel()), spatial


def columns_to_stacked(z: Tensor, spatial: tuple) -> Tensor:
    """[M, C, b * positions] (split_columns) as the stacked layout [b, M, C, *S] (a view)."""
    m, c, n = z.shape
    return z.view(m, c, n // math.prod(spatial), *spatial).movedim(2, 0)


def split_apply(layer: LayerSpec, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """M copies ([M, C, ...] weights), each on its own 1/M of the batch (split_members).

    Costs one copy's work over the whole batch instead of M copies' (stacked_apply): convs
    run as one conv with M x groups over the copies' slices side by side in the channels, or
    as one batched matmul (`runs_as_columns`).
    """
    m, c = weight.shape[:2]
    if runs_as_columns(layer, x, m):
        return columns_to_stacked(*split_columns(layer, x, weight, bias))
    if layer.kind == "linear":  # one bmm: [M, b * mid, in] x [M, in, C] (einsum took ~16 ops)
        xm = _members_first(x, m)
        flat = xm.reshape(m, -1, xm.shape[-1])
        wt = weight.transpose(1, 2)
        z = torch.bmm(flat, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), flat, wt)
        return z.view(m, *xm.shape[1:-1], c).movedim(0, -2)
    xs = split_members(x, m, layer.axis)
    z = layer.apply(xs.flatten(1, 2), weight.reshape(m * c, *weight.shape[2:]),
                    None if bias is None else bias.reshape(m * c), groups=m * layer.groups)
    return z.unflatten(1, (m, c))


def dendrite_call_sizes(kind: str, groups: int, dendrites: int) -> list[int]:
    """How a fused site runs its K dendrites: the number of copies in each layer call.

    One call per copy, each shaped like the neuron's layer, except for ungrouped 1-D/3-D convs,
    which run all K copies as ONE call with K*C outputs, rows (copy, channel). Why (ONNX Runtime
    CPU profiles, bench/results/latency.md): the runtime's blocked NCHWc layout exists for 2-D
    convs only; there, separate calls let it fuse each copy's cascade Add and sigmoid into its
    Conv and keep the whole site blocked, while one wide call needs a Split, which is no NCHWc
    op, so the tail ran in NCHW between reorders. Linear layers also measured faster per copy. A
    1-D/3-D conv runs im2col once per call, so one wide call (and a Split) is cheaper there.
    Grouped convs always run per copy: one call would multiply each group's outputs by K
    (channel multiplier K, off the fast depthwise kernels) and interleave the copies.
    """
    if kind in ("conv1d", "conv3d") and groups == 1:
        return [dendrites]
    return [1] * dendrites


def dendrite_rows(kind: str, groups: int, dendrites: int, channels: int, copy: int) -> tuple[int, slice]:
    """(the layer call of `dendrite_calls`, its output rows) that compute dendrite `copy`."""
    start = 0
    for call, size in enumerate(dendrite_call_sizes(kind, groups, dendrites)):
        if copy < start + size:
            offset = (copy - start) * channels
            return call, slice(offset, offset + channels)
        start += size
    raise IndexError(f"dendrite {copy} of {dendrites}")


def dendrite_calls(layer: LayerSpec, weight: Tensor, bias: Optional[Tensor]) -> list[tuple[Tensor, Optional[Tensor]]]:
    """The (weight, bias) of each layer call of `dendrite_call_sizes`, from [K, C, ...] rows.

    This is the fused layout shared by FusedSite, finalize and the ONNX exporter: call i's
    weight is [k_i * C, ...] with rows (copy, channel), its bias [k_i * C] (or None).
    """
    k, c = weight.shape[:2]
    calls, start = [], 0
    for size in dendrite_call_sizes(layer.kind, layer.groups, k):
        rows = slice(start, start + size)
        calls.append((weight[rows].reshape(size * c, *weight.shape[2:]),
                      None if bias is None else bias[rows].reshape(size * c)))
        start += size
    return calls


def apply_dendrites(layer: LayerSpec, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The K dendrites' pre-activations [B, K, C, *S] or [..., K, C] through `dendrite_calls`."""
    c = weight.shape[1]
    outs = [layer.apply(x, w, b) for w, b in dendrite_calls(layer, weight, bias)]
    outs = [z.unflatten(layer.axis, (z.shape[layer.axis] // c, c)) for z in outs]
    return outs[0] if len(outs) == 1 else torch.cat(outs, copy_dim(layer.axis))


def fold_norm(weight: Tensor, bias: Optional[Tensor], mean: Tensor, var: Tensor,
              gamma: Optional[Tensor], beta: Optional[Tensor], eps: float):
    """Fold an eval-mode BatchNorm into the preceding layer; rows are [..., C] aligned."""
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = scale * gamma
    b = -mean if bias is None else bias - mean
    b = b * scale + (0 if beta is None else beta)
    w = weight * scale.reshape(*scale.shape, *([1] * (weight.dim() - scale.dim())))
    return w, b


def own_tensor(module: nn.Module, name: str) -> Optional[Tensor]:
    """module.<name> for a parameter or buffer of its own, read from its dicts: through Module.__getattr__ a
    read took ~1 us, and the candidates' rows and statistics are read for every site and step. Anything else
    (a parametrized tensor is a property; a plain attribute, or None) by getattr."""
    params, buffers = module._parameters, module._buffers
    return params[name] if name in params else buffers[name] if name in buffers else getattr(module, name, None)


# LayerCopies' tensors whose leading dims are [M, C] (row_tensors), in this order.
ROW_NAMES = ("weight", "bias", "norm_weight", "norm_bias", "running_mean", "running_var")


class LayerCopies(nn.Module):
    """M copies of a neuron layer (and its BatchNorm, training form) as one wider layer."""

    def __init__(self, layer: LayerSpec, norm: Optional[NormSpec], copies: int,
                 device=None, dtype=None):
        super().__init__()
        self.layer, self.norm = layer, norm
        fk = {"device": device, "dtype": dtype}
        c = layer.channels
        self.weight = nn.Parameter(torch.empty(copies, *layer.weight_shape, **fk))
        self.bias = nn.Parameter(torch.zeros(copies, c, **fk)) if layer.bias else None
        self.norm_weight = self.norm_bias = None
        if norm is not None:
            if norm.affine:
                self.norm_weight = nn.Parameter(torch.ones(copies, c, **fk))
                self.norm_bias = nn.Parameter(torch.zeros(copies, c, **fk))
            self.register_buffer("running_mean", torch.zeros(copies, c, **fk))
            self.register_buffer("running_var", torch.ones(copies, c, **fk))
            self.register_buffer("num_batches_tracked", torch.tensor(0, device=device))

    @property
    def copies(self) -> int:
        return self.weight.shape[0]

    def row_tensors(self) -> dict[str, Tensor]:
        """Every tensor whose leading dims are [M, C], by attribute name."""
        rows = {}
        for n in ROW_NAMES:
            t = own_tensor(self, n)
            if t is not None:
                rows[n] = t
        return rows

    def reset_parameters(self, init: str = "default", scale: float = 1.0,
                         generator: Optional[torch.Generator] = None) -> None:
        """init: "default" (the layer type's own init), "kaiming" (N(0, 2/fan_in)), "normal" (N(0, 0.01^2)).

        generator: a CPU generator to draw from (None: torch's global one); the values are drawn
        on the CPU and copied, so they do not depend on the device."""
        if init not in ("default", "kaiming", "normal"):
            raise ConfigError(f"unknown init {init!r}: use 'default', 'kaiming' or 'normal'")
        with torch.no_grad():
            fan_in = math.prod(self.layer.weight_shape[1:])
            drawn = torch.empty(self.weight.shape, dtype=torch.float32)
            if init == "default":  # kaiming_uniform_(a=sqrt(5)) on each copy: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                bound = 1 / math.sqrt(fan_in)
                drawn.uniform_(-bound, bound, generator=generator)
            else:
                drawn.normal_(0.0, math.sqrt(2.0 / fan_in) if init == "kaiming" else 0.01, generator=generator)
            self.weight.copy_(drawn.mul_(scale))
            if self.bias is not None:
                if init == "default":
                    bound = 1 / math.sqrt(fan_in)
                    self.bias.copy_(torch.empty(self.bias.shape).uniform_(-bound, bound, generator=generator))
                else:
                    self.bias.zero_()

    def forward(self, x: Tensor, split: bool = False, extra: Optional[Tensor] = None,
                activation: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
        """Every copy on the whole batch, or with split=True each on its own 1/M (split_apply), in the
        stacked layout; then `extra` (that layout) added after the norm and `activation` applied."""
        return self.activate(self.layer_output(x, split), extra, activation)

    def layer_output(self, x: Tensor, split: bool = False) -> Tensor:
        """The copies' layer on x (split: each copy on its own 1/M of the batch), in the stacked layout."""
        return (split_apply if split else stacked_apply)(self.layer, x, self.weight, self.bias)

    def native_norm(self, z: Tensor, extra: Optional[Tensor]) -> Optional[tuple]:
        """`native.norm_sigmoid_arguments` for sigmoid(norm(z) + extra) where its kernels run it (a norm in
        training form, float32 on the CPU), the norm's batch counted; None elsewhere (nothing counted)."""
        if self.norm is None or not self._norm_trains_on(z):
            return None
        return native.norm_sigmoid_arguments(z, extra, self.norm_weight, self.norm_bias, self.running_mean,
                                             self.running_var, self._momentum(counted=1), self.norm.eps,
                                             copy_dim(self.layer.axis), self.num_batches_tracked)

    def activate(self, z: Tensor, extra: Optional[Tensor] = None,
                 activation: Optional[Callable[[Tensor], Tensor]] = None, native_tried: bool = False) -> Tensor:
        """activation(norm(z) + extra) for the layer output z (`layer_output`). A sigmoid after a norm in
        training form runs with the norm as native calls where they apply (`native_norm`; native_tried: the
        caller found they do not)."""
        if activation is torch.sigmoid and not native_tried:
            args = self.native_norm(z, extra)
            if args is not None:
                return native.norm_sigmoid_apply(args)
        if self.norm is not None:
            z = self._normed_stacked(z)
        if extra is not None:
            z = z + extra
        return z if activation is None else activation(z)

    def cascade_activations(self, x: Tensor, cascade: Optional[Tensor],
                            activation: Callable[[Tensor], Tensor]) -> list[Tensor]:
        """Every copy k's activation on the whole batch, s_k = activation(norm(layer_k(x)) + sum_{j<k}
        cascade[k, :, j] * s_j) (installed dendrites; cascade [K, C, K]), each [B, C, *S] or [..., C].

        A sigmoid after a norm, where nothing needs a gradient through them (frozen dendrites behind a
        stop-gradient), runs with the norm and the cascade as one native call where it applies
        (`native.norm_cascade_sigmoid`: float32 on the CPU)."""
        z = stacked_apply(self.layer, x, self.weight, self.bias)
        if self.norm is not None and activation is torch.sigmoid:
            out = native.norm_cascade_sigmoid(z, cascade, self.norm_weight, self.norm_bias, self.running_mean,
                                              self.running_var, self.training,
                                              self._momentum(counted=1) if self.training else 0.0, self.norm.eps,
                                              self.layer.axis, self.num_batches_tracked)
            if out is not None:
                return list(out.unbind(copy_dim(self.layer.axis)))
        if self.norm is not None:
            z = self._normed_stacked(z)
        return cascade_chain(z, cascade, activation, self.layer.axis)

    def _momentum(self, counted: int = 0) -> float:
        """The norm's running-statistics momentum for a training batch, once `counted` more batches are
        tracked (nn.BatchNorm's bookkeeping: momentum None means a cumulative average)."""
        if self.norm.momentum is not None:
            return self.norm.momentum
        return 1.0 / float(int(self.num_batches_tracked) + counted)

    def _normed_stacked(self, z: Tensor) -> Tensor:
        """The copies' BatchNorm on the stacked layout ([B, M, C, *S] or [..., M, C])."""
        m, c = self.weight.shape[:2]
        if self.layer.axis == 1:
            copies_first = z.movedim(0, 2)  # [M, C, B, *S]
            if copies_first.is_contiguous():  # (split_columns' layout: each (copy, channel) over contiguous positions)
                flat = copies_first.view(m, c, -1)
                return columns_to_stacked(self._normed(flat.view(1, m * c, -1)).view(flat.shape), z.shape[3:])
            return self._normed(z.flatten(1, 2)).unflatten(1, (m, c))
        return self._normed(z.flatten(-2, -1)).unflatten(-1, (m, c))

    def _norm_trains_on(self, z: Tensor) -> bool:
        """Whether the copies' norm takes z's batch statistics: in training form, with more than one value per
        (copy, channel). One value (a batch of one sample where the candidate stride leaves one position, or
        none) is normalised by the running statistics, which it leaves as they were, as torch's BatchNorm
        cannot train on it; the covariance tap says that such a batch adds nothing to the correlations."""
        m, c = self.weight.shape[:2]
        return self.training and z.numel() > m * c

    def _normed(self, flat: Tensor) -> Tensor:
        """The copies' BatchNorm on an input whose channel dim holds (copy, channel) rows."""
        m, c = self.weight.shape[:2]
        momentum, trains = 0.0, self._norm_trains_on(flat)
        if trains:
            self.num_batches_tracked.add_(1)
            momentum = self._momentum()
        # torch 2.13's CPU batch_norm backward gave a batch of one sample a wrong input gradient where its input
        # and gradient differ in layout (a channels_last view of the stacked copies against a dense one): both
        # dense there.
        dense = flat.shape[0] == 1 and not flat.is_contiguous()
        out = F.batch_norm(
            flat.contiguous() if dense else flat, self.running_mean.view(m * c), self.running_var.view(m * c),
            None if self.norm_weight is None else self.norm_weight.reshape(m * c),
            None if self.norm_bias is None else self.norm_bias.reshape(m * c),
            trains, momentum, self.norm.eps)
        if dense and out.requires_grad:
            out.register_hook(Tensor.contiguous)
        return out

    def folded(self) -> tuple[Tensor, Optional[Tensor]]:
        """Eval-form weights [M, C, ...] and bias [M, C] with the norm folded in."""
        w, b = self.weight.detach(), None if self.bias is None else self.bias.detach()
        if self.norm is None:
            return w.clone(), None if b is None else b.clone()
        return fold_norm(w, b, self.running_mean, self.running_var,
                         None if self.norm_weight is None else self.norm_weight.detach(),
                         None if self.norm_bias is None else self.norm_bias.detach(), self.norm.eps)

    def extra_repr(self) -> str:
        return f"{self.layer.kind}, copies={self.copies}, channels={self.layer.channels}, norm={self.norm is not None}"


def cat_rows(layer: LayerSpec, norm: Optional[NormSpec], parts: list[dict[str, Tensor]],
             requires_grad: bool, device=None, dtype=None) -> LayerCopies:
    """A new LayerCopies whose rows are the given row dicts concatenated along M."""
    total = sum(p["weight"].shape[0] for p in parts)
    out = LayerCopies(layer, norm, total, device=device, dtype=dtype)
    with torch.no_grad():
        for name, t in out.row_tensors().items():
            t.copy_(torch.cat([p[name].to(t) for p in parts], 0))
    for p in out.parameters():
        p.requires_grad_(requires_grad)
    return out


class StandIn:
    """Mixin of a module standing in for a layer (a swapped-in site, a traced part, a finalized
    one): an attribute it lacks is the layer's, as code around it reads them (`self.qk.weight
    .device`, `out_features`). Private names and torch's parametrization record stay its own
    (`is_parametrized` would read the layer's, then fail to remove it). `stand_in_for`: the
    submodule, or plain attribute, holding the layer; a plain one follows `.to()` and `.double()`."""

    stand_in_for = "neuron"

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        missing = AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        held = self.__dict__  # (not getattr: an object being unpickled has no attributes yet)
        layer = held.get(self.stand_in_for, held.get("_modules", {}).get(self.stand_in_for))
        if layer is None or name == self.stand_in_for or name.startswith("_") or name == "parametrizations":
            raise missing
        try:
            return getattr(layer, name)
        except AttributeError:
            raise missing from None

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        layer = self.__dict__.get(self.stand_in_for)  # (unregistered: its tensors are not the module's)
        if layer is not None:
            layer._apply(fn, *args, **kwargs)
        return out
