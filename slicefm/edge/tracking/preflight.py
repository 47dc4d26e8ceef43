"""Checks to run before a stage spends hours training: is the tracking server up, is the artifact store
writable? Each raises one clear error naming the URI instead of failing at the first checkpoint."""

from __future__ import annotations

import logging
import secrets

from slicefm.core.store import StoreError, open_store
from slicefm.edge.tracking.mlflow_runs import TrackingError, check_tracking_server

logger = logging.getLogger(__name__)

__all__ = ["PreflightError", "TrackingError", "check_store", "check_tracking_server", "preflight"]

_PROBE_PREFIX = ".slicefm-preflight-"


class PreflightError(RuntimeError):
    """The artifact store cannot be written, read back or cleaned up."""


def check_store(uri: str, *, max_attempts: int | None = None, connect_timeout_s: float | None = None) -> None:
    """Write, read back and delete a small probe object at the store root.

    `max_attempts` / `connect_timeout_s` bound the S3 retries (S3Store's defaults otherwise), so a
    preflight against a dead endpoint answers in seconds rather than minutes.
    """
    options = {
        k: v
        for k, v in {"max_attempts": max_attempts, "connect_timeout_s": connect_timeout_s}.items()
        if v is not None
    }
    store = open_store(uri, **options) if uri.startswith("s3://") else open_store(uri)
    key = f"{_PROBE_PREFIX}{secrets.token_hex(8)}"
    payload = secrets.token_bytes(32)
    try:
        store.write_bytes(key, payload)
        try:
            if store.read_bytes(key) != payload:
                raise PreflightError(f"artifact store {store.uri('')}: probe object read back differently")
        finally:
            store.delete(key, missing_ok=True)
    except (StoreError, OSError) as exc:
        raise PreflightError(f"artifact store {store.uri('')} is not usable: {exc}") from exc
    logger.debug("artifact store %s: write/read/delete probe ok", store.uri(""))


# A preflight answers in seconds: one retry against S3 (botocore's jittered back-off sleeps at most 1 s before
# it), not the stage stores' 5 attempts (up to 15 s of back-off on top of the connect timeouts).
PREFLIGHT_STORE_ATTEMPTS = 2


def preflight(tracking_uri: str | None, store_uri: str | None, timeout_s: float = 5.0) -> None:
    """Both checks (each skipped when its URI is None), each bounded by `timeout_s` per connection."""
    if tracking_uri:
        check_tracking_server(tracking_uri, timeout_s)
    if store_uri:
        check_store(store_uri, max_attempts=PREFLIGHT_STORE_ATTEMPTS, connect_timeout_s=timeout_s)
