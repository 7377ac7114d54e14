"""Training-step overhead of PB, as ratios to the plain model's step, measured side by side.

For each model: the plain model; the neuron phase with K = 1..3 dendrites per site; the
dendrite phase with a candidate pool (K = 0). One step = forward, loss, backward, Adam step
on what that phase trains. Configurations are timed in interleaved rounds (median), so
machine noise hits them alike. FLOPs (forward + backward) come from FlopCounterMode.

Targets: dendrite-phase step <= 1.5x plain (pool 4, MNIST-1D CNN);
neuron-phase step <= 1.2x plain x (perforated FLOPs / plain FLOPs).

    python bench/train_overhead.py [--models mnist1d_cnn mnist1d_mlp] [--threads 1] [--pool 4]
"""
from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import pbp_fx

MODELS = {"mnist1d_cnn": "pbp_fx.models.mnist1d_cnn", "mnist1d_mlp": "pbp_fx.models.mnist1d_mlp",
          "resnet_small": "pbp_fx.models.resnet_small"}


def _batch(mod, batch: int, seed: int = 0):
    train, _, _ = mod.datasets(seed=0, num_samples=max(500, 2 * batch))
    x = torch.stack([train[i][0] for i in range(batch)])
    y = torch.stack([train[i][1] for i in range(batch)])
    return x, y


def _stepper(model, params, x, y):
    opt = torch.optim.Adam(params, lr=1e-3)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _flops(model, x, y) -> int:
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def configs(mod, x, y, pool: int):
    """(name, model, step function) for every configuration of one model."""
    torch.manual_seed(0)
    base = mod.build_model()
    base.train()
    out = [("plain", base, _stepper(base, list(base.parameters()), x, y))]
    for k in (1, 2, 3):
        pm = pbp_fx.perforate(copy.deepcopy(base), (x[:2],))
        for _ in range(k):
            pm.grow()
        with torch.no_grad():
            for s in pm.sites.values():
                s.out_weight.normal_(0, 0.1)
        pm.train()
        out.append((f"neuron K={k}", pm, _stepper(pm, list(pm.trainable_parameters()), x, y)))
    pm = pbp_fx.perforate(copy.deepcopy(base), (x[:2],))
    pm.train()
    pm.start_dendrite_phase(pool=pool)
    out.append((f"dendrite P={pool}", pm, _stepper(pm, list(pm.trainable_parameters()), x, y)))
    return out


def measure(cfgs, rounds: int, steps: int) -> dict[str, float]:
    for _, _, step in cfgs:  # warm-up
        for _ in range(5):
            step()
    times: dict[str, list] = {name: [] for name, _, _ in cfgs}
    for _ in range(rounds):
        for name, _, step in cfgs:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mnist1d_cnn", "mnist1d_mlp"], choices=list(MODELS))
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--pool", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} thread(s), batch {a.batch}, median of {a.rounds} "
          f"interleaved rounds of {a.steps} steps")
    for name in a.models:
        mod = importlib.import_module(MODELS[name])
        x, y = _batch(mod, a.batch)
        cfgs = configs(mod, x, y, a.pool)
        t = measure(cfgs, a.rounds, a.steps)
        flops = {n: _flops(m, x, y) for n, m, _ in cfgs}
        p_ms, p_fl = t["plain"], flops["plain"]
        print(f"\n{name} (width {mod.build_model().__class__.__name__} default)")
        print("| config | ms/step | step ratio | FLOP ratio | target | ok |")
        print("|---|---:|---:|---:|---:|:---:|")
        for n, _, _ in cfgs:
            ratio, fr = t[n] / p_ms, flops[n] / p_fl
            if n.startswith("neuron"):
                target = 1.2 * fr
            elif n.startswith("dendrite"):
                target = 1.5
            else:
                target = None
            ok = "" if target is None else ("yes" if ratio <= target else "NO")
            tgt = "" if target is None else f"{target:.2f}"
            print(f"| {n} | {t[n] * 1e3:.3f} | {ratio:.2f} | {fr:.2f} | {tgt} | {ok} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
