"""DDP scaling of PB training on CPU: steps per second on 1 and 2 ranks, both phases.

    python bench/ddp_scaling.py                    # MLP 40-512-512-10, global batch 512
    python bench/ddp_scaling.py --model cnn --batch 256 --seconds 3

Strong scaling: the global batch is fixed and split across the ranks (gloo on 127.0.0.1),
so a step is one global batch whatever the world size and the ratio
    speedup = steps/s (R ranks) / steps/s (1 rank)
is ideally R. Each rank runs `--threads` intra-op threads (default 1, so R ranks use R
cores). The 1-rank row is the plain single-process path (no DDP, no reducer).

Phases, per rank, each timed for `--seconds` after `--warmup` steps:
    neuron    forward + loss.backward + Adam on the model's parameters (DDP over them)
    dendrite  the same with candidates (pool 4) attached: output unchanged, the covariance
              statistics all-reduced per site and batch, Adam on the candidates
    dendrite, local stats   (2 ranks only) the reducers removed: what the statistics
              all-reduce costs (the statistics are then wrong; for timing only)

The last column is each rank's CPU time per step (its threads included): on a machine
shared with other work the wall-clock figures swing, the CPU cost per step much less.
Random data (the figures measure throughput, not learning). The world sizes alternate for
`--repeat` runs and the table shows medians, so that changes of machine load hit them alike.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pbp_fx  # noqa: E402
from pbp_fx.distributed import Distributed, local_env  # noqa: E402


def build(kind: str, width: int) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    if kind == "mlp":
        m = nn.Sequential(nn.Linear(40, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
        return m, (torch.randn(4, 40),)
    m = nn.Sequential(nn.Unflatten(1, (1, 40)),
                      nn.Conv1d(1, width, 5, stride=2, padding=1), nn.BatchNorm1d(width), nn.ReLU(),
                      nn.Conv1d(width, width, 5, stride=2, padding=1), nn.BatchNorm1d(width), nn.ReLU(),
                      nn.Conv1d(width, width, 5, stride=2, padding=1), nn.BatchNorm1d(width), nn.ReLU(),
                      nn.Flatten(), nn.Linear(width * 4, 10))
    return m, (torch.randn(4, 40),)


def _steps_per_second(model, opt, x, y, warmup: int, seconds: float, ddp) -> tuple[float, int, float]:
    """(steps per second, steps, CPU seconds per step of this process, threads included)."""
    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if ddp is not None:
        ddp.barrier()
    # Every rank must run the same number of steps: rank 0 decides from its clock,
    # in chunks, and the others follow.
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        for _ in range(5):
            step()
        n += 5
        done = time.perf_counter() - t0 >= seconds
        if ddp is not None:
            done = bool(ddp.agree([float(done)])[0])
        if done:
            break
    return n / (time.perf_counter() - t0), n, (time.process_time() - c0) / n


def worker(rank: int, world: int, port: int, opts: dict, results) -> None:
    torch.set_num_threads(opts["threads"])
    ddp = None
    if world > 1:
        store = torch.distributed.TCPStore("127.0.0.1", port, world, is_master=False,
                                           timeout=timedelta(seconds=60))
        ddp = Distributed.init("gloo", timeout=120, store=store, rank=rank, world_size=world)
    model, inputs = build(opts["model"], opts["width"])
    pm = pbp_fx.perforate(model, inputs)
    local = opts["batch"] // world
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(local, 40, generator=g)
    y = torch.randint(0, 10, (local,), generator=g)
    out = {}
    # neuron phase
    net = ddp.wrap(pm) if ddp else pm
    opt = torch.optim.Adam(pm.trainable_parameters(), lr=1e-3)
    out["neuron"] = _steps_per_second(net, opt, x, y, opts["warmup"], opts["seconds"], ddp)
    # dendrite phase
    pm.start_dendrite_phase(pool=opts["pool"])
    net = ddp.wrap(pm) if ddp else pm
    opt = torch.optim.Adam(pm.trainable_parameters(), lr=0.02)
    out["dendrite"] = _steps_per_second(net, opt, x, y, opts["warmup"], opts["seconds"], ddp)
    if ddp is not None:
        for s in pm.sites.values():
            s.candidates.reducer = None  # timing only: the statistics are now per rank
        out["dendrite_local"] = _steps_per_second(net, opt, x, y, opts["warmup"], opts["seconds"], ddp)
    if ddp is not None:  # CPU seconds per step: the mean over the ranks
        for k, (sps, n, cpu) in out.items():
            out[k] = (sps, n, ddp.all_reduce_sum([cpu])[0] / world)
        ddp.close()
    if rank == 0:
        results.put(out)


def run(world: int, opts: dict) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    store = None
    port = 0
    if world > 1:
        store = torch.distributed.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
        port = store.port
    procs = [ctx.Process(target=worker, args=(r, world, port, opts, results)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"a rank failed (exit codes {[p.exitcode for p in procs]})")
    del store
    return results.get()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    ap.add_argument("--width", type=int, default=None, help="MLP width (512) or CNN channels (64)")
    ap.add_argument("--batch", type=int, default=512, help="global batch")
    ap.add_argument("--pool", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=4.0, help="timed seconds per phase")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs per world size, alternating between them; the table shows medians")
    a = ap.parse_args()
    opts = {"model": a.model, "width": a.width or (512 if a.model == "mlp" else 64), "batch": a.batch,
            "pool": a.pool, "threads": a.threads, "warmup": a.warmup, "seconds": a.seconds}
    local_env(os.environ)  # gloo on the loopback interface
    runs: dict = {w: [] for w in a.ranks}
    for _ in range(a.repeat):  # alternating, so that a change of machine load hits every world size
        for w in a.ranks:
            runs[w].append(run(w, opts))
    rows = {w: {k: (statistics.median(r[k][0] for r in rs), sum(r[k][1] for r in rs),
                    statistics.median(r[k][2] for r in rs)) for k in rs[0]}
            for w, rs in runs.items()}
    base = rows[min(rows)]
    print(f"\nPB training throughput, {opts['model']} width {opts['width']}, global batch {opts['batch']}, "
          f"pool {opts['pool']}, {opts['threads']} thread(s) per rank, gloo on 127.0.0.1")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPU cores visible\n")
    print("| ranks | neuron steps/s | dendrite steps/s | neuron speedup | dendrite speedup | "
          "dendrite, local stats steps/s | CPU ms/step per rank (neuron / dendrite / local stats) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for w, r in rows.items():
        local = f"{r['dendrite_local'][0]:.1f}" if "dendrite_local" in r else "-"
        cpu = " / ".join(f"{r[k][2] * 1e3:.1f}" for k in ("neuron", "dendrite", "dendrite_local") if k in r)
        print(f"| {w} | {r['neuron'][0]:.1f} | {r['dendrite'][0]:.1f} | {r['neuron'][0] / base['neuron'][0]:.2f}x | "
              f"{r['dendrite'][0] / base['dendrite'][0]:.2f}x | {local} | {cpu} |")
    print(f"\n(steps = global batches; medians of {a.repeat} alternating runs; speedup against the "
          "smallest world size; ideal = ranks)")


if __name__ == "__main__":
    main()
