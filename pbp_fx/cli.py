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
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

from .config import ACTIVATION_NAMES, FRONTEND_HELP, FRONTENDS, PBConfig
from .errors import NoSitesError, PBError, PBWarning, Terminated, exited
from .fileio import check_output_dir, umask
from .signals import import_torch_with_stops_held, interrupts_kept, stop_received

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


def _path(text: str) -> str:
    """An argparse type for an output path: an empty one is refused (it stood for the default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: give a path, or leave the flag out for the default")
    return text


def subcommand(name: str, help: str, *args: tuple):
    """Register `fn(args) -> int` as `pbp-fx NAME` with the given arguments."""

    def register(fn: Callable[[argparse.Namespace], int]):
        if name in COMMANDS:
            raise ValueError(f"subcommand {name!r} is registered twice")
        COMMANDS[name] = Command(name, help, tuple(args), fn)
        return fn

    return register


class _Parser(argparse.ArgumentParser):
    """Usage errors (a non-numeric value, an unknown flag) as ONE line, exit status 2. Flags are
    spelled whole (`--pat 5` is no --patience), and a negative number in any float syntax is a value
    (`--v-init -1e-3`, which argparse before Python 3.14 read as a flag)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        # (argparse's own pattern, private: before Python 3.14 it took -1e-3 for a flag)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf(inity)?$", re.I)

    def add_argument(self, *args, **kwargs):
        """Every flag that stores one value is given once (argparse would keep the last of two)."""
        if args and args[0].startswith("-") and kwargs.get("action") in (None, "store"):
            kwargs["action"] = _GivenOnce
        return super().add_argument(*args, **kwargs)

    def error(self, message: str):
        _error(f"{message} (see {self.prog} --help)")
        raise SystemExit(EXIT_ERROR)


def _given_once(action: argparse.Action, namespace, values, hint: str) -> None:
    """Refuse a flag's second value, which would silently replace the first (argparse keeps the last)."""
    seen = namespace.__dict__.setdefault("_given", {})
    shown = "on" if values is None else getattr(values, "text", values)
    if action.dest in seen:
        raise argparse.ArgumentError(action, f"given twice ({seen[action.dest]}, {shown}): {hint}")
    seen[action.dest] = shown


class _GivenOnce(argparse.Action):
    """A flag that may be given once."""

    hint = "give it once"

    def __call__(self, parser, namespace, values, option_string=None):
        _given_once(self, namespace, values, self.hint)
        setattr(namespace, self.dest, values)


class _FileGivenOnce(_GivenOnce):
    hint = "give one (merge the files into one)"


class _SwitchGivenOnce(argparse.BooleanOptionalAction):
    """--flag / --no-flag, once: `--maximize --no-maximize` kept the last."""

    def __call__(self, parser, namespace, values, option_string=None):
        _given_once(self, namespace, option_string, "give it once")
        super().__call__(parser, namespace, values, option_string)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog=PROG, description="Perforated Backpropagation for PyTorch models.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        for flags, kwargs in cmd.args:
            p.add_argument(*flags, **kwargs)
        p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        p.set_defaults(_run=cmd.run, _parser=p)  # (_parser: its usage errors name its own --help)
    return parser


@contextmanager
def _quiet_unless(debug: bool) -> Iterator[None]:
    """Hide library warnings (torch.export, the ONNX exporter) from CLI users unless --debug.
    pbp-fx's own (PBWarning) are said once the block succeeds; when it fails, its one-line error
    says what went wrong."""
    if debug:
        yield
        return
    import logging

    torch_log = logging.getLogger("torch")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("ignore")
            warnings.simplefilter("always", PBWarning)
            yield
    finally:
        torch_log.setLevel(level)
    for text in dict.fromkeys(str(w.message) for w in said if issubclass(w.category, PBWarning)):
        warnings.warn(text, PBWarning, stacklevel=3)


@contextmanager
def _one_line_warnings(debug: bool) -> Iterator[None]:
    """Warnings that reach a CLI user print as one line each, `pbp-fx: warning: ...`, without
    Python's file:line and source echo (those are for --debug). Libraries' deprecation notices
    (torch's pytree, say) are about their own APIs, not the user's run: --debug shows them."""
    if debug:
        yield
        return
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
        yield


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from .distributed import LAUNCHER_PID

    if os.environ.get(LAUNCHER_PID) and os.environ.get("RANK", "0") != "0":  # (a --nproc run: rank 0 says each)
        return
    text = " ".join(str(message).split())
    if not issubclass(category, PBWarning):  # (another library's, or the model's own: say whose line it is)
        path = str(filename).replace(os.sep, "/")
        where = path.rpartition("-packages/")[2] if "-packages/" in path else os.path.basename(path)
        text = f"{category.__name__} at {where}:{lineno}: {text}"
    print(f"{PROG}: warning: {text}", file=sys.stderr if file is None else file)


def _error(message: str) -> None:
    text = " ".join(str(message).split()) or "unknown error"
    from .errors import keep_rank_error

    if not keep_rank_error(f"{PROG}: error: {text}"):
        print(f"{PROG}: error: {text}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run `pbp-fx argv...` and return the exit status; argv None: this process's command line
    (the program itself, which then ends: see `_before_exit`)."""
    if argv is not None:
        return _main(argv)
    streams = sys.stdout, sys.stderr
    # (a stream closed from the start, `>&-`, is None: nothing to wrap)
    sys.stdout, sys.stderr = (s if s is None or isinstance(s, _QuietOnceClosed) else _QuietOnceClosed(s)
                              for s in streams)
    try:
        with interrupts_kept() as seen:
            status = _main(argv)
        if seen.received and status == EXIT_OK:  # (lost, and its resend came too late; or swallowed)
            stopped = seen.received[-1]
            where = ("came in a clean-up callback, where Python cannot stop a command" if seen.lost is not None
                     else "was caught by code the command ran")
            return _stopped(stopped, f", but the signal {where}, and the command ended before it could be stopped")
        return status
    finally:
        sys.stdout, sys.stderr = streams
        _before_exit()


class _QuietOnceClosed:
    """A standard stream that goes quiet when its reader has gone (`pbp-fx train ... | head`):
    the job runs to its end, as it would have unpiped, instead of failing at its next line."""

    def __init__(self, stream):
        self._stream, self._gone = stream, False

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._reader_gone()
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._reader_gone()

    def _reader_gone(self) -> None:
        self._gone = True
        # What is still buffered is flushed again at exit: into /dev/null now, not the closed pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name):  # isatty, fileno, encoding, ... of the stream itself
        return getattr(self._stream, name)


def _before_exit() -> None:
    """The process ends next. Its last garbage collections would walk every object torch and
    onnx created (a second or more on a loaded machine, bench/export_time.py): freezing them
    (gc.freeze) skips that walk; atexit handlers and flushing run as usual."""
    import gc

    gc.freeze()


def _says_its_stop() -> bool:
    """Whether this process says it was stopped: one process, rank 0, or any rank of `--nproc` (its line goes
    to the launcher, which says a rank's bare stop only where it came to that rank alone: errors.rank_errors);
    under a torchrun of one's own, rank 0 alone (N ranks said it N times)."""
    from .errors import RANK_ERRORS

    return os.environ.get("RANK", "0") == "0" or bool(os.environ.get(RANK_ERRORS))


def _stopped(stop: type, detail: str = "", said: bool = True) -> int:
    """The exit status of a command stopped by Ctrl-C (KeyboardInterrupt) or SIGTERM (Terminated),
    and its line, "interrupted" or "terminated" and `detail`, when `said`."""
    if said:
        _error(("terminated" if issubclass(stop, Terminated) else "interrupted") + detail)
    return 143 if issubclass(stop, Terminated) else 130


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(None if argv is None else list(argv))
        if unknown:  # (the subcommand's flags are in its own help, not in pbp-fx --help)
            args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # usage errors (already printed by argparse) and --help
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    try:
        with _one_line_warnings(args.debug):
            if args.command != "run":  # (every other command imports torch)
                import_torch_with_stops_held()
                refused = _torchrun_refusal(args.command)
                if refused is not None:  # (said once, by rank 0, which exits 2)
                    if os.environ.get("RANK") == "0":
                        _error(refused)
                        return EXIT_ERROR
                    # (the others end as done: one that failed first made torchrun stop rank 0 before it said why,
                    # and torchrun still exits with rank 0's failure)
                    return EXIT_OK
            return int(args._run(args) or 0)
    except PBError as exc:
        if args.debug:
            raise
        _error(exc)
        return EXIT_ERROR
    except SystemExit as exc:  # (the model file's build_model, datasets, ... called sys.exit)
        if args.debug:  # (re-raised, a SystemExit would end the process without a traceback)
            traceback.print_exc()
        _error(exited(exc))
        return EXIT_ERROR
    except KeyboardInterrupt as exc:  # (one line for a --nproc run: rank 0's, or a rank's stopped alone)
        return _stopped(type(exc), f" {exc}" if str(exc) else "", said=_says_its_stop())
    except Exception as exc:  # noqa: BLE001 - a bug in pbp-fx or torch: still one line by default
        stopped = stop_received()
        if stopped is not None and not args.debug:  # (its consequence: an interrupted import failing again)
            return _stopped(stopped, said=_says_its_stop())
        if args.debug:
            raise
        _error(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
        return EXIT_INTERNAL


def _torchrun_refusal(command: str) -> Optional[str]:
    """Why `command` cannot run under torchrun's several processes (None: it can). Only train runs as one rank
    of several: every rank would run any other command whole, into the same files."""
    from .distributed import started_by_torchrun, torchrun_world_size

    ranks = torchrun_world_size()
    if command == "train" or ranks == 1 or not started_by_torchrun():  # (a worker's own subprocess runs)
        return None
    return (f"pbp-fx {command} runs in one process, and torchrun started {ranks}: run it without torchrun"
            + (" (--jobs N trains its runs side by side)" if command == "compare" else ""))


# -- output --------------------------------------------------------------------------------
def check_output_file(path: str, flag: str, reads: tuple = (), example: str = "x") -> None:
    """Refuse an output file path that cannot be written, or that is one of the files the command
    `reads` (it would be overwritten with the output), before any work starts; `example`: a file
    name to suggest inside a directory given instead."""
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise PBError(f"{flag} {path}: it is a directory; give a file path such as {os.path.join(path, example)}")
    for read in reads:
        if read is not None and os.path.exists(full) and os.path.exists(read) and os.path.samefile(full, read):
            raise PBError(f"{flag} {path} is {read}, which this command reads: writing it would destroy it; give "
                          "another output path")
    folder = os.path.dirname(full)
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise PBError(f"{flag} {path}: {probe} is a file, not a directory; choose another path")
    if probe != folder:
        raise PBError(f"{flag} {path}: directory {folder} does not exist; create it first (mkdir -p {folder})")
    try:  # a file made and removed: os.access says yes to root, also where nothing can be made (/proc)
        fd, made = tempfile.mkstemp(prefix=".pbp-probe-", dir=folder)
        os.close(fd)
        os.remove(made)
    except OSError as exc:
        raise PBError(f"{flag} {path}: nothing can be written in {folder} ({exc.strerror}); choose another path") \
            from None


@contextmanager
def atomic_output_dir(out: str) -> Iterator[str]:
    """Yield a temporary folder on `out`'s filesystem; on success its files are renamed into `out`.

    A new `out` is the temporary folder (made in its parent) renamed; an existing one gets a
    temporary folder inside it and each file replaced (others it holds are left alone), so
    no rename crosses filesystems even when `out` is a mount point. On any error the
    temporary folder is removed.
    """
    out = os.path.abspath(out)
    check_output_dir(out)
    existing = os.path.isdir(out)
    parent = out if existing else os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    except OSError as exc:
        raise PBError(f"cannot create output directory {out!r}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        if not existing:
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


def _site_filter_args() -> tuple:
    return (arg("--include", action="append", metavar="GLOB", default=None,
                help="perforate only sites whose qualified name matches (repeatable)"),
            arg("--exclude", action="append", metavar="GLOB", default=None,
                help="do not perforate sites whose qualified name matches (repeatable; wins over --include)"))


# -- transform -----------------------------------------------------------------------------
def _print_explained(explained: list) -> None:
    print(_table([["op", "kind", "status"]] + [[r.name, r.kind, r.status + (f": {r.reason}" if r.reason else "")]
                                               for r in explained], right=set()))


@subcommand(
    "transform", "trace a model file, find its neuron sites and insert dendrite sites",
    arg("model", help="model file defining build_model() and example_inputs() (and optionally example_kwargs())"),
    *_site_filter_args(),
    arg("--activation", default=PBConfig.activation, choices=ACTIVATION_NAMES,
        help=f"dendrite activation (default: {PBConfig.activation})"),
    arg("--frontend", default="auto", choices=FRONTENDS, help=f"graph capture: {FRONTEND_HELP} (default: auto)"),
    arg("--explain", action="store_true",
        help="list every Linear/Conv-like op with 'site' or the reason it is not one"),
    arg("--out", metavar="DIR", default=None, type=_path,
        help="write perforated_graph.py and report.json to DIR (default: print only)"),
)
def transform(args: argparse.Namespace) -> int:
    from .modelfile import example_kwargs, instantiate, load_model_file
    from .perforated import perforate

    if args.out:
        check_output_dir(args.out)
    t0 = time.perf_counter()
    mod = load_model_file(args.model, as_script=True)
    model, inputs = instantiate(mod)
    kwargs = example_kwargs(mod)
    t1 = time.perf_counter()
    try:
        pm = perforate(model, inputs, include=args.include, exclude=args.exclude, activation=args.activation,
                       example_kwargs=kwargs, frontend=args.frontend)
    except NoSitesError:
        if args.explain:  # (what --explain is for: why no layer became a site)
            from .explain import explain_sites

            _print_explained(explain_sites(model, inputs, args.include, args.exclude, example_kwargs=kwargs,
                                           frontend=args.frontend))
        raise
    t2 = time.perf_counter()

    rows = pm.summary()
    meta = pm.graph_module.meta
    frontend = meta.get("pbp_frontend", "fx")
    leaves = list(meta.get("pbp_untraceable", []))
    base = pm.num_parameters()  # what the forward uses (the captured graph): a module it never calls is left out
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
        _print_explained(explained)

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
class _Unset:
    """A flag's value `none`: the optional setting back to None (over a --config file's value)."""

    def __repr__(self) -> str:
        return "none"


UNSET = _Unset()


class _Typed:
    """A flag's number that keeps the text it was typed as (an error shows what the user wrote:
    `--lr 1e-999` is refused as 1e-999, not as 0.0)."""

    base: type

    def __new__(cls, value, text: str):
        obj = super().__new__(cls, value)
        obj.text = text
        return obj

    def __reduce__(self):  # (copied or sent to a worker process: a plain number)
        return self.base, (self.base(self),)


class _TypedInt(_Typed, int):
    base = int


class _TypedFloat(_Typed, float):
    base = float


_AS_TYPED = {int: _TypedInt, float: _TypedFloat, str: lambda value, text: value}


def _whole(text: str) -> int:
    """A whole number as typed: `10`, or a whole-valued float such as `10.0` or `1e3`, as a file's
    values are read (ValueError for anything else)."""
    try:
        return int(text)
    except ValueError:
        number = float(text)
        if not number.is_integer():
            raise
        return int(number)


def _number(kind: type, optional: bool = False):
    """An argparse type whose one-line error says what the value is not (argparse names the flag);
    `optional`: `none` is accepted too (UNSET)."""

    def parse(text: str):
        if optional and text.strip().lower() == "none":
            return UNSET
        try:
            if kind is not str and "_" in text:  # (Python's `1_000`: a config file's values refuse it)
                raise ValueError(text)
            return _AS_TYPED[kind](_whole(text) if kind is int else kind(text), text)
        except ValueError:
            word = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {word}" + (" or none" if optional else "")) from None

    parse.__name__ = kind.__name__
    return parse


def _dynamic_axis(text: str) -> tuple:
    """`--dynamic-axis INPUT:DIM=NAME` as (input name or position, dim, axis name)."""
    spec, _, axis = text.partition("=")
    name, _, dim = spec.rpartition(":")
    form = "INPUT:DIM=NAME, e.g. input_ids:1=sequence"
    try:
        dim = int(dim)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {form}") from None
    if not name or not axis:
        raise argparse.ArgumentTypeError(f"{text!r} names no {'input' if not name else 'axis'}: {form}")
    return (int(name) if name.lstrip("-").isdigit() else name), dim, axis


def config_args(cls, helps: Optional[dict] = None) -> list[tuple]:
    """One `--field-name` flag per field of a config dataclass; defaults shown, set values only kept.
    helps: a command's own help for some fields, by name."""
    from .config import cli_fields

    out = []
    for f in cli_fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type).replace("Optional[", "").rstrip("]")
        optional = f.metadata.get("optional", False)
        help_text = (f"{(helps or {}).get(f.name, f.metadata['help'])} (default: {f.default}"
                     + ("; none sets it back" if optional else "") + ")")
        kwargs = {"dest": f.name, "default": None, "help": help_text}
        if kind == "bool":
            kwargs["action"] = _SwitchGivenOnce
        elif f.metadata["choices"]:
            kwargs["choices"] = f.metadata["choices"]
        else:
            kwargs["type"] = _number(int if kind == "int" else float if kind == "float" else str, optional)
            kwargs["metavar"] = "N" if kind == "int" else "X"
        out.append(arg(flag, **kwargs))
    return out


def configs_from_args(args: argparse.Namespace):
    """(PBConfig, TrainConfig) from the flags given over the --config file's settings over the
    defaults; a bad value names its flag or the file (ConfigError)."""
    from .config import ConfigError, PBConfig, TrainConfig, cli_fields, read_settings

    path = getattr(args, "config_file", None)
    from_file = read_settings(path) if path is not None else ({}, {})
    if path is not None:
        _take_the_runs_scope(args, path)
    built = []
    for cls, filed in zip((PBConfig, TrainConfig), from_file):
        given = {f.name: getattr(args, f.name) for f in cli_fields(cls) if getattr(args, f.name, None) is not None}
        given = {name: None if value is UNSET else value for name, value in given.items()}
        try:
            built.append(cls(**{**filed, **given}))
        except ConfigError as exc:
            if exc.field is None:
                raise
            if exc.field in given:
                typed = getattr(given[exc.field], "text", exc.value)
                raise ConfigError(f"--{exc.field.replace('_', '-')} {typed}: {exc.reason}", exc.field, exc.value,
                                  exc.reason) from None
            raise ConfigError(f"--config {path}: {exc}", exc.field, exc.value, exc.reason) from None
        except TypeError as exc:  # a YAML/JSON value of another type than the setting's (a list, a dict)
            raise ConfigError(f"--config {path}: {' '.join(str(exc).split())}") from None
    return tuple(built)


def _take_the_runs_scope(args: argparse.Namespace, path: str) -> None:
    """A run's summary.json as --config: its --include/--exclude too, where the command gives
    neither (they were dropped silently, and every site perforated); its model file must be given
    (the built-in default was trained in its place, silently)."""
    import json

    from .job import DEFAULT_MODEL

    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return  # (a YAML file, or one read_settings refused already)
    if not (isinstance(data, dict) and isinstance(data.get("config"), dict) and isinstance(data.get("training"), dict)):
        return
    if hasattr(args, "include") and args.include is None and args.exclude is None:
        args.include, args.exclude = data.get("include"), data.get("exclude")
    model = data.get("model")
    if getattr(args, "pb_run", None) is None and hasattr(args, "model") and args.model is None \
            and isinstance(model, str) and model != DEFAULT_MODEL:
        raise PBError(f"--config {path} is the summary of a run of {model}, and no model file is given (the built-in "
                      f"MNIST-1D MLP would train): give it, e.g. pbp-fx {args.command} {model} --config {path}")


def run_name(model_file: Optional[str]) -> str:
    """The default name of a run's folder: the model file's stem, or the built-in model's."""
    from .job import DEFAULT_MODEL

    return DEFAULT_MODEL.rpartition(".")[2] if model_file is None else os.path.splitext(os.path.basename(model_file))[0]


def _config_file_arg() -> tuple:
    return arg("--config", dest="config_file", metavar="FILE", default=None, action=_FileGivenOnce,
               help="a JSON or YAML file of settings, one mapping of PBConfig/TrainConfig field names to values "
                    "(flags given here win over it)")


def _train_args() -> tuple:
    from .config import PBConfig, TrainConfig

    return (
        arg("model", nargs="?", default=None,
            help="model file with build_model(), example_inputs() and datasets() (default: built-in MNIST-1D MLP)"),
        arg("--out", metavar="DIR", default=None, type=_path, help="output folder (default: runs/<model name>)"),
        _config_file_arg(),
        *config_args(TrainConfig),
        *config_args(PBConfig),
        *_site_filter_args(),
        arg("--no-progress", action="store_true", help="no progress bar"),
        arg("--device", default=None, choices=("auto", "cpu", "cuda"),
            help="where training runs: auto (a CUDA GPU when torch sees one for every process, else the CPU), cpu, "
                 "or cuda (refused without one) (default: auto; with --resume, the run's own)"),
        arg("--nproc", type=_number(int), default=None, metavar="N",
            help="train on N local processes with torchrun and DDP (gloo on CPU, nccl on GPU); "
                 "--batch-size stays the global batch (default: 1; with --resume, the run's own)"),
        arg("--dist-timeout", type=_number(float), default=None, metavar="SECONDS",
            help="with --nproc: how long a process waits for the others before it stops (default: 300)"),
        arg("--resume", metavar="DIR", default=None,
            help="continue the run whose --out folder is DIR, with its own settings (from its last epoch); "
                 "a model file given with it is the run's own at a new path"),
    )


@subcommand("train", "train a model file's model with Perforated Backpropagation (default: MNIST-1D MLP)",
            *_train_args())
def train(args: argparse.Namespace) -> int:
    from .distributed import (DEFAULT_TIMEOUT, Distributed, launch, stop_with_launcher, timeout_problem,
                              torchrun_world_size)
    from .job import refuse_unrunnable, saved_run, train_job
    from .training import training_device

    if args.nproc is not None and args.nproc < 1:
        raise PBError(f"--nproc {args.nproc}: must be at least 1")
    problem = None if args.dist_timeout is None else timeout_problem(args.dist_timeout)
    if problem:
        raise PBError(f"--dist-timeout {args.dist_timeout:g}: {problem}")
    world = torchrun_world_size()
    if args.resume is not None:
        given = [f for f, v in vars(args).items() if v is not None and (f in _SETTING_DESTS or f == "out")]
        if given:
            flag = _flag_of(given[0], getattr(args, given[0]))
            raise PBError(f"--resume continues a run in its own folder with its own settings ({flag} given): give "
                          "--resume DIR alone (and the model file, if it moved)")
        config = None
        if world == 1:  # the launcher checks the run before it starts any process (each would say the same)
            saved = saved_run(args.resume)
            training = saved.training
            if args.nproc is None:  # the run's own process count, as its other settings
                args.nproc = saved.processes or 1
            if args.device is None:  # the run's own device, as its process count
                args.device = saved.device
        else:
            training = None
    else:
        config, training = configs_from_args(args)
    args.nproc = 1 if args.nproc is None else args.nproc
    if args.dist_timeout is not None and args.nproc == 1 and world == 1:
        raise PBError(f"--dist-timeout {args.dist_timeout:g} is for training on several processes: add --nproc N "
                      "(N >= 2), or drop it")
    # (refused here, before any process starts; each rank then finds the same device type, and rank 0
    # says what the launcher would say again)
    with warnings.catch_warnings():
        if args.nproc > 1 and world == 1:
            warnings.simplefilter("ignore")
        device = training_device(args.device or "auto", max(args.nproc, world))
    if args.nproc > 1 and world == 1:
        # The launcher: the same command on N processes (each sees torchrun's environment).
        if args.resume is None:  # (before the processes start; rank 0 gives the model file's warnings)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                refuse_unrunnable(args.model, config, args.out or os.path.join("runs", run_name(args.model)))
        if training.batch_size % args.nproc:
            if args.resume is not None:  # its batch is the run's own: the process count is what can change
                raise PBError(f"--nproc {args.nproc}: the run in {args.resume} trains with a global batch of "
                              f"{training.batch_size}, which {args.nproc} processes cannot split evenly: resume it "
                              "with an --nproc that divides it (the count it was started with keeps its data order)")
            raise PBError(f"--batch-size {training.batch_size} is the global batch: it must be divisible by "
                          f"--nproc {args.nproc}")
        try:
            launched = launch(args.nproc, ["train", *_train_argv(args)], quiet=not args.debug)
        except KeyboardInterrupt as exc:  # the ranks stopped, rank 0 saying where the run stands
            # (stopped before any rank could say it: while they start)
            return _stopped(type(exc), said=not getattr(exc, "rank_lines", 0))
        if launched.status == 0:
            return EXIT_OK
        if launched.errors_printed:  # (the ranks' errors, each distinct line once: nothing to add)
            return EXIT_ERROR
        raise PBError(f"training on {args.nproc} processes failed (torchrun exit status {launched.status}): "
                      "see the lines above")
    if world > 1:
        stop_with_launcher()  # (a rank of `pbp-fx train --nproc N` ends when that command is killed)
    distributed = Distributed.init("nccl" if device.type == "cuda" else "gloo",
                                   timeout=DEFAULT_TIMEOUT if args.dist_timeout is None else args.dist_timeout) \
        if world > 1 else None
    name = run_name(args.model)
    try:
        if args.resume is not None:
            train_job(args.model, resume=args.resume, progress=not args.no_progress, distributed=distributed,
                      device=device)
        else:
            train_job(args.model, config=config, training=training, out=args.out or os.path.join("runs", name),
                      include=args.include, exclude=args.exclude, progress=not args.no_progress,
                      distributed=distributed, device=device)
    except PBError as exc:
        if distributed is None or str(exc).startswith(f"rank {distributed.rank} "):
            raise
        raise PBError(f"rank {distributed.rank}: {exc}") from exc  # which process said it
    if distributed is not None:
        distributed.close()
    return EXIT_OK


def _flag_of(dest: str, value=None) -> str:
    """The command-line flag that gave an argparse dest its value (False: the --no- form)."""
    if dest == "config_file":
        return "--config"
    return ("--no-" if value is False else "--") + dest.replace("_", "-")


def _setting_dests() -> frozenset:
    from .config import PBConfig, TrainConfig, cli_fields

    return (frozenset(f.name for cls in (PBConfig, TrainConfig) for f in cli_fields(cls))
            | {"include", "exclude", "config_file"})


_SETTING_DESTS = _setting_dests()


def _check_onnx_name(out: str) -> None:
    """-o names an .onnx file (as run's --output names an .npy or .npz one)."""
    if not out.lower().endswith(".onnx"):
        stem = os.path.splitext(out)[0]
        raise PBError(f"-o {out}: an ONNX file's name ends in .onnx; give one, e.g. -o "
                      f"{stem if os.path.basename(stem) else os.path.join(stem, 'model')}.onnx")


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
        elif isinstance(kw.get("action"), type) and issubclass(kw["action"], argparse.BooleanOptionalAction):
            out += [] if value is None else [flags[-1] if value else "--no-" + flags[-1][2:]]
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

    from .modelfile import check_contract, load_model_file

    if ref.endswith(".py") or os.sep in ref:
        return load_model_file(ref, as_script=True)
    try:
        mod = importlib.import_module(ref)
    except ImportError as exc:
        raise PBError(f"model {ref!r} is neither a model file nor an importable module: pass --model FILE") from exc
    try:
        return check_contract(mod, f"module {ref!r}")
    except PBError as exc:  # (`--model json`: a module, but no model's)
        raise PBError(f"{exc}; pass the model file with --model FILE") from None


@subcommand(
    "export", "write an ONNX file (fused pbp ops) from a training checkpoint or a model file",
    arg("source", help="checkpoint.safetensors from `pbp-fx train`, or a model file (exported with K = 0)"),
    arg("-o", "--out", default="model.onnx", type=_path, help="ONNX file to write (default: model.onnx)"),
    arg("--model", metavar="FILE", default=None, help="the model file a checkpoint was trained from "
        "(default: the one recorded in the checkpoint)"),
    arg("--unfused", action="store_true", help="plain standard ops instead of one pbp node per site"),
    arg("--opset", type=_number(int), default=None, metavar="N",
        help="default-domain ONNX opset (default: 18, or 19 when a site's conv pads circularly)"),
    arg("--static-batch", action="store_true", help="fixed batch size instead of a dynamic batch axis"),
    arg("--dynamic-axis", type=_dynamic_axis, action="append", default=[], metavar="INPUT:DIM=NAME",
        help="one more dynamic axis besides the batch: dim DIM of input INPUT (forward's parameter name, or "
        "its position) as the axis NAME; repeat the flag; dims of one NAME take one size, e.g. "
        "--dynamic-axis input_ids:1=sequence --dynamic-axis attention_mask:1=sequence"),
    arg("--keep-clip", action="store_true", help="write a bounded ReLU (ReLU6) after a site as Clip; by default it "
        "is HardSigmoid with the bound folded into its readers' weights, which ONNX Runtime fuses"),
    arg("--keep-output-weight", action="store_true", help="keep each site's first output weight V[0] in its node; by "
        "default, where a site's output goes through nothing or a Relu / LeakyRelu into linear layers only, V[0] "
        "is folded into their weights (one per-channel scale pass less per site)"),
    arg("--check", action="store_true", help="run the file in ONNX Runtime and compare with PyTorch"),
    arg("--frontend", default="auto", choices=FRONTENDS,
        help=f"how the model file's model is captured: {FRONTEND_HELP} (default: auto)"),
)
def export(args: argparse.Namespace) -> int:
    import onnx
    import torch

    from .exporters import export_onnx
    from .exporters.onnx import MAX_OPSET, MIN_OPSET, NOT_LOADED_FOR_CHECKS, check_dynamic_axes
    from .modelfile import example_kwargs, instantiate
    from .perforated import perforate

    newest = min(onnx.defs.onnx_opset_version(), MAX_OPSET)  # (MAX_OPSET: the newest torch.onnx reaches reliably)
    if args.opset is not None and not MIN_OPSET <= args.opset <= newest:
        raise PBError(f"--opset {args.opset}: must be from {MIN_OPSET} to {newest}")
    if os.path.isdir(args.source):
        raise PBError(f"{args.source} is a folder: pass a checkpoint in it "
                      f"({os.path.join(args.source, 'checkpoint.safetensors')}) or a model file")
    if not os.path.exists(args.source):
        raise PBError(f"{args.source} does not exist: pass a checkpoint or a model file")
    if args.model is not None and args.source.endswith(".py"):
        raise PBError(f"--model names a checkpoint's model file, and {args.source} is a model file itself: drop "
                      "--model, or pass a checkpoint")
    if args.model is not None and not os.path.exists(args.model) and args.model.endswith(".py"):
        raise PBError(f"--model {args.model} does not exist: pass the model file the checkpoint was trained from")
    check_output_file(args.out, "-o", reads=(args.source, args.model), example="model.onnx")
    axes: dict = {}
    for key, dim, axis in args.dynamic_axis:
        if dim in axes.get(key, {}):
            raise PBError(f"--dynamic-axis gives dim {dim} of input {key!r} twice: give it once")
        axes.setdefault(key, {})[dim] = axis
    check_dynamic_axes(axes)
    with _quiet_unless(args.debug):  # tracing and exporter warnings are for --debug
        if args.source.endswith(".py"):
            _check_onnx_name(args.out)
            mod = _model_module(args.source)
            model, inputs = instantiate(mod)
            kwargs = example_kwargs(mod)
            pm = perforate(model, inputs, example_kwargs=kwargs, frontend=args.frontend)
            meta = {}
        else:
            from .checkpoint import in_model_dtype, load, read_meta

            meta = read_meta(args.source)
            ref = args.model or meta.get("model") or meta.get("extra", {}).get("model")
            if not ref:
                raise PBError(f"checkpoint {args.source} does not record its model file: pass --model FILE")
            if args.model is None and ref.endswith(".py") and not os.path.exists(ref):  # (or a module name)
                raise PBError(f"checkpoint {args.source} was trained from {ref}, which does not exist now: pass the "
                              "model file with --model FILE")
            check_output_file(args.out, "-o", reads=(ref,), example="model.onnx")  # (the file the checkpoint names)
            _check_onnx_name(args.out)
            _warn_edited_model_file(args.source, meta, ref)
            captured = (meta.get("capture") or {}).get("captured_with")
            if args.frontend != "auto" and captured is not None and captured != args.frontend:
                raise PBError(f"checkpoint {args.source} was captured with {captured}; --frontend {args.frontend} "
                              "would capture another graph: drop --frontend (the checkpoint's capture is used)")
            mod = _model_module(ref)
            model, inputs = instantiate(mod)
            kwargs = example_kwargs(mod)
            if args.frontend != "auto" and captured is None:
                # A format-1 checkpoint records no capture: --frontend says how. Otherwise load rebuilds it as it
                # was captured (that frontend, its mode and dynamic shapes), which --frontend can only repeat.
                structure = meta["structure"]
                model = perforate(model, inputs, example_kwargs=kwargs, frontend=args.frontend,
                                  include=[s["name"] for s in structure["sites"]], activation=structure["activation"],
                                  mode=structure["mode"])
            pm = load(args.source, model, inputs, example_kwargs=kwargs)
            inputs, kwargs = in_model_dtype(pm, inputs, kwargs)  # a float64 checkpoint comes back in float64
        pm.eval()
        if pm.phase == "dendrite":
            pm.abort_dendrite_phase()
            print("note: the checkpoint is inside a dendrite phase: its candidates are not dendrites yet, so the file "
                  "has the dendrites installed before it")
        else:
            _note_unfinished_run(meta.get("controller"))
        with warnings.catch_warnings():
            if args.check:  # (its own session says why ONNX Runtime cannot load the file, as the error)
                warnings.filterwarnings("ignore", message=re.escape(NOT_LOADED_FOR_CHECKS))
            path = export_onnx(pm, inputs, args.out, fused=not args.unfused, dynamic_batch=not args.static_batch,
                               opset=args.opset, fold_clip=not args.keep_clip,
                               fold_output_weight=not args.keep_output_weight, example_kwargs=kwargs,
                               dynamic_axes=axes)
    print(f"wrote {path}: {'unfused' if args.unfused else 'fused'}, dendrites per site "
          f"{json.dumps(pm.num_dendrites)}")
    if args.check:
        try:
            _check_export(args, pm, path, inputs, kwargs)
        except PBError as exc:  # the file is whole: say that it stays
            raise PBError(f"{exc} ({path} is written; run without --check to keep it without this check)") from exc
    return EXIT_OK


def _warn_edited_model_file(checkpoint: str, meta: dict, ref: str) -> None:
    """A train run's checkpoint whose model file's content is not the one it trained: its weights
    then go into other code."""
    from .job import digest_matches

    identity = ((meta.get("extra") or {}).get("job_state") or {}).get("identity") or {}
    if ref.endswith(".py") and identity.get("model_digest") and not digest_matches(identity, ref):
        warnings.warn(f"{ref} changed since the run in checkpoint {checkpoint} trained it: the file exports its "
                      "weights in the current code, which may compute another function; restore the file the run "
                      "trained to export that run", PBWarning, stacklevel=2)


def _note_unfinished_run(controller: Optional[dict]) -> None:
    """Say so when a checkpoint of an unfinished run (a neuron phase) holds weights other than its best."""
    schedule = (controller or {}).get("schedule") or {}
    if schedule and not schedule.get("done") and schedule.get("best_epoch") not in (None, schedule.get("epoch")):
        print(f"note: the checkpoint is of an unfinished run, at epoch {schedule['epoch']}: the file has its latest "
              f"weights, not its best-validation ones (epoch {schedule['best_epoch']}, which the run's end restores); "
              "finish the run (pbp-fx train --resume) to export those")


def _check_export(args: argparse.Namespace, pm, path: str, inputs: tuple, kwargs: dict) -> None:
    """export --check: the file in ONNX Runtime against PyTorch, within `output_difference`'s bounds."""
    import torch

    from .exporters import ort_session, run
    from .exporters.ort import output_difference
    from .exporters.onnx import check_other_sizes, flat_call, graph_inputs

    with _quiet_unless(args.debug), torch.no_grad():  # the same warnings as above: for --debug
        final, flat = flat_call(pm.finalize(), graph_inputs(pm, inputs, kwargs))  # (the file's inputs: a dict's leaves)
        session = ort_session(path)
        feeds = [t for t in flat if isinstance(t, torch.Tensor)]
        got = run(session, tuple(t.numpy() for t in feeds))
        # every tensor of a structured output (dict, tuple), in the order the exporter flattens it
        refs = [t for t in torch.utils._pytree.tree_leaves(pm(*inputs, **kwargs)) if isinstance(t, torch.Tensor)]
    if len(got) != len(refs):
        raise PBError(f"the exported model has {len(got)} output(s) where PyTorch gives {len(refs)} tensor(s): "
                      "report this as a bug")
    floats = [r for r in refs if r.is_floating_point() and r.numel()]
    if floats and not any(bool(torch.isfinite(r).any()) for r in floats):  # (NaN against NaN "matched" exactly)
        raise PBError("--check: every output is NaN/Inf at the example inputs, so nothing could be compared: give "
                      "example inputs that hold finite values (the model file's example_inputs)")
    # each output within its own bound; the one nearest (or most over) it is shown
    checks = [output_difference(torch.as_tensor(g), r) for g, r in zip(got, refs)]
    diff, tol = max(checks, key=lambda c: c[0] / c[1] if c[1] else (0.0 if c[0] == 0 else math.inf),
                    default=(0.0, 0.0))
    print(f"check: ONNX Runtime ({session.provider}) vs PyTorch max abs diff {diff:.2e} (tolerance {tol:.2e})")
    if not all(d <= t for d, t in checks):
        raise PBError(f"exported model differs from PyTorch by {diff:.2e} (> {tol:.2e}): report this as a bug")
    with _quiet_unless(args.debug):
        sizes, problem, unchecked, _ = check_other_sizes(session, final, flat)
    if problem is not None:  # (the named axes passed the export's own check: the batch is left)
        raise PBError(f"{problem}: export with --static-batch")
    if unchecked is not None:
        print(f"check: not at {sizes} (twice the example's sizes on the dynamic axes): {unchecked}")
    elif sizes:
        print(f"check: the same function at {sizes} (twice the example's sizes on the dynamic axes)")


def _write_npz(f, arrays: dict) -> None:
    """An .npz of `arrays` by name, as np.savez writes it, but not through keyword arguments: an
    output named `file` or `allow_pickle` would be taken as savez's own argument."""
    import zipfile

    import numpy as np

    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, array in arrays.items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


# How `pbp-fx export` makes a fixed size dynamic: the fix a shape refusal names (`check_shapes`).
_CLI_SHAPE_FIXES = {"batch": "export without --static-batch to make the batch dynamic",
                    "dim": "export with --dynamic-axis {input}:{dim}=NAME to make that dim dynamic"}


def _is_npy(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(6) == b"\x93NUMPY"


_ORT_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
              "tensor(bfloat16)": "bfloat16", "tensor(int64)": "int64", "tensor(int32)": "int32",
              "tensor(int16)": "int16", "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


@subcommand(
    "run", "run an ONNX file in ONNX Runtime on .npy inputs",
    arg("model", help="an .onnx file"),
    arg("--input", action="append", required=True, metavar="X.npy", help="one per model input, in order"),
    arg("--device", default="auto", choices=("auto", "cpu", "cuda"),
        help="ONNX Runtime's execution provider: auto (CUDA when onnxruntime-gpu and a GPU are present, else "
             "the CPU), cpu, or cuda (refused without them; default: auto)"),
    arg("--output", metavar="Y.npy", default=None, type=_path,
        help="save the first output here (.npy), or every output by its ONNX name (.npz)"),
)
def run_onnx(args: argparse.Namespace) -> int:
    import numpy as np

    from .exporters import RuntimeUnavailableError, ort_session, run
    from .exporters.ort import check_shapes, one_line
    from .fileio import atomic_write

    if os.path.isdir(args.model):
        raise PBError(f"{args.model} is a directory: pass the .onnx file (pbp-fx export writes one)")
    if not os.path.isfile(args.model):
        raise PBError(f"ONNX file {args.model} does not exist")
    if args.output:
        if os.path.splitext(args.output)[1].lower() not in (".npy", ".npz"):
            raise PBError(f"--output {args.output}: name it .npy (the first output) or .npz (every output by name)")
        check_output_file(args.output, "--output", reads=(args.model, *args.input), example="y.npy")
    arrays = []
    for name in args.input:
        try:
            array = np.load(name, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:  # (EOFError: an empty file)
            if os.path.isfile(name) and not _is_npy(name):  # (whatever its name says: a text file named .npy)
                raise PBError(f"--input {name} is not a .npy file: save each input array with numpy.save") from exc
            if "pickle" in str(exc):  # numpy's advice (load it unsafely) is none for a command line
                raise PBError(f"--input {name} holds Python objects (an object array), not numbers: save a numeric "
                              "array with numpy.save") from exc
            raise PBError(f"cannot read input {name}: {one_line(str(exc)) or type(exc).__name__} "
                          "(save it with numpy.save)") from exc
        if not isinstance(array, np.ndarray):  # a zip file: an .npz archive, or torch.save's
            members = list(array.files)
            array.close()
            if any(m.endswith("data.pkl") for m in members):
                raise PBError(f"--input {name} is a torch.save file, not a .npy array: save each input with numpy.save "
                              "(numpy.save(path, tensor.numpy()))")
            raise PBError(f"--input {name} is an .npz archive, not one array: save each input array with numpy.save")
        arrays.append(array)
    try:
        session = ort_session(args.model, device=args.device)
    except RuntimeUnavailableError as exc:  # its advice in the command's own flags
        raise PBError(str(exc).replace("device='cuda'", "--device cuda").replace("device='cpu'", "--device cpu")) \
            from exc
    except PBError:
        raise
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own errors, one line
        raise PBError(f"ONNX Runtime cannot load {args.model}: {one_line(str(exc))}") from exc
    specs = session.get_inputs()
    if len(arrays) != len(specs):
        raise PBError(f"{len(arrays)} --input given, {args.model} takes {len(specs)} "
                      f"({', '.join(s.name for s in specs)}): pass one .npy per input, in order")
    for name, array, spec in zip(args.input, arrays, specs):
        want = _ORT_TYPES.get(spec.type)
        if want is not None and str(array.dtype) != want:
            raise PBError(f"input {name} is {array.dtype} but {args.model} input {spec.name!r} takes {want}: "
                          f"save it as {want} (array.astype(numpy.{want}))")
    check_shapes(arrays, specs, args.input, args.model, _CLI_SHAPE_FIXES)
    try:
        outputs = run(session, tuple(arrays))
    except PBError:
        raise
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own errors, one line
        empty = next(((name, a.shape) for name, a in zip(args.input, arrays) if 0 in a.shape), None)
        # ORT's own report names an internal node's shapes, not the input: said instead where one
        # of those shapes has an empty axis ("Input shape:{0,8}, requested shape:{0,2,-1}").
        if empty is not None and re.search(r"\{(?:[-\d]+,)*0(?:,[-\d]+)*\}", one_line(str(exc))):
            raise PBError(f"ONNX Runtime could not run {args.model} on input {empty[0]} of shape {empty[1]}, which "
                          "is empty: give at least one sample (ONNX's Reshape reads a 0 in a shape as \"keep "
                          "this axis\", so many exported models cannot take an empty axis)") from exc
        raise PBError(f"ONNX Runtime could not run {args.model}: {one_line(str(exc))}") from exc
    print(f"provider: {session.provider}")
    for out, y in zip(session.get_outputs(), outputs):
        flat = ", ".join(f"{v:.5g}" for v in np.asarray(y).reshape(-1)[:6])
        print(f"output {out.name}: shape {list(np.shape(y))} dtype {np.asarray(y).dtype} "
              f"[{flat}{', ...' if np.size(y) > 6 else ''}]")
    if args.output:
        names = [o.name for o in session.get_outputs()]

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save(z) would append .npy (.npz) to a path
                if args.output.lower().endswith(".npz"):
                    _write_npz(f, dict(zip(names, outputs)))
                else:
                    np.save(f, outputs[0], allow_pickle=False)

        atomic_write(args.output, write, what="output")
        print(f"wrote {args.output}")
    return EXIT_OK


# -- compare -----------------------------------------------------------------------------
def _arm_list(text: str) -> list[str]:
    from .compare import ARMS

    arms = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise argparse.ArgumentTypeError(f"{bad[0] if bad else text!r} is not an arm: use a comma-separated "
                                         f"list of {', '.join(ARMS)}")
    return arms


def _compare_budget_args() -> tuple:
    """train's budget and PB flags, generated from TrainConfig and PBConfig like train's."""
    from .config import PBConfig, TrainConfig

    # (compare trains each arm in its own mode: --mode gd is refused, saying so)
    helps = {"mode": "pb only: compare trains each arm in its own mode, chosen with --arms (pb, gd, ...)"}
    return (_config_file_arg(), *config_args(TrainConfig), *config_args(PBConfig, helps), *_site_filter_args())


@subcommand(
    "compare", "did PB pay? train plain, restarts, pb, gd and a parameter-matched plain model alike and compare",
    arg("model", nargs="?", default=None,
        help="model file with build_model(), example_inputs() and datasets() (default: built-in MNIST-1D MLP)"),
    arg("--width", type=_number(float), default=1.0, metavar="W",
        help="width multiplier of every arm's model (< 1 adds the original at width 1; default: 1)"),
    arg("--seeds", type=_number(int), default=None, metavar="N", help="model seeds per arm (default: 3)"),
    arg("--arms", type=_arm_list, default=None, metavar="A,B",
        help="comma-separated subset of plain,restarts,pb,gd,plain-matched,original (default: all that apply)"),
    arg("--jobs", type=_number(int), default=1, metavar="N", help="runs side by side (default: 1)"),
    arg("--no-latency", action="store_true", help="skip the ONNX Runtime latency of each run"),
    arg("--out", metavar="DIR", default=None, type=_path,
        help="output folder (default: the --pb-run folder, else runs/compare_<model name>)"),
    arg("--pb-run", metavar="DIR", default=None,
        help="the --out folder of a finished `pbp-fx train` run: it is the pb arm; its model, settings and seed "
             "are used (default arms: plain,restarts)"),
    *_compare_budget_args(),
)
def compare_cmd(args: argparse.Namespace) -> int:
    from .compare import compare

    config, training = configs_from_args(args)
    name = run_name(args.model)
    if args.pb_run is not None:
        given = sorted(f for f, v in vars(args).items() if v is not None and f in _SETTING_DESTS)
        if given:  # (a model file is the run's own at a new path: its content is checked)
            flag = _flag_of(given[0], getattr(args, given[0]))
            raise PBError(f"--pb-run uses the run's own settings ({flag} given): drop it")
        config = training = None
    compare(args.model, width=args.width, seeds=args.seeds, arms=args.arms, config=config, training=training,
            out=args.out or args.pb_run or os.path.join("runs", f"compare_{name}"), jobs=args.jobs,
            include=args.include, exclude=args.exclude, latency=not args.no_latency, pb_run=args.pb_run)
    return EXIT_OK


def _version() -> str:
    from . import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
