"""Error types. Each message is one line naming the problem and what to do about it."""

__all__ = ["PBError", "TraceError", "ExampleInputsError", "NoSitesError", "ModelFileError", "CheckpointError",
           "TrainingError", "TargetError", "PhaseError", "DataError", "PBWarning", "Terminated", "exited"]


class PBWarning(UserWarning):
    """A warning pbp-fx gives about the user's model, data or run (filter it by this class; the CLI
    shows it while it hides the libraries' own warnings)."""


def exited(exc: SystemExit) -> str:
    """The one line for a sys.exit that the model file's code (or a library it calls) ran inside a command."""
    return (f"the model file's code (or a library it calls) called sys.exit({exc.code!r}): its functions must return "
            "or raise an exception, not end the process (--debug shows where)")


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a job scheduler's stop): handled as Ctrl-C is, so that a run says what its
    checkpoint holds and how to resume it, and exits 143."""


class PBError(Exception):
    """Base class of the errors pbp-fx reports to users (the CLI prints them on one line)."""


class TraceError(PBError):
    """The model (or a part of it that cannot be isolated) does not trace."""


class ExampleInputsError(TraceError):
    """The model itself fails on the example inputs given to capture it."""


class NoSitesError(PBError):
    """No Linear/Conv neuron sites were found (or all were excluded)."""


class ModelFileError(PBError):
    """A model file is missing, does not import, or breaks the model.py contract."""


class CheckpointError(PBError):
    """A checkpoint is missing, corrupted, or belongs to another model."""


class TrainingError(PBError):
    """Training cannot go on (empty dataset, non-finite loss, bad settings)."""


class NonFiniteError(TrainingError):
    """A NaN/Inf loss, weight or correlation statistic: the phase stops and the last good state returns."""


class NonFiniteDataError(NonFiniteError):
    """NaN/Inf in the data itself: evaluating the restored model would meet it again."""


class NonFiniteLossError(NonFiniteError):
    """A training batch's loss is NaN/Inf (`loss`: its value); `diverged`: taken for diverged weights
    (False: the data's or the loss's doing, on evidence: see training._non_finite_loss)."""

    def __init__(self, loss: float, message: str, diverged: bool):
        super().__init__(message)
        self.loss, self.diverged = loss, diverged


class TargetError(TrainingError, ValueError):
    """The model's output and the targets do not fit the built-in loss or metric: give fit your own."""


class PhaseError(PBError, RuntimeError):
    """A call the model's current phase does not take (start_dendrite_phase in a dendrite phase)."""


class DataError(TrainingError):
    """A batch of a dataset could not be made (a sample of another shape, a read that failed)."""


# Packages whose frames a warning skips to point at the user's line: pbp-fx's own and the
# frameworks that call into it (imported or not: only their names are compared).
_FRAMEWORKS = ("pbp_fx", "passes", "exporters", "torch", "lightning", "pytorch_lightning", "transformers", "accelerate")


def warn_at_user(message: str, category: type = PBWarning) -> None:
    """warnings.warn attributed to the first calling frame outside pbp-fx and the frameworks
    around it (the user's line), however deep the call came from."""
    import os
    import sys
    import warnings

    roots = set()
    for name in _FRAMEWORKS:
        module = sys.modules.get(name) or sys.modules.get(f"pbp_fx.{name}")
        if module is not None and getattr(module, "__file__", None):
            roots.add(os.path.dirname(os.path.abspath(module.__file__)) + os.sep)
    frame, level = sys._getframe(1), 2
    while frame is not None and any(os.path.abspath(frame.f_code.co_filename).startswith(r) for r in roots):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


# A folder (set by `distributed.launch` for its ranks) where each rank leaves its error line for the launcher.
RANK_ERRORS = "PBP_FX_RANK_ERRORS"


# What a rank says when a collective broke because another rank is gone (distributed.Distributed.explain).
LOST_CONTACT = "lost contact with the other ranks"


def keep_rank_error(line: str) -> bool:
    """In a rank that `launch` started: leave `line` for the launcher to print (the same error on
    every rank then prints once) and return True; elsewhere False (the caller prints it)."""
    import os

    folder, rank = os.environ.get(RANK_ERRORS), os.environ.get("RANK")
    if not folder or rank is None or not os.path.isdir(folder):
        return False
    try:
        with open(os.path.join(folder, f"rank{int(rank)}"), "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except (OSError, ValueError):
        return False
    return True


def rank_errors(folder: str, nproc: int) -> list[str]:
    """The lines ranks 0..nproc-1 left in `folder` (keep_rank_error), in rank order, each distinct
    line once; "rank R: " lines that say the same of several ranks become one "ranks 0, 1: " line; a
    bare "terminated" (a rank stopped because another failed) only when no line says more."""
    import os
    import re

    said: dict[tuple, list] = {}  # (line head, text) -> the ranks that said it
    stops = []  # the ranks that said only that they were stopped
    for rank in range(nproc):
        try:
            with open(os.path.join(folder, f"rank{rank}"), encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f if line.strip()]
        except OSError:
            continue
        if lines and all(_is_stop(line) for line in lines):
            stops.append(rank)
        for line in lines:
            named = re.match(r"(.*?)rank (\d+): (.*)", line)
            key = (named.group(1), named.group(3)) if named else (line, None)
            ranks = said.setdefault(key, [])
            if named and int(named.group(2)) not in ranks:
                ranks.append(int(named.group(2)))
    out = []
    for (head, text), ranks in said.items():
        if text is None:
            out.append(head)
        else:
            who = "every rank" if len(ranks) == nproc > 1 else ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(
                map(str, ranks))
            out.append(f"{head}{who}: {text}")
    # A rank stopped alone (a SIGTERM to its process): the others only lost contact with it, and its stop
    # (with where the run stands) is the one thing to say, naming it.
    lost = [line for line in out if LOST_CONTACT in line]
    if stops and lost and all(line in lost or _is_stop(line) for line in out):
        line = next(line for line in out if _is_stop(line))
        head, _, what = line.partition("error: ")
        who = ("rank " if len(stops) == 1 else "ranks ") + ", ".join(map(str, stops))
        return [f"{head}error: {who} alone {'was' if len(stops) == 1 else 'were'} {what}"]
    # A bare "terminated" is a rank that torchrun stopped because another failed: that one's line says why.
    bare = [line for line in out if line.rstrip().endswith(("error: terminated", "error: interrupted"))]
    out = [line for line in out if line not in bare] if len(bare) < len(out) else out
    return _latest_stop(out)


def _latest_stop(lines: list[str]) -> list[str]:
    """Every rank stopped, some an epoch after others (the stop came as rank 0's checkpoint was done): one line,
    the latest epoch's. Rank 0 writes each checkpoint before the others return from saving it, so the file holds
    at least the epochs any rank counted."""
    import re

    stops = [re.fullmatch(r"(.*after epoch )(\d+)(.*)", line) for line in lines]
    if len(lines) < 2 or not all(stops) or not all(_is_stop(line) for line in lines):
        return lines
    if len({(m.group(1), m.group(3)) for m in stops}) > 1:
        return lines
    return [max(stops, key=lambda m: int(m.group(2))).group(0)]


def _is_stop(line: str) -> bool:
    """A line that says its process was stopped ("terminated" or "interrupted", maybe with where the run stands)."""
    return line.partition("error: ")[2].startswith(("terminated", "interrupted"))
