"""A Cloud Storage emulator on 127.0.0.1 for the object-storage tests.

`gcp-storage-emulator` (a pure-Python server, pinned in the `dev` extra) speaks the JSON API
that TensorStore's `gcs` driver and gcsfs use, with two gaps that this module fills in the
server's own handler table:

- media downloads carry no `x-goog-generation` header; TensorStore's driver needs it on every
  read ("Malformed StorageGeneration" otherwise);
- the `ifGenerationMatch` precondition is ignored; Cloud Storage answers 412 when the object's
  generation differs (0: the object must not exist). TensorStore's OCDBT manifest writes and the
  run-directory lease rely on it.

Both follow the documented behaviour of Cloud Storage; everything else is the emulator's own.
"""

from __future__ import annotations

import socket
from http import HTTPStatus

ENDPOINT_VARS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")


def _generation(storage, bucket: str | None, name: str | None) -> str | None:
    from gcp_storage_emulator.exceptions import NotFound

    if not bucket or not name:
        return None
    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return "0"


def _with_generations(handler):
    def wrapped(request, response, storage):
        params = request.params or {}
        bucket = params.get("bucket_name")
        name = params.get("object_id") or (request.query.get("name") or [None])[0]
        want = request.query.get("ifGenerationMatch")
        if want is not None:
            have = _generation(storage, bucket, name)
            if have is not None and have != want[0]:
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "Precondition Failed"}})
                return
        handler(request, response, storage)
        read = response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT)
        if request.method == "GET" and read:
            have = _generation(storage, bucket, name)
            if have not in (None, "0"):
                response["x-goog-generation"] = have

    wrapped.rsa_jax_wrapped = True
    return wrapped


def _patch_handlers() -> None:
    from gcp_storage_emulator import server

    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if not getattr(handler, "rsa_jax_wrapped", False):
                handlers[method] = _with_generations(handler)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(bucket: str):
    """(server, its URL): an in-memory emulator holding `bucket`, serving from a thread of
    this process until `server.stop()`."""
    from gcp_storage_emulator.server import create_server

    _patch_handlers()
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def environment(url: str) -> dict[str, str]:
    """What points gcsfs (etils.epath) and TensorStore (Orbax) at the emulator, without
    credentials."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore's fixed bearer token
        # gcsfs's default file system asks the storage control API (not emulated) for each
        # bucket's layout and logs a warning every time it cannot; the plain one does not ask.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
