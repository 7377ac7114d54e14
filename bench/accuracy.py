"""The honest accuracy benchmark (docs/algorithm.md, "What a fair comparison looks like"): PB against plain models, same seeds and stopping.

For each task, on one fixed data split and model seeds 0..S-1:
  plain W      the model at width W
  pb W         + correlation-trained dendrites (PhaseController, mode "pb")
  gd W         + dendrites trained by plain backprop (the open library's mode)
  plain ~pb    a plain model widened until its parameters match pb's mean count
  plain 4W     the 4x wider plain model (the compression target)
All use Adam(lr), batch 100, early stopping on validation with the same patience;
test accuracy is read at the best-validation epoch.

    python bench/accuracy.py                       # all tasks, 5 seeds, 2 worker processes
    python bench/accuracy.py --tasks digits_mlp --seeds 2 --jobs 1
Writes bench/results/accuracy.{md,json,png}.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

TASKS = {  # task -> (model module, narrow width)
    "mnist1d_mlp": ("pbp_fx.models.mnist1d_mlp", 32),
    "mnist1d_cnn": ("pbp_fx.models.mnist1d_cnn", 8),
    "digits_mlp": ("pbp_fx.models.digits_mlp", 8),
}


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def train_plain(model, loaders, lr: float, patience: int, max_epochs: int, params=None) -> dict:
    """Adam (on `params`, default all) + early stopping on validation (pbp_fx.compare's rule);
    test accuracy at the best-validation epoch."""
    from pbp_fx import PBConfig, TrainConfig
    from pbp_fx.compare import train_plain as early_stop
    from pbp_fx.training import evaluate

    out = early_stop(model, loaders, F.cross_entropy, PBConfig(patience=patience),
                     TrainConfig(epochs=max_epochs, lr=lr), params=params)
    return {"val": out["val"], "test": evaluate(model, loaders[2]), "params": _params(model), "epochs": out["epochs"]}


def run_one(task: str, variant: str, width: int, seed: int, cfg: dict) -> dict:
    torch.set_num_threads(1)
    from pbp_fx import PBConfig, perforate
    from pbp_fx.job import make_loaders
    from pbp_fx.training import evaluate, fit

    mod = importlib.import_module(TASKS[task][0])
    loaders = make_loaders(mod.datasets(seed=0), cfg["batch_size"], seed)  # one split for every run
    torch.manual_seed(seed)
    model = mod.build_model(width=width)
    t0 = time.perf_counter()
    if variant.startswith("plain"):
        out = train_plain(model, loaders, cfg["lr"], cfg["patience"], cfg["max_epochs"])
    else:
        mode = variant.split()[0]
        pm = perforate(model, mod.example_inputs(), mode=mode)
        config = PBConfig(mode=mode, patience=cfg["patience"], max_dendrites=cfg["max_dendrites"],
                          dendrite_patience=cfg["dendrite_patience"], max_dendrite_epochs=cfg["max_dendrite_epochs"],
                          pool=cfg["pool"], candidate_lr=cfg["candidate_lr"])
        h = fit(pm, loaders[0], loaders[1], config=config, epochs=cfg["max_epochs"], lr=cfg["lr"], progress=False)
        out = {"val": h.best_val, "test": evaluate(pm, loaders[2]), "params": pm.num_parameters(),
               "epochs": len(h.epochs), "dendrites": max(pm.num_dendrites.values())}
    out.update(task=task, variant=variant, width=width, seed=seed, seconds=time.perf_counter() - t0)
    return out


def width_for_params(task: str, target: float) -> int:
    """The width argument whose plain model is nearest `target` parameters (pbp_fx.width)."""
    from pbp_fx.width import WidthBuilder

    builder = WidthBuilder.from_module(importlib.import_module(TASKS[task][0]))
    return builder.channels(builder.for_params(target).width)


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["task"], r["variant"], r["width"]), []).append(r)
    out = []
    for (task, variant, width), rs in groups.items():
        t = [r["test"] * 100 for r in rs]
        out.append({"task": task, "variant": variant, "width": width, "n": len(rs),
                    "test_mean": statistics.mean(t), "test_sd": statistics.stdev(t) if len(t) > 1 else 0.0,
                    "params": statistics.mean(r["params"] for r in rs),
                    "epochs": statistics.mean(r["epochs"] for r in rs),
                    "seconds": statistics.mean(r["seconds"] for r in rs),
                    "dendrites": statistics.mean(r.get("dendrites", 0) for r in rs)})
    return out


def markdown(summary: list[dict], cfg: dict) -> str:
    lines = [f"Test accuracy at best validation, mean ± sd over {cfg['seeds']} seeds "
             f"(max_dendrites {cfg['max_dendrites']}, pool {cfg['pool']}, patience {cfg['patience']}).", "",
             "| task | variant | width | test acc % | params | dendrites/site | epochs | s/run |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        lines.append(f"| {s['task']} | {s['variant']} | {s['width']} | {s['test_mean']:.1f} ± {s['test_sd']:.1f} | "
                     f"{s['params']:.0f} | {s['dendrites']:.1f} | {s['epochs']:.0f} | {s['seconds']:.0f} |")
    return "\n".join(lines)


def plot(summary: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({s["task"] for s in summary})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for s in (s for s in summary if s["task"] == task):
            ax.errorbar(s["params"], s["test_mean"], yerr=s["test_sd"], fmt="o", capsize=3,
                        label=f"{s['variant']} (W={s['width']})")
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("test accuracy %")
        ax.set_title(task)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from pbp_fx import PBConfig, TrainConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--max-dendrites", type=int, default=2)  # (PBConfig's is 3: this table's runs stop at 2)
    ap.add_argument("--pool", type=int, default=PBConfig.pool)
    ap.add_argument("--patience", type=int, default=PBConfig.patience)
    ap.add_argument("--dendrite-patience", type=int, default=PBConfig.dendrite_patience)
    ap.add_argument("--max-dendrite-epochs", type=int, default=PBConfig.max_dendrite_epochs)
    ap.add_argument("--max-epochs", type=int, default=800)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--candidate-lr", type=float, default=PBConfig.candidate_lr)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = ap.parse_args(argv)
    cfg = {"seeds": a.seeds, "max_dendrites": a.max_dendrites, "pool": a.pool, "patience": a.patience,
           "dendrite_patience": a.dendrite_patience, "max_dendrite_epochs": a.max_dendrite_epochs,
           "max_epochs": a.max_epochs, "lr": a.lr, "candidate_lr": a.candidate_lr, "batch_size": 100}
    rows: list[dict] = []
    t0 = time.perf_counter()
    with ProcessPoolExecutor(a.jobs) as ex:
        first = [(t, v, TASKS[t][1] * (4 if v == "plain 4W" else 1), s)
                 for t in a.tasks for v in ("plain", "pb", "gd", "plain 4W") for s in range(a.seeds)]
        for r in ex.map(run_one, *zip(*first), [cfg] * len(first)):
            rows.append(r)
            print(f"{r['task']:<12} {r['variant']:<9} W={r['width']:<4} seed {r['seed']}: test {r['test']:.4f} "
                  f"params {r['params']} ({r['seconds']:.0f}s)", flush=True)
        # The parameter-matched plain model, sized from pb's mean parameter count.
        matched = []
        for t in a.tasks:
            pb = [r["params"] for r in rows if r["task"] == t and r["variant"] == "pb"]
            w = width_for_params(t, statistics.mean(pb))
            matched += [(t, "plain ~pb", w, s) for s in range(a.seeds)]
        for r in ex.map(run_one, *zip(*matched), [cfg] * len(matched)):
            rows.append(r)
            print(f"{r['task']:<12} {r['variant']:<9} W={r['width']:<4} seed {r['seed']}: test {r['test']:.4f} "
                  f"params {r['params']} ({r['seconds']:.0f}s)", flush=True)
    summary = summarize(rows)
    order = {"plain": 0, "pb": 1, "gd": 2, "plain ~pb": 3, "plain 4W": 4}
    summary.sort(key=lambda s: (s["task"], order[s["variant"]]))
    md = markdown(summary, cfg)
    print()
    print(md)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "accuracy.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(a.out, "accuracy.json"), "w") as f:
        json.dump({"config": cfg, "runs": rows, "summary": summary}, f, indent=1)
    plot(summary, os.path.join(a.out, "accuracy.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
