"""A split pool's 2-D convs as columns and one bmm against the grouped conv, side by side (layers.FEW_POSITIONS).

Two measurements on the CPU, 1 thread, pool 4:
- layer: the candidates' conv alone, forward and weight gradient (what a split pool runs for it), as the grouped
  conv and as columns + bmm, on shapes from small maps to large; interleaved rounds, medians and the per-round
  ratio columns / grouped. "rule" says which form `layers.runs_as_columns` picks for the shape.
- step: the dendrite-phase training step (forward, loss, backward, Adam) with the rule and with every 2-D conv
  pool grouped (FEW_POSITIONS = 0), beside the plain step, interleaved rounds (bench/train_overhead.py's models;
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
FEW = layers.FEW_POSITIONS  # the rule's threshold (restored after each timing)
# (batch, in channels, out channels, map size, kernel, stride): ResNet-18's stages at 32x32 and 64x64 inputs
# (batch 32), and the small ResNet's (batch 100).
SHAPES = [(32, 512, 512, 1, 3, 1), (32, 512, 512, 2, 3, 1), (32, 256, 512, 4, 3, 2), (32, 256, 256, 2, 3, 1),
          (32, 256, 256, 4, 3, 1), (32, 128, 128, 4, 3, 1), (32, 128, 128, 8, 3, 1), (32, 64, 64, 16, 3, 1),
          (100, 16, 16, 8, 3, 1), (100, 32, 32, 4, 3, 1), (100, 16, 32, 8, 3, 2)]


def layer_rows(rounds: int) -> list[str]:
    rows = []
    for batch, cin, cout, size, k, stride in SHAPES:
        conv = torch.nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        spec = layers.LayerSpec.from_module(conv)
        x = torch.randn(batch, cin, size, size)
        w = (torch.randn(POOL, *spec.weight_shape) * 0.05).requires_grad_()

        def form(few: int):
            def run():
                layers.FEW_POSITIONS = few
                z = layers.split_apply(spec, x, w, None)
                z.backward(torch.ones_like(z))
                w.grad = None
            return run

        try:
            samples = interleaved({"grouped": form(0), "columns": form(1 << 62)}, min_time=1.0, reps=rounds)
        finally:
            layers.FEW_POSITIONS = FEW
        ratio = spread(round_ratios(samples, "grouped")["columns"])
        positions = batch // POOL * ((size - 1) // stride + 1) ** 2
        rule = "columns" if layers.runs_as_columns(spec, x, POOL) else "grouped"
        rows.append(f"| {batch} | {cin} -> {cout} | {size}x{size} | {k}x{k} /{stride} | {positions} | "
                    f"{statistics.median(samples['grouped']) * 1e3:.2f} | {statistics.median(samples['columns']) * 1e3:.2f} "
                    f"| {ratio[0]:.2f} ({ratio[1]:.2f}-{ratio[2]:.2f}) | {rule} |")
    return rows


def step_rows(model: str, batch: int, rounds: int) -> list[str]:
    mod = overhead.load(model)
    x, y = overhead.first_batch(mod, batch)
    cfgs = {name: fn for name, _, fn in overhead.configs(mod, x, y, POOL, strides=())}
    dendrite = cfgs[f"dendrite P={POOL} split"]

    def with_rule(few: int):
        def run():
            layers.FEW_POSITIONS = few
            dendrite()
        return run

    try:
        samples = interleaved({"plain": cfgs["plain"], "rule": with_rule(FEW), "grouped": with_rule(0)},
                              min_time=2.0, reps=rounds)
    finally:
        layers.FEW_POSITIONS = FEW
    to_plain = round_ratios(samples, "plain")
    rule_over_grouped = spread(round_ratios(samples, "grouped")["rule"])
    med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    return [f"| {model} | {batch} | {med['plain']:.1f} | {med['rule']:.1f} | {med['grouped']:.1f} | "
            f"{statistics.median(to_plain['rule']):.2f} | {statistics.median(to_plain['grouped']):.2f} | "
            f"{rule_over_grouped[0]:.3f} ({rule_over_grouped[1]:.3f}-{rule_over_grouped[2]:.3f}) |"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["resnet_small", "resnet18"], choices=list(overhead.MODELS))
    ap.add_argument("--batch", type=int, nargs="*", default=None, help="per model (default: 100, 32 for torchvision's)")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, CPU, 1 thread, pool {POOL} split; FEW_POSITIONS = {FEW}; "
          f"medians of {args.rounds} interleaved rounds\n")
    print("The candidates' conv, forward + weight gradient (ms):\n")
    print("| batch | channels | map | kernel /stride | positions a member | grouped ms | columns ms | "
          "columns / grouped (25-75 %) | rule |")
    print("|---:|---|---|---|---:|---:|---:|---:|---|")
    print("\n".join(layer_rows(args.rounds)), flush=True)
    print("\nThe dendrite-phase step (ms; ratios to the plain step):\n")
    print("| model | batch | plain | rule | all grouped | rule / plain | grouped / plain | rule / grouped (25-75 %) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for i, model in enumerate(args.models):
        batch = args.batch[i] if args.batch else (32 if overhead.MODELS[model] is None else 100)
        print("\n".join(step_rows(model, batch, args.rounds)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
