"""Open and close the pipeline's parent MLflow run (every stage nests its own run under it)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Output

from components.settings import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def start_tracking(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    config_yaml: str,
    data_version: str,
    mlflow_run: Output[Markdown],
    kfp_run_id: str = "",
) -> NamedTuple("Outputs", [("parent_run_id", str), ("run_name", str), ("data_config_yaml", str)]):  # noqa: UP006
    """Create the parent MLflow run of this pipeline run and settle the run's name.

    Args:
        tracking_uri: MLflow tracking URI (http(s)://server or sqlite:///path).
        experiment: MLflow experiment name.
        run_name: name of the pipeline run ("" = <experiment>-<KFP run id>); a name another Kubeflow run
            already used (a cloned run) gets this run's id appended.
        config_yaml: the pipeline config, logged as params and an artifact.
        data_version: DVC revision / md5 of the dataset, recorded as a lineage tag.
        mlflow_run: output: Markdown linking the MLflow run (shown in the Kubeflow UI).
        kfp_run_id: the Kubeflow run's id (the pipeline passes its job-id placeholder), tag slicefm.kfp_run_id.
    Returns:
        parent_run_id: the parent run's id; run_name: the run's name (MLflow parent and store prefix);
        data_config_yaml: the config's data sections only, for the cacheable ingest and preprocess steps.
    """
    from collections import namedtuple
    from pathlib import Path

    from slicefm.config import config_from_yaml
    from slicefm.edge.stages import data_config_yaml
    from slicefm.edge.tracking.mlflow_runs import check_tracking_server
    from slicefm.edge.tracking.pipeline_runs import effective_run_name, run_link_markdown, start_parent_run

    check_tracking_server(tracking_uri)  # the first step of every run: an unreachable MLflow fails here, fast
    name = effective_run_name(tracking_uri, experiment, run_name, kfp_run_id)
    run_id = start_parent_run(tracking_uri, experiment, name, config_yaml, data_version, kfp_run_id)
    Path(mlflow_run.path).write_text(run_link_markdown(tracking_uri, run_id))
    outputs = namedtuple("Outputs", ["parent_run_id", "run_name", "data_config_yaml"])
    return outputs(run_id, name, data_config_yaml(config_from_yaml(config_yaml)))


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def finish_tracking(
    tracking_uri: str, experiment: str, status: dsl.PipelineTaskFinalStatus, kfp_run_id: str = ""
) -> str:
    """Exit handler: close the parent run, FINISHED when the pipeline succeeded and every stage run finished,
    FAILED otherwise (a failed step that never opened an MLflow run fails the parent too).

    The parent is found by the Kubeflow run's id (an exit task cannot take another task's output).

    Args:
        tracking_uri: MLflow tracking URI.
        experiment: MLflow experiment name.
        status: the pipeline's final status, filled in by Kubeflow (not a parameter to set).
        kfp_run_id: the Kubeflow run's id (the job-id placeholder), as given to start_tracking.
    Returns:
        The parent run's final status.
    """
    from slicefm.edge.tracking.pipeline_runs import finish_parent_run

    return finish_parent_run(
        tracking_uri, experiment, kfp_run_id=kfp_run_id, pipeline_state=status.state, error=status.error_message
    )


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def record_stage(tracking_uri: str, parent_run_id: str, output: Input[Dataset]) -> str:
    """The MLflow stage run of a cacheable step (ingest, preprocess), nested under this run's parent, from the
    record the step kept in its output; tagged slicefm.cached=true when the step was a cache hit.

    Args:
        tracking_uri: MLflow tracking URI.
        parent_run_id: the pipeline's parent run.
        output: the cacheable step's output.
    Returns:
        The stage's name.
    """
    from slicefm.edge.kfp_io import input_location
    from slicefm.edge.stages import record_stage as record

    return record(tracking_uri, parent_run_id, input_location(output.path, output.metadata))
