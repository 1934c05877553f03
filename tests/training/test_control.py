"""How a run ends: exit codes, stop signals (also during start-up), the non-finite guard."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from rsa_jax.training._control import (
    EXIT_DONE,
    EXIT_PREEMPTED,
    NonFiniteError,
    StopSignal,
    check_finite,
    exit_code,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_exit_codes_are_distinct_and_documented():
    assert exit_code("done") == EXIT_DONE == 0
    assert exit_code("preempted") == EXIT_PREEMPTED == 75
    with pytest.raises(ValueError, match="unknown run status 'crashed'"):
        exit_code("crashed")


def test_sigterm_sets_the_flag_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignal()
    with stop.installed():
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_stop() and stop.raised == "SIGTERM"
        assert stop.final_status(finished=False) == "preempted"
        assert stop.final_status(finished=True) == "done"  # SIGTERM during the last step
    assert signal.getsignal(signal.SIGTERM) is before


def test_signals_caught_before_the_imports_are_seen():
    pending = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: pending.append(signal.Signals(s).name))
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # during the imports
        stop = StopSignal(pending)
        assert stop.raised == "SIGTERM"
        pending.clear()
        os.kill(os.getpid(), signal.SIGTERM)  # after StopSignal(), before installed()
        assert stop.should_stop()
        with stop.installed():
            assert stop.should_stop()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_no_signal_and_not_finished_is_a_bug_not_a_preemption():
    with pytest.raises(RuntimeError, match="without a stop signal"):
        StopSignal().final_status(finished=False)


def test_a_second_ctrl_c_interrupts_at_once():
    stop = StopSignal()
    with stop.installed():
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.raised == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


# A process that is "starting up" (sleeping in slices, as a model load would block) when SIGTERM
# arrives, and checks the flag before its first step, as the trainer does.
STARTUP = """
import signal, sys, time
pending = []
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: pending.append(signal.Signals(signum).name))
print("starting", flush=True)
from rsa_jax.training._control import StopSignal, exit_code  # loads JAX: seconds
stop = StopSignal(pending)
with stop.installed():
    for _ in range(600):  # start-up work
        time.sleep(0.05)
        if stop.should_stop():
            break
    if stop.should_stop():
        print("stopped before the first step", flush=True)
        sys.exit(exit_code(stop.final_status(finished=False)))
sys.exit(0)
"""


def test_sigterm_during_start_up_exits_cleanly_with_the_preempted_code():
    proc = subprocess.Popen(
        [sys.executable, "-c", STARTUP], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "starting"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_PREEMPTED
    assert "stopped before the first step" in out
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("metrics", "shown"),
    [
        ({"loss": float("nan"), "grad_norm": 1.0}, "loss=nan"),
        ({"loss": 0.7, "grad_norm": float("inf")}, "grad_norm=inf"),
        ({"loss": float("-inf"), "grad_norm": float("nan")}, "loss=-inf, grad_norm=nan"),
    ],
)
def test_non_finite_loss_or_gradient_norm_stops_the_run(metrics, shown):
    with pytest.raises(NonFiniteError) as info:
        check_finite(metrics, stage="safety", step=12, last_checkpoint=10)
    message = str(info.value)
    assert message.startswith(f"stage 'safety' step 12: {shown}; stopped before saving")
    assert "step 10" in message and "optim.learning_rate" in message


def test_finite_metrics_pass_and_other_keys_are_not_checked():
    check_finite({"loss": 0.69, "grad_norm": 3.0, "rewards/margins": float("nan")},
                 stage="s", step=1)  # fmt: skip
    with pytest.raises(NonFiniteError, match="no checkpoint was written"):
        check_finite({"loss": float("nan")}, stage="s", step=1)
