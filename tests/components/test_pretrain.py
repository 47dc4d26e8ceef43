"""pretrain: preprocessed slices -> a pretrained encoder (safetensors + encoder.json), tracked and registered."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow.artifacts
import pytest
import torch
from kfp.dsl import Metrics
from mlflow.tracking import MlflowClient

from components.pretrain import pretrain, supervised_ceiling
from slicefm.models.export_format import load_encoder
from tests.components.conftest import component_config, dataset, stage_runs


def test_pretrain_exports_a_loadable_encoder_and_registers_it(
    preprocessed, tmp_path, tracking_uri, parent_run
):
    # LeJEPA with typed 2S auxiliary supervision, 4 steps at 32 px, one image per HU window.
    config_yaml = component_config(tmp_path, "pretrain-test")
    encoder = dataset(tmp_path, "encoder")
    metrics = Metrics(name="metrics", uri=str(tmp_path / "metrics"))
    loss = pretrain.python_func(
        config_yaml=config_yaml, tracking_uri=tracking_uri, parent_run_id=parent_run, store_uri="",
        run_name="r", slices=dataset(tmp_path, "slices", uri=preprocessed), encoder=encoder,
        metrics=metrics, accelerator="nvidia-tesla-t4",
    )  # fmt: skip
    out = Path(encoder.path)
    result = json.loads((out / "pretrain_result.json").read_text())
    assert math.isfinite(loss) and loss == result["loss_last"] and result["steps"] == 4
    # The Kubeflow UI's Metrics: the same scalars as the stage run's.
    assert metrics.metadata["loss_last"] == loss and metrics.metadata["steps"] == 4
    assert {"loss_first", "slices_per_s"} <= set(metrics.metadata)
    assert any(k.startswith("collapse_") for k in metrics.metadata)
    assert encoder.metadata == {
        "uri": encoder.path, "method": "lejepa", "encoder": "vit_tiny_test", "steps": 4,
        "accelerator": "nvidia-tesla-t4", "gpus": 0,
    }  # fmt: skip
    assert (out / "checkpoints" / "latest.pt").exists()  # what a retried step resumes from
    model, meta = load_encoder(encoder.path)
    assert (meta["method"], meta["input_channels"], meta["in_chans"]) == ("lejepa", "per_window", 1)
    assert meta["channels"] == ["abdomen", "lung"]
    with torch.no_grad():
        emb = model(torch.rand(3, 1, 32, 32))
    assert emb.shape == (3, meta["embed_dim"]) and torch.isfinite(emb).all()
    # The stage run: the training's metrics, its config as params, and the encoder's registry version.
    run = stage_runs(tracking_uri, parent_run)["pretrain"]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["steps"] == 4 and run.data.metrics["loss_last"] == loss
    assert run.data.params["method"] == "lejepa" and run.data.params["aux.mode"] == "2S"
    assert run.data.tags["slicefm.registered_model"] == "pretrain-test-encoder"
    version = MlflowClient(tracking_uri).get_model_version(
        "pretrain-test-encoder", run.data.tags["slicefm.model_version"]
    )
    assert version.run_id == run.info.run_id
    # The stage (not the training code) logs the exported files as the run's artifacts under encoder/.
    encoder_dir = f"{run.info.artifact_uri}/encoder"
    logged = {Path(a.path).name for a in mlflow.artifacts.list_artifacts(artifact_uri=encoder_dir)}
    assert logged == {"encoder.safetensors", "encoder.json"}


def test_supervised_ceiling_exports_an_encoder_extract_labels_supervised(
    preprocessed, tmp_path, tracking_uri, parent_run
):
    config_yaml = component_config(
        tmp_path, "ceiling-test", supervised_ceiling={"enabled": True, "steps": 8, "batch_size": 8}
    )
    encoder = dataset(tmp_path, "encoder")
    loss = supervised_ceiling.python_func(
        config_yaml=config_yaml, tracking_uri=tracking_uri, parent_run_id=parent_run, store_uri="",
        run_name="r", slices=dataset(tmp_path, "slices", uri=preprocessed), encoder=encoder,
    )  # fmt: skip
    out = Path(encoder.path)
    result = json.loads((out / "supervised_result.json").read_text())
    assert math.isfinite(loss) and loss == result["loss_last"] and result["steps"] == 8
    assert encoder.metadata == {
        "uri": encoder.path, "method": "supervised_ceiling", "encoder": "vit_tiny_test", "steps": 8,
        "accelerator": "", "gpus": 0,
    }  # fmt: skip
    model, meta = load_encoder(encoder.path)
    assert (meta["label"], meta["input_channels"], meta["in_chans"]) == ("supervised", "per_window", 1)
    with torch.no_grad():
        assert model(torch.rand(2, 1, 32, 32)).shape == (2, meta["embed_dim"])
    # Its stage run: the ceiling's settings as params, its losses (per step and the summary), no registry entry.
    run = stage_runs(tracking_uri, parent_run)["supervised-ceiling"]
    assert run.info.status == "FINISHED" and run.data.params["steps"] == "8"
    assert run.data.metrics["loss_last"] == loss and run.data.metrics["n_slices"] == result["n_slices"]
    history = MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [0, 7]
    assert "slicefm.registered_model" not in run.data.tags
    encoder_dir = f"{run.info.artifact_uri}/encoder"
    logged = {Path(a.path).name for a in mlflow.artifacts.list_artifacts(artifact_uri=encoder_dir)}
    assert logged == {"encoder.safetensors", "encoder.json"}


def test_pretrain_over_several_processes_runs_torchrun_and_logs_rank_0_into_the_stage_run(
    preprocessed, tmp_path, tracking_uri, parent_run
):
    """What the pretrain step does with gpus > 1: torchrun starts one `slicefm pretrain-worker` per GPU (here
    two CPU processes over gloo); the stage run gets rank 0's step metrics, the result and the registration."""
    from slicefm.config import config_from_yaml
    from slicefm.edge.launch import run_torchrun
    from slicefm.edge.stages import launched_pretrain_stage

    config_yaml = component_config(tmp_path, "torchrun-test")
    out = str(tmp_path / "encoder")
    launched_pretrain_stage(
        config_from_yaml(config_yaml), out,
        lambda run_id: run_torchrun(2, preprocessed, out, config_yaml, mlflow_run_id=run_id, tracking_uri=tracking_uri),
        tracking_uri, parent_run, launcher="torchrun", details={"nproc_per_node": 2},
    )  # fmt: skip
    result = json.loads((Path(out) / "pretrain_result.json").read_text())
    assert result["steps"] == 4
    run = stage_runs(tracking_uri, parent_run)["pretrain"]
    assert run.info.status == "FINISHED" and run.data.tags["slicefm.launcher"] == "torchrun"
    assert run.data.tags["slicefm.torchrun.nproc_per_node"] == "2"
    assert run.data.metrics["loss_last"] == result["loss_last"]
    history = MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "loss")
    assert history and max(m.step for m in history) == result["steps"]  # rank 0's windows, in the stage run
    assert run.data.tags["slicefm.registered_model"] == "torchrun-test-encoder"
    load_encoder(out)  # the ranks' export loads


def test_a_failing_rank_fails_the_torchrun_launch(tmp_path):
    from slicefm.edge.launch import run_torchrun

    with pytest.raises(RuntimeError, match="torchrun of 2 pretraining processes exited 1"):
        run_torchrun(2, str(tmp_path / "no-such-preprocess-output"), str(tmp_path / "out"), "pretrain: {}\n")
