"""How long does perforating a model take, and where does the time go?

    python bench/perforate_time.py [--repeats 5] [--threads 1]

1. perforate() on a small ResNet (models/resnet_small.py when present), median of N runs,
   and the stages separately: deepcopy, trace (with shape propagation), find_sites,
   insert_dendrites, finalize (after one grow()).
2. For every models/*.py model file: its sites found and one perforate() time.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pbp_fx  # noqa: E402
from pbp_fx.modelfile import instantiate, load_model_file  # noqa: E402
from pbp_fx.passes import finalize, find_sites, insert_dendrites  # noqa: E402

MODELS = os.path.join(ROOT, "models")


class _Block(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.short is None else self.short(x)))


class _SmallResNet(nn.Module):
    """Fallback when models/resnet_small.py is absent: same shape of network."""

    def __init__(self, w=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.layers = nn.Sequential(_Block(w, w), _Block(w, 2 * w, 2), _Block(2 * w, 2 * w))
        self.fc = nn.Linear(2 * w, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


def resnet():
    path = os.path.join(MODELS, "resnet_small.py")
    if os.path.exists(path):
        model, inputs = instantiate(load_model_file(path))
        return "models/resnet_small.py", model, inputs
    return "bench _SmallResNet (models/resnet_small.py absent)", _SmallResNet(), (torch.rand(4, 1, 8, 8),)


def timed(fn, setup=None, repeats=5):
    """Median and min seconds of fn(setup()) over `repeats` runs (after one warm-up)."""
    times = []
    for i in range(repeats + 1):
        arg = setup() if setup is not None else None
        t = time.perf_counter()
        fn(arg) if setup is not None else fn()
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def stage_table(model, inputs, repeats):
    rows = []
    rows.append(("perforate()", *timed(lambda: pbp_fx.perforate(model, inputs), repeats=repeats)))
    rows.append(("  deepcopy", *timed(lambda: copy.deepcopy(model), repeats=repeats)))
    rows.append(("  trace (+shapes)", *timed(lambda m: pbp_fx.trace(m, inputs),
                                             setup=lambda: copy.deepcopy(model), repeats=repeats)))
    gm = pbp_fx.trace(copy.deepcopy(model), inputs)
    rows.append(("  find_sites", *timed(lambda: find_sites(gm), repeats=repeats)))

    def fresh():
        g = pbp_fx.trace(copy.deepcopy(model), inputs)
        return g, find_sites(g)

    rows.append(("  insert_dendrites", *timed(lambda a: insert_dendrites(*a), setup=fresh, repeats=repeats)))
    pm = pbp_fx.perforate(model, inputs)
    pm.grow()
    pm.eval()
    rows.append(("finalize() (K=1)", *timed(lambda: finalize(pm.graph_module), repeats=repeats)))
    return rows, len(pm.sites)


def model_files():
    if not os.path.isdir(MODELS):
        return []
    return sorted(f for f in os.listdir(MODELS) if f.endswith(".py") and not f.startswith("_"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"pbp-fx {pbp_fx.__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
          f"{torch.get_num_threads()} thread(s), {platform.machine()}")

    name, model, inputs = resnet()
    rows, n_sites = stage_table(model, inputs, args.repeats)
    params = sum(p.numel() for p in model.parameters())
    print(f"\n{name}: {n_sites} sites, {params:,} parameters, input {tuple(inputs[0].shape)}; "
          f"median / min of {args.repeats} runs")
    w = max(len(r[0]) for r in rows)
    print(f"{'stage':<{w}}  {'median ms':>9}  {'min ms':>8}")
    print(f"{'-' * w}  {'-' * 9}  {'-' * 8}")
    for stage, med, low in rows:
        print(f"{stage:<{w}}  {1e3 * med:9.2f}  {1e3 * low:8.2f}")

    files = model_files()
    if files:
        print("\nsites per model file (one perforate() each)")
        table = []
        for f in files:
            try:
                m, x = instantiate(load_model_file(os.path.join(MODELS, f)))
                t = time.perf_counter()
                pm = pbp_fx.perforate(m, x)
                dt = time.perf_counter() - t
                kinds = sorted({s.kind for s in pm.sites.values()})
                leaves = pm.graph_module.meta.get("pbp_untraceable", [])
                table.append((f, str(len(pm.sites)), f"{1e3 * dt:.1f}", ",".join(kinds),
                              ",".join(leaves) or "-"))
            except Exception as exc:  # noqa: BLE001 - one broken model file does not stop the bench
                table.append((f, "error", "-", f"{type(exc).__name__}: {str(exc).splitlines()[0][:60]}", "-"))
        head = ("model file", "sites", "ms", "kinds", "leaves")
        widths = [max(len(r[i]) for r in table + [head]) for i in range(5)]
        print("  ".join(h.ljust(wd) for h, wd in zip(head, widths)).rstrip())
        print("  ".join("-" * wd for wd in widths))
        for r in table:
            print("  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
