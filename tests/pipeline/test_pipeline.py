"""The Kubeflow pipeline: compiles, runs locally through kfp.local with MLflow tracking, demo data reproducible."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines import runner
from slicefm.config import PipelineConfig, dump_config
from slicefm.pipeline_data import dvc_dir_md5, ensure_demo_data
from slicefm.tracking.pipeline_runs import child_runs, find_parent_run

ROOT = Path(__file__).resolve().parents[2]


def test_compiled_pipeline_wires_every_stage(tmp_path):
    path = runner.compile_pipeline(tmp_path / "p.yaml")
    spec = yaml.safe_load(path.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert {"start-tracking", "finish-tracking", "exit-handler-1"} <= set(tasks)
    inner = spec["root"]["dag"]["tasks"]["exit-handler-1"]
    inner_tasks = spec["components"][inner["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner_tasks) == {"ingest", "preprocess", "pretrain"}
    assert (
        inner_tasks["pretrain"]["inputs"]["artifacts"]["slices"]["taskOutputArtifact"]["producerTask"]
        == "preprocess"
    )
    assert (
        inner_tasks["preprocess"]["inputs"]["artifacts"]["scans"]["taskOutputArtifact"]["producerTask"]
        == "ingest"
    )
    assert tasks["finish-tracking"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"config_yaml", "data_source", "tracking_uri", "store_uri", "run_name", "data_version"} <= set(
        params
    )


def test_demo_dataset_regenerates_to_the_dvc_tracked_version(tmp_path):
    cfg = runner.load_config(ROOT / "pipelines/configs/demo-cpu.yaml")
    ensure_demo_data(cfg.data, tmp_path / "data" / "demo")
    recorded = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]["md5"]
    assert dvc_dir_md5(tmp_path / "data") == recorded


def test_local_run_tracks_every_stage(tmp_path, monkeypatch):
    pretrain = yaml.safe_load((ROOT / "pipelines/configs/demo-cpu.yaml").read_text())["pretrain"]
    pretrain["encoder"]["img_size"] = 32
    pretrain["lejepa"]["local_size"] = 16
    pretrain["schedule"] = {"max_steps": 4, "warmup_steps": 1}
    pretrain["loader"] = {"batch_size": 8, "workers": 0}
    pretrain["logging"] = {"every_steps": 2, "collapse_every": 2, "collapse_batch": 8}
    pretrain["checkpoint"] = {"every_steps": 2}
    cfg = PipelineConfig.model_validate(
        {
            "pretrain": pretrain,
            "name": "t",
            "experiment": "pipeline-test",
            "data": {"source": str(tmp_path / "data"), "phantom_scans": 4, "phantom_size": 64},
            "ingest": {"workers": 1},
            "preprocess": {"size": 32, "workers": 1, "n_shards": 2},
        }
    )
    config_path = tmp_path / "cfg.yaml"
    config_path.write_text(dump_config(cfg))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("SLICEFM_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    monkeypatch.delenv("SLICEFM_STORE", raising=False)
    assert runner.run_local(config_path, run_name="run-1") == 0
    parent = find_parent_run(tracking, "pipeline-test", "run-1")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["preprocess.size"] == "32"
    stages = {r.data.tags["slicefm.stage"]: r for r in child_runs(tracking, parent.info.run_id)}
    assert set(stages) == {"ingest", "preprocess", "pretrain"}
    assert stages["pretrain"].data.metrics["steps"] == 4
    assert all(r.info.status == "FINISHED" for r in stages.values())
    assert stages["ingest"].data.metrics["n_scans"] == 4
    out = Path(stages["preprocess"].data.tags["slicefm.output_uri"])
    slices = pd.read_parquet(out / "slices.parquet")
    assert len(slices) == stages["preprocess"].data.metrics["n_slices"] > 0
    artifacts = {a.path for a in MlflowClient(tracking).list_artifacts(stages["ingest"].info.run_id)}
    assert {"dataset.json", "quarantine.csv", "config.yaml"} <= artifacts
    assert (tmp_path / "state" / "pseudonym.key").exists()
    encoder_dir = Path(stages["pretrain"].data.tags["slicefm.output_uri"])
    meta = yaml.safe_load((encoder_dir / "encoder.json").read_text())
    assert meta["method"] == "lejepa" and (encoder_dir / "encoder.safetensors").stat().st_size > 0
    # The encoder is a registered model version that loads and embeds preprocessed slices.
    assert stages["pretrain"].data.tags["slicefm.registered_model"] == "t-encoder"
    import mlflow.pyfunc
    import numpy as np

    mlflow.set_tracking_uri(tracking)
    model = mlflow.pyfunc.load_model(
        f"models:/t-encoder/{stages['pretrain'].data.tags['slicefm.model_version']}"
    )
    emb = model.predict(np.random.default_rng(0).random((3, 2, 32, 32), dtype=np.float32))
    assert emb.shape[0] == 3 and np.isfinite(emb).all()


def test_submit_requires_a_host(tmp_path):
    with pytest.raises(SystemExit, match="KFP_HOST"):
        runner.submit(
            ROOT / "pipelines/configs/demo-cpu.yaml", host=None, namespace=None, experiment="e", token=None
        )
