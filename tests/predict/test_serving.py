"""The registered head + encoder as one pyfunc model: `slicefm models pull` + `slicefm predict --model-dir`
offline, and a real `mlflow models serve` on 127.0.0.1 answering the same probabilities as `predict`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.models import Model

from slicefm.edge.cli import main
from slicefm.edge.tracking.mlflow_runs import _global_tracking_uri
from slicefm.edge.tracking.models import set_alias
from slicefm.edge.tracking.registry import register_encoder, register_head
from tests.conftest import LOOPBACK, free_port, wait_http_ok
from tests.predict.conftest import KEY, Trained

HEAD, ENCODER = "serve-test-location-head", "serve-test-encoder"
SERVE_START_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def registry(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A file-backed MLflow registry holding the encoder and its head (bundled), head version 1 = champion."""
    root = tmp_path_factory.mktemp("serve-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with _global_tracking_uri(uri):
        exp = mlflow.create_experiment("serve-test", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp):
            ev = register_encoder(str(trained.encoder), ENCODER)
            heads = Path(trained.evaluate) / "location" / "pretrained" / "abmil" / "heads"
            lineage = {"task": "location", "encoder_model": ENCODER, "encoder_version": ev}
            hv = register_head(heads, HEAD, lineage=lineage, encoder_dir=trained.encoder)
        set_alias(HEAD, hv, "champion", uri)
        yield uri


def test_the_registered_head_is_one_predicting_model_with_a_signature(registry, trained, tmp_path):
    dest = tmp_path / "pulled"
    assert main(["models", "pull", f"{HEAD}@champion", "--dest", str(dest), "--tracking-uri", registry]) == 0
    assert sorted(p.name for p in (dest / "encoder").iterdir()) == ["encoder.json", "encoder.safetensors"]
    assert (dest / "encoder" / "encoder.safetensors").read_bytes() == (
        trained.encoder / "encoder.safetensors"
    ).read_bytes()
    with _global_tracking_uri(registry):
        model = Model.load(f"models:/{HEAD}@champion")
    inputs = model.signature.inputs.to_dict()[0]
    assert inputs["tensor-spec"]["dtype"] == "uint8" and list(inputs["tensor-spec"]["shape"]) == [
        -1,
        2,
        32,
        32,
    ]
    names = [c["name"] for c in model.signature.outputs.to_dict()]
    assert names[0].startswith("p_location_") and names[-1].startswith("label_location_")


def _serve(model_uri: str, tracking_uri: str, port: int, log: Path) -> subprocess.Popen:
    # MLflow starts the server as `uvicorn` from PATH: this interpreter's venv, as an activated venv would have it.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": path}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "--host", LOOPBACK, "--port", str(port), "--workers", "1"]  # fmt: skip
    return subprocess.Popen(
        cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"{url}/invocations", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_served_model_answers_what_predict_writes(registry, trained, tmp_path, monkeypatch):
    monkeypatch.setenv("SLICEFM_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("SLICEFM_PSEUDONYM_KEY", KEY.decode())
    # predict from the registry (pulled into $SLICEFM_HOME/models and cached) on the raw DICOM.
    out = tmp_path / "pred"
    argv = ["predict", "--model", f"{HEAD}@champion", "--tracking-uri", registry, "--source", str(trained.raw),
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "state" / "models" / HEAD / "1" / "encoder" / "encoder.json").is_file()
    table = pd.read_parquet(out / "predictions.parquet").set_index("scan_id")
    assert json.loads((out / "predict.json").read_text())["model"]["version"] == "1"

    pre = Path(trained.preprocessed)
    slices = pd.read_parquet(pre / "slices.parquet")
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    log = tmp_path / "serve.log"
    proc = _serve(f"models:/{HEAD}@champion", registry, port, log)
    try:
        wait_http_ok(f"{url}/ping", proc, log, "mlflow models serve", SERVE_START_TIMEOUT_S)
        for scan_id in table.index[:2]:
            rows = slices[slices["scan_id"] == scan_id].sort_values("row")
            stack = np.load(pre / rows["stack"].iloc[0])[rows["row"].to_numpy()]
            status, body = _post(url, {"inputs": stack.tolist()})
            assert status == 200, body
            (answer,) = body["predictions"]
            expected = table.loc[scan_id]
            for key, value in answer.items():
                assert value == pytest.approx(float(expected[key]), abs=2e-5), key
            assert set(answer) == {c for c in table.columns if c.startswith(("p_", "label_"))}
        # A stack the model's preprocessing never makes is refused with the reason.
        status, body = _post(url, {"inputs": np.zeros((3, 2, 48, 48), np.uint8).tolist()})
        assert status >= 400 and "48" in json.dumps(body)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    shutil.rmtree(tmp_path / "state", ignore_errors=True)


def test_the_served_model_needs_only_its_declared_requirements(registry, trained, tmp_path):
    """A consumer's venv: the head model's requirements.txt (and their dependencies) and nothing else; slicefm
    only as the code the model carries. It predicts what `predict` computes for the same stack."""
    from mlflow.artifacts import download_artifacts

    from slicefm.predict.bundle import load_bundle
    from slicefm.predict.scoring import score_stack
    from tests.mlops.fresh_env import distribution_closure, make_venv, requirement_names, run_probe

    with _global_tracking_uri(registry):
        model = Path(download_artifacts(artifact_uri=f"models:/{HEAD}@champion", dst_path=str(tmp_path / "model")))
    declared = requirement_names((model / "requirements.txt").read_text().splitlines())
    assert "slicefm" not in distribution_closure(declared)
    python = make_venv(tmp_path / "venv", declared)
    pre = Path(trained.preprocessed)
    slices = pd.read_parquet(pre / "slices.parquet")
    rows = slices[slices["scan_id"] == slices["scan_id"].iloc[0]].sort_values("row")
    stack = np.load(pre / rows["stack"].iloc[0])[rows["row"].to_numpy()]
    np.save(tmp_path / "stack.npy", stack)
    got = run_probe(python, "stack", model, tmp_path / "stack.npy", tmp_path / "out", cwd=tmp_path)
    assert got["slicefm_importable"] is False
    assert Path(got["slicefm_file"]) == model / "code" / "slicefm" / "__init__.py"
    bundle = load_bundle(trained.model_dir)
    expected = score_stack(bundle, stack).probabilities
    for c, p in zip(bundle.class_names, expected, strict=True):
        assert got["row"][f"p_{c}"] == pytest.approx(float(p), abs=1e-6)
