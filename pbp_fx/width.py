"""Build a model at a width multiplier, or at a target parameter count.

    builder = WidthBuilder.from_module(mod)        # a model file's build_model() and example_inputs()
    model = builder.build(0.25)                    # every hidden channel count x 0.25
    scaled = builder.for_params(6_000)             # ScaledModel(model, width, params), params +-5%

How a width is reached, in order:
  1. the model file's `build_model(width=...)` (its default is width 1): that wins;
  2. otherwise the model is built at width 1 and shrunk with Torch-Pruning's dependency graph,
     which keeps channel counts consistent through residual adds, concatenation, flatten,
     grouped/depthwise convs, norms and nn.MultiheadAttention (heads kept, head dims scaled).
     A wider model (width > 1) needs route 1: channels cannot be added by pruning.
A model that cannot be scaled raises WidthError naming the reason.
"""
from __future__ import annotations

import inspect
import math
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .errors import PBError, warn_at_user
from .modelfile import example_inputs, example_kwargs

__all__ = ["WidthError", "WidthBuilder", "ScaledModel", "shrink", "num_parameters", "used_parameters",
           "PARAM_TOLERANCE"]

PARAM_TOLERANCE = 0.05  # a parameter-matched model is within +-5% of its target


class WidthError(PBError, ValueError):
    """The model cannot be built at the requested width or parameter count."""


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _ReadWithoutGrad(TorchFunctionMode):
    """Records the parameters torch functions read while grad is off (a `with torch.no_grad():`
    inside forward): the autograd graph does not show them, yet the model and its file hold them."""

    def __init__(self):
        super().__init__()
        self.read: dict[int, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            for t in pytree.tree_leaves((args, kwargs)):
                if isinstance(t, nn.Parameter):
                    self.read[id(t)] = t.numel()
        return func(*args, **kwargs)


def used_parameters(model: nn.Module, example_inputs: tuple, example_kwargs: Optional[dict] = None) -> int:
    """Parameters the model's outputs depend on at the example inputs (those a forward reads under
    no_grad too), shared ones once: what a captured graph (a PerforatedModel's count) and an exported
    file hold. A module `forward` never calls is not counted. The model's buffers, flags and the RNG
    are left as they were."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]  # e.g. BatchNorm's running stats
    from .training import autograd_nodes

    used = {}
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            with _ReadWithoutGrad() as without_grad:
                out = model(*example_inputs, **(example_kwargs or {}))
            used.update(without_grad.read)
            # The autograd graph's leaves are the parameters used.
            for node in autograd_nodes([(t.grad_fn, t.output_nr) for t in _outputs(out)]).values():
                leaf = getattr(node, "variable", None)
                if isinstance(leaf, nn.Parameter):
                    used[id(leaf)] = leaf.numel()
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return sum(used.values()) if used else num_parameters(model)


def _outputs(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _outputs(v)]
    return []


# Autograd nodes of ops that sum over a channel axis (matmul forms, convs, embeddings, attention):
# the walk to the output layers stops there.
_CONTRACTS = re.compile(r"^(Addmm|Mm|Bmm|Baddbmm|Addbmm|Mv|Addmv|Dot|Vdot|Linear|Convolution\w*|Embedding\w*|"
                        r"\w*Attention\w*)Backward\d*$")


# Where A @ B's right operand is among an autograd node's inputs: the output's last dim is B's.
_RIGHT_OPERAND = {"Mm": 1, "Bmm": 1, "Addmm": 2, "Baddbmm": 2}


def _output_layers(model: nn.Module, example_inputs: tuple, example_kwargs: dict) -> list[nn.Module]:
    """Layers whose channels reach a model output with no layer between: their channels are the
    model's interface (classes, features) and must keep their size. Found by the output's
    storage (a view of a layer's output) and by walking the output's autograd graph back to the
    first layer output on each path (log_softmax, a mask, a residual sum in between)."""
    produced: dict[int, nn.Module] = {}
    made_by: dict = {}  # a layer output's grad_fn -> the layer
    kept: list = []  # the layer outputs, alive: a freed one's memory, reused by a later tensor, would match it

    def record(mod, _inputs, out) -> None:
        for t in _outputs(out):
            kept.append(t)
            produced[t.untyped_storage().data_ptr()] = mod
            if t.grad_fn is not None:
                made_by[t.grad_fn] = mod

    hooks = [m.register_forward_hook(record)
             for m in model.modules()  # (an attention module's out projection runs as a function: no hook)
             if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.MultiheadAttention))]
    try:
        with torch.enable_grad():  # (the graph is dropped with `out`: no backward runs)
            out = model(*example_inputs, **example_kwargs)
    finally:
        for h in hooks:
            h.remove()
    found = [produced[p] for p in {t.untyped_storage().data_ptr() for t in _outputs(out)} if p in produced]
    seen, todo = set(), [t.grad_fn for t in _outputs(out) if t.grad_fn is not None]
    while todo:
        fn = todo.pop()
        if fn in seen:
            continue
        seen.add(fn)
        if fn in made_by:
            found.append(made_by[fn])
            continue
        name = type(fn).__name__
        if _CONTRACTS.match(name):
            # (a product over channels: the output's channels are not the ones behind it, except
            # the right operand's of A @ B, an attention's value: followed, a weight stops there)
            right = _RIGHT_OPERAND.get(re.sub(r"Backward\d*$", "", name), 2 if "Attention" in name else None)
            if right is not None and len(fn.next_functions) > right and fn.next_functions[right][0] is not None:
                todo.append(fn.next_functions[right][0])
            continue
        todo.extend(f for f, _ in fn.next_functions if f is not None)
    return list({id(m): m for m in found}.values())


def _channel_groups(group) -> int:
    """Channels of a dependency group come in this many equal blocks (heads, conv groups,
    GroupNorm groups): a width change keeps the same fraction of every block."""
    blocks = 1
    for dep, _ in group:
        m = dep.target.module
        if isinstance(m, nn.MultiheadAttention):
            blocks = math.lcm(blocks, m.num_heads)
        elif isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups and not (m.groups == m.in_channels == m.out_channels):
            blocks = math.lcm(blocks, m.groups)
        elif isinstance(m, nn.GroupNorm):
            blocks = math.lcm(blocks, m.num_groups)
    return blocks


def _tied(model: nn.Module) -> list[list[str]]:
    """The names of each parameter the model holds under several names (tied weights)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [n for n in names.values() if len(n) > 1]


def _tie_again(model: nn.Module, names: list[str]) -> bool:
    """Tie the parameters at `names` (tied before narrowing) again: True when they are one already, or
    were narrowed alike (Torch-Pruning prunes each holder of a tied weight on its own, the same
    channels when they share a group: equal values); False when they came apart."""
    params = [model.get_parameter(n) for n in names]
    if len({id(p) for p in params}) == 1:
        return True
    first = params[0]
    if any(p.shape != first.shape or not torch.equal(p, first) for p in params[1:]):
        return False
    for name in names[1:]:
        holder, _, attr = name.rpartition(".")
        setattr(model.get_submodule(holder), attr, first)
    return True


def _fan_in(m: nn.Module) -> Optional[int]:
    if isinstance(m, nn.Linear):
        return m.in_features
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.weight.shape[1] * math.prod(m.weight.shape[2:])
    return None


def shrink(model: nn.Module, example_inputs: tuple, keep: Callable[[int, int], int],
           example_kwargs: Optional[dict] = None, advise_width_argument: bool = True) -> tuple[nn.Module, float]:
    """Remove channels from `model` in place: every dependency group of C channels in B blocks
    keeps `keep(C // B, group_index)` channels per block (the first ones: the model is at random
    init, so which channels go does not matter). Output layers keep their size. The model is
    called as model(*example_inputs, **example_kwargs). Returns the model and the fraction of the
    groups' channels kept: the width it has (rounding makes it differ from the one asked).

    Weights of layers whose fan-in shrank are rescaled by sqrt(old/new fan-in), so a default
    (fan-in scaled) initialisation keeps its variance at the new width. advise_width_argument: a WidthError
    ends with "give build_model a width argument" (False: the model has one).
    """
    import torch_pruning as tp

    kwargs = dict(example_kwargs or {})
    advice = "; give build_model a width argument" if advise_width_argument else ""
    model.eval()  # tracing must not update batch-norm statistics
    before = {m: _fan_in(m) for m in model.modules()}
    norms = {m: tuple(m.normalized_shape) for m in model.modules() if isinstance(m, nn.LayerNorm)}
    holders = {m: name for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None}
    ties = _tied(model)
    try:
        with torch.no_grad():
            shapes = [t.shape for t in _outputs(model(*example_inputs, **kwargs))]
        with warnings.catch_warnings():
            # Torch-Pruning's notes on parameters it leaves alone (a GRU's): the result is checked below
            warnings.filterwarnings("ignore", module="torch_pruning")
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs,
                                                          forward_fn=lambda m, args: m(*args, **kwargs))
        groups = list(graph.get_all_groups(ignored_layers=_output_layers(model, example_inputs, kwargs),
                                           root_module_types=(nn.modules.conv._ConvNd, nn.Linear)))
        # Layers no group reaches keep every channel (Torch-Pruning leaves a GRU/LSTM's weights whole)
        reached = {m for group in groups for item in group for m in (item.dep.source.module, item.dep.target.module)}
        unreached = {m: [p.shape for p in m.parameters(recurse=False)] for m in holders if m not in reached}
        total = remaining = 0
        for index, group in enumerate(groups):
            root = group[0].dep
            channels = graph.get_out_channels(root.target.module)
            if not channels:
                continue
            blocks = _channel_groups(group)
            size = channels // blocks
            kept = min(size, max(1, keep(size, index)))
            total, remaining = total + size * blocks, remaining + kept * blocks
            drop = [b * size + j for b in range(blocks) for j in range(kept, size)]
            if drop:
                graph.get_pruning_group(root.target.module, root.handler, drop).prune()
    except WidthError:
        raise
    except Exception as exc:  # noqa: BLE001 - Torch-Pruning's or the model's own failure
        raise WidthError(f"Torch-Pruning could not scale {type(model).__name__}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}{advice}") from exc
    untied = [names for names in ties if not _tie_again(model, names)]
    if untied:  # (an output layer tied to a hidden one keeps its size while the hidden one narrows)
        raise WidthError(f"{type(model).__name__} cannot be narrowed by removing channels: its tied weights "
                         f"({' = '.join(untied[0])}) would come apart{advice}")
    emptied = [holders[m] or type(model).__name__ for m in holders
               if any(0 in p.shape for p in m.parameters(recurse=False))]
    try:
        with torch.no_grad():
            got = [t.shape for t in _outputs(model(*example_inputs, **kwargs))]
        problem = (f"layer(s) {', '.join(emptied[:3])} lost every channel (a layer whose output is split into "
                   "parts, e.g. qkv(x).chunk(3), pruned once per part)" if emptied else
                   None if got == shapes else f"its output shapes changed from {shapes} to {got}")
    except Exception as exc:  # noqa: BLE001 - the model's forward at the new width
        problem = f"its forward raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if problem is not None:
        # Torch-Pruning narrows a LayerNorm with the channels before it, also one over positions
        narrowed = [f"{holders.get(m) or type(m).__name__} from {old[-1]} to {m.normalized_shape[-1]}"
                    for m, old in norms.items() if tuple(m.normalized_shape) != old]
        cause = (f"a LayerNorm over another axis than the channels, narrowed with them ({', '.join(narrowed[:2])}), "
                 "or " if narrowed else "")
        raise WidthError(f"{type(model).__name__} cannot be narrowed by removing channels: {problem} ({cause}its "
                         "forward uses fixed channel sizes, e.g. a head size kept as an attribute, or a parameter of "
                         "no layer in a product, x @ W)" + advice)
    # (a layer a group reaches through its parent, an attention's out_proj, has changed shape: not listed)
    # Only recurrent layers: an input-sized norm or embedding table that no group reaches has the
    # input's size at any width, and naming it would be false advice.
    whole = [holders[m] or type(model).__name__ for m, shapes in unreached.items()
             if isinstance(m, (nn.RNNBase, nn.RNNCellBase)) and [p.shape for p in m.parameters(recurse=False)] == shapes]
    if whole:
        warn_at_user(f"narrowing {type(model).__name__} by removing channels leaves {len(whole)} layer(s) at "
                     f"full size ({', '.join(whole[:4])}{', ...' if len(whole) > 4 else ''}): the model "
                     "is wider than the width asked" + (f"{advice} to scale every layer" if advice else ""))
    rescaled: set[int] = set()  # (a tied weight once)
    for m, old in before.items():
        new = _fan_in(m)
        if old and new and new != old:
            with torch.no_grad():
                for t in (m.weight, m.bias):
                    if t is not None and id(t) not in rescaled:
                        rescaled.add(id(t))
                        t.mul_(math.sqrt(old / new))
    model.train()
    return model, (remaining / total if total else 1.0)


@dataclass(frozen=True)
class ScaledModel:
    model: nn.Module
    width: float       # multiplier of the model file's width 1 (its build_model() default)
    params: int
    method: str        # "build_model(width=...)", "torch-pruning" or "build_model()" (width 1, no width argument)


@dataclass(frozen=True)
class WidthBuilder:
    """Builds one model file's model at any width. `base_width`: the default of build_model's
    `width` argument (None when build_model takes none, or its default is no positive int: then
    `unusable_default` holds that default's repr, and any width but 1 is refused)."""

    build_model: Callable[..., nn.Module]
    example_inputs: Callable[[], tuple]
    base_width: Optional[int]
    example_kwargs: Callable[[], dict] = dict
    unusable_default: Optional[str] = None

    @classmethod
    def from_module(cls, mod) -> "WidthBuilder":
        base = unusable = None
        try:
            param = inspect.signature(mod.build_model).parameters.get("width")
        except (TypeError, ValueError):
            param = None
        if param is not None and isinstance(param.default, int) and not isinstance(param.default, bool) \
                and param.default > 0:
            base = param.default
        elif param is not None:  # (a float multiplier or no default: pruning would ignore the user's argument)
            unusable = "no default" if param.default is inspect.Parameter.empty else f"default {param.default!r}"
        return cls(mod.build_model, lambda: example_inputs(mod), base, lambda: example_kwargs(mod), unusable)

    def no_width_argument(self) -> str:
        """Why the width is not build_model's argument, as a clause: it takes none, or its default is no
        whole number of channels."""
        if self.unusable_default is None:
            return "build_model() takes no width argument"
        return (f"build_model's width parameter has {self.unusable_default}, not a positive whole number "
                "(its hidden channel count at width 1)")

    @property
    def method(self) -> str:
        return "torch-pruning" if self.base_width is None else "build_model(width=...)"

    def _inputs(self) -> tuple:
        inputs = self.example_inputs()
        return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)

    def params(self, model: nn.Module) -> int:
        """The parameters `model` uses at the example inputs (`used_parameters`): the count every
        arm of a comparison is measured by."""
        return used_parameters(model, self._inputs(), self.example_kwargs())

    def _params_at(self, model: nn.Module, width: float) -> int:
        """params(model) of the model built at `width`: one whose forward fails there but not at width 1
        (a size the model file fixes, a buffer sized for its own width) is a width it cannot be built at."""
        try:
            return self.params(model)
        except PBError:
            raise
        except Exception as exc:  # noqa: BLE001 - the model file's forward at a width it does not take
            if width == 1:  # (the model as built: an error of the model file)
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise WidthError(f"the model at width {width:g} fails its forward on the example inputs "
                             f"({type(exc).__name__}: {first}): it fixes a size that the width changes") from exc

    def _check(self, width: float) -> None:
        if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
            raise WidthError(f"width {width!r}: it must be a positive number (1 is the model as built)")
        if self.unusable_default is not None and width != 1:
            raise WidthError(f"{self.no_width_argument()}: give it an int default, e.g. width: int = 64, "
                             "the channel count that widths multiply")
        if self.base_width is None and width > 1:
            raise WidthError(f"width {width}: build_model() takes no width argument, and a model can only be "
                             "narrowed by removing channels; add a width parameter to build_model to widen it")

    def channels(self, width: float) -> int:
        """build_model's width argument for multiplier `width` (route 1 only)."""
        return max(1, round(self.base_width * width))

    def _build_channels(self, channels: int) -> tuple[nn.Module, int]:
        """build_model(width=channels), or at the nearest width it accepts (a model may require,
        e.g., a multiple of its head count)."""
        first, rng = None, torch.get_rng_state()
        for c in sorted(range(max(1, channels - self.base_width), channels + self.base_width + 1),
                        key=lambda c: (abs(c - channels), -c)):
            # A refused width may have drawn weights before it raised: each try starts from the same
            # state, so the width built gets the weights a direct build_model(width=c) would.
            torch.set_rng_state(rng)
            try:
                model = self.build_model(width=c)
            except Exception as exc:  # noqa: BLE001 - the model's own constraint on its width
                if c == self.base_width:  # (its own width: an error of the model file, not a width it refuses)
                    raise
                first = first or exc
                continue
            if not isinstance(model, nn.Module):
                raise WidthError(f"build_model(width={c}) returned {type(model).__name__}, not an nn.Module")
            return model, c
        raise WidthError(f"build_model(width={channels}) raised {type(first).__name__}: "
                         f"{str(first).splitlines()[0] if str(first) else ''}")

    def build(self, width: float = 1.0) -> nn.Module:
        """The model at `width` x its hidden channel counts (seed torch before calling)."""
        return self._built(width)[0]

    def _built(self, width: float) -> tuple[nn.Module, float]:
        """The model at `width`, and the width it has (channel counts are whole numbers)."""
        self._check(width)
        if self.base_width is not None:
            model, channels = self._build_channels(self.channels(width))
            return model, channels / self.base_width
        model = self.build_model()
        if width == 1:
            return model, 1.0
        return shrink(model, self._inputs(), lambda size, _i: round(size * width), self.example_kwargs())

    def scaled(self, width: float) -> ScaledModel:
        model, built = self._built(width)
        # (width 1 without a width argument is build_model() itself: nothing was pruned)
        method = "build_model()" if self.base_width is None and width == 1 else self.method
        return ScaledModel(model, built, self._params_at(model, built), method)

    def for_params(self, target: float, tolerance: float = PARAM_TOLERANCE) -> ScaledModel:
        """A model of this structure with `target` parameters (+-tolerance): the nearest uniform
        width, then, if that misses, single channels removed group by group from the next wider
        build until the count is within tolerance."""
        if not (target > 0 and math.isfinite(target)):
            raise WidthError(f"target parameter count {target!r}: it must be a positive number")
        rng = torch.get_rng_state()

        def count(width: float) -> int:
            torch.set_rng_state(rng)  # every trial build draws the same weights
            model, built = self._built(width)
            return self._params_at(model, built)

        if self.base_width is not None:
            step = 1.0 / self.base_width
            lo, hi = step, 1.0
            while count(hi) < target:
                lo, hi = hi, hi * 2
                if hi * self.base_width > 1 << 16:
                    raise WidthError(f"no width up to {hi:g}x reaches {target:.0f} parameters")
            lo_c, hi_c = self.channels(lo), self.channels(hi)
            while hi_c - lo_c > 1:  # smallest channel count with >= target parameters
                mid = (lo_c + hi_c) // 2
                if count(mid * step) >= target:
                    hi_c = mid
                else:
                    lo_c = mid
            if count(lo_c * step) >= target:
                hi_c = lo_c
            widths = [hi_c * step, max(1, hi_c - 1) * step]
        else:
            full = count(1.0)
            if full < target * (1 - tolerance):
                raise WidthError(f"{target:.0f} parameters is more than the model has ({full}) and "
                                 f"{self.no_width_argument()}: "
                                 f"{'add one' if self.unusable_default is None else 'give it an int default'} to widen "
                                 "the model")
            if full <= target:  # narrowing only lowers the count: the model as built is the nearest
                torch.set_rng_state(rng)
                return self.scaled(1.0)
            lo, hi = 0.0, 1.0
            for _ in range(20):
                mid = (lo + hi) / 2
                if count(mid) >= target:
                    hi = mid
                else:
                    lo = mid
            widths = [hi, lo] if lo > 0 else [hi]
        best = min(widths, key=lambda w: abs(count(w) - target))
        torch.set_rng_state(rng)
        if abs(count(best) - target) <= tolerance * target:
            torch.set_rng_state(rng)
            return self.scaled(best)
        # Uniform widths step over the target: from the wider build, remove one channel per block
        # in one group, then in the first n groups, and keep the nearest count within tolerance.
        wide = widths[0]

        def trim(groups: Callable[[int], bool]) -> tuple[nn.Module, float]:
            torch.set_rng_state(rng)
            model, built = self._built(wide)
            try:
                model, kept = shrink(model, self._inputs(), lambda size, i: size - (1 if groups(i) else 0),
                                     self.example_kwargs(), advise_width_argument=self.base_width is None)
            except WidthError as exc:
                if self.base_width is None:
                    raise
                # (a width argument is what this model has: its whole widths step over the target)
                nearest = ", ".join(f"{count(w)} at width {self._built(w)[1]:g}" for w in widths)
                raise WidthError(f"no width of build_model(width=...) gets within {tolerance:.0%} of {target:.0f} "
                                 f"parameters ({nearest}), and removing single channels from the wider build failed: "
                                 f"{exc}") from exc
            return model, built * kept  # (about: the trimmed groups' share of the channels)

        found, previous = None, None
        for n in range(1, 1 << 12):
            for model, built in (trim(lambda i, n=n: i == n - 1), trim(lambda i, n=n: i < n)):
                params = self._params_at(model, built)
                if abs(params - target) <= tolerance * target and (
                        found is None or abs(params - target) < abs(found.params - target)):
                    found = ScaledModel(model, built, params, "torch-pruning" if self.base_width is None
                                        else self.method + " + torch-pruning")
            if params == previous:  # every group has given a channel
                break
            previous = params
        if found is not None:
            return found
        torch.set_rng_state(rng)
        raise WidthError(f"no width of the model gets within {tolerance:.0%} of {target:.0f} parameters (nearest: "
                         f"{count(best)} at width {self._built(best)[1]:g})")
