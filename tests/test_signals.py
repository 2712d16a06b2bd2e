"""The CLI's Ctrl-C and SIGTERM: never raised inside a database write or library, never lost."""

import gc
import os
import signal
import time

import pytest

from circtune import _signals

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="the retry of a deferred interrupt is POSIX")


@pytest.fixture
def installed():
    names = ("SIGINT", "SIGTERM", "SIGALRM")
    old = {name: signal.getsignal(getattr(signal, name)) for name in names}
    _signals.install()
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    for name, handler in old.items():
        signal.signal(getattr(signal, name), handler)
    _signals._pending = _signals._raised = False


def spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


LIBRARY = """
import os, signal, threading, time

def spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass

def work(signum, times=1):
    for _ in range(times):
        os.kill(os.getpid(), signum)
        spin(0.05)  # the handler runs here, in this library's frame
    threading.Event().wait(0.01)  # and the standard library's, called from here
    spin(0.2)
    return "returned"
"""


def library(name):
    """A module that Python sees as ``name``: ``work(signum)`` signals this process, then goes on for 0.2 s."""
    namespace = {"__name__": name}
    exec(LIBRARY, namespace)
    return namespace["work"]


@pytest.mark.parametrize("name", ["sqlalchemy.pool.base", "optuna.study._optimize", "psycopg.connection"])
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_an_interrupt_inside_a_library_is_raised_once_circtune_runs_again(installed, name, signame):
    work = library(name)
    returned = []
    with pytest.raises(KeyboardInterrupt):
        returned.append(work(getattr(signal, signame)))
        spin(1.0)  # the retry raises here, a few milliseconds after the library returned
    assert returned == ["returned"]


def test_in_circtune_code_an_interrupt_is_raised_at_once(installed):
    work = library("circtune._search")
    with pytest.raises(KeyboardInterrupt):
        work(signal.SIGINT)
        pytest.fail("the interrupt waited for code that is not a library's")


def test_a_second_ctrl_c_while_one_waits_for_the_library_stops_at_once(installed):
    with pytest.raises(KeyboardInterrupt):
        library("sqlalchemy.engine.base")(signal.SIGINT, times=2)
        pytest.fail("the second Ctrl-C waited")


def sigint():
    os.kill(os.getpid(), signal.SIGINT)
    spin(0.05)


def test_an_interrupt_during_a_write_of_ours_is_raised_when_it_ends(installed):
    done = []
    with pytest.raises(KeyboardInterrupt):
        with _signals.deferred_interrupts():
            sigint()
            sigint()  # even twice: the claim or row being written is finished first
            done.append("written")
        pytest.fail("not raised at the end of the block")
    assert done == ["written"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed interrupt
def test_an_interrupt_swallowed_by_a_finalizer_is_raised_again_between_steps(installed):
    class Finalized:
        def __del__(self):
            sigint()  # KeyboardInterrupt inside __del__: Python prints "Exception ignored" and goes on

    gc.disable()
    try:
        Finalized()
    finally:
        gc.enable()
    with pytest.raises(KeyboardInterrupt):
        _signals.check_interrupted()
    _signals.install()  # a new run starts clean
    _signals.check_interrupted()


def library_frame(name):
    namespace = {"__name__": name}
    exec("import sys\ndef here():\n    return sys._getframe()", namespace)
    return namespace["here"]()


def test_no_retry_is_left_armed_after_the_interrupt_or_the_command(installed):
    """An armed retry that outlives the command fires at exit, after Python restored SIGALRM's default action, and
    kills the process (exit -14 instead of 130)."""
    frame = library_frame("sqlalchemy.orm.session")
    _signals.interrupt(signal.SIGTERM, frame)  # waits for the library: a retry is armed
    assert signal.getitimer(signal.ITIMER_REAL)[0] > 0
    with pytest.raises(KeyboardInterrupt):
        with _signals.deferred_interrupts():  # raised by a write of ours ending first
            pass
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    _signals.interrupt(signal.SIGTERM, frame)
    _signals.disarm()  # the command finished before the retry
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    spin(0.05)  # nothing raised later


def test_an_interrupt_waiting_for_a_library_is_raised_at_the_next_check(installed):
    """Optuna's sampler and storage take most of a trial, so the retry may keep finding them running: the study's
    check at the start of each trial raises it there, but not inside a write of ours."""
    frame = library_frame("optuna.samplers._tpe.sampler")
    _signals.interrupt(signal.SIGINT, frame)
    signal.setitimer(signal.ITIMER_REAL, 0)  # as if every retry found Optuna running
    with pytest.raises(KeyboardInterrupt):
        _signals.check_interrupted()
    _signals.install()
    _signals.interrupt(signal.SIGINT, frame)
    signal.setitimer(signal.ITIMER_REAL, 0)
    written = []
    with pytest.raises(KeyboardInterrupt):
        with _signals.deferred_interrupts():
            _signals.check_interrupted()  # inside a write of ours: not yet
            written.append("row")
    assert written == ["row"]
