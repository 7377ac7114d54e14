"""How long `pbp-fx export MODEL -o m.onnx --check` takes as a whole process, and where it goes.

Every number is a fresh process (imports count, as they do for a CLI user), rounds interleaved
so that machine load hits every side alike; medians in seconds.

1. Whole processes, side by side: `pbp-fx export MODEL --check` (fused, onnx.checker, ONNX
   Runtime parity) for the MNIST-1D MLP and CNN, `pbp-fx --help` and `pbp-fx transform MODEL`,
   each run from the source tree of `--before REF` (default: the commit before the import
   work) and from the working tree (plus one tree per `--variant NAME=PATCH`: the working tree
   with a patch applied, to measure a proposed change before it is made; one per `--packages
   NAME=DIR`: the working tree with the packages installed in DIR, e.g. `pip install --target DIR
   ml_dtypes==0.6.0`, ahead of the environment's). Each tree is laid out as the installed package
   (pyproject's package-dir) and put first on PYTHONPATH. Beside the wall-clock medians: the
   medians of the process's CPU time (user + system), which other jobs on a shared machine
   inflate far less.
2. Phases of the same export path, per tree: interpreter start, import torch, import pbp_fx,
   the model file, capture (perforate), import onnx, export_onnx (direct writer or dynamo
   exporter, with onnx.checker), import onnxruntime, the ORT session and the parity run.
3. Named import costs (each after `import torch`, fresh process): the modules the phases pull in
   (onnx and ml_dtypes again with each `--packages` folder first on the path).
4. export_onnx alone: the direct writer vs the dynamo exporter (forced), and a cProfile of one
   dynamo export.

    python bench/export_time.py [--rounds 5] [--before REF] [--variant NAME=PATCH] [--packages NAME=DIR]
                                                    # writes bench/results/export_time.md
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = "095da5d"  # the last commit before the CLI's import work (issue 12, item 7)
MODELS = {"mlp": "mnist1d_mlp.py", "cnn": "mnist1d_cnn.py"}
TARGET_S = 2.0  # issue 12, item 7: a small MLP or CNN exports (fused, with checker) in under 2 s

# One export the way `pbp-fx export MODEL --check` does it, timed phase by phase.
PHASES = r"""
import json, logging, sys, time
marks = {}
t = time.perf_counter()
def mark(name):
    global t
    now = time.perf_counter(); marks[name] = now - t; t = now
import torch; mark("import torch")
import pbp_fx, pbp_fx.cli; mark("import pbp_fx")
from pbp_fx.modelfile import instantiate, load_model_file
model, inputs = instantiate(load_model_file(sys.argv[1])); mark("model file")
had_sympy = "sympy" in sys.modules
pm = pbp_fx.perforate(model, inputs); pm.eval(); mark("capture")
sympy_in_capture = "sympy" in sys.modules and not had_sympy
import onnx; mark("import onnx")
from pbp_fx.exporters import export_onnx, ort_session, run
paths = []
class Seen(logging.Handler):
    def emit(self, record):
        paths.append(record.getMessage())
log = logging.getLogger("pbp_fx.exporters.onnx"); log.addHandler(Seen()); log.setLevel(logging.DEBUG)
mark("import exporters")
export_onnx(pm, inputs, sys.argv[2]); mark("export_onnx")
import onnxruntime; mark("import onnxruntime")
session = ort_session(sys.argv[2]); mark("ORT session")
got = run(session, tuple(x.numpy() for x in inputs))[0]
with torch.no_grad():
    diff = float((torch.as_tensor(got) - pm(*inputs)).abs().max())
mark("parity run")
print(json.dumps(dict(marks=marks, diff=diff, sympy=sympy_in_capture, dynamo="torch._dynamo" in sys.modules,
                      path="dynamo" if any("dynamo exporter runs" in p for p in paths) else "direct")))
"""

# export_onnx alone, direct writer vs dynamo exporter (forced by making the direct path decline).
EXPORT_ONLY = r"""
import json, logging, sys, time
import torch
import pbp_fx
from pbp_fx.exporters import export_onnx
import pbp_fx.exporters.direct as direct
paths = []
class Seen(logging.Handler):
    def emit(self, record):
        paths.append(record.getMessage())
log = logging.getLogger("pbp_fx.exporters.onnx"); log.addHandler(Seen()); log.setLevel(logging.DEBUG)
from pbp_fx.modelfile import instantiate, load_model_file
model, inputs = instantiate(load_model_file(sys.argv[1]))
if sys.argv[3] == "dynamo":
    def decline(*a, **k):
        raise direct.Unsupported("forced by the benchmark")
    direct.emit = decline
pm = pbp_fx.perforate(model, inputs)
pm.grow()
pm.eval()
profile = len(sys.argv) > 4
if profile:
    import cProfile
    pr = cProfile.Profile(); pr.enable()
t = time.perf_counter()
export_onnx(pm, inputs, sys.argv[2])
seconds = time.perf_counter() - t
if profile:
    pr.disable(); pr.dump_stats(sys.argv[4])
print(json.dumps(dict(export=seconds, path="dynamo" if any("dynamo exporter runs" in p for p in paths) else "direct")))
"""

# Import costs named one by one, each in a fresh process after `import torch`.
IMPORTS = {
    "torch (from nothing)": ("", "import torch"),
    "ml_dtypes (imported by onnx)": ("import torch", "import ml_dtypes"),
    "onnx (ml_dtypes included)": ("import torch", "import onnx"),
    "onnxruntime": ("import torch, onnx", "import onnxruntime"),
    "sympy (torch.fx.experimental.symbolic_shapes)": ("import torch", "import torch.fx.experimental.symbolic_shapes"),
    "torch._dynamo": ("import torch", "import torch._dynamo"),
    "onnxscript": ("import torch, onnx", "import onnxscript"),
}
IMPORT_CHILD = r"""
import sys, time
exec(sys.argv[1])
t = time.perf_counter()
exec(sys.argv[2])
print(time.perf_counter() - t)
"""


def _package_dirs() -> dict[str, str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        text = f.read()
    try:
        import tomllib
    except ModuleNotFoundError:  # (Python 3.10: the section's `"name" = "folder"` lines)
        section = text.decode().split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
        return dict(re.findall(r'^"([^"]+)"\s*=\s*"([^"]+)"', section, re.M))
    return tomllib.loads(text.decode())["tool"]["setuptools"]["package-dir"]


def build_tree(dest: str, ref: str | None, patch: str | None) -> str:
    """The package as installed, from git `ref` (None: the working tree), with `patch` applied;
    returns the folder to put on PYTHONPATH."""
    mapping = _package_dirs()
    raw = os.path.join(dest, "raw")
    os.makedirs(raw)
    sources = sorted(set(mapping.values()))
    if ref is None:
        for src in sources:
            shutil.copytree(os.path.join(ROOT, src), os.path.join(raw, src),
                            ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "-C", ROOT, "archive", ref, *sources], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", raw], input=archive.stdout, check=True)
    if patch is not None:
        subprocess.run(["git", "apply", os.path.abspath(patch)], cwd=raw, check=True)
    site = os.path.join(dest, "site")
    os.makedirs(site)
    # Parents before children: pbp_fx, then pbp_fx.passes ... (moved into the package folder).
    for package, src in sorted(mapping.items(), key=lambda kv: kv[0].count(".")):
        target = os.path.join(site, *package.split("."))
        if not os.path.isdir(target):
            shutil.move(os.path.join(raw, src), target)
    return site


def _env(site: str) -> dict:
    return dict(os.environ, PYTHONPATH=site)


def check_tree(name: str, site: str, cwd: str) -> None:
    code = "import pbp_fx.passes, pbp_fx.exporters, pbp_fx.cli; print(pbp_fx.passes.__file__, pbp_fx.cli.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_env(site), capture_output=True, text=True,
                         check=True)
    if not all(p.startswith(site) for p in out.stdout.split()):
        raise SystemExit(f"tree {name}: pbp_fx is not imported from {site}: {out.stdout}")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def whole(site: str, argv: list[str], cwd: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `python -m pbp_fx ARGV` process."""
    cpu, t = _children_cpu(), time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pbp_fx", *argv], cwd=cwd, env=_env(site), capture_output=True,
                         text=True)
    seconds, cpu = time.perf_counter() - t, _children_cpu() - cpu
    if res.returncode:
        raise SystemExit(f"pbp-fx {' '.join(argv)} failed:\n{res.stderr[-2000:]}")
    return seconds, cpu


def child(site: str, code: str, args: list[str], cwd: str) -> dict:
    res = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=_env(site), capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def interpreter(cwd: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], cwd=cwd, check=True)
    return time.perf_counter() - t


def profile_dynamo(site: str, model: str, cwd: str) -> list[tuple[str, float]]:
    """Where one dynamo export of `model` spends its time (cumulative seconds, cProfile)."""
    import pstats

    prof = os.path.join(cwd, "dynamo.prof")
    child(site, EXPORT_ONLY, [model, os.path.join(cwd, "p.onnx"), "dynamo", prof], cwd)
    stats = pstats.Stats(prof).stats
    wanted = {
        "torch.onnx.export (all)": ("torch/onnx/__init__.py", "export"),
        "importing torch._dynamo": ("torch/_dynamo/__init__.py", "<module>"),
        "onnxscript torchlib registry (parse ~500 functions)": ("exporter/_registration.py", "from_torchlib"),
        "torch.export capture of the finalized graph": ("torch/export/__init__.py", "export"),
        "decompositions (run_decompositions)": ("torch/export/exported_program.py", "run_decompositions"),
    }
    return [(label, max((v[3] for (f, _, fn), v in stats.items() if f.endswith(end) and fn == func), default=0.0))
            for label, (end, func) in wanted.items()]


def med(values) -> float:
    return statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--before", default=BEFORE, help=f"git ref of the 'before' tree (default {BEFORE})")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=PATCH",
                    help="also measure the working tree with PATCH applied (git apply), as column NAME")
    ap.add_argument("--packages", action="append", default=[], metavar="NAME=DIR",
                    help="also measure the working tree with the packages installed in DIR (pip install --target "
                         "DIR ...) ahead of the environment's, as column NAME")
    ap.add_argument("--no-dynamo", action="store_true", help="skip section 4 (export_onnx alone, dynamo forced)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "export_time.md"))
    args = ap.parse_args()
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", *sorted(set(_package_dirs().values()))],
                           capture_output=True, text=True, check=True).stdout.strip()
    load_start = os.getloadavg()
    work = tempfile.mkdtemp(prefix="export_time.")
    try:
        trees = {f"before ({args.before})": build_tree(os.path.join(work, "before"), args.before, None),
                 f"after ({head}{'+changes' if dirty else ''})": build_tree(os.path.join(work, "after"), None, None)}
        for spec in args.variant:
            name, _, patch = spec.partition("=")
            trees[f"after + {name}"] = build_tree(os.path.join(work, f"v{len(trees)}"), None, patch)
        packages = dict(spec.partition("=")[::2] for spec in args.packages)
        for name, folder in packages.items():
            if not os.path.isdir(folder):
                raise SystemExit(f"--packages {name}={folder}: not a folder (pip install --target {folder} ...)")
            site = build_tree(os.path.join(work, f"v{len(trees)}"), None, None)
            shutil.copytree(folder, site, dirs_exist_ok=True)
            trees[f"after + {name}"] = site
        for name, site in trees.items():
            subprocess.run([sys.executable, "-m", "compileall", "-q", site], check=True)  # as an install has
            check_tree(name, site, work)
        models = {key: {name: os.path.join(site, "pbp_fx", "models", file) for name, site in trees.items()}
                  for key, file in MODELS.items()}
        onnx_out = os.path.join(work, "m.onnx")
        commands = {
            "export mlp --check": lambda tree: ["export", models["mlp"][tree], "-o", onnx_out, "--check"],
            "export cnn --check": lambda tree: ["export", models["cnn"][tree], "-o", onnx_out, "--check"],
            "--help": lambda tree: ["--help"],
            "transform mlp": lambda tree: ["transform", models["mlp"][tree]],
        }
        whole_s: dict = {}
        phases: dict = {}
        floor: dict = {"python -c pass": []}
        import_runs = [(label, setup, stmt, None) for label, (setup, stmt) in IMPORTS.items()]
        import_runs += [(f"{label} with {name}", setup, stmt, folder) for name, folder in packages.items()
                        for label, (setup, stmt) in IMPORTS.items() if "onnx" in label and "ml_dtypes" in label]
        imports: dict = {label: [] for label, *_ in import_runs}
        setups = {label: setup for label, setup, *_ in import_runs}
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds} (load {os.getloadavg()[0]:.2f})", flush=True)
            floor["python -c pass"].append(interpreter(work))
            for label, setup, stmt, folder in import_runs:
                env = None if folder is None else dict(os.environ, PYTHONPATH=os.path.abspath(folder))
                res = subprocess.run([sys.executable, "-c", IMPORT_CHILD, setup, stmt], cwd=work, env=env,
                                     capture_output=True, text=True, check=True)
                imports[label].append(float(res.stdout.strip()))
            for command, argv in commands.items():
                for tree, site in trees.items():
                    whole_s.setdefault((command, tree), []).append(whole(site, argv(tree), work))
            for key in MODELS:
                for tree, site in trees.items():
                    phases.setdefault((key, tree), []).append(child(site, PHASES, [models[key][tree], onnx_out], work))
        export_only: dict = {}
        for _ in range(0 if args.no_dynamo else max(2, args.rounds // 2)):
            for key in MODELS:
                for mode in ("direct", "dynamo"):
                    after = list(trees)[1]
                    export_only.setdefault((key, mode), []).append(
                        child(trees[after], EXPORT_ONLY, [models[key][after], onnx_out, mode], work))
        profile = [] if args.no_dynamo else profile_dynamo(trees[list(trees)[1]], models["mlp"][list(trees)[1]], work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_end = os.getloadavg()

    names = list(trees)
    lines = ["# `pbp-fx export --check` as a whole process: before / after", "",
             f"Fresh process per run, {args.rounds} interleaved rounds, medians in seconds; {os.cpu_count()} CPUs. "
             f"Load average (1/5/15 min) {'/'.join(f'{x:.2f}' for x in load_start)} at the start, "
             f"{'/'.join(f'{x:.2f}' for x in load_end)} at the end (the machine is shared: 2 cores, "
             "other jobs running).", "",
             "## 1. Whole processes (`python -m pbp_fx ...`)", "",
             "| command | " + " | ".join(names) + " | " + " | ".join(f"{n.split(' (')[0]} / before" for n in names[1:])
             + " |", "|---|" + "---:|" * (2 * len(names) - 1)]
    for command in commands:
        meds = [med(w for w, _ in whole_s[(command, n)]) for n in names]
        lines.append(f"| {command} | " + " | ".join(f"{m:.2f}" for m in meds) + " | "
                     + " | ".join(f"{m / meds[0]:.2f}x" for m in meds[1:]) + " |")
    lines.append(f"| (floor) python -c pass | {med(floor['python -c pass']):.2f} |" + " |" * (2 * len(names) - 2))
    lines += ["", "CPU time of the same processes (user + system, medians in seconds):", "",
              "| command | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for command in commands:
        lines.append(f"| {command} | " + " | ".join(f"{med(c for _, c in whole_s[(command, n)]):.2f}" for n in names)
                     + " |")
    lines.append("")
    for command in ("export mlp --check", "export cnn --check"):
        verdicts = [f"{n.split(' (')[0]} {'met' if med(w for w, _ in whole_s[(command, n)]) < TARGET_S else 'not met'}"
                    for n in names]
        lines.append(f"- {command}, target < {TARGET_S:g} s: " + "; ".join(verdicts))
    lines += ["", "## 2. Phases of the export path (same steps as `pbp-fx export MODEL --check`)", ""]
    phase_names = list(next(iter(phases.values()))[0]["marks"])
    lines += ["| model | tree | " + " | ".join(phase_names) + " | sum | export path | sympy imported by capture |",
              "|---|---|" + "---:|" * (len(phase_names) + 1) + "---|---|"]
    for (key, tree), runs in phases.items():
        values = [med(r["marks"][p] for r in runs) for p in phase_names]
        lines.append(f"| {key} | {tree} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {sum(values):.2f} | "
                     f"{runs[0]['path']} | {'yes' if runs[0]['sympy'] else 'no'} |")
    lines += ["", "Interpreter start and exit are outside these phases (whole process minus sum).", "",
              "## 3. Import costs, one by one (fresh process each, after the imports named in brackets)", "",
              "| module | s |", "|---|---:|"]
    lines += [f"| {label} [{setups[label] or '-'}] | {med(v):.2f} |" for label, v in imports.items()]
    if export_only:
        lines += ["", f"## 4. export_onnx alone, {list(trees)[1]}: as chosen vs the dynamo exporter forced", "",
                  "One dendrite per site. The first column is what export_onnx chose (the direct writer declines a "
                  "graph it cannot write, and the dynamo exporter runs).", "",
                  "| model | as chosen | path chosen | dynamo forced | dynamo / chosen |", "|---|---:|---|---:|---:|"]
        for key in MODELS:
            d = med(r["export"] for r in export_only[(key, "direct")])
            y = med(r["export"] for r in export_only[(key, "dynamo")])
            lines.append(f"| {key} | {d:.3f} | {export_only[(key, 'direct')][0]['path']} | {y:.2f} | {y / d:.1f}x |")
        lines += ["", "Where one dynamo export of the MLP goes (cProfile, cumulative s, one run):", "",
                  "| part | s |", "|---|---:|"]
        lines += [f"| {label} | {s:.2f} |" for label, s in profile]
    for spec in args.variant:
        name, _, patch = spec.partition("=")
        with open(patch) as f:
            lines += ["", f"## Variant `after + {name}`: the working tree with this patch", "", "```diff",
                      f.read().rstrip("\n"), "```"]
    for name, folder in packages.items():
        held = sorted(d[:-len(".dist-info")] for d in os.listdir(folder) if d.endswith(".dist-info"))
        lines += ["", f"## `after + {name}`: the working tree with {', '.join(held) or folder} ahead of the "
                      "environment's packages"]
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
