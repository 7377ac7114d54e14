"""pbp_fx.signals: Ctrl-C and SIGTERM stop a block even where Python discards their exception."""
import os
import signal
import sys
import time

import pytest

from pbp_fx.errors import Terminated
from pbp_fx.signals import RESEND_SECONDS, Interrupts, interrupts_kept, stops_held


class _InterruptedInDel:
    def __init__(self, signum):
        self.signum = signum

    def __del__(self):
        os.kill(os.getpid(), self.signum)
        sum(range(10_000))  # (the handler runs here: Python prints "Exception ignored in" and goes on)


def test_an_ignored_or_own_sigint_handler_is_left_as_it_is():
    """A background job inherits SIGINT ignored: handling it there made a terminal's Ctrl-C stop it."""
    caught = []

    def own(*args):
        caught.append(args)

    for handler in (signal.SIG_IGN, own):
        previous = signal.signal(signal.SIGINT, handler)
        try:
            with interrupts_kept():
                assert signal.getsignal(signal.SIGINT) is handler
        finally:
            signal.signal(signal.SIGINT, previous)
    with interrupts_kept(sigterm=False):
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("signum, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_a_signal_lost_in_a_finalizer_is_sent_again_and_stops_the_block(signum, raised):
    hook = sys.unraisablehook
    steps = []
    with pytest.raises(raised):
        with interrupts_kept() as seen:
            obj = _InterruptedInDel(signum)
            del obj
            for _ in range(400):
                steps.append(1)
                time.sleep(0.005)
    assert seen.lost is raised and seen.received == [raised, raised] and len(steps) < 200
    assert sys.unraisablehook is hook
    time.sleep(2 * RESEND_SECONDS)


def test_a_nested_block_shares_the_outer_ones_record():
    """compare's loop inside the CLI's block: a Ctrl-C swallowed by a metric is seen by both."""
    with interrupts_kept() as outer:
        with interrupts_kept(sigterm=False) as inner:
            assert inner is outer and isinstance(inner, Interrupts)
            swallowed = []
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
            except KeyboardInterrupt as exc:
                swallowed.append(exc)
        assert len(swallowed) == 1 and outer.received == [KeyboardInterrupt] and outer.lost is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("signum, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_a_stop_inside_stops_held_is_raised_after_the_block_ends(signum, raised):
    """compare's report files are written in such a block: a SIGTERM between them left a new compare.json
    beside the last comparison's plot."""
    done = []
    with pytest.raises(raised):
        with interrupts_kept():
            with stops_held():
                os.kill(os.getpid(), signum)
                time.sleep(0.05)
                done.append("first")
                done.append("second")
            done.append("after")  # (not reached: the held signal is delivered as the block ends)
    assert done == ["first", "second"]
