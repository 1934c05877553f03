"""Watching the other processes of a multi-process run: a process that died or left ends the
others with one clear line and exit code 1 within a bounded time, instead of a hang in a
collective or JAX's C++ abort.

JAX's coordination service notices a dead process only after `heartbeat_timeout_seconds`, and
then terminates every other process from C++ (a fatal log line, exit 134); its
`missed_heartbeat_callback` cannot take a Python function in jaxlib 0.10 (std::bad_cast). So
each process runs a thread of its own heartbeat through the service's key-value store, with a
shorter window (`RSA_JAX_PEER_TIMEOUT`, seconds, default 60), and JAX's own timeout is set above
it, so this thread always speaks first:

- a peer whose counter has not moved for the window died (SIGKILL, out of memory, a lost
  host): "process 1 of 2 stopped answering ...", exit 1;
- a peer that is leaving (its interpreter exiting) without having finished or stopped the run
  (it failed, or a second Ctrl-C interrupted it) while this one is still working, for longer
  than the window: this one is stuck in a collective with it, exit 1 as well. A peer that
  leaves after its trainer returned ("done" or "preempted", `note_outcome`) is not waited
  for: this process is on its way out of the same run, however slowly.

A collective that loses its partner (gloo: "Connection closed by peer") fails at once and the
process leaves through its normal error path; the thread keeps watching while JAX's shutdown
barrier waits for the dead process, and ends the wait.

Process 0 runs JAX's coordination service in a child process (`_coordinator.py`), so its death
is a dead peer like any other here: the service outlives it long enough for this watch to say so.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time

log = logging.getLogger(__name__)

EXIT_PEER_LOST = 1  # EXIT_FAILED: the state is the last checkpoint; rerunning resumes from it
DEFAULT_TIMEOUT_S = 60.0
_PREFIX = "rsa_jax/peers"


def peer_timeout(environ=None) -> float:
    """The window after which a silent peer counts as dead (RSA_JAX_PEER_TIMEOUT, seconds)."""
    env = os.environ if environ is None else environ
    text = env.get("RSA_JAX_PEER_TIMEOUT", "")
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"RSA_JAX_PEER_TIMEOUT={text!r}: expected a positive number of seconds")
    return value


def jax_heartbeat_timeout(window: float) -> int:
    """JAX's own heartbeat timeout for a watch window: well above it (so the watch decides
    first), never below JAX's default of 100 s."""
    return int(max(100, 2 * window + 30))


def coordinator_grace(window: float) -> float:
    """How long the coordination service's process (`_coordinator.py`) outlives a process 0 that
    died: twice the window and 5 s, so every other process's watch has seen process 0 stop
    answering and ended it first."""
    return 2 * window + 5


class PeerWatch:
    """The watch thread of one process (`start` after `jax.distributed.initialize`)."""

    def __init__(self, client, process_id: int, num_processes: int, window: float):
        self.client, self.me, self.n, self.window = client, process_id, num_processes, window
        self.interval = min(1.0, window / 10)
        self.leaving = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rsa_jax-peer-watch", daemon=True)

    def start(self) -> PeerWatch:
        self._beat(0)
        atexit.register(self.leave)  # runs before JAX's shutdown (registered at its import)
        self._thread.start()
        return self

    def leave(self) -> None:
        """This process is exiting: its peers stop expecting its heartbeat (not a death), JAX's
        shutdown barrier runs while this thread still watches (a peer that died ends the wait),
        and then the thread stops.

        The thread must be gone before the interpreter finalizes: a daemon thread that returns
        from a call into JAX's client then is ended by the interpreter inside C++ frames, which
        aborts the process ("terminate called after throwing an instance of ''", exit -6, after
        the run had stopped cleanly). So this process shuts `jax.distributed` down here, at the
        start of the exit (JAX's own shutdown at exit then has nothing left to do), instead of
        leaving the thread running into the interpreter's end."""
        self.leaving = True
        try:
            self.client.key_value_set(
                f"{_PREFIX}/leaving/{self.me}", _outcome, allow_overwrite=True
            )
        except Exception:  # noqa: BLE001 -- the service may be gone already: nothing to tell
            pass
        try:
            import jax

            jax.distributed.shutdown()
        except Exception as e:  # noqa: BLE001 -- exiting anyway; JAX's own attempt follows
            log.debug("jax.distributed.shutdown at exit: %s", e)
        finally:
            self._stop.set()
            if self._thread.is_alive() and self._thread is not threading.current_thread():
                self._thread.join(timeout=10 * self.interval + 5)

    def _beat(self, count: int) -> None:
        self.client.key_value_set(f"{_PREFIX}/beat/{self.me}", str(count), allow_overwrite=True)

    def _get(self, key: str) -> str | None:
        try:
            return self.client.key_value_try_get(f"{_PREFIX}/{key}")
        except Exception as e:  # noqa: BLE001 -- a missing key raises (NOT_FOUND)
            if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
                return None
            raise

    def _loop(self) -> None:
        peers = [p for p in range(self.n) if p != self.me]
        seen: dict[int, tuple[str | None, float]] = {p: (None, time.monotonic()) for p in peers}
        leaving_since: dict[int, float] = {}
        why: dict[int, str] = {}
        count = 0
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            try:
                count += 1
                self._beat(count)
                for p in peers:
                    value = self._get(f"beat/{p}")
                    if value != seen[p][0]:
                        seen[p] = (value, now)
                    if p not in leaving_since:
                        outcome = self._get(f"leaving/{p}")
                        if outcome is not None:
                            leaving_since[p], why[p] = now, outcome
            except Exception as e:  # noqa: BLE001 -- the coordination service is unreachable
                if self.leaving:
                    return  # JAX's shutdown closed the client: the normal end
                self._end(f"the coordination service (process 0) stopped answering ({e})")
                return
            for p in peers:
                if p in leaving_since:
                    if why[p] in _FINISHED or self.leaving:
                        continue  # it ended the run as this process will: not waited for
                    if now - leaving_since[p] > self.window:
                        self._end(
                            f"process {p} of {self.n} left the run {now - leaving_since[p]:.0f} s "
                            "ago without finishing it (it failed or was interrupted; see its "
                            "log) while this process still waits for it"
                        )
                elif now - seen[p][1] > self.window:
                    self._end(
                        f"process {p} of {self.n} stopped answering {now - seen[p][1]:.0f} s ago "
                        "(killed, out of memory or its host lost)"
                    )

    def _end(self, why: str) -> None:
        message = (
            f"rsa-jax: process {self.me} of {self.n}: {why}; stopping this process too (exit "
            f"{EXIT_PEER_LOST}). The run directory keeps its last checkpoint: rerun the same "
            "command on every process to resume from it"
        )
        try:
            logging.shutdown()  # flush what was logged before the line
        finally:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
            os._exit(EXIT_PEER_LOST)


_watch: PeerWatch | None = None
_FINISHED = ("done", "preempted")
_outcome = "failed"  # until the trainer returns: what a process leaving now tells its peers


def note_outcome(status: str) -> None:
    """What this process's trainer ended with ("done", "preempted" or "failed"): a peer that
    sees it leave after "done" or "preempted" does not wait for it."""
    global _outcome
    _outcome = status


def watch_peers(window: float | None = None) -> PeerWatch | None:
    """Starts this process's peer watch once `jax.distributed` is initialized with several
    processes; None (nothing started) otherwise."""
    global _watch
    import jax
    from jax._src import distributed

    if _watch is not None or jax.process_count() <= 1:
        return _watch
    client = distributed.global_state.client
    if client is None:
        return None
    window = peer_timeout() if window is None else window
    _watch = PeerWatch(client, jax.process_index(), jax.process_count(), window).start()
    return _watch
