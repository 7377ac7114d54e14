"""Distributed PB: DDP on gloo with 2 processes on 127.0.0.1 against one process.

This file is also the worker: `python tests/test_distributed.py SCENARIO RANK WORLD PORT OUT`.
The test process hosts the rendezvous store (port 0: the OS picks a free port), so a rank
that dies cannot take the store, and the failure messages in it, down with it.
"""
import json
import os
import re
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import pbp_fx
from pbp_fx.controller import PhaseController
from pbp_fx.distributed import Distributed, DistributedError, local_env

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
GLOBAL_BATCH = 24


def _data(n, seed):
    """3 classes: argmax of a fixed linear map plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 3, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    y = (x @ w + 0.3 * torch.randn(n, 3, generator=g, dtype=torch.float64)).argmax(1)
    return TensorDataset(x, y)


def _build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def _inputs():
    return (torch.zeros(2, 6, dtype=torch.float64),)


class _WithAuxHead(nn.Module):
    """A dict output with parts the default loss does not read: a head ("aux") through where + sqrt,
    whose backward turns a zero gradient into NaN (the head must get its zero gradient directly), a
    parameter returned as it is, and a Python number first (DDP's sink numbers its outputs with it)."""

    def __init__(self):
        super().__init__()
        self.body, self.cls, self.aux = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 1)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        h = torch.relu(self.body(x))
        a = self.aux(h)
        return {"temperature": 1.0, "logits": self.cls(h), "aux": torch.where(a > 0, torch.sqrt(a), torch.zeros_like(a)),
                "scale": self.scale}


def _build_with_aux_head():
    torch.manual_seed(0)
    return _WithAuxHead().double()


def _stats(pm):
    return {n: {"ema": s.candidates.ema.clone(), "best": s.candidates.best.clone(), "steps": s.candidates.steps}
            for n, s in pm.sites.items() if s.candidates is not None}


def _dendrites(pm):
    return {n: {k: v.detach().clone() for k, v in [*s.dendrites.row_tensors().items(), ("V", s.out_weight)]}
            for n, s in pm.sites.items() if s.dendrites is not None}


def run_match(world=None, build=_build):
    """Neuron epoch, two dendrite epochs, install, neuron epoch: what each epoch leaves behind."""
    pm = pbp_fx.perforate(build(), _inputs())
    train, val = _data(144, 0), _data(48, 1)
    if world is None:
        train_loader = DataLoader(train, batch_size=GLOBAL_BATCH)
        val_loader = DataLoader(val, batch_size=16)
    else:
        train_loader = world.loader(train, GLOBAL_BATCH)
        val_loader = world.loader(val, 16, train=False)
    # SGD, not Adam: Adam would hide a wrong gradient scale in the candidates.
    ctl = PhaseController(pm, neuron_epochs=1, dendrite_patience=5, max_dendrite_epochs=2, max_dendrites=1,
                          pool=2, candidate_lr=200.0, distributed=world,
                          optimizer_factory=lambda params: torch.optim.SGD(params, lr=0.01))
    out = {"stats": [], "installed": None, "checksums": []}

    def record(row):
        if pm.phase == "dendrite":
            out["stats"].append(_stats(pm))
        if row["decision"] == "restructured" and world is not None:
            out["checksums"].append(world.checksums(pm))
        if row["decision"] == "restructured" and pm.phase == "neuron" and out["installed"] is None:
            out["installed"] = _dendrites(pm)

    h = pbp_fx.fit(pm, train_loader, val_loader, controller=ctl, epochs=6,
                   progress=False, callbacks=[record], distributed=world)
    out["decisions"] = [(r["phase"], r["decision"], r["dendrites"]) for r in h.epochs]
    out["val"] = [r["val"] for r in h.epochs]
    out["train_loss"] = [r["train_loss"] for r in h.epochs]
    out["state"] = {k: v.clone() for k, v in pm.state_dict().items()}
    return pm, out


def accumulated_run(world, quiet: bool, build=_build):
    """A loop of one's own that accumulates two micro-batches per optimizer step, the first under
    `ctl.model.no_sync()` when quiet, through a neuron epoch, a dendrite phase and an install. Its
    loss reads the "logits" of a dict output, and reaches the other outputs' parameters through
    `reaching_every_parameter`."""
    import contextlib

    from pbp_fx.training import primary_output, reaching_every_parameter

    pm = pbp_fx.perforate(build(), _inputs())
    ctl = PhaseController(pm, neuron_epochs=1, dendrite_patience=5, max_dendrite_epochs=1, max_dendrites=1, pool=2,
                          candidate_lr=200.0, distributed=world,
                          optimizer_factory=lambda params: torch.optim.SGD(params, lr=0.01))
    train, val = world.loader(_data(144, 0), GLOBAL_BATCH), world.loader(_data(48, 1), 16, train=False)
    with torch.no_grad():  # an evaluation through ctl.model first (no graph: it must not fix what is unread)
        x, y = next(iter(val))
        out = ctl.model(x)
        reaching_every_parameter(ctl.model, nn.functional.cross_entropy(primary_output(out), y), out)
    phases = []
    for epoch in range(4):
        train.sampler.set_epoch(epoch)
        for x, y in train:
            ctl.optimizer.zero_grad()
            for j, (xs, ys) in enumerate(zip(x.chunk(2), y.chunk(2))):
                with ctl.model.no_sync() if quiet and j == 0 else contextlib.nullcontext():
                    out = ctl.model(xs)
                    loss = nn.functional.cross_entropy(primary_output(out), ys) / 2
                    reaching_every_parameter(ctl.model, loss, out).backward()
            ctl.optimizer.step()
        world.sync_buffers(pm)
        phases.append(pm.phase)
        ctl.step(pbp_fx.evaluate(pm, val, distributed=world))
    return {"phases": phases, "dendrites": pm.num_dendrites, "state": {k: v.clone() for k, v in pm.state_dict().items()}}


class _HeadAround(nn.Module):
    """A perforated backbone with a head of one's own around it (PhaseController's root=)."""

    def __init__(self, body, head):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def head_run(world):
    """A loop of one's own through ctl.model, DDP over root, whose head each rank built otherwise:
    a neuron epoch, a dendrite phase, an install and a neuron epoch. Then what each rank says of an
    optimizer over a head without root=, and of a root without a forward."""
    pm = pbp_fx.perforate(_build(), _inputs())
    torch.manual_seed(world.rank)  # the heads differ: the wrapper broadcasts rank 0's
    net = _HeadAround(pm, nn.Linear(3, 3).double())
    ctl = PhaseController(pm, optimizer=torch.optim.SGD(net.parameters(), lr=0.05), root=net, neuron_epochs=1,
                          dendrite_patience=5, max_dendrite_epochs=1, max_dendrites=1, pool=2, candidate_lr=200.0,
                          distributed=world)
    train, val = world.loader(_data(144, 0), GLOBAL_BATCH), world.loader(_data(48, 1), 16, train=False)
    phases = []
    for epoch in range(4):
        train.sampler.set_epoch(epoch)
        for x, y in train:
            ctl.optimizer.zero_grad()
            nn.functional.cross_entropy(ctl.model(x), y).backward()
            ctl.optimizer.step()
        phases.append(pm.phase)
        ctl.step(pbp_fx.evaluate(net, val, distributed=world))
    said = {}
    for what, root, module in (("no root", None, _HeadAround), ("no forward", True, nn.Module)):
        other = pbp_fx.perforate(_build(), _inputs())
        holder = module() if module is nn.Module else _HeadAround(other, nn.Linear(3, 3).double())
        if module is nn.Module:
            holder.body, holder.head = other, nn.Linear(3, 3).double()
        try:
            PhaseController(other, optimizer=torch.optim.SGD(holder.parameters(), lr=0.05),
                            root=holder if root else None, distributed=world)
            said[what] = "ok"
        except pbp_fx.ConfigError as exc:
            said[what] = str(exc)
    return {"phases": phases, "dendrites": pm.num_dendrites, "said": said,
            "state": {k: v.clone() for k, v in net.state_dict().items()}}


# -- the worker side ---------------------------------------------------------------------
def _worker(scenario, rank, nprocs, port, out_dir):
    from pbp_fx.distributed import Distributed

    torch.set_num_threads(1)
    timeout = 3.0 if scenario in ("stall", "misuse") else 30.0
    store = torch.distributed.TCPStore("127.0.0.1", port, nprocs, is_master=False, timeout=timedelta(seconds=30))
    world = Distributed.init("gloo", timeout=timeout, store=store, rank=rank, world_size=nprocs)
    if scenario == "match":
        pm, out = run_match(world)
        path = os.path.join(out_dir, "checkpoint.safetensors")
        world.save(pm, path)
        fresh = pbp_fx.load(path, _build, _inputs())  # every rank reads rank 0's file
        out["reloaded_equal"] = all(torch.equal(v, fresh.state_dict()[k]) for k, v in pm.state_dict().items())
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    elif scenario == "aux":
        torch.save(run_match(world, _build_with_aux_head)[1], os.path.join(out_dir, f"rank{rank}.pt"))
    elif scenario == "accumulate":  # two micro-batches per step, the first under no_sync (or synced)
        torch.save({quiet: accumulated_run(world, quiet) for quiet in (True, False)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    elif scenario == "head":
        torch.save(head_run(world), os.path.join(out_dir, f"rank{rank}.pt"))
    elif scenario == "aux_loop":  # an output the loss does not read, in a loop of one's own
        torch.save({"run": accumulated_run(world, False, _build_with_aux_head)}, os.path.join(out_dir, f"rank{rank}.pt"))
    elif scenario == "warn":  # a setting every rank holds, warned of as the controller is built
        pm = pbp_fx.perforate(_build(), _inputs())
        PhaseController(pm, optimizer=torch.optim.LBFGS(pm.trainable_parameters(), line_search_fn="strong_wolfe"),
                        distributed=world)
    elif scenario == "misuse":  # what each rank said of four mistakes (its error's first line, or "ok")
        said = {}

        def attempt(what, work):
            try:
                work()
                said[what] = "ok"
            except Exception as exc:  # noqa: BLE001
                said[what] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"

        train, val = world.loader(_data(96, 0), GLOBAL_BATCH), world.loader(_data(48, 1), 16, train=False)
        # fit (its PhaseController) without distributed= under an initialised 2-process group
        attempt("no_distributed", lambda: pbp_fx.fit(pbp_fx.perforate(_build(), _inputs()), train, val, epochs=2,
                                                     progress=False))
        # a setting that differs between the ranks
        pm = pbp_fx.perforate(_build(), _inputs())
        attempt("settings", lambda: pbp_fx.fit(pm, train, val, controller=PhaseController(
            pm, candidate_lr=1.0 + rank, distributed=world), epochs=2, progress=False, distributed=world))
        # a validation set of 1 sample: rank 1's shard is empty
        attempt("one_validation_sample", lambda: pbp_fx.fit(
            pbp_fx.perforate(_build(), _inputs()), train, world.loader(_data(1, 1), 16, train=False), epochs=1,
            progress=False, distributed=world))
        def loop_through(wrapper_of):
            """Two epochs of a loop of one's own that trains through wrapper_of(pm, ctl), bound once."""
            pm = pbp_fx.perforate(_build(), _inputs())
            ctl = PhaseController(pm, neuron_epochs=1, max_dendrites=1, distributed=world)
            model = wrapper_of(pm, ctl)
            for _ in range(2):
                for x, y in train:
                    loss = nn.functional.cross_entropy(model(x), y)
                    ctl.optimizer.zero_grad()
                    loss.backward()
                    ctl.optimizer.step()
                ctl.step(pbp_fx.evaluate(pm, val, distributed=world))

        # a loop of one's own that binds ctl.model once, before the first restructure
        attempt("stale_wrapper", lambda: loop_through(lambda pm, ctl: ctl.model))
        # a loop that keeps a DDP wrapper of its own around pm (a reviewer: the candidates trained unsynchronised)
        attempt("own_wrapper", lambda: loop_through(
            lambda pm, ctl: nn.parallel.DistributedDataParallel(pm, process_group=world.group)))
        # a model of another width on each rank
        attempt("other_width", lambda: PhaseController(pbp_fx.perforate(
            nn.Sequential(nn.Linear(6, 8 + rank), nn.ReLU(), nn.Linear(8 + rank, 3)).double(), _inputs()),
            distributed=world))

        # a training loader without len() that gives rank 0 one batch more than rank 1
        class Uneven(torch.utils.data.IterableDataset):
            def __iter__(self):
                x, y = _data(12 * (6 - rank), 0).tensors
                return iter(zip(x, y))

        attempt("uneven_iterable", lambda: pbp_fx.fit(pbp_fx.perforate(_build(), _inputs()),
                                                       DataLoader(Uneven(), batch_size=12), val, epochs=1,
                                                       progress=False, distributed=world))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:  # (before the last: it ends the group)
            json.dump(said, f)
        if world.is_main:  # world.save on rank 0 only
            attempt("save_on_rank_0", lambda: world.save(pm, os.path.join(out_dir, "c.safetensors")))
            with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
                json.dump(said, f)
    elif scenario == "loss_by_rank":  # rank 0's loss reads a head that rank 1's leaves out
        torch.manual_seed(0)

        class TwoHeads(nn.Module):
            def __init__(self):
                super().__init__()
                self.body, self.a, self.b = nn.Linear(6, 3), nn.Linear(3, 3), nn.Linear(3, 3)

            def forward(self, x):
                h = torch.relu(self.body(x))
                return {"logits": self.a(h), "b": self.b(h)}

        def loss_fn(out, y):
            loss = nn.functional.cross_entropy(out["logits"], y)
            return loss + nn.functional.cross_entropy(out["b"], y) if rank == 0 else loss

        pm = pbp_fx.perforate(TwoHeads().double(), _inputs())
        ctl = PhaseController(pm, neuron_epochs=1, max_dendrite_epochs=2, max_dendrites=1, pool=2, distributed=world)
        try:
            pbp_fx.fit(pm, world.loader(_data(96, 0), GLOBAL_BATCH), world.loader(_data(48, 1), 16, train=False),
                       loss_fn, controller=ctl, epochs=3, progress=False, distributed=world)
            said = "ok"
        except Exception as exc:  # noqa: BLE001
            said = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(said, f)
    elif scenario == "nanval":  # every rank's validation score is NaN in epoch 3, after a best
        pm, calls = pbp_fx.perforate(_build(), _inputs()), [0]

        def metric(output, target):
            calls[0] += 1  # (2 validation batches per rank and epoch)
            right = float((output.argmax(1) == target).sum())
            return (float("nan") if calls[0] in (5, 6) else right), len(target)

        ctl = PhaseController(pm, patience=50, dendrite_patience=1, max_dendrite_epochs=2, max_dendrites=1,
                              distributed=world)
        h = pbp_fx.fit(pm, world.loader(_data(96, 0), GLOBAL_BATCH), world.loader(_data(48, 1), 12, train=False),
                       controller=ctl, metric=metric, epochs=6, progress=False, distributed=world)
        torch.save({"rows": [(r["phase"], r["val"], r["decision"]) for r in h.epochs],
                    "state": {k: v.clone() for k, v in pm.state_dict().items()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    elif scenario == "nanloss":  # rank 1's loss turns NaN in epoch 3, after a best
        pm, calls = pbp_fx.perforate(_build(), _inputs()), [0]

        def loss_fn(output, target):
            calls[0] += 1
            loss = nn.functional.cross_entropy(output, target)
            return loss * float("nan") if rank == 1 and calls[0] == 10 else loss

        pbp_fx.fit(pm, world.loader(_data(96, 0), GLOBAL_BATCH), world.loader(_data(48, 1), 16, train=False),
                   loss_fn, epochs=5, progress=False, distributed=world)
    else:  # "fail": rank 1 raises at epoch 2; "stall": rank 1 stops answering at epoch 2
        pm = pbp_fx.perforate(_build(), _inputs())

        def trouble(row):
            if rank == 1 and row["epoch"] == 2:
                if scenario == "fail":
                    raise pbp_fx.TrainingError("rank one broke on purpose")
                time.sleep(60)

        pbp_fx.fit(pm, world.loader(_data(96, 0), GLOBAL_BATCH), world.loader(_data(48, 1), 16, train=False),
                   epochs=5, progress=False, callbacks=[trouble], distributed=world)
    world.close()


def _launch(scenario, tmp_path, nprocs=2, timeout=60, only_rank0=False):
    """Run `nprocs` worker processes; returns [(returncode, stderr)] by rank.

    only_rank0: wait for rank 0 alone, then kill the others (a rank that never returns).
    """
    store = torch.distributed.TCPStore("127.0.0.1", 0, nprocs, is_master=True, wait_for_workers=False)
    env = local_env(dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    procs = [subprocess.Popen([sys.executable, HERE, scenario, str(r), str(nprocs), str(store.port), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(nprocs)]
    results = []
    deadline = time.monotonic() + timeout
    try:
        for p in procs[:1] if only_rank0 else procs:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        del store
    return results


# -- the tests ---------------------------------------------------------------------------
class _TwoRanks:
    """A reducer for one of two simulated ranks: adds the other rank's sums."""

    world_size = 2

    def __init__(self, other=None):
        self.other, self.seen = other, None

    def __call__(self, t):
        self.seen = t.clone()
        return t + self.other if self.other is not None else t


def test_covariance_of_two_halves_is_the_global_one():
    from pbp_fx.layers import LayerSpec
    from pbp_fx.site import CandidatePool

    g = torch.Generator().manual_seed(0)
    pool = CandidatePool(LayerSpec("linear", (5, 3), True), None, pool=2, installed=0, activation="sigmoid",
                         dtype=torch.float64)
    c = torch.rand(16, 2, 5, generator=g, dtype=torch.float64)
    # dL/dy of the global mean loss, in the stacked layout [N, 1, C]: every member saw every sample.
    delta = torch.randn(16, 1, 5, generator=g, dtype=torch.float64) + 0.5
    cov, e = pool.covariance(c, delta)  # one process: no reducer
    # Each rank's error is that of its own mean loss over half the batch: 2 x delta.
    halves = [(c[:8], 2 * delta[:8]), (c[8:], 2 * delta[8:])]
    probe = _TwoRanks()
    pool.reducer = probe
    pool.covariance(*halves[1])
    pool.reducer = _TwoRanks(other=probe.seen)
    cov0, e0 = pool.covariance(*halves[0])
    assert (cov0 - cov).abs().max() < 1e-12
    # DDP averages the two ranks' candidate gradients: e must be 2 x the exact dC/dc.
    assert (e0 - 2 * e[:8]).abs().max() < 1e-12


def test_the_covariance_of_two_float32_halves_keeps_its_precision_under_an_error_with_a_large_mean():
    """C = S_cd - S_c m over the ranks cancels the error's mean out of two large sums: in float32 that
    lost 0.03 % of C at an error mean 1e4 x its spread; the sums are float64 now."""
    from pbp_fx.covariance_tap import batch_covariance

    g = torch.Generator().manual_seed(0)
    c = torch.rand(200, 2, 5, generator=g)
    delta = 100.0 + 0.01 * torch.randn(200, 1, 5, generator=g) + 0.003 * c[:, :1]
    c64, d64 = c.double(), delta.double()
    want = ((c64 - c64.mean(0)) * (d64 - d64.mean(0))).sum(0)
    probe = _TwoRanks()
    batch_covariance(c[100:], 2 * delta[100:], -1, 5, probe)
    cov, e = batch_covariance(c[:100], 2 * delta[:100], -1, 5, _TwoRanks(other=probe.seen))
    assert cov.dtype == torch.float32
    assert ((cov.double() - want).abs().max() / want.abs().max()).item() < 1e-6
    # e (2 x the exact dC/dc, as DDP averages) to float32 precision as well (1.5e-2 off before)
    want_e = 2 * (d64[:100] - d64.mean(0))
    assert ((e.double() - want_e).abs().max() / want_e.abs().max()).item() < 1e-6


def test_two_ranks_match_one_rank(tmp_path):
    results = _launch("match", tmp_path)
    for rc, err in results:
        assert rc == 0, err[-3000:]
    ref_pm, ref = run_match()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for got in ranks:
        assert got["decisions"] == ref["decisions"]
        assert got["decisions"][1] == ("dendrite", "continue", 0) and got["decisions"][2][1] == "restructured"
        # Statistics after each dendrite epoch: the global batch's, on every rank.
        assert len(got["stats"]) == len(ref["stats"]) >= 1
        for g, r in zip(got["stats"], ref["stats"]):
            assert g.keys() == r.keys()
            for site in r:
                assert g[site]["steps"] == r[site]["steps"]
                for k in ("ema", "best"):
                    assert (g[site][k] - r[site][k]).abs().max() < 1e-5, (site, k)
        # The installed dendrites (weights, V) and everything else at the end.
        assert got["installed"].keys() == ref["installed"].keys() and ref["installed"]
        for site, rows in ref["installed"].items():
            for k, v in rows.items():
                assert (got["installed"][site][k] - v).abs().max() < 1e-5, (site, k)
        for k, v in ref["state"].items():
            assert (got["state"][k].double() - v.double()).abs().max() < 1e-5, k
        assert got["val"] == pytest.approx(ref["val"], abs=1e-9)
        assert got["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-6)
        assert got["reloaded_equal"]
    # After each restructure the ranks hold bit-identical parameters.
    assert ranks[0]["checksums"] and all(len(set(c)) == 1 for c in ranks[0]["checksums"])
    assert ranks[0]["checksums"] == ranks[1]["checksums"]
    # Rank 0's checkpoint loads in one process.
    pm = pbp_fx.load(str(tmp_path / "checkpoint.safetensors"), _build, _inputs())
    assert pm.num_dendrites == ref_pm.num_dendrites
    for k, v in ref["state"].items():
        assert (pm.state_dict()[k].double() - v.double()).abs().max() < 1e-5, k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_one_nccl_rank_on_the_gpu_trains_as_one_process_on_the_cpu():
    from pbp_fx.distributed import Distributed

    _, ref = run_match()
    world = Distributed.init("nccl", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        pm, got = run_match(world)
    finally:
        world.close()
    assert world.device.type == "cuda" and next(pm.parameters()).is_cuda
    assert got["decisions"] == ref["decisions"] and got["decisions"][2][1] == "restructured"
    for g, r in zip(got["stats"], ref["stats"]):
        for site in r:
            for k in ("ema", "best"):
                assert (g[site][k].cpu() - r[site][k]).abs().max() < 1e-7, (site, k)
    for k, v in ref["state"].items():
        assert (got["state"][k].cpu().double() - v.double()).abs().max() < 1e-7, k
    assert got["val"] == pytest.approx(ref["val"], abs=1e-9)


def test_an_output_the_loss_does_not_read_trains_as_in_one_process(tmp_path):
    """The aux head gets no gradient from the default loss; DDP (static graph) stopped at the second
    step. Its layers now get a zero gradient: both phases run, and match one process."""
    results = _launch("aux", tmp_path)
    for rc, err in results:
        assert rc == 0, err[-3000:]
    _, ref = run_match(build=_build_with_aux_head)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert got["decisions"] == ref["decisions"] and got["installed"]
        for k, v in ref["state"].items():
            assert (got["state"][k].double() - v.double()).abs().max() < 1e-5, k
        assert got["val"] == pytest.approx(ref["val"], abs=1e-9)


def test_no_sync_accumulation_works_from_the_first_step_of_every_phase(tmp_path):
    """DDP's static graph failed inside torch (an internal assert) when the first step after a wrap
    ran under no_sync, and every restructure builds a new wrapper. That first step now synchronises:
    the accumulated gradients, and so the run, are those of the synchronised loop."""
    results = _launch("accumulate", tmp_path)
    for rc, err in results:
        assert rc == 0, err[-3000:]
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        quiet, synced = got[True], got[False]
        assert quiet["phases"] == synced["phases"] and "dendrite" in quiet["phases"]
        assert quiet["dendrites"] == synced["dendrites"] and max(quiet["dendrites"].values()) == 1
        for k, v in synced["state"].items():
            assert (quiet["state"][k].double() - v.double()).abs().max() < 1e-9, k


@pytest.mark.slow  # (default suite under ~10 minutes: 2-rank runs; its fit twin stays)
def test_an_output_the_loss_does_not_read_trains_in_a_loop_of_ones_own(tmp_path):
    """DDP stopped at the second step of a custom loop whose loss reads the "logits" alone: the zero
    gradient for the other outputs' parameters was fit's own. reaching_every_parameter gives it."""
    results = _launch("aux_loop", tmp_path)
    for rc, err in results:
        assert rc == 0, err[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["run"] for r in range(2)]
    assert "dendrite" in ranks[0]["phases"] and max(ranks[0]["dendrites"].values()) == 1
    for k, v in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][k], v), k
    aux = ranks[0]["state"]["graph_module.aux.weight"]
    assert torch.equal(aux, _build_with_aux_head().aux.weight.detach())  # its zero gradient left it as built


def test_a_head_outside_pm_trains_as_one_model_on_every_rank(tmp_path):
    """With root= (a head of one's own around pm), DDP wrapped pm alone: each rank trained its own
    head, the validation score summed two models, and nothing said so."""
    results = _launch("head", tmp_path)
    for rc, err in results:
        assert rc == 0, err[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["phases"][:3] == ["neuron", "dendrite", "neuron"]
    assert max(ranks[0]["dendrites"].values()) == 1
    for k, v in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][k], v), k
    for r in ranks:
        assert r["said"]["no root"].startswith("PhaseController(distributed=...): the optimizer trains 2 "
                                               "parameter(s) outside pm (a head?), which DDP over pm does not")
        assert "_HeadAround" not in r["said"]["no forward"] and "Module has no forward" in r["said"]["no forward"]


def test_a_failing_rank_is_reported_and_the_other_exits(tmp_path):
    t0 = time.monotonic()
    (rc0, err0), (rc1, err1) = _launch("fail", tmp_path)
    assert time.monotonic() - t0 < 45
    assert rc1 != 0 and "rank one broke on purpose" in err1
    assert rc0 != 0
    assert "rank 0 stopped: rank 1 failed with TrainingError: rank one broke on purpose" in err0, err0[-2000:]


@pytest.mark.slow  # (default suite under ~10 minutes: 2-rank runs)
def test_a_loss_gone_nan_on_one_rank_after_a_best_stops_every_rank(tmp_path):
    """One process takes such an epoch as diverged and goes on from its best weights; a rank that left
    its epoch alone would leave the others waiting in the gradient all-reduce, so the ranks stop."""
    t0 = time.monotonic()
    (rc0, err0), (rc1, err1) = _launch("nanloss", tmp_path)
    assert time.monotonic() - t0 < 45
    assert rc1 != 0 and "the loss is nan in the neuron phase" in err1, err1[-2000:]
    assert rc0 != 0 and "rank 0 stopped: rank 1 failed with TrainingError: the loss is nan" in err0, err0[-2000:]


@pytest.mark.slow  # (default suite under ~10 minutes: 2-rank runs)
def test_a_validation_score_gone_nan_after_a_best_takes_every_rank_back_to_it_and_on(tmp_path):
    """fit raised there; every rank sees the same score, so they go back to the best weights together."""
    (rc0, err0), (rc1, err1) = _launch("nanval", tmp_path)
    assert rc0 == rc1 == 0, err0[-2000:] + err1[-2000:]
    assert "the validation score is nan at epoch 3: the weights diverged" in err0 and "diverged" not in err1
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert got[0]["rows"] == got[1]["rows"] and got[0]["rows"][2] == ("neuron", None, "restructured")
    assert got[0]["rows"][3][0] == "dendrite"
    for k, v in got[0]["state"].items():
        assert torch.equal(v, got[1]["state"][k]), k


def test_mistakes_of_a_distributed_run_are_said_in_one_line_on_every_rank(tmp_path):
    """Before: fit without distributed= let the ranks drift apart from the first dendrite phase, silently;
    rank-dependent settings took other decisions (gloo's collective mismatch, or a hang) or trained other
    candidates under one statistic, silently; a loop that bound ctl.model once trained without synchronising
    after the first restructure, silently; a loader without len() giving the ranks different numbers of
    batches died in gloo's C++; a validation set smaller than the ranks read "the validation
    loader is empty" on rank 1; world.save under `if world.is_main` raised gloo's timeout."""
    results = _launch("misuse", tmp_path, timeout=90)
    assert all(rc == 0 for rc, _ in results), [err[-2000:] for _, err in results]
    said = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in said:
        assert rank["no_distributed"].startswith("TrainingError: torch.distributed runs 2 processes, but this "
                                                 "PhaseController has no distributed="), rank
        assert re.fullmatch(r"DistributedError: the ranks differ in PhaseController settings \(a digest of the "
                            r"PBConfig\): \[\d+, \d+\] \(rank 0 first\); give every rank's PhaseController \(or "
                            r"fit\) the same config and keywords", rank["settings"]), rank
        assert rank["one_validation_sample"] == "ok", rank
        assert rank["other_width"] == ("DistributedError: the ranks hold different models (each with 0 dendrite(s), "
                                       "but their phases, or their parameters' or buffers' names, shapes or dtypes "
                                       "differ): build the same model, perforated with the same arguments, on every "
                                       "rank"), rank
        assert rank["uneven_iterable"] == ("DistributedError: the ranks differ in whether a training batch is left: "
                                           "[1, 0] (rank 0 first); the training loader has no len(), and some ranks ran "
                                           "out after 5 batches while others had more: give every rank as many batches "
                                           "(shard the data with Distributed.loader, or have the IterableDataset give "
                                           "each rank the same number)"), rank
        assert rank["stale_wrapper"] == ("DistributedError: a training forward through a DDP wrapper that is no "
                                         "longer current (a restructure replaced it as the model's trainable "
                                         "parameters changed, or world.close() ended it): read ctl.model after every "
                                         "ctl.step(), not once before the loop"), rank
        assert rank["own_wrapper"] == ("DistributedError: the optimizer stepped, but no training forward went through "
                                       "ctl.model since the last ctl.step(): a DDP wrapper of your own leaves the "
                                       "candidates' and dendrites' gradients unsynchronised, and the ranks drift "
                                       "apart; drop it and train through ctl.model (read it after every "
                                       "ctl.step())"), rank
    assert said[0]["save_on_rank_0"].startswith("DistributedError: rank 0 waited at world.save for the other ranks, "
                                                "which did not come"), said[0]
    assert said[0]["save_on_rank_0"].endswith("call world.save on every rank (rank 0 writes, the others wait for "
                                              "the file), not under `if world.is_main`"), said[0]


def test_a_site_the_loss_reaches_on_some_ranks_only_is_refused_not_mixed(tmp_path):
    """Rank 0's loss read a head whose output rank 1's left out: in the dendrite phase the ranks summed two
    sites' statistics at once (mixed, silently, where the two had the same size) or waited for the
    timeout and blamed a rank that had not exited (the distributed review)."""
    results = _launch("loss_by_rank", tmp_path, timeout=90)
    assert all(rc == 0 for rc, _ in results), [err[-2000:] for _, err in results]
    for r in range(2):
        said = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert said.startswith(f"DistributedError: rank {r} summed the candidates' statistics of site "), said
        assert said.endswith("give every rank's loss the same outputs (0 * out.sum() for one it leaves out)"), said


def test_the_controllers_construction_warnings_are_said_by_rank_0_only(tmp_path):
    """N ranks printed them N times (the run's other warnings were said by rank 0 already)."""
    (rc0, err0), (rc1, err1) = _launch("warn", tmp_path)
    assert rc0 == rc1 == 0, err0[-2000:] + err1[-2000:]
    assert err0.count("LBFGS with line_search_fn='strong_wolfe' trains no candidates") == 1, err0[-2000:]
    assert "LBFGS" not in err1, err1[-2000:]


@pytest.mark.slow  # (default suite under ~10 minutes: a 2-rank timeout)
def test_a_silent_rank_times_out(tmp_path):
    t0 = time.monotonic()
    [(rc0, err0)] = _launch("stall", tmp_path, timeout=40, only_rank0=True)
    assert rc0 != 0
    assert "rank 0 lost contact with the other ranks" in err0 and "3 s timeout" in err0, err0[-2000:]
    assert time.monotonic() - t0 < 40


TINY = """
import torch, torch.nn as nn
from torch.utils.data import TensorDataset

def build_model():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

def example_inputs():
    return (torch.zeros(2, 6),)

def datasets(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(240, 6, generator=g)
    y = (x[:, :3] + 0.3 * torch.randn(240, 3, generator=g)).argmax(1)
    return TensorDataset(x[:160], y[:160]), TensorDataset(x[160:200], y[160:200]), TensorDataset(x[200:], y[200:])
"""


def test_a_command_other_than_train_started_by_torchrun_is_refused_once_and_a_workers_subprocess_runs(tmp_path):
    """torchrun's two workers each ran `pbp-fx transform` (or compare) whole into the same folder; a command a worker
    starts itself inherits torchrun's environment, and runs (the diff review)."""
    model = tmp_path / "tiny.py"
    model.write_text(TINY)
    env = local_env(dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    child = tmp_path / "worker.py"  # (each worker runs pbp-fx itself, in a subprocess)
    child.write_text("import os, subprocess, sys\nr = subprocess.run([sys.executable, '-m', 'pbp_fx', 'transform', "
                     "sys.argv[1], '--out', sys.argv[2] + os.environ['RANK']])\nsys.exit(r.returncode)\n")
    for argv, refused in ((["-m", "pbp_fx", "transform", str(model), "--out", str(tmp_path / "t")], True),
                          ([str(child), str(model), str(tmp_path / "c")], False)):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *argv],
                              env=env, capture_output=True, text=True, timeout=120)
        said = [line for line in proc.stderr.splitlines() if line.startswith("pbp-fx: error:")]
        if refused:
            assert proc.returncode != 0 and not (tmp_path / "t").exists(), proc.stderr[-2000:]
            assert said == ["pbp-fx: error: pbp-fx transform runs in one process, and torchrun started 2: run it "
                            "without torchrun"], proc.stderr[-2000:]
        else:
            assert proc.returncode == 0 and not said, proc.stderr[-2000:]
            assert (tmp_path / "c0" / "report.json").exists() and (tmp_path / "c1" / "report.json").exists()


def test_cli_nproc_2_trains_with_torchrun_and_only_rank_0_writes(tmp_path):
    model = tmp_path / "tiny.py"
    model.write_text(TINY)
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "pbp_fx", "train", str(model), "--nproc", "2", "--out", str(out),
                           "--epochs", "6", "--patience", "1", "--max-dendrite-epochs", "2", "--max-dendrites", "1",
                           "--batch-size", "40", "--lr", "1e-5", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("phase history") == 1, proc.stdout  # rank 0 alone reports
    assert proc.stderr.count("a dendrite phase sees") == 1, proc.stderr  # (every rank warned of the short phase)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2
    assert sorted(os.listdir(out)) == ["checkpoint.safetensors", "history.json", "plot.png", "summary.json"]
    assert {r["phase"] for r in json.loads((out / "history.json").read_text())["epochs"]} == {"neuron", "dendrite"}
    # The checkpoint rank 0 wrote loads in one process and scores what the run reported.
    from pbp_fx.job import load_job_module, make_loaders

    mod = load_job_module(str(model))
    pm = pbp_fx.load(str(out / "checkpoint.safetensors"), mod.build_model, mod.example_inputs())
    assert pm.num_dendrites == summary["dendrites"]
    assert pbp_fx.evaluate(pm, make_loaders(mod.datasets(0), 40, 0)[2]) == pytest.approx(summary["test"])
    # compare's one-process controls would not be paired with it (another data order): refused in one line
    proc = subprocess.run([sys.executable, "-m", "pbp_fx", "compare", "--pb-run", str(out), "--no-latency"],
                          env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "that run trained in 2 processes (train --nproc 2) for some or all of its epochs, whose data order" in proc.stderr
    assert sorted(os.listdir(out)) == ["checkpoint.safetensors", "history.json", "plot.png", "summary.json"]


def test_the_same_error_on_every_rank_prints_once(tmp_path):
    """A model error inside training failed on both ranks, and each printed the line."""
    model = tmp_path / "tiny.py"
    model.write_text(TINY + "\n\ndef metric(out, y):\n    raise ValueError('this metric is broken')\n")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pbp_fx", "train", str(model), "--nproc", "2", "--out",
                           str(tmp_path / "run"), "--epochs", "2", "--batch-size", "40", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("pbp-fx: error:")]
    assert len(lines) == 1 and lines[0].startswith("pbp-fx: error: every rank: the first training samples fail"), lines
    assert "this metric is broken" in lines[0]


def test_a_failure_in_training_prints_one_resume_hint_with_the_runs_own_flags(tmp_path):
    """Without --no-progress, rank 1 (whose bar is off) added --no-progress to its hint: the two ranks' lines no
    longer merged, and one of them named a flag the run was not given (a reviewer)."""
    model = tmp_path / "tiny.py"
    model.write_text(TINY + "\n\nCALLS = [0]\n\ndef loss_fn(out, y):\n    CALLS[0] += 1\n    if CALLS[0] > 8:\n"
                     "        raise RuntimeError('the loss broke on purpose')\n"
                     "    return torch.nn.functional.cross_entropy(out, y)\n")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pbp_fx", "train", str(model), "--nproc", "2", "--out",
                           str(tmp_path / "run"), "--epochs", "20", "--batch-size", "40"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.startswith("pbp-fx: error:")]
    # (one line where both ranks fail alike; under load a rank may be stopped by the other's failure first)
    assert lines and all(ln.endswith(f"resumes with pbp-fx train --resume {tmp_path / 'run'} --nproc 2")
                         for ln in lines if "resumes with" in ln), lines
    assert any("resumes with" in ln for ln in lines), lines


def _sigint_as_in_a_terminal() -> None:
    """Ctrl-C as a terminal gives it: a test run started in the background passes SIGINT on ignored."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _long_run_with_a_checkpoint(tmp_path, stderr):
    """`pbp-fx train --nproc 2` of a long run in a session of its own, once its first checkpoint is
    written: (the process, its --out folder)."""
    model = tmp_path / "tiny.py"
    model.write_text(TINY)
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "pbp_fx", "train", str(model), "--nproc", "2", "--out", str(out),
                             "--epochs", "3000", "--patience", "3000", "--batch-size", "40", "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True, start_new_session=True,
                            preexec_fn=_sigint_as_in_a_terminal)
    deadline = time.time() + 90
    while time.time() < deadline and not (out / "checkpoint.safetensors").exists() and proc.poll() is None:
        time.sleep(0.1)
    return proc, out


@pytest.mark.parametrize("how", ["SIGTERM to the launcher", pytest.param("Ctrl-C to the group", marks=pytest.mark.slow)])
def test_sigterm_to_the_launcher_stops_every_rank_with_one_resume_line(tmp_path, how):
    """SIGTERM to `pbp-fx train --nproc 2` killed the torchrun agent: both ranks kept training (and
    rewriting the checkpoint), and the launcher said only 'terminated'. Either signal printed torch's
    SignalException traceback(s) from the agent above the line."""
    import signal

    proc, out = _long_run_with_a_checkpoint(tmp_path, subprocess.PIPE)
    try:
        time.sleep(1.0)
        if how.startswith("SIGTERM"):
            proc.send_signal(signal.SIGTERM)  # the launcher alone, as `kill PID` does
        else:
            os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches every process of the group
        err = proc.communicate(timeout=90)[1]
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == (143 if how.startswith("SIGTERM") else 130), err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("pbp-fx: error:")]
    word = "terminated" if how.startswith("SIGTERM") else "interrupted"
    assert len(lines) == 1 and lines[0].startswith(f"pbp-fx: error: {word} after epoch "), err[-2000:]
    assert f"--resume {out} --nproc 2" in lines[0]
    size = (out / "checkpoint.safetensors").stat().st_mtime
    time.sleep(2.0)
    assert (out / "checkpoint.safetensors").stat().st_mtime == size  # no rank writes on


@pytest.mark.parametrize("after", [0.5, 2.0, 3.5])
def test_a_ctrl_c_while_the_ranks_start_is_one_line(tmp_path, after):
    """A Ctrl-C in the first seconds of `train --nproc 2` printed the agent's or a rank's traceback from
    inside `import torch`, or nothing at all (the ranks had not started), and a later one read
    'terminated' (the launcher's SIGTERM came on top of the group's SIGINT; a reviewer)."""
    import signal

    model = tmp_path / "tiny.py"
    model.write_text(TINY)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "pbp_fx", "train", str(model), "--nproc", "2", "--out",
                             str(tmp_path / "run"), "--epochs", "3000", "--batch-size", "40", "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_sigint_as_in_a_terminal)
    try:
        time.sleep(after)
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches every process of the group
        err = proc.communicate(timeout=90)[1]
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("pbp-fx: error:")]
    assert len(lines) == 1 and lines[0].startswith("pbp-fx: error: interrupted"), err[-2000:]


def test_the_ranks_stop_when_the_launcher_is_killed(tmp_path):
    """torchrun starts each rank in a session of its own: a SIGKILL of `pbp-fx train --nproc 2`'s process
    group left both ranks training, and they wrote the run's folder (history, summary) after the kill."""
    import signal

    proc, out = _long_run_with_a_checkpoint(tmp_path, subprocess.DEVNULL)
    try:
        assert (out / "checkpoint.safetensors").exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and torchrun's agent; the ranks have sessions of their own
        proc.wait()

    def ranks() -> list[str]:
        ps = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
        return [line for line in ps.splitlines() if str(out) in line]

    deadline = time.time() + 30
    while time.time() < deadline and ranks():
        time.sleep(0.2)
    left = ranks()
    for line in left:  # (do not leave them to the rest of the suite)
        subprocess.run(["pkill", "-KILL", "-f", str(out)])
    assert not left, left
    assert not (out / "summary.json").exists()

def test_training_samples_that_do_not_split_over_the_ranks_are_warned_of():
    """999 samples on 2 ranks: the DistributedSampler repeats one every epoch, and the run was 7.6e-3 off
    a one-process run of the same batches, silently."""
    import warnings

    from torch.utils.data import TensorDataset

    from pbp_fx.distributed import Distributed

    world = object.__new__(Distributed)  # (loader reads only the rank and the world size)
    world.rank, world.world_size = 0, 2
    with pytest.warns(pbp_fx.PBWarning, match="the 999 training samples do not split evenly over 2 ranks: the "
                                              "DistributedSampler repeats 1 of them every epoch"):
        world.loader(TensorDataset(torch.randn(999, 3)), 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        world.loader(TensorDataset(torch.randn(1000, 3)), 40)

if __name__ == "__main__":
    scenario, rank, nprocs, port, out_dir = sys.argv[1:6]
    try:
        _worker(scenario, int(rank), int(nprocs), int(port), out_dir)
    except Exception as exc:  # noqa: BLE001 - one line per rank for the test to read
        print(f"rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


def test_strided_statistics_of_two_ranks_are_the_global_ones():
    """candidate_stride: each rank reads the same positions of its own samples, so the ranks'
    summed statistics equal one process's (split pool of 2, conv layout, stride 2)."""
    from pbp_fx.covariance_tap import candidate_gradient

    g = torch.Generator().manual_seed(0)
    settings = (0.99, 0, 0.01, True)
    delta = torch.randn(16, 3, 9, generator=g, dtype=torch.float64) + 0.5  # dL/dy of the global mean loss
    c = torch.rand(8, 2, 3, 5, generator=g, dtype=torch.float64)  # [B/P, P, C, every 2nd of 9 positions]

    def state():
        return ([torch.zeros(2, 3, dtype=torch.float64) for _ in range(3)] + [torch.tensor(0) for _ in range(3)], [], [])

    one = state()
    candidate_gradient(delta, c, *one, True, 1, True, 2, None, settings)
    # Rank r holds each member's r-th half of its slice (as a DistributedSampler deals them);
    # its error is that of its own mean loss: 2 x delta.
    rows = [torch.cat([torch.arange(0, 4), torch.arange(8, 12)]), torch.cat([torch.arange(4, 8), torch.arange(12, 16)])]
    cs = [c[:4], c[4:]]
    probe, ranks = _TwoRanks(), [state(), state()]
    candidate_gradient(2 * delta[rows[1]], cs[1], *ranks[1], True, 1, True, 2, None, settings, probe)
    candidate_gradient(2 * delta[rows[0]], cs[0], *ranks[0], True, 1, True, 2, None, settings,
                       _TwoRanks(other=probe.seen))
    assert (ranks[0][0][0] - one[0][0]).abs().max() < 1e-12  # ema


def test_a_ranks_last_batch_of_one_sample_is_left_out_on_every_rank():
    """162 samples, global batch 40 on 2 ranks: each rank's last batch had 1 sample, and a BatchNorm
    model that trains on one process failed (one value per channel)."""
    from torch.utils.data import TensorDataset

    from pbp_fx.distributed import Distributed

    data = TensorDataset(torch.randn(162, 3), torch.zeros(162, dtype=torch.long))
    for rank in (0, 1):
        world = object.__new__(Distributed)  # (loader reads only the rank and the world size)
        world.rank, world.world_size = rank, 2
        sizes = [len(x) for x, _ in world.loader(data, 40, shuffle=True)]
        assert sizes == [20, 20, 20, 20]  # 81 samples a rank: the 81st left out
        world_sizes = [len(x) for (x,) in world.loader(TensorDataset(torch.randn(164, 3)), 40)]
        assert world_sizes == [20, 20, 20, 20, 2]  # a last batch of 2 stays


@pytest.mark.parametrize("timeout", [1e10, 0, -1.0, float("nan"), True])
def test_a_timeout_no_process_group_takes_is_refused_before_anything_starts(timeout):
    """From 1e10 s c10d timed out at once, with 40 lines of C++ frames; 1e300 raised OverflowError (a reviewer)."""
    with pytest.raises(DistributedError, match=r"timeout=.*must be a number of seconds greater than 0 and at most"):
        Distributed.init("gloo", timeout=timeout)
    assert not torch.distributed.is_initialized()


def test_a_numpy_timeout_is_a_number_of_seconds():
    """np.int64(600) was refused as no number (a reviewer)."""
    import numpy as np

    from pbp_fx.distributed import timeout_problem

    assert timeout_problem(np.int64(600)) is None and timeout_problem(np.float32(0.5)) is None
    assert timeout_problem(np.int64(0)) is not None
