"""Evaluate and external components: cross-validated heads, metrics, report; frozen vs retrained on cohort B."""

from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Output

from components.settings import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate(
    config_yaml: str,
    tracking_uri: str,
    parent_run_id: str,
    store_uri: str,
    run_name: str,
    embeddings: Input[Dataset],
    baseline: Input[Dataset],
    results: Output[Dataset],
    metrics: Output[Metrics],
    roc: Output[ClassificationMetrics],
    report_html: Output[HTML],
    report_md: Output[Markdown],
    ceiling: Input[Dataset] = None,
    splits: Input[Dataset] = None,
) -> str:
    """CLEAR ABMIL cross-validation and DALE-CT linear probes for every task, pretrained vs random weights.

    Args:
        config_yaml: pipeline config (evaluate section is used).
        tracking_uri: MLflow tracking URI; parent_run_id: the pipeline's parent run.
        store_uri: artifact store (s3://...) or "" to write into the KFP artifact; run_name: store prefix.
        embeddings: the pretrained encoder's embedding set; baseline: the random-weight twin's.
        ceiling: the supervised ceiling's embedding set (optional): evaluated beside the others as stage
            "evaluate-ceiling" (no head registration); the summary then shows the share of the random ->
            supervised gap the pretrained encoder closes.
        splits: an earlier evaluate output whose folds are reused (optional; the ceiling's evaluation uses the
            plain evaluation's).
        results: output: splits, per-fold metrics, predictions, heads, plots, report.md/html, results.json.
        metrics: macro metrics (mean and sd over folds) of the headline task, per model and protocol; and
            every task's macro headline metric per set with its paired difference vs random and 95% interval
            ("<task>/<protocol>/<set>_vs_random/<metric>_diff|_ci_low|_ci_high", see comparison_scalars).
        roc: ROC curve and confusion matrix of the headline task's most frequent class (pretrained, pooled test).
        report_html: the report (tables like the papers'); report_md: the same as markdown.
    Returns:
        The all-tasks comparison (caption and markdown table), also printed to the step's log.
    """
    from slicefm.config import config_from_yaml
    from slicefm.edge.kfp_io import input_location, output_location
    from slicefm.edge.kfp_reports import comparison_scalars, log_headline_metrics, log_run_roc, publish_report
    from slicefm.edge.stages import evaluate_stage

    cfg = config_from_yaml(config_yaml)
    sets = [input_location(embeddings.path, embeddings.metadata)]
    if cfg.extract.random_baseline:
        sets.append(input_location(baseline.path, baseline.metadata))
    stage = "evaluate"
    if ceiling is not None:
        sets.append(input_location(ceiling.path, ceiling.metadata))
        stage = "evaluate-ceiling"
    splits_uri = input_location(splits.path, splits.metadata) if splits is not None else None
    out = output_location(results.path, store_uri, run_name, stage)
    res = evaluate_stage(cfg, sets, out, tracking_uri, parent_run_id, splits_uri, stage=stage)
    log_headline_metrics(metrics, res.headline, "macro")
    for name, value in comparison_scalars(res.comparison).items():
        metrics.log_metric(name, value)
    log_run_roc(roc, res.runs[0])
    publish_report(res, report_md, report_html, results)
    summary = res.comparison.text()
    print(summary)
    return summary


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def external(
    config_yaml: str,
    tracking_uri: str,
    parent_run_id: str,
    store_uri: str,
    run_name: str,
    source_results: Input[Dataset],
    embeddings: Input[Dataset],
    baseline: Input[Dataset],
    results: Output[Dataset],
    metrics: Output[Metrics],
    report_html: Output[HTML],
    report_md: Output[Markdown],
) -> str:
    """External cohort B: cohort A's heads unchanged ("frozen") vs new heads on B's train splits ("retrained").

    Args:
        config_yaml: pipeline config (evaluate + external sections are used).
        tracking_uri: MLflow tracking URI; parent_run_id: the pipeline's parent run.
        store_uri: artifact store (s3://...) or "" to write into the KFP artifact; run_name: store prefix.
        source_results: cohort A's evaluate output (its fold heads and thresholds).
        embeddings: cohort B's pretrained-encoder embeddings; baseline: cohort B's random-weight embeddings.
        results: output: splits, per-fold metrics of both settings, report.md/html, results.json.
        metrics: macro metrics of both settings (mean and sd over folds); report_html / report_md: the report.
    Returns:
        The headline table (markdown).
    """
    from slicefm.config import config_from_yaml
    from slicefm.edge.kfp_io import input_location, output_location
    from slicefm.edge.kfp_reports import log_headline_metrics, publish_report
    from slicefm.edge.stages import external_stage

    cfg = config_from_yaml(config_yaml)
    out = output_location(results.path, store_uri, run_name, "external")
    sets = [input_location(embeddings.path, embeddings.metadata)]
    if cfg.extract.random_baseline:
        sets.append(input_location(baseline.path, baseline.metadata))
    source = input_location(source_results.path, source_results.metadata)
    res = external_stage(cfg, source, sets, out, tracking_uri, parent_run_id)
    log_headline_metrics(metrics, res.headline, "external")
    publish_report(res, report_md, report_html, results)
    return res.headline_table(cfg.evaluate.headline_metric)
