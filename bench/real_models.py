"""Real-world models through pbp-fx: Hugging Face BERT and GPT-2, torchvision-style ResNet-18.

    python bench/real_models.py             # small configurations (hidden 128 / width 32)
    python bench/real_models.py --quick     # tiny configurations, a few seconds per model
    python bench/real_models.py --models bert gpt2 --threads 2

For each model (random initialisation; nothing is downloaded) it reports

    frontend      the tracing frontend `perforate` chose (fx, or torch.export when fx fails)
    sites         neuron sites found, by kind
    perforate     seconds for pbp_fx.perforate (trace both modes, find sites, insert)
    export        seconds for the fused ONNX export of the perforated model (K = 1)
    params        parameters before / after one dendrite per site, and their ratio
    latency       ONNX Runtime (CPU) median latency, plain vs perforated-fused (K = 1), at
                  batch 1 and 32, and the ratio perforated / plain (timed interleaved)

"plain" is the original model exported to ONNX as is (the same exporter, no dendrites).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import pbp_fx  # noqa: E402
from pbp_fx.exporters import export_onnx, ort_session  # noqa: E402
from pbp_fx.models.resnet18 import ResNet18  # noqa: E402

from paired import interleaved  # noqa: E402  (bench/)

SEQ = 32


def _hf():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def bert(quick: bool):
    t = _hf()
    h = 32 if quick else 128
    cfg = t.BertConfig(hidden_size=h, num_hidden_layers=2, num_attention_heads=2 if quick else 4,
                       intermediate_size=4 * h, vocab_size=100 if quick else 1000, max_position_embeddings=128,
                       num_labels=3)
    return t.BertForSequenceClassification(cfg), ("input_ids", "attention_mask")


def gpt2(quick: bool):
    t = _hf()
    h = 32 if quick else 128
    cfg = t.GPT2Config(n_embd=h, n_layer=2, n_head=2 if quick else 4, vocab_size=100 if quick else 1000,
                       n_positions=128, use_cache=False, bos_token_id=0, eos_token_id=0)
    return t.GPT2LMHeadModel(cfg), ("input_ids",)


def resnet18(quick: bool):
    return ResNet18(num_classes=10, width=8 if quick else 32), ("x",)


MODELS = {"bert": bert, "gpt2": gpt2, "resnet18": resnet18}


def inputs_for(name: str, batch: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    if name == "resnet18":
        return (torch.randn(batch, 3, 64, 64, generator=g),)
    ids = torch.randint(0, 100, (batch, SEQ), generator=g)
    return (ids, torch.ones(batch, SEQ, dtype=torch.long)) if name == "bert" else (ids,)


def measure(name: str, quick: bool, threads: int, reps: int, min_time: float, tmp: Path) -> dict:
    torch.manual_seed(0)
    model, names = MODELS[name](quick)
    model.eval()
    example = inputs_for(name, 2)
    kwargs = dict(zip(names, example)) if name != "resnet18" else {}
    args = example if name == "resnet18" else ()
    t0 = time.perf_counter()
    pm = pbp_fx.perforate(model, args, example_kwargs=kwargs)
    perforate_s = time.perf_counter() - t0
    kinds: dict[str, int] = {}
    for s in pm.sites.values():
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
    before = sum(p.numel() for p in model.parameters())
    pm.grow()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s in pm.sites.values():
            s.out_weight.copy_(0.1 * torch.randn(s.out_weight.shape, generator=g))
    pm.eval()
    after = pm.num_parameters()

    plain_path, perf_path = tmp / f"{name}_plain.onnx", tmp / f"{name}_perforated.onnx"
    export_onnx(copy.deepcopy(model), example, plain_path)
    t0 = time.perf_counter()
    export_onnx(pm, example, perf_path, fused=True)
    export_s = time.perf_counter() - t0

    sessions = {"plain": ort_session(plain_path, device="cpu", threads=threads),
                "perforated": ort_session(perf_path, device="cpu", threads=threads)}
    latency = {}
    for batch in (1, 32):
        feeds = {}
        for key, sess in sessions.items():
            arrays = [t.numpy() for t in inputs_for(name, batch, seed=1)]
            feeds[key] = (sess, {i.name: a for i, a in zip(sess.get_inputs(), arrays)})
        fns = {k: (lambda s=s, f=f: s.run(None, f)) for k, (s, f) in feeds.items()}
        latency[batch] = {k: statistics.median(v) for k, v in interleaved(fns, min_time, reps).items()}
    # correctness of what was timed
    with torch.no_grad():
        want = pm(*inputs_for(name, 2, seed=3))
    want = want if isinstance(want, torch.Tensor) else want.logits
    sess, _ = feeds["perforated"]
    got = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs_for(name, 2, seed=3))})[0]
    err = float(np.abs(got - want.numpy()).max())
    return dict(name=name, frontend=pm.graph_module.meta["pbp_frontend"], kinds=kinds, perforate_s=perforate_s,
                export_s=export_s, before=before, after=after, latency=latency, err=err)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--quick", action="store_true", help="tiny configurations")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--min-time", type=float, default=0.2, help="seconds per timed sample, about")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            r = measure(name, args.quick, args.threads, args.reps, args.min_time, Path(tmp))
            rows.append(r)
            print(f"{name}: done ({r['perforate_s']:.1f} s perforate, {r['export_s']:.1f} s export, "
                  f"ORT vs PyTorch max diff {r['err']:.1e})", file=sys.stderr)
    cfg = "tiny" if args.quick else "small"
    print(f"\n## pbp-fx on real-world models ({cfg} random configurations, ONNX Runtime CPU, "
          f"{args.threads} thread(s); K = 1 dendrite per site)\n")
    print("| model | frontend | sites | perforate (s) | fused export (s) | params before | params after | ratio |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        sites = ", ".join(f"{v} {k}" for k, v in sorted(r["kinds"].items()))
        print(f"| {r['name']} | {r['frontend']} | {sites} | {r['perforate_s']:.2f} | {r['export_s']:.2f} | "
              f"{r['before']:,} | {r['after']:,} | {r['after'] / r['before']:.2f} |")
    print("\n| model | batch | plain (ms) | perforated fused (ms) | ratio |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        for batch, lat in r["latency"].items():
            print(f"| {r['name']} | {batch} | {1e3 * lat['plain']:.3f} | {1e3 * lat['perforated']:.3f} | "
                  f"{lat['perforated'] / lat['plain']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
