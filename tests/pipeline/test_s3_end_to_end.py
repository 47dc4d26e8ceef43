"""A full local pipeline run (kfp.local) with the artifact store on S3 (moto on loopback) and MLflow as a real
`mlflow server` proxying its artifacts to that S3: every stage writes to the bucket, the encoder and the
champion head are registered, and `slicefm models pull` in a fresh process gets them back byte-identical."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from pipelines import runner
from slicefm.edge.tracking.models import MANIFEST_NAME, MANIFEST_TAG
from slicefm.edge.tracking.pipeline_runs import child_runs, find_parent_run
from tests.pipeline.conftest import ROOT, bucket_keys, tiny_pipeline_config

RUN = "s3-run"
STAGES = ("ingest", "preprocess", "pretrain", "extract", "extract-random", "evaluate")


def _object(s3_admin, uri: str) -> bytes:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return s3_admin.get_object(Bucket=bucket, Key=key)["Body"].read()


def _pull(spec: str, dest: Path, tracking_uri: str) -> str:
    """`python -m slicefm models pull` in a fresh process; returns its stdout."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    cmd = [sys.executable, "-m", "slicefm", "models", "pull", spec, "--dest", str(dest)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def _assert_pulled_matches(
    dest: Path, s3_admin, source_uri: str, manifest_sha256: str, bundled: Path | None = None
) -> list[str]:
    """Every pulled payload file equals the object under `source_uri` (files under `encoder/`: the file of
    that name in `bundled`, the encoder the head was registered with); MANIFEST.json lists exactly those
    files with their sha256 and is the manifest the registry recorded. Returns the payload file names."""
    manifest_raw = (dest / MANIFEST_NAME).read_bytes()
    assert hashlib.sha256(manifest_raw).hexdigest() == manifest_sha256
    listed = {e["path"]: e["sha256"] for e in json.loads(manifest_raw)["files"]}
    on_disk = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert on_disk == sorted([*listed, MANIFEST_NAME])
    payload = [rel for rel in listed if rel != "lineage.json"]
    assert payload
    for rel in payload:
        data = (dest / rel).read_bytes()
        if bundled is not None and rel.startswith("encoder/"):
            assert data == (bundled / rel.removeprefix("encoder/")).read_bytes(), rel
        else:
            assert data == _object(s3_admin, f"{source_uri}/{rel}"), rel
        assert hashlib.sha256(data).hexdigest() == listed[rel], rel
    return payload


def test_local_run_on_s3_registers_models_pulled_back_byte_identical(
    tmp_path, monkeypatch, s3_env, s3_admin, mlflow_server, mlflow_bucket
):
    config_path = tiny_pipeline_config(tmp_path, external=False)
    store_uri = f"{s3_env}/runs"
    bucket = s3_env.removeprefix("s3://")
    monkeypatch.setenv("SLICEFM_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("SLICEFM_STORE", store_uri)
    assert runner.run_local(config_path, run_name=RUN) == 0

    parent = find_parent_run(mlflow_server, "pipeline-test", RUN)
    assert parent.info.status == "FINISHED"
    stages = {r.data.tags["slicefm.stage"]: r for r in child_runs(mlflow_server, parent.info.run_id)}
    assert set(stages) == set(STAGES)
    assert all(r.info.status == "FINISHED" for r in stages.values())

    # Every stage wrote to the bucket: the data steps under <store>/cache/<stage>/<content hash> (issue
    # 17.2: they take no per-run input), the others under <store>/<run name>/<stage>; nothing bulky stayed
    # on local disk.
    outputs = {stage: run.data.tags["slicefm.output_uri"] for stage, run in stages.items()}
    for stage in ("ingest", "preprocess"):
        assert outputs[stage].startswith(f"{store_uri}/cache/{stage}/"), outputs[stage]
    assert outputs["pretrain"] == f"{store_uri}/{RUN}/pretrain"
    assert outputs["evaluate"] == f"{store_uri}/{RUN}/evaluate"
    assert outputs["extract"].startswith(f"{store_uri}/{RUN}/extract-a-pretrained/")
    keys = bucket_keys(s3_admin, bucket, "runs/")
    for stage, uri in outputs.items():
        assert any(f"s3://{bucket}/{k}".startswith(uri + "/") for k in keys), f"{stage}: nothing in {uri}"
    assert f"runs/{RUN}/pretrain/encoder.safetensors" in keys
    assert f"{outputs['preprocess'].removeprefix(f's3://{bucket}/')}/slices.parquet" in keys
    assert any(k.startswith(f"runs/{RUN}/extract-a-pretrained/") and k.endswith(".npy") for k in keys)
    assert f"runs/{RUN}/extract-a-pretrained/embeddings.parquet" in keys  # the merged set
    assert f"runs/{RUN}/evaluate/results.json" in keys
    assert not list((tmp_path / "state").rglob("*.npy")) and not list(
        (tmp_path / "state").rglob("*.safetensors")
    )

    # The encoder: registered from the S3 output, its model files in the MLflow server's bucket.
    client = MlflowClient(mlflow_server)
    name, version = (
        stages["pretrain"].data.tags[f"slicefm.{k}"] for k in ("registered_model", "model_version")
    )
    assert name == "t-encoder"
    mv = client.get_model_version(name, version)
    dest = tmp_path / "pulled-encoder"
    assert f"pulled {name}:{version}" in _pull(f"{name}:{version}", dest, mlflow_server)
    payload = _assert_pulled_matches(dest, s3_admin, outputs["pretrain"], mv.tags[MANIFEST_TAG])
    assert sorted(payload) == ["encoder.json", "encoder.safetensors"]
    assert json.loads((dest / "lineage.json").read_text())["source_uri"] == outputs["pretrain"]
    model_id = mv.model_id or mv.source.rstrip("/").rsplit("/", 1)[-1]
    (weights_key,) = [
        k for k in bucket_keys(s3_admin, mlflow_bucket, "mlflow/")
        if model_id in k and k.endswith("/artifacts/encoder/encoder.safetensors")
    ]  # fmt: skip
    assert (dest / "encoder.safetensors").read_bytes() == _object(
        s3_admin, f"s3://{mlflow_bucket}/{weights_key}"
    )

    # The headline task's head: registered from its S3 folder with its encoder's version in its lineage (found
    # by the weights' hash), pulled by version; `champion` (head and encoder) only where the gate promoted it.
    head_name = stages["evaluate"].data.tags["slicefm.registered_head"]
    head_version = stages["evaluate"].data.tags["slicefm.head_version"]
    head_dest = tmp_path / "pulled-head"
    _pull(f"{head_name}:{head_version}", head_dest, mlflow_server)
    head_mv = client.get_model_version(head_name, head_version)
    assert (head_mv.tags["slicefm.encoder_model"], head_mv.tags["slicefm.encoder_version"]) == (name, version)
    assert head_mv.tags["slicefm.encoder_weights_sha256"] == mv.tags["slicefm.weights_sha256"]
    promoted = stages["evaluate"].data.tags["slicefm.promotion"].startswith("promoted: ")
    aliases = {n: client.get_registered_model(n).aliases for n in (name, head_name)}
    expected = {"champion": str(version)} if promoted else {}
    assert aliases == {name: expected, head_name: {"champion": str(head_version)} if promoted else {}}
    head_source = json.loads((head_dest / "lineage.json").read_text())["source_uri"]
    assert head_source.startswith(f"{outputs['evaluate']}/") and head_source.endswith("/heads")
    head_files = _assert_pulled_matches(
        head_dest, s3_admin, head_source, head_mv.tags[MANIFEST_TAG], bundled=dest
    )
    assert any(f.endswith(".safetensors") for f in head_files)
    assert {"encoder/encoder.json", "encoder/encoder.safetensors"} <= set(head_files)  # bundled: it predicts

    # Issue 18's user: `slicefm predict` with the registered head on the cohort's DICOM folder, in a fresh
    # process, gives the evaluate stage's probabilities for every (scan, fold) it scored.
    spec = f"{head_name}@champion" if promoted else f"{head_name}:{head_version}"
    out = tmp_path / "predictions"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    cmd = [sys.executable, "-m", "slicefm", "predict", "--model", spec, "--source", str(tmp_path / "data"),
           "--out", str(out), "--no-progress"]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    assert "predicted 8 scans" in res.stdout and "report.html" in res.stdout
    evaluated = pd.read_parquet(
        io.BytesIO(_object(s3_admin, f"{outputs['evaluate']}/location/pretrained/abmil/predictions.parquet"))
    )
    predicted = pd.read_parquet(out / "predictions_by_fold.parquet")
    merged = evaluated.merge(
        predicted, on=["scan_id", "fold"], suffixes=("_eval", "_pred"), validate="one_to_one"
    )
    assert len(merged) == len(evaluated) > 0
    classes = [c.removeprefix("p_") for c in predicted.columns if c.startswith("p_")]
    for c in classes:
        np.testing.assert_allclose(merged[f"p_{c}_pred"], merged[f"p_{c}_eval"], rtol=0, atol=2e-5)
    assert sorted(p.stem for p in (out / "attention").glob("*.png")) == sorted(predicted["scan_id"].unique())
