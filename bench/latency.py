"""Inference latency of perforated models: ONNX Runtime fused vs unfused vs PyTorch eager.

    python bench/latency.py                       # every reference model, K = 0..3
    python bench/latency.py --models digits_mlp --ks 0 2 --batches 1 --quick

For each reference model (models/*.py, or small built-in ones when none exist) and each K
(dendrites per site, random U and V), at batch 1 and 256, with 1 thread and with all
threads, it times

    fused     ORT, export_onnx(fused=True)    (one pbp::Perforated* node per site)
    unfused   ORT, export_onnx(fused=False)   (standard ops)
    eager     PyTorch eager, the PerforatedModel in eval mode under torch.no_grad
    plain     ORT, the unperforated model

interleaved (one call of each in turn, so load changes hit all of them alike), and
prints the medians and ratios as markdown tables, checked against the targets:

    fused / unfused    <= 1.05 at batch 256, <= 1.00 at batch 1
    fused / eager      <= 0.5 at batch 1 (ORT at least 2x faster than eager)
    perforated / plain latency <= 1.1 x the MAC ratio (Linear/Conv multiply-adds)

A second table compares the narrow perforated model with the plain model at 4x width.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import pbp_fx  # noqa: E402
from pbp_fx.exporters import export_onnx, ort_session  # noqa: E402
from pbp_fx.site import FusedSite  # noqa: E402

REFERENCE = ["mnist1d_mlp", "mnist1d_cnn", "digits_mlp", "resnet_small", "tiny_transformer"]


# -- models -----------------------------------------------------------------------------------

class _TinyMLP(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(40, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, 10))

    def forward(self, x):
        return self.net(x)


class _TinyCNN(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.c2, self.b2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)) + x)
        return self.fc(x.mean((2, 3)))


class _Builtin:
    def __init__(self, cls, width, shape):
        self.cls, self.width, self.shape = cls, width, shape

    def build_model(self, width: Optional[int] = None):
        return self.cls(width or self.width)

    def example_inputs(self):
        return (torch.randn(4, *self.shape, generator=torch.Generator().manual_seed(0)),)


BUILTIN = {"builtin_mlp": _Builtin(_TinyMLP, 32, (40,)), "builtin_cnn": _Builtin(_TinyCNN, 16, (1, 8, 8))}


def load_models(names: Optional[list[str]]) -> dict:
    found = {}
    for name in names or REFERENCE:
        if name in BUILTIN:
            found[name] = BUILTIN[name]
            continue
        if not (ROOT / "models" / f"{name}.py").exists():
            continue
        found[name] = importlib.import_module(f"pbp_fx.models.{name}")
    if not found:
        print("no reference models under models/: using the built-in ones", file=sys.stderr)
        found = dict(BUILTIN)
    return found


def default_width(mod) -> Optional[int]:
    import inspect

    p = inspect.signature(mod.build_model).parameters.get("width")
    return None if p is None or p.default is inspect.Parameter.empty else int(p.default)


def perforated(model: nn.Module, example: tuple, k: int, seed: int = 0):
    torch.manual_seed(seed)
    pm = pbp_fx.perforate(model, example)
    for _ in range(k):
        pm.grow()
    with torch.no_grad():
        for s in pm.sites.values():
            if s.num_dendrites:
                s.out_weight.normal_(0.0, 0.5)
                s.cascade.normal_(0.0, 0.5)
    return pm.eval()


# -- cost model -----------------------------------------------------------------------------

def macs(model: nn.Module, inputs: tuple) -> int:
    """Multiply-adds of every Linear/Conv (a FusedSite counts its 1 + K stacked copies)."""
    total = [0]

    def hook(m, args, out):
        w = m.weight
        channels = out.shape[-1] if isinstance(m, nn.Linear) or (
            isinstance(m, FusedSite) and m.layer.kind == "linear") else out.shape[1]
        total[0] += w.numel() * (out.numel() // channels)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, FusedSite))]
    with torch.no_grad():
        model(*inputs)
    for h in handles:
        h.remove()
    return total[0]


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- timing ---------------------------------------------------------------------------------

@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def interleaved(fns: dict[str, Callable[[], object]], min_time: float, reps: int) -> dict[str, float]:
    """Median seconds per call of each fn, timed in turn (blocks of n calls, n calibrated)."""
    inner = {}
    for name, fn in fns.items():
        for _ in range(3):  # warm-up
            fn()
        n, elapsed = 1, 0.0
        while True:
            t = time.perf_counter()
            for _ in range(n):
                fn()
            elapsed = time.perf_counter() - t
            if elapsed >= min_time / reps or n >= 4096:
                break
            n *= 2
        inner[name] = n
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            n = inner[name]
            t = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t) / n)
    return {name: statistics.median(v) for name, v in samples.items()}


def ort_fn(path: Path, threads: int, x: np.ndarray):
    sess = ort_session(path, device="cpu", threads=threads)
    feed = {sess.get_inputs()[0].name: x}
    return lambda: sess.run(None, feed)


def eager_fn(model: nn.Module, x: torch.Tensor):
    """PyTorch eager call (the caller sets torch's thread count around the timing)."""
    def call():
        with torch.no_grad():
            model(x)
    return call


# -- main -----------------------------------------------------------------------------------

def flag(ok: bool) -> str:
    return "" if ok else " ✗"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", help=f"names (default: {' '.join(REFERENCE)}; or builtin_mlp builtin_cnn)")
    ap.add_argument("--ks", nargs="*", type=int, default=[0, 1, 2, 3])
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 256])
    ap.add_argument("--threads", nargs="*", type=int, default=None, help="default: 1 and all cores")
    ap.add_argument("--min-time", type=float, default=0.4, help="seconds of timing per candidate and cell")
    ap.add_argument("--reps", type=int, default=15, help="interleaved timing blocks per cell")
    ap.add_argument("--quick", action="store_true", help="short timings (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.min_time, args.reps = 0.05, 5
    cores = os.cpu_count() or 1
    thread_counts = args.threads or sorted({1, cores})
    models = load_models(args.models)
    torch.set_grad_enabled(False)

    rows, wide_rows = [], []
    with tempfile.TemporaryDirectory(prefix="pbp_latency_") as tmp:
        tmp = Path(tmp)
        for name, mod in models.items():
            torch.manual_seed(0)
            plain = mod.build_model().eval()
            example = tuple(mod.example_inputs())
            plain_path = Path(export_onnx(plain, example, tmp / f"{name}_plain.onnx"))
            plain_macs, plain_params = macs(plain, example), params(plain)
            width = default_width(mod)
            wide_path = wide = None
            if width:
                torch.manual_seed(0)
                wide = mod.build_model(width=4 * width).eval()
                wide_path = Path(export_onnx(wide, example, tmp / f"{name}_wide.onnx"))
                wide_macs, wide_params = macs(wide, example), params(wide)
            for k in args.ks:
                pm = perforated(copy.deepcopy(plain), example, k)
                fused = Path(export_onnx(pm, example, tmp / f"{name}_k{k}_fused.onnx"))
                unfused = Path(export_onnx(pm, example, tmp / f"{name}_k{k}_unfused.onnx", fused=False))
                final = pm.finalize()
                final_macs = macs(final, example)
                mac_ratio = final_macs / plain_macs
                param_count = params(final)
                for batch in args.batches:
                    xt = tuple(torch.rand(batch, *t.shape[1:], generator=torch.Generator().manual_seed(batch))
                               .to(t.dtype) for t in example)
                    x = xt[0].numpy()
                    for threads in thread_counts:
                        fns = {"fused": ort_fn(fused, threads, x), "unfused": ort_fn(unfused, threads, x),
                               "eager": eager_fn(pm, xt[0]), "plain": ort_fn(plain_path, threads, x)}
                        if wide_path is not None:
                            fns["wide"] = ort_fn(wide_path, threads, x)
                        with torch_threads(threads):
                            t = interleaved(fns, args.min_time, args.reps)
                        rows.append(dict(model=name, k=k, batch=batch, threads=threads, macs=mac_ratio,
                                         params=param_count / plain_params, **t))
                        if wide_path is not None:
                            wide_rows.append(dict(model=name, k=k, batch=batch, threads=threads, narrow=t["fused"],
                                                  wide=t["wide"], params=param_count / wide_params,
                                                  macs=final_macs / wide_macs))
                        print(f"# {name} K={k} batch={batch} threads={threads}: "
                              + ", ".join(f"{n} {v * 1e3:.3f} ms" for n, v in t.items()), file=sys.stderr)

    print(f"\n## ORT fused vs unfused vs PyTorch eager (median ms; {cores} cores; ✗ = target missed)\n")
    print("| model | K | batch | threads | fused ms | unfused ms | eager ms | plain ms "
          "| fused/unfused | fused/eager | perf/plain | MAC ratio | param ratio | (perf/plain)/MACs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    misses = []
    for r in rows:
        fu = r["fused"] / r["unfused"]
        fe = r["fused"] / r["eager"]
        pp = r["fused"] / r["plain"]
        lim_fu = 1.0 if r["batch"] == 1 else 1.05
        ok_fu = fu <= lim_fu or r["k"] == 0  # K = 0: both files hold the same graph (no fused op)
        ok_fe = fe <= 0.5 or r["batch"] != 1
        ok_pp = pp <= 1.1 * r["macs"]
        for ok, what in ((ok_fu, "fused/unfused"), (ok_fe, "fused/eager"), (ok_pp, "perf/plain vs MACs")):
            if not ok:
                misses.append(f"{r['model']} K={r['k']} batch={r['batch']} threads={r['threads']}: {what}")
        print(f"| {r['model']} | {r['k']} | {r['batch']} | {r['threads']} | {r['fused'] * 1e3:.3f} "
              f"| {r['unfused'] * 1e3:.3f} | {r['eager'] * 1e3:.3f} | {r['plain'] * 1e3:.3f} "
              f"| {fu:.2f}{flag(ok_fu) if r['k'] else ' (same graph)'} | {fe:.2f}{flag(ok_fe)} | {pp:.2f}{flag(ok_pp)} | {r['macs']:.2f} "
              f"| {r['params']:.2f} | {pp / r['macs']:.2f} |")
    if wide_rows:
        print("\n## Narrow perforated (ORT fused) vs plain model at 4x width (ORT)\n")
        print("| model | K | batch | threads | narrow ms | 4x wide ms | narrow/wide | params narrow/wide "
              "| MACs narrow/wide |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in wide_rows:
            print(f"| {r['model']} | {r['k']} | {r['batch']} | {r['threads']} | {r['narrow'] * 1e3:.3f} "
                  f"| {r['wide'] * 1e3:.3f} | {r['narrow'] / r['wide']:.2f} | {r['params']:.2f} | {r['macs']:.2f} |")
    print(f"\ntargets missed: {len(misses)} of {3 * len(rows) - sum(r['k'] == 0 for r in rows)} checks (fused/unfused is not checked at K = 0)")
    for m in misses:
        print(f"- {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
