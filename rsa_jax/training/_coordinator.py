"""JAX's coordination service in a process of its own, so that the death of process 0 is a dead
peer like any other.

`jax.distributed.initialize` starts the coordination service inside process 0. When process 0
dies (SIGKILL, out of memory, a lost host) the service dies with it, and every other process's
JAX client terminates from C++ at once (a fatal "Terminating process because the JAX distributed
service detected fatal errors" line, exit 134), before any Python runs and before the peer watch
(`_peers.py`) can say what happened. jaxlib 0.10 offers no Python hook there (its
`missed_heartbeat_callback` cannot take a Python function).

So process 0 runs the service in a small child process instead (`coordinator_in_a_child`, used
around `jax.distributed.initialize`): JAX's call that would start the service in process 0
starts this module as a child, with the same arguments, and gets a handle whose `shutdown` stops
it. Everything else in `jax.distributed.initialize` (cluster detection, the client, the
preemption sync point) stays JAX's. The child:

- is in a session of its own and ignores SIGINT and SIGTERM, so a Ctrl-C at the terminal or a
  launcher's signal to the process group reaches the training processes, not the service they
  need in order to agree on a stop;
- stops when process 0 shuts JAX down normally (after every process passed JAX's shutdown
  barrier), and says nothing on stdout after its `ready` line;
- outlives a process 0 that died without shutting down by `grace` seconds (twice the peer
  window, and a margin), long enough for the others' peer watches to see process 0 stop
  answering and end with their clear line; then it stops too.

    python -P rsa_jax/training/_coordinator.py '{"address": ..., "num_nodes": ..., "grace": ...}'
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import types

log = logging.getLogger(__name__)

READY = "ready"
# The name under which `jax._src.distributed` holds jaxlib's extension module (private to JAX:
# the one name this module depends on; the coordination tests in
# tests/training/test_multiprocess_signals.py fail if it moves).
_JAXLIB = "_jax"
START_TIMEOUT_S = 120.0  # the child imports jaxlib and binds the port


class CoordinatorError(RuntimeError):
    """The coordination service's process could not start."""


class ChildService:
    """Process 0's handle on the service's process: what JAX keeps as `global_state.service`
    (its `shutdown` is called by `jax.distributed.shutdown`, after the client's)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def shutdown(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def start_child(address: str, num_nodes: int, grace: float, **service_kwargs) -> ChildService:
    """Starts the service in a child process and waits until it listens; `CoordinatorError` with
    the child's own words when it cannot (a port in use, say)."""
    spec = {"address": address, "num_nodes": num_nodes, "grace": grace, **service_kwargs}
    # This file run as a script (-P: its folder not on sys.path), not `-m`: the child imports
    # only jaxlib, not the rsa_jax package (about 1.5 s of start-up and 90 MB less).
    proc = subprocess.Popen(
        [sys.executable, "-P", os.path.abspath(__file__), json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # JAX's C++ logs; the child outlives process 0's pipes
        text=True,
        start_new_session=True,
    )
    stdout = proc.stdout
    assert stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(START_TIMEOUT_S)
    line = lines[0].strip() if lines else ""
    if line != READY:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        said = line or (stdout.read().strip() if not reader.is_alive() else "")
        raise CoordinatorError(
            f"the JAX coordination service on {address} for {num_nodes} processes did not "
            f"start (its process said: {said or 'nothing'}; exit {proc.returncode})"
        )
    stdout.close()  # nothing more is read; the child writes nothing more
    log.info("jax.distributed: coordination service on %s (pid %d)", address, proc.pid)
    return ChildService(proc)


@contextlib.contextmanager
def coordinator_in_a_child(grace: float):
    """Within it, `jax.distributed.initialize` starts the coordination service (process 0 only)
    in a child process rather than in this one."""
    from jax._src import distributed

    real = getattr(distributed, _JAXLIB)

    def start(address, num_nodes, **kwargs):
        return start_child(address, num_nodes, grace, **kwargs)

    class _Forward(types.SimpleNamespace):  # every other name is the real module's
        def __getattr__(self, name):
            return getattr(real, name)

    setattr(distributed, _JAXLIB, _Forward(get_distributed_runtime_service=start))
    try:
        yield
    finally:
        setattr(distributed, _JAXLIB, real)


def _serve(spec: dict) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    grace = float(spec.pop("grace"))
    address, num_nodes = spec.pop("address"), spec.pop("num_nodes")
    try:
        from jax._src import distributed

        jaxlib = getattr(distributed, _JAXLIB)
        service = jaxlib.get_distributed_runtime_service(address, num_nodes, **spec)
    except Exception as e:  # noqa: BLE001 -- reported to process 0, which raises it
        print(f"{type(e).__name__}: {e}", flush=True)
        return 1
    print(READY, flush=True)
    sys.stdout.close()
    # Process 0 writes "stop" when it shut JAX down; end of file without it: process 0 died.
    stopped = sys.stdin.readline().strip() == "stop"
    if not stopped:
        time.sleep(grace)  # the others' peer watches see process 0 gone and end themselves
    service.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(_serve(json.loads(sys.argv[1])))
