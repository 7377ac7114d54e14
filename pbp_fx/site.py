"""Site modules: a neuron's output plus its dendrites (docs/algorithm.md).

`Site(x, n)` takes the neuron layer's input x and its output n (after a joined norm) and
returns y = n + sum_k V[k] * s_k. The neuron itself stays in the user's graph; a Site only
adds. `FusedSite(x)` is the eval-only form that `finalize` emits: neuron and dendrites as
one layer over concatenated, norm-folded weights.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from . import native
from .config import DENDRITE_PHASE_ARGS, MODES, ConfigError, PBConfig
from .covariance_tap import STAT_NAMES, EagerNormTap, EagerTap, batch_covariance, covariance_tap, fold_batch
from .errors import CheckpointError, NonFiniteError, PhaseError, warn_at_user
from .layers import (LayerCopies, LayerSpec, NormSpec, apply_dendrites, cascade_chain, cat_rows, channel_view,
                     copy_dim, every_nth_position, own_tensor, split_members, StandIn)
from .schedule import site_progressed

__all__ = ["Site", "CandidatePool", "FusedSite", "SwappedNeuron", "FusedSwappedNeuron", "ACTIVATIONS", "MODES",
           "dendrites_silenced", "is_wide_statistic", "pool_settings"]

# The pool's floating statistics: float32 at least, whatever the model's dtype (they sum many
# small covariances, and the stop rule compares their changes).
WIDE_STATISTICS = ("ema", "ema_sq", "best", "progress_reference")


def is_wide_statistic(key: str) -> bool:
    """Whether a state_dict key names one of a candidate pool's WIDE_STATISTICS: not the model's
    dtype, so a checkpoint's or model's dtype is read without them."""
    head, _, last = key.rpartition(".")
    return last in WIDE_STATISTICS and head.endswith("candidates")

ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}  # (config.ACTIVATION_NAMES)


# addcmul, as in layers.cascade_chain: one pass over the activation instead of a Mul and an Add.
def _weighted_sum(n: Tensor, acts: list[Tensor], out_weight: Tensor, axis: int) -> Tensor:
    y = n
    for k, s in enumerate(acts):
        y = torch.addcmul(y, channel_view(out_weight[k], s.dim(), axis), s)
    # Under autocast n is in the low precision and V (and U) in float32, which addcmul promotes to: the
    # site's output keeps the neuron's dtype, as the layer's own output would.
    return y if y.dtype == n.dtype else y.to(n.dtype)


# The keyword settings of a pool beyond its size and initialisation (PerforatedModel.start_dendrite_phase's **stats).
POOL_SETTINGS = tuple(arg for arg in DENDRITE_PHASE_ARGS if arg not in ("pool", "init"))


class CandidatePool(nn.Module):
    """P candidate dendrites for one site, trained on the covariance with the site error.

    Statistics (docs/algorithm.md, "The dendrite phase"): per batch C[p, i] = sum_pos (c - mean c)(delta - mean delta);
    `ema` is its 0.99 moving average; `best` is each (p, i)'s best |ema| after warm-up, and
    `snapshot_*` hold that row's weights at its best. Installation reads the snapshots.

    split=True (default): each member sees only its own 1/P of every batch (a contiguous
    slice; `layers.split_members`), so the pool costs one layer's work, not P layers'. Its C
    is P x the slice's covariance: an estimate of the whole batch's, in the same units.
    split=False: every member sees the whole batch (P x the work).

    stride=n > 1: the candidates see every n-th position of each spatial (or token) dim of the
    site, so a d-D conv pool does about 1/n^d of its FLOPs: a conv runs with n x its stride, a
    token Linear reads every n-th token (the paired one-round test found no loss of selection at
    n = 2: bench/results/candidate_stride.md). C is scaled by the positions left out, in
    whole-batch units like split's. A site where no such conv exists (an even
    kernel's "same" padding) and a Linear without token dims see every position.

    `reducer` (None: one process) sums a batch's statistics over the ranks of a distributed
    run, so that C is the global batch's on every rank; `pbp_fx.distributed` installs it.
    """

    def __init__(self, layer: LayerSpec, norm: Optional[NormSpec], pool: int, installed: int,
                 activation: str, init: str = PBConfig.candidate_init, init_scale: float = 1.0,
                 ema: float = PBConfig.ema_decay, warmup: Optional[int] = PBConfig.warmup,
                 threshold: float = PBConfig.snapshot_threshold, bias_correction: bool = PBConfig.bias_correction,
                 split: bool = PBConfig.pool_split, stride: int = PBConfig.candidate_stride, device=None, dtype=None,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if not 0.0 < ema < 1.0:
            raise ConfigError(f"ema={ema}: the EMA decay must be in (0, 1)")
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise ConfigError(f"pool={pool!r}: the candidate pool size must be a whole number >= 1")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ConfigError(f"stride={stride!r}: the candidates' position stride must be a whole number >= 1")
        self.layer, self.activation = layer, activation
        self.ema_decay, self.threshold, self.bias_correction = ema, threshold, bias_correction
        # Best |C~| and snapshots wait until the EMA averages ~1/(1-decay) batches.
        self.warmup = round(1.0 / (1.0 - ema)) if warmup is None else warmup
        self.split = split
        strided = layer.every_nth(stride)
        # The stride the candidates' positions actually have (1 where the layer has no strided form).
        self.stride = stride if strided is not None else 1
        # Whether the first forward strided any position (None: not run yet); a Linear's positions
        # are its input's token dims, known only then. Not state.
        self.positions_strided: Optional[bool] = None
        c = layer.channels
        fk = {"device": device, "dtype": dtype}
        self.copies = LayerCopies(strided or layer, norm, pool, **fk)
        self.copies.reset_parameters(init, init_scale, generator)
        # Cascade weights from installed dendrites, stored [P, C, K] so rows lead with (p, c).
        # Empty (no installed dendrite) it has nothing to train: frameworks that build optimizers from
        # requires_grad (the HF Trainer) must not count it.
        self.cascade = nn.Parameter(torch.zeros(pool, c, installed, **fk), requires_grad=installed > 0)
        # WIDE_STATISTICS in float32 at least, whatever the model's or autocast's dtype.
        sk = {"device": device, "dtype": torch.promote_types(dtype or torch.get_default_dtype(), torch.float32)}
        self.register_buffer("ema", torch.zeros(pool, c, **sk))
        self.register_buffer("ema_sq", torch.zeros(pool, c, **sk))  # of C^2: the noise of the estimate
        self.register_buffer("best", torch.zeros(pool, c, **sk))
        # Batches counted (finite ones), on the device: no host sync per batch.
        self.register_buffer("steps", torch.tensor(0, device=device))
        # Batches observed, finite or not; saved as extra state (the format checkpoints have).
        self.register_buffer("batches_seen", torch.tensor(0, device=device), persistent=False)
        # Step of the last snapshot, kept on the device and read once per epoch.
        self.register_buffer("last_improved", torch.tensor(0, device=device))
        # Site mean correlation at the last epoch that made progress (epoch_progress; checkpointed).
        self.register_buffer("progress_reference", torch.tensor(0.0, **sk))
        # Not state: set per run by pbp_fx.distributed.Distributed.wrap (see covariance()).
        self.reducer = None
        # Not state: a torch.amp.GradScaler whose scale divides delta before the statistics.
        self.grad_scaler = None
        # Not state: the native covariance kernel's arguments from this pool's own tensors, checked once.
        self.kernel_arguments = native.PreparedArguments()
        for name, t in self._rows().items():
            self.register_buffer("snapshot_" + name, t.detach().clone())

    def __setstate__(self, state):
        super().__setstate__(state)
        # (a pool pickled before the kernel arguments existed has none)
        self.__dict__.setdefault("kernel_arguments", native.PreparedArguments())

    def _apply(self, fn, recurse: bool = True):
        # .half() / .to(bfloat16) of the model must not narrow the statistics: they keep float32
        # (converted from their values before, not after a round trip through the narrow dtype).
        before = {n: self._buffers[n] for n in WIDE_STATISTICS}
        out = super()._apply(fn, recurse)
        for n, old in before.items():
            new = self._buffers[n]
            wide = torch.promote_types(new.dtype, torch.float32)
            if new.dtype != wide:
                self._buffers[n] = old.to(device=new.device, dtype=wide)
        return out

    @property
    def pool_size(self) -> int:
        return self.copies.copies

    def _rows(self) -> dict[str, Tensor]:
        rows = self.copies.row_tensors()
        rows["cascade"] = own_tensor(self, "cascade")
        return rows

    def splits(self, batch: int) -> bool:
        """Whether a batch of this size is dealt to the members (split mode, at least two samples each:
        a candidate's BatchNorm needs more than one value per channel)."""
        return self.split and batch >= 2 * self.pool_size

    def forward(self, x: Tensor, acts: list[Tensor], y: Optional[Tensor] = None, unheld: bool = False) -> Tensor:
        """Candidate activations c: [B', P, C, *S] or [B', *mid, P, C]; B' = B // P when split, S and
        mid every `stride`-th position. With y (the site output): y through the covariance tap on c
        instead (`tap`), where native kernels run the norm and sigmoid one autograd node with the tap."""
        split = self.splits(x.shape[0])
        p, axis, n = self.pool_size, self.layer.axis, self.stride
        if self.split and self.reducer is not None and not self.reducer.warned_uneven:
            self._warn_dealt_otherwise(x.shape[0], split)
        if self.positions_strided is None and not torch.compiler.is_compiling():
            self.positions_strided = n > 1 and (axis == 1 or x.dim() > 2)
        if axis == -1:  # a Linear's positions are its input's (a conv's: its strided form's outputs)
            x = every_nth_position(x, n, axis)
        extra = None  # the cascade from the installed dendrites' activations
        for j, s in enumerate(acts):
            s = every_nth_position(s, n, axis)
            u = self.cascade[:, :, j]  # [P, C]
            if axis == 1:  # [P, C, 1..] against [B', P|1, C, *S]
                u = u.reshape(*u.shape, *([1] * (s.dim() - 2)))
            term = u * (split_members(s, p, axis) if split else s.unsqueeze(copy_dim(axis)))
            extra = term if extra is None else extra + term
        activation = ACTIVATIONS[self.activation]
        if y is None:
            return self.copies(x, split=split, extra=extra, activation=activation)
        z = self.copies.layer_output(x, split)
        norm = self.copies.native_norm(z, extra) if activation is torch.sigmoid else None
        if norm is None:
            return self.tap(y, self.copies.activate(z, extra, activation, native_tried=True), split, unheld)
        z, extra, weight, bias = norm[:4]
        return EagerNormTap.apply(y, z, extra, weight, bias, norm[4:], self._tap_options(split), unheld)

    def _warn_dealt_otherwise(self, batch: int, split: bool) -> None:
        """Warn (once a run) when this rank deals its batch to the members otherwise than one
        process deals the global batch (R x this one): the distributed statistics are then not
        those of a 1-process run."""
        p, ranks = self.pool_size, self.reducer.world_size
        if split and batch % p:
            why = f"is not a multiple of the pool's {p} members (and leaves {batch % p} out)"
        elif not split and p > 1 and self.splits(batch * ranks):
            why = (f"is smaller than 2 x the pool's {p} members, so every member sees all of it, while the "
                   f"{ranks} ranks' {batch * ranks} samples would be dealt to them")
        else:
            return
        self.reducer.warned_uneven = True
        warn_at_user(f"a rank's batch of {batch} samples {why}: the ranks deal the global batch to the candidates "
                     "otherwise than one process does, so the candidates differ from a 1-process run's; use a "
                     f"per-rank batch that is a multiple of {p} and at least {2 * p} (DataLoader(drop_last=True) "
                     "for a short last batch), or pool_split=False")

    def _stats(self) -> list[Tensor]:
        return [own_tensor(self, name) for name in STAT_NAMES]

    def _snapshots(self, rows: dict[str, Tensor]) -> list[Tensor]:
        return [own_tensor(self, "snapshot_" + name) for name in rows]

    def _settings(self) -> tuple:
        return (self.ema_decay, self.warmup, self.threshold, self.bias_correction)

    @torch.no_grad()
    def covariance(self, c: Tensor, d: Tensor, axis: int = -1) -> tuple[Tensor, Tensor]:
        """A batch's covariance C [P, C] of the candidates c with the site error d, and e
        (`covariance_tap.batch_covariance`, summed over the ranks when a reducer is set)."""
        return batch_covariance(c, d, axis, self.layer.channels, self.reducer)

    @torch.no_grad()
    def observe(self, cov: Tensor) -> Tensor:
        """Fold one batch's covariance [P, C] (already global) into the statistics; returns sign(ema),
        or None for a batch skipped as not finite (`covariance_tap.fold_batch`)."""
        rows = self._rows()
        snapshots = self._snapshots(rows)
        return fold_batch(self._stats(), snapshots, list(rows.values()), cov, self._settings())

    def tap(self, y: Tensor, c: Tensor, split: bool, unheld: bool = False) -> Tensor:
        """y unchanged; its backward trains the candidates c on the site error dL/dy and updates
        the statistics (`covariance_tap`: custom ops under torch.compile, so the site stays in
        one graph; an autograd.Function in eager runs, which also all-reduces with a reducer).

        unheld: nothing else holds y (the site made it, or `Site.neuron_output_unheld`), so the eager tap
        may return it instead of a copy."""
        if self.reducer is None and torch.compiler.is_compiling():
            return covariance_tap(y, c, *self._tap_options(split)[:8])
        return EagerTap.apply(y, c, *self._tap_options(split), unheld)

    def _tap_options(self, split: bool) -> tuple:
        """The eager tap's arguments after y and c: (stats, snapshots, rows, axis, split, stride, scale,
        settings, reducer, prepared); covariance_tap takes the first eight."""
        rows = self._rows()
        return (self._stats(), self._snapshots(rows), list(rows.values()), self.layer.axis, split, self.stride,
                self.loss_scale(), self._settings(), self.reducer, self.kernel_arguments)

    def loss_scale(self) -> Optional[float]:
        """The scale the loss was multiplied by before backward (grad_scaler's); None without
        one (a scaler's scale may itself be 1, and its skipped steps need a NaN gradient)."""
        scaler = self.grad_scaler
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None

    def get_extra_state(self) -> Tensor:
        # A tensor, not a dict: state_dict() must hold tensors only for safetensors writers
        # (the Hugging Face Trainer saves model.state_dict() that way). It carries the pool's
        # settings, which are no tensors, so that a state dict rebuilds the same pool
        # (`pool_settings`; a framework's own resume has nothing else to go by). int64, the two real
        # settings as their float64 bits: a floating tensor would pass for one of the model's dtype.
        bits = torch.tensor([self.ema_decay, self.threshold], dtype=torch.float64).view(torch.int64).tolist()
        return torch.tensor([int(self.batches_seen), bits[0], self.warmup, bits[1], int(self.bias_correction),
                             int(self.split), self.stride], dtype=torch.int64)

    def set_extra_state(self, state) -> None:
        settings = pool_settings(state)
        if settings is not None:  # (the pool's settings come with its statistics: a plain load_state_dict too)
            if settings["stride"] != self.stride:  # (its layer's strided form is structure, not state: kept)
                warn_at_user(f"the state's candidate pool has position stride {settings['stride']}, this one "
                             f"{self.stride}, which it keeps: to go on as the state's, start the dendrite phase with "
                             f"stride={settings['stride']} before loading it (pbp_fx.load does)")
            self.ema_decay, self.warmup, self.threshold = settings["ema"], settings["warmup"], settings["threshold"]
            self.bias_correction, self.split = settings["bias_correction"], settings["split"]
            seen = state[0]
        else:  # (a dict, or a scalar: files written before the settings were)
            seen = state["seen"] if isinstance(state, dict) else state
        self.batches_seen.fill_(int(seen))

    def noise(self) -> Tensor:
        """Standard error of each ema entry [P, C], from the batches' spread of C."""
        var = (self.ema_sq - self.ema * self.ema).clamp(min=0)
        d = self.ema_decay
        # Variance of a decay-weighted mean of t iid batches: ~1/t early, (1-d)/(1+d) later.
        t = max(int(self.steps), 1)
        return (var * max(1.0 / t, (1.0 - d) / (1.0 + d))).sqrt()

    @torch.no_grad()
    def epoch_progress(self, rel: float) -> bool:
        """Whether the site's correlation rose beyond its noise since the last progress (the rule:
        `schedule.site_progressed`); on progress the reference moves to the current value. Call once per
        epoch; the reference is a buffer, so it is checkpointed."""
        counted = int(self.steps)
        if counted <= self.warmup:
            return site_progressed(counted, self.warmup, 0.0, 0.0, 0.0, rel)
        score = self.ema.abs()
        pick = score.argmax(0, keepdim=True)
        value = score.gather(0, pick).mean()
        # Standard error of the channel mean, not the mean of the channels' errors (which is
        # sqrt(C) times too strict for independent channels and ends phases early).
        se_c = self.noise().gather(0, pick)
        se = se_c.square().sum().sqrt() / se_c.numel()
        # (read to the host in one transfer; the rule compares Python floats)
        value_, se_, ref_ = (float(t) for t in torch.stack([value, se, self.progress_reference.reshape(())]))
        if site_progressed(counted, self.warmup, value_, se_, ref_, rel):
            self.progress_reference.copy_(value)
            return True
        return False

    def correlation(self) -> Tensor:
        """Per channel, the best |C~| over the pool, [C]."""
        return self.best.amax(0) if int(self.steps) > self.warmup else self.ema.abs().amax(0)

    def selected_rows(self) -> tuple[dict[str, Tensor], Tensor]:
        """Per channel, the snapshot row of the pool member with the best |C~|; and sign(C~)."""
        seen = self.best.amax(0) > 0
        score = torch.where(seen.unsqueeze(0), self.best, self.ema.abs())
        pick = score.argmax(0)  # [C]
        ch = torch.arange(pick.numel(), device=pick.device)
        rows = {}
        for name, t in self._rows().items():
            snap = getattr(self, "snapshot_" + name)
            # Channels never snapshotted (no improvement recorded) take the current weights.
            src = torch.where(seen.reshape(1, -1, *([1] * (t.dim() - 2))), snap, t.detach())
            rows[name] = src[pick, ch].unsqueeze(0)
        return rows, torch.sign(self.ema[pick, ch])


def pool_settings(extra_state) -> Optional[dict]:
    """The start_dendrite_phase settings a CandidatePool's extra state records (None: a state
    written before it recorded them)."""
    if not isinstance(extra_state, Tensor) or extra_state.numel() != 7 or extra_state.dtype != torch.int64:
        return None
    _, ema_bits, warmup, threshold_bits, bias_correction, split, stride = extra_state.tolist()
    ema, threshold = torch.tensor([ema_bits, threshold_bits], dtype=torch.int64).view(torch.float64).tolist()
    return {"ema": ema, "warmup": warmup, "threshold": threshold, "bias_correction": bool(bias_correction),
            "split": bool(split), "stride": stride}


# torch's modules whose forward returns a new tensor and whose backward saves nothing of it (ReLU's would);
# insert_dendrites makes a site's output node the neuron layer or its BatchNorm.
_OWN_OUTPUT_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                       nn.SyncBatchNorm)
# The backward nodes of those modules' last ops (any other: a module swapped in, or an op this list lacks).
_OUTPUT_UNSAVED_BACKWARDS = frozenset({"AddmmBackward0", "MmBackward0", "ConvolutionBackward0",
                                       "NativeBatchNormBackward0", "CudnnBatchNormBackward0",
                                       "MiopenBatchNormBackward0", "SyncBatchNormBackward"})
FUNCTION_MADE = "function"  # (Site.output_made_by: the neuron layer called as a function)


def _unbatched(layer: LayerSpec, x: Tensor) -> bool:
    """Whether the input is one sample without a batch dim: a conv's [C, *S], a Linear's [In] (as
    nn.ConvNd and nn.Linear accept)."""
    return x.dim() == (len(layer.weight_shape) - 1 if layer.axis == 1 else 1)


class Site(nn.Module):
    """One neuron site: installed dendrites (DendriteStack), optional candidate pool.

    Attributes follow docs/algorithm.md, "What a site computes": `dendrites` holds D_1..D_K (with their norm copies),
    `cascade` is U as [K, C, K] (only j < k is read), `out_weight` is V, [K, C].
    """

    def __init__(self, name: str, layer: LayerSpec, norm: Optional[NormSpec] = None,
                 activation: str = PBConfig.activation, mode: str = PBConfig.mode):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"activation {activation!r} is not supported: use one of {sorted(ACTIVATIONS)}")
        if mode not in MODES:
            raise ConfigError(f"mode {mode!r} is not supported: use 'pb' or 'gd'")
        self.name, self.layer, self.norm = name, layer, norm
        self.activation, self.mode = activation, mode
        self.dendrites: Optional[LayerCopies] = None
        self.cascade: Optional[nn.Parameter] = None
        self.out_weight: Optional[nn.Parameter] = None
        self.candidates: Optional[CandidatePool] = None
        # Follows .to() so new dendrites are created on the site's device and dtype.
        self.register_buffer("_anchor", torch.empty(0), persistent=False)

    # -- description ---------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.layer.kind

    @property
    def channels(self) -> int:
        return self.layer.channels

    @property
    def axis(self) -> int:
        return self.layer.axis

    @property
    def num_dendrites(self) -> int:
        return 0 if self.dendrites is None else self.dendrites.copies

    @property
    def params_per_dendrite(self) -> int:
        """Parameters one more dendrite adds: the layer copy, its norm, V and U entries."""
        c = self.channels
        norm = 2 * c if self.norm is not None and self.norm.affine else 0
        return self.layer.params_per_copy + norm + c + c * self.num_dendrites

    def extra_repr(self) -> str:
        return (f"{self.name!r}, {self.kind}, channels={self.channels}, dendrites={self.num_dendrites}, "
                f"activation={self.activation}, mode={self.mode}")

    # -- forward -------------------------------------------------------------------
    def forward(self, x: Tensor, n: Tensor) -> Tensor:
        # (submodules read from the module's own dict: through Module.__getattr__ each read took ~1 us, and this
        # runs for every site and step)
        dendrites, candidates = self._modules.get("dendrites"), self._modules.get("candidates")
        if dendrites is None and candidates is None:
            return n
        if _unbatched(self.layer, x):  # (a conv takes [C, *S] as one sample; the dendrites' layout has a batch dim)
            return self.forward(x.unsqueeze(0), n.unsqueeze(0)).squeeze(0)
        # Dendrites and pools made while the model was in eval mode (a restructure during a
        # framework's validation) follow the site's mode: Lightning restores the modes it saw
        # before validation, which do not include modules created during it. Their norm copies
        # also follow the norm they copy (a model that keeps it in eval mode while training).
        source = self.__dict__.get("_mode_source")
        mode = self.training and (source is None or source.training)
        for part in (dendrites, candidates):
            if part is not None and part.training != mode:
                part.train(mode)
        # "Perforated": dendrites and candidates see the input behind a stop-gradient.
        src = x.detach() if self.mode == "pb" else x
        y, acts = n, []
        if dendrites is not None:
            acts = dendrites.cascade_activations(src, self.cascade, ACTIVATIONS[self.activation])
            y = _weighted_sum(n, acts, self.out_weight, self.axis)
        if candidates is not None and self.training and torch.is_grad_enabled():
            unheld = y is not n or self.neuron_output_unheld(n)
            y = candidates(src, [s.detach() for s in acts], y=y, unheld=unheld)
        return y

    def output_made_by(self, maker) -> None:
        """Record what makes the neuron output this site alone reads: a module (the neuron layer or its norm),
        FUNCTION_MADE (the neuron layer called as a function) or None (unknown). Held, not registered (as
        `follow_mode_of`)."""
        self.__dict__["_output_maker"] = maker

    def neuron_output_unheld(self, n: Tensor) -> bool:
        """Whether nothing but this site can hold the neuron output n, so that the covariance tap may return it
        itself, declared modified, instead of a copy: n is not a view, made by a function or by one of torch's own
        layer or norm modules with no hooks of its own (nor this site any pre-hook) and no global module hooks
        (a forward hook may have saved n for an op's backward, a full backward hook made it a view), and, where
        n has a gradient, by an op whose backward saves nothing of its output (a module swapped in after the
        graph was made is not the one recorded). Not while compiling (mark_dirty breaks the graph)."""
        maker = self.__dict__.get("_output_maker")
        if maker is None or n._base is not None or torch.compiler.is_compiling() or self._forward_pre_hooks:
            return False
        if maker != FUNCTION_MADE and (type(maker) not in _OWN_OUTPUT_MODULES or "forward" in maker.__dict__
                                       or maker._forward_hooks or maker._backward_hooks or maker._backward_pre_hooks):
            return False
        hooks = torch.nn.modules.module
        if (hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
                or hooks._global_backward_pre_hooks):
            return False
        return n.grad_fn is None or type(n.grad_fn).__name__ in _OUTPUT_UNSAVED_BACKWARDS

    def follow_mode_of(self, norm: Optional[nn.Module]) -> None:
        """Run the dendrites' and candidates' norm copies in the mode of `norm`, the norm module they
        copy, while the site trains: a model that keeps that norm in eval mode while training
        (mmdetection's norm_eval, a fine-tuning `bn.eval()`) keeps its copies so too. Held, not
        registered: nothing of the site's parameters or state."""
        self.__dict__["_mode_source"] = norm

    # -- structure changes ---------------------------------------------------------
    def _factory(self) -> dict:
        return {"device": self._anchor.device, "dtype": self._dtype()}

    def _dtype(self) -> torch.dtype:
        for t in (self.out_weight, self.cascade):
            if t is not None:
                return t.dtype
        return self._anchor.dtype

    def _append(self, rows: dict[str, Tensor], cascade_row: Tensor, v: Tensor,
                rows_from: Optional[LayerCopies] = None) -> None:
        """Install one dendrite from its rows ([1, C, ...] each), U row [C, K] and V row [C];
        `rows_from`: the layer copies the rows were trained in (their norm's batch count)."""
        k, c = self.num_dendrites, self.channels
        fk = self._factory()
        trainable = self.mode == "gd"
        parts = ([] if self.dendrites is None else [self.dendrites.row_tensors()]) + [rows]
        new = cat_rows(self.layer, self.norm, parts, requires_grad=trainable, **fk)
        new.train(self.training)
        if self.norm is not None and rows_from is not None:
            # A BatchNorm with momentum None averages over the batches counted: from 0, the next
            # batch would overwrite the running statistics of every dendrite. (A grown row, at its
            # init statistics, is no such average: the count restarts for it and the others.)
            counted = self.dendrites if self.dendrites is not None else rows_from
            new.num_batches_tracked.copy_(counted.num_batches_tracked)
        u = torch.zeros(k + 1, c, k + 1, **fk)
        v_all = torch.zeros(k + 1, c, **fk)
        with torch.no_grad():
            if k:
                u[:k, :, :k] = self.cascade.detach()
                v_all[:k] = self.out_weight.detach()
            u[k, :, :k] = cascade_row.to(u)
            v_all[k] = v.to(v_all)
        self.dendrites = new
        self.cascade = nn.Parameter(u, requires_grad=trainable)
        self.out_weight = nn.Parameter(v_all)

    def grow(self, init: str = "random", generator: Optional[torch.Generator] = None) -> None:
        """Install one dendrite with fresh weights (the layer's own init); U and V start at 0."""
        if init != "random":
            raise ConfigError(f"grow(init={init!r}): only 'random' is supported; "
                              "correlation-trained dendrites come from install_candidates()")
        fresh = LayerCopies(self.layer, self.norm, 1, **self._factory())
        fresh.reset_parameters("default", generator=generator)
        self._append(fresh.row_tensors(), torch.zeros(self.channels, self.num_dendrites), torch.zeros(self.channels))

    def start_candidates(self, pool: int = PBConfig.pool, init: str = PBConfig.candidate_init,
                         init_scale: float = 1.0, generator: Optional[torch.Generator] = None,
                         **stats) -> CandidatePool:
        """Attach a fresh pool of P candidates (docs/algorithm.md, "The dendrite phase"); they add exactly 0
        to the output."""
        self.candidates = CandidatePool(self.layer, self.norm, pool, self.num_dendrites, self.activation,
                                        init, init_scale, **stats, **self._factory(), generator=generator)
        self.candidates.train(self.training)
        return self.candidates

    def install_candidates(self, v_init: float = PBConfig.v_init) -> None:
        """Freeze the best pool member per channel as dendrite K+1; V starts at -v_init*sign(C~)."""
        if self.candidates is None:
            raise PhaseError(f"site {self.name!r} has no candidates: call start_candidates() first")
        rows, sign = self.candidates.selected_rows()
        if not bool(torch.stack([torch.isfinite(t).all() for t in rows.values()]).all()):  # (one host read)
            raise NonFiniteError(f"site {self.name!r}: the selected candidates' weights are not finite, and installed "
                                 "they would make the output NaN: lower candidate_lr (or train a float16 model in "
                                 "float32 or bfloat16), then start the phase again")
        cascade_row = rows.pop("cascade")[0]
        self._append(rows, cascade_row, -v_init * sign, rows_from=self.candidates.copies)
        self.candidates = None

    def drop_candidates(self) -> None:
        self.candidates = None

    def correlation(self) -> Optional[Tensor]:
        """Per-channel best |C~| of the current candidate pool (None outside the dendrite phase)."""
        return None if self.candidates is None else self.candidates.correlation()

    def resize(self, k: int, where: str = "") -> None:
        """Give the site K zero-initialised dendrites (to load a state_dict into). Refused inside a
        dendrite phase: its pool's cascade weights are sized for the dendrites the site has."""
        if self.candidates is not None and k != self.num_dendrites:
            raise CheckpointError(f"site {where + ' ' if where else ''}has {self.num_dendrites} dendrite(s) and a "
                                  f"dendrite phase whose candidates build on them, and the state loaded into it holds "
                                  f"{k}: call pm.abort_dendrite_phase() before loading it (pbp_fx.load gives the "
                                  "model the saved structure itself)")
        self.dendrites = self.cascade = self.out_weight = None
        for _ in range(k):
            self.grow()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state_dict may hold more or fewer dendrites than this site: match it first. A state
        # without this site's keys says nothing of them (a PerforatedModel decides from its neuron's).
        key = prefix + "out_weight"
        if key in state_dict and state_dict[key].shape[0] != self.num_dendrites:
            self.resize(state_dict[key].shape[0], where=prefix.rstrip("."))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def folded(self) -> tuple[Tensor, Optional[Tensor]]:
        assert self.dendrites is not None
        return self.dendrites.folded()


class SwappedNeuron(StandIn, nn.Module):
    """A neuron module inside an untraceable leaf, swapped for neuron + Site. The leaf's own code
    reads its layer's attributes (timm's ConViT sizes a table on `self.qk.weight.device`): they
    are the neuron's (`StandIn`)."""

    def __init__(self, neuron: nn.Module, site: Site):
        super().__init__()
        self.neuron, self.site = neuron, site

    def forward(self, x: Tensor) -> Tensor:
        return self.site(x, self.neuron(x))


class FusedSwappedNeuron(StandIn, nn.Module):
    """A finalized `SwappedNeuron`: its FusedSite runs, and the leaf's reads of its layer's
    attributes (`self.fc.weight.shape`, `out_features`) are answered by the neuron layer as it
    was, held unregistered (its tensors are not the finalized model's), not by the fused
    [1 + K, C, ...] weight. runs_neuron: the neuron is the finalized model's and runs as its own
    layer (its forward hooks with it), `fused` adding the dendrites only (its neuron row zero)."""

    def __init__(self, fused: "FusedSite", neuron: nn.Module, runs_neuron: bool = False):
        super().__init__()
        self.fused, self.runs_neuron = fused, runs_neuron
        if runs_neuron:
            self.neuron = neuron
        else:
            object.__setattr__(self, "neuron", neuron)

    def forward(self, x: Tensor) -> Tensor:
        return self.neuron(x) + self.fused(x) if self.runs_neuron else self.fused(x)


class FusedSite(nn.Module):
    """Eval-only site: the neuron and its K dendrites over concatenated, norm-folded weights.

    weight is [(1+K) * C, ...] (1+K blocks of C rows, the first the neuron's), bias [1+K, C] or
    None, cascade [K, C, K], out_weight [K, C]. The neuron runs as its own layer (so that a
    runtime can fuse it with the add and activation that follow) and the dendrites as
    `layers.dendrite_calls`. The weight keeps the layer's own rank so that
    `.to(memory_format=torch.channels_last)` converts a conv2d's (a 5-D [1+K, C, ...] has no
    such form: the call failed).
    """

    def __init__(self, layer: LayerSpec, weight: Tensor, bias: Optional[Tensor], cascade: Tensor,
                 out_weight: Tensor, activation: str, name: str = ""):
        super().__init__()
        self.layer, self.activation, self.name = layer, activation, name
        self.weight = nn.Parameter(weight.detach().flatten(0, 1).clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.cascade = nn.Parameter(cascade.detach().clone(), requires_grad=False)
        self.out_weight = nn.Parameter(out_weight.detach().clone(), requires_grad=False)

    @property
    def num_dendrites(self) -> int:
        return self.out_weight.shape[0]

    def neuron_tensors(self) -> tuple[Tensor, Optional[Tensor]]:
        """The neuron's weight [C, ...] and bias [C] (or None)."""
        return self.weight[:self.layer.channels], None if self.bias is None else self.bias[0]

    def dendrite_tensors(self) -> tuple[Tensor, Optional[Tensor]]:
        """The dendrites' weight rows [K, C, ...] and bias rows [K, C] (or None)."""
        c = self.layer.channels
        return self.weight[c:].unflatten(0, (-1, c)), None if self.bias is None else self.bias[1:]

    flat_rows = "weight"  # the parameter stored as [M * C, ...]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state_dict saved when it was stored in row blocks ([M, C, ...]) takes the flat layout.
        key = prefix + self.flat_rows
        value = state_dict.get(key)
        if isinstance(value, Tensor) and value.dim() == getattr(self, self.flat_rows).dim() + 1:
            state_dict[key] = value.flatten(0, 1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if _unbatched(self.layer, x):
            return self.forward(x.unsqueeze(0)).squeeze(0)
        n = self.layer.apply(x, *self.neuron_tensors())
        pre = apply_dendrites(self.layer, x, *self.dendrite_tensors())
        acts = cascade_chain(pre, self.cascade, ACTIVATIONS[self.activation], self.layer.axis)
        return _weighted_sum(n, acts, self.out_weight, self.layer.axis)

    def extra_repr(self) -> str:
        return (f"{self.name!r}, {self.layer.kind}, channels={self.layer.channels}, "
                f"dendrites={self.num_dendrites}, activation={self.activation}")


class TiedFusedSite(FusedSite):
    """A FusedSite whose neuron weight is a parameter shared with the rest of the model.

    Holds the shared parameter itself (`neuron_weight`, read transposed when stored [in, C])
    and the dendrites' rows (`dendrite_weight`, [K * C, ...]); `weight` is the concatenation
    FusedSite has ([(1+K) * C, ...], built when read). The forward (FusedSite's) and the ONNX
    exporter read `neuron_tensors()`/`dendrite_tensors()`, so no copy of the shared matrix is made.
    """

    flat_rows = "dendrite_weight"

    def __init__(self, fused: FusedSite, neuron_weight: nn.Parameter, transposed: bool):
        nn.Module.__init__(self)
        self.layer, self.activation, self.name = fused.layer, fused.activation, fused.name
        self.transposed = transposed
        self.neuron_weight = neuron_weight
        self.dendrite_weight = nn.Parameter(fused.dendrite_tensors()[0].detach().flatten(0, 1).clone(),
                                            requires_grad=False)
        self.bias = fused.bias
        self.cascade, self.out_weight = fused.cascade, fused.out_weight

    def neuron_tensors(self):
        b = self.bias
        w = self.neuron_weight.t() if self.transposed else self.neuron_weight
        return w, None if b is None else b[0]

    def dendrite_tensors(self):
        c = self.layer.channels
        return self.dendrite_weight.unflatten(0, (-1, c)), None if self.bias is None else self.bias[1:]

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.neuron_tensors()[0].to(self.dendrite_weight), self.dendrite_weight], 0)


@contextmanager
def dendrites_silenced(model: nn.Module) -> Iterator[None]:
    """Every site's output weights V zero inside the block, so the model computes what its original does (a
    site with V = 0 adds exactly 0); restored after."""
    held = [(m.out_weight, m.out_weight.detach().clone()) for m in model.modules()
            if isinstance(m, (Site, FusedSite)) and m.out_weight is not None]
    try:
        with torch.no_grad():
            for weight, _ in held:
                weight.zero_()
        yield
    finally:
        with torch.no_grad():
            for weight, values in reversed(held):  # (a V two modules share is restored from its first copy)
                weight.copy_(values)
