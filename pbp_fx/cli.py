"""The `pbp-fx` command: argument parsing and error reporting over the public API.

Subcommands live in a registry; adding one is one decorated function `(args) -> int`:

    @subcommand("export", "write an ONNX file", arg("model"), arg("--out", default="model.onnx"))
    def export(args) -> int:
        ...
        return 0

Every pbp-fx error (`PBError`) is reported as ONE line on stderr, `pbp-fx: error: ...`, with
exit status 2 and no traceback (`--debug` shows it). Files are written to a temporary
folder first and renamed into place, so a failed run leaves no partial output.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

from .errors import PBError
from .fileio import umask

__all__ = ["main", "subcommand", "arg", "COMMANDS", "build_parser", "atomic_output_dir"]

PROG = "pbp-fx"
EXIT_OK, EXIT_INTERNAL, EXIT_ERROR = 0, 1, 2


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    args: tuple  # ((flags...), kwargs) pairs for add_argument
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def arg(*flags: str, **kwargs) -> tuple:
    """One `add_argument` call, as data: arg("--out", default="runs")."""
    return flags, kwargs


def subcommand(name: str, help: str, *args: tuple):
    """Register `fn(args) -> int` as `pbp-fx NAME` with the given arguments."""

    def register(fn: Callable[[argparse.Namespace], int]):
        if name in COMMANDS:
            raise ValueError(f"subcommand {name!r} is registered twice")
        COMMANDS[name] = Command(name, help, tuple(args), fn)
        return fn

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Perforated Backpropagation for PyTorch models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        for flags, kwargs in cmd.args:
            p.add_argument(*flags, **kwargs)
        p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        p.set_defaults(_run=cmd.run)
    return parser


@contextmanager
def _quiet_unless(debug: bool) -> Iterator[None]:
    """Hide library warnings (torch.export, the ONNX exporter) from CLI users unless --debug."""
    if debug:
        yield
        return
    import logging

    torch_log = logging.getLogger("torch")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_log.setLevel(level)


def _error(message: str) -> None:
    text = " ".join(str(message).split()) or "unknown error"
    print(f"{PROG}: error: {text}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # usage errors (already printed by argparse) and --help
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    try:
        return int(args._run(args) or 0)
    except PBError as exc:
        if args.debug:
            raise
        _error(exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug in pbp-fx or torch: still one line by default
        if args.debug:
            raise
        _error(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
        return EXIT_INTERNAL


# -- output --------------------------------------------------------------------------------
@contextmanager
def atomic_output_dir(out: str) -> Iterator[str]:
    """Yield a temporary folder next to `out`; on success its files are renamed into `out`.

    A new `out` is the temporary folder renamed; an existing one gets each file replaced
    (others it holds are left alone). On any error the temporary folder is removed.
    """
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise PBError(f"--out {out!r} exists and is not a directory")
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    except OSError as exc:
        raise PBError(f"cannot create output directory {out!r}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        if not os.path.exists(out):
            os.replace(tmp, out)
            os.chmod(out, 0o777 & ~umask())
        else:
            for name in sorted(os.listdir(tmp)):
                os.replace(os.path.join(tmp, name), os.path.join(out, name))
    except OSError as exc:
        raise PBError(f"cannot write output directory {out!r}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)



def _table(rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- transform -----------------------------------------------------------------------------
@subcommand(
    "transform", "trace a model file, find its neuron sites and insert dendrite sites",
    arg("model", help="model file defining build_model() and example_inputs() (and optionally example_kwargs())"),
    arg("--include", action="append", metavar="GLOB", default=None,
        help="perforate only sites whose qualified name matches (repeatable)"),
    arg("--exclude", action="append", metavar="GLOB", default=None,
        help="do not perforate sites whose qualified name matches (repeatable; wins over --include)"),
    arg("--activation", default="sigmoid", choices=("sigmoid", "tanh", "relu"),
        help="dendrite activation (default: sigmoid)"),
    arg("--frontend", default="auto", choices=("auto", "fx", "export"),
        help="auto: symbolic tracing, else torch.export (default); fx; export"),
    arg("--explain", action="store_true",
        help="list every Linear/Conv-like op with 'site' or the reason it is not one"),
    arg("--out", metavar="DIR", default=None,
        help="write perforated_graph.py and report.json to DIR (default: print only)"),
)
def transform(args: argparse.Namespace) -> int:
    from .modelfile import example_kwargs, instantiate, load_model_file
    from .perforated import perforate

    t0 = time.perf_counter()
    mod = load_model_file(args.model)
    model, inputs = instantiate(mod)
    kwargs = example_kwargs(mod)
    t1 = time.perf_counter()
    pm = perforate(model, inputs, include=args.include, exclude=args.exclude, activation=args.activation,
                   example_kwargs=kwargs, frontend=args.frontend)
    t2 = time.perf_counter()

    rows = pm.summary()
    meta = pm.graph_module.meta
    frontend = meta.get("pbp_frontend", "fx")
    leaves = list(meta.get("pbp_untraceable", []))
    base = sum(p.numel() for p in model.parameters())
    per_round = sum(r["params_per_dendrite"] for r in rows)
    report = {
        "model": os.path.abspath(args.model),
        "model_class": type(model).__name__,
        "activation": args.activation,
        "include": args.include or [],
        "exclude": args.exclude or [],
        "frontend": frontend,
        "modes": meta.get("pbp_modes"),
        "sites": rows,
        "num_sites": len(rows),
        "params": {"model": base, "perforated": pm.num_parameters(), "per_dendrite_round": per_round},
        "leaves_isolated": leaves,
        "time_s": {"load": round(t1 - t0, 6), "perforate": round(t2 - t1, 6)},
    }
    if "pbp_fx_error" in meta:
        report["fx_error"] = meta["pbp_fx_error"]

    table = [["site", "kind", "channels", "norm", "params/dendrite"]]
    table += [[r["name"], r["kind"], str(r["channels"]), "BN" if r["norm"] else "-", f"{r['params_per_dendrite']:,}"]
              for r in rows]
    print(f"{type(model).__name__} from {args.model}: {len(rows)} site(s)")
    print(_table(table, right={2, 4}))
    print(f"total: {len(rows)} site(s); model {base:,} parameters; "
          f"one dendrite per site adds {per_round:,} ({100.0 * per_round / max(base, 1):.1f}%)")
    if leaves:
        print(f"untraceable submodules isolated as leaves (neurons inside swapped): {', '.join(leaves)}")
    if frontend == "export":
        why = " (symbolic tracing failed)" if "pbp_fx_error" in meta else ""
        print(f"frontend: torch.export{why}")
    if "pbp_frontend_choice" in meta:
        print(f"frontend choice: {meta['pbp_frontend_choice']}")
    if frontend == "parts":
        print(f"root forward not traced: perforated in place {', '.join(meta['pbp_parts'])}"
              + (f"; left plain: {', '.join(meta['pbp_plain'])}" if meta.get("pbp_plain") else ""))
    print(f"perforate: {t2 - t1:.3f} s")
    if args.explain:
        from .explain import explain_graph

        explained = explain_graph(pm.graph_module, pm.source_model, args.include, args.exclude)
        report["explain"] = [vars(r) for r in explained]
        print(_table([["op", "kind", "status"]] + [[r.name, r.kind, r.status + (f": {r.reason}" if r.reason else "")]
                                                   for r in explained], right=set()))

    if args.out:
        with atomic_output_dir(args.out) as tmp:
            with open(os.path.join(tmp, "perforated_graph.py"), "w") as f:
                f.write(f'"""Perforated graph of {type(model).__name__} from {os.path.basename(args.model)} '
                        f"(generated by pbp-fx {_version()}; {len(rows)} sites, K = 0 dendrites).\n\n"
                        'Each `self.pbp_sites.<site>(x, n)` adds the dendrites of one neuron site to its output n.\n"""\n')
                f.write(pm.code.lstrip("\n"))
            with open(os.path.join(tmp, "report.json"), "w") as f:
                json.dump(report, f, indent=2)
                f.write("\n")
        print(f"wrote {os.path.join(args.out, 'perforated_graph.py')} and {os.path.join(args.out, 'report.json')}")
    return EXIT_OK


# -- train ---------------------------------------------------------------------------------
@subcommand(
    "train", "train a model file's model with Perforated Backpropagation (default: MNIST-1D MLP)",
    arg("model", nargs="?", default=None,
        help="model file with build_model(), example_inputs() and datasets() (default: built-in MNIST-1D MLP)"),
    arg("--mode", default="pb", choices=("pb", "gd"), help="pb: correlation-trained dendrites; gd: backprop baseline"),
    arg("--max-dendrites", type=int, default=3, metavar="N", help="dendrites per site at most (default: 3)"),
    arg("--out", metavar="DIR", default=None, help="output folder (default: runs/<model name>)"),
    arg("--epochs", type=int, default=800, help="epoch cap over all phases (default: 800)"),
    arg("--seed", type=int, default=0),
    arg("--batch-size", type=int, default=100),
    arg("--lr", type=float, default=1e-3, help="neuron-phase Adam learning rate"),
    arg("--candidate-lr", type=float, default=0.02, help="dendrite-phase Adam learning rate"),
    arg("--patience", type=int, default=30, help="neuron-phase epochs without validation gain before switching"),
    arg("--dendrite-patience", type=int, default=3, help="dendrite-phase epochs without correlation gain"),
    arg("--max-dendrite-epochs", type=int, default=60, help="cap on one dendrite phase, in epochs"),
    arg("--pool", type=int, default=4, help="candidates per site (default: 4)"),
    arg("--activation", default="sigmoid", choices=("sigmoid", "tanh", "relu")),
    arg("--include", action="append", metavar="GLOB", default=None),
    arg("--exclude", action="append", metavar="GLOB", default=None),
    arg("--no-progress", action="store_true", help="no progress bar"),
    arg("--nproc", type=int, default=1, metavar="N",
        help="train on N local processes with torchrun and DDP (gloo on CPU, nccl on GPU); "
             "--batch-size stays the global batch (default: 1)"),
    arg("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
        help="with --nproc: how long a process waits for the others before it stops (default: 300)"),
    arg("--resume", metavar="DIR", default=None,
        help="continue the run whose --out folder is DIR, with its own settings (from its last epoch)"),
)
def train(args: argparse.Namespace) -> int:
    from .distributed import Distributed, launch, torchrun_world_size
    from .job import train_job

    if args.nproc < 1:
        raise PBError(f"--nproc {args.nproc}: it must be at least 1")
    world = torchrun_world_size()
    if args.nproc > 1 and world == 1:
        # The launcher: the same command on N processes (each sees torchrun's environment).
        if args.batch_size % args.nproc:
            raise PBError(f"--batch-size {args.batch_size} is the global batch: it must be divisible by "
                          f"--nproc {args.nproc}")
        rc = launch(args.nproc, ["train", *_train_argv(args)], quiet=not args.debug)
        if rc != 0:
            raise PBError(f"training on {args.nproc} processes failed (torchrun exit status {rc}): "
                          "each rank's error is printed above")
        return EXIT_OK
    distributed = Distributed.init(timeout=args.dist_timeout) if world > 1 else None
    name = "mnist1d_mlp" if args.model is None else os.path.splitext(os.path.basename(args.model))[0]
    if args.resume is not None and args.model is not None:
        raise PBError("--resume continues a run with its own model file and settings: give --resume DIR alone")
    try:
        if args.resume is not None:
            train_job(resume=args.resume, progress=not args.no_progress, distributed=distributed)
            if distributed is not None:
                distributed.close()
            return EXIT_OK
        train_job(args.model, mode=args.mode, max_dendrites=args.max_dendrites,
                  out=args.out or os.path.join("runs", name), seed=args.seed, epochs=args.epochs,
                  batch_size=args.batch_size, lr=args.lr, candidate_lr=args.candidate_lr, patience=args.patience,
                  dendrite_patience=args.dendrite_patience, max_dendrite_epochs=args.max_dendrite_epochs,
                  pool=args.pool, activation=args.activation, include=args.include, exclude=args.exclude,
                  progress=not args.no_progress, distributed=distributed)
    except PBError as exc:
        if distributed is None or str(exc).startswith(f"rank {distributed.rank} "):
            raise
        raise PBError(f"rank {distributed.rank}: {exc}") from exc  # which process said it
    if distributed is not None:
        distributed.close()
    return EXIT_OK


def _train_argv(args: argparse.Namespace) -> list[str]:
    """The `train` arguments of `args` as a command line (without --nproc), for the workers."""
    out: list[str] = []
    for flags, kw in COMMANDS["train"].args:
        dest = kw.get("dest") or flags[-1].lstrip("-").replace("-", "_")
        if dest == "nproc":
            continue
        value = getattr(args, dest)
        if not flags[0].startswith("-"):
            out += [] if value is None else [str(value)]
        elif kw.get("action") == "store_true":
            out += [flags[-1]] if value else []
        elif kw.get("action") == "append":
            for v in value or []:
                out += [flags[-1], str(v)]
        elif value is not None:
            out += [flags[-1], str(value)]
    if args.debug:
        out.append("--debug")
    return out


# -- export / run ----------------------------------------------------------------------------
def _model_module(ref: str):
    """A model file path, or the dotted name of a built-in model module."""
    import importlib

    from .modelfile import load_model_file

    if ref.endswith(".py") or os.sep in ref:
        return load_model_file(ref)
    try:
        return importlib.import_module(ref)
    except ImportError as exc:
        raise PBError(f"model {ref!r} is neither a model file nor an importable module: pass --model FILE") from exc


@subcommand(
    "export", "write an ONNX file (fused pbp ops) from a training checkpoint or a model file",
    arg("source", help="checkpoint.safetensors from `pbp-fx train`, or a model file (exported with K = 0)"),
    arg("-o", "--out", default="model.onnx", help="ONNX file to write (default: model.onnx)"),
    arg("--model", metavar="FILE", default=None, help="the model file a checkpoint was trained from "
        "(default: the one recorded in the checkpoint)"),
    arg("--unfused", action="store_true", help="plain standard ops instead of one pbp node per site"),
    arg("--opset", type=int, default=18),
    arg("--static-batch", action="store_true", help="fixed batch size instead of a dynamic batch axis"),
    arg("--check", action="store_true", help="run the file in ONNX Runtime and compare with PyTorch"),
    arg("--frontend", default="auto", choices=("auto", "fx", "export"),
        help="how the model file's model is captured (auto: symbolic tracing, else torch.export)"),
)
def export(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load, read_extra
    from .exporters import export_onnx
    from .modelfile import instantiate
    from .perforated import perforate

    if not os.path.exists(args.source):
        raise PBError(f"{args.source} does not exist: pass a checkpoint or a model file")
    with _quiet_unless(args.debug):  # tracing and exporter warnings are for --debug
        if args.source.endswith(".py"):
            model, inputs = instantiate(_model_module(args.source))
            pm = perforate(model, inputs, frontend=args.frontend)
        else:
            ref = args.model or read_extra(args.source).get("model")
            if not ref:
                raise PBError(f"checkpoint {args.source} does not record its model file: pass --model FILE")
            model, inputs = instantiate(_model_module(ref))
            if args.frontend != "auto":
                model = perforate(model, inputs, frontend=args.frontend)
            pm = load(args.source, model, inputs)
        pm.eval()
        if pm.phase == "dendrite":
            pm.abort_dendrite_phase()
        path = export_onnx(pm, inputs, args.out, fused=not args.unfused, dynamic_batch=not args.static_batch,
                           opset=args.opset)
    print(f"wrote {path}: {'unfused' if args.unfused else 'fused'}, dendrites per site "
          f"{json.dumps(pm.num_dendrites)}")
    if args.check:
        from .exporters import ort_session, run

        session = ort_session(path)
        got = run(session, tuple(t.numpy() for t in inputs))[0]
        with torch.no_grad():
            ref_out = pm(*inputs)
        diff = float(abs(torch.as_tensor(got) - ref_out).max())
        print(f"check: ONNX Runtime ({session.provider}) vs PyTorch max abs diff {diff:.2e}")
        if not diff <= 1e-4:
            raise PBError(f"exported model differs from PyTorch by {diff:.2e} (> 1e-4): report this as a bug")
    return EXIT_OK


@subcommand(
    "run", "run an ONNX file in ONNX Runtime on .npy inputs",
    arg("model", help="an .onnx file"),
    arg("--input", action="append", required=True, metavar="X.npy", help="one per model input, in order"),
    arg("--device", default="auto", choices=("auto", "cpu", "cuda")),
    arg("--output", metavar="Y.npy", default=None, help="save the first output here"),
)
def run_onnx(args: argparse.Namespace) -> int:
    import numpy as np

    from .fileio import atomic_write
    from .exporters import ort_session, run

    if not os.path.isfile(args.model):
        raise PBError(f"ONNX file {args.model} does not exist")
    arrays = []
    for name in args.input:
        try:
            arrays.append(np.load(name, allow_pickle=False))
        except (OSError, ValueError) as exc:
            raise PBError(f"cannot read input {name}: {exc} (save it with numpy.save)") from exc
    try:
        session = ort_session(args.model, device=args.device)
        outputs = run(session, tuple(arrays))
    except PBError:
        raise
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own errors, one line
        raise PBError(f"ONNX Runtime could not run {args.model}: {str(exc).splitlines()[0]}") from exc
    print(f"provider: {session.provider}")
    for i, y in enumerate(outputs):
        flat = ", ".join(f"{v:.5g}" for v in np.asarray(y).reshape(-1)[:6])
        print(f"output {i}: shape {list(np.shape(y))} dtype {np.asarray(y).dtype} [{flat}{', ...' if np.size(y) > 6 else ''}]")
    if args.output:
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a path
                np.save(f, outputs[0], allow_pickle=False)

        atomic_write(args.output, write, what="output")
        print(f"wrote {args.output}")
    return EXIT_OK


def _version() -> str:
    from . import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
