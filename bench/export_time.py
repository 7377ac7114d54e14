"""Export time of a small MLP and CNN: direct ONNX emission vs the dynamo exporter, side by side.

Each measurement is a fresh process (imports count, as they do for `pbp-fx export`), runs
interleaved: the pbp-fx export path as the CLI takes it (perforate, one dendrite per site,
export_onnx fused, onnx.checker inside, an ONNX Runtime parity check). The dynamo rows force
the exporter by making the direct path decline. Also a cProfile breakdown of one dynamo export.

    python bench/export_time.py [--rounds 3]    # writes bench/results/export_time.md
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
import pbp_fx
from pbp_fx.exporters import export_onnx
import pbp_fx.exporters.direct as direct
from torch import nn
t_import = time.perf_counter() - t0
torch.set_num_threads(1)
torch.manual_seed(0)
name, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
if name == "mlp":
    model, x = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), torch.randn(4, 40)
else:
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    x = torch.randn(4, 1, 28, 28)
if mode == "dynamo":
    def decline(*a, **k):
        raise direct.Unsupported("forced by the benchmark")
    direct.emit = decline
t = time.perf_counter()
pm = pbp_fx.perforate(model, (x,))
pm.grow()
pm.eval()
t_perforate = time.perf_counter() - t
t = time.perf_counter()
export_onnx(pm, (x,), out)
t_export = time.perf_counter() - t
t = time.perf_counter()
import onnxruntime as ort
s = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
got = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
with torch.no_grad():
    diff = float((torch.from_numpy(got) - pm(x)).abs().max())
t_check = time.perf_counter() - t
print(json.dumps(dict(imports=t_import, perforate=t_perforate, export=t_export, check=t_check, diff=diff,
                      total=time.perf_counter() - t0)))
"""


def run(name: str, mode: str, out: str) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, name, mode, out], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if res.returncode:
        raise SystemExit(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def profile_dynamo(out: str) -> list[tuple[str, float]]:
    """Where one dynamo export of the MLP spends its time (cumulative seconds, cProfile)."""
    code = CHILD.replace("t = time.perf_counter()\nexport_onnx(pm, (x,), out)",
                         "import cProfile, pstats\npr = cProfile.Profile()\npr.enable()\nt = time.perf_counter()\n"
                         "export_onnx(pm, (x,), out)\npr.disable()\npr.dump_stats(out + '.prof')")
    subprocess.run([sys.executable, "-c", code, "mlp", "dynamo", out], capture_output=True, text=True, check=True)
    import pstats

    stats = pstats.Stats(out + ".prof").stats
    wanted = {
        "torch.onnx.export (all)": ("torch/onnx/__init__.py", "export"),
        "importing torch._dynamo / torch.export": ("torch/_dynamo/__init__.py", "<module>"),
        "onnxscript torchlib registry (parse ~500 functions)": ("exporter/_registration.py", "from_torchlib"),
        "torch.export capture of the finalized graph": ("torch/export/__init__.py", "export"),
        "decompositions (run_decompositions)": ("torch/export/exported_program.py", "run_decompositions"),
        "onnxscript optimizer": ("onnxscript/optimizer/__init__.py", "optimize"),
    }
    rows = []
    for label, (file_end, func) in wanted.items():
        total = max((v[3] for (f, _, fn), v in stats.items() if f.endswith(file_end) and fn == func), default=0.0)
        rows.append((label, total))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "export_time.md"))
    args = ap.parse_args()
    tmp = os.path.join(os.path.dirname(args.out), "_export_time.onnx")
    results: dict = {}
    for _ in range(args.rounds):
        for name in ("mlp", "cnn"):
            for mode in ("direct", "dynamo"):  # interleaved: load affects both alike
                results.setdefault((name, mode), []).append(run(name, mode, tmp))
    lines = ["# Export time: direct ONNX emission vs the dynamo exporter", "",
             f"Fresh process per run, {args.rounds} interleaved rounds, medians in seconds; "
             f"{os.cpu_count()} CPUs, torch threads 1. Machine shared and loaded while measured.", "",
             "| model | path | imports | perforate | export_onnx | ORT check | total | max diff |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (name, mode), runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        lines.append(f"| {name} | {mode} | {med['imports']:.2f} | {med['perforate']:.2f} | {med['export']:.2f} | "
                     f"{med['check']:.2f} | {med['total']:.2f} | {med['diff']:.1e} |")
    for name in ("mlp", "cnn"):
        d = statistics.median(r["export"] for r in results[(name, "direct")])
        y = statistics.median(r["export"] for r in results[(name, "dynamo")])
        lines.append(f"\n{name}: export_onnx dynamo / direct = {y / d:.1f}x")
    lines += ["", "## Where one dynamo export of the MLP goes (cProfile, cumulative s, one run)", "",
              "| part | s |", "|---|---:|"]
    lines += [f"| {label} | {t:.2f} |" for label, t in profile_dynamo(tmp)]
    for f in (tmp, tmp + ".prof"):
        if os.path.exists(f):
            os.remove(f)
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
