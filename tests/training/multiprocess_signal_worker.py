"""One process of the cheap runs in test_multiprocess_signals.py (run as a script, not collected).

    python multiprocess_signal_worker.py STEPS

Joins the multi-process run described by JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID the way the trainer does (`maybe_initialize_distributed`, which starts the peer
watch), then runs STEPS "steps" of a cross-process all-gather under the trainer's `StopSignal`,
asking `at_step()` after each as the trainer's stop hook does. Prints `ready` once the first
step is done, `stopped at step K` when the processes agreed to stop (exit 75), `finished`
otherwise (exit 0).
"""

from __future__ import annotations

import signal
import sys
import time

pending: list[str] = []
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: pending.append(signal.Signals(signum).name))

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")


def main(steps: int) -> int:
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    from rsa_jax.training import EXIT_PREEMPTED, StopSignal
    from rsa_jax.training._mesh import maybe_initialize_distributed

    stop = StopSignal(pending)
    with stop.installed():
        maybe_initialize_distributed()
        for step in range(1, steps + 1):
            gathered = multihost_utils.process_allgather(jnp.full((1,), step), tiled=True)
            assert gathered.tolist() == [step] * jax.process_count(), gathered
            if step == 1:
                print("ready", flush=True)
            time.sleep(0.05)
            if stop.at_step():
                print(f"stopped at step {step} by {stop.raised}", flush=True)
                return EXIT_PREEMPTED
    print("finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
