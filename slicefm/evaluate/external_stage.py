"""The external stage: cohort A's evaluated heads on cohort B ("frozen") next to heads retrained on B.

Both settings are scored on the same test sets of B (patient-level folds of B, saved to splits/<task>.json).
Output: <task>/<model>/{frozen,retrained}/metrics.csv + summary.json, report.md/.html, results.json.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from slicefm.core.store import open_store
from slicefm.data.pseudonym import require_same_key
from slicefm.evaluate.config import EvaluateConfig, ExternalConfig
from slicefm.evaluate.metrics import METRICS, Summary
from slicefm.evaluate.protocols import run_external
from slicefm.evaluate.report import RowKey, by_label, combine_pages, headline_markdown, render_report
from slicefm.evaluate.stage import (
    _common_scans,
    _metrics_rows,
    _summary_dict,
    _task_splits,
    key_fingerprints,
    load_embedding_sets,
    load_heads,
    results_key_fingerprint,
    task_data,
)

log = logging.getLogger(__name__)


@dataclass
class ExternalStageResult:
    out_uri: str
    report_markdown: str
    headline_task: str
    headline: dict[RowKey, dict[str, Summary]]  # (model, frozen|retrained) -> metric -> macro Summary
    rows: dict[str, dict[RowKey, dict[str, dict[str, Summary]]]] = field(default_factory=dict)

    def headline_table(self, metric: str = "auroc") -> str:
        caption = f"external cohort B, task {self.headline_task}"
        return headline_markdown(caption, "model · setting", by_label(self.headline), metric)


def run_external_stage(
    source_eval_uri: str,
    embedding_uris: Sequence[str],
    out_uri: str,
    cfg: EvaluateConfig,
    ext: ExternalConfig,
) -> ExternalStageResult:
    """For every external task and embedding set of cohort B: frozen (A's fold heads) vs retrained (new heads)."""
    out = open_store(out_uri)
    sets = load_embedding_sets(embedding_uris)
    fingerprints = key_fingerprints(sets)
    fingerprints[f"cohort A's evaluation ({source_eval_uri})"] = results_key_fingerprint(source_eval_uri)
    key_fingerprint = require_same_key(fingerprints, "external")
    scans = _common_scans(sets)
    tasks = {t.name: t for t in cfg.tasks}
    unknown = [t for t in ext.tasks if t not in tasks]
    if unknown:
        raise ValueError(f"external tasks {unknown} are not evaluate tasks ({sorted(tasks)})")
    rows: dict[str, dict[RowKey, dict[str, dict[str, Summary]]]] = {}  # task -> row -> class -> metric
    mds, pages = [], []
    for name in ext.tasks:
        task = tasks[name]
        data = task_data(scans, task)
        splits = _task_splits(data, cfg, out, name, None)
        for model, es in sets.items():
            source = load_heads(source_eval_uri, name, model, ext.protocol)
            bags = es.bags(data.scan_ids, source.windows)
            res = run_external(
                source, [b.x for b in bags], data.labels, data.patients, data.class_names, ext.class_map, cfg,
                cfg.seed, protocol=ext.protocol, splits=splits,
            )  # fmt: skip
            for setting, summary in res.summaries.items():
                rows.setdefault(name, {})[RowKey(model, setting)] = summary
            run = out.child(f"{name}/{model}")
            frozen_rows = [r for k, t in enumerate(res.frozen_folds) for r in _metrics_rows(k, "test", t)]
            retr_rows = [
                r for f in res.retrained.folds for r in _metrics_rows(f.fold, "test", f.test_metrics)
            ]
            for setting, table in (("frozen", frozen_rows), ("retrained", retr_rows)):
                run.write_bytes(f"{setting}/metrics.csv", pd.DataFrame(table).to_csv(index=False).encode())
                run.write_json(
                    f"{setting}/summary.json",
                    {
                        c: {m: _summary_dict(s) for m, s in per.items()}
                        for c, per in res.summaries[setting].items()
                    },
                )
            log.info("external %s / %s: frozen vs retrained done", name, model)
        md, page = render_report(
            by_label(rows[name]), data.class_names, title=f"slicefm external cohort · {name}",
            notes=[f"cohort B: {len(data.scan_ids)} scans, {splits.mode} {len(splits.folds)}-fold CV; "
                   f"frozen = cohort A's {ext.protocol} fold heads unchanged, retrained = new heads on B's "
                   "train splits; both scored on B's test sets"],
        )  # fmt: skip
        mds.append(md)
        pages.append(page)
    md = "\n\n".join(mds)
    out.write_bytes("report.md", md.encode())
    out.write_bytes("report.html", combine_pages("slicefm external cohort", pages).encode())
    head = ext.tasks[0]
    headline = {r: s["macro"] for r, s in rows[head].items()}
    out.write_json(
        "results.json",
        {
            "headline_task": head,
            "macro": {
                t: {r.label: {m: _summary_dict(s["macro"][m]) for m in METRICS} for r, s in rr.items()}
                for t, rr in rows.items()
            },
            "pseudonym_key_fingerprint": key_fingerprint,
        },
    )
    return ExternalStageResult(out.uri(""), md, head, headline, rows)
