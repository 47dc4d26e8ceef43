"""boto3 plumbing of `S3Store`: clients that share one parsed service model, and the fast path of ranged
reads (a presigned GET per key, cached, fetched through urllib3 without boto3's per-request work)."""

from __future__ import annotations

import functools
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@functools.cache
def _botocore_loader() -> Any:
    from botocore.loaders import create_loader

    return create_loader()


def _boto3_session() -> Any:
    """A fresh boto3 session (credentials and endpoint re-resolved from the environment) that reuses one
    parsed copy of the S3 service model: parsing it costs ~0.2 s per client otherwise."""
    import boto3
    import botocore.session

    core = botocore.session.get_session()
    core.register_component("data_loader", _botocore_loader())
    return boto3.session.Session(botocore_session=core)


def _client_config(max_attempts: int, connect_timeout_s: float, read_timeout_s: float, **extra: Any) -> Any:
    """botocore Config of the store's clients: standard retries (`max_attempts` in total) and timeouts."""
    from botocore.config import Config

    # botocore's "auto" addressing already uses path style when AWS_ENDPOINT_URL points at an
    # S3-compatible server (MinIO, Ceph, moto), which rarely has wildcard DNS for bucket.host.
    # total_max_attempts counts the first try; botocore's "max_attempts" would count retries only.
    return Config(
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        **extra,
    )


# Fast range reads (`S3Store.read_range`): a presigned GET URL per key, reused for a while, fetched through
# urllib3. The URL is signed once (SigV4, host header only, so any Range header can be sent); each read is a
# plain HTTP request, without boto3's per-request signing, event hooks and response parsing.
_PRESIGN_EXPIRES_S = 15 * 60  # validity of a presigned URL
_PRESIGN_REUSE_S = 10 * 60  # reused this long: 5 min margin for slow reads and clock drift
_PRESIGN_CACHE_MAX = 65_536  # keys; the cache is cleared when it is full (a presign costs ~0.4 ms)
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})  # what botocore's standard mode retries by status
_MAX_BACKOFF_S = 20.0  # botocore's standard-mode cap


def _backoff_s(failures: int) -> float:
    """botocore's standard-mode back-off after the `failures`-th failed attempt: full jitter, base 2, capped."""
    return min(random.random() * 2 ** (failures - 1), _MAX_BACKOFF_S)


def _s3_error(body: bytes) -> tuple[str, str]:
    """(Code, Message) of an S3 XML error body ('' where absent)."""

    def field(name: bytes) -> str:
        match = re.search(b"<" + name + b">([^<]*)</" + name + b">", body)
        return match.group(1).decode("utf-8", "replace") if match else ""

    return field(b"Code"), field(b"Message")


def _client_verify() -> bool | str:
    """TLS verification a boto3 client uses when none is passed: the `ca_bundle` setting (AWS_CA_BUNDLE or
    the config file), else REQUESTS_CA_BUNDLE, else the default bundle (True)."""
    import botocore.session

    bundle = botocore.session.get_session().get_config_variable("ca_bundle")
    return bundle if bundle is not None else os.environ.get("REQUESTS_CA_BUNDLE", True)


def _tls_options(verify: bool | str) -> dict[str, Any]:
    """urllib3 pool arguments for botocore's `verify` value (applied to https endpoints only)."""
    from botocore.httpsession import get_cert_path

    if not verify:
        return {"cert_reqs": "CERT_NONE"}
    return {"cert_reqs": "CERT_REQUIRED", "ca_certs": get_cert_path(verify)}


@dataclass(frozen=True)
class _Presigned:
    """A presigned GET, split for `HTTPConnectionPool.urlopen`, and until when it is reused (monotonic)."""

    scheme: str
    host: str
    port: int | None
    target: str  # path and query
    reuse_until: float


class _RangeGetter:
    """Presigned GET URLs cached per key and a urllib3 pool (one per process): the fast path of
    `S3Store.read_range`. Pickles as its settings only; the pool is rebuilt in each process (fork-safe)."""

    def __init__(self, max_attempts: int, connect_timeout_s: float, read_timeout_s: float) -> None:
        self._settings = (max_attempts, connect_timeout_s, read_timeout_s)
        self._presigner: Any = None
        self._urls: dict[tuple[str, str], _Presigned] = {}
        self._pool: tuple[int, Any] | None = None  # (pid, PoolManager)
        self.redirected: set[str] = set()  # buckets answered with a redirect: boto3 handles those

    # The presigning client (not picklable), the URL cache and the pool stay in their process.
    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self._settings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(*state["settings"])  # type: ignore[misc]

    @property
    def presigner(self) -> Any:
        """A boto3 client like the store's, signing with SigV4: botocore presigns with SigV2 by default in
        regions that still accept it (us-east-1), which AWS has deprecated."""
        if self._presigner is None:
            config = _client_config(*self._settings, signature_version="s3v4")
            self._presigner = _boto3_session().client("s3", config=config)
        return self._presigner

    @property
    def endpoint_url(self) -> str:
        return str(self.presigner.meta.endpoint_url)

    def url(self, bucket: str, key: str, *, fresh: bool = False) -> _Presigned:
        """The cached presigned GET of `key`, signed anew when `fresh` or past its reuse window."""
        now = time.monotonic()
        hit = self._urls.get((bucket, key))
        if hit is not None and not fresh and now < hit.reuse_until:
            return hit
        from urllib3.util import parse_url

        url = self.presigner.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=_PRESIGN_EXPIRES_S
        )
        parts = parse_url(url)
        signed = _Presigned(
            str(parts.scheme), str(parts.host), parts.port, parts.request_uri, now + _PRESIGN_REUSE_S
        )
        if len(self._urls) >= _PRESIGN_CACHE_MAX:
            self._urls.clear()
        self._urls[(bucket, key)] = signed
        return signed

    def pool(self) -> Any:
        """This process's urllib3 PoolManager with TLS set up as botocore's (a forked child builds its own),
        or None where the endpoint is reached through a proxy (left to botocore's proxy support)."""
        pid = os.getpid()
        if self._pool is None or self._pool[0] != pid:
            self._pool = (pid, self._new_pool())
        return self._pool[1]

    def _new_pool(self) -> Any:
        import urllib3
        from botocore.utils import get_environ_proxies

        endpoint = self.endpoint_url
        if urlsplit(endpoint).scheme in get_environ_proxies(endpoint):
            return None
        timeout = urllib3.Timeout(connect=self._settings[1], read=self._settings[2])
        return urllib3.PoolManager(
            maxsize=10, timeout=timeout, retries=False, **_tls_options(_client_verify())
        )

    @staticmethod
    def get(pool: Any, signed: _Presigned, start: int, length: int) -> Any:
        """One ranged GET (no retries, no redirects, body read whole and not decoded): the urllib3 response."""
        conn = pool.connection_from_host(signed.host, signed.port, signed.scheme)
        return conn.urlopen(
            "GET",
            signed.target,
            headers={"Range": f"bytes={start}-{start + length - 1}"},
            retries=False,
            redirect=False,
            assert_same_host=False,
            decode_content=False,  # bytes as stored, like boto3 (an object may carry Content-Encoding)
        )
