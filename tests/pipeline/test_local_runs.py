"""The pipeline's own wiring on kfp.local, a piece at a time: cacheable data steps (a second run with unchanged
data and data settings reuses ingest and preprocess, as a cluster's cache would, and still records their stage
runs under its own MLflow parent), and the exit handler closing the parent FAILED when a step failed."""

# No `from __future__ import annotations`: KFP reads the pipeline function's annotations as types.

from pathlib import Path

from kfp import dsl, local
from mlflow.tracking import MlflowClient

from components.tracking import finish_tracking, start_tracking
from pipelines.slicefm_pipeline import _ingest_and_preprocess
from slicefm.config import dump_config, load_config
from slicefm.data.pseudonym import KEY_ENV
from slicefm.edge.pipeline_data import ensure_demo_data
from slicefm.edge.tracking.pipeline_runs import child_runs
from tests.pipeline.conftest import local_run_env, tiny_pipeline_config


@dsl.pipeline
def data_steps(config_yaml: str, data_source: str, tracking_uri: str, data_version: str, store_uri: str = ""):
    """The pipeline's own wiring of cohort A's data steps, after its start step."""
    start = start_tracking(
        tracking_uri=tracking_uri, experiment="caching", run_name="", config_yaml=config_yaml,
        data_version=data_version, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    )  # fmt: skip
    common = {
        "config_yaml": config_yaml, "tracking_uri": tracking_uri, "parent_run_id": start.outputs["parent_run_id"],
        "store_uri": store_uri, "run_name": start.outputs["run_name"],
        "data_config_yaml": start.outputs["data_config_yaml"], "data_dvc_file": "", "dvc_remote": "",
    }  # fmt: skip
    _ingest_and_preprocess(common, data_source, data_version, "a", "development")


def _stages(tracking: str, parent_run_id: str) -> dict:
    return {r.data.tags["slicefm.stage"]: r for r in child_runs(tracking, parent_run_id)}


def test_a_second_run_reuses_ingest_and_preprocess_and_records_them(tmp_path, monkeypatch):
    tracking = local_run_env(tmp_path, monkeypatch)
    monkeypatch.setenv(KEY_ENV, "k" * 43)
    cfg = load_config(tiny_pipeline_config(tmp_path, external=False))
    source = ensure_demo_data(cfg.data, Path(cfg.data.source))
    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"), raise_on_error=True,
        enable_caching=True,
    )  # fmt: skip
    args = {"config_yaml": dump_config(cfg), "data_source": str(source), "tracking_uri": tracking,
            "data_version": "md5:fixed"}  # fmt: skip
    data_steps(**args)
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "kfp").rglob("scans.parquet")}
    # Another run: a training setting changed (not a data section): the data steps are served from the cache.
    changed = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"seed": 99})})
    data_steps(**{**args, "config_yaml": dump_config(changed)})

    client = MlflowClient(tracking)
    parents = client.search_runs(
        [client.get_experiment_by_name("caching").experiment_id], "tags.slicefm.role = 'pipeline'",
        order_by=["attributes.start_time ASC"],
    )  # fmt: skip
    assert len(parents) == 2 and parents[0].info.run_name != parents[1].info.run_name
    first, second = (_stages(tracking, p.info.run_id) for p in parents)
    assert set(first) == set(second) == {"ingest", "preprocess"}
    assert [first[s].data.tags["slicefm.cached"] for s in ("ingest", "preprocess")] == ["false", "false"]
    assert [second[s].data.tags["slicefm.cached"] for s in ("ingest", "preprocess")] == ["true", "true"]
    assert second["ingest"].data.metrics == first["ingest"].data.metrics and first["ingest"].data.metrics["n_scans"] == 8
    assert second["preprocess"].data.tags["slicefm.output"] == first["preprocess"].data.tags["slicefm.output"]
    # Nothing was written again: the first run's ingest output is the one both runs use.
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "kfp").rglob("scans.parquet")} == written


@dsl.component(base_image="python:3.11")
def broken_step(parent_run_id: str):
    raise RuntimeError(f"this step fails before it opens a stage run under {parent_run_id}")


@dsl.pipeline
def failing_run(tracking_uri: str, config_yaml: str):
    """The pipeline's own tracking steps around a step that fails without an MLflow run of its own."""
    finish = finish_tracking(
        tracking_uri=tracking_uri, experiment="exit-status", kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER
    )
    with dsl.ExitHandler(finish):
        start = start_tracking(
            tracking_uri=tracking_uri, experiment="exit-status", run_name="", config_yaml=config_yaml,
            data_version="", kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        )  # fmt: skip
        broken_step(parent_run_id=start.outputs["parent_run_id"])


def test_a_run_with_a_failing_step_closes_its_mlflow_parent_failed(tmp_path, monkeypatch):
    tracking = local_run_env(tmp_path, monkeypatch)
    cfg = load_config(tiny_pipeline_config(tmp_path, external=False))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"), raise_on_error=False)
    failing_run(tracking_uri=tracking, config_yaml=dump_config(cfg))
    client = MlflowClient(tracking)
    (parent,) = client.search_runs([client.get_experiment_by_name("exit-status").experiment_id])
    assert parent.info.status == "FAILED" and child_runs(tracking, parent.info.run_id) == []
    assert parent.data.tags["slicefm.failure"].startswith("pipeline FAILED")
