"""Site modules: a neuron's output plus its dendrites (PB_SPEC §2-§4).

`Site(x, n)` takes the neuron layer's input x and its output n (after a joined norm) and
returns y = n + sum_k V[k] * s_k. The neuron itself stays in the user's graph; a Site only
adds. `FusedSite(x)` is the eval-only form that `finalize` emits: neuron and dendrites as
one layer over concatenated, norm-folded weights.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .layers import LayerCopies, LayerSpec, NormSpec, cat_rows, channel_view, copy_dim, stacked_apply

__all__ = ["Site", "CandidatePool", "FusedSite", "SwappedNeuron", "ACTIVATIONS", "MODES"]

ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}
MODES = ("pb", "gd")


def _cascade(pre: Tensor, cascade: Optional[Tensor], phi, axis: int) -> list[Tensor]:
    """a_k = pre_k + sum_{j<k} U[k, :, j] * s_j ; returns [s_0 .. s_{K-1}]."""
    cd = copy_dim(axis)
    acts: list[Tensor] = []
    for k in range(pre.shape[cd]):
        a = pre.select(cd, k)
        for j in range(k):
            a = a + channel_view(cascade[k, :, j], a.dim(), axis) * acts[j]
        acts.append(phi(a))
    return acts


def _weighted_sum(n: Tensor, acts: list[Tensor], out_weight: Tensor, axis: int) -> Tensor:
    y = n
    for k, s in enumerate(acts):
        y = y + channel_view(out_weight[k], s.dim(), axis) * s
    return y


class CandidatePool(nn.Module):
    """P candidate dendrites for one site, trained on the covariance with the site error.

    Statistics (PB_SPEC §4): per batch C[p, i] = sum_pos (c - mean c)(delta - mean delta);
    `ema` is its 0.99 moving average; `best` is each (p, i)'s best |ema| after warm-up, and
    `snapshot_*` hold that row's weights at its best. Installation reads the snapshots.

    `reducer` (None: one process) sums a batch's statistics over the ranks of a distributed
    run, so that C is the global batch's on every rank; `pbp_fx.distributed` installs it.
    """

    def __init__(self, layer: LayerSpec, norm: Optional[NormSpec], pool: int, installed: int,
                 activation: str, init: str = "kaiming", init_scale: float = 1.0,
                 ema: float = 0.99, warmup: int = 5, threshold: float = 0.01,
                 device=None, dtype=None):
        super().__init__()
        self.layer, self.activation = layer, activation
        self.ema_decay, self.warmup, self.threshold = ema, warmup, threshold
        c = layer.channels
        fk = {"device": device, "dtype": dtype}
        self.copies = LayerCopies(layer, norm, pool, **fk)
        self.copies.reset_parameters(init, init_scale)
        # Cascade weights from installed dendrites, stored [P, C, K] so rows lead with (p, c).
        self.cascade = nn.Parameter(torch.zeros(pool, c, installed, **fk))
        self.register_buffer("ema", torch.zeros(pool, c, **fk))
        self.register_buffer("best", torch.zeros(pool, c, **fk))
        self.steps = 0  # host-side counter: no device sync per batch
        # Not state: set per run by pbp_fx.distributed.Distributed.wrap (see covariance()).
        self.reducer = None
        # Step of the last snapshot, kept on the device and read once per epoch.
        self.register_buffer("last_improved", torch.tensor(0, device=device))
        # The mean best |C~| that epoch_progress() compares against (a buffer: checkpointed).
        self.register_buffer("progress_reference", torch.zeros((), device=device, dtype=torch.float64))
        for name, t in self._rows().items():
            self.register_buffer("snapshot_" + name, t.detach().clone())

    @property
    def pool_size(self) -> int:
        return self.copies.copies

    def _rows(self) -> dict[str, Tensor]:
        rows = dict(self.copies.row_tensors())
        rows["cascade"] = self.cascade
        return rows

    def forward(self, x: Tensor, acts: list[Tensor]) -> Tensor:
        """Candidate activations c, [B, P, C, *S] or [..., P, C]."""
        pre = self.copies(x)
        cd = copy_dim(self.layer.axis)
        for j, s in enumerate(acts):
            u = self.cascade[:, :, j]  # [P, C]
            if self.layer.axis == 1:  # [P, C, 1..] against [B, 1, C, *S]
                u = u.reshape(*u.shape, *([1] * (s.dim() - 2)))
            pre = pre + u * s.unsqueeze(cd)
        return ACTIVATIONS[self.activation](pre)

    @torch.no_grad()
    def covariance(self, c: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        """A batch's covariance C [P, C] of c [N, P, C] with the site error d [N, C], and e [N, C].

        e is what the gradient handed to c is made of: -sign(C~) * e. In one process
        e = d - mean d (dC/dc). With a reducer over R ranks, each rank's d is the gradient of
        its own mean loss, R times that of DDP's objective (1/R) sum_r L_r, so the rank sums
        S_cd = sum c d / R, S_c = sum c, S_d = sum d / R and the position count n are
        all-reduced and C = S_cd - S_c * m with m = S_d / n, the global mean of d / R: the
        global batch's covariance, the same on every rank. e = d - R m is R times the exact
        dC/dc, because DDP divides the summed candidate gradients by R.
        """
        if self.reducer is None:
            d = d - d.mean(0)
            return torch.einsum("npc,nc->pc", c, d), d
        r = self.reducer.world_size
        p, ch = c.shape[1], c.shape[2]
        acc = torch.promote_types(d.dtype, torch.float32)  # float32 at least: counts exact to 2**24
        cc, dd = c.to(acc), d.to(acc)
        sums = self.reducer(torch.cat([
            torch.einsum("npc,nc->pc", cc, dd).reshape(-1) / r, cc.sum(0).reshape(-1),
            dd.sum(0) / r, dd.new_full((1,), dd.shape[0])]))
        s_cd, s_c, s_d, n = sums.split([p * ch, p * ch, ch, 1])
        m = s_d / n
        cov = s_cd.view(p, ch) - s_c.view(p, ch) * m
        return cov, (dd - r * m).to(d.dtype)

    @torch.no_grad()
    def observe(self, cov: Tensor) -> Tensor:
        """Fold one batch's covariance [P, C] (already global, see covariance()) into the statistics; returns sign(ema)."""
        self.steps += 1
        if self.steps == 1:
            self.ema.copy_(cov)
        else:
            self.ema.mul_(self.ema_decay).add_(cov, alpha=1.0 - self.ema_decay)
        if self.steps > self.warmup:
            score = self.ema.abs()
            improved = score > self.best * (1.0 + self.threshold)
            # Masked copies instead of `if improved.any()`: no host sync on the hot path.
            self.best.copy_(torch.where(improved, score, self.best))
            for name, t in self._rows().items():
                snap = getattr(self, "snapshot_" + name)
                mask = improved.reshape(*improved.shape, *([1] * (t.dim() - 2)))
                snap.copy_(torch.where(mask, t.detach(), snap))
            self.last_improved.copy_(torch.where(improved.any(), self.steps, self.last_improved))
        return torch.sign(self.ema)

    def get_extra_state(self) -> dict:
        return {"steps": self.steps}

    def set_extra_state(self, state: dict) -> None:
        self.steps = int(state["steps"])

    @torch.no_grad()
    def epoch_progress(self, rel: float) -> bool:
        """True when the mean over channels of the best |C~| rose by more than `rel` (relative).

        Per site, not per channel: with hundreds of channels one of them almost always gains
        1%, and the phase would never end before its cap (measured: bench/results/ablations.md).
        Called once per epoch; a rise moves the reference up.
        """
        value = self.correlation().mean().to(self.progress_reference.dtype)
        if bool(value > self.progress_reference * (1.0 + rel)):
            self.progress_reference.copy_(value)
            return True
        return False

    def correlation(self) -> Tensor:
        """Per channel, the best |C~| over the pool, [C]."""
        return self.best.amax(0) if self.steps > self.warmup else self.ema.abs().amax(0)

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


class _CovarianceTap(torch.autograd.Function):
    """Identity on y; in backward, delta = dL/dy trains the candidates (PB_SPEC §4).

    The gradient handed to c is that of -sum_i sign(C~_i) C_i, with
    dC_i/dc_{p,i} = delta_{p,i} - mean_p delta_i, so only candidate parameters (reached
    through c, whose inputs are detached) receive it. In distributed runs C and the mean
    are the global batch's (CandidatePool.covariance).
    """

    @staticmethod
    def forward(ctx, y: Tensor, c: Tensor, pool: CandidatePool) -> Tensor:
        ctx.save_for_backward(c)
        ctx.pool = pool
        # A copy, not a view: user graphs may modify the site output in place (ReLU(inplace)).
        return y.clone()

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        (c,) = ctx.saved_tensors
        pool: CandidatePool = ctx.pool
        axis, ch = pool.layer.axis, pool.layer.channels
        p = c.shape[copy_dim(axis)]
        d = grad_y.detach().movedim(axis, -1).reshape(-1, ch)
        if axis == 1:
            cf = c.detach().movedim((1, 2), (-2, -1)).reshape(-1, p, ch)
        else:
            cf = c.detach().reshape(-1, p, ch)
        cov, e = pool.covariance(cf, d)  # e = d - mean d (one process; see covariance())
        sign = pool.observe(cov)
        g = -(sign.unsqueeze(0) * e.unsqueeze(1))  # [N, P, C]
        if axis == 1:
            g = g.reshape(c.shape[0], *c.shape[3:], p, ch).movedim((-2, -1), (1, 2))
        else:
            g = g.reshape(c.shape)
        return grad_y, g.to(c.dtype), None


class Site(nn.Module):
    """One neuron site: installed dendrites (DendriteStack), optional candidate pool.

    Attributes follow PB_SPEC §2: `dendrites` holds D_1..D_K (with their norm copies),
    `cascade` is U as [K, C, K] (only j < k is read), `out_weight` is V, [K, C].
    """

    def __init__(self, name: str, layer: LayerSpec, norm: Optional[NormSpec] = None,
                 activation: str = "sigmoid", mode: str = "pb"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not supported: use one of {sorted(ACTIVATIONS)}")
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not supported: use 'pb' or 'gd'")
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
        if self.dendrites is None and self.candidates is None:
            return n
        # "Perforated": dendrites and candidates see the input behind a stop-gradient.
        src = x.detach() if self.mode == "pb" else x
        y, acts = n, []
        if self.dendrites is not None:
            acts = _cascade(self.dendrites(src), self.cascade, ACTIVATIONS[self.activation], self.axis)
            y = _weighted_sum(n, acts, self.out_weight, self.axis)
        if self.candidates is not None and self.training and torch.is_grad_enabled():
            c = self.candidates(src, [s.detach() for s in acts])
            y = _CovarianceTap.apply(y, c, self.candidates)
        return y

    # -- structure changes ---------------------------------------------------------
    def _factory(self) -> dict:
        return {"device": self._anchor.device, "dtype": self._dtype()}

    def _dtype(self) -> torch.dtype:
        for t in (self.out_weight, self.cascade):
            if t is not None:
                return t.dtype
        return self._anchor.dtype

    def _append(self, rows: dict[str, Tensor], cascade_row: Tensor, v: Tensor) -> None:
        """Install one dendrite from its rows ([1, C, ...] each), U row [C, K] and V row [C]."""
        k, c = self.num_dendrites, self.channels
        fk = self._factory()
        trainable = self.mode == "gd"
        parts = ([] if self.dendrites is None else [self.dendrites.row_tensors()]) + [rows]
        new = cat_rows(self.layer, self.norm, parts, requires_grad=trainable, **fk)
        new.train(self.training)
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

    def grow(self, init: str = "random") -> None:
        """Install one dendrite with fresh weights (the layer's own init); U and V start at 0."""
        if init != "random":
            raise ValueError(f"grow(init={init!r}): only 'random' is supported; "
                             "correlation-trained dendrites come from install_candidates()")
        fresh = LayerCopies(self.layer, self.norm, 1, **self._factory())
        fresh.reset_parameters("default")
        self._append(fresh.row_tensors(), torch.zeros(self.channels, self.num_dendrites), torch.zeros(self.channels))

    def start_candidates(self, pool: int = 4, init: str = "kaiming", init_scale: float = 1.0,
                         **stats) -> CandidatePool:
        """Attach a fresh pool of P candidates (PB_SPEC §4); they add exactly 0 to the output."""
        if pool < 1:
            raise ValueError(f"pool={pool}: the candidate pool needs at least 1 member")
        self.candidates = CandidatePool(self.layer, self.norm, pool, self.num_dendrites, self.activation,
                                        init, init_scale, **stats, **self._factory())
        self.candidates.train(self.training)
        return self.candidates

    def install_candidates(self, v_init: float = 0.0) -> None:
        """Freeze the best pool member per channel as dendrite K+1; V starts at -v_init*sign(C~)."""
        if self.candidates is None:
            raise RuntimeError(f"site {self.name!r} has no candidates: call start_candidates() first")
        rows, sign = self.candidates.selected_rows()
        cascade_row = rows.pop("cascade")[0]
        self._append(rows, cascade_row, -v_init * sign)
        self.candidates = None

    def drop_candidates(self) -> None:
        self.candidates = None

    def correlation(self) -> Optional[Tensor]:
        """Per-channel best |C~| of the current candidate pool (None outside the dendrite phase)."""
        return None if self.candidates is None else self.candidates.correlation()

    def resize(self, k: int) -> None:
        """Give the site K zero-initialised dendrites (to load a state_dict into)."""
        self.dendrites = self.cascade = self.out_weight = None
        for _ in range(k):
            self.grow()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state_dict may hold more or fewer dendrites than this site: match it first.
        key = prefix + "out_weight"
        k = state_dict[key].shape[0] if key in state_dict else 0
        if k != self.num_dendrites:
            self.resize(k)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def folded(self) -> tuple[Tensor, Optional[Tensor]]:
        assert self.dendrites is not None
        return self.dendrites.folded()


class SwappedNeuron(nn.Module):
    """A neuron module inside an untraceable leaf, swapped for neuron + Site."""

    def __init__(self, neuron: nn.Module, site: Site):
        super().__init__()
        self.neuron, self.site = neuron, site

    def forward(self, x: Tensor) -> Tensor:
        return self.site(x, self.neuron(x))


class FusedSite(nn.Module):
    """Eval-only site: neuron and K dendrites as ONE layer over concatenated weights.

    weight is [1+K, C, ...] (row 0 the neuron, norms folded), bias [1+K, C] or None,
    cascade [K, C, K], out_weight [K, C].
    """

    def __init__(self, layer: LayerSpec, weight: Tensor, bias: Optional[Tensor], cascade: Tensor,
                 out_weight: Tensor, activation: str, name: str = ""):
        super().__init__()
        self.layer, self.activation, self.name = layer, activation, name
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.cascade = nn.Parameter(cascade.detach().clone(), requires_grad=False)
        self.out_weight = nn.Parameter(out_weight.detach().clone(), requires_grad=False)

    @property
    def num_dendrites(self) -> int:
        return self.out_weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        z = stacked_apply(self.layer, x, self.weight, self.bias)
        cd = copy_dim(self.layer.axis)
        n = z.select(cd, 0)
        pre = z.narrow(cd, 1, z.shape[cd] - 1)
        acts = _cascade(pre, self.cascade, ACTIVATIONS[self.activation], self.layer.axis)
        return _weighted_sum(n, acts, self.out_weight, self.layer.axis)

    def extra_repr(self) -> str:
        return (f"{self.name!r}, {self.layer.kind}, channels={self.layer.channels}, "
                f"dendrites={self.num_dendrites}, activation={self.activation}")
