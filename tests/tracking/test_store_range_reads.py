"""`S3Store.read_range`'s fast path (a cached presigned GET through urllib3) against moto's real S3 server
and scripted loopback HTTP(S) servers: same bytes and errors as boto3, retries, re-presigning, TLS, pickling,
fork. Each test also checks which path served the reads (boto3 GetObject calls are counted on the client)."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import multiprocessing
import os
import pickle
import ssl
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest

from slicefm.core import s3_client
from slicefm.core.store import S3Store, StoreError, open_store
from tests.conftest import LOOPBACK
from tests.loopback_http import loopback_server

PAYLOAD = np.random.default_rng(5).integers(0, 256, size=300_000, dtype=np.uint8).tobytes()
ERROR_CODES = {301: "PermanentRedirect", 403: "AccessDenied", 500: "InternalError", 503: "SlowDown"}


def boto3_gets(store: S3Store) -> list[str]:
    """URLs of the GetObject requests the store's boto3 client sends from now on (the fallback path)."""
    sent: list[str] = []
    store.client.meta.events.register(
        "before-send.s3.GetObject", lambda request, **_: sent.append(request.url)
    )
    return sent


def cached(store: S3Store, key: str) -> s3_client._Presigned:
    return store._ranges._urls[(store.bucket, store._full_key(key))]


class ScriptedS3:
    """A loopback HTTP(S) server answering every GET with the next status of a script (the last one
    repeats), or boto3's requests with `boto3_status` when given: 206 serves PAYLOAD's requested range,
    others an S3 XML error. Logs whether each request came presigned (query signature) or from boto3."""

    def __init__(
        self, statuses: list[int], tls: ssl.SSLContext | None = None, boto3_status: int | None = None
    ) -> None:
        self.statuses = list(statuses)
        self.boto3_status = boto3_status
        self.requests: list[tuple[str, str]] = []  # ("presigned" | "boto3", path)
        self._server, thread = loopback_server(self._handle, ("GET", "HEAD"))
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        thread.start()
        host, port = self._server.server_address[:2]
        self.url = f"{'https' if tls else 'http'}://{host}:{port}"

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.requests if k == kind)

    def _handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        kind = "presigned" if "X-Amz-Signature=" in req.path else "boto3"
        self.requests.append((kind, req.path))
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if kind == "boto3" and self.boto3_status is not None:
            status = self.boto3_status
        headers = {"Content-Type": "application/xml"}
        if status == 206:
            first, last = (int(x) for x in req.headers["Range"].removeprefix("bytes=").split("-"))
            body = PAYLOAD[first : last + 1]
            headers = {"Content-Range": f"bytes {first}-{last}/{len(PAYLOAD)}"}
        else:
            code = ERROR_CODES.get(status, "Error")
            body = f"<Error><Code>{code}</Code><Message>scripted {status}</Message></Error>".encode()
        req.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            req.send_header(name, value)
        req.end_headers()
        if method == "GET":
            req.wfile.write(body)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def scripted(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[type[ScriptedS3]]:
    """Start ScriptedS3 servers with the AWS variables of `s3_env`; the caller aims AWS_ENDPOINT_URL at one."""
    servers: list[ScriptedS3] = []

    def start(
        statuses: list[int], tls: ssl.SSLContext | None = None, boto3_status: int | None = None
    ) -> ScriptedS3:
        servers.append(ScriptedS3(statuses, tls, boto3_status))
        return servers[-1]

    yield start  # type: ignore[misc]
    for server in servers:
        server.close()


def test_fast_reads_give_the_same_bytes_as_boto3(s3_env: str) -> None:
    fast, slow = open_store(f"{s3_env}/p"), open_store(f"{s3_env}/p", fast_range_reads=False)
    key = "dir/a b+c=d.bin"  # characters that must survive the presigned URL's encoding
    fast.write_bytes(key, PAYLOAD)
    fast_gets, slow_gets = boto3_gets(fast), boto3_gets(slow)
    n = len(PAYLOAD)
    ranges = [(0, 1), (n - 1, 1), (0, n), (12_345, 131_072), (n - 10, 10), (131_072, 131_072)]
    for start, length in ranges:
        want = PAYLOAD[start : start + length]
        assert fast.read_range(key, start, length) == want
        assert slow.read_range(key, start, length) == want
    assert fast_gets == [] and len(slow_gets) == len(ranges)
    # npy rows go through read_range too.
    stack = np.arange(6 * 4 * 5, dtype=np.float16).reshape(6, 4, 5)
    fast.write_npy("s.npy", stack)
    np.testing.assert_array_equal(fast.read_npy_rows("s.npy", 5, 6), stack[5:6])
    assert fast_gets == []


def test_fast_reads_return_stored_bytes_of_content_encoded_objects(s3_env: str, s3_admin) -> None:
    store = open_store(s3_env)
    # Not gzip data at all: a client that decoded Content-Encoding would fail or change the bytes.
    s3_admin.put_object(Bucket=store.bucket, Key="enc.bin", Body=PAYLOAD[:5000], ContentEncoding="gzip")
    gets = boto3_gets(store)
    assert store.read_range("enc.bin", 10, 4000) == PAYLOAD[10:4010]
    assert gets == []


def test_missing_key_and_bucket(s3_env: str) -> None:
    store = open_store(f"{s3_env}/p")
    gets = boto3_gets(store)
    with pytest.raises(FileNotFoundError) as info:
        store.read_range("no/such.bin", 0, 4)
    assert store.uri("no/such.bin") in str(info.value)
    assert gets == []  # answered by the presigned GET's 404 NoSuchKey
    other = open_store("s3://no-such-bucket-7c1d/p")
    other_gets = boto3_gets(other)
    with pytest.raises(StoreError, match=r"reading s3://no-such-bucket-7c1d/p/k: NoSuchBucket"):
        other.read_range("k", 0, 4)  # NoSuchBucket is boto3's to report, as before
    assert len(other_gets) == 1


def test_ranges_past_the_end_and_empty_reads(s3_env: str) -> None:
    store = open_store(s3_env)
    store.write_bytes("blob.bin", PAYLOAD[:1000])
    gets = boto3_gets(store)
    uri = store.uri("blob.bin")
    with pytest.raises(ValueError, match=f"byte range past the end of {uri}"):
        store.read_range("blob.bin", 1000, 5)  # starts past the end: 416
    with pytest.raises(
        ValueError, match=rf"range \[995, 1005\) extends past the end of {uri} \(got 5 bytes\)"
    ):
        store.read_range("blob.bin", 995, 10)  # ends past the end: a short 206
    assert gets == []
    assert store.read_range("blob.bin", 17, 0) == b""
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        store.read_range("nothing.bin", 0, 0)


def test_url_past_its_reuse_window_is_signed_anew(s3_env: str, scripted) -> None:
    store = open_store(s3_env)
    store.write_bytes("k.bin", PAYLOAD)
    assert store.read_range("k.bin", 0, 10) == PAYLOAD[:10]
    # Aim the cached entry at a server that would fail it, and age it past the reuse window.
    trap = scripted([403])
    port = int(trap.url.rsplit(":", 1)[1])
    stale = dataclasses.replace(cached(store, "k.bin"), port=port, reuse_until=time.monotonic() - 1)
    store._ranges._urls[(store.bucket, "k.bin")] = stale
    gets = boto3_gets(store)
    assert store.read_range("k.bin", 100, 50) == PAYLOAD[100:150]
    assert trap.requests == [] and gets == []
    assert cached(store, "k.bin").port != port


def test_forbidden_url_is_presigned_again_once(s3_env: str, scripted) -> None:
    store = open_store(s3_env)
    store.write_bytes("k.bin", PAYLOAD)
    store.read_range("k.bin", 0, 10)
    # An expired or revoked URL: the server answers 403 to it (moto does not check presigned expiry).
    denier = scripted([403])
    port = int(denier.url.rsplit(":", 1)[1])
    store._ranges._urls[(store.bucket, "k.bin")] = dataclasses.replace(cached(store, "k.bin"), port=port)
    gets = boto3_gets(store)
    assert store.read_range("k.bin", 5, 100) == PAYLOAD[5:105]
    assert denier.count("presigned") == 1 and gets == []
    assert cached(store, "k.bin").port != port


def test_denied_twice_is_boto3s_store_error(scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    server = scripted([403])
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    store = S3Store("bkt", max_attempts=3)
    with pytest.raises(StoreError, match=r"reading s3://bkt/k: AccessDenied"):
        store.read_range("k", 0, 10)
    # Presigned, presigned anew, then boto3 once (403 is not retried).
    assert [kind for kind, _ in server.requests] == ["presigned", "presigned", "boto3"]


def test_5xx_is_retried_with_backoff_then_a_store_error(scripted, monkeypatch, requested_sleeps) -> None:
    server = scripted([503])
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    store = S3Store("bkt", "p", max_attempts=3)
    with pytest.raises(StoreError) as info:
        store.read_range("k", 0, 10)
    assert info.value.uri == "s3://bkt/p/k"
    assert str(info.value) == (
        f"S3 request failed while reading s3://bkt/p/k: SlowDown scripted 503 (HTTP 503 from {server.url}, "
        "3 attempts)"
    )
    assert server.count("presigned") == 3 and server.count("boto3") == 0
    assert len(requested_sleeps) == 2 and requested_sleeps[1] <= 2.0  # botocore's jitter: <= 1 s, <= 2 s


def test_5xx_then_success(scripted, monkeypatch, requested_sleeps) -> None:
    server = scripted([500, 502, 206])
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    store = S3Store("bkt", max_attempts=3)
    assert store.read_range("k", 1000, 2000) == PAYLOAD[1000:3000]
    assert server.count("presigned") == 3 and server.count("boto3") == 0
    assert len(requested_sleeps) == 2


def test_stopped_server_is_a_store_error_after_the_retries(s3_env, monkeypatch, requested_sleeps) -> None:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    try:
        store = S3Store("bkt-stopped", max_attempts=3, connect_timeout_s=2, read_timeout_s=5)
        store.client.create_bucket(Bucket="bkt-stopped")
        store.write_bytes("k", PAYLOAD[:100])
        assert store.read_range("k", 0, 10) == PAYLOAD[:10]  # URL and pool set up while it runs
    finally:
        server.stop()
    gets = boto3_gets(store)
    with pytest.raises(StoreError) as info:
        store.read_range("k", 0, 10)
    assert str(info.value).startswith(
        f"S3 endpoint {endpoint} unreachable while reading s3://bkt-stopped/k: "
    )
    assert len(requested_sleeps) == 2 and gets == []


def test_pickled_store_reads_through_its_own_pool(s3_env: str) -> None:
    store = open_store(f"{s3_env}/p")
    store.write_bytes("k.bin", PAYLOAD)
    assert store.read_range("k.bin", 0, 4) == PAYLOAD[:4]  # pool, presigner and cache now populated
    child = store.child("sub")
    assert child._ranges is store._ranges  # children share the cache and pool
    clone = pickle.loads(pickle.dumps(store))
    assert clone._ranges._urls == {} and clone._ranges._pool is None
    gets = boto3_gets(clone)
    assert clone.read_range("k.bin", 7, 70_000) == PAYLOAD[7:70_007]
    assert gets == [] and clone._ranges._pool is not None


_FORKED: list[S3Store] = []  # what a forked worker inherits (arguments to `apply` would be pickled)


def _read_in_forked_child() -> tuple[bytes, bool, int]:
    store = _FORKED[0]
    gets = boto3_gets(store)
    data = store.read_range("k.bin", 3, 1000)
    pid, _pool = store._ranges._pool
    return data, pid == os.getpid(), len(gets)


def test_forked_process_builds_its_own_pool(s3_env: str) -> None:
    store = open_store(s3_env)
    store.write_bytes("k.bin", PAYLOAD)
    store.read_range("k.bin", 0, 4)
    parent_pool = store._ranges._pool
    _FORKED[:] = [store]
    try:
        with multiprocessing.get_context("fork").Pool(1) as workers:  # as DataLoader workers on Linux
            data, own_pool, boto3_reads = workers.apply(_read_in_forked_child)
    finally:
        _FORKED.clear()
    assert data == PAYLOAD[3:1003] and own_pool and boto3_reads == 0
    assert store._ranges._pool is parent_pool


def test_proxied_endpoint_reads_through_boto3(s3_env: str, monkeypatch, closed_port: int) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://{LOOPBACK}:{closed_port}")
    for var in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    store = S3Store(s3_env.removeprefix("s3://"), max_attempts=1)
    gets = boto3_gets(store)
    # Only boto3 knows the proxy: a direct fast read would reach moto and succeed.
    with pytest.raises(StoreError, match="unreachable"):
        store.read_range("k", 0, 4)
    assert len(gets) == 1


def test_redirected_bucket_is_left_to_boto3(scripted, monkeypatch) -> None:
    server = scripted([301], boto3_status=206)  # as a bucket in another region: boto3 follows redirects
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    store = S3Store("bkt", max_attempts=1)
    assert store.read_range("k", 0, 4) == PAYLOAD[:4]
    assert store.read_range("k", 9, 4) == PAYLOAD[9:13]
    assert [kind for kind, _ in server.requests] == ["presigned", "boto3", "boto3"]


@pytest.mark.parametrize("variable", [None, "AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE"])
def test_tls_verification_is_the_clients(s3_env: str, monkeypatch, tmp_path: Path, variable) -> None:
    for var in ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    if variable:
        (tmp_path / "ca.pem").write_text("unused")
        monkeypatch.setenv(variable, str(tmp_path / "ca.pem"))
    store = open_store(s3_env)
    assert s3_client._client_verify() == store.client._endpoint.http_session._verify


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A CA-flagged self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_pem, key_pem = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_pem, key_pem


def test_https_endpoint_verified_against_aws_ca_bundle(scripted, monkeypatch, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server = scripted([206], tls)
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    untrusted = S3Store("bkt", max_attempts=1)
    with pytest.raises(StoreError, match=f"S3 endpoint {server.url} unreachable while reading s3://bkt/k: "):
        untrusted.read_range("k", 0, 10)  # the certificate is not in the default bundle
    assert server.requests == []
    monkeypatch.setenv("AWS_CA_BUNDLE", str(cert))
    store = S3Store("bkt", max_attempts=1)
    assert store.read_range("k", 40, 4000) == PAYLOAD[40:4040]
    assert server.count("presigned") == 1 and server.count("boto3") == 0
