"""torch.compile on a perforated model: compiled/eager training-step ratio, recompiles per
restructure, graph breaks, measured side by side in one run.

For each model the same PerforatedModel goes through neuron phase (K = 0) -> dendrite phase
(pool P) -> install -> neuron phase (K = 1). One `torch.compile(pm)` object serves all three
phases, as in a training run; an eager twin (a deep copy, the same structure at every phase)
is timed in interleaved rounds against it (median per side). One step = forward,
cross-entropy, backward, Adam step (eager) on what the phase trains. Recompiles are counted by
a counting backend (graphs handed to inductor) separately for a phase's first steps (the
restructure) and for its timed steps (should be 0). Graph breaks come from
torch._dynamo.explain on the train-mode forward of each phase.

Target (issue 11): no graph break inside a Site, one recompile per restructure, compiled
neuron-phase step not slower than eager (ratio <= 1.0).

    python bench/compile.py [--models mnist1d_cnn resnet18] [--phases neuron0 dendrite neuron1]
                            [--threads 1] [--rounds 15] [--out bench/results/compile.md]
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import platform
import statistics
import sys
import time

import torch

import pbp_fx
from train_overhead import adam_stepper, first_batch  # one batch and one Adam step for every bench

# model -> (module, build kwargs, batch size): small widths so inductor compiles on a CPU in minutes.
MODELS = {"mnist1d_cnn": ("pbp_fx.models.mnist1d_cnn", {"width": 32}, 100),
          "resnet18": ("pbp_fx.models.resnet18", {"width": 16}, 32)}


class CountingBackend:
    """inductor, counting the graphs dynamo hands it (each is one (re)compilation of a frame or piece)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        return compile_fx(gm, example_inputs)


def _explain(pm, x) -> dict:
    torch._dynamo.reset()
    out = torch._dynamo.explain(pm)(x)
    reasons = []
    for r in out.break_reasons:
        frame = r.user_stack[-1] if r.user_stack else None
        where = f" at {os.path.basename(frame.filename)}:{frame.lineno}" if frame is not None else ""
        reasons.append(f"{r.reason.splitlines()[0][:120]}{where}")
    return {"graphs": out.graph_count, "breaks": out.graph_break_count, "reasons": reasons}


def _time_pair(eager_step, compiled_step, rounds: int) -> tuple[float, float]:
    te, tc = [], []
    for _ in range(rounds):
        for fn, acc in ((eager_step, te), (compiled_step, tc)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return statistics.median(te), statistics.median(tc)


PHASES = ("plain", "neuron0", "dendrite", "neuron1")


def _plain_row(name: str, model, x, y, rounds: int) -> dict:
    """The unperforated model, compiled vs eager: the baseline for what inductor does on its own."""
    twin = copy.deepcopy(model)
    backend = CountingBackend()
    compiled_step = adam_stepper(torch.compile(model, backend=backend), list(model.parameters()), x, y)
    eager_step = adam_stepper(twin, list(twin.parameters()), x, y)
    t0 = time.perf_counter()
    for _ in range(3):
        compiled_step()
    compile_s = time.perf_counter() - t0
    first = backend.graphs
    te, tc = _time_pair(eager_step, compiled_step, rounds)
    row = {"model": name, "phase": "plain (not perforated)", "eager_ms": te * 1e3, "compiled_ms": tc * 1e3,
           "ratio": tc / te, "graphs_at_restructure": first, "graphs_in_timed_steps": backend.graphs - first,
           "compile_s": compile_s}
    print(f"{name:12s} {row['phase']:18s} eager {te * 1e3:8.2f} ms  compiled {tc * 1e3:8.2f} ms  "
          f"ratio {row['ratio']:.2f}", flush=True)
    return row


def bench_model(name: str, rounds: int, pool: int, phases=PHASES) -> list[dict]:
    mod_name, kw, batch = MODELS[name]
    mod = importlib.import_module(mod_name)
    x, y = first_batch(mod, batch)
    torch.manual_seed(0)
    model = mod.build_model(**kw)
    torch._dynamo.reset()
    plain = [_plain_row(name, copy.deepcopy(model), x, y, rounds)] if "plain" in phases else []
    pm = pbp_fx.perforate(model, mod.example_inputs())
    backend = CountingBackend()
    torch._dynamo.reset()
    compiled = torch.compile(pm, backend=backend)
    rows, snapshots = [], []
    steps = [("neuron0", "neuron, K=0"), ("dendrite", "dendrite, pool %d" % pool), ("neuron1", "neuron, K=1")]
    for phase, label in steps:
        if phase == "dendrite" and phase in phases:
            pm.start_dendrite_phase(pool=pool)
        elif phase == "neuron1" and pm.phase == "dendrite":
            pm.install_candidates()
        elif phase == "neuron1":
            pm.grow()  # the same structure as an install (without timing a dendrite phase)
        if phase not in phases:
            continue
        twin = copy.deepcopy(pm)  # the eager twin: the same structure and weights
        snapshots.append(copy.deepcopy(pm))  # for explain, after timing (explain resets dynamo's caches)
        eager_step = adam_stepper(twin, list(twin.trainable_parameters()), x, y)
        compiled_step = adam_stepper(compiled, list(pm.trainable_parameters()), x, y)
        before = backend.graphs
        t0 = time.perf_counter()
        for _ in range(3):  # compile (forward and backward), then two warm steps
            compiled_step()
        compile_s = time.perf_counter() - t0
        first = backend.graphs - before
        for _ in range(2):
            eager_step()
        before = backend.graphs
        te, tc = _time_pair(eager_step, compiled_step, rounds)
        rows.append({"model": name, "phase": label, "eager_ms": te * 1e3, "compiled_ms": tc * 1e3,
                     "ratio": tc / te, "graphs_at_restructure": first, "graphs_in_timed_steps": backend.graphs - before,
                     "compile_s": compile_s})
        r = rows[-1]
        print(f"{name:12s} {label:18s} eager {r['eager_ms']:8.2f} ms  compiled {r['compiled_ms']:8.2f} ms  "
              f"ratio {r['ratio']:.2f}  graphs {first}+{r['graphs_in_timed_steps']}  compile {compile_s:.0f} s",
              flush=True)
    for r, snapshot in zip(rows, snapshots):
        explain = _explain(snapshot.train(), x)
        r.update({f"explain_{k}": v for k, v in explain.items()})
        print(f"{name:12s} {r['phase']:18s} graph breaks {explain['breaks']}", flush=True)
    for r in plain:
        r.update(explain_graphs=1, explain_breaks=0, explain_reasons=[])  # not perforated: not a target
    return plain + rows


def write_markdown(rows: list[dict], path: str, args, seconds: float) -> None:
    lines = [
        "# torch.compile: compiled / eager training step",
        "",
        f"`python bench/compile.py --models {' '.join(args.models)} --phases {' '.join(args.phases)} "
        f"--threads {args.threads} --rounds {args.rounds}`; "
        f"torch {torch.__version__}, inductor on CPU ({platform.processor() or platform.machine()}), "
        f"{args.threads} thread(s), {os.cpu_count()} cores, load average at start {args.load:.1f}; "
        f"total {seconds / 60:.1f} min.",
        "One step = forward + cross-entropy + backward + eager Adam step; eager and compiled twins of the same",
        "perforated model timed in interleaved rounds (median). One compiled object serves all phases.",
        "\"graphs\": graphs dynamo handed to inductor at the phase's first steps (the restructure) + during its",
        "timed steps (0 = no recompiles after the restructure). \"breaks\": torch._dynamo.explain graph breaks",
        "of the train-mode forward.",
        *([] if "dendrite" in args.phases else
          ["K=1 without a timed dendrite phase: reached by pm.grow() (the structure an install gives)."]),
        "",
        "| model | phase | eager ms | compiled ms | compiled / eager | graphs at restructure + later | graph breaks | compile s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['phase']} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | "
                     f"**{r['ratio']:.2f}x** | {r['graphs_at_restructure']} + {r['graphs_in_timed_steps']} | "
                     f"{r['explain_breaks']} | {r['compile_s']:.0f} |")
    reasons = sorted({(r["model"], r["phase"], reason) for r in rows for reason in r["explain_reasons"]})
    lines += ["", "Graph-break reasons (torch._dynamo.explain):", ""]
    lines += [f"- {m}, {p}: {reason}" for m, p, reason in reasons] or ["- none"]
    neuron = [r for r in rows if r["phase"].startswith("neuron")]
    met = all(r["ratio"] <= 1.0 for r in neuron)
    ratios = ", ".join("%s %s: %.2fx" % (r["model"], r["phase"], r["ratio"]) for r in neuron)
    lines += ["", f"Target compiled neuron-phase step <= eager: **{'met' if met else 'not met'}** ({ratios})."]
    for p in (r for r in rows if r["phase"].startswith("plain")):
        same = [r for r in rows if r["model"] == p["model"]]
        lines += [f"{p['model']}: the plain model alone compiles to {p['ratio']:.2f}x its eager step (what inductor "
                  f"does without PB); " + ", ".join(f"{r['phase']} {r['compiled_ms'] / p['eager_ms']:.2f}x / "
                                                    f"{r['eager_ms'] / p['eager_ms']:.2f}x"
                                                    for r in same if r is not p)
                  + " of the plain eager step (compiled / eager)."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--pool", type=int, default=4)
    ap.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES,
                    help="neuron1 without dendrite: reached by pm.grow() (same structure as an install)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compile.md"))
    args = ap.parse_args(argv)
    args.load = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = [r for name in args.models for r in bench_model(name, args.rounds, args.pool, args.phases)]
    write_markdown(rows, args.out, args, time.perf_counter() - t0)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
