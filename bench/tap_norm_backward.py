"""The split pool's covariance tap and norm backward as one native call against the two calls it replaced,
side by side in one process.

Two measurements per model, on the CPU (the native kernels'), batch 100, pool 4, split, stride 1:
- step: the dendrite-phase training step (forward, loss, backward, Adam) with the one call and with the two
  calls (native.candidate_norm_backward declined, so that EagerNormTap runs native.candidate_gradient then
  native.norm_sigmoid_backward), and the plain step, in interleaved rounds (bench/paired.py: blocks of about
  --steps x 10 ms); the ratios are per-round medians, one call / two calls and each / plain.
- call: each conv site's backward on the arguments of a real step (the pool's statistics copied), one call
  against the two, interleaved blocks, warm caches; and the C kernels alone (their ctypes call only).

    python bench/tap_norm_backward.py [--models mnist1d_cnn resnet_small] [--rounds 15]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import train_overhead as overhead
from paired import interleaved, round_ratios, spread
from pbp_fx import native


def step_rounds(cfgs: dict, rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds per step of the plain step and the dendrite-phase step with one and two calls, interleaved
    (paired.interleaved)."""
    one_call = native.candidate_norm_backward
    dendrite = cfgs["dendrite P=4 split"]

    def with_backward(backward):
        def step():
            native.candidate_norm_backward = backward
            dendrite()
        return step

    try:
        return interleaved({"plain": cfgs["plain"], "one call": with_backward(one_call),
                            "two calls": with_backward(lambda *a: None)}, min_time=rounds * steps * 0.01, reps=rounds)
    finally:
        native.candidate_norm_backward = one_call


def captured_calls(step) -> dict[tuple, tuple]:
    """The arguments of each site's one-call backward in a step, by the candidates' shape."""
    one_call = native.candidate_norm_backward
    seen: dict[tuple, tuple] = {}

    def keep(*args):
        seen.setdefault(tuple(args[0].shape), args)
        return one_call(*args)

    native.candidate_norm_backward = keep
    try:
        step()
    finally:
        native.candidate_norm_backward = one_call
    return seen


def call_times(args: tuple, blocks: int = 15, calls: int = 50) -> dict[str, float]:
    """Median microseconds of one site's backward as one call and as two (Python wrappers included), and of
    their C kernels alone."""
    d, stats, snapshots, rows, scale, settings, left_out, saved, layout, needs, _ = args
    state = copy.deepcopy((stats, snapshots, rows))
    eps = 1e-5  # (any: the timing does not depend on it)
    packed_one, packed_two = native.PreparedArguments(), native.PreparedArguments()  # (as a pool keeps them)
    lib = native.kernel()
    names = ("pbp_candidate_norm_backward", "pbp_candidate_gradient", "pbp_norm_sigmoid_backward")
    raw = {n: getattr(lib, n) for n in names}
    kernel: dict[str, list[float]] = {n: [] for n in names}

    def timed(name):
        def call(*a):
            t = time.perf_counter()
            out = raw[name](*a)
            kernel[name].append(time.perf_counter() - t)
            return out
        return call

    def two():
        _, grad_c = native.candidate_gradient(saved[1], d, *state, layout[3], scale, settings, left_out, packed_two)
        return native.norm_sigmoid_backward(grad_c, saved, layout, eps, needs)

    def one():
        return native.candidate_norm_backward(d, *state, scale, settings, left_out, saved, layout, needs, packed_one)

    whole: dict[str, list[float]] = {"two calls": [], "one call": []}
    for n in names:
        setattr(lib, n, timed(n))
    try:
        with torch.no_grad():
            for _ in range(blocks):
                for name, fn in (("two calls", two), ("one call", one)):
                    t = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    whole[name].append((time.perf_counter() - t) / calls)
    finally:
        for n in names:
            setattr(lib, n, raw[n])
    out = {name: statistics.median(v) * 1e6 for name, v in whole.items()}
    out["C: one"] = statistics.median(kernel[names[0]]) * 1e6
    out["C: two"] = (statistics.median(kernel[names[1]]) + statistics.median(kernel[names[2]])) * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["mnist1d_cnn", "resnet_small"], choices=list(overhead.MODELS))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if native.kernel() is None:
        raise SystemExit("no native kernels here (no C compiler, or PBP_FX_NATIVE=0): nothing to compare")
    print(f"torch {torch.__version__}, CPU, 1 thread, batch 100, pool 4 split; medians of {a.rounds} "
          "interleaved rounds")
    for model in a.models:
        mod = overhead.load(model)
        x, y = overhead.first_batch(mod, 100)
        cfgs = {name: step for name, _, step in overhead.configs(mod, x, y, 4, "adam", strides=())}
        times = step_rounds(cfgs, a.rounds, a.steps)
        ratios = round_ratios(times, "plain")
        pair = round_ratios(times, "two calls")["one call"]
        print(f"\n{model}\n| step | ms | / plain, median (25-75 %) |\n|---|---:|---:|")
        for name, values in times.items():
            med, low, high = spread(ratios[name])
            print(f"| {name} | {statistics.median(values) * 1e3:.3f} | {med:.3f} ({low:.3f}-{high:.3f}) |")
        med, low, high = spread(pair)
        print(f"one call / two calls, per round: {med:.3f} ({low:.3f}-{high:.3f})")
        print("\n| site's candidates | two calls us | one call us | ratio | C kernels: two us | one us | ratio |\n"
              "|---|---:|---:|---:|---:|---:|---:|")
        for shape, args in captured_calls(cfgs["dendrite P=4 split"]).items():
            t = call_times(args)
            print(f"| {list(shape)} | {t['two calls']:.1f} | {t['one call']:.1f} "
                  f"| {t['one call'] / t['two calls']:.2f} "
                  f"| {t['C: two']:.1f} | {t['C: one']:.1f} | {t['C: one'] / t['C: two']:.2f} |")


if __name__ == "__main__":
    main()
