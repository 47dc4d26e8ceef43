"""start_tracking / finish_tracking: the pipeline's parent MLflow run, opened and closed by name."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import yaml
from kfp import dsl
from kfp.dsl import Markdown
from mlflow.tracking import MlflowClient

from components.tracking import finish_tracking, start_tracking
from slicefm.config import config_from_yaml
from slicefm.edge.tracking import mlflow_runs
from tests.components.conftest import component_config


@pytest.fixture(autouse=True)
def _restore_mlflow_uri(monkeypatch: pytest.MonkeyPatch):
    """start_parent_run points mlflow's global tracking URI at its store (a step is its own process)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(None)


def test_start_tracking_opens_a_running_parent_run_with_config_and_lineage(
    tracking_uri, tmp_path, monkeypatch
):
    monkeypatch.setenv("SLICEFM_GIT_COMMIT", "0123abcd" * 5)
    monkeypatch.setenv("SLICEFM_IMAGE", "registry.example/slicefm:1.2.3")
    config_yaml = component_config(tmp_path, "tracked")
    link = Markdown(name="mlflow_run", uri=str(tmp_path / "mlflow_run.md"))
    run_id, name, data_config = start_tracking.python_func(
        tracking_uri=tracking_uri, experiment="start-test", run_name="run-7", config_yaml=config_yaml,
        data_version="md5:abc", mlflow_run=link, kfp_run_id="0b5e7c1a-kfp",
    )  # fmt: skip
    assert name == "run-7"
    # What the cacheable data steps get: the data sections, nothing that changes from run to run.
    slim = config_from_yaml(data_config)
    full = config_from_yaml(config_yaml)
    assert (slim.data, slim.preprocess, slim.ingest) == (full.data, full.preprocess, full.ingest)
    assert slim.name != full.name and slim.pretrain == type(full.pretrain)(seed=full.seed)
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.info.run_name == "run-7"  # open until the exit handler
    assert client.get_experiment(run.info.experiment_id).name == "start-test"
    config = yaml.safe_load(config_yaml)
    assert run.data.tags["slicefm.role"] == "pipeline" and run.data.tags["slicefm.kfp_run_id"] == "0b5e7c1a-kfp"
    # The Kubeflow UI's link to the run (a sqlite store has no web address: it names the run and the store).
    assert Path(link.path).read_text() == (
        f"# MLflow\n\nThis pipeline run is tracked as **run-7** (experiment {run.info.experiment_id}, run "
        f"`{run_id}`) in `{tracking_uri}`.\n"
    )
    assert run.data.tags["mlflow.source.git.commit"] == "0123abcd" * 5
    assert run.data.tags["slicefm.image"] == "registry.example/slicefm:1.2.3"
    assert run.data.tags["slicefm.data_version"] == "md5:abc"
    assert run.data.tags["slicefm.config_hash"] == mlflow_runs.config_hash(config)
    # The config as flattened params, and verbatim as an artifact.
    assert run.data.params == mlflow_runs.flatten_params(config)
    assert run.data.params["preprocess.size"] == "32" and run.data.params["name"] == "tracked"
    logged = client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl"))
    assert open(logged).read() == config_yaml


def test_finish_tracking_closes_the_parent_with_the_pipelines_final_status(tracking_uri, tmp_path):
    """FINISHED only when KFP says SUCCEEDED and every stage run finished; a failed step that never opened a
    stage run (its pod never started, its import failed) fails the parent through the final status."""
    client = MlflowClient(tracking_uri)
    config_yaml = component_config(tmp_path, "tracked")

    def start(run_name: str) -> str:  # each run its own Kubeflow run id: kfp-<name>
        return start_tracking.python_func(
            tracking_uri=tracking_uri, experiment="finish-test", run_name=run_name, config_yaml=config_yaml,
            data_version="", mlflow_run=Markdown(name="m", uri=str(tmp_path / f"{run_name}.md")),
            kfp_run_id=f"kfp-{run_name}",
        ).parent_run_id  # fmt: skip

    def finish(run_name: str, state: str = "SUCCEEDED", error: str = "") -> str:
        status = dsl.PipelineTaskFinalStatus(
            state=state, pipeline_job_resource_name="jobs/1", pipeline_task_name="slicefm",
            error_code=None if state == "SUCCEEDED" else 9, error_message=error,
        )  # fmt: skip
        return finish_tracking.python_func(
            tracking_uri=tracking_uri, experiment="finish-test", kfp_run_id=f"kfp-{run_name}", status=status
        )

    ok, failed, empty, silent = start("ok"), start("failed"), start("empty"), start("silent")
    for parent in (ok, failed, silent):
        with mlflow_runs.stage_run(tracking_uri, parent, "ingest"):
            pass
    with pytest.raises(RuntimeError), mlflow_runs.stage_run(tracking_uri, failed, "preprocess"):
        raise RuntimeError("stage failed")
    outcome = (
        finish("ok"), finish("failed", "FAILED"), finish("empty"),
        finish("silent", "FAILED", "task pretrain: pod OOMKilled"),
    )  # fmt: skip
    assert outcome == ("FINISHED", "FAILED", "FAILED", "FAILED")
    runs = [client.get_run(r) for r in (ok, failed, empty, silent)]
    assert [r.info.status for r in runs] == ["FINISHED", "FAILED", "FAILED", "FAILED"]
    # The silent failure: its only stage run finished, yet the pipeline failed, and the tag says where.
    assert runs[3].data.tags["slicefm.failure"] == "pipeline FAILED: task pretrain: pod OOMKilled"
    assert runs[2].data.tags["slicefm.failure"] == "no stage ran" and "slicefm.failure" not in runs[0].data.tags
    assert finish("never-started") == "MISSING"


def test_each_kubeflow_run_gets_a_name_of_its_own(tracking_uri, tmp_path):
    """An empty run name becomes <experiment>-<KFP run id>; a clone of a named run (same parameters, another
    KFP run) gets its id appended, so it never reuses the first run's MLflow parent or store prefix; a retry
    of the start step within the same KFP run keeps the name."""
    config_yaml = component_config(tmp_path, "tracked")

    def start(run_name: str, kfp_run_id: str):
        return start_tracking.python_func(
            tracking_uri=tracking_uri, experiment="names", run_name=run_name, config_yaml=config_yaml,
            data_version="", mlflow_run=Markdown(name="m", uri=str(tmp_path / f"{kfp_run_id}.md")),
            kfp_run_id=kfp_run_id,
        )  # fmt: skip

    assert start("", "3f2a9c7e-1111-2222").run_name == "names-3f2a9c7e"
    first = start("nightly", "aaaaaaaa-0001")
    assert first.run_name == "nightly"
    clone = start("nightly", "bbbbbbbb-0002")
    assert clone.run_name == "nightly-bbbbbbbb" and clone.parent_run_id != first.parent_run_id
    client = MlflowClient(tracking_uri)
    assert client.get_run(clone.parent_run_id).data.tags["slicefm.kfp_run_id"] == "bbbbbbbb-0002"
