"""Shared fixtures: a real moto S3 server on loopback, AWS variables pointing at it, a real preprocess output."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest

LOOPBACK = "127.0.0.1"


def pytest_configure(config: pytest.Config) -> None:
    # Tests never phone home: MLflow (imported during collection) otherwise starts usage telemetry.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")


@pytest.fixture
def closed_port() -> int:
    """A loopback TCP port with nothing listening (bound by the OS, then released): connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


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


@pytest.fixture(scope="session")
def preprocessed(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Phantom DICOM -> ingest -> preprocess at 32 px (6 scans, 2 windows), built once per session."""
    from slicefm.config import PreprocessConfig
    from slicefm.data.ingest import ingest
    from slicefm.data.phantom_writers import generate_dataset
    from slicefm.preprocess.stage import run_preprocess

    root = tmp_path_factory.mktemp("pretrain_data")
    generate_dataset(root / "raw", 6, "dicom", seed=3, shape_xy=64)
    ingest(root / "raw", str(root / "ingest"), key=b"0" * 32, fmt="dicom", cohort="t", workers=1)
    run_preprocess(str(root / "ingest"), str(root / "pre"), PreprocessConfig(size=32, workers=1))
    return str(root / "pre")
