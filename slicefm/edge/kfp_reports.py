"""Fill Kubeflow UI artifacts (Metrics, ClassificationMetrics, HTML, Markdown) from an evaluation result.

Plain functions over duck-typed KFP artifacts (anything with log_metric / log_roc_curve / path), so the
same code is tested without a cluster and runs unchanged inside a component.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slicefm.evaluate.metrics import Summary
from slicefm.evaluate.report import RowKey, kfp_confusion_matrix, kfp_roc

if TYPE_CHECKING:
    from slicefm.evaluate.summary import Comparison


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def headline_scalars(
    headline: Mapping[RowKey, Mapping[str, Summary]], prefix: str, with_sd: bool = True
) -> dict[str, float]:
    """ "<prefix>_<model>_<protocol>_<metric>" -> mean (and "..._sd"); n/a cells omitted (MLflow and KFP)."""
    out = {}
    for row, per_metric in headline.items():
        for metric, s in per_metric.items():
            if s.mean is None:
                continue
            base = f"{prefix}_{_safe(row.label)}_{metric}"
            out[base] = float(s.mean)
            if with_sd:
                out[f"{base}_sd"] = float(s.sd or 0.0)
    return out


def comparison_scalars(comparison: Comparison) -> dict[str, float]:
    """Every task's macro per set, "<task>/<protocol>/<set>/<metric>", and each paired difference from the
    reference, "<task>/<protocol>/<set>_vs_<reference>/<metric>_diff|_ci_low|_ci_high"; n/a values omitted."""
    out = {}
    for task, protocols in comparison.macro.items():
        for protocol, per in protocols.items():
            base = f"{_safe(task)}/{_safe(protocol)}"
            for s, summary in per.items():
                if summary.mean is not None:
                    out[f"{base}/{_safe(s)}/{comparison.metric}"] = float(summary.mean)
            for s, d in comparison.paired.get(task, {}).get(protocol, {}).items():
                key = f"{base}/{_safe(s)}_vs_{_safe(comparison.reference)}/{comparison.metric}"
                for suffix, v in (("diff", d.mean_diff), ("ci_low", d.ci_low), ("ci_high", d.ci_high)):
                    if v is not None:
                        out[f"{key}_{suffix}"] = float(v)
    return out


def log_headline_metrics(
    metrics: Any, headline: Mapping[RowKey, Mapping[str, Summary]], prefix: str
) -> dict[str, float]:
    """headline_scalars logged on a KFP Metrics artifact."""
    logged = headline_scalars(headline, prefix)
    for name, value in logged.items():
        metrics.log_metric(name, value)
    return logged


def log_roc(classification: Any, labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray,
            class_names: list[str]) -> str | None:  # fmt: skip
    """ROC curve + confusion matrix of the class with the most positives (KFP shows one curve per artifact)."""
    known_pos = [
        int((labels[:, c] == 1).sum()) if (labels[:, c] == 0).any() else -1 for c in range(labels.shape[1])
    ]
    c = int(np.argmax(known_pos))
    if known_pos[c] <= 0:
        return None
    roc = kfp_roc(labels[:, c], scores[:, c])
    classification.log_roc_curve(roc["fpr"], roc["tpr"], roc["thresholds"])
    cm = kfp_confusion_matrix(labels[:, c], scores[:, c], float(thresholds[c]), ["absent", class_names[c]])
    classification.log_confusion_matrix(cm["categories"], cm["matrix"])
    classification.metadata["class"] = class_names[c]
    return class_names[c]


def log_run_roc(classification: Any, run: Any) -> str | None:
    """log_roc over one evaluate RunResult: test predictions pooled over folds, fold thresholds averaged."""
    from slicefm.evaluate.stage import pooled_test_scores

    scores, seen = pooled_test_scores(run.result, run.labels.shape[0])
    thresholds = np.mean([f.thresholds for f in run.result.folds], axis=0)
    return log_roc(classification, run.labels[seen], scores[seen], thresholds, run.result.class_names)


def write_text(artifact: Any, text: str) -> None:
    path = Path(artifact.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def publish_report(result: Any, report_md: Any, report_html: Any, results: Any) -> None:
    """An evaluate / external result as KFP Markdown + HTML artifacts; its location on the results Dataset."""
    from slicefm.core.store import open_store
    from slicefm.edge.kfp_io import URI_KEY

    write_text(report_md, result.report_markdown)
    write_text(report_html, open_store(result.out_uri).read_bytes("report.html").decode())
    results.metadata.update({URI_KEY: result.out_uri, "headline_task": result.headline_task})
