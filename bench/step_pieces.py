"""Where a dendrite-phase step's time goes: each pbp_fx piece timed inside real training steps.

For each model (bench/train_overhead.py's), batch 100, the split pool of 4 at stride 1, on the CPU: the step as
train_overhead times it, and, with a timer around each piece below, its calls per step, microseconds a call and a
step (time.perf_counter; the timers add about a microsecond a call). Pieces nest: a call's time includes the
pieces it calls (EagerNormTap.backward includes native.candidate_norm_backward).

    python bench/step_pieces.py [--models mnist1d_cnn resnet_small] [--steps 100]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import time

import torch

import train_overhead as overhead
from pbp_fx import covariance_tap, layers, native, perforated

# (owner, attribute, what it is); autograd.Function methods are staticmethods.
PIECES = [
    (perforated, "put_back", "the held BatchNorm buffers put back after a forward"),
    (layers.LayerCopies, "layer_output", "the candidates' layer forward (grouped conv, or columns and a bmm)"),
    (native, "columns_1d", "  a 1-D conv pool's input columns"),
    (covariance_tap.EagerNormTap, "forward", "candidates' norm + sigmoid + tap, forward"),
    (native, "norm_sigmoid_forward", "  native norm + sigmoid forward"),
    (covariance_tap, "_tap_forward", "  the tap's output: the site output or its copy"),
    (covariance_tap.EagerNormTap, "backward", "candidates' tap + norm backward"),
    (native, "candidate_norm_backward", "  native one-call tap + norm backward"),
    (covariance_tap, "_tap_backward", "a tap's backward without the one call (Linear sites)"),
    (native, "candidate_gradient", "  native covariance tap backward"),
    (native, "norm_sigmoid_backward", "  native norm + sigmoid backward"),
]


@contextlib.contextmanager
def timed_pieces(seconds: dict):
    """Each piece wrapped so that its calls append their seconds to seconds[name]."""
    saved = []
    for owner, name, _ in PIECES:
        raw = owner.__dict__[name]
        fn = raw.__func__ if isinstance(raw, staticmethod) else raw
        key = f"{getattr(owner, '__name__', owner)}.{name}"

        def timed(*args, _fn=fn, _key=key, **kwargs):
            t = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                seconds[_key].append(time.perf_counter() - t)

        setattr(owner, name, staticmethod(timed) if isinstance(raw, staticmethod) else timed)
        saved.append((owner, name, raw))
    try:
        yield
    finally:
        for owner, name, raw in saved:
            setattr(owner, name, raw)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["mnist1d_cnn", "resnet_small"],
                    choices=[m for m, path in overhead.MODELS.items() if path is not None])
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, CPU, 1 thread, batch 100, pool 4 split, stride 1; {args.steps} steps after 20")
    for model in args.models:
        mod = overhead.load(model)
        x, y = overhead.first_batch(mod, 100)
        step = {name: fn for name, _, fn in overhead.configs(mod, x, y, 4, strides=())}["dendrite P=4 split"]
        for _ in range(20):
            step()
        seconds: dict = collections.defaultdict(list)
        with timed_pieces(seconds):
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            total = (time.perf_counter() - t) / args.steps
        print(f"\n{model}: dendrite-phase step {total * 1e3:.2f} ms (with the timers)\n")
        print("| piece | what | calls/step | us/call | us/step | % of the step |")
        print("|---|---|---:|---:|---:|---:|")
        for owner, name, what in PIECES:
            values = seconds.get(f"{getattr(owner, '__name__', owner)}.{name}", [])
            if values:
                per_step, per_call = sum(values) / args.steps, sum(values) / len(values)
                print(f"| {owner.__name__.rsplit('.', 1)[-1]}.{name} | {what.strip()} | {len(values) / args.steps:.1f} "
                      f"| {per_call * 1e6:.1f} | {per_step * 1e6:.1f} | {100 * per_step / total:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
