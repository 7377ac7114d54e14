"""Ctrl-C and SIGTERM that stop a command even where Python discards the exception they raise.

A signal's handler runs between any two bytecodes, also inside a garbage collector's callback or a
`__del__`, where Python prints the KeyboardInterrupt as "Exception ignored in ..." and goes on: a
training run then trained to its end and exited 0. `interrupts_kept` notes such a loss and sends the
signal again shortly (from another thread, once the callback has returned), and records every
signal it handled, so that code which swallowed one (a library's `except BaseException`) can still
stop. The state lives in the installed handler (a bound method), so a nested use shares the outer
one's; nothing is global.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

from .errors import Terminated

__all__ = ["Interrupts", "interrupts_kept", "stop_received", "stops_held", "import_torch_with_stops_held",
           "RESEND_SECONDS"]

RESEND_SECONDS = 0.05  # a lost signal's resend: after the callback that lost it has returned


class Interrupts:
    """What `interrupts_kept` saw: `received`, the exceptions its handlers raised (KeyboardInterrupt,
    Terminated), in order; `lost`, the last one Python discarded, or None; `ended`: the block has
    ended (a signal now stops nothing)."""

    def __init__(self):
        self.received: list[type] = []
        self.lost: Optional[type] = None
        self.ended = False
        self._resend: list[threading.Timer] = []

    def _handle(self, signum, _frame) -> None:
        if self.ended:
            return
        for timer in self._resend:  # (a resend of a lost one still pending would land in the stop this starts)
            timer.cancel()
        exc = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.received.append(exc)
        raise exc()

    def _note_lost(self, exc: BaseException) -> None:
        self.lost = type(exc)
        signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        timer = threading.Timer(RESEND_SECONDS, os.kill, (os.getpid(), signum))
        timer.daemon = True
        self._resend.append(timer)
        timer.start()


@contextmanager
def stops_held(deliver: bool = True) -> Iterator[list]:
    """Ctrl-C and SIGTERM held back for the block, on the main thread: work that must end whole or not start
    (a report's files written together) is not cut in the middle. Yields the list of the signals held. After
    the block the first is delivered to the handler it had (raised after it), or, with deliver=False, dropped:
    the work it would have stopped is done. Held in Python, not by blocking the signal: a process-directed
    signal goes to any thread that does not block it (pytest-xdist's, a DataLoader's), whose handler call
    still runs here. A handler not installed from Python (None) is left as it is."""
    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return
    stops = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not None]
    previous = {s: signal.signal(s, lambda signum, _frame: pending.append(signum)) for s in stops}
    try:
        yield pending
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending and deliver:
            handler = previous[pending[0]]
            if callable(handler):
                handler(pending[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), pending[0])  # (SIGTERM's default: the process ends, as it would have)


def import_torch_with_stops_held(*modules: str) -> None:
    """`import torch` (and `modules`, torch's own: the agent's torch.distributed.run) with Ctrl-C and SIGTERM
    held back until it is done, then delivered (raised after it): one inside it left torch half-imported (its
    next import failed) or aborted the process in its C++ initialisation (exit -6). Used by the CLI and the
    --nproc agent and ranks."""
    names = ("torch", *modules)
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        for name in names:
            importlib.import_module(name)
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        for name in names:
            importlib.import_module(name)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def stop_received() -> Optional[type]:
    """The first stop signal's exception type (KeyboardInterrupt, Terminated) that the installed
    `interrupts_kept` handled, else None: an error after it may be its consequence (an `import torch`
    it interrupted fails again as "cannot load module more than once per process")."""
    seen = getattr(signal.getsignal(signal.SIGINT), "__self__", None)
    return seen.received[0] if isinstance(seen, Interrupts) and seen.received else None


@contextmanager
def interrupts_kept(sigterm: bool = True) -> Iterator[Interrupts]:
    """Handle Ctrl-C (KeyboardInterrupt) and, with `sigterm`, SIGTERM (Terminated, exit 143 by the CLI)
    for the block, as `Interrupts` says. A signal whose handler is not Python's default (ignored, as in
    a background job, or the caller's own) is left as it is; so is everything off the main thread."""
    outer = getattr(signal.getsignal(signal.SIGINT), "__self__", None)
    if isinstance(outer, Interrupts):
        yield outer  # (nested: the outer block's handlers serve)
        return
    seen = Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return
    handled = [s for s, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL))
               if (s == signal.SIGINT or sigterm) and signal.getsignal(s) is default]
    if not handled:
        yield seen
        return
    previous = {s: signal.signal(s, seen._handle) for s in handled}
    unraisable = sys.unraisablehook

    def note_lost(info) -> None:
        exc = info.exc_value
        raised_here = isinstance(exc, KeyboardInterrupt) and (
            signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT) in handled
        if not raised_here or seen.ended:
            unraisable(info)
            return
        seen._note_lost(exc)

    sys.unraisablehook = note_lost
    try:
        yield seen
    finally:
        seen.ended = True  # (a resend under way reaches a handler that stops nothing, not the default's)
        for timer in seen._resend:
            timer.cancel()
            timer.join()
        sys.unraisablehook = unraisable
        for s, handler in previous.items():
            signal.signal(s, handler)
