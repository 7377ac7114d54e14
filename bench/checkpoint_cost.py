"""Cost of pbp_fx.save / pbp_fx.load on ResNet-18 (models/resnet18.py, W = 64, 11.7M parameters).

    python bench/checkpoint_cost.py [--repeats 5] [--out bench/results/checkpoint_cost.md]

What is saved is what `pbp-fx train` saves after every epoch: the perforated model with one
dendrite per site, the controller (best-validation weights, schedule, history) and the Adam
state. Timed side by side, interleaved: torch.save / torch.load of the same tensors
(model + best + Adam moments) as the reference, pbp_fx.save, pbp_fx.load without example
inputs (re-capture from the recorded signature) and pbp_fx.load onto an existing
PerforatedModel (no capture). Median seconds over the repeats; the machine is shared, so the
ratios matter more than the absolute times.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setup():
    import pbp_fx
    from pbp_fx.models import resnet18

    torch.manual_seed(0)
    pm = pbp_fx.perforate(resnet18.build_model(), resnet18.example_inputs())
    pm.grow()
    ctl = pbp_fx.PhaseController(pm, optimizer_factory=lambda p: torch.optim.Adam(p, lr=1e-3))
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    pm.train()
    loss = F.cross_entropy(pm(x), y)
    ctl.optimizer.zero_grad()
    loss.backward()
    ctl.optimizer.step()  # Adam moments exist
    ctl.step(0.5)  # best-validation weights exist
    return pm, ctl, resnet18


def main(argv=None) -> int:
    import pbp_fx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join("bench", "results", "checkpoint_cost.md"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    pm, ctl, resnet18 = _setup()
    params = sum(p.numel() for p in pm.parameters())
    times = {k: [] for k in ("torch.save", "pbp_fx.save", "torch.load", "pbp_fx.load (no inputs)",
                             "pbp_fx.load (onto a PerforatedModel)")}
    with tempfile.TemporaryDirectory() as tmp:
        ref_path, path = os.path.join(tmp, "ref.pt"), os.path.join(tmp, "c.safetensors")
        reference = {"model": pm.state_dict(), "best": ctl.best_state, "optim": ctl.optimizer.state_dict()}
        target = pbp_fx.perforate(resnet18.build_model(), resnet18.example_inputs())
        for _ in range(a.repeats):  # interleaved: load on the machine hits every variant alike
            t = time.perf_counter()
            torch.save(reference, ref_path)
            times["torch.save"].append(time.perf_counter() - t)
            t = time.perf_counter()
            pbp_fx.save(pm, path, controller=ctl, optimizer=ctl.optimizer)
            times["pbp_fx.save"].append(time.perf_counter() - t)
            t = time.perf_counter()
            torch.load(ref_path, weights_only=True)
            times["torch.load"].append(time.perf_counter() - t)
            t = time.perf_counter()
            loaded = pbp_fx.load(path, resnet18.build_model)
            times["pbp_fx.load (no inputs)"].append(time.perf_counter() - t)
            t = time.perf_counter()
            pbp_fx.load(path, target)
            times["pbp_fx.load (onto a PerforatedModel)"].append(time.perf_counter() - t)
        size, ref_size = os.path.getsize(path), os.path.getsize(ref_path)
    same = all(torch.equal(v, loaded.state_dict()[k]) for k, v in pm.state_dict().items())
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        "# Checkpoint cost on ResNet-18 (bench/checkpoint_cost.py)",
        "",
        f"Model: models/resnet18.py W=64, perforated, 1 dendrite per site: {params:,} parameters "
        f"({len(pm.sites)} sites). Saved: model + controller best weights + Adam state (what `pbp-fx train` "
        f"writes each epoch). torch {torch.__version__}, {platform.machine()}, 1 thread, median of {a.repeats}, "
        "interleaved; shared, loaded machine (2 cores, other jobs running).",
        "",
        "| operation | median s | vs torch.save/load |",
        "|---|---:|---:|",
    ]
    for k, v in med.items():
        ref = med["torch.save"] if "save" in k else med["torch.load"]
        lines.append(f"| {k} | {v:.3f} | {v / ref:.2f}x |")
    lines += ["", f"File size: pbp_fx checkpoint {size / 2**20:.1f} MiB; torch.save of the same tensors "
              f"{ref_size / 2**20:.1f} MiB ({size / ref_size:.3f}x).",
              f"Loaded model equal to the saved one, bit for bit: {same}.", ""]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
