"""Inference latency of perforated models in ONNX Runtime against their FLOP ratio.

    python bench/latency.py                                  # reference + zoo models, K = 1 2
    python bench/latency.py --models resnet18 mobilenet_v2 --ks 1 --batches 1
    python bench/latency.py --profile --models mobilenet_v2  # + ORT op-type breakdown
    python bench/latency.py --quick --out /tmp/latency.md    # smoke test
    python bench/latency.py --keep runs/before               # keep the ONNX files; later, with other code:
    python bench/latency.py --baseline runs/before           # + those fused files timed side by side
    python bench/latency.py --clip-ceiling --models mobilenet_v2  # + the fused file with Clip(0, max) as Relu
    python bench/latency.py --device cuda                    # ONNX Runtime's CUDA EP (onnxruntime-gpu)

For each model (random weights; the reference models of models/*.py, and, when torchvision
and timm import, ResNet-18, MobileNetV2, EfficientNet-B0 and a small ViT) and each K
(dendrites per site, random U and V), at each batch size, with ONE ONNX Runtime thread, it
times interleaved (one block of each in turn, so load changes hit all of them alike)

    plain     the unperforated model             export_onnx(model)
    fused     the perforated model, fused        export_onnx(pm)               (one pbp node per site)
    unfused   the perforated model, unfused      export_onnx(pm, fused=False)  (standard ops)

(and with --baseline DIR, `baseline`: DIR's `<model>_k<K>_fused.onnx`, written by an
earlier `--keep DIR` run, e.g. of the code before a layout change: a before/after measured
in one interleaved run) and prints the medians, the FLOP ratio (perforated / plain multiply-adds of every matmul and
convolution, counted by torch.utils.flop_counter on the finalized model), the quotient
(fused / plain latency) / FLOP ratio and whether it meets the target quotient <= 1.1.
`--profile` adds ONNX Runtime's per-op-type time (ms per run) for plain and fused; on the CPU each Conv row
says what its nodes do in the optimized graph (fused activation, kernel, grouped, a sum input).
`--clip-ceiling` adds a diagnostic, not a deployable model: the fused file with every Clip(x, 0, max)
(ReLU6) replaced by Relu, which ONNX Runtime's CPU NCHWc layout fuses into the Conv that takes a site's
sum, while Clip it cannot: how fast the fused model would run if the runtime fused its Clips. Since
the exporter writes a bounded ReLU after a site as HardSigmoid (exporters/clip_after_site.py), this
column times only the Clips left (read by something other than a conv or site); with `--baseline` files
written by older code it shows what the fold gained.
`--device cuda` runs every file on ONNX Runtime's CUDA execution provider (onnxruntime-gpu), the input
bound on the GPU once and the outputs left there (IO binding), so a run times the GPU's work and its
launches, not host copies; ONNX Runtime's run waits for the GPU before it returns.
"""
from __future__ import annotations

import argparse
import collections
import copy
import importlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import pbp_fx  # noqa: E402
from pbp_fx.exporters import available_providers, export_onnx, ort_session  # noqa: E402

from paired import interleaved, round_ratios, spread  # noqa: E402  (bench/)

TARGET = 1.1  # fused/plain latency <= TARGET x the FLOP ratio
REFERENCE = ["mnist1d_mlp", "mnist1d_cnn", "resnet_small", "tiny_transformer"]
ZOO = ["resnet18", "mobilenet_v2", "efficientnet_b0", "vit_tiny"]


# -- models -----------------------------------------------------------------------------------

class ZooModel:
    """A torchvision / timm model with random weights on [B, 3, S, S] images (nothing downloaded).

    ZOO names, and any other torchvision classifier builder (e.g. mnasnet1_0, squeezenet1_1) or timm
    model name (e.g. convnext_atto) given as "timm:NAME".
    """

    def __init__(self, name: str, image_size: int):
        self.name, self.image_size = name, image_size

    def build_model(self) -> nn.Module:
        if self.name == "vit_tiny" or self.name.startswith("timm:"):
            import timm

            arch = "vit_tiny_patch16_224" if self.name == "vit_tiny" else self.name[len("timm:"):]
            kwargs = {"img_size": self.image_size} if arch.startswith("vit") else {}
            return timm.create_model(arch, pretrained=False, **kwargs)
        import torchvision

        return getattr(torchvision.models, self.name)(weights=None)

    def example_inputs(self) -> tuple:
        return (torch.randn(2, 3, self.image_size, self.image_size, generator=torch.Generator().manual_seed(0)),)


def zoo_missing(name: str) -> Optional[str]:
    """Why a zoo model cannot be built here (None when it can)."""
    package = "timm" if name == "vit_tiny" or name.startswith("timm:") else "torchvision"
    try:
        module = importlib.import_module(package)
    except Exception as e:  # torchvision's C ops fail to load on the CPU torch wheel: not only ImportError
        return f"{package} does not import ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    known = (module.is_model(name[len("timm:"):]) if name.startswith("timm:")
             else name == "vit_tiny" or callable(getattr(module.models, name, None)))
    if not known:
        raise SystemExit(f"unknown model {name!r}: use one of {' '.join(REFERENCE + ZOO)}, a torchvision "
                         "classifier builder name, or timm:NAME")
    return None


def load_models(names: list[str], image_size: int) -> dict:
    found = {}
    for name in names:
        # A zoo name is the torchvision / timm model (the reference file models/resnet18.py, a 32x32
        # CIFAR-style input, is another model: it shadowed torchvision's ResNet-18 until stop 21).
        if name not in ZOO and (ROOT / "models" / f"{name}.py").exists():
            found[name] = importlib.import_module(f"pbp_fx.models.{name}")
        else:
            why = zoo_missing(name)
            if why:
                print(f"skipping {name}: {why}; run with an environment that has torchvision and timm",
                      file=sys.stderr)
                continue
            found[name] = ZooModel(name, image_size)
    return found


def perforated(model: nn.Module, example: tuple, k: int, seed: int = 1):
    """The perforated model with K random dendrites per site (random U and V: no zero shortcuts).

    `seed` must differ from the one the model was built with (0 in main): the same seed draws
    each site's first dendrite equal to its neuron (same init order), and an exporter or runtime
    that deduplicates equal weights then merges the two layer calls, which flatters the timing.
    """
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


def flops(model: nn.Module, inputs: tuple) -> int:
    """Matmul and convolution FLOPs of one forward (torch.utils.flop_counter), attention's included: counted
    with scaled_dot_product_attention's math form, whose matmuls the counter sees (its CPU kernel it does
    not: a ViT's attention counted as 0, its FLOP ratio 2.000 where it is 1.948)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(*inputs)
    return counter.get_total_flops()


def clip_as_relu(src: Path, dst: Path) -> bool:
    """Write src with its local functions inlined and every Clip whose min is a constant 0 as Relu
    (not the same model: no upper bound; see --clip-ceiling). False when there is no such Clip."""
    import onnx
    import onnx.inliner
    from onnx import numpy_helper

    model = onnx.inliner.inline_local_functions(onnx.load(str(src)))
    graph = model.graph

    def is_zero(t) -> bool:  # a one-element constant equal to 0
        return list(t.dims) in ([], [1]) and float(numpy_helper.to_array(t).reshape(-1)[0]) == 0.0

    zero = {t.name for t in graph.initializer if is_zero(t)}
    zero |= {n.output[0] for n in graph.node
             if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value" and is_zero(n.attribute[0].t)}
    changed = 0
    for node in graph.node:
        if node.op_type == "Clip" and len(node.input) > 1 and node.input[1] in zero:
            node.op_type = "Relu"
            del node.input[1:]
            changed += 1
    if changed:
        onnx.save(model, str(dst))
    return changed > 0


# -- timing and profiling ---------------------------------------------------------------------

def ort_fn(path: Path, x: np.ndarray, device: str = "cpu"):
    """One run of the file on x: on the CPU, 1 thread; on "cuda", input and outputs bound on the GPU."""
    sess = ort_session(path, device=device, threads=1)
    name = sess.get_inputs()[0].name
    if device == "cpu":
        feed = {name: x}
        return lambda: sess.run(None, feed)
    import onnxruntime as ort

    binding = sess.io_binding()
    binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    for out in sess.get_outputs():
        binding.bind_output(out.name, "cuda", 0)
    return lambda: sess.run_with_iobinding(binding)


def op_profile(path: Path, x: np.ndarray, runs: int, device: str = "cpu") -> dict[str, float]:
    """ONNX Runtime's kernel time per op type, ms per run (1 thread; with the CUDA provider, the host's
    time in each kernel's launch, not the GPU's). On the CPU a Conv's row also names what its node does in the
    graph ONNX Runtime optimized: its fused activation, kernel, grouping, and a sum input (where the neuron,
    dendrite and V-scale convs of a fused site differ)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.enable_profiling = True
    providers = (["CUDAExecutionProvider"] if device == "cuda" else []) + ["CPUExecutionProvider"]
    with tempfile.TemporaryDirectory(prefix="pbp_prof_") as tmp:
        opts.profile_file_prefix = os.path.join(tmp, "prof")
        if device == "cpu":
            opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        sess = ort.InferenceSession(str(path), opts, providers=providers)
        feed = {sess.get_inputs()[0].name: x}
        sess.run(None, feed)  # warm-up (also profiled: subtracted below by counting runs)
        for _ in range(runs):
            sess.run(None, feed)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
        labels = _conv_labels(os.path.join(tmp, "optimized.onnx")) if device == "cpu" else {}
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            node = e["name"][:-len("_kernel_time")]
            per_op[labels.get(node, e["args"]["op_name"])] += e["dur"]
    return {op: us / 1e3 / (runs + 1) for op, us in per_op.items()}


def _conv_labels(optimized: str) -> dict[str, str]:
    """Node name -> "Conv (Sigmoid, 3x3, grouped, + sum)" for the convs of ONNX Runtime's optimized graph."""
    import onnx

    if not os.path.exists(optimized):
        return {}
    labels = {}
    for node in onnx.load(optimized, load_external_data=False).graph.node:
        if node.op_type not in ("Conv", "FusedConv"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        act = attrs.get("activation", b"")
        kernel = "x".join(str(k) for k in attrs.get("kernel_shape", [])) or "1x1"
        parts = [act.decode() if isinstance(act, bytes) and act else "no activation", kernel]
        if attrs.get("group", 1) > 1:
            parts.append("grouped")
        if len([i for i in node.input if i]) > 3:
            parts.append("+ sum")
        labels[node.name] = f"Conv ({', '.join(parts)})"
    return labels


# -- main -----------------------------------------------------------------------------------

def _extra_cells(r: dict, key: str) -> str:
    """ms and quotient of an extra timed file (baseline, clip_as_relu); dashes where there is none."""
    if key not in r:
        return " - | - |"
    return f" {r[key] * 1e3:.3f} | {r[key] / r['plain'] / r['flops']:.2f} |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=REFERENCE + ZOO, help=f"from: {' '.join(REFERENCE + ZOO)}; or any torchvision classifier, or timm:NAME")
    ap.add_argument("--ks", nargs="*", type=int, default=[1, 2], help="dendrites per site")
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 32])
    ap.add_argument("--image-size", type=int, default=128, help="zoo models: input height = width")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per file and cell, about")
    ap.add_argument("--reps", type=int, default=5, help="interleaved timing blocks per cell")
    ap.add_argument("--profile", action="store_true", help="also print ORT time per op type (plain vs fused)")
    ap.add_argument("--quick", action="store_true", help="short timings, small images (smoke test)")
    ap.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    ap.add_argument("--keep", type=Path, default=None, help="write the ONNX files here (default: a temporary folder)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="also time the fused files an earlier --keep run wrote to this folder")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="ONNX Runtime's CPU provider (1 thread) or its CUDA provider (onnxruntime-gpu)")
    ap.add_argument("--clip-ceiling", action="store_true",
                    help="also time the fused file with every Clip(x, 0, max) as Relu (a diagnostic, not exact)")
    args = ap.parse_args(argv)
    if args.quick:
        args.min_time, args.reps, args.image_size = 0.05, 3, 64
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    if args.device == "cuda" and "CUDAExecutionProvider" not in available_providers():
        raise SystemExit("--device cuda: this onnxruntime has no CUDAExecutionProvider; install onnxruntime-gpu "
                         "in place of onnxruntime, or use --device cpu")
    models = load_models(args.models, args.image_size)

    if args.baseline is not None and not args.baseline.is_dir():
        raise SystemExit(f"--baseline {args.baseline}: no such folder; write one with --keep first")
    rows, profiles = [], []
    with tempfile.TemporaryDirectory(prefix="pbp_latency_") as tmp:
        tmp = Path(tmp) if args.keep is None else args.keep
        tmp.mkdir(parents=True, exist_ok=True)
        for name, mod in models.items():
            torch.manual_seed(0)
            plain = mod.build_model().eval()
            example = tuple(mod.example_inputs())
            plain_path = Path(export_onnx(plain, example, tmp / f"{name}_plain.onnx"))
            plain_flops = flops(plain, example)
            for k in args.ks:
                pm = perforated(copy.deepcopy(plain), example, k)
                fused = Path(export_onnx(pm, example, tmp / f"{name}_k{k}_fused.onnx"))
                unfused = Path(export_onnx(pm, example, tmp / f"{name}_k{k}_unfused.onnx", fused=False))
                flop_ratio = flops(pm.finalize(), example) / plain_flops
                relu_path = tmp / f"{name}_k{k}_fused_clip_as_relu.onnx"
                has_clip_ceiling = args.clip_ceiling and clip_as_relu(fused, relu_path)
                for batch in args.batches:
                    x = torch.rand(batch, *example[0].shape[1:], generator=torch.Generator().manual_seed(batch))
                    x = x.to(example[0].dtype).numpy()
                    fns = {"plain": ort_fn(plain_path, x, args.device), "fused": ort_fn(fused, x, args.device),
                           "unfused": ort_fn(unfused, x, args.device)}
                    base = None if args.baseline is None else args.baseline / fused.name
                    if base is not None and base.exists():
                        fns["baseline"] = ort_fn(base, x, args.device)
                    if has_clip_ceiling:
                        fns["clip_as_relu"] = ort_fn(relu_path, x, args.device)
                    samples = interleaved(fns, args.min_time, args.reps)
                    t = {n: statistics.median(v) for n, v in samples.items()}
                    # the fused quotient per round (fused / plain of the same round, over the FLOP ratio)
                    q_rounds = [r / flop_ratio for r in round_ratios(samples, "plain")["fused"]]
                    rows.append(dict(model=name, k=k, batch=batch, sites=len(pm.sites), flops=flop_ratio,
                                     quotient=spread(q_rounds), **t))
                    print(f"# {name} K={k} batch={batch}: " + ", ".join(f"{n} {v * 1e3:.3f} ms" for n, v in t.items()),
                          file=sys.stderr, flush=True)
                    if args.profile:
                        runs = max(3, min(50, int(0.5 / max(t["fused"], 1e-6))))
                        profiles.append(dict(model=name, k=k, batch=batch, plain=op_profile(plain_path, x, runs, args.device),
                                             fused=op_profile(fused, x, runs, args.device)))

    where = "CUDA EP (" + torch.cuda.get_device_name() + ")" if args.device == "cuda" else "CPU latency, 1 thread"
    lines = [f"## ONNX Runtime {where}: perforated / plain against the FLOP ratio "
             f"(target quotient <= {TARGET})", "",
             f"onnxruntime {__import__('onnxruntime').__version__}, torch {torch.__version__}, {os.cpu_count()} cores; "
             f"zoo images {args.image_size}x{args.image_size}; medians of {args.reps} interleaved blocks; "
             f"quotient = median over the blocks of (fused / plain in the same block) / FLOP ratio"
             + (f"; baseline = the fused files in {args.baseline}" if args.baseline else "")
             + ("; Clip as Relu = the fused file with every Clip(x, 0, max) as Relu (not exact: a diagnostic)"
                if args.clip_ceiling else "") + ".", "",
             "| model | sites | K | batch | plain ms | fused ms | unfused ms | FLOP ratio | fused/plain "
             "| unfused/plain | fused quotient | rounds 25-75 % | target |" + (" baseline ms | baseline quotient |" if args.baseline else "")
             + (" Clip as Relu ms | its quotient |" if args.clip_ceiling else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|" + ("---:|---:|" if args.baseline else "")
             + ("---:|---:|" if args.clip_ceiling else "")]
    met = 0
    for r in rows:
        fp, up = r["fused"] / r["plain"], r["unfused"] / r["plain"]
        q, q_lo, q_hi = r["quotient"]
        ok = q <= TARGET
        met += ok
        # met / not met by the median round; "edge" when the middle half of the rounds straddles the target
        status = "met" if ok else "**not met**"
        if q_lo <= TARGET < q_hi:
            status += " (edge)"
        lines.append(f"| {r['model']} | {r['sites']} | {r['k']} | {r['batch']} | {r['plain'] * 1e3:.3f} "
                     f"| {r['fused'] * 1e3:.3f} | {r['unfused'] * 1e3:.3f} | {r['flops']:.2f} | {fp:.2f} | {up:.2f} "
                     f"| {q:.2f} | {q_lo:.2f}-{q_hi:.2f} | {status} |"
                     + (_extra_cells(r, "baseline") if args.baseline else "")
                     + (_extra_cells(r, "clip_as_relu") if args.clip_ceiling else ""))
    lines += ["", f"target met in {met} of {len(rows)} rows"]
    for p in profiles:
        ops = sorted(set(p["plain"]) | set(p["fused"]), key=lambda o: -p["fused"].get(o, 0.0))
        lines += ["", f"### ORT time per op type (ms per run): {p['model']} K={p['k']} batch={p['batch']}", "",
                  "| op | plain | fused |", "|---|---:|---:|"]
        for op in ops:
            lines.append(f"| {op} | {p['plain'].get(op, 0.0):.3f} | {p['fused'].get(op, 0.0):.3f} |")
        lines.append(f"| total | {sum(p['plain'].values()):.3f} | {sum(p['fused'].values()):.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
