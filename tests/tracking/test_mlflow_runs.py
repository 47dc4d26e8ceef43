"""MLflow helpers against a real sqlite tracking store, with one stage run in a separate process."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import slicefm
from slicefm.edge.state import state_dir
from slicefm.edge.tracking.mlflow_runs import (
    MAX_PARAM_VALUE_CHARS,
    TrackingError,
    check_tracking_server,
    config_hash,
    finish_pipeline_run,
    flatten_params,
    git_commit,
    lineage_tags,
    log_artifact_dir,
    log_params_flat,
    resolve_tracking_uri,
    stage_run,
    start_pipeline_run,
    tracking_uri_default,
)

REPO_ROOT = Path(slicefm.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("project")


@pytest.fixture(scope="module")
def tracking_uri(project_dir: Path) -> str:
    # One sqlite database per module: creating it runs MLflow's schema migrations (a few seconds).
    return tracking_uri_default(project_dir / ".slicefm")


@pytest.fixture(autouse=True)
def _isolated_mlflow_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # anything MLflow might drop in the cwd lands in tmp
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()


def test_tracking_uri_default_and_resolution(tmp_path: Path) -> None:
    state = tmp_path / "state"
    uri = tracking_uri_default(state)
    assert uri == f"sqlite:///{state}/mlflow.db"
    assert uri.startswith("sqlite:////")  # four slashes: an absolute path for SQLAlchemy
    env = {"MLFLOW_TRACKING_URI": "http://mlflow.kubeflow:5000", "SLICEFM_HOME": str(state)}
    assert resolve_tracking_uri("http://explicit:5000", env) == "http://explicit:5000"
    assert resolve_tracking_uri(None, env) == "http://mlflow.kubeflow:5000"
    assert resolve_tracking_uri(None, {"SLICEFM_HOME": str(state)}) == uri
    # One state rule: without SLICEFM_HOME (or with it empty) the state is .slicefm/ under the cwd.
    assert resolve_tracking_uri(None, {"SLICEFM_HOME": ""}) == f"sqlite:///{Path.cwd()}/.slicefm/mlflow.db"
    assert state_dir({}) == Path.cwd() / ".slicefm"


def test_parent_and_nested_stages_across_processes(
    tracking_uri: str, project_dir: Path, tmp_path: Path
) -> None:
    tags = lineage_tags("a" * 40, config_hash({"seed": 0}), "dvc:1234abcd", None)
    parent_id = start_pipeline_run(tracking_uri, "nesting", "pipeline-1", tags)
    client = MlflowClient(tracking_uri)
    assert client.get_run(parent_id).info.status == "RUNNING"

    out_dir = tmp_path / "ingest-out"
    out_dir.mkdir()
    (out_dir / "quarantine.csv").write_text("file,reason\n")
    with stage_run(
        tracking_uri, parent_id, "ingest", {"source": {"kind": "phantom", "n": 3}}, {"k": "v"}
    ) as run:
        assert mlflow.active_run().info.run_id == run.info.run_id
        mlflow.log_metric("n_scans", 3)
        log_artifact_dir(out_dir, "ingest")
    ingest_id = run.info.run_id
    assert os.environ.get("MLFLOW_TRACKING_URI") is None  # the global URI is restored afterwards

    # A KFP component is its own process: the next stage only knows the tracking URI and the parent id.
    code = textwrap.dedent(f"""
        import mlflow
        from slicefm.edge.tracking.mlflow_runs import stage_run
        with stage_run({tracking_uri!r}, {parent_id!r}, "preprocess", {{"size": 256, "windows": ["lung"]}}) as r:
            mlflow.log_metric("n_slices", 120, step=0)
            print(r.info.run_id)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    preprocess_id = proc.stdout.strip().splitlines()[-1]

    finish_pipeline_run(tracking_uri, parent_id, "FINISHED")

    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mlflow.source.git.commit"] == "a" * 40
    assert parent.data.tags["slicefm.data_version"] == "dvc:1234abcd"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert {c.info.run_id for c in children} == {ingest_id, preprocess_id}
    by_stage = {c.data.tags["slicefm.stage"]: c for c in children}
    assert by_stage["ingest"].data.params == {"source.kind": "phantom", "source.n": "3"}
    assert by_stage["ingest"].data.metrics == {"n_scans": 3.0}
    assert by_stage["ingest"].data.tags["k"] == "v"
    assert by_stage["preprocess"].data.params == {"size": "256", "windows": '["lung"]'}
    assert by_stage["preprocess"].data.metrics == {"n_slices": 120.0}
    assert all(c.info.status == "FINISHED" for c in children)

    # Artifacts live beside the database, not in whatever directory the process started in.
    artifacts = [a.path for a in client.list_artifacts(ingest_id, "ingest")]
    assert artifacts == ["ingest/quarantine.csv"]
    assert list((project_dir / ".slicefm" / "mlartifacts").rglob("quarantine.csv"))
    assert not (tmp_path / "mlruns").exists()


def test_failing_stage_is_marked_failed(tracking_uri: str) -> None:
    parent_id = start_pipeline_run(tracking_uri, "failing", "pipeline-2", {})
    with pytest.raises(ZeroDivisionError):
        with stage_run(tracking_uri, parent_id, "pretrain", {"lr": 1e-3}) as run:
            mlflow.log_metric("loss", 2.5, step=0)
            _ = 1 / 0
    finish_pipeline_run(tracking_uri, parent_id, "FAILED")
    client = MlflowClient(tracking_uri)
    child = client.get_run(run.info.run_id)
    assert child.info.status == "FAILED"
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert child.data.params == {"lr": "0.001"}
    assert client.get_run(parent_id).info.status == "FAILED"
    assert mlflow.active_run() is None
    with pytest.raises(ValueError, match="status"):
        finish_pipeline_run(tracking_uri, parent_id, "DONE")


def test_logging_outside_a_stage_is_refused() -> None:
    with pytest.raises(TrackingError, match="no active MLflow run"):
        log_params_flat({"a": 1})
    with pytest.raises(TrackingError):
        log_artifact_dir(".", "x")


@dataclass
class _Crop:
    margin_mm: float
    keep_largest: bool


def test_flatten_params() -> None:
    flat = flatten_params(
        {
            "model": {"name": "vit_small_patch16_224", "img_size": 224, "stem": {"conv": True}},
            "windows": ["lung", "mediastinum"],
            "crop": _Crop(5.0, True),
            "out": Path("/data/out"),
            "extra": None,
            "empty": {},
            "scale": np.float32(0.5),
            "long": "x" * 2000,
        }
    )
    assert flat["model.name"] == "vit_small_patch16_224"
    assert flat["model.img_size"] == "224"
    assert flat["model.stem.conv"] == "true"
    assert flat["windows"] == '["lung", "mediastinum"]'
    assert flat["crop.margin_mm"] == "5.0" and flat["crop.keep_largest"] == "true"
    assert flat["out"] == '"/data/out"'
    assert flat["extra"] == "null" and flat["empty"] == "{}" and flat["scale"] == "0.5"
    assert len(flat["long"]) == MAX_PARAM_VALUE_CHARS and flat["long"].endswith("...")


def test_config_hash_is_canonical() -> None:
    a = {"seed": 0, "model": {"name": "mambaout", "dim": 384}}
    b = {"model": {"dim": 384, "name": "mambaout"}, "seed": 0}
    expected = hashlib.sha256(b'{"model":{"dim":384,"name":"mambaout"},"seed":0}').hexdigest()[:12]
    assert config_hash(a) == config_hash(b) == expected
    assert config_hash({**a, "seed": 1}) != expected
    assert config_hash({"p": Path("/x")}) == config_hash({"p": "/x"})


def test_lineage_tags_leave_out_unknowns() -> None:
    assert lineage_tags(None, "0123456789ab", None, "ghcr.io/x/slicefm:1.0") == {
        "slicefm.config_hash": "0123456789ab",
        "slicefm.image": "ghcr.io/x/slicefm:1.0",
    }


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_commit(tmp_path: Path) -> None:
    assert git_commit(tmp_path) is None
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f.txt").write_text("x")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert git_commit(tmp_path) == head and len(head) == 40
    assert git_commit(tmp_path / "missing-dir") is None


def test_check_tracking_server_closed_port(closed_port: int, requested_sleeps: list[float]) -> None:
    uri = f"http://127.0.0.1:{closed_port}"
    with pytest.raises(TrackingError, match=f"{uri} unreachable"):
        check_tracking_server(uri, timeout_s=2)
    assert requested_sleeps == []  # one probe, not MLflow's retry loop (which sleeps ~247 s)
    check_tracking_server("sqlite:///tmp/never-opened.db")  # no server needed


def _serve(status: int) -> tuple[http.server.HTTPServer, str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (stdlib naming)
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.mark.parametrize("status,healthy", [(200, True), (401, True), (503, False)])
def test_check_tracking_server_live(status: int, healthy: bool) -> None:
    server, uri = _serve(status)
    try:
        if healthy:
            check_tracking_server(uri + "/", timeout_s=2)
        else:
            with pytest.raises(TrackingError, match="HTTP 503"):
                check_tracking_server(uri, timeout_s=2)
    finally:
        server.shutdown()
        server.server_close()
