"""Distributed training: PB on torch.distributed with DistributedDataParallel (DDP).

    from pbp_fx.distributed import Distributed

    world = Distributed.init()               # torchrun's environment: gloo on CPU, nccl on GPU
    pm = pbp_fx.perforate(model, inputs)
    train = world.loader(train_set, batch_size=256, shuffle=True, seed=0)  # 256: the GLOBAL batch
    val = world.loader(val_set, batch_size=1000, train=False)            # sharded, not padded
    history = pbp_fx.fit(pm, train, val, distributed=world)
    world.save(pm, "checkpoint.safetensors")  # on every rank: rank 0 writes, the others wait for the file
    world.close()

A loop of one's own: the controller holds the module to train with (`ctl.model`, the DDP
wrapper) and rebuilds it with the optimizer at every RESTRUCTURED decision:

    ctl = PhaseController(pm.to(world.device), optimizer_factory=..., distributed=world)
    with world.guard():  # a rank's error reaches the others as "rank r failed with ...", not gloo's
        for epoch in range(epochs):
            train.sampler.set_epoch(epoch)
            for x, y in train:
                loss = F.cross_entropy(ctl.model(x), y)     # read ctl.model after every step()
                ctl.optimizer.zero_grad(); loss.backward(); ctl.optimizer.step()
            world.sync_buffers(pm)                           # rank 0's BatchNorm statistics
            if ctl.step(pbp_fx.evaluate(pm, val, distributed=world)) is Decision.COMPLETE:
                break

What each rank shares (docs/algorithm.md's dendrite phase under data parallelism):
- Neuron phase: plain DDP. Gradients are averaged over the ranks, so R ranks with local
  batches of B/R train exactly like one process with the global batch B.
- Dendrite phase: every candidate pool gets a `StatsReducer`. Per site and batch the sums
  behind the covariance (sum c*delta, sum c, sum delta and the position count) are
  all-reduced before the sign and the best-candidate bookkeeping, so C, its EMA, `best` and
  the snapshots are the global batch's on every rank (CandidatePool.covariance has the
  math). Candidate gradients are averaged by DDP like any other gradient.
- Decisions: PhaseController.step uses rank 0's validation score and candidate mark
  (`agree`) and checks that every rank is at the same epoch, phase and dendrite count.
- Restructuring (dendrite phase start, install, retry) changes the parameter set: `wrap`
  is called again (PhaseController._rebuild does it, so `fit` does), which checks that
  every rank has the same structure, installs the reducers on the new pools, releases the
  old wrapper and builds DDP over the new trainable parameters; building DDP broadcasts
  rank 0's parameters and buffers, so the ranks start every phase bit-identical.
- Buffers (BatchNorm running statistics) are per rank during an epoch (DDP's
  forward_sync_buffers is off); `sync_buffers` copies rank 0's before every evaluation.

All of a run's state lives in the `Distributed` object the caller holds.
"""
from __future__ import annotations

import hashlib
import inspect
import numbers
import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from .errors import LOST_CONTACT, PBError, Terminated, TrainingError, warn_at_user

__all__ = ["Distributed", "DistributedError", "StatsReducer", "ShardSampler", "launch", "stop_with_launcher",
           "local_env", "started_by_torchrun", "torchrun_world_size", "last_batch_is_lone"]

DEFAULT_TIMEOUT = 300.0  # seconds a collective waits for the other ranks
# The longest timeout taken: from ~9.2e9 s torch's int64 nanoseconds overflow, and c10d timed out at once from 1e10.
MAX_TIMEOUT = 1e8


def timeout_problem(timeout) -> Optional[str]:
    """Why `timeout` (seconds) is no timeout a process group takes, or None."""
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not (0 < timeout <= MAX_TIMEOUT):
        return f"must be a number of seconds greater than 0 and at most {MAX_TIMEOUT:g} (about 3 years)"
    return None


_FAILED = "pbp_fx/failed/"


def last_batch_is_lone(samples: int, batch: int) -> bool:
    """Whether the last batch of an epoch holds one sample, which BatchNorm cannot train on (one
    value per channel): the training loaders leave it out."""
    return samples > batch and samples % batch == 1


class DistributedError(TrainingError):
    """The ranks of a distributed run disagree, or one of them failed or stopped answering."""


def _none():
    return None


class StatsReducer:
    """Sums a candidate pool's per-batch statistics over the ranks (CandidatePool.reducer)."""

    def __init__(self, group, world_size: int, rank: int = 0):
        self.group, self.world_size, self.rank = group, world_size, rank
        # A rank's batch not a multiple of a pool: said once a run (not per pool), by rank 0 (the ranks'
        # batches are alike)
        self.warned_uneven = rank != 0

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def __deepcopy__(self, memo):
        return self  # a deep copy of the model trains in the same run

    def __reduce__(self):
        return (_none, ())  # a pickled model trains alone


class SiteReducer:
    """The run's StatsReducer for one site's pool: its sums go with the site's number, so that ranks summing
    different sites' statistics at once (a site whose output reaches the loss on some ranks only) are refused
    on every rank instead of mixing the two sites' statistics (checked where the sums are on the CPU: a
    device's check would wait for the device at every site)."""

    def __init__(self, shared: StatsReducer, number: int, name: str):
        self.shared, self.number, self.name = shared, number, name

    @property
    def world_size(self) -> int:
        return self.shared.world_size

    @property
    def warned_uneven(self) -> bool:  # (said once a run: the flag is the run's)
        return self.shared.warned_uneven

    @warned_uneven.setter
    def warned_uneven(self, value: bool) -> None:
        self.shared.warned_uneven = value

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cpu":
            return self.shared(t)
        sums = self.shared(torch.cat([t, t.new_full((1,), float(self.number))]))
        if float(sums[-1]) != self.number * self.world_size:
            raise DistributedError(f"rank {self.shared.rank} summed the candidates' statistics of site {self.name!r} "
                                   "while another rank summed another site's: a site's output reaches the loss on some "
                                   "ranks only (an output the loss reads on some ranks or batches only); give every "
                                   "rank's loss the same outputs (0 * out.sum() for one it leaves out)")
        return sums[:-1]

    def __deepcopy__(self, memo):
        return self  # a deep copy of the model trains in the same run

    def __reduce__(self):
        return (_none, ())  # a pickled model trains alone


class ShardSampler(Sampler):
    """Rank r of R reads indices r, r+R, r+2R, ...: every sample once, no padding (evaluation)."""

    def __init__(self, dataset, num_replicas: int, rank: int):
        self.n, self.num_replicas, self.rank = len(dataset), num_replicas, rank

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else '(no message)'}"


def _key(h: "hashlib._Hash") -> int:
    return int.from_bytes(h.digest()[:8], "little", signed=True)


class Distributed:
    """One rank's view of a distributed PB run: its process group, device and helpers.

    `Distributed.init()` joins the group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT); `Distributed()` uses a default group the caller initialised. Creating it
    is collective (it makes a second group for the statistics), so every rank must do it.
    """

    def __init__(self, group=None, *, device=None, store=None, timeout: float = DEFAULT_TIMEOUT,
                 owns_group: bool = False):
        problem = timeout_problem(timeout)
        if problem:
            raise DistributedError(f"Distributed(timeout={timeout!r}): {problem}")
        if not dist.is_available() or not dist.is_initialized():
            raise DistributedError("torch.distributed is not initialised: use Distributed.init() "
                                   "(under torchrun) or call init_process_group first")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        self.timeout = timeout
        if device is None:
            device = (torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl"
                      else torch.device("cpu"))
        self.device = torch.device(device)
        if store is None:  # the default group's store, for the failure reports (private API)
            get = getattr(dist.distributed_c10d, "_get_default_store", None)
            try:
                store = get() if get is not None and group is None else None
            except Exception:  # noqa: BLE001
                store = None
        self.store = store
        self._owns_group = owns_group
        # The statistics all-reduces run inside backward, while DDP's bucket all-reduces are
        # in flight on `group`: a group of their own keeps both sequences in step on every rank.
        self._ranks = list(range(self.world_size)) if group is None else dist.get_process_group_ranks(group)
        self.stats_group = dist.new_group(self._ranks, timeout=timedelta(seconds=float(timeout))) \
            if self.world_size > 1 else None
        self._reducer = StatsReducer(self.stats_group, self.world_size, self.rank)
        self._wrappers: dict[int, tuple] = {}  # id(pm) -> (DDP wrapper, its parameter ids)

    # -- setup -----------------------------------------------------------------------------
    @classmethod
    def init(cls, backend: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT, *, store=None,
             rank: Optional[int] = None, world_size: Optional[int] = None, device=None) -> "Distributed":
        """Initialise the default process group and return this rank's Distributed.

        backend: "gloo" on CPU, "nccl" when CUDA is available (then the device is
        cuda:LOCAL_RANK). timeout: seconds a collective waits for the other ranks before this
        rank stops with an error. store/rank/world_size: an explicit rendezvous (a
        torch.distributed Store); by default torchrun's environment (env://).
        """
        problem = timeout_problem(timeout)
        if problem:
            raise DistributedError(f"Distributed.init(timeout={timeout!r}): {problem}")
        if dist.is_initialized():
            raise DistributedError("the default process group is already initialised: use Distributed() instead")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        td = timedelta(seconds=float(timeout))
        if store is None:
            missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
            if missing:
                raise DistributedError(f"environment variable(s) {', '.join(missing)} not set: "
                                       "launch with torchrun (or `pbp-fx train --nproc N`)")
            store, rank, world_size = next(dist.rendezvous("env://", timeout=td))
        elif rank is None or world_size is None:
            raise DistributedError("Distributed.init(store=...) needs rank= and world_size=")
        if backend == "nccl":
            local = int(os.environ.get("LOCAL_RANK", rank))
            torch.cuda.set_device(local)
            device = device or torch.device("cuda", local)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=td)
        return cls(device=device, store=store, timeout=timeout, owns_group=True)

    def close(self) -> None:
        """Leave the process group (when `init` created it)."""
        for ddp, _ in self._wrappers.values():
            _release(ddp)
        self._wrappers.clear()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    def __enter__(self) -> "Distributed":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        # After a failure the group may be broken: leaving it could wait on a dead peer.

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Distributed(rank={self.rank}, world_size={self.world_size}, backend={self.backend!r}, device={self.device})"

    # -- data ------------------------------------------------------------------------------
    def loader(self, dataset, batch_size: int, *, train: bool = True, shuffle: bool = False, seed: int = 0,
               **kwargs) -> DataLoader:
        """This rank's DataLoader over `dataset`.

        train=True: `batch_size` is the global batch (each rank reads batch_size / R of it)
        and a DistributedSampler pads the data so that every rank has as many batches;
        `fit` calls its set_epoch. train=False: a ShardSampler (every sample once, no
        padding) with `batch_size` per rank, for `evaluate(..., distributed=)`.
        """
        if not train:
            return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(dataset, self.world_size, self.rank),
                              **kwargs)
        if batch_size % self.world_size:
            raise TrainingError(f"batch size {batch_size} is not divisible by the {self.world_size} ranks: "
                                "the global batch is split evenly, choose a multiple")
        sampler = DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle,
                                     seed=seed)
        extra = len(sampler) * self.world_size - len(dataset)
        if extra and self.rank == 0:
            warn_at_user(f"the {len(dataset)} training samples do not split evenly over {self.world_size} ranks: the "
                         f"DistributedSampler repeats {extra} of them every epoch, so the run is not the one process "
                         f"would train on the same batches; use a sample count divisible by {self.world_size}")
        local = batch_size // self.world_size
        # every rank has as many samples, so all leave a lone last sample out alike
        return DataLoader(dataset, batch_size=local, sampler=sampler,
                          drop_last=kwargs.pop("drop_last", last_batch_is_lone(len(sampler), local)), **kwargs)

    # -- collectives -----------------------------------------------------------------------
    def _gather(self, values: Sequence[float], dtype=torch.float64) -> torch.Tensor:
        t = torch.tensor(list(values), dtype=dtype, device=self.device)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t, group=self.group)
        return torch.stack(out).cpu()

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Sums over the ranks of a few numbers (float64)."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.cpu().tolist()

    def agree(self, values: Sequence[float], state: Sequence[float] = ()) -> list[float]:
        """Rank 0's `values` on every rank; raises if any rank's `state` differs from rank 0's."""
        n = len(values)
        rows = self._gather([*values, *state])
        if state and not bool((rows[:, n:] == rows[0, n:]).all()):
            lines = "; ".join(f"rank {r}: {[int(v) for v in rows[r, n:].tolist()]}" for r in range(self.world_size))
            raise DistributedError(f"the ranks are out of step (epoch, dendrites, in a dendrite phase, done, trained "
                                   f"around ctl.model): {lines}")
        return rows[0, :n].tolist()

    def check_same(self, what: str, value: int,
                   fix: str = "shard the data with Distributed.loader so that each rank has as many batches") -> None:
        """Raise on every rank when the ranks do not all have the same `value` for `what`."""
        rows = self._gather([value], torch.int64)[:, 0].tolist()
        if len(set(rows)) > 1:
            raise DistributedError(f"the ranks differ in {what}: {rows} (rank 0 first); {fix}")

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def broadcast_(self, tensors: Sequence[torch.Tensor], src: int = 0) -> None:
        """Copy rank `src`'s (rank in the group) values into `tensors` on every rank (one broadcast per dtype)."""
        by_dtype: dict = {}
        for t in tensors:
            if t.numel():
                by_dtype.setdefault(t.dtype, []).append(t)
        with torch.no_grad():
            for ts in by_dtype.values():
                flat = torch.cat([t.detach().reshape(-1) for t in ts])
                dist.broadcast(flat, self._ranks[src], group=self.group)
                for t, part in zip(ts, flat.split([t.numel() for t in ts])):
                    t.copy_(part.view_as(t))

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics, candidate statistics) on every rank."""
        self.broadcast_(list(model.buffers()))

    # -- the model -------------------------------------------------------------------------
    def install_reducers(self, pm) -> None:
        """Give every candidate pool of `pm` this run's statistics reducer (world size > 1)."""
        for number, (name, s) in enumerate(pm.sites.items(), 1):
            if s.candidates is not None:
                s.candidates.reducer = SiteReducer(self._reducer, number, name) if self.world_size > 1 else None

    def check_structure(self, pm) -> None:
        """Raise on every rank unless all ranks hold the same phase, dendrites and tensor shapes."""
        h = hashlib.sha256(pm.phase.encode())
        for name, t in [*pm.named_parameters(), *pm.named_buffers()]:
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        total = sum(pm.num_dendrites.values())
        rows = self._gather([_key(h), total], torch.int64).tolist()
        if any(r[0] != rows[0][0] for r in rows):
            dendrites = [r[1] for r in rows]
            if len(set(dendrites)) > 1:
                raise DistributedError(
                    f"the ranks hold different model structures (dendrites per rank: {dendrites}): every rank must "
                    "take the same decisions; use the same PhaseController settings and Distributed on every rank")
            raise DistributedError(
                f"the ranks hold different models (each with {dendrites[0]} dendrite(s), but their phases, or their "
                "parameters' or buffers' names, shapes or dtypes differ): build the same model, perforated with the "
                "same arguments, on every rank")

    def checksums(self, pm, buffers: bool = False) -> list[str]:
        """Every rank's SHA-256 (16 hex digits) of `pm`'s parameters (and buffers), rank 0 first."""
        h = hashlib.sha256()
        tensors = [*pm.named_parameters(), *(pm.named_buffers() if buffers else ())]
        for name, t in tensors:
            h.update(name.encode())
            if t.numel():
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        rows = self._gather([_key(h)], torch.int64)[:, 0].tolist()
        return [f"{v & (2**64 - 1):016x}" for v in rows]

    def wrap(self, pm, module: Optional[nn.Module] = None, **ddp_kwargs) -> nn.Module:
        """The module to train `pm` with in its current phase: DDP over the trainable parameters of
        `module` (the module holding pm that the loop trains, a head of its own around it; None: pm).

        Call it again after every restructure (PhaseController does, so fit does): it checks
        that the ranks agree on the structure, gives the candidate pools the statistics
        reducer, releases the previous wrapper's hooks and broadcasts rank 0's parameters
        and buffers. Unchanged parameters: the current wrapper is returned. One rank: `module`.
        Defaults: static_graph=True (the used parameters are fixed within a phase; K = 0
        candidate cascades are empty and unused) and no buffer broadcast per forward.
        """
        self.install_reducers(pm)
        module = pm if module is None else module
        if self.world_size == 1:
            return module
        ids = tuple((id(p), p.device) for p in module.parameters() if p.requires_grad)
        current = self._wrappers.get(id(module))
        if current is not None and current[1] == ids and not ddp_kwargs:
            return current[0]
        self.check_structure(pm)
        if current is not None:
            _release(current[0])
            del self._wrappers[id(module)]
        kwargs = {"static_graph": True}
        params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
        kwargs["forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"] = False
        kwargs.update(ddp_kwargs)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = PhaseDDP(module, device_ids=device_ids, process_group=self.group, **kwargs)
        self._wrappers[id(module)] = (ddp, ids)
        return ddp

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, pm, path: str, **kwargs) -> str:
        """pbp_fx.save on rank 0 only; every rank returns once the file is there.

        The checkpoint holds no rank or world size: load it with pbp_fx.load in a run of
        any size (each rank loads the same file; the next wrap broadcasts rank 0's copy).
        """
        from .checkpoint import save

        if isinstance(pm, nn.parallel.DistributedDataParallel):
            pm = pm.module
        if self.is_main:
            save(pm, path, **kwargs)
        try:
            self.barrier()
        except (RuntimeError, dist.DistError) as exc:
            if not _looks_like_comm(exc):
                raise
            raise DistributedError(f"rank {self.rank} waited at world.save for the other ranks, which did not come "
                                   f"({_first_line(exc)}): call world.save on every rank (rank 0 writes, the others "
                                   "wait for the file), not under `if world.is_main`") from exc
        return path

    # -- failures --------------------------------------------------------------------------
    def record_failure(self, exc: BaseException) -> None:
        """Leave this rank's error in the store, for the other ranks' reports."""
        if self.store is None:
            return
        try:
            self.store.set(f"{_FAILED}{self.rank}", _first_line(exc))
        except Exception:  # noqa: BLE001 - the store may be gone with a failed rank
            pass

    def failures(self) -> dict[int, str]:
        """Errors other ranks recorded, by rank (empty when none, or the store is gone)."""
        out = {}
        if self.store is None:
            return out
        for r in range(self.world_size):
            if r == self.rank:
                continue
            try:
                if self.store.check([f"{_FAILED}{r}"]):
                    out[r] = self.store.get(f"{_FAILED}{r}").decode()
            except Exception:  # noqa: BLE001
                break
        return out

    def explain(self, exc: BaseException) -> BaseException:
        """What this rank should raise for `exc`: its own error (recorded for the others), or a
        DistributedError naming the rank whose failure broke a collective here."""
        if getattr(exc, "_pbp_explained", False):
            return exc  # an inner guard has seen it
        exc = self._explain(exc)
        try:
            exc._pbp_explained = True
        except AttributeError:
            pass
        return exc

    def _explain(self, exc: BaseException) -> BaseException:
        if isinstance(exc, (KeyboardInterrupt, DistributedError)):
            if isinstance(exc, DistributedError):
                self.record_failure(exc)
            return exc
        others = self.failures()
        comm = isinstance(exc, (RuntimeError, dist.DistError)) and not isinstance(exc, PBError)
        if comm and others:
            r, msg = sorted(others.items())[0]
            return DistributedError(f"rank {self.rank} stopped: rank {r} failed with {msg}")
        if comm and _looks_like_comm(exc):
            return DistributedError(
                f"rank {self.rank} {LOST_CONTACT} ({_first_line(exc)}): another rank exited "
                f"or did not answer within the {self.timeout:g} s timeout")
        self.record_failure(exc)
        return exc

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run a block of collective work: errors are recorded and explained (see `explain`)."""
        try:
            yield
        except BaseException as exc:  # noqa: BLE001
            new = self.explain(exc)
            if new is exc:
                raise
            raise new from exc


def _looks_like_comm(exc: BaseException) -> bool:
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return any(w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "socket", "peer"))


class PhaseDDP(nn.parallel.DistributedDataParallel):
    """DDP over one phase's trainable parameters, whose no_sync() works from the wrapper's first step.

    Why: with static_graph (wrap's default) DDP records the graph at its first iteration, and a
    first iteration under no_sync fails inside torch (an internal assert). Every restructure builds
    a new wrapper, so a loop that accumulates micro-batches with no_sync met it at every phase.
    Until its first synchronised forward, no_sync leaves synchronisation on: the accumulated
    gradient is the same (the early micro-batch adds the same rank average on every rank), at the
    cost of one more all-reduce per phase.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.synchronised_once = False
        self.released = False  # (`_release`: a later wrap replaced it)
        self.training_forwards = 0  # (forwards under grad since the controller last looked: it resets them)

    def forward(self, *inputs, **kwargs):
        if self.released and torch.is_grad_enabled():
            # Its hooks are gone: it would train without synchronising the gradients, and the ranks drift apart.
            raise DistributedError("a training forward through a DDP wrapper that is no longer current (a restructure "
                                   "replaced it as the model's trainable parameters changed, or world.close() ended "
                                   "it): read ctl.model after every ctl.step(), not once before the loop")
        if self.require_backward_grad_sync and torch.is_grad_enabled():
            self.synchronised_once = True
        if torch.is_grad_enabled():
            self.training_forwards += 1
        return super().forward(*inputs, **kwargs)

    @contextmanager
    def no_sync(self):
        if self.static_graph and not self.synchronised_once:
            yield
            return
        with super().no_sync():
            yield


def _release(ddp) -> None:
    """Detach an old DDP wrapper's autograd hooks from the parameters it shares with the model."""
    if isinstance(ddp, PhaseDDP):
        ddp.released = True
    remove = getattr(ddp, "_remove_autograd_hooks", None)
    if remove is not None:
        try:
            remove()
        except Exception:  # noqa: BLE001 - an already finalised reducer has nothing to remove
            pass


# -- launching -------------------------------------------------------------------------------
def torchrun_world_size() -> int:
    """The world size torchrun gave this process (1 outside torchrun)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or "RANK" not in os.environ:
        return 1
    return int(os.environ.get("WORLD_SIZE", "1"))


def started_by_torchrun() -> bool:
    """Whether torchrun's agent started this process, not only whether its environment says so: a process that a
    worker starts (a subprocess of rank 0) inherits the environment. The agent's own environment has no
    TORCHELASTIC_RUN_ID (it gives it to the workers), a worker's has; where the parent's environment cannot be read,
    the process's own is taken at its word."""
    try:
        with open(f"/proc/{os.getppid()}/environ", "rb") as f:
            parent = f.read().split(b"\0")
    except OSError:
        return True
    return not any(entry.startswith(b"TORCHELASTIC_RUN_ID=") for entry in parent)


def local_env(env: dict) -> dict:
    """`env` for ranks on this machine only: gloo on the loopback interface (unless set)."""
    if os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


# The launching process's id, in the ranks' environment (`stop_with_launcher`).
LAUNCHER_PID = "PBP_FX_LAUNCHER_PID"


def stop_with_launcher(poll: float = 0.5, grace: float = 30.0) -> None:
    """In a rank that `launch` started: stop this process (SIGTERM, as the launcher's own stop does)
    when the launcher is gone. torchrun starts each rank in a session of its own, so a SIGKILL of the
    launcher's group did not reach the ranks: they trained on and wrote the run's folder after the
    user had killed it (or waited out the rendezvous timeout). A rank that does not stop within
    `grace` seconds (blocked in a collective) exits."""
    import signal
    import threading
    import time

    launcher = os.environ.get(LAUNCHER_PID)
    if not launcher or "RANK" not in os.environ:
        return

    def watch() -> None:
        while True:
            time.sleep(poll)
            try:
                os.kill(int(launcher), 0)
            except ProcessLookupError:
                break
            except (PermissionError, ValueError):  # (another user's process by now, or no pid: keep going)
                pass
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(143)

    threading.Thread(target=watch, name="pbp-fx-launcher-watch", daemon=True).start()


class Launched(NamedTuple):
    """How `launch` ended: torchrun's exit status, and the number of error lines the ranks printed."""

    status: int
    errors_printed: int


def launch(nproc: int, args: Sequence[str], module: str = "pbp_fx", quiet: bool = True) -> Launched:
    """Run `python -m MODULE ARGS...` on `nproc` local processes with torchrun.

    The rendezvous is on 127.0.0.1 with a port the OS picks, gloo talks over the loopback
    interface (GLOO_SOCKET_IFNAME=lo, when unset). OMP_NUM_THREADS, when unset, becomes the
    CPU count divided among the processes. quiet: torchrun's own log lines and its report
    of a failed worker are left out (each rank prints its error itself); False: torchrun as is.
    The ranks' error lines come out through this process, each distinct line once; when this
    process is stopped (Ctrl-C, SIGTERM), the KeyboardInterrupt carries their count as `rank_lines`
    (0: stopped before any rank could say where the run stands).
    """
    import tempfile

    from .errors import RANK_ERRORS

    with tempfile.TemporaryDirectory(prefix="pbp-fx-errors-") as errors:
        try:
            status = _launch(nproc, args, module, quiet,
                             dict(os.environ, **{RANK_ERRORS: errors, LAUNCHER_PID: str(os.getpid())}))
        except KeyboardInterrupt as exc:
            exc.rank_lines = len(_print_rank_errors(errors, nproc))
            raise
        except BaseException:  # (also when this process is stopped: the ranks' lines say where the run stands)
            _print_rank_errors(errors, nproc)
            raise
        return Launched(status, len(_print_rank_errors(errors, nproc)))


def _print_rank_errors(folder: str, nproc: int) -> list[str]:
    import sys

    from .errors import rank_errors

    lines = rank_errors(folder, nproc)
    for line in lines:
        print(line, file=sys.stderr)
    return lines


# (pbp_fx.signals imports no torch: the agent and the ranks import it through it)
def _import_torch_held(*modules: str) -> str:
    """The lines (in a try block) that import torch and `modules` with Ctrl-C and SIGTERM held."""
    names = ", ".join(repr(m) for m in modules)
    return f"    from pbp_fx.signals import import_torch_with_stops_held\n    import_torch_with_stops_held({names})\n"


# The agent's and the ranks' first lines (in a try block): the `site` import their `python -S` left out, with its
# venv's packages.
_SITE = "    import site\n    site.main()\n"


def _launch(nproc: int, args: Sequence[str], module: str, quiet: bool, env: dict) -> int:
    import subprocess
    import sys

    env = local_env(env)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # Each rank runs `python -u -m MODULE ARGS...` (as torchrun's -m does: unbuffered, the cwd first on
    # sys.path), with a Ctrl-C while it starts or imports torch ending it with its exit status, not a traceback
    # (the launcher then says the line). Started with -S, its `site` imported inside the try: a Ctrl-C while the
    # interpreter imported it at startup printed "Fatal Python error: init_import_site" and its traceback.
    rank = (f"import sys\ntry:\n{_SITE}    import os, runpy\n    sys.path[0] = os.getcwd()\n{_import_torch_held()}"
            f"    runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
            "except KeyboardInterrupt:\n    sys.exit(130)")
    torchrun = ["--nnodes", "1", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", "127.0.0.1:0", "--local-addr", "127.0.0.1", "--no-python",
                os.environ.get("PYTHON_EXEC", sys.executable), "-S", "-u", "-c", rank, *args]
    if not quiet:
        cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun]
    else:
        # (torchrun's own modules too: a Ctrl-C inside their import printed its traceback)
        code = (f"import sys\ntry:\n{_SITE}{_import_torch_held(*_AGENT_MODULES)}    from pbp_fx.distributed import "
                "_torchrun_quietly\n"
                "except KeyboardInterrupt:\n    sys.exit(130)\nsys.exit(_torchrun_quietly(sys.argv[1:]))")
        cmd = [sys.executable, "-S", "-c", code, *torchrun]
    # In a session of its own, so that a Ctrl-C in the terminal (to the whole process group) reaches
    # this process alone and each rank gets one signal, passed on by the agent: the group's SIGINT and
    # the agent's own forward came twice, and a second stop while a rank handled the first printed its
    # traceback. The ranks end themselves when this process is gone (`stop_with_launcher`).
    with subprocess.Popen(cmd, env=env, start_new_session=True) as agent:
        try:
            return agent.wait()
        except BaseException as exc:
            # Stopped itself (Ctrl-C, SIGTERM): the agent passes the same signal on to the ranks (each
            # saying where its run stands) before this process goes; killing it would orphan them.
            import signal

            if agent.poll() is None:
                ctrl_c = isinstance(exc, KeyboardInterrupt) and not isinstance(exc, Terminated)
                agent.send_signal(signal.SIGINT if ctrl_c else signal.SIGTERM)
                try:
                    agent.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    agent.kill()
            raise


_AGENT_MODULES = ("torch.distributed.run", "torch.distributed.elastic.multiprocessing.api",
                  "torch.distributed.elastic.multiprocessing.errors")


def _torchrun_quietly(argv: Sequence[str]) -> int:
    """torchrun's launcher (its elastic agent) with its logging and failure report muted."""
    import logging
    import signal
    import sys

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(list(argv)))
    except (SignalException, KeyboardInterrupt) as exc:
        # Ctrl-C or SIGTERM: the agent has passed it on to the ranks, which say where the run stands;
        # torch's traceback (two, when the launcher's SIGTERM follows) would bury that line.
        sig = getattr(exc, "sigval", signal.SIGINT)
        return 128 + int(sig)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode < 0:  # no Python error line from a rank killed by a signal
            try:
                what = signal.Signals(-failure.exitcode).name
            except ValueError:
                what = f"signal {-failure.exitcode}"
            print(f"pbp-fx: error: rank {rank} was killed by {what}", file=sys.stderr)
        return 1
    return 0
