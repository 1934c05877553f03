"""Run directories on object storage (`gs://`): path helpers and the lease that replaces flock.

- `is_remote(path)`: a `gs://` or `s3://` URL, never a local folder named `gs:`.
- `check_supported(path)`: `gs://` is supported; `s3://` is refused with the reason (Orbax
  0.12.8 gives TensorStore's `s3` driver no path: its array writer takes `gs://` URLs and
  absolute local paths only).
- `Lease(path)`: exclusive ownership of a run directory on Cloud Storage. Object stores have no
  flock, so the lock file holds a lease record (owner id, pid, host, start, expiry) that the
  holder renews from a background thread; every write of it is conditional on the object's
  generation (`ifGenerationMatch`: 0 to create it, the generation read to take over an expired
  lease, the generation written last to renew or release). What that guarantees, and what not,
  is in docs/run_directory.md ("Runs on object storage").

Everything else (checkpoints through Orbax and TensorStore's `gcs` driver, the small files
through `etils.epath` and gcsfs) needs no code of its own here.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from urllib.parse import quote

log = logging.getLogger(__name__)

REMOTE_SCHEMES = ("gs://", "s3://")
# How long a lease lives without renewal: a holder that died (SIGKILL, a lost machine) blocks the
# run directory this long. Renewed every quarter of it. The environment variable overrides it.
LEASE_SECONDS = 60.0
LEASE_ENV = "RSA_JAX_LEASE_SECONDS"


def is_remote(path) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


def check_supported(path: str) -> None:
    """Raises ValueError for object-storage URLs the stack cannot train into, or reach without
    the `cloud` extra."""
    if str(path).startswith("gs://") and importlib.util.find_spec("gcsfs") is None:
        raise ValueError(
            f"{path}: gs:// run directories need gcsfs: pip install -e '.[cloud]' (or pip "
            "install gcsfs)"
        )
    if str(path).startswith("s3://"):
        raise ValueError(
            f"{path}: s3:// run directories are not supported: Orbax 0.12.8 writes checkpoint "
            "arrays to gs:// URLs and local paths only (docs/run_directory.md, 'Runs on object "
            "storage'); use gs://, a local path, or an S3 bucket mounted as a filesystem"
        )


def lease_seconds() -> float:
    text = os.environ.get(LEASE_ENV)
    if not text:
        return LEASE_SECONDS
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{LEASE_ENV}={text!r}: expected a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{LEASE_ENV}={text!r}: must be > 0")
    return value


class LeaseHeld(RuntimeError):
    """Another owner holds a live lease (or took it between our read and our write)."""


def _split(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("gs://").partition("/")
    return bucket, key


def _filesystem():
    import fsspec  # gcsfs: the `cloud` extra

    return fsspec.filesystem("gs")


def describe(record: dict) -> str:
    """'pid 12 on host h, started ..., lease expires ...' for messages."""
    try:
        expires = datetime.datetime.fromtimestamp(record["expires"]).astimezone()
        return (
            f"pid {record['pid']} on host {record['host']}, started {record['started']}, lease "
            f"expires {expires.isoformat(timespec='seconds')} unless renewed"
        )
    except (KeyError, TypeError, ValueError, OSError):
        return "holder not recorded"


def read_lease(url: str) -> tuple[dict | None, int]:
    """(the lease record or None, the object's generation; 0: no lock object)."""
    fs = _filesystem()
    bucket, key = _split(url)
    try:
        meta = fs.call("GET", "b/{}/o/{}", bucket, key, json_out=True)
        _, body = fs.call("GET", "b/{}/o/{}", bucket, key, alt="media")
    except FileNotFoundError:
        return None, 0
    try:
        record = json.loads(body.decode() or "null")
    except ValueError:
        record = None  # unreadable: treated as expired (taken over conditionally)
    return (record if isinstance(record, dict) else None), int(meta["generation"])


def live(record: dict | None, now: float | None = None) -> bool:
    if not record:
        return False
    try:
        return float(record["expires"]) > (time.time() if now is None else now)
    except (KeyError, TypeError, ValueError):
        return False


class Lease:
    """A renewed lease on `url` (a `gs://` lock object); `acquire`, `release`, a context
    manager, like `RunLock`. Raises LeaseHeld when a live lease of another owner is there."""

    def __init__(self, url: str, *, seconds: float | None = None):
        self.url = url
        self.seconds = lease_seconds() if seconds is None else seconds
        self.owner = uuid.uuid4().hex
        self.generation: int | None = None  # ours, while held
        self.lost: str | None = None  # why renewal failed, if it did
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")

    def _record(self) -> bytes:
        return json.dumps(
            {
                "owner": self.owner,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": self._started,
                "argv": sys.argv,
                "expires": time.time() + self.seconds,
                "lease_seconds": self.seconds,
            }
        ).encode()

    def _write(self, if_generation: int) -> int:
        """Writes the record if the object's generation is `if_generation` (0: absent);
        FileExistsError (HTTP 412) otherwise. Returns the new generation."""
        fs = _filesystem()
        bucket, key = _split(self.url)
        out = fs.call(
            "POST",
            f"{fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
            uploadType="media",
            name=key,
            ifGenerationMatch=str(if_generation),
            data=self._record(),
            # not application/json: some emulators parse such bodies instead of storing them
            headers={"Content-Type": "application/octet-stream"},
            json_out=True,
        )
        return int(out["generation"])

    def acquire(self) -> Lease:
        if self.generation is not None:
            return self
        record, generation = read_lease(self.url)
        if live(record) and record is not None and record.get("owner") != self.owner:
            raise LeaseHeld(describe(record))
        try:
            self.generation = self._write(generation)
        except FileExistsError:
            record, _ = read_lease(self.url)
            holder = describe(record or {})
            raise LeaseHeld(f"taken by another trainer just now: {holder}") from None
        self._thread = threading.Thread(target=self._renew, name="rsa_jax-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            try:
                assert self.generation is not None
                self.generation = self._write(self.generation)
            except FileExistsError:
                self.lost = "the lock object was changed by someone else"
            except Exception as e:  # a network error: try again next period, while it lives
                log.warning("renewing the lease on %s failed (%s); retrying", self.url, e)
                continue
            if self.lost:
                log.error(
                    "lost the lease on %s (%s): another trainer may write this run directory now",
                    self.url,
                    self.lost,
                )
                return

    def release(self) -> None:
        if self.generation is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost:
            fs = _filesystem()
            bucket, key = _split(self.url)
            try:
                fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=str(self.generation))
            except (FileNotFoundError, FileExistsError):
                pass  # gone or taken over: nothing of ours to remove
        self.generation = None

    @property
    def held(self) -> bool:
        return self.generation is not None and not self.lost

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
