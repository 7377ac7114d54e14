"""A split pool's 2-D convs as columns and one bmm against the grouped conv, side by side (layers.columns_pay).

Two measurements on the CPU, 1 thread, pool 4:
- layer: the candidates' conv alone, forward and weight gradient (what a split pool runs for it), as the grouped
  conv and as columns + bmm, on shapes from small maps to large; interleaved rounds, medians and the per-round
  ratio columns / grouped. "rule" says which form `layers.runs_as_columns` picks for the shape.
- step: the dendrite-phase training step (forward, loss, backward, Adam), candidate stride 1 and 2, with the rule
  and with every 2-D conv pool grouped, beside the plain step, interleaved rounds (bench/train_overhead.py's models;
  torchvision's need torchvision: .venv-zoo).

    python bench/columns_2d.py [--models resnet_small resnet18] [--rounds 7]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import train_overhead as overhead
from paired import interleaved, round_ratios, spread
from pbp_fx import layers

POOL = 4
RULE = layers.columns_pay  # (restored after each timing)
# (batch, in channels, out channels, map size, kernel, stride): ResNet-18's stages at 32x32 and 64x64 inputs
# (batch 32), the small ResNet's (batch 100, its stride-2 pools' strided convs included), and a sweep of channels
# at 32-128 positions a member.
SHAPES = [(32, 512, 512, 1, 3, 1), (32, 512, 512, 2, 3, 1), (32, 256, 512, 4, 3, 2), (32, 256, 256, 2, 3, 1),
          (32, 256, 256, 4, 3, 1), (32, 128, 128, 4, 3, 1), (32, 128, 128, 8, 3, 1), (32, 64, 64, 16, 3, 1),
          (100, 16, 16, 8, 3, 1), (100, 32, 32, 4, 3, 1), (100, 16, 32, 8, 3, 2),
          (100, 16, 16, 8, 3, 4), (100, 32, 32, 4, 3, 2), (100, 64, 64, 4, 3, 2), (100, 128, 128, 4, 3, 2),
          (32, 16, 16, 2, 3, 1), (32, 32, 32, 2, 3, 1), (32, 64, 64, 2, 3, 1), (32, 32, 32, 4, 3, 1),
          (32, 64, 64, 4, 3, 1), (64, 64, 64, 2, 3, 1), (64, 128, 128, 2, 3, 1), (16, 128, 128, 4, 3, 1),
          (16, 256, 256, 4, 3, 1)]


def layer_rows(rounds: int) -> list[str]:
    rows = []
    for batch, cin, cout, size, k, stride in SHAPES:
        conv = torch.nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        spec = layers.LayerSpec.from_module(conv)
        x = torch.randn(batch, cin, size, size)
        w = (torch.randn(POOL, *spec.weight_shape) * 0.05).requires_grad_()

        def form(pays: bool):
            def run():
                layers.columns_pay = lambda *_: pays
                z = layers.split_apply(spec, x, w, None)
                z.backward(torch.ones_like(z))
                w.grad = None
            return run

        try:
            samples = interleaved({"grouped": form(False), "columns": form(True)}, min_time=1.0, reps=rounds)
        finally:
            layers.columns_pay = RULE
        ratio = spread(round_ratios(samples, "grouped")["columns"])
        positions = batch // POOL * ((size - 1) // stride + 1) ** 2
        rule = "columns" if layers.runs_as_columns(spec, x, POOL) else "grouped"
        grouped, columns = (statistics.median(samples[f]) * 1e3 for f in ("grouped", "columns"))
        rows.append(f"| {batch} | {cin} -> {cout} | {size}x{size} | {k}x{k} /{stride} | {positions} | {cin * k * k} | "
                    f"{grouped:.2f} | {columns:.2f} | {ratio[0]:.2f} ({ratio[1]:.2f}-{ratio[2]:.2f}) | {rule} |")
    return rows


def step_rows(model: str, batch: int, rounds: int) -> list[str]:
    mod = overhead.load(model)
    x, y = overhead.first_batch(mod, batch)
    cfgs = {name: fn for name, _, fn in overhead.configs(mod, x, y, POOL, strides=(2,))}
    rows = []
    for stride in (1, 2):
        dendrite = cfgs[f"dendrite P={POOL} split" + (f" stride {stride}" if stride > 1 else "")]

        def with_rule(rule, _dendrite=dendrite):
            def run():
                layers.columns_pay = rule
                _dendrite()
            return run

        try:
            samples = interleaved({"plain": cfgs["plain"], "rule": with_rule(RULE),
                                   "grouped": with_rule(lambda *_: False)}, min_time=2.0, reps=rounds)
        finally:
            layers.columns_pay = RULE
        to_plain = round_ratios(samples, "plain")
        rule_over_grouped = spread(round_ratios(samples, "grouped")["rule"])
        med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
        rows.append(f"| {model} | {batch} | {stride} | {med['plain']:.1f} | {med['rule']:.1f} | {med['grouped']:.1f} | "
                    f"{statistics.median(to_plain['rule']):.2f} | {statistics.median(to_plain['grouped']):.2f} | "
                    f"{rule_over_grouped[0]:.3f} ({rule_over_grouped[1]:.3f}-{rule_over_grouped[2]:.3f}) |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["resnet_small", "resnet18"], choices=list(overhead.MODELS))
    ap.add_argument("--batch", type=int, nargs="*", default=None, help="per model (default: 100, 32 for torchvision's)")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, CPU, 1 thread, pool {POOL} split; the rule: columns where a member's "
          f"positions x {layers.WIDE_COLUMNS} <= the columns' width; "
          f"medians of {args.rounds} interleaved rounds\n")
    print("The candidates' conv, forward + weight gradient (ms):\n")
    print("| batch | channels | map | kernel /stride | positions a member | columns' width | grouped ms | columns ms | "
          "columns / grouped (25-75 %) | rule |")
    print("|---:|---|---|---|---:|---:|---:|---:|---:|---|")
    print("\n".join(layer_rows(args.rounds)), flush=True)
    print("\nThe dendrite-phase step (ms; ratios to the plain step):\n")
    print("| model | batch | candidate stride | plain | rule | all grouped | rule / plain | grouped / plain | "
          "rule / grouped (25-75 %) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, model in enumerate(args.models):
        batch = args.batch[i] if args.batch else (32 if overhead.MODELS[model] is None else 100)
        print("\n".join(step_rows(model, batch, args.rounds)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
