"""Signals and dead peers in a multi-process run: SIGTERM or SIGINT to any one process stops every
process at the same step with a saved checkpoint and exit 75, and the rerun ends where an
uninterrupted run ends; a process that dies ends the others with one clear line and exit 1
within the peer window (RSA_JAX_PEER_TIMEOUT), never a hang or a C++ abort.

Two local CPU processes joined through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID, as `launch/single_host.sh NUM_PROCESSES=2` starts them. The cheap cases run a
small all-gather loop (`multiprocess_signal_worker.py`) under the trainer's `StopSignal` and
peer watch; the slow ones run `rsa-jax train` itself.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from rsa_jax.data import write_toy_data
from rsa_jax.training import EXIT_PREEMPTED, load_policy
from rsa_jax.training._peers import coordinator_grace, jax_heartbeat_timeout, peer_timeout

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "multiprocess_signal_worker.py")
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
WINDOW = 10  # RSA_JAX_PEER_TIMEOUT in these tests, seconds (above a loaded host's pauses)
LOST = "stopped answering"
COORDINATOR = os.path.join(
    ROOT, "rsa_jax", "training", "_coordinator.py"
)  # in its cmdline  # the survivor's line when a peer died


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], processes: int = 2, window: float = WINDOW) -> list[subprocess.Popen]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_NUM_CPU_DEVICES"] = "1"
    env["RSA_JAX_PEER_TIMEOUT"] = str(window)
    port = _free_port()
    procs = []
    for i in range(processes):
        env_i = {
            **env,
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": str(processes),
            "JAX_PROCESS_ID": str(i),
        }
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env_i,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
        procs[-1].port = port  # type: ignore[attr-defined]
    return procs


def _coordinators(port: int) -> list[int]:
    """The pids of coordination-service processes (`_coordinator.py`) serving `port`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        if COORDINATOR in cmdline and f":{port}" in cmdline:
            pids.append(int(pid))
    return pids


def _gone(port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _coordinators(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _finish(procs: list[subprocess.Popen], timeout: float) -> tuple[list[str], float]:
    """Every process's output once all have exited (killed after `timeout` s: a hang fails the
    test), and the seconds that took."""
    start = time.monotonic()
    outputs = []
    for proc in procs:
        left = max(1.0, timeout - (time.monotonic() - start))
        try:
            out, _ = proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, _ = proc.communicate()
            out += f"\n[still running after {timeout} s: killed]"
        outputs.append(out)
    return outputs, time.monotonic() - start


def _report(procs, outputs) -> str:
    return "\n".join(
        f"--- process {i} (exit {p.returncode}) ---\n{out[-3000:]}"
        for i, (p, out) in enumerate(zip(procs, outputs, strict=True))
    )


def _wait_for(predicate, procs, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if predicate():
            return
        time.sleep(0.05)
    outputs, _ = _finish(procs, 5)
    raise AssertionError("the run did not get going:\n" + _report(procs, outputs))


# --------------------------------------------------------------------------- the settings


def test_peer_timeout_from_the_environment():
    assert peer_timeout({}) == 60.0
    assert peer_timeout({"RSA_JAX_PEER_TIMEOUT": "7.5"}) == 7.5
    for bad in ("0", "-3", "nan", "inf", "soon"):
        with pytest.raises(ValueError, match="RSA_JAX_PEER_TIMEOUT"):
            peer_timeout({"RSA_JAX_PEER_TIMEOUT": bad})
    # JAX's own heartbeat timeout stays above the window, so the clear line comes first.
    for window in (1.0, 5.0, 60.0, 300.0):
        assert jax_heartbeat_timeout(window) > window + 20
    assert jax_heartbeat_timeout(5.0) >= 100  # never below JAX's default
    # The service's process outlives a dead process 0 past every other process's window.
    for window in (1.0, 5.0, 60.0):
        assert coordinator_grace(window) > window + 1


# --------------------------------------------------------------------------- cheap: the mechanism


def _worker(steps: int = 2000) -> list[subprocess.Popen]:
    procs = _start([sys.executable, WORKER, str(steps)])
    ready = []

    def both_ready():  # the first line each process prints after its first step
        while len(ready) < len(procs):
            line = procs[len(ready)].stdout.readline()
            if not line:
                return False
            if line.strip() == "ready":
                ready.append(True)
        return True

    _wait_for(both_ready, procs, 120)
    return procs


def test_sigint_to_one_process_stops_both_at_the_same_step():
    procs = _worker()
    procs[1].send_signal(signal.SIGINT)
    outputs, seconds = _finish(procs, 60)
    report = _report(procs, outputs)
    assert [p.returncode for p in procs] == [EXIT_PREEMPTED] * 2, report
    steps = [[ln for ln in out.splitlines() if ln.startswith("stopped at step")] for out in outputs]
    assert all(len(s) == 1 for s in steps), report
    assert steps[0][0].split()[3] == steps[1][0].split()[3], report  # the same step
    assert "by SIGINT" in steps[1][0], report
    print(f"SIGINT to one of 2 loop processes: both stopped {seconds:.1f} s after the signal")
    assert seconds < 30, report
    # Process 0 stopped its coordination service's process on its way out.
    assert _gone(procs[0].port, 10), _coordinators(procs[0].port)


def test_the_coordination_service_runs_outside_process_0_and_ignores_ctrl_c():
    procs = _worker()
    pids = _coordinators(procs[0].port)
    assert len(pids) == 1, pids
    with open(f"/proc/{pids[0]}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    assert int(fields[1]) == procs[0].pid  # process 0's child
    assert int(fields[3]) != os.getpgid(procs[0].pid)  # not in the group a Ctrl-C reaches
    os.kill(pids[0], signal.SIGINT)  # ignored: the run goes on
    time.sleep(1)
    assert _coordinators(procs[0].port) == pids and all(p.poll() is None for p in procs)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    outputs, _ = _finish(procs, 60)
    assert [p.returncode for p in procs] == [EXIT_PREEMPTED] * 2, _report(procs, outputs)
    assert _gone(procs[0].port, 10), _coordinators(procs[0].port)


# About 15 s each: the survivor waits out the peer window (and, for process 0, the orphaned
# service its grace). Process 0 used to host the coordination service: its death aborted the
# other in JAX's C++ code (exit -6), which RSA_JAX_COORDINATOR=in-process still shows.
@pytest.mark.slow
@pytest.mark.parametrize("killed", [1, 0])
def test_a_killed_process_ends_the_other_with_one_clear_line(killed):
    procs = _worker()
    port, survivor = procs[0].port, 1 - killed
    procs[killed].send_signal(signal.SIGKILL)
    outputs, seconds = _finish(procs, 60)
    report, out = _report(procs, outputs), outputs[survivor]
    assert procs[survivor].returncode == 1, report  # not 134/-6 (JAX's C++ abort), not a hang
    assert f"process {survivor} of 2: process {killed} of 2 {LOST}" in out, report
    assert "Check failure" not in out and "Terminating process" not in out, report
    print(
        f"SIGKILL of process {killed} of 2 loop processes: the other exited {seconds:.1f} s later"
    )
    assert seconds < WINDOW + 15, report
    # The service (process 0's child) stops within its grace once process 0 is gone, killed or
    # ended by its peer watch (which leaves without a shutdown).
    assert _gone(port, coordinator_grace(WINDOW) + 15), _coordinators(port)


# --------------------------------------------------------------------------- slow: the trainer

STAGE_STEPS = (60, 60)  # long enough that a signal after a few steps lands mid-stage
OVERRIDES = [
    "stages.0.view=safety",
    f"stages.0.steps={STAGE_STEPS[0]}",
    f"stages.1.steps={STAGE_STEPS[1]}",
    "data.epochs=20",
    "data.batch_size=4",
    "checkpoint.every=1000",  # only the stop's save and the stages' final ones
    "checkpoint.keep=5",
    "train.log_every=1",
]
TOTAL = sum(STAGE_STEPS)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mpsignals") / "pairs.jsonl")
    write_toy_data(path, rows=48)
    return path


def _train(run_dir: str, data_path: str) -> list[subprocess.Popen]:
    cmd = [sys.executable, "-m", "rsa_jax", "train", TINY, *OVERRIDES]
    return _start(cmd + [f"data.path={data_path}", f"train.run_dir={run_dir}"])


def _records(run_dir: str) -> dict:
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[r["global_step"]] = r  # the last record wins (a resumed run repeats steps)
    return out


def _train_until_step(run_dir: str, data_path: str, steps: int) -> list[subprocess.Popen]:
    procs = _train(run_dir, data_path)
    metrics = os.path.join(run_dir, "metrics.jsonl")

    def logged():
        return os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= steps

    _wait_for(logged, procs)
    return procs


def _checkpoints(run_dir: str) -> list[int]:
    return sorted(int(n) for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.isdigit())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_path):
    run_dir = str(tmp_path_factory.mktemp("mpsignals") / "whole")
    procs = _train(run_dir, data_path)
    outputs, _ = _finish(procs, 600)
    assert [p.returncode for p in procs] == [0, 0], _report(procs, outputs)
    return run_dir


def _assert_stopped_together(procs, outputs, run_dir) -> int:
    """Both processes preempted (75) at the same step, which was checkpointed by both."""
    report = _report(procs, outputs)
    assert [p.returncode for p in procs] == [EXIT_PREEMPTED] * 2, report
    said = [
        [ln for ln in out.splitlines() if ln.startswith("preempted at global step")]
        for out in outputs
    ]
    assert all(len(s) == 1 for s in said) and said[0] == said[1], report
    step = int(said[0][0].split()[4].rstrip(";"))
    assert 0 < step < TOTAL, report
    assert _checkpoints(run_dir)[-1] == step, (_checkpoints(run_dir), report)
    item = os.path.join(run_dir, "checkpoints", str(step), "data_iter")
    assert sorted(f for f in os.listdir(item) if f.endswith(".json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ], report
    return step


@pytest.mark.slow  # three 2-process tiny runs (about 4 min on 2 loaded cores)
def test_sigterm_to_one_process_saves_both_and_the_rerun_equals_the_whole_run(
    tmp_path, data_path, uninterrupted
):
    run_dir = str(tmp_path / "stopped")
    procs = _train_until_step(run_dir, data_path, 3)
    procs[1].send_signal(signal.SIGTERM)
    outputs, seconds = _finish(procs, 120)
    step = _assert_stopped_together(procs, outputs, run_dir)
    print(f"SIGTERM to trainer process 1: both saved step {step}, exited {seconds:.1f} s later")
    assert seconds < 60, _report(procs, outputs)

    procs = _train(run_dir, data_path)
    outputs, _ = _finish(procs, 600)
    assert [p.returncode for p in procs] == [0, 0], _report(procs, outputs)
    assert f"done at global step {TOTAL}" in outputs[0], _report(procs, outputs)
    base, rec = _records(uninterrupted), _records(run_dir)
    assert sorted(rec) == sorted(base) == list(range(1, TOTAL + 1))
    for step, b in base.items():
        assert rec[step]["loss"] == b["loss"], step  # bitwise on the CPU
        assert rec[step]["grad_norm"] == b["grad_norm"], step
    _, whole = load_policy(uninterrupted)
    _, resumed = load_policy(run_dir)
    for k in whole:
        np.testing.assert_array_equal(np.asarray(resumed[k]), np.asarray(whole[k]), k)


@pytest.mark.slow  # one 2-process tiny run
def test_sigint_to_one_process_of_the_trainer_stops_both_without_a_hang(tmp_path, data_path):
    run_dir = str(tmp_path / "interrupted")
    procs = _train_until_step(run_dir, data_path, 3)
    procs[1].send_signal(signal.SIGINT)
    time.sleep(0.1)
    procs[0].send_signal(signal.SIGINT)  # Ctrl-C reaching both, 0.1 s apart
    outputs, seconds = _finish(procs, 120)
    step = _assert_stopped_together(procs, outputs, run_dir)
    print(f"SIGINT to both trainer processes: both saved step {step}, exited {seconds:.1f} s later")
    assert seconds < 60, _report(procs, outputs)


@pytest.mark.slow  # one 2-process tiny run
def test_a_killed_trainer_process_ends_the_other_within_the_window(tmp_path, data_path):
    run_dir = str(tmp_path / "killed")
    procs = _train_until_step(run_dir, data_path, 3)
    procs[1].send_signal(signal.SIGKILL)
    outputs, seconds = _finish(procs, 120)
    report = _report(procs, outputs)
    assert procs[0].returncode == 1, report
    assert f"process 0 of 2: process 1 of 2 {LOST}" in outputs[0], report
    assert "Check failure" not in outputs[0], report
    print(f"SIGKILL of trainer process 1: process 0 exited {seconds:.1f} s later")
    assert seconds < WINDOW + 15, report


@pytest.mark.slow  # one 2-process tiny run
def test_sigterm_to_the_launcher_stops_both_processes_saved(tmp_path, data_path):
    run_dir = str(tmp_path / "launched")
    overrides = " ".join([*OVERRIDES, f"data.path={data_path}"])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RSA_JAX_PEER_TIMEOUT": str(WINDOW)}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    env.update(
        CONFIG=TINY, RUN_DIR=run_dir, OVERRIDES=overrides, PYTHON=sys.executable,
        NUM_PROCESSES="2", CPU_DEVICES="1", COORDINATOR_PORT=str(_free_port()),
    )  # fmt: skip
    launcher = subprocess.Popen(
        ["bash", os.path.join(ROOT, "launch", "single_host.sh")], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    metrics = os.path.join(run_dir, "metrics.jsonl")
    _wait_for(lambda: os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3, [launcher])
    launcher.send_signal(signal.SIGTERM)
    outputs, seconds = _finish([launcher], 120)
    assert launcher.returncode == EXIT_PREEMPTED, outputs[0][-3000:]
    said = [ln for ln in outputs[0].splitlines() if ln.startswith("preempted at global step")]
    log_1 = open(os.path.join(run_dir, "logs", "process_1.log")).read()
    said_1 = [ln for ln in log_1.splitlines() if ln.startswith("preempted at global step")]
    assert len(said) == 1 and said == said_1, (outputs[0][-2000:], log_1[-2000:])
    step = int(said[0].split()[4].rstrip(";"))
    assert _checkpoints(run_dir)[-1] == step
    print(f"SIGTERM to the launcher: both saved step {step}, exited {seconds:.1f} s later")
    assert seconds < 60, outputs[0][-3000:]
