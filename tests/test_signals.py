"""GracefulStop's signal rules, driven by calling its handler directly (no real signals, no subprocess)."""

import signal
import subprocess
import sys

import pytest

from rlk2.signals import GracefulStop, exit_at_once, interruption_point


@pytest.fixture
def stop():
    s = GracefulStop()
    yield s
    s.restore()


def test_first_signal_only_requests_a_stop(stop):
    stop._handle(signal.SIGTERM, sys._getframe())
    assert stop.requested == "SIGTERM"
    interruption_point()  # nothing held: no raise


def test_second_signal_raises_at_once_outside_critical_blocks(stop):
    stop._handle(signal.SIGINT, sys._getframe())
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, sys._getframe())


def test_second_signal_inside_critical_is_raised_when_the_block_ends(stop):
    stop._handle(signal.SIGINT, sys._getframe())
    reached_end = False
    with pytest.raises(KeyboardInterrupt), stop.critical():
        stop._handle(signal.SIGINT, sys._getframe())
        reached_end = True
    assert reached_end


def test_second_signal_in_a_finalizer_is_held_then_raised_at_the_next_interruption_point(stop):
    class Finalized:
        def __del__(self):
            stop._handle(signal.SIGINT, sys._getframe())  # raising here would be swallowed by the interpreter

    stop._handle(signal.SIGINT, sys._getframe())
    obj = Finalized()
    del obj  # no exception escapes the finalizer, and none is lost
    with pytest.raises(KeyboardInterrupt):
        interruption_point()
    interruption_point()  # raised once only


def test_held_signal_waits_for_a_critical_block_to_end(stop):
    class Finalized:
        def __del__(self):
            stop._handle(signal.SIGINT, sys._getframe())

    stop._handle(signal.SIGINT, sys._getframe())
    with pytest.raises(KeyboardInterrupt), stop.critical():
        obj = Finalized()
        del obj
        interruption_point()  # inside the block: does not raise
    interruption_point()


def test_restore_uninstalls(stop):
    stop._handle(signal.SIGINT, sys._getframe())
    stop._held = True
    stop.restore()
    interruption_point()  # no stop installed: nothing raised
    assert signal.getsignal(signal.SIGINT) is not stop._handle


def test_after_a_stop_restore_makes_further_signals_exit_at_once(stop):
    stop._handle(signal.SIGINT, sys._getframe())
    stop.restore()
    assert signal.getsignal(signal.SIGINT) is exit_at_once
    assert signal.getsignal(signal.SIGTERM) is exit_at_once
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_exit_at_once_ends_a_process_quietly(tmp_path):
    code = (
        "import atexit, os, signal, time\n"
        "from rlk2.signals import exit_at_once_from_now\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(2)))\n"
        "exit_at_once_from_now()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGINT
    assert "Traceback" not in proc.stderr, proc.stderr


def test_a_signal_after_the_exit_callbacks_leaves_the_exit_status_alone():
    # A Ctrl-C arriving once the exit callbacks are done, while the interpreter finalizes (when Python has put its
    # handlers back to the system default), must not kill a process that has already chosen its status. A helper
    # process floods SIGINT from the last callback on, and a sleeping thread is there to take it: the kernel hands a
    # process-wide signal to any thread that has not blocked it, not only to the main one.
    code = (
        "import atexit, os, subprocess, threading, time\n"
        "def flood():\n"
        "    subprocess.Popen(['sh', '-c', f'while kill -INT {os.getpid()} 2>/dev/null; do sleep 0.001; done'],\n"
        "                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "    time.sleep(0.3)\n"
        "atexit.register(flood)  # registered first, so it runs last\n"
        "from rlk2.signals import exit_at_once_from_now\n"
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "exit_at_once_from_now()\n"
        "raise SystemExit(3)\n"
    )
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 3, (proc.returncode, proc.stderr[-2000:])
