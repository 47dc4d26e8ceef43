"""The pipeline's parent MLflow run: opened by the first step, closed by the exit handler, summarised at the end."""

from __future__ import annotations

from pathlib import Path

import yaml

from slicefm.edge.tracking import mlflow_runs


def start_parent_run(
    tracking_uri: str, experiment: str, run_name: str, config_yaml: str, data_version: str, kfp_run_id: str = ""
) -> str:
    """Open the parent run with lineage tags (and the KFP run's id, tag `slicefm.kfp_run_id`) and the flattened
    config as params; returns its id."""
    import os

    import mlflow
    from mlflow.tracking import MlflowClient

    # The first step of every run: an unreachable MLflow fails here, before any training starts.
    mlflow_runs.check_tracking_server(tracking_uri)
    config = yaml.safe_load(config_yaml) or {}
    tags = mlflow_runs.lineage_tags(
        git_commit=os.environ.get("SLICEFM_GIT_COMMIT") or mlflow_runs.git_commit(Path.cwd()),
        config_hash=mlflow_runs.config_hash(config),
        data_version=data_version or None,
        image=os.environ.get("SLICEFM_IMAGE"),
    )
    tags["slicefm.role"] = "pipeline"
    if kfp_run_id:
        tags["slicefm.kfp_run_id"] = kfp_run_id
    run_id = mlflow_runs.start_pipeline_run(tracking_uri, experiment, run_name, tags)
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        mlflow_runs.log_params_flat(config)
    MlflowClient(tracking_uri).log_text(run_id, config_yaml, "config.yaml")
    # start_run(run_id=...) ends the run on exit: mark it running again until the exit handler closes it.
    MlflowClient(tracking_uri).update_run(run_id, status="RUNNING")
    return run_id


def child_runs(tracking_uri: str, parent_run_id: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")


def find_parent_run(tracking_uri: str, experiment: str, run_name: str = "", *, kfp_run_id: str = ""):
    """The pipeline's parent run by its Kubeflow run id (tag slicefm.kfp_run_id) when given, else by name
    (the newest of that name); None when it was never created."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    which = f"tags.`slicefm.kfp_run_id` = '{kfp_run_id}'" if kfp_run_id else f"tags.mlflow.runName = '{run_name}'"
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"{which} and tags.slicefm.role = 'pipeline'",
        order_by=["attributes.start_time DESC"],
    )
    return runs[0] if runs else None


def effective_run_name(tracking_uri: str, experiment: str, run_name: str, kfp_run_id: str) -> str:
    """The run's name, its MLflow parent's name and its store prefix: `run_name`, or `<experiment>-<first 8 of
    the KFP run id>` when empty. A name another Kubeflow run already used (a run cloned in the UI copies its
    parameters) gets this run's id appended, so two runs never share a parent run or a store prefix."""
    short = kfp_run_id.replace("-", "")[:8]
    if not run_name:
        return f"{experiment}-{short}" if short else experiment
    existing = find_parent_run(tracking_uri, experiment, run_name)
    if existing is None or not kfp_run_id or existing.data.tags.get("slicefm.kfp_run_id") == kfp_run_id:
        return run_name
    return f"{run_name}-{short}"


def finish_parent_run(
    tracking_uri: str,
    experiment: str,
    run_name: str = "",
    *,
    kfp_run_id: str = "",
    pipeline_state: str | None = None,
    error: str | None = None,
) -> str:
    """FINISHED when the pipeline's final state is SUCCEEDED (`pipeline_state`, from KFP's
    PipelineTaskFinalStatus; None = not known) and every stage run finished (at least one), else FAILED.
    A failure's state and error message become the parent's `slicefm.failure` tag."""
    parent = find_parent_run(tracking_uri, experiment, run_name, kfp_run_id=kfp_run_id)
    if parent is None:
        return "MISSING"
    runs = child_runs(tracking_uri, parent.info.run_id)
    unfinished = [r.data.tags.get("slicefm.stage", r.info.run_name) for r in runs if r.info.status != "FINISHED"]
    failure = ""
    if pipeline_state is not None and pipeline_state != "SUCCEEDED":
        failure = f"pipeline {pipeline_state}" + (f": {error}" if error else "")
    elif not runs:
        failure = "no stage ran"
    elif unfinished:
        failure = f"stage runs not finished: {', '.join(sorted(unfinished))}"
    if failure:
        mlflow_runs.tag_run(tracking_uri, parent.info.run_id, {"slicefm.failure": failure})
    status = "FAILED" if failure else "FINISHED"
    mlflow_runs.finish_pipeline_run(tracking_uri, parent.info.run_id, status)
    return status


# Stages whose output has a results.json summary (evaluate-ceiling: the evaluation with the supervised ceiling).
REPORTING_STAGES = ("evaluate", "evaluate-ceiling", "external")


def headline_report(stage: str, uri: str, metric: str = "auroc") -> str:
    """The summary of an evaluate / external output (results.json), as markdown: an evaluate output's
    all-tasks comparison (every task, paired differences vs random); otherwise (external, or an evaluate
    output from before the comparison) the headline task's table."""
    from slicefm.core.store import open_store
    from slicefm.evaluate.summary import Comparison

    store = open_store(uri)
    if not store.exists("results.json"):
        return f"\n{stage}: no results.json under {uri}"
    res = store.read_json("results.json")
    if "paired" in res:
        summary = Comparison.from_results(res)
        return f"\n{stage} · every task\n{summary.text()}\nfull report: {store.uri('report.md')}"
    task = res["headline_task"]
    head = f"\n{stage} · task {task} · macro {metric.upper()} (mean ± sd over folds)"
    rows = [
        "| model · setting | " + " | ".join(m.upper() for m in ("auroc", "auprc", "f1")) + " |",
        "|---|---|---|---|",
    ]
    for row, per in res["macro"][task].items():
        cells = [
            f"{per[m]['mean']:.3f} ± {per[m]['sd']:.3f}"
            if per[m]["mean"] is not None
            else (per[m]["note"] or "n/a")
            for m in ("auroc", "auprc", "f1")
        ]
        rows.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join([head, *rows, f"full report: {store.uri('report.md')}"])


def describe_run(tracking_uri: str, experiment: str, run_name: str, kfp_root: Path | None = None) -> str:
    """Human summary of a finished pipeline run: stage outputs, the evaluate stage's all-tasks comparison and
    the external cohort's headline table, where to look."""
    parent = find_parent_run(tracking_uri, experiment, run_name)
    if parent is None:
        return f"no MLflow pipeline run {run_name!r} in experiment {experiment!r} at {tracking_uri}"
    lines = [f"\npipeline run {run_name}: {parent.info.status} (MLflow run {parent.info.run_id})"]
    reports = []
    for run in sorted(child_runs(tracking_uri, parent.info.run_id), key=lambda r: r.info.start_time):
        stage = run.data.tags.get("slicefm.stage", run.info.run_name)
        items = sorted(run.data.metrics.items())
        if stage in REPORTING_STAGES:  # dozens of metrics: the tables below show them
            items = [(k, v) for k, v in items if k.endswith("_auroc")]
        metrics = ", ".join(f"{k}={v:g}" for k, v in items)
        lines.append(f"  {stage:<19} {run.info.status:<9} {metrics}")
        if "slicefm.output_uri" in run.data.tags:
            lines.append(f"  {'':<19} output: {run.data.tags['slicefm.output_uri']}")
            if stage in REPORTING_STAGES:
                reports.append((stage, run.data.tags["slicefm.output_uri"]))
    if any(stage == "evaluate-ceiling" for stage, _ in reports):  # the same comparison plus the ceiling
        reports = [(stage, uri) for stage, uri in reports if stage != "evaluate"]
    for stage, uri in reports:
        lines.append(headline_report(stage, uri))
    lines.append(f"MLflow: {tracking_uri}  (browse: mlflow ui --backend-store-uri {tracking_uri})")
    if kfp_root is not None:
        lines.append(f"KFP local outputs: {kfp_root}")
    return "\n".join(lines)


def run_link_markdown(tracking_uri: str, run_id: str) -> str:
    """Markdown naming the MLflow run, with a link to it when the tracking server is reachable over http(s)."""
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri).get_run(run_id)
    name, experiment = run.info.run_name, run.info.experiment_id
    where = f"experiment {experiment}, run `{run_id}`"
    if tracking_uri.startswith(("http://", "https://")):
        url = f"{tracking_uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
        return f"# MLflow\n\nThis pipeline run is tracked as [{name}]({url}) ({where}).\n"
    return f"# MLflow\n\nThis pipeline run is tracked as **{name}** ({where}) in `{tracking_uri}`.\n"
