"""PhaseController: carries out PhaseSchedule's actions on a PerforatedModel (docs/algorithm.md).

The decisions are the schedule's (pbp_fx.schedule, plain data); the controller executes them
through PerforatedModel's public methods, keeps the best-validation weights, and owns ONE
optimizer for the whole run. Call `step(val_score)` once per epoch:

    ctl = PhaseController(pm, PBConfig(patience=10, max_dendrites=3))
    optimizer = ctl.optimizer                 # a torch.optim.Optimizer; the same object all run
    for epoch in range(epochs):
        train_one_epoch(ctl.model, optimizer)
        if ctl.step(evaluate(pm)) == "complete":
            break

At a restructure (dendrite phase started, dendrites installed, round retried, run complete)
the optimizer's param groups get the model's new trainable parameters and its state is
cleared; group hyperparameters (lr, betas, weight_decay, initial_lr, ...) stay. A parameter
returns to the group it was in before; new ones join the group of their site's neuron weight
(group 0 where it has none), or the group `parameter_groups` names. Parameters of the optimizer that
are not the model's (a head or a learnable loss outside the perforated model) stay in their
groups and train in the neuron phases; a dendrite phase trains the candidates only, so they
leave the optimizer and are frozen for it, and come back after it. The best weights include
them (and, with `root=`, everything the root module holds outside pm): every rewind puts the
whole trained model back to the state that scored the best value.

Learning-rate schedulers built once on `ctl.optimizer` keep working across restructures.
In the dendrite phase every group's lr is multiplied by candidate_lr / (its lr at the start
of the phase), and so are the base_lrs of schedulers given to `attach_scheduler` (or built by
`scheduler_factory`), with the other rates they compute lr from (OneCycleLR's initial, max and
min lr, CyclicLR's max_lrs, ReduceLROnPlateau's min_lrs, SWALR's swa_lr, a cosine schedule's eta_min when every
group has the same factor (else, for a cosine schedule attached alone, the neuron rates are
recovered exactly at the phase's end); the schedulers of a SequentialLR or ChainedScheduler): the phase
starts at exactly `config.candidate_lr`, a scheduler that rewrites lr every step (LambdaLR, as
Hugging Face Trainer does, or OneCycleLR) keeps it there times its own factor's change, and a
chainable one (StepLR) multiplies it as usual; no step of the phase applies more than
candidate_lr (a warm-up, warm restart or cycle that rises after the phase began is capped for
the step, the scheduler's own course unchanged). At the end
of the phase the factor is divided out again, so the neuron rate continues where the
scheduler's clock says it should be.

Distributed runs pass `distributed=` (a pbp_fx.distributed.Distributed): every rank then
decides on rank 0's validation score and candidate progress (and the ranks are checked to
be at the same epoch, phase and dendrite count), and `ctl.model` is the DDP wrapper to train
with, rebuilt at every restructure.
"""
from __future__ import annotations

import copy
import enum
import hashlib
import json
import math
import numbers
import weakref
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .config import ConfigError, PBConfig, TrainConfig
from .errors import NonFiniteError, TrainingError, warn_at_user
from .perforated import PerforatedModel, outside_inference_mode, perforated_inside, put_back
from .schedule import Action, Kind, PhaseSchedule, check_score, score_of

__all__ = ["PhaseController", "Decision", "rebind_optimizer", "default_optimizer", "group_index"]


def _refuse_ranks_without_distributed() -> None:
    """A TrainingError when torch.distributed runs several processes but the controller has no
    `distributed`: the new candidates and dendrites are outside any DDP wrapper of the user's and
    their statistics per rank, so the ranks would drift apart from the first dendrite phase, silently."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        ranks = torch.distributed.get_world_size()
        if ranks > 1:
            raise TrainingError(f"torch.distributed runs {ranks} processes, but this PhaseController has no "
                                "distributed=: each rank would train candidates and dendrites of its own, outside your "
                                "DDP wrapper, and the ranks would drift apart; pass distributed=pbp_fx.distributed."
                                "Distributed() to PhaseController or fit (it wraps the model anew for each phase) and "
                                "train through ctl.model in place of your wrapper, or run one process")


def _settings_digest(config: PBConfig) -> int:
    """A digest of the config's settings, as an int64 the ranks can gather."""
    text = json.dumps(config.to_dict(), sort_keys=True, default=repr)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")


# The note of a run ended at a NaN/Inf it could not go on from (`stop_non_finite`): no finished run.
NON_FINITE_STOP = "stopped: non-finite values"


class Decision(str, enum.Enum):
    """What PhaseController.step decided; equal to its value's string, and printed as it."""

    CONTINUE = "continue"          # keep training as before
    RESTRUCTURED = "restructured"  # the parameter set changed (ctl.optimizer already follows it)
    COMPLETE = "complete"          # done; the best-validation model is loaded

    def __str__(self) -> str:  # (a str enum prints as "Decision.CONTINUE" before Python 3.11's StrEnum)
        return self.value


# Where torch.optim.Adam(fused=True) runs (it checks only at the first step, so decide up front).
_FUSED_ADAM_DEVICES = ("cpu", "cuda")
_FUSED_ADAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# A ReduceLROnPlateau's counters that a dendrite phase holds, and the cooldown that holds it.
_PLATEAU_COUNTERS = ("best", "cooldown_counter")
_PLATEAU_HOLD = 2**31 - 1


def all_finite(tensors) -> bool:
    """Whether every floating tensor of `tensors` is finite (one host read for all of them)."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point() and t.numel()]
    return not flags or bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


def nan_weights_before_best(epoch: int) -> str:
    """The refusal of weights gone NaN/Inf before the run kept any best (fit's, compare's arms)."""
    return f"the model's weights hold NaN/Inf after epoch {epoch}, before any best: lower the learning rate"


def group_index(index, count: int) -> Optional[int]:
    """`index` as the index of one of an optimizer's `count` parameter groups (an integer, numpy's too, not a
    bool), or None where it is none."""
    if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index < count:
        return None
    return int(index)


def default_optimizer(params, lr: float = TrainConfig.lr) -> torch.optim.Optimizer:
    """Adam(lr), fused (one kernel for all tensors per step) when every parameter is a float tensor
    on the CPU or a CUDA device (where torch has the fused kernel), else torch's default Adam.

    Why fused: a candidate pool holds P copies of every neuron layer, so a dendrite-phase step
    updates P x the model's parameters, and the per-tensor loop of the default CPU Adam was a
    large part of it (ResNet-18, pool 4, CPU: bench/results/train_overhead_stop18.md).
    """
    params = list(params)
    fused = all(p.device.type in _FUSED_ADAM_DEVICES and p.dtype in _FUSED_ADAM_DTYPES for p in _tensors(params))
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


def _refuse_sparse_gradients_for_adam(pm: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """An embedding with sparse=True whose weight the optimizer trains gives sparse gradients, which Adam
    refuses at the first step with torch's hint, SparseAdam, which takes no dense parameter: said up front."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, m in pm.named_modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad and id(m.weight) in held:
            name = name.removeprefix("graph_module.")  # (the model's own path)
            raise ConfigError(f"{type(m).__name__} {name!r} has sparse=True, whose sparse gradients "
                              f"{type(optimizer).__name__} cannot take: build it with sparse=False, or train with an "
                              "optimizer that takes both kinds (optimizer_factory=lambda params: torch.optim.SGD(params, "
                              "lr=0.1), or Adagrad)")


NOTHING_TRAINS = ("no parameter of the model trains (every one has requires_grad=False): unfreeze the layers PB "
                  "should train (a frozen layer is still a site: its dendrites train)")


class _StepHook:
    """An optimizer step hook that calls a controller's `_cap_dendrite_lr` ("pre") or `_after_step`
    ("post") while the controller lives: it holds it weakly (the optimizer
    outlives a discarded controller, which must neither stay in memory with its copy of the best
    weights nor keep capping); once the controller is gone it does nothing (removing itself while
    the optimizer iterates its hooks would fail the step)."""

    def __init__(self, controller, when: str):
        self.controller, self.when = weakref.ref(controller), when
        self.handle = None

    @classmethod
    def register(cls, controller) -> None:
        """Both hooks on the controller's optimizer, after removing those of controllers gone (a controller built
        anew over one optimizer, as a notebook's rerun or a resume recipe does, left two more hooks each time:
        1000 of them made a small model's step 1.7x as long)."""
        optimizer = controller.optimizer
        for hooks in (optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks):
            for hook in list(hooks.values()):
                if isinstance(hook, cls) and hook.controller() is None and hook.handle is not None:
                    hook.handle.remove()
        for when, add in (("pre", optimizer.register_step_pre_hook), ("post", optimizer.register_step_post_hook)):
            hook = cls(controller, when)
            hook.handle = add(hook)

    def __call__(self, optimizer, args, kwargs) -> None:
        controller = self.controller()
        if controller is not None and controller.optimizer is optimizer:
            (controller._cap_dendrite_lr if self.when == "pre" else controller._after_step)(
                optimizer, args, kwargs)


def _refuse_the_originals_twins(pm, optimizer: torch.optim.Optimizer, left_out) -> None:
    """ConfigError when every parameter of `pm` the optimizer leaves out has a twin among the optimizer's
    parameters outside pm (same shape, same values): a group built on the model perforate copied (biases
    gathered by name before perforate), whose pm copies would never train, and the originals would be
    taken for a head of one's own."""
    missing = [(n, p) for n, p in pm.named_parameters() if p in left_out]
    own = {id(p) for p in pm.parameters()}
    outside = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in own]
    if not missing or len(outside) < len(missing):
        return
    with torch.no_grad():
        twins = [(n, p) for n, p in missing if any(o.shape == p.shape and o.dtype == p.dtype and o.device == p.device
                                                   and torch.equal(o, p) for o in outside)]
        # (equal constants, a head's zero bias beside a left-out one, are no evidence; drawn values are)
        drawn = any(p.numel() > 1 and not bool((p == p.reshape(-1)[0]).all()) for _, p in twins)
    if len(twins) == len(missing) and drawn:
        twins = [n for n, _ in twins]
        raise ConfigError(f"the optimizer leaves out {len(missing)} of the perforated model's parameters "
                          f"({', '.join(twins[:3])}{', ...' if len(twins) > 3 else ''}) and holds parameters outside "
                          "it equal to them: perforate copies the model, so those are the original's and pm's copies "
                          "would never train; build every group over pm's parameters (pm.named_parameters())")


def model_fixed_settings(config: PBConfig, pm: PerforatedModel) -> PBConfig:
    """`config` with the mode and activation `pm` was perforated with, which its graph fixes: a config
    whose value is PBConfig's default takes the model's (PBConfig(patience=5) for a model perforated
    with activation="tanh"; a default given explicitly cannot be told from one left out, and follows the
    model too); one that sets another value is refused in one line."""
    default, fixed = PBConfig(), {}
    for name in ("mode", "activation"):
        mine, models = getattr(config, name), getattr(pm, name)
        if mine == models:
            continue
        if mine != getattr(default, name):
            raise ConfigError(f"config has {name}={mine!r} but the model was perforated with {name}={models!r}: "
                              f"perforate with {name}={mine!r} (or leave {name} out of the config)")
        fixed[name] = models
    return config.replace(**fixed) if fixed else config


def _unscaled_lr(lr: float, scale: float, start: Optional[float], floor: float) -> float:
    """A group's neuron rate at the end of a dendrite phase: lr / scale, or, under a cosine
    schedule whose floor eta_min stayed unscaled, the exact one. Its chained step
    lr' = floor + (lr - floor) * r keeps (lr - floor) proportional across runs, so the neuron run's
    (start - floor) * (lr - floor) / (start * scale - floor) + floor."""
    if not floor or start is None or start * scale == floor:
        return lr / scale
    return floor + (lr - floor) * (start - floor) / (start * scale - floor)


def inner_optimizer(optimizer):
    """The optimizer a wrapper holds as `.optimizer` (accelerate's AcceleratedOptimizer and the
    like), however deep; the object itself when it wraps none."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _tensors(params) -> list:
    """The tensors of an optimizer's params argument (tensors, or param-group dicts)."""
    out = []
    for item in params:
        group = item["params"] if isinstance(item, dict) else item
        out += [group] if isinstance(group, torch.Tensor) else list(group)
    return out


def rebind_optimizer(optimizer: torch.optim.Optimizer, params, group_of: Optional[Callable] = None,
                     keep_state: bool = False) -> None:
    """Give `optimizer` a new parameter set in place: same object, same group hyperparameters, no state.

    Each parameter goes to group `group_of(p)` (default: the group it is in now, else 0); groups
    may end up empty. The per-parameter state (Adam moments, momentum) is cleared: it belonged
    to a different problem. keep_state: keep it for parameters that stay (a resumed run).
    """
    current = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    before = [id(p) for g in optimizer.param_groups for p in g["params"]]
    groups: list[list] = [[] for _ in optimizer.param_groups]
    seen = set()
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        index = group_of(p) if group_of is not None else current.get(id(p), 0)
        groups[index if 0 <= index < len(groups) else 0].append(p)
    for g, members in zip(optimizer.param_groups, groups):
        # In place: an optimizer may hold a group's list itself (torch.optim.LBFGS steps the list
        # it was built with; a new list left it stepping the old parameters, so a dendrite phase
        # trained nothing).
        if isinstance(g["params"], list):
            g["params"][:] = members
        else:
            g["params"] = members
    changed = [id(p) for g in optimizer.param_groups for p in g["params"]] != before
    _forget_parameter_count(optimizer)
    if keep_state and changed and isinstance(inner_optimizer(optimizer), torch.optim.LBFGS):
        optimizer.state.clear()  # (its history is flat vectors over the whole set: of another length now)
    elif keep_state:
        for p in [p for p in optimizer.state if id(p) not in seen]:
            del optimizer.state[p]
        _state_to_parameter_devices(optimizer)
    else:
        optimizer.state.clear()


def _forget_parameter_count(optimizer: torch.optim.Optimizer) -> None:
    """Drop torch.optim.LBFGS's cached parameter count: it is taken once, from the first set,
    and a step over a new set of another size failed its size assertion."""
    inner = inner_optimizer(optimizer)
    if isinstance(inner, torch.optim.LBFGS):
        inner._numel_cache = None


def _state_to_parameter_devices(optimizer: torch.optim.Optimizer) -> None:
    """Kept per-parameter state on its parameter's device (a model moved after its optimizer
    stepped), as torch's load_state_dict places it: a step count stays on the CPU unless the
    group is fused or capturable."""
    for group in optimizer.param_groups:
        step_on_cpu = not (group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.device != p.device and not (key == "step" and step_on_cpu):
                    state[key] = value.to(p.device)


class PhaseController:
    """Executes PhaseSchedule's decisions on `pm`; owns the best-validation weights and the optimizer.

    config: the PBConfig (default: PBConfig with the model's own mode and activation).
    **overrides: PBConfig fields applied with config.replace(...), e.g. patience=10.
    optimizer: an existing optimizer over pm's parameters to adopt (a Trainer's, say; model
    parameters it leaves out stay out, as if frozen), or
    optimizer_factory(params) to build one (default `default_optimizer`: Adam, lr 1e-3, fused where torch can).
    scheduler_factory(optimizer): builds `ctl.scheduler` once (see attach_scheduler).
    parameter_groups(module) -> {name: group index} (module: root when given, else pm): where a new
    parameter (candidates, dendrites, a head outside pm back from a dendrite phase)
    goes at a restructure, so that a framework that rebuilds its optimizer from names on resume
    (the Hugging Face Trainer's weight-decay groups) gets the same groups; default: the group
    of its site's neuron weight.
    distributed: see the module docstring.
    root: the module you train when pm is a part of it (a backbone under a head of your own): its
    parameters and buffers outside pm are kept with the best weights and rewound with them, so
    the model left at the end is the one that scored the best value, and its buffers outside pm
    are back at their values of a dendrite phase's start when it ends. The optimizer's parameters
    outside pm (a head, a learnable loss) are kept in any case.
    """

    def __init__(self, pm: PerforatedModel, config: Optional[PBConfig] = None, *,
                 optimizer: Optional[torch.optim.Optimizer] = None, optimizer_factory: Optional[Callable] = None,
                 scheduler_factory: Optional[Callable] = None, distributed=None,
                 parameter_groups: Optional[Callable] = None, root: Optional[torch.nn.Module] = None, **overrides):
        if not isinstance(pm, PerforatedModel):
            raise ConfigError(f"PhaseController controls a PerforatedModel, got {type(pm).__name__}: "
                              + (perforated_inside(pm) or "pm = pbp_fx.perforate(model, example_inputs), then "
                                 "PhaseController(pm)"))
        pm.check_modules_as_captured()
        config = PBConfig.coerce(config, "PhaseController's config") or PBConfig()
        if overrides:
            config = config.replace(**overrides)
        config = model_fixed_settings(config, pm)
        if optimizer is not None and optimizer_factory is not None:
            raise ConfigError("pass optimizer= (an existing optimizer) or optimizer_factory=, not both")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer= must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if root is not None and not any(m is pm for m in root.modules()):
            raise ConfigError(f"root= is the module you train with pm inside it, but this {type(root).__name__} does "
                              "not hold pm: pass the module that holds it (or leave root out)")
        self.pm, self.config, self.root = pm, config, root
        self.schedule = PhaseSchedule(config, phase=pm.phase, dendrites=pm.dendrites)
        self.distributed = distributed
        self._settings_agreed = False  # (distributed: whether every rank's config was found the same)
        self.model = pm
        self.best_state: Optional[dict] = None
        # The best state's part outside pm (see root), by name: `outside_state`'s keys.
        self.best_outside: Optional[dict] = None
        self.history: list[dict] = []
        # Candidates and grown dendrites draw from a generator of their own, saved with the state:
        # a resumed run draws what the uninterrupted run drew, however many numbers the framework
        # took from torch's global generator meanwhile (Lightning draws a DataLoader seed on restart).
        # Seeded from torch.initial_seed(): torch.manual_seed(s) before a run makes it reproducible.
        self.generator = torch.Generator().manual_seed(torch.initial_seed())
        # Per group, the factor applied to lr (and scheduler base_lrs) in the dendrite phase,
        # and the group's lr when the phase started.
        self.lr_scale: Optional[list[float]] = None
        self.phase_start_lrs: Optional[list[float]] = None
        # Per attached ReduceLROnPlateau (by attach order): its counters while a dendrite phase holds it.
        self.plateau_held: dict[int, dict] = {}
        self.schedulers: list = []
        self._carry_saved_scale: list = []  # schedulers attached with scaled=True (restored from the run)
        self._groups = WeakIdKeyDictionary()  # parameter -> the group it belongs to
        if parameter_groups is not None and not callable(parameter_groups):  # (it failed at the first dendrite)
            raise ConfigError(f"parameter_groups={parameter_groups!r}: give a function module -> {{parameter name: "
                              "group index}} (e.g. lambda m: {n: 1 for n, _ in m.named_parameters() if 'head' in n})")
        self.parameter_groups = parameter_groups
        # Parameters of the model that an adopted optimizer left out (a user's way of freezing a
        # backbone): they stay out at every restructure, as if frozen. PB's own parameters (the
        # sites' candidates and dendrites) are not among them: they join at each restructure.
        self._left_out = WeakIdKeyDictionary()
        # Mid-dendrite-phase every model parameter is frozen, and a framework builds its optimizer over
        # the candidates alone: what it leaves out then says nothing. load_state_dict brings the run's set.
        self._left_out_known = optimizer is not None and pm.phase != "dendrite"
        if self._left_out_known:
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            pb_own = {id(p) for s in pm.sites.values() for p in s.parameters()}
            for p in pm.parameters():
                if p.requires_grad and id(p) not in held and id(p) not in pb_own:
                    self._left_out[p] = True
        if optimizer is None:
            factory = optimizer_factory or default_optimizer
            trainable = list(pm.trainable_parameters())
            if not trainable:  # (torch's own words: "optimizer got an empty parameter list")
                raise ConfigError(NOTHING_TRAINS)
            optimizer = factory(trainable)
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise ConfigError(f"optimizer_factory returned {type(optimizer).__name__}, not a torch.optim.Optimizer")
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not any(id(p) in held for p in pm.parameters()):
            raise ConfigError("the optimizer holds none of the perforated model's parameters (perforate copies "
                              "the model, so an optimizer built before it trains the original): build it over "
                              "pm.trainable_parameters()")
        _refuse_the_originals_twins(pm, optimizer, self._left_out)
        _refuse_sparse_gradients_for_adam(pm, optimizer)
        self.optimizer = optimizer
        if any(g.get("relative_step") for g in optimizer.param_groups) and self._says:
            # Adafactor's relative_step computes its own step size and never reads the group's lr.
            warn_at_user("the optimizer sets its own step size (relative_step=True), so PB's dendrite-phase rate "
                         "(candidate_lr) has no effect: pass relative_step=False and an lr to let PB set it")
        inner = inner_optimizer(optimizer)
        line_search = inner.defaults.get("line_search_fn") if isinstance(inner, torch.optim.LBFGS) else None
        if line_search is not None and config.mode == "pb" and self._says:
            # (its step must lower the closure's loss, which candidates never change: every step was 0)
            warn_at_user(f"LBFGS with line_search_fn={line_search!r} trains no candidates: its line search asks each "
                         "step to lower the closure's loss, which candidates do not change (they follow the error's "
                         "covariance), so it steps 0 in every dendrite phase: use line_search_fn=None")
        self._capped: list = []  # (group, its lr) that `_cap_dendrite_lr` lowered for one step
        # Parameters the optimizer held at a dendrite phase's first step (None: not counted yet this phase).
        self._phase_params: Optional[int] = None
        self._maximizing: list[int] = []  # groups with maximize=True, set False for a dendrite phase
        self.optimizer_steps = 0  # steps of self.optimizer (its post-step hook counts them)
        self.phase_steps_from = 0  # optimizer_steps at the last rebind
        self._steps_agreed = 0  # optimizer_steps at the last decision the ranks agreed on
        self._warned_unstepped = False
        self._warned_unheld = False
        self._warned_added_outside = False
        self._bound_phase = pm.phase  # the phase whose parameters the optimizer holds
        self._warned_short_phase = False
        self._warned_small_gains = False
        self._warned_silent_sites = False
        self._warned_unattached = False
        _StepHook.register(self)
        for i, g in enumerate(optimizer.param_groups):
            for p in g["params"]:
                self._groups[p] = i
        # The optimizer's parameters that are not the model's: kept (see the module docstring).
        own = {id(p) for p in pm.parameters()}
        self._foreign = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in own]
        # The optimizer's state for parameters that stay trainable is kept: a training framework
        # that resumes a run restores it before the controller exists (the HF Trainer does).
        self.rebind(keep_state=True)
        # Names (outside_state's) of the parameters outside pm that a dendrite phase froze, and the
        # values of root's buffers outside pm when it began (restored when it ends, as pm's are).
        self._frozen_outside: list[str] = []
        self._held_outside: Optional[dict] = None
        if pm.phase == "dendrite":  # a model loaded mid-phase: its candidates train at candidate_lr
            self._enter_dendrite_lr()  # (load_state_dict then restores the saved run's rates)
            self._freeze_outside()
        self.scheduler = None
        if scheduler_factory is not None:
            self.scheduler = scheduler_factory(self.optimizer)
            self.attach_scheduler(self.scheduler)

    _WEAK_TABLES = ("_groups", "_left_out")  # (by parameter: WeakIdKeyDictionary)

    def __getstate__(self) -> dict:
        # (WeakIdKeyDictionary holds WeakIdRefs, which pickle refuses: keep its pairs)
        state = dict(self.__dict__)
        for key in self._WEAK_TABLES:
            state[key] = list(state[key].items())
        return state

    def __setstate__(self, state: dict) -> None:
        # A copy (deepcopy, pickle) has an optimizer of its own, whose hooks were not copied.
        for key in self._WEAK_TABLES:
            if isinstance(state.get(key), list):
                table = WeakIdKeyDictionary()
                for k, v in state[key]:
                    table[k] = v
                state[key] = table
        self.__dict__.update(state)
        _StepHook.register(self)

    # -- read-only views -----------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.schedule.done

    @property
    def best_score(self) -> Optional[float]:
        return self.schedule.best_score

    @property
    def best_epoch(self) -> int:
        return self.schedule.best_epoch

    @property
    def epoch(self) -> int:
        return self.schedule.epoch

    @property
    def takes_divergence(self) -> bool:
        """Whether `step` now takes a non-finite score (a neuron phase after a finite best): the
        phase ends and the model goes back to its best weights. Else such a score is refused."""
        return self.schedule.takes_divergence

    @property
    def num_dendrites(self) -> int:
        """Dendrites per site now."""
        return self.pm.dendrites

    # -- executing actions -------------------------------------------------------------
    def attach_scheduler(self, scheduler, scaled: bool = False) -> None:
        """Have the dendrite phase's lr factor applied to `scheduler.base_lrs` too (see module docstring).

        scaled: the scheduler's state was restored from this run (resume), so its base_lrs
        carry the factor already (attached before or after the controller's state is loaded:
        the same result). In a dendrite phase, a scheduler built on the optimizer then
        (its base_lrs are the groups' rates now) carries it too, and a ReduceLROnPlateau is held."""
        own = getattr(scheduler, "optimizer", None)
        if own is None:  # (it failed at the next phase switch, which scales the scheduler's optimizer's rates)
            raise ConfigError(f"attach_scheduler: {type(scheduler).__name__} is no learning-rate scheduler of an "
                              "optimizer (one of torch.optim.lr_scheduler's, built on ctl.optimizer)")
        if inner_optimizer(own) is not self.optimizer:  # its rates would be scaled to candidate_lr
            raise ConfigError(f"attach_scheduler: this {type(scheduler).__name__} schedules another optimizer than "
                              "the controller's: attach only schedulers of ctl.optimizer")
        if scheduler in self.schedulers:
            # Attached already (the training setup's lines, repeated on resume): scaled=True now says that
            # its state has been restored since, so a load_state_dict that follows leaves it alone
            # (it scaled the restored factor a second time: 200x the rate for the rest of the run).
            if scaled and not any(scheduler is c for c in self._carry_saved_scale):
                self._carry_saved_scale.append(scheduler)
            return
        self.schedulers.append(scheduler)
        if scaled:  # it carries the saved run's factor: a load_state_dict that follows leaves it alone
            self._carry_saved_scale.append(scheduler)
        if self.lr_scale is None:
            return
        rates = [float(g["lr"]) for g in self.optimizer.param_groups]
        built_now = list(getattr(scheduler, "base_lrs", [])) == rates and any(s != 1.0 for s in self.lr_scale)
        if not scaled and not built_now:
            self._rescale_schedulers(self.lr_scale, entering=True, schedulers=[scheduler])
        index = len(self.schedulers) - 1
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and index not in self.plateau_held:
            self.plateau_held[index] = {k: getattr(scheduler, k) for k in _PLATEAU_COUNTERS}
            scheduler.cooldown_counter = _PLATEAU_HOLD

    def set_distributed(self, distributed) -> None:
        """Train through `distributed` from now on (rewraps `self.model`); the optimizer keeps its
        state (a resumed run's Adam moments)."""
        self.distributed = distributed
        self.rebind(keep_state=True)

    def rebind(self, keep_state: bool = False) -> None:
        """Point the optimizer (and the DDP wrapper) at the model's current trainable parameters.

        keep_state: keep the optimizer's state for the parameters it holds still (after unfreezing a
        layer by hand, between two steps; a restructure clears it)."""
        params = [p for p in self.pm.trainable_parameters() if p not in self._left_out]
        self.phase_steps_from = self.optimizer_steps
        self._bound_phase = self.pm.phase
        if self._foreign and self.pm.phase != "dendrite":
            held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
            for p in self._foreign:
                if id(p) not in held:  # back from a dendrite phase: its backward left gradients here
                    p.grad = None
            params += self._foreign
        new = [p for p in params if p not in self._groups]
        if new:
            named = self.root if self.root is not None else self.pm  # (names as parameter_groups gives them)
            by_name = self.parameter_groups(named) if self.parameter_groups is not None else {}
            names = {id(p): n for n, p in named.named_parameters()} if by_name else {}
            neuron_group = self._neuron_groups()
            for p in new:
                name = names.get(id(p))
                self._groups[p] = (self._group_named(name, by_name[name]) if name in by_name
                                   else neuron_group.get(id(p), 0))
        rebind_optimizer(self.optimizer, params, group_of=lambda p: self._groups[p], keep_state=keep_state)
        if self.distributed is None:
            self.model = self.root if self.root is not None else self.pm
        else:
            self._refuse_unsynchronised()
            self.model = self.distributed.wrap(self.pm, module=self.root)

    def _refuse_unsynchronised(self) -> None:
        """Under DDP only what the wrapper holds is synchronised: the optimizer's parameters outside
        pm must be root's, and root, which the loop then trains through ctl.model, needs a forward."""
        inside = {id(p) for p in (self.root if self.root is not None else self.pm).parameters()}
        outside = [p for p in self._foreign if id(p) not in inside]
        if outside:
            raise ConfigError(f"PhaseController(distributed=...): the optimizer trains {len(outside)} parameter(s) "
                              "outside pm (a head?), which DDP over pm does not synchronise, so the ranks would train "
                              "different models: pass root=<the module holding pm and them> and train through "
                              "ctl.model (DDP over root), or perforate the whole model (exclude= the head's layers)")
        if self.root is not None and type(self.root).forward is nn.Module.forward:
            raise ConfigError(f"PhaseController(distributed=..., root=...): ctl.model is DDP over root, which the "
                              f"training loop calls, and {type(self.root).__name__} has no forward: give it one "
                              "(pm and its head), or perforate the whole model (exclude= the head's layers)")

    def _group_named(self, name: str, index) -> int:
        """The group parameter_groups gives the parameter `name` as it joins, checked against the optimizer's groups
        now (a rule may name a group added later, for parameters that join later)."""
        count = len(self.optimizer.param_groups)
        checked = group_index(index, count)
        if checked is None:
            raise ConfigError(f"parameter_groups gives {name!r} the group {index!r}, and the optimizer's groups are 0 "
                              f"to {count - 1}: give each name the index of a group it has when the parameter joins")
        return checked

    def _neuron_groups(self) -> dict:
        """{id(parameter of a site or of its neuron layer and norm): the group of that site's neuron weight}: a
        dendrite, a candidate or an unfrozen bias trains with its neuron's hyperparameters (a head's 10x lr, its
        weight decay).
        Its names are the site's (pbp_sites.*), so an optimizer rebuilt by a rule on names on
        resume needs that rule as parameter_groups instead."""
        out = {}
        for name, site in self.pm.sites.items():
            weight = self.pm.neuron_weight(name)
            if weight is not None and weight in self._groups:
                # (also the layer's bias and its norm's affine, unfrozen after the optimizer was built)
                out.update({id(p): self._groups[weight] for p in (*site.parameters(), *self.pm.neuron_tensors(name))})
        return out

    def restore_best(self) -> None:
        """Load the best-validation weights into the model (when there are any)."""
        if self.best_state is not None:
            if self.pm.phase == "dendrite" and not any(".candidates." in k for k in self.best_state):
                # The model was given a dendrite phase's structure after the best state was taken
                # (Lightning's validate/test(ckpt_path=) of such a checkpoint): the best state has no pool.
                self.pm.abort_dendrite_phase()
                self._thaw_outside()
            self.pm.load_state_dict(self.best_state)
            # Gradients of the weights before the rewind (a validation inside an accumulation of
            # gradients) would enter the next step of the weights it rewound to.
            for t in (*self.pm.parameters(), *self.outside_state().values()):
                t.grad = None
        self._put_outside(self.best_outside)

    def outside_state(self) -> dict:
        """The trained tensors outside pm, by name: root's parameters and buffers (root's names) and
        the optimizer's other parameters ("optimizer/<i>", in the optimizer's order)."""
        own = {id(t) for t in (*self.pm.parameters(), *self.pm.buffers())}
        out = {}
        if self.root is not None:
            for name, t in (*self.root.named_parameters(), *self.root.named_buffers()):
                if id(t) not in own:
                    out[name] = t
        named = {id(t) for t in out.values()}
        for i, p in enumerate(self._foreign):
            if id(p) not in named:
                out[f"optimizer/{i}"] = p
        return out

    def _put_outside(self, values: Optional[dict]) -> None:
        """Copy saved values (by outside_state's names) into the live tensors outside pm."""
        live = self.outside_state()
        with torch.no_grad():
            for name, value in (values or {}).items():
                if name in live:
                    live[name].copy_(value)

    def _changing_outside(self) -> dict:
        """outside_state's tensors that training can change: buffers, trainable parameters and those a
        dendrite phase froze (a frozen backbone around a perforated head is not copied at each best)."""
        frozen = set(self._frozen_outside)
        return {n: t for n, t in self.outside_state().items()
                if t.requires_grad or n in frozen or not isinstance(t, torch.nn.Parameter)}

    def _freeze_outside(self) -> None:
        """A dendrite phase trains the candidates only: the optimizer's parameters outside pm are
        frozen for it (no gradient, and a framework that builds its optimizer over the trainable
        parameters on resume, as the Hugging Face Trainer does, builds the phase's groups). One the
        optimizer leaves out stays as it is, out of the optimizer."""
        trained = {id(p) for p in self._foreign}
        buffers = {id(b) for b in self.root.buffers()} if self.root is not None else set()
        held = {}
        for name, t in self.outside_state().items():
            if id(t) in trained and t.requires_grad:
                t.requires_grad_(False)
                t.grad = None
                self._frozen_outside.append(name)
            elif id(t) in buffers:
                held[name] = t.detach().clone()
        self._held_outside = held or None

    def _hold_outside_buffers(self) -> None:
        """root's buffers outside pm back to their values at the dendrite phase's start, after each
        optimizer step of the phase (`_after_step`), as pm holds its own after each forward:
        a head's BatchNorm would move in the phase's training forwards, and evaluations and
        checkpoints inside the phase would see values its end throws away. At the step, not at
        root's forward: a training step may call root's parts directly (Lightning's training_step)."""
        put_back(self.root, [(name.split("."), value) for name, value in (self._held_outside or {}).items()])

    def _thaw_outside(self, restore_buffers: bool = True) -> None:
        if restore_buffers:  # (moved since the phase's last step: the neuron phase goes on from its start)
            self._put_outside(self._held_outside)
        self._held_outside = None
        live = self.outside_state()
        held = {id(p) for p in self._foreign}
        for name in self._frozen_outside:
            if name in live:
                live[name].requires_grad_(True)
                if id(live[name]) not in held:  # (frozen before the optimizer was built: a resume mid-phase)
                    self._foreign.append(live[name])
        self._frozen_outside = []

    def _scale_schedulers(self, scheduler, scale: list[float], divide: bool) -> None:
        """Multiply (divide) the rates `scheduler` computes lr from by each group's factor."""
        def scaled(values):
            return [v / s if divide else v * s for v, s in zip(values, scale)]

        for child in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler
            self._scale_schedulers(child, scale, divide)
        for name in ("base_lrs", "max_lrs", "min_lrs"):  # (CyclicLR: max_lrs; ReduceLROnPlateau: min_lrs)
            values = getattr(scheduler, name, None)
            if isinstance(values, (list, tuple)):
                setattr(scheduler, name, scaled(values))
        # OneCycleLR reads these keys of each group, SWALR its swa_lr (the rate it anneals to)
        keys = (("initial_lr", "max_lr", "min_lr") if isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)
                else ("swa_lr",) if isinstance(scheduler, torch.optim.swa_utils.SWALR) else ())
        for g, s in zip(scheduler.optimizer.param_groups, scale):
            for key in keys:
                if key in g:
                    g[key] = g[key] / s if divide else g[key] * s
        eta_min = getattr(scheduler, "eta_min", None)  # one floor for all groups: scaled when one factor fits all
        if isinstance(eta_min, (int, float)) and eta_min and len(set(scale)) == 1:
            scheduler.eta_min = eta_min / scale[0] if divide else eta_min * scale[0]

    def _enter_dendrite_lr(self) -> None:
        target = self.config.candidate_lr
        scale = []
        self.phase_start_lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        self._phase_params = None  # (counted at the phase's first step)
        for g in self.optimizer.param_groups:
            lr = float(g["lr"])
            # A group at lr 0 (frozen by the user, or where its schedule reaches 0) has no factor to
            # candidate_lr: its rate keeps its own course and its steps apply candidate_lr
            # (`_cap_dendrite_lr`), so the phase's end finds the rate the schedule gives it.
            s = target / lr if lr > 0 else 1.0
            scale.append(s)
            g["lr"] = lr * s
        self._rescale_schedulers(scale, entering=True)
        self._hold_plateaus()
        self.lr_scale = scale
        # The candidates' gradient (the covariance tap's) is one to descend: a group with maximize=True
        # (a loop that maximises -loss) would climb it, lowering every candidate's correlation.
        self._maximizing = [i for i, g in enumerate(self.optimizer.param_groups) if g.get("maximize")]
        for i in self._maximizing:
            self.optimizer.param_groups[i]["maximize"] = False

    def _cap_dendrite_lr(self, optimizer, args, kwargs) -> None:
        """Before each optimizer step of a dendrite phase: no group steps above candidate_lr.

        The phase starts at candidate_lr and follows its scheduler's factor relative to the start;
        a schedule that rises later (a warm-up, a warm restart, a cycle) would multiply
        candidate_lr by that rise (100x after a cosine restart near the bottom of its cycle). Only
        the step is capped: the rate goes back after it (`_uncap_dendrite_lr`), so the scheduler's
        own course, and the neuron rate recovered at the phase's end, do not change."""
        self._uncap_dendrite_lr()  # (a step that raised left its cap)
        if self.lr_scale is None:
            return
        held = sum(len(g["params"]) for g in optimizer.param_groups)
        if held != self._phase_params:  # (a group added mid-phase: a framework thawing layers, BackboneFinetuning)
            if self._phase_params is not None:
                self._hold_thawed_neurons()
            self._phase_params = held
        cap = self.config.candidate_lr
        starts = self.phase_start_lrs or [None] * len(optimizer.param_groups)
        for g, start in zip(optimizer.param_groups, starts):
            lr = g["lr"]
            if float(lr) > cap or (start == 0 and float(lr) != cap):
                self._capped.append((g, lr.clone() if isinstance(lr, torch.Tensor) else lr))
                if isinstance(lr, torch.Tensor):
                    lr.fill_(cap)
                else:
                    g["lr"] = cap

    def _hold_thawed_neurons(self) -> None:
        """Neurons made trainable inside a dendrite phase stay still until it ends (said once a phase)."""
        held = self.pm.hold_trainable_neurons()
        if held and self._says:
            warn_at_user(f"{len(held)} parameter(s) of the perforated model were made trainable during a dendrite "
                         f"phase ({held[0]}{', ...' if len(held) > 1 else ''}; a BackboneFinetuning-style thaw): "
                         "they stay still until the phase ends and train from then on, since the candidates learn "
                         "the error of a model that does not change")

    def applied_lr(self, lr: float, group: int = 0) -> float:
        """The rate an optimizer step applies to param group `group` scheduled at `lr`: in a
        dendrite phase at most candidate_lr, and candidate_lr where the phase began at lr 0
        (`_cap_dendrite_lr`), else lr. For logs, which read the scheduler's rate."""
        if self.lr_scale is None:
            return float(lr)
        starts = self.phase_start_lrs or []
        if group < len(starts) and starts[group] == 0:
            return self.config.candidate_lr
        return min(float(lr), self.config.candidate_lr)

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.optimizer_steps += 1
        self._uncap_dendrite_lr()
        if self._held_outside:
            self._hold_outside_buffers()

    def _uncap_dendrite_lr(self) -> None:
        for g, lr in self._capped:
            if isinstance(lr, torch.Tensor):
                g["lr"].copy_(lr)
            else:
                g["lr"] = lr
        self._capped = []

    def _leave_dendrite_lr(self) -> None:
        self._unscale_groups()
        if self.lr_scale is None:
            return
        self._rescale_schedulers(self.lr_scale, entering=False)
        self._release_plateaus()
        self.lr_scale = self.phase_start_lrs = self._phase_params = None

    def _unscale_groups(self) -> None:
        """The optimizer's groups from the dendrite phase's rates back to the neuron run's."""
        self._uncap_dendrite_lr()
        for i in self._maximizing:
            if i < len(self.optimizer.param_groups):
                self.optimizer.param_groups[i]["maximize"] = True
        self._maximizing = []
        if self.lr_scale is None:
            return
        floor = self._unscaled_floor(self.lr_scale)
        starts = self.phase_start_lrs or [None] * len(self.lr_scale)
        for g, s, start in zip(self.optimizer.param_groups, self.lr_scale, starts):
            # (a group that began at lr 0 kept its own course: factor 1, its rate is the neuron run's)
            g["lr"] = _unscaled_lr(float(g["lr"]), s, start, floor)

    def _unscaled_floor(self, scale: list[float]) -> float:
        """The eta_min of a cosine schedule (CosineAnnealingLR, CosineAnnealingWarmRestarts) that alone set
        the rates in this dendrite phase and
        kept its floor unscaled (groups with different factors share it), else 0. Inside a
        SequentialLR or ChainedScheduler other schedulers move the rates too: there the factor is
        divided out (exact when the cosine was not the one running)."""
        if len(set(scale)) == 1 or len(self.schedulers) != 1:
            return 0.0
        (sch,) = self.schedulers
        # (with warm restarts the cosine is a closed form of base_lrs, eta_min and its clock: the same
        # affine map of base_lrs keeps its rates the neuron run's, mapped)
        cosines = (torch.optim.lr_scheduler.CosineAnnealingLR, torch.optim.lr_scheduler.CosineAnnealingWarmRestarts)
        return float(sch.eta_min) if isinstance(sch, cosines) else 0.0

    def _rescale_schedulers(self, scale: list[float], entering: bool, schedulers: Optional[list] = None) -> None:
        """Scale (unscale) what `schedulers` (default: all attached) compute rates from, entering
        (leaving) a phase whose groups started at `phase_start_lrs`.

        Under an unscaled cosine floor, base_lrs follow the rates' affine map, not the factor: at
        its turning point the chained cosine adds (base_lr - eta_min) * (1 - cos(pi / T_max)) / 2 to
        each rate, which keeps (lr - eta_min) proportional to the neuron run's only when
        (base_lr - eta_min) maps the same way."""
        schedulers = self.schedulers if schedulers is None else schedulers
        floor = self._unscaled_floor(scale)
        if not floor:
            for sch in schedulers:
                self._scale_schedulers(sch, scale, divide=not entering)
            return
        def mapped(base: float, s: float, start: Optional[float]) -> float:
            if start is None or start == floor or start * s == floor:  # no affine map: the factor
                return base * s if entering else base / s
            k = (start * s - floor) / (start - floor)  # (lr - floor) of the phase's run / the neuron run's
            return floor + (base - floor) * (k if entering else 1 / k)

        starts = self.phase_start_lrs or [None] * len(scale)
        for sch in schedulers:  # the lone CosineAnnealingLR (or none): base_lrs are all it has to scale
            sch.base_lrs = [mapped(float(b), s, start) for b, s, start in zip(sch.base_lrs, scale, starts)]

    def _hold_plateaus(self) -> None:
        """Keep ReduceLROnPlateau schedulers from cutting the lr in the dendrite phase.

        The validation score cannot change there (the model's output does not), so a plateau
        scheduler would see `patience` bad epochs and cut the candidates' lr and, after the
        install, the neurons'. In cooldown it counts no bad epochs. When the phase ends its best
        score and cooldown come back, and the new structure gets a whole patience, as it gets a
        fresh optimizer state: the step that follows the install (whose score is the unchanged
        model's, when the framework steps the scheduler after the controller, as the HF Trainer
        and Lightning do) is not counted."""
        self.plateau_held = {}
        for i, sch in enumerate(self.schedulers):
            if isinstance(sch, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.plateau_held[i] = {k: getattr(sch, k) for k in _PLATEAU_COUNTERS}
                sch.cooldown_counter = _PLATEAU_HOLD

    def _release_plateaus(self) -> None:
        for i, held in self.plateau_held.items():
            if i < len(self.schedulers):
                sch = self.schedulers[i]
                sch.best, sch.cooldown_counter = held["best"], held["cooldown_counter"]
                sch.num_bad_epochs = -1
        self.plateau_held = {}

    def _begin_round(self) -> None:
        cfg = self.config
        if cfg.mode == "gd":
            self.pm.grow("random", self.generator)
            return
        self.pm.start_dendrite_phase(**cfg.dendrite_phase_kwargs(), generator=self.generator)
        self._enter_dendrite_lr()
        self._freeze_outside()
        self._warn_of_an_unattached_scheduler()

    def _warn_of_an_unattached_scheduler(self) -> None:
        """A scheduler built on ctl.optimizer (torch marks the optimizer's step) but never attached sets the groups
        back from candidate_lr at its next step, and after the phase sets them at the factor the phase left."""
        marked = getattr(inner_optimizer(self.optimizer).step, "_wrapped_by_lr_sched", False)
        if marked and not self.schedulers and not self._warned_unattached and self._says:
            self._warned_unattached = True
            warn_at_user("ctl.optimizer has an LR scheduler that is not attached to the controller: its steps set the "
                         "rates back from candidate_lr in the dendrite phase, and off after it: call "
                         "ctl.attach_scheduler(scheduler) once after building it (or give scheduler_factory=)")

    def _adopt_added(self) -> None:
        """pm's parameters given to a neuron-phase optimizer since it was bound (optimizer.add_param_group:
        a layer unfrozen in a group of its own, as Lightning's BackboneFinetuning does) keep that group at
        each restructure; else a restructure put them in their neuron's group (or 0). (Parameters
        outside pm added so are not the controller's: `_warn_of_unheld_parameters`.)"""
        if self._bound_phase != "neuron":  # (it holds a dendrite phase's candidates)
            return
        own = {id(p) for p in self.pm.parameters()}
        for i, g in enumerate(self.optimizer.param_groups):
            for p in g["params"]:
                if id(p) in own and p not in self._groups:
                    self._groups[p] = i

    def _execute(self, action: Action) -> None:
        if action.restructures or action.kind is Kind.COMPLETE:
            self._adopt_added()
        if action.new_best:
            self.best_state = {k: v.detach().clone() for k, v in self.pm.state_dict().items()}
            self.best_outside = {k: v.detach().clone() for k, v in self._changing_outside().items()} or None
        if action.kind in (Kind.START_DENDRITES, Kind.GROW, Kind.RETRY):
            self.restore_best()
            self._begin_round()
        elif action.kind is Kind.INSTALL:
            if not self._warned_silent_sites and self._says:
                self._warn_of_sites_without_error()
            self.pm.install_candidates(v_init=self.config.v_init)
            self._leave_dendrite_lr()
            self._thaw_outside()
        elif action.kind is Kind.COMPLETE:
            if self.pm.phase == "dendrite":
                self.pm.abort_dendrite_phase()
                self._leave_dendrite_lr()
                self._thaw_outside()
            self.restore_best()
        if action.restructures or action.kind is Kind.COMPLETE:
            self.rebind()

    def _agree(self, score: float, progress: bool) -> tuple[float, bool]:
        """Distributed runs: rank 0's score and candidate progress on every rank, all at the same step."""
        if self.distributed is None:
            _refuse_ranks_without_distributed()
            return score, progress
        if not self._settings_agreed:  # (once a run: rank-dependent settings take other decisions, or train
            # other candidates under one all-reduced statistic, silently)
            self.distributed.check_same("PhaseController settings (a digest of the PBConfig)",
                                        _settings_digest(self.config),
                                        fix="give every rank's PhaseController (or fit) the same config and keywords")
            self._settings_agreed = True
        s = self.schedule
        # The optimizer stepped, but no training forward went through ctl.model (DDP of this phase's parameters):
        # the loop trains through a wrapper of its own, which leaves the candidates' gradients unsynchronised.
        forwards = getattr(self.model, "training_forwards", None)
        bypassed = forwards == 0 and self.optimizer_steps > self._steps_agreed
        state = [s.epoch, s.dendrites, int(s.phase == "dendrite"), int(s.done), int(bypassed)]
        score, mark = self.distributed.agree([score, int(progress)], state)
        if bypassed:  # (on every rank: the state agreed)
            from .distributed import DistributedError

            raise DistributedError("the optimizer stepped, but no training forward went through ctl.model since the "
                                   "last ctl.step(): a DDP wrapper of your own leaves the candidates' and dendrites' "
                                   "gradients unsynchronised, and the ranks drift apart; drop it and train through "
                                   "ctl.model (read it after every ctl.step())")
        if forwards is not None:
            self.model.training_forwards = 0
        self._steps_agreed = self.optimizer_steps
        return score, bool(mark)

    @property
    def _says(self) -> bool:
        """Whether this process prints the run's warnings: one process, or rank 0 of several (each
        rank holds the same decisions; N ranks said each warning N times)."""
        return self.distributed is None or self.distributed.is_main

    def _warn_of_sites_without_error(self) -> None:
        """Once per run, at an install: sites whose candidates never met an error (every correlation
        exactly 0: the loss does not reach the site's output, a head no loss reads) get a dendrite
        that adds parameters and compute and changes nothing."""
        silent = [name for name, c in self.pm.correlations().items() if c.numel() and not bool(c.abs().max() > 0)]
        if silent:
            self._warned_silent_sites = True
            shown = ", ".join(map(repr, silent[:4])) + (", ..." if len(silent) > 4 else "")
            warn_at_user(f"site(s) {shown} met no error in the dendrite phase (every correlation is 0: the loss "
                         "does not reach their output, e.g. a head no loss reads), so their dendrites add parameters "
                         "and compute and change nothing: leave them out (perforate(..., exclude=[...]), pbp-fx "
                         "train --exclude NAME)")

    def _warn_if_gains_went_uncounted(self, score: float) -> None:
        """Once per run, as a neuron phase ends, where `improvement` is a tenth of the score or more:
        an epoch of the phase scored better than the best kept by at least 1 % of the score but less
        than `improvement`, so the rewind drops its weights (an MSE near 1e-3 against the default
        1e-3 never counts a gain; at an ordinary scale that is the threshold's own work)."""
        rows = [(self.schedule.epoch, score)]
        for row in reversed(self.history):
            if row["phase"] != "neuron" or row["decision"] != Decision.CONTINUE.value:
                break
            rows.append((row["epoch"], row["score"]))
        rows = [(e, s) for e, s in rows if s is not None and math.isfinite(s)]
        best = self.schedule.best_score
        if not rows or best is None:
            return
        epoch, top = (max if self.config.maximize else min)(rows, key=lambda r: r[1])
        large = self.config.improvement >= 0.1 * abs(best)  # (the threshold is a tenth of the score or more)
        if large and abs(top - best) >= 0.01 * abs(best) and ((top > best) if self.config.maximize else (top < best)):
            self._warned_small_gains = True
            warn_at_user(f"epoch {epoch} scored {top:.6g}, better than the best kept ({best:.6g}, epoch "
                         f"{self.schedule.best_epoch}) by less than improvement={self.config.improvement:g}, so the "
                         f"model goes back to epoch {self.schedule.best_epoch}'s weights: for scores of this scale give "
                         "a smaller improvement (PBConfig(improvement=...), pbp-fx train --improvement)")

    def _warn_if_the_phase_ends_warming_up(self) -> None:
        """Once per run: epochs of so few batches that max_dendrite_epochs ends a dendrite phase
        before its statistics have warmed up (its candidates are then judged on a running
        estimate that is not yet reliable, and the phase can never end by itself)."""
        pools = [s.candidates for s in self.pm.sites.values() if s.candidates is not None]
        if not pools:
            return
        epochs = 1  # of this phase so far, this one included
        for row in reversed(self.history):
            if row["phase"] != "dendrite" or row["decision"] != Decision.CONTINUE.value:
                break
            epochs += 1
        # (counted batches: what the warm-up counts; of the site that counts most: a site no gradient
        # reaches, an argmax router's, counts none whatever the batches)
        busiest = max(pools, key=lambda p: int(p.steps))
        per_epoch = int(busiest.steps) / epochs
        warmup, cap = busiest.warmup, self.config.max_dendrite_epochs
        if per_epoch and per_epoch * cap <= warmup:
            self._warned_short_phase = True
            if not self._says:
                return  # (every rank sees the same counts: rank 0 says it once)
            warn_at_user(f"a dendrite phase sees {per_epoch:g} batch(es) per epoch and its statistics warm up over "
                         f"{warmup} batches, so max_dendrite_epochs={cap} ends it before they have: use smaller "
                         f"batches, or a shorter warm-up (PBConfig(warmup=...) or a lower ema_decay)")

    def _record(self, phase: str, score: float, decision: Decision, note: str) -> None:
        self.history.append({"epoch": self.schedule.epoch, "phase": phase, "score": score,
                             "dendrites": self.pm.dendrites, "decision": decision.value, "note": note})

    @outside_inference_mode
    def step(self, val_score: float, *, cause: Optional[str] = None) -> Decision:
        """Record one epoch's validation score, carry out the schedule's action, say what happened.

        cause: what made a non-finite score, for its warning (fit: "the loss is nan"; default
        "the validation score is nan")."""
        if self.done:  # (training since, a resumed complete run's say: "complete" means the best is loaded)
            self.restore_best()
            return Decision.COMPLETE
        self.check_model()
        phase, grown = self.pm.phase, self.pm.dendrites
        # Refused before the pools' progress references move (a caller may step again with a valid
        # score). Several ranks: rank 0's score counts, which the schedule checks after agreeing.
        score = score_of(val_score)
        if phase == "neuron" and math.isfinite(score) and not self._weights_finite():
            # A metric can score NaN weights (accuracy: argmax of NaN logits is class 0); kept as the
            # best, they would be what every later rewind goes back to.
            if not self.schedule.takes_divergence:
                self._stop(nan_weights_before_best(self.schedule.epoch + 1))
            score, cause = math.nan, cause or "the weights hold NaN/Inf"
        if phase == "dendrite":
            self._check_candidates()
            if not self._warned_unstepped and self._says:
                self._warn_if_the_candidates_took_no_step()
        elif self._says and not (self._warned_unheld and self._warned_added_outside):
            self._warn_of_unheld_parameters()
        if self.distributed is None:
            check_score(score, self.schedule.takes_divergence, self.schedule.phase)
        progress = self.pm.candidate_progress(self.config.dendrite_improvement) if phase == "dendrite" else False
        if phase == "dendrite" and not self._warned_short_phase:
            self._warn_if_the_phase_ends_warming_up()
        score, progress = self._agree(score, progress)
        action = self.schedule.step(score, progress, cause)
        self._execute(action)
        decision = (Decision.COMPLETE if action.kind is Kind.COMPLETE else
                    Decision.RESTRUCTURED if action.restructures else Decision.CONTINUE)
        if phase == "neuron" and decision is not Decision.CONTINUE and not self._warned_small_gains and self._says:
            self._warn_if_gains_went_uncounted(score)
        if not math.isfinite(score):
            if self._says:
                cause = cause or f"the validation score is {score}"
                # (a new dendrite's output weight starts at v_init: a large one diverges at any rate)
                v_init = (f", or a smaller v_init (new dendrites start at |V| = {self.config.v_init:g})"
                          if self.config.v_init and grown else "")
                warn_at_user(f"{cause} at epoch {self.schedule.epoch}: the weights diverged, so "
                             f"the neuron phase ends here and the model is back at its best weights (epoch "
                             f"{self.schedule.best_epoch}); a lower learning rate avoids it{v_init}")
            score = None  # (the history is JSON)
        self._record(phase, score, decision, action.note)
        return decision

    def _weights_finite(self) -> bool:
        """Whether every floating parameter of the trained model (root, else pm) is finite (buffers may
        hold an inf on purpose: an attention mask)."""
        return all_finite((self.root if self.root is not None else self.pm).parameters())

    def _warn_of_unheld_parameters(self) -> None:
        """Once per run, at a neuron-phase step: parameters of pm that require grad but that the optimizer
        does not hold (a layer unfrozen after the optimizer was bound: it gets gradients and never moves);
        and parameters outside pm added to the optimizer after the controller was built, which it does
        not rewind with the best weights, freeze in dendrite phases, or keep at restructures."""
        held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        known = {id(p) for p in (*self.pm.parameters(), *self._foreign)}
        added = held - known
        if added and not self._warned_added_outside:
            self._warned_added_outside = True
            warn_at_user(f"ctl.optimizer holds {len(added)} parameter(s) outside the perforated model that were added "
                         "after the controller was built: it does not rewind them with the best weights, freeze them "
                         "in dendrite phases or keep them at restructures (they leave the optimizer at the next one); "
                         "add them before building the controller (PhaseController(pm, optimizer=..., root=...))")
        unheld = [] if self._warned_unheld else [
            n for n, p in self.pm.named_parameters()
            if p.requires_grad and p.numel() and id(p) not in held and p not in self._left_out]
        if unheld:
            self._warned_unheld = True
            warn_at_user(f"parameter {unheld[0]!r}{f' (and {len(unheld) - 1} more)' if len(unheld) > 1 else ''} requires "
                         "grad but ctl.optimizer does not hold it, so it does not train (unfrozen after the optimizer "
                         "was bound?): call ctl.rebind(keep_state=True) after changing requires_grad (on every rank), "
                         "before the next step")

    def _warn_if_the_candidates_took_no_step(self) -> None:
        """Once per run: the pools counted no batch this phase, or counted batches but the controller's
        optimizer (the one rebound to the candidates) took no step (the loop steps an optimizer of its
        own): untrained candidates would be installed."""
        counted = max((int(s.candidates.steps) for s in self.pm.sites.values() if s.candidates is not None), default=0)
        if not counted:  # (no batch went through pm in training mode since the phase began)
            self._warned_unstepped = True
            warn_at_user("the candidates saw no training batch this dendrite phase before ctl.step(): they stay "
                         "untrained, and would be installed so (a loader that is a one-shot iterator, such as a "
                         "generator, used up by an earlier epoch?); give a loader that starts over each epoch (a "
                         "DataLoader or a list of batches)")
        elif self.optimizer_steps == self.phase_steps_from:
            self._warned_unstepped = True
            warn_at_user(f"the candidates saw {counted} batches this dendrite phase, but ctl.optimizer took no step: "
                         "the loop steps another optimizer, which does not hold them; step ctl.optimizer (the "
                         "controller rebinds it to each phase's parameters), or pass yours as "
                         "PhaseController(pm, optimizer=...)")

    def _check_candidates(self) -> None:
        """Stop the run (`_stop`) when a candidate's weights are NaN/Inf (their NaN batches were left out
        of the statistics, which stay finite): installed, they would make the model NaN."""
        pools = {name: list(s.candidates.parameters()) for name, s in self.pm.sites.items() if s.candidates is not None}
        if all_finite(p for params in pools.values() for p in params):  # (one host read for every pool)
            return
        name = next(name for name, params in pools.items() if not all_finite(params))
        self._stop(f"the candidates' weights of site {name!r} are not finite: lower candidate_lr")

    def stop_non_finite(self, without_best: str = "no good state to restore yet (no epoch ended with a finite "
                                                   "validation score)") -> str:
        """End the run at a NaN/Inf it cannot go on from (`finish`: its best weights back); say what was
        restored (`without_best` when no best was kept)."""
        had_best = self.best_state is not None
        self.finish(NON_FINITE_STOP)
        return f"stopped and restored the best-validation model (epoch {self.best_epoch})" if had_best else without_best

    def _stop(self, problem: str) -> None:
        """Stop the run (`stop_non_finite`) in any loop: fit's, the trainers' callbacks, one's own; raise
        a NonFiniteError naming `problem` and what was restored."""
        restored = self.stop_non_finite("stopped: no best weights kept yet, so the model still holds them")
        raise NonFiniteError(f"{problem}; {restored}")

    def check_model(self) -> None:
        """A TrainingError when the model's phase or dendrites are not the controller's: they were
        changed outside the controller, and the optimizer trains the other phase's parameters
        (nothing would train), or a checkpoint would hold a schedule its model does not fit."""
        if not self.done and self.pm.phase == self.schedule.phase and self.pm.dendrites != self.schedule.dendrites:
            raise TrainingError(f"the model has {self.pm.dendrites} dendrite(s) per site but its PhaseController's "
                                f"schedule {self.schedule.dendrites}: its structure was changed outside the "
                                "controller (pm.grow(), install_candidates, pbp_fx.load without controller=), which "
                                "its schedule and checkpoints would not hold; load checkpoints with "
                                "pbp_fx.load(path, model, controller=ctl, optimizer=ctl.optimizer), build the "
                                "PhaseController on the model as it is (after grow), or let the controller add "
                                "dendrites")
        if not self.done and self.pm.phase != self.schedule.phase:
            raise TrainingError(f"the model is in a {self.pm.phase} phase but its PhaseController is in a "
                                f"{self.schedule.phase} phase: the model's phase was changed outside the controller "
                                "(start_dendrite_phase, install_candidates, abort_dendrite_phase, or pbp_fx.load "
                                "without controller=); let the controller change phases (a resume: pbp_fx.load(path, "
                                "pm, controller=ctl)), or build a new PhaseController on the model as it is")

    @outside_inference_mode
    def finish(self, note: str = "stopped") -> None:
        """End the run now (epoch cap, an error): drop candidates, load the best weights, mark it complete."""
        phase = self.pm.phase
        self._execute(self.schedule.stop(note))
        self._record(phase, self.best_score, Decision.COMPLETE, note)
        # (its score and dendrites are the best model's, which the stop restored, not the epoch's)
        self.history[-1]["restored_best"] = True

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume: the schedule, history, lr factors and the best weights."""
        self._uncap_dendrite_lr()
        return {"schedule": self.schedule.state_dict(), "history": copy.deepcopy(self.history),
                "lr_scale": None if self.lr_scale is None else list(self.lr_scale),
                "lrs": [float(g["lr"]) for g in self.optimizer.param_groups],
                "phase_start_lrs": None if self.phase_start_lrs is None else list(self.phase_start_lrs),
                "maximizing": list(self._maximizing),
                "left_out": sorted(n for n, p in self.pm.named_parameters() if p in self._left_out),
                "plateau_held": {str(i): dict(v) for i, v in self.plateau_held.items()},
                "generator": self.generator.get_state(), "best_state": self.best_state,
                "best_outside": self.best_outside, "frozen_outside": list(self._frozen_outside),
                "held_outside": self._held_outside,
                # (the current values outside pm, a head beside it: pbp_fx.save(pm) keeps pm's alone)
                "outside": {n: t.detach().clone() for n, t in self._changing_outside().items()} or None}

    @outside_inference_mode
    def load_state_dict(self, state: dict, keep_optimizer_state: bool = False) -> None:
        """Restore a state_dict() (load the model's state first: the optimizer is rebound to it).

        keep_optimizer_state: keep the optimizer's per-parameter state for the parameters it
        still holds (a framework restored it on resume); by default it is cleared."""
        saved = state.get("schedule") or {}
        if (saved.get("phase"), saved.get("dendrites")) != (self.pm.phase, self.pm.dendrites):
            # (the optimizer state saved beside it would then step parameters of other shapes)
            raise TrainingError(f"the controller state is of a {saved.get('phase')} phase with {saved.get('dendrites')} "
                                f"dendrite(s) per site, but the model is in a {self.pm.phase} phase with "
                                f"{self.pm.dendrites}: load the model's structure with it, pbp_fx.load(path, pm, "
                                "controller=ctl) from a pbp_fx.save checkpoint (pm.load_state_dict leaves a dendrite "
                                "phase's candidate pool out)")
        self.schedule.load_state_dict(state["schedule"])
        self.history = copy.deepcopy(state["history"])
        scale = None if state.get("lr_scale") is None else list(state["lr_scale"])
        # Schedulers attached before: from this controller's factor to the saved one; those restored
        # from the run (attach_scheduler(scaled=True)) have the saved factor already.
        fresh = [sch for sch in self.schedulers if not any(sch is c for c in self._carry_saved_scale)]
        if self.lr_scale is not None:
            self._rescale_schedulers(self.lr_scale, entering=False, schedulers=fresh)
            if scale is None:  # a neuron-phase state: the groups leave this controller's dendrite-phase rates
                self._unscale_groups()
        self.phase_start_lrs = state.get("phase_start_lrs")
        if scale is not None:
            self._rescale_schedulers(scale, entering=True, schedulers=fresh)
        self.lr_scale = scale
        if scale is not None:  # (the groups a dendrite phase turned to descend; before it was saved: those maximizing)
            self._maximizing = list(state["maximizing"]) if "maximizing" in state else sorted({
                *self._maximizing, *(i for i, g in enumerate(self.optimizer.param_groups) if g.get("maximize"))})
            for i in self._maximizing:
                if i < len(self.optimizer.param_groups):
                    self.optimizer.param_groups[i]["maximize"] = False
        self._carry_saved_scale = []  # every scheduler carries this controller's (now the saved) factor
        if not self._left_out_known and state.get("left_out"):
            params = dict(self.pm.named_parameters())
            for name in state["left_out"]:
                if name in params:
                    self._left_out[params[name]] = True
        self.plateau_held = {int(i): dict(v) for i, v in state.get("plateau_held", {}).items()}
        if state.get("generator") is not None:  # (a state saved before it existed: keep this run's)
            self.generator.set_state(state["generator"])
        self.best_state = state["best_state"]
        self.best_outside = state.get("best_outside")  # (None in a state saved before it existed)
        self._put_outside(state.get("outside"))  # (None in a state saved before it existed)
        if "frozen_outside" in state:  # (what the run's phase froze: the framework's resume may have frozen it)
            self._thaw_outside(restore_buffers=False)
            live = self.outside_state()
            self._held_outside = state.get("held_outside")
            self._frozen_outside = [n for n in state["frozen_outside"] if n in live]
            for name in self._frozen_outside:
                live[name].requires_grad_(False)
        if self.best_outside:
            missing = sorted(set(self.best_outside) - set(self.outside_state()))
            if missing:
                raise ConfigError(f"the run's best state holds {missing[0]!r} outside the perforated model, which this "
                                  "controller does not train: pass the run's root= module and optimizer")
        lrs = state.get("lrs")
        if self.lr_scale is not None and lrs is not None and len(lrs) == len(self.optimizer.param_groups):
            # In a dendrite phase the groups run at the candidates' rates: a fresh optimizer has the
            # neuron rates, which the install would divide by the factor again.
            for g, lr in zip(self.optimizer.param_groups, lrs):
                g["lr"] = lr
        held = sum(1 for per_param in self.optimizer.state.values() if per_param)
        if held and not keep_optimizer_state:  # (optimizer.load_state_dict first, then this: its state was lost)
            warn_at_user(f"ctl.load_state_dict clears the state the optimizer holds ({held} parameter(s)' moments or "
                         "buffers): load the optimizer's state after the controller's, or pass "
                         "keep_optimizer_state=True to keep it")
        self.rebind(keep_optimizer_state)
