"""Shared fixtures: a real moto S3 server on loopback, AWS variables pointing at it, a real `mlflow server`
whose proxied artifact store is a bucket on that S3 server, a real preprocess output."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"
SERVER_START_TIMEOUT_S = 90.0


def pytest_configure(config: pytest.Config) -> None:
    # Tests never phone home: MLflow (imported during collection) otherwise starts usage telemetry.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")


@pytest.fixture(scope="session")
def session_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One pseudonymisation key file for the whole test session (the user's own key is never touched)."""
    from slicefm.data.pseudonym import create_key

    path = tmp_path_factory.mktemp("key") / "pseudonym.key"
    create_key(path)
    return path


@pytest.fixture(autouse=True)
def _isolated_pseudonym_key(session_key_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test resolves the key by the product's rule, from the session's key file."""
    from slicefm.data.pseudonym import KEY_ENV, KEY_FILE_ENV

    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.setenv(KEY_FILE_ENV, str(session_key_file))


def free_port() -> int:
    """A loopback TCP port the OS just handed out and released: nothing listens on it (yet)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def closed_port() -> int:
    """A loopback TCP port with nothing listening: connections are refused."""
    return free_port()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's real S3 server (HTTP on 127.0.0.1, OS-chosen port); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_admin(s3_server: str):
    """A boto3 client bound explicitly to the moto server, for test setup (bucket creation, inspection)."""
    import boto3

    return boto3.session.Session().client(
        "s3",
        endpoint_url=s3_server,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


@pytest.fixture
def s3_env(s3_server: str, s3_admin, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """AWS variables aimed at the moto server plus a fresh bucket; yields "s3://<bucket>"."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # Keep a developer's own AWS profile, session token or config files out of the tests.
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_admin.create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"


def wait_http_ok(
    url: str, proc: subprocess.Popen, log: Path, name: str = "mlflow server", timeout_s: float = SERVER_START_TIMEOUT_S
) -> None:
    """Poll `url` until it answers 200; fail with the server log's tail if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(urllib.error.URLError, OSError):
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.3)
    raise RuntimeError(f"{name} not ready after {timeout_s:g} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def mlflow_bucket(s3_admin) -> str:
    """A bucket of its own for the server's artifacts (module scope, unlike the per-test `s3_env`)."""
    bucket = f"mlflow-{uuid.uuid4().hex[:12]}"
    s3_admin.create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(scope="module")
def mlflow_server(
    s3_server: str, mlflow_bucket: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`mlflow server` subprocess (sqlite backend in tmp, artifacts proxied to s3://<bucket>/mlflow on
    moto); yields its http URL once /health answers. Clients need no S3 credentials (proxied mode)."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": s3_server,
        "MLFLOW_S3_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host", LOOPBACK,
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{mlflow_bucket}/mlflow",
    ]  # fmt: skip
    log = tmp / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://{LOOPBACK}:{port}"
    try:
        wait_http_ok(f"{url}/health", proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Phantom DICOM -> ingest (6 scans at 64 px), built once per session."""
    from slicefm.data.ingest import ingest
    from slicefm.phantom.dataset import generate_dataset

    root = tmp_path_factory.mktemp("ingested")
    generate_dataset(root / "raw", 6, "dicom", seed=3, shape_xy=64)
    ingest(root / "raw", str(root / "ingest"), key=b"0" * 32, fmt="dicom", cohort="t", workers=1)
    return str(root / "ingest")


@pytest.fixture(scope="session")
def preprocessed(ingested: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """`ingested` -> preprocess at 32 px (6 scans, 2 windows), built once per session."""
    from slicefm.preprocess.config import PreprocessConfig
    from slicefm.preprocess.stage import run_preprocess

    out = tmp_path_factory.mktemp("pretrain_data") / "pre"
    run_preprocess(ingested, str(out), PreprocessConfig(size=32, workers=1))
    return str(out)


@pytest.fixture
def requested_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every time.sleep the code under test asks for, each cut to <= 10 ms: retry and back-off loops are
    checked by what they request (deterministic), never by a wall-clock bound that fails on a loaded machine."""
    slept: list[float] = []
    real_sleep = time.sleep

    def fake_sleep(seconds: float) -> None:
        slept.append(float(seconds))
        real_sleep(min(float(seconds), 0.01))

    monkeypatch.setattr(time, "sleep", fake_sleep)
    return slept
