"""Training-step overhead of PB, as ratios to the plain model's step, measured side by side.

For each model: the plain model; the frozen base (the plain model with every parameter frozen
but one, so that backward still runs to the first layer: the base network's own share of a
dendrite-phase step, whose floor it is); the neuron phase with K = 1..3 dendrites per site; the
dendrite phase with a candidate pool (K = 0), split (each member on its own 1/P of the
batch, the default), split with candidate stride 2 (PBConfig.candidate_stride: every 2nd
position of each spatial dim) and full-batch (every member on every sample). One step = forward,
loss, backward, Adam step on what that phase trains. Configurations are timed in
interleaved rounds, so machine noise hits them alike; a step ratio is the median over the rounds
of (the configuration's step / the plain step of the same round), printed with the 25-75 %
range of those per-round ratios. "ok" is "yes" when even the 75th percentile meets the target,
"NO" when even the 25th misses it, else "edge" (which side the median falls on is noise). FLOPs (forward + backward)
come from FlopCounterMode. On the CPU, the split pools also run with pbp_fx.native off (", torch ops": the
covariance tap's backward and the candidates' norm and sigmoid as torch ops, which its kernels replace), for the
before/after side by side. A second
table splits each step into forward, backward and optimizer
step (medians of their own interleaved rounds). Peak memory of one step: the rise of the resident set over its
level before the step (/proc VmHWM after clearing it; a child process with malloc returning
large blocks to the OS, so the resident set follows live tensors).

Targets: dendrite-phase step (split, either stride) <= 1.5x plain (pool 4);
neuron-phase step <= 1.2x plain x (perforated FLOPs / plain FLOPs). The layer-kernel ratio
(conv, matmul and norm kernels only, from torch.profiler) is the floor the step ratio would reach
if all other work were free. The profiler does not see pbp_fx.native's calls: in the rows with them, the
candidates' norm is not in that floor, while in the ", torch ops" rows it is (torch's batch norm).

    python bench/train_overhead.py [--models mnist1d_cnn resnet_small] [--threads 1] [--pool 4]
    python bench/train_overhead.py --models resnet18 --batch 32 --rounds 3 --steps 1   # torchvision
    python bench/train_overhead.py --optimizer fused   # Adam as pbp-fx's own trainer builds it
    python bench/train_overhead.py --device cuda       # on the GPU (timed after a synchronize)

Models: the reference models (their own data), or torchvision's resnet18 / mobilenet_v2 with
random weights on random 64x64 images, 10 classes (needs torchvision: the zoo environment).
--optimizer: "adam" (default; torch.optim.Adam with torch's defaults: a per-tensor loop on the
CPU) or "fused" (pbp_fx.default_optimizer, what `pbp-fx train` uses), for every configuration.
--device cuda: every model and batch on the GPU (perforated on the CPU, moved before its phase
starts); each timed block ends with torch.cuda.synchronize(), the layer-kernel ratio counts the
layers' GPU kernel time, and the step peak is the rise of torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

import pbp_fx
from paired import round_ratios, spread, verdict
from pbp_fx import native

MODELS = {"mnist1d_cnn": "pbp_fx.models.mnist1d_cnn", "mnist1d_mlp": "pbp_fx.models.mnist1d_mlp",
          "resnet_small": "pbp_fx.models.resnet_small", "resnet18": None, "mobilenet_v2": None}
ZOO_IMAGE = 64


class TorchvisionModel:
    """A torchvision classifier with random weights, 10 classes (nothing downloaded)."""

    def __init__(self, name: str):
        self.name = name

    def build_model(self):
        try:
            import torchvision
        except ImportError as exc:
            raise SystemExit(f"{self.name}: torchvision does not import ({exc}): run with an environment that has "
                             "it (.venv-zoo/bin/python)") from exc

        return getattr(torchvision.models, self.name)(weights=None, num_classes=10)


def load(name: str):
    """The model's module (build_model) for a MODELS name."""
    return TorchvisionModel(name) if MODELS[name] is None else importlib.import_module(MODELS[name])


def first_batch(mod, batch: int):
    if isinstance(mod, TorchvisionModel):
        g = torch.Generator().manual_seed(0)
        return torch.randn(batch, 3, ZOO_IMAGE, ZOO_IMAGE, generator=g), torch.randint(0, 10, (batch,), generator=g)
    train, _, _ = mod.datasets(seed=0, num_samples=max(500, 2 * batch))
    x = torch.stack([train[i][0] for i in range(batch)])
    y = torch.stack([train[i][1] for i in range(batch)])
    return x, y


OPTIMIZERS = {"adam": lambda params: torch.optim.Adam(params, lr=1e-3),
              "fused": lambda params: pbp_fx.default_optimizer(params, lr=1e-3)}


# Configurations whose candidates run as torch ops (pbp_fx.native off): what the native kernels replace,
# timed beside them.
TORCH_OPS = ", torch ops"


@contextlib.contextmanager
def native_off(off: bool = True):
    """pbp_fx.native's kernels off inside (the candidates run as torch ops)."""
    kernel = native.kernel
    if off:
        native.kernel = lambda: None
    try:
        yield
    finally:
        native.kernel = kernel


def adam_stepper(model, params, x, y, optimizer: str = "adam", parts: list | None = None, torch_ops: bool = False):
    """One training step; with `parts`, each step appends its (forward, backward, optimizer) seconds;
    torch_ops: with pbp_fx.native off."""
    opt = OPTIMIZERS[optimizer](params)

    def step():
        with native_off(torch_ops):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def timed_step():
        with native_off(torch_ops):
            synchronize()
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            synchronize()
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            synchronize()
            t2 = time.perf_counter()
            opt.step()
            synchronize()
        parts.append((t1 - t0, t2 - t1, time.perf_counter() - t2))

    return step if parts is None else timed_step


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, groups, output_mask, out_shape, **_) -> int:
    """torch's convolution_backward count, with a grouped conv's weight gradient divided by its
    groups: torch.utils.flop_counter counts that part as an ungrouped conv (groups times too
    many), which made the split candidate pool look P times as costly as it is."""
    def t(shape):
        return [shape[1], shape[0], *shape[2:]]

    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:
        if transposed:
            flops += conv_flop_count(t(grad_out_shape), t(x_shape), t(out_shape[1])) // groups
        else:
            flops += conv_flop_count(t(x_shape), t(grad_out_shape), t(out_shape[1])) // groups
    return flops


def _flops(model, x, y) -> int:
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops}) as fc:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def frozen_base(base):
    """A copy of `base` with every parameter frozen but one (the first bias, else the first
    parameter): its step is the base network's share of a dendrite-phase step."""
    model = copy.deepcopy(base)
    named = list(model.named_parameters())
    keep = next((p for n, p in named if n.endswith("bias")), named[0][1])
    for _, p in named:
        p.requires_grad_(p is keep)
    return model, [keep]


def configs(mod, x, y, pool: int, optimizer: str = "adam", strides: tuple = (2,)):
    """(name, model, step function) for every configuration of one model, on x's device; `strides`:
    the split pool's candidate position strides besides 1 (PBConfig.candidate_stride)."""
    torch.manual_seed(0)
    base = mod.build_model()
    base.train()
    example = (x[:2].cpu(),)
    frozen, kept = frozen_base(base)
    base.to(x.device)
    frozen.to(x.device)
    out = [("plain", base, adam_stepper(base, list(base.parameters()), x, y, optimizer)),
           ("frozen base", frozen, adam_stepper(frozen, kept, x, y, optimizer))]
    for k in (1, 2, 3):
        pm = pbp_fx.perforate(copy.deepcopy(base).cpu(), example).to(x.device)
        for _ in range(k):
            pm.grow()
        with torch.no_grad():
            for s in pm.sites.values():
                s.out_weight.normal_(0, 0.1)
        pm.train()
        out.append((f"neuron K={k}", pm, adam_stepper(pm, list(pm.trainable_parameters()), x, y, optimizer)))
    runs = [(True, 1, False)] + [(True, n, False) for n in strides] + [(False, 1, False)]
    if x.device.type == "cpu" and native.kernel() is not None:  # (where the kernel runs: the split pools on the CPU)
        runs += [(True, 1, True)] + [(True, n, True) for n in strides]
    for split, stride, torch_ops in runs:
        pm = pbp_fx.perforate(copy.deepcopy(base).cpu(), example).to(x.device)
        pm.train()
        pm.start_dendrite_phase(pool=pool, split=split, stride=stride)
        name = (f"dendrite P={pool} " + ("split" if split else "full-batch") + (f" stride {stride}" if stride > 1 else "")
                + (TORCH_OPS if torch_ops else ""))
        out.append((name, pm, adam_stepper(pm, list(pm.trainable_parameters()), x, y, optimizer, torch_ops=torch_ops)))
    return out


def synchronize() -> None:
    """Wait for the GPU's queued work (nothing to wait for on the CPU)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure(cfgs, rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds per step of each configuration, one value per interleaved round."""
    for _, _, step in cfgs:  # warm-up (the optimizer's state exists after the first step)
        for _ in range(5 if steps >= 5 else 2):
            step()
    times: dict[str, list] = {name: [] for name, _, _ in cfgs}
    for _ in range(rounds):
        for name, _, step in cfgs:
            synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            synchronize()
            times[name].append((time.perf_counter() - t0) / steps)
    return times


def part_times(cfgs, x, y, optimizer: str, rounds: int, steps: int) -> dict[str, tuple[float, float, float]]:
    """Median (forward, backward, optimizer) seconds of each configuration's step, interleaved rounds;
    each configuration's model with a fresh optimizer over what its step trains."""
    parts: dict[str, list] = {}
    timed = []
    for name, model, _ in cfgs:
        trained = model.trainable_parameters() if hasattr(model, "trainable_parameters") else (
            p for p in model.parameters() if p.requires_grad)
        parts[name] = []
        timed.append((name, model, adam_stepper(model, list(trained), x, y, optimizer, parts[name],
                                                torch_ops=name.endswith(TORCH_OPS))))
    measure(timed, rounds, steps)
    for v in parts.values():
        del v[:5 if steps >= 5 else 2]  # measure's warm-up steps
    return {n: tuple(statistics.median(t[i] for t in v) for i in range(3)) for n, v in parts.items()}


# The layers' own kernels: convolutions, matmuls and norms, forward and backward.
KERNEL_MARKERS = ("convolution", "batch_norm", "addmm", "aten::mm", "bmm", "layer_norm")


def kernel_times(cfgs, steps: int, rounds: int, cuda: bool = False) -> dict[str, float]:
    """Seconds per step spent in the layers' kernels (KERNEL_MARKERS, self time, torch.profiler),
    median of interleaved rounds like `measure`.

    Their ratio to the plain step's is the floor a configuration's step ratio could reach if
    everything else (elementwise ops, statistics, dispatch, Python) cost nothing. On the GPU
    (cuda=True): the GPU kernel time those ops launch.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    times: dict[str, list] = {name: [] for name, _, _ in cfgs}
    for _ in range(rounds):
        for name, _, step in cfgs:
            with _stderr_silenced(), profile(activities=activities) as prof:
                for _ in range(steps):
                    step()
                synchronize()
            # On the GPU: the kernel time each CPU op launched (the kernels' own events, whose names may match
            # a marker too, would count it twice).
            total = sum((e.self_device_time_total if cuda else e.self_cpu_time_total) for e in prof.key_averages()
                        if any(m in e.key for m in KERNEL_MARKERS)
                        and (not cuda or e.device_type == torch.autograd.DeviceType.CPU))
            times[name].append(total / 1e6 / steps)
    return {k: statistics.median(v) for k, v in times.items()}


@contextlib.contextmanager
def _stderr_silenced():
    """The profiler's C++ side prints two lines per session to fd 2 (torch 2.13's kineto: USDT
    profiler_start / profiler_stop), one pair per configuration and round: hidden from the tables."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def step_peaks(model: str, batch: int, pool: int, optimizer: str) -> dict[str, float]:
    """In this process: MiB the resident set rises during one step of each configuration."""
    mod = load(model)
    x, y = first_batch(mod, batch)
    out = {}
    for name, _, step in configs(mod, x, y, pool, optimizer):
        step()
        step()  # optimizer state exists now
        peaks = []
        for _ in range(3):
            gc.collect()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            before = _status_kb("VmRSS")
            step()
            peaks.append(_status_kb("VmHWM") - before)
        out[name] = statistics.median(peaks) / 1024
    return out


def memory(model: str, batch: int, pool: int, threads: int, optimizer: str) -> dict[str, float]:
    """step_peaks in a child whose malloc returns blocks of >= 64 KiB to the OS at free."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-of", model, "--batch", str(batch),
           "--pool", str(pool), "--threads", str(threads), "--optimizer", optimizer]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def cuda_step_peaks(cfgs) -> dict[str, float]:
    """MiB that torch's CUDA allocator's peak rises over its level before one step, each configuration."""
    out = {}
    for name, _, step in cfgs:
        step()  # optimizer state exists now
        synchronize()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        synchronize()
        out[name] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mnist1d_cnn", "resnet_small"], choices=list(MODELS))
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--pool", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adam")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--memory-of", choices=list(MODELS), help=argparse.SUPPRESS)  # child of memory()
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.memory_of:
        print(json.dumps(step_peaks(a.memory_of, a.batch, a.pool, a.optimizer)))
        return 0
    if a.batch < 2 * a.pool:  # (CandidatePool.splits: fewer than two samples a member, every member sees them all)
        raise SystemExit(f"--batch {a.batch} --pool {a.pool}: the split rows would run the full-batch pool (a split "
                         f"pool deals at least 2 samples to each member): give --batch {2 * a.pool} or more")
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch sees no CUDA device; use --device cpu")
    where = f"CUDA ({torch.cuda.get_device_name()})" if cuda else f"CPU, {a.threads} thread(s)"
    print(f"torch {torch.__version__}, {where}, batch {a.batch}, optimizer {a.optimizer}, median of "
          f"{a.rounds} interleaved rounds of {a.steps} steps")
    for name in a.models:
        mod = load(name)
        x, y = (t.to(a.device) for t in first_batch(mod, a.batch))
        cfgs = configs(mod, x, y, a.pool, a.optimizer)
        samples = measure(cfgs, a.rounds, a.steps)
        t = {n: statistics.median(v) for n, v in samples.items()}
        ratios = round_ratios(samples, "plain")
        kern = kernel_times(cfgs, a.steps, max(3, a.rounds // 3), cuda)
        split_ms = part_times(cfgs, x, y, a.optimizer, max(3, a.rounds // 3), a.steps)
        flops = {n: _flops(m, x, y) for n, m, _ in cfgs}
        mem = cuda_step_peaks(cfgs) if cuda else memory(name, a.batch, a.pool, a.threads, a.optimizer)
        p_ms, p_fl = t["plain"], flops["plain"]
        print(f"\n{name}")
        print("| config | ms/step | step ratio | rounds 25-75 % | FLOP ratio | layer-kernel ratio | target | ok "
              "| step peak MiB |" + (" (CUDA allocator)" if cuda else ""))
        print("|---|---:|---:|---:|---:|---:|---:|:---:|---:|")
        for n, _, _ in cfgs:
            ratio, lo, hi = spread(ratios[n])
            fr = flops[n] / p_fl
            if n.startswith("neuron"):
                target = 1.2 * fr
            elif " split" in n and not n.endswith(TORCH_OPS):
                target = 1.5
            else:
                target = None
            ok = "" if target is None else verdict(lo, ratio, hi, target)
            tgt = "" if target is None else f"{target:.2f}"
            kr = f"{kern[n] / kern['plain']:.2f}" if kern["plain"] > 0 else "-"
            print(f"| {n} | {t[n] * 1e3:.3f} | {ratio:.2f} | {lo:.2f}-{hi:.2f} | {fr:.2f} | {kr} | {tgt} | {ok} "
                  f"| {mem[n]:.1f} |")
        print("\nWhere the step goes: median ms of its forward (with the loss), backward and optimizer step, "
              "and each as a multiple of the plain step's same part")
        print("| config | forward ms | backward ms | optimizer ms | forward x | backward x | optimizer x |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        base = split_ms["plain"]
        for n, _, _ in cfgs:
            ms = split_ms[n]
            print(f"| {n} | " + " | ".join(f"{v * 1e3:.3f}" for v in ms) + " | "
                  + " | ".join(f"{v / b:.2f}" for v, b in zip(ms, base)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
