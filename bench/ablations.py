"""Ablations: what explains PB's gain over plain, and what helps it (MNIST-1D MLP W=32).

Groups (each prints a markdown table; runs are cached as JSON lines, so re-running a group
only trains what is missing and `--report` re-prints tables without training):

  controls  plain W=32 with patience 10 / 30, plain W=32 with optimizer restarts (the PB
            schedule without dendrites), pb and gd at the same settings, plain W=64.
  sites     dendrites only at the output layer (fc3), only at the hidden layers, at all;
            each against a plain model widened to the same parameter count.
  regime    MNIST-1D with 20000 samples (12800 train): a capacity-limited narrow MLP.
  round     one dendrite round from a shared early-stopped checkpoint, paired per seed:
            the candidate settings (init, pool, candidate lr, phase length, v_init, lr after
            install, sites) against an optimizer restart without dendrites.

    python bench/ablations.py --groups controls sites --seeds 3 --jobs 2
    python bench/ablations.py --groups round --seeds 5 --report   # tables from the cache only
    python bench/ablations.py --groups round --task mnist1d_cnn --variants "pb default" \
        "candidate stride 2 (every 2nd position)"                 # the round test on the CNN
    python bench/ablations.py --groups round --task resnet_small --width 8 --variants ...   # and on a 2-D conv net

The numbers in bench/results/ablations.md: controls and sites at --seeds 5, regime at
--seeds 3, round at --seeds 5 (about 35 min on 2 shared cores).

Protocol as bench/accuracy.py: one fixed data split (data seed 0), model seeds 0..S-1,
Adam 1e-3, batch 100, early stopping on validation, test accuracy at the best-validation
epoch, max_dendrites 2, pool 4, patience 10, candidate lr 0.02 unless a row says otherwise.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch
import torch.nn.functional as F

from pbp_fx import PBConfig, TrainConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy import TASKS as ACCURACY_TASKS, _params, train_plain, width_for_params as width_for  # noqa: E402

# The round test also runs on the small ResNet (sklearn digits as 8x8 images): a 2-D conv net.
TASKS = {**ACCURACY_TASKS, "resnet_small": ("pbp_fx.models.resnet_small", 8)}

# PBConfig's and TrainConfig's defaults, but where the ablations' shorter runs set their own (patience,
# max_epochs, max_dendrites, max_dendrite_epochs).
_PB, _TRAIN = PBConfig(), TrainConfig()
DEFAULTS = dict(task="mnist1d_mlp", width=32, num_samples=None, lr=_TRAIN.lr, batch_size=_TRAIN.batch_size, patience=10,
                max_epochs=400, max_dendrites=2, pool=_PB.pool, dendrite_patience=_PB.dendrite_patience,
                max_dendrite_epochs=30, candidate_lr=_PB.candidate_lr, candidate_init=_PB.candidate_init,
                v_init=_PB.v_init, lr_after=None, include=None, retries=_PB.retries, pool_split=_PB.pool_split,
                candidate_stride=_PB.candidate_stride)
CACHE = os.path.join("/tmp", "pbp_ablations_runs.jsonl")
BASE_DIR = os.path.join("/tmp", "pbp_ablations_base")


# ----------------------------------------------------------------------------- helpers
def _cfg(spec: dict) -> dict:
    cfg = dict(DEFAULTS)
    cfg.update({k: v for k, v in spec.items() if k not in ("label",)})
    return cfg


def job_key(spec: dict) -> str:
    """Identity of a run: its full config (defaults filled in), label excluded."""
    return json.dumps(_cfg(spec), sort_keys=True)


def _module(cfg):
    return importlib.import_module(TASKS[cfg["task"]][0])


def _loaders(cfg, seed):
    from pbp_fx.job import make_loaders

    mod = _module(cfg)
    data = mod.datasets(seed=0) if cfg["num_samples"] is None else mod.datasets(seed=0, num_samples=cfg["num_samples"])
    return make_loaders(data, cfg["batch_size"], seed)  # one split for every run


def _ce_sum(output, target):
    return float(F.cross_entropy(output, target, reduction="sum")), target.numel()


def _train_stats(model, loader) -> dict:
    from pbp_fx.training import evaluate

    return {"train_acc": evaluate(model, loader), "train_ce": evaluate(model, loader, _ce_sum)}


def train_restarts(model, loaders, cfg) -> dict:
    """The PB schedule without dendrites: at each early stop, reload the best weights and
    restart Adam (up to max_dendrites restarts that set a new best, `retries` failed ones),
    exactly the PhaseController's accept/retry/finish rule with nothing installed."""
    from pbp_fx.training import evaluate, train_epoch

    train, val, test = loaders
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    best, best_state, stale, epochs = -1.0, None, 0, 0
    restarts = restarts_at_best = 0
    round_improved, retries_left = True, cfg["retries"]
    for epochs in range(1, cfg["max_epochs"] + 1):
        train_epoch(model, train, F.cross_entropy, opt, None)
        v = evaluate(model, val)
        if v > best + 1e-3:
            best, stale, round_improved, restarts_at_best = v, 0, True, restarts
            best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
        else:
            stale += 1
        if stale < cfg["patience"]:
            continue
        if not round_improved:
            if retries_left <= 0:
                break
            retries_left -= 1
        else:
            retries_left = cfg["retries"]
        model.load_state_dict(best_state)
        restarts = restarts_at_best
        if restarts >= cfg["max_dendrites"]:
            break
        restarts += 1
        round_improved, stale = False, 0
        opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    model.load_state_dict(best_state)
    return {"val": best, "test": evaluate(model, test), "params": _params(model), "epochs": epochs,
            "restarts": restarts_at_best}


def train_pb(cfg, seed, loaders) -> dict:
    from pbp_fx import PBConfig, perforate
    from pbp_fx.controller import PhaseController
    from pbp_fx.training import evaluate, fit

    mod = _module(cfg)
    torch.manual_seed(seed)
    model = mod.build_model(width=cfg["width"])
    pm = perforate(model, mod.example_inputs(), include=cfg["include"], mode=cfg["kind"])
    lr_after = cfg["lr_after"] or cfg["lr"]
    config = PBConfig(mode=pm.mode, patience=cfg["patience"], max_dendrites=cfg["max_dendrites"],
                      dendrite_patience=cfg["dendrite_patience"], max_dendrite_epochs=cfg["max_dendrite_epochs"],
                      pool=cfg["pool"], candidate_init=cfg["candidate_init"], v_init=cfg["v_init"],
                      retries=cfg["retries"], candidate_lr=cfg["candidate_lr"])
    ctl = PhaseController(pm, config, optimizer_factory=lambda params: torch.optim.Adam(params, lr=cfg["lr"]))

    def lr_after_install(row):  # neuron phases: lr before any dendrite, lr_after once installed
        if pm.phase == "neuron" and pm.dendrites > 0:
            for group in ctl.optimizer.param_groups:
                group["lr"] = lr_after

    h = fit(pm, loaders[0], loaders[1], controller=ctl, epochs=cfg["max_epochs"], progress=False,
            callbacks=[lr_after_install])
    out = {"val": ctl.best_score, "test": evaluate(pm, loaders[2]), "params": pm.num_parameters(),
           "epochs": len(h.epochs), "dendrite_epochs": sum(r["phase"] == "dendrite" for r in h.epochs),
           "dendrites": max(pm.num_dendrites.values()), "per_site": pm.num_dendrites,
           "events": [e["note"] for e in ctl.history if e["decision"] != "continue"]}
    out.update(_train_stats(pm, loaders[0]))
    return out


# --------------------------------------------------------------- one paired dendrite round
def _base_path(cfg, seed) -> str:
    return os.path.join(BASE_DIR, f"{cfg['task']}_W{cfg['width']}_n{cfg['num_samples']}_p{cfg['patience']}_s{seed}.pt")


def base_checkpoint(cfg, seed, loaders):
    """The early-stopped plain model every round variant of this seed starts from."""
    path = _base_path(cfg, seed)
    if os.path.exists(path):
        return torch.load(path)
    torch.manual_seed(seed)
    model = _module(cfg).build_model(width=cfg["width"])
    train_plain(model, loaders, cfg["lr"], cfg["patience"], cfg["max_epochs"])
    os.makedirs(BASE_DIR, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model.state_dict()


def run_round(cfg, seed, loaders) -> dict:
    """One restructure from the shared checkpoint, then a neuron phase to early stop.

    round_mode: "pb" (correlation-trained candidates), "gd" (random dendrites trained by
    backprop), "restart" (no dendrites: only the optimizer restart). Everything after the
    checkpoint uses the same RNG seed, so variants differ only by their setting."""
    from pbp_fx import perforate
    from pbp_fx.training import evaluate, train_epoch

    train, val, test = loaders
    mod = _module(cfg)
    state = base_checkpoint(cfg, seed, loaders)
    model = mod.build_model(width=cfg["width"])
    model.load_state_dict(state)
    rm = cfg["round_mode"]
    pm = perforate(model, mod.example_inputs(), include=cfg["include"], mode="gd" if rm == "gd" else "pb")
    base = {"val": evaluate(pm, val), "test": evaluate(pm, test), **_train_stats(pm, train)}
    torch.manual_seed(10_000 + seed)
    dendrite_epochs = 0
    if rm == "pb":
        pm.start_dendrite_phase(pool=cfg["pool"], init=cfg["candidate_init"], split=cfg["pool_split"],
                                stride=cfg["candidate_stride"])
        opt = torch.optim.Adam(list(pm.trainable_parameters()), lr=cfg["candidate_lr"])
        stale = 0
        while dendrite_epochs < cfg["max_dendrite_epochs"]:
            train_epoch(pm, train, F.cross_entropy, opt, None)
            dendrite_epochs += 1
            # The controller's rule: some site's correlation rose beyond its noise (epoch_progress).
            stale = 0 if pm.candidate_progress(0.01) else stale + 1
            if stale >= cfg["dendrite_patience"]:
                break
        pm.install_candidates(v_init=cfg["v_init"])
    elif rm == "gd":
        pm.grow("random")
    out = train_plain(pm, (train, val, test), cfg["lr_after"] or cfg["lr"], cfg["patience"], cfg["max_epochs"],
                      params=list(pm.trainable_parameters()))
    out.update({"params": pm.num_parameters(),
           "dendrite_epochs": dendrite_epochs, "dendrites": max(pm.num_dendrites.values()),
           "base_val": base["val"], "base_test": base["test"], "base_train_ce": base["train_ce"],
           "base_train_acc": base["train_acc"]})
    out.update(_train_stats(pm, train))
    return out


# ------------------------------------------------------------------------------- one job
def run_job(spec: dict) -> dict:
    torch.set_num_threads(1)
    cfg = _cfg(spec)
    seed = cfg["seed"]
    loaders = _loaders(cfg, seed)
    t0 = time.perf_counter()
    kind = cfg["kind"]
    if kind == "base":
        base_checkpoint(cfg, seed, loaders)
        out = {}
    elif kind == "round":
        out = run_round(cfg, seed, loaders)
    elif kind in ("pb", "gd"):
        out = train_pb(cfg, seed, loaders)
    else:
        torch.manual_seed(seed)
        model = _module(cfg).build_model(width=cfg["width"])
        if kind == "plain":
            out = train_plain(model, loaders, cfg["lr"], cfg["patience"], cfg["max_epochs"])
        elif kind == "restart":
            out = train_restarts(model, loaders, cfg)
        else:
            raise ValueError(kind)
        out.update(_train_stats(model, loaders[0]))
    out.update(key=job_key(spec), seconds=time.perf_counter() - t0, torch=torch.__version__)
    return out


def load_cache(path: str) -> dict:
    rows = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    rows[r["key"]] = r
    return rows


def run_specs(specs: list[dict], cache: dict, path: str, jobs: int, dry: bool) -> None:
    todo, seen = [], set()
    for s in specs:
        k = job_key(s)
        if k not in cache and k not in seen:
            seen.add(k)
            todo.append(s)
    if not todo or dry:
        if todo:
            print(f"[dry] {len(todo)} runs missing", flush=True)
        return
    cost = {"base": 1, "plain": 1, "restart": 2, "round": 3, "gd": 4, "pb": 6}
    todo.sort(key=lambda s: -cost[s["kind"]] * (4 if s.get("num_samples") else 1))
    print(f"running {len(todo)} runs on {jobs} workers", flush=True)
    with ProcessPoolExecutor(jobs) as ex:
        futs = {ex.submit(run_job, s): s for s in todo}
        for fut in as_completed(futs):
            s, r = futs[fut], fut.result()
            cache[r["key"]] = r
            with open(path, "a") as f:
                f.write(json.dumps(r) + "\n")
            if s["kind"] != "base":
                print(f"  {s.get('label', s['kind']):<28} seed {s['seed']}: test {r['test']:.3f} "
                      f"params {r['params']} epochs {r['epochs']} ({r['seconds']:.0f}s)", flush=True)


# ------------------------------------------------------------------------------- tables
def _ms(xs, scale=100.0, fmt="{:.1f} ± {:.1f}"):
    xs = [x * scale for x in xs]
    return fmt.format(statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table_full(rows: list[tuple[str, list[dict]]]) -> str:
    lines = ["| variant | n | test acc % | val acc % | train acc % | params | dendrites | epochs | s/run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, rs in rows:
        if not rs:
            lines.append(f"| {label} | 0 | – | | | | | | |")
            continue
        lines.append(f"| {label} | {len(rs)} | {_ms([r['test'] for r in rs])} | {_ms([r['val'] for r in rs])} | "
                     f"{statistics.mean(r['train_acc'] for r in rs) * 100:.1f} | "
                     f"{statistics.mean(r['params'] for r in rs):.0f} | "
                     f"{statistics.mean(r.get('dendrites', r.get('restarts', 0)) for r in rs):.1f} | "
                     f"{statistics.mean(r['epochs'] for r in rs):.0f} | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    return "\n".join(lines)


def table_round(rows: list[tuple[str, list[dict]]], ref: list[dict]) -> str:
    """Paired by seed against the restart control (`ref`)."""
    by_seed = {json.loads(r["key"])["seed"]: r for r in ref}
    lines = ["| variant | n | test acc % | Δtest vs checkpoint | Δtest vs restart (paired) | train CE | "
             "train CE / restart | params | dendrite ep | neuron ep |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, rs in rows:
        if not rs:
            lines.append(f"| {label} | 0 | – | | | | | | | |")
            continue
        paired = [(r, by_seed.get(json.loads(r["key"])["seed"])) for r in rs]
        paired = [(r, c) for r, c in paired if c is not None]
        d_ref = _ms([r["test"] - c["test"] for r, c in paired], fmt="{:+.1f} ± {:.1f}") if paired else "–"
        ratio = (f"{statistics.mean(r['train_ce'] / c['train_ce'] for r, c in paired):.3f}" if paired else "–")
        lines.append(f"| {label} | {len(rs)} | {_ms([r['test'] for r in rs])} | "
                     f"{_ms([r['test'] - r['base_test'] for r in rs], fmt='{:+.1f} ± {:.1f}')} | {d_ref} | "
                     f"{statistics.mean(r['train_ce'] for r in rs):.3f} | {ratio} | "
                     f"{statistics.mean(r['params'] for r in rs):.0f} | "
                     f"{statistics.mean(r['dendrite_epochs'] for r in rs):.0f} | "
                     f"{statistics.mean(r['epochs'] for r in rs):.0f} |")
    return "\n".join(lines)


def _collect(cache, specs):
    return [cache[job_key(s)] for s in specs if job_key(s) in cache]


# ------------------------------------------------------------------------------- groups
def _seeds(n):
    return range(n)


def group_controls(S, cache, run):
    variants = [
        ("plain W=32, patience 10", dict(kind="plain")),
        ("plain W=32, patience 30", dict(kind="plain", patience=30)),
        ("plain W=32, 2 restarts (PB schedule, no dendrites)", dict(kind="restart")),
        ("pb W=32", dict(kind="pb")),
        ("gd W=32", dict(kind="gd")),
        ("pb W=32, patience 30 (max 400 epochs)", dict(kind="pb", patience=30)),
        ("gd W=32, patience 30 (max 400 epochs)", dict(kind="gd", patience=30)),
        ("plain W=64, patience 10", dict(kind="plain", width=64)),
        ("plain W=64, patience 30", dict(kind="plain", width=64, patience=30)),
    ]
    specs = {lab: [dict(v, seed=s, label=lab) for s in _seeds(S)] for lab, v in variants}
    run([s for ss in specs.values() for s in ss])
    return table_full([(lab, _collect(cache, ss)) for lab, ss in specs.items()])


def group_sites(S, cache, run):
    variants = [
        ("pb all sites", dict(kind="pb")),
        ("pb fc3 only", dict(kind="pb", include=["fc3"])),
        ("pb fc3 only, max_dendrites 6", dict(kind="pb", include=["fc3"], max_dendrites=6)),
        ("pb fc1+fc2 only", dict(kind="pb", include=["fc1", "fc2"])),
    ]
    specs = {lab: [dict(v, seed=s, label=lab) for s in _seeds(S)] for lab, v in variants}
    run([s for ss in specs.values() for s in ss])
    rows = []
    for lab, ss in specs.items():
        rs = _collect(cache, ss)
        rows.append((lab, rs))
        if rs:  # the parameter-matched plain model for this variant
            w = width_for("mnist1d_mlp", statistics.mean(r["params"] for r in rs))
            pl = f"  plain W={w} (matched)"
            ps = [dict(kind="plain", width=w, seed=s, label=pl) for s in _seeds(S)]
            run(ps)
            rows.append((pl, _collect(cache, ps)))
    return table_full(rows)


def group_regime(S, cache, run, num_samples=20000):
    ns = dict(num_samples=num_samples)
    variants = [
        ("plain W=16", dict(kind="plain", width=16, **ns)),
        ("pb W=16", dict(kind="pb", width=16, **ns)),
        ("plain W=32", dict(kind="plain", width=32, **ns)),
        ("plain W=64", dict(kind="plain", width=64, **ns)),
    ]
    specs = {lab: [dict(v, seed=s, label=lab) for s in _seeds(S)] for lab, v in variants}
    run([s for ss in specs.values() for s in ss])
    rows = [(lab, _collect(cache, ss)) for lab, ss in specs.items()]
    pb = rows[1][1]
    if pb:
        w = width_for("mnist1d_mlp", statistics.mean(r["params"] for r in pb))
        pl = f"plain W={w} (matched to pb W=16)"
        ps = [dict(kind="plain", width=w, seed=s, label=pl, **ns) for s in _seeds(S)]
        run(ps)
        rows.insert(2, (pl, _collect(cache, ps)))
    return f"MNIST-1D, num_samples={num_samples} (train/val/test {int(num_samples * .64)}/" \
           f"{int(num_samples * .16)}/{int(num_samples * .2)}).\n\n" + table_full(rows)


ROUND_VARIANTS = [
    ("restart only (control)", dict(round_mode="restart")),
    ("pb default", dict(round_mode="pb")),
    ("pool 4 full-batch (every member on every sample)", dict(round_mode="pb", pool_split=False)),
    ("candidate stride 2 (every 2nd position)", dict(round_mode="pb", candidate_stride=2)),
    ("gd (random dendrites, backprop)", dict(round_mode="gd")),
    ("init normal", dict(round_mode="pb", candidate_init="normal")),
    ("pool 1", dict(round_mode="pb", pool=1)),
    ("pool 16", dict(round_mode="pb", pool=16)),
    ("candidate lr 0.005", dict(round_mode="pb", candidate_lr=0.005)),
    ("candidate lr 0.05", dict(round_mode="pb", candidate_lr=0.05)),
    ("phase 10 epochs (fixed)", dict(round_mode="pb", max_dendrite_epochs=10, dendrite_patience=10)),
    ("phase 30 epochs (fixed)", dict(round_mode="pb", max_dendrite_epochs=30, dendrite_patience=30)),
    ("pool 4 full-batch, phase 30 epochs (fixed)",
     dict(round_mode="pb", pool_split=False, max_dendrite_epochs=30, dendrite_patience=30)),
    ("phase 60 epochs (fixed)", dict(round_mode="pb", max_dendrite_epochs=60, dendrite_patience=60)),
    ("v_init 0.5", dict(round_mode="pb", v_init=0.5)),
    ("lr after install 3e-4", dict(round_mode="pb", lr_after=3e-4)),
    ("fc3 only", dict(round_mode="pb", include=["fc3"])),
    ("fc1+fc2 only", dict(round_mode="pb", include=["fc1", "fc2"])),
]


def group_round(S, cache, run, only=None, task="mnist1d_mlp", width=32):
    run([dict(kind="base", seed=s, task=task, width=width) for s in _seeds(S)])
    variants = [v for v in ROUND_VARIANTS if only is None or v[0] in only or v[0].startswith("restart")]
    specs = {lab: [dict(v, kind="round", seed=s, label=lab, task=task, width=width) for s in _seeds(S)]
             for lab, v in variants}
    run([s for ss in specs.values() for s in ss])
    ref = _collect(cache, specs[ROUND_VARIANTS[0][0]])
    rows = [(lab, _collect(cache, ss)) for lab, ss in specs.items()]
    return (f"One restructure from the same early-stopped plain {task} W={width} checkpoint per seed "
            "(then Adam 1e-3 to early stop, patience 10). Δ in points; train CE at the best-validation epoch.\n\n"
            + table_round(rows, ref) + paired_against(rows, "pb default"))


def paired_against(rows: list[tuple[str, list[dict]]], label: str) -> str:
    """Per pb variant, its paired per-seed difference from the `label` variant: test accuracy and train CE."""
    ref = dict(rows).get(label)
    if not ref:
        return ""
    by_seed = {json.loads(r["key"])["seed"]: r for r in ref}
    out = [f"\n\nPaired per seed, variant minus {label} (mean, sd, standard error):\n"]
    for lab, rs in rows:
        if lab == label or lab.startswith("restart"):
            continue
        pairs = [(r, by_seed[s]) for r in rs if (s := json.loads(r["key"])["seed"]) in by_seed]
        if len(pairs) < 2:
            continue
        for what, key, scale in (("test acc points", "test", 100.0), ("train CE", "train_ce", 1.0)):
            d = [(r[key] - c[key]) * scale for r, c in pairs]
            sd = statistics.stdev(d)
            out.append(f"- {lab}, {what}: mean {statistics.mean(d):+.3f} sd {sd:.3f} se {sd / len(d) ** 0.5:.3f} "
                       f"(per seed {', '.join(f'{x:+.3f}' for x in d)})")
    return "\n".join(out)


GROUPS = {"controls": group_controls, "sites": group_sites, "regime": group_regime,
          "round": group_round}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", nargs="+", default=["controls", "sites", "regime"], choices=list(GROUPS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cache", default=CACHE, help="JSON-lines file of finished runs (reused, appended)")
    ap.add_argument("--report", action="store_true", help="print tables from the cache; train nothing")
    ap.add_argument("--md", help="also write the tables to this markdown file")
    ap.add_argument("--variants", nargs="+", help="round group: only these variants (labels; the control always runs)")
    ap.add_argument("--task", default="mnist1d_mlp", choices=sorted(TASKS), help="round group: the model and data")
    ap.add_argument("--width", type=int, default=32, help="round group: the model's width")
    a = ap.parse_args(argv)
    cache = load_cache(a.cache)
    run = lambda specs: run_specs(specs, cache, a.cache, a.jobs, a.report)  # noqa: E731
    t0 = time.perf_counter()
    out = []
    for g in a.groups:
        md = group_round(a.seeds, cache, run, a.variants, a.task, a.width) if g == "round" else GROUPS[g](a.seeds, cache, run)
        block = f"## {g}\n\n{md}\n"
        print("\n" + block, flush=True)
        out.append(block)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if a.md:
        with open(a.md, "w") as f:
            f.write("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
