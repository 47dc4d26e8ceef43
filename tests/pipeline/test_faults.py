"""Faults on real protocols over loopback: the S3 endpoint going away in the middle of a stage, and MLflow
down when a pipeline run starts."""

from __future__ import annotations

import contextlib
import inspect
import socket
import threading
from urllib.parse import urlsplit

import pytest

from slicefm.config import PipelineConfig
from slicefm.core import store as store_module
from slicefm.core.store import S3Store, StoreError
from slicefm.edge.stages import preprocess_stage
from tests.conftest import LOOPBACK
from tests.pipeline.conftest import bucket_keys, tiny_pipeline_config


class CuttableProxy:
    """A TCP relay on loopback to an HTTP server; `cut()` closes the listener and every open connection, so
    clients then get "connection refused", as from an endpoint that went away."""

    def __init__(self, target_url: str) -> None:
        target = urlsplit(target_url)
        self._target = (target.hostname, target.port)
        self._listener = socket.create_server((LOOPBACK, 0))
        self.url = f"http://{LOOPBACK}:{self._listener.getsockname()[1]}"
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # cut
                return
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._open += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._relay, args=(src, dst), daemon=True).start()

    @staticmethod
    def _relay(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            for sock in [self._listener, *self._open]:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def test_s3_lost_mid_stage_is_retried_then_fails_naming_key_and_endpoint_leaving_nothing_partial(
    ingested, s3_env, s3_server, s3_admin, monkeypatch
):
    """The endpoint dies after the first scan's files: the next write is retried max_attempts times, then a
    StoreError names the object and the endpoint; the bucket holds only whole objects of finished scans,
    no stage result, no pending multipart upload; a re-run against a live endpoint resumes from there."""
    proxy = CuttableProxy(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    puts: list[str] = []  # URL of every PutObject attempt, retries included

    def on_put(request, **_) -> None:  # noqa: ANN001
        puts.append(request.url)
        if any(url.endswith(".crop.json") for url in puts[:-1]):  # the first scan is complete
            proxy.cut()

    def session():  # noqa: ANN202
        sess = real_session()
        sess.events.register("before-send.s3.PutObject", on_put)
        return sess

    real_session = store_module._boto3_session
    monkeypatch.setattr(store_module, "_boto3_session", session)
    cfg = PipelineConfig.model_validate({"preprocess": {"size": 32, "workers": 1, "n_shards": 2}})
    bucket = s3_env.removeprefix("s3://")
    prefix = "runs/r/preprocess/"
    with pytest.raises(StoreError) as info:
        preprocess_stage(cfg, ingested, f"{s3_env}/{prefix}")

    failed_key = info.value.uri.removeprefix(f"{s3_env}/{prefix}")
    message = str(info.value)
    assert f"S3 endpoint {proxy.url} unreachable while writing {info.value.uri}" in message
    max_attempts = inspect.signature(S3Store).parameters["max_attempts"].default
    assert max_attempts > 1
    assert [url for url in puts if url.endswith(failed_key)] == [puts[-1]] * max_attempts
    first_scan = next(url for url in puts if url.endswith(".crop.json")).rsplit("/", 1)[1].split(".")[0]
    kept = bucket_keys(s3_admin, bucket, prefix, relative=True)
    # Besides the first scan's objects, only the identity the re-run checks before it resumes.
    assert "preprocess.resume.json" in kept
    kept.remove("preprocess.resume.json")
    assert failed_key not in kept and first_scan not in failed_key
    assert kept and all(first_scan in key for key in kept), kept
    assert {f"index/{first_scan}.parquet", f"index/{first_scan}.crop.json"} <= set(kept)
    assert not s3_admin.list_multipart_uploads(Bucket=bucket).get("Uploads")

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setattr(store_module, "_boto3_session", real_session)
    resumed = preprocess_stage(cfg, ingested, f"{s3_env}/{prefix}")
    assert resumed.n_skipped == 1 and resumed.n_scans > 1
    assert {"preprocess.json", "slices.parquet", failed_key} <= set(
        bucket_keys(s3_admin, bucket, prefix, relative=True)
    )


@pytest.mark.parametrize("down", ["mlflow", "s3"])
def test_pipeline_run_with_mlflow_or_store_down_fails_before_any_stage(
    down, tmp_path, monkeypatch, s3_env, s3_admin, closed_port, caplog, requested_sleeps
):
    from slicefm.edge.cli import main

    dead = f"http://{LOOPBACK}:{closed_port}"
    store = f"{s3_env}/runs"
    config_path = tiny_pipeline_config(tmp_path, external=False)
    monkeypatch.setenv("SLICEFM_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("SLICEFM_STORE", store)
    if down == "mlflow":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
        expected = f"MLflow tracking server {dead} unreachable"
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
        expected = f"artifact store {store} is not usable: S3 endpoint {dead} unreachable"
    assert main(["pipeline", "run", "--config", str(config_path), "--run-name", "down"]) == 1
    # Fails fast: no retry back-off loop (MLflow's HTTP retries alone would ask for ~247 s of sleep; the
    # stage stores' 5 S3 attempts up to 15 s): the S3 preflight retries once, after at most 1 s.
    if down == "mlflow":
        assert requested_sleeps == [], requested_sleeps
    else:
        assert len(requested_sleeps) == 1 and requested_sleeps[0] <= 1.0, requested_sleeps
    assert expected in caplog.text
    # Nothing ran: no data generated, no KFP task, no MLflow database, nothing in the bucket.
    assert not (tmp_path / "data").exists() and not (tmp_path / "state" / "kfp").exists()
    assert not (tmp_path / "mlflow.db").exists()
    assert bucket_keys(s3_admin, s3_env.removeprefix("s3://"), "") == []


def test_pipeline_start_step_refuses_an_unreachable_mlflow(closed_port):
    """On a cluster nothing runs before the start-tracking step, which checks the server first."""
    from kfp.dsl import Markdown

    from components.tracking import start_tracking
    from slicefm.edge.tracking.mlflow_runs import TrackingError

    dead = f"http://{LOOPBACK}:{closed_port}"
    with pytest.raises(TrackingError, match=f"MLflow tracking server {dead} unreachable"):
        start_tracking.python_func(
            tracking_uri=dead, experiment="e", run_name="r", config_yaml="name: x\n", data_version="",
            mlflow_run=Markdown(name="m", uri="/nonexistent/m.md"),
        )
