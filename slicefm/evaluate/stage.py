"""The evaluate stage: for every task, embedding set and protocol, cross-validated heads on the same
patient-level folds, metrics, thresholds, predictions, attention plots, continuity and one report.

Output layout (a directory or s3://):
    splits/<task>.json                              patient ids per fold (re-usable)
    <task>/<model>/<protocol>/metrics.csv           per fold, split (val/test) and class
    <task>/<model>/<protocol>/summary.json          mean / sd over folds (test sets), per class and macro
    <task>/<model>/<protocol>/predictions.parquet   val + test probabilities per fold
    <task>/<model>/<protocol>/heads/fold-K.*        head weights (safetensors) + spec, thresholds, classes
    <task>/<model>/abmil/attention/*.png|npy        attention over z, first fold's test scans
    <task>/<model>/<protocol>/roc_pr/*.png          ROC + PR per class (test predictions pooled over folds)
    report.md, report.html, results.json            every task's macro per set with its paired difference vs
                                                    random first, then tables laid out like the papers'
"""

from __future__ import annotations

import fnmatch
import html
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from slicefm.core.store import Store, open_store
from slicefm.data.pseudonym import require_same_key
from slicefm.data.schemas import LABEL_PREFIX
from slicefm.embed.reader import Bag, EmbeddingSet
from slicefm.evaluate.config import EvaluateConfig, TaskConfig
from slicefm.evaluate.continuity import mean_continuity
from slicefm.evaluate.metrics import METRICS, ClassScores, Summary
from slicefm.evaluate.plots import plot_attention, plot_roc_pr
from slicefm.evaluate.protocols import CVResult, run_abmil_cv, run_linear_probe
from slicefm.evaluate.report import (
    RowKey,
    by_label,
    combine_pages,
    headline_markdown,
    html_page,
    render_report,
)
from slicefm.evaluate.splits import Splits, make_splits
from slicefm.evaluate.summary import Comparison, build_comparison
from slicefm.evaluate.train_head import HeadSpec, TrainedHead

log = logging.getLogger(__name__)


@dataclass
class TaskData:
    """The targets of one task on one cohort: rows = scans with at least one known label."""

    name: str
    class_names: list[str]
    labels: np.ndarray  # [n, C] of 1 / 0 / -1
    scan_ids: list[str]
    patients: list[str]
    loss: str


def resolve_label_columns(columns: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """label_* columns matching the task's patterns ("location_*" or exact names), in table order."""
    available = [c[len(LABEL_PREFIX) :] for c in columns if c.startswith(LABEL_PREFIX)]
    chosen: list[str] = []
    for pat in patterns:
        hits = [c for c in available if fnmatch.fnmatchcase(c, pat)]
        if not hits:
            raise ValueError(f"label {pat!r} matches no column of scans.parquet (available: {available})")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def task_data(scans: pd.DataFrame, task: TaskConfig) -> TaskData:
    cols = resolve_label_columns(list(scans.columns), task.labels)
    y = scans[[LABEL_PREFIX + c for c in cols]].to_numpy(np.int64)
    names = cols
    if task.loss == "ce" and len(cols) == 1:
        # One binary column (stage I-II = 0 / III-IV = 1) -> two exclusive classes for cross-entropy.
        v = y[:, 0]
        y = np.stack([np.where(v < 0, -1, 1 - v), np.where(v < 0, -1, v)], axis=1)
        names = [f"{cols[0]}_0", f"{cols[0]}_1"]
    known = (y >= 0).any(axis=1)
    if known.sum() < 2:
        raise ValueError(f"task {task.name}: fewer than 2 scans with a known label among {cols}")
    return TaskData(
        task.name, names, y[known].astype(np.float32), scans.loc[known, "scan_id"].tolist(),
        scans.loc[known, "patient_id"].tolist(), task.loss,
    )  # fmt: skip


@dataclass
class RunResult:
    """One (task, model, protocol) cross-validation."""

    task: str
    model: str
    protocol: str
    result: CVResult
    uri: str
    labels: np.ndarray | None = None  # [n_bags, C] targets the folds index into

    @property
    def key(self) -> RowKey:
        """Its row in the result tables (and in EvaluateResult.headline when its task is the headline task)."""
        return RowKey(self.model, self.protocol)


@dataclass
class EvaluateResult:
    out_uri: str
    report_markdown: str
    headline_task: str
    headline: dict[RowKey, dict[str, Summary]]  # row -> metric -> Summary (macro, headline task)
    comparison: Comparison  # every task: macro headline metric per set, paired differences vs random
    runs: list[RunResult] = field(default_factory=list)
    continuity: dict[str, tuple[float, float]] = field(default_factory=dict)

    def headline_table(self, metric: str = "auroc") -> str:
        caption = f"task {self.headline_task}"
        return headline_markdown(caption, "model · protocol", by_label(self.headline), metric)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def load_embedding_sets(uris: Sequence[str]) -> dict[str, EmbeddingSet]:
    """Embedding sets keyed by a unique, path-safe label ("pretrained", "random", ...)."""
    sets: dict[str, EmbeddingSet] = {}
    for uri in uris:
        es = EmbeddingSet(uri)
        name, k = _safe(es.label), 2
        while name in sets:
            name, k = f"{_safe(es.label)}-{k}", k + 1
        sets[name] = es
    return sets


def key_fingerprints(sets: Mapping[str, EmbeddingSet]) -> dict[str, str | None]:
    """The pseudonymisation keys behind the sets: each set's data, and its encoder's pretraining data when
    recorded (a cohort pseudonymised with another key would give the same patients other IDs)."""
    out: dict[str, str | None] = {}
    for name, es in sets.items():
        out[f"{name} embeddings ({es.store.uri('')})"] = es.meta.get("pseudonym_key_fingerprint")
        pretrained_on = es.meta["encoder"].get("data_key_fingerprint")
        if pretrained_on:
            out[f"{name} encoder's pretraining cohort"] = pretrained_on
    return out


def results_key_fingerprint(evaluate_uri: str) -> str | None:
    """The key fingerprint an earlier evaluate output recorded in results.json (None if absent)."""
    store = open_store(evaluate_uri)
    return (
        store.read_json("results.json").get("pseudonym_key_fingerprint")
        if store.exists("results.json")
        else None
    )


def _common_scans(sets: Mapping[str, EmbeddingSet]) -> pd.DataFrame:
    """The first set's scans table, restricted to scans every set has embeddings for (same cohort, same folds)."""
    first = next(iter(sets.values()))
    scans = first.scans
    have = set.intersection(*(set(es.index.index.get_level_values(0)) for es in sets.values()))
    missing = sorted(set(scans["scan_id"]) - have)
    if missing:
        log.warning("%d scans lack embeddings in some set and are left out: %s", len(missing), missing[:5])
    return scans[scans["scan_id"].isin(have)].reset_index(drop=True)


def run_evaluate(
    embedding_uris: Sequence[str], out_uri: str, cfg: EvaluateConfig, splits_uri: str | None = None
) -> EvaluateResult:
    """Evaluate every task on every embedding set with identical folds; write tables, plots and the report.

    `splits_uri`: an earlier evaluate output whose splits/<task>.json are reused (exact re-runs).
    """
    out = open_store(out_uri)
    sets = load_embedding_sets(embedding_uris)
    fingerprints = key_fingerprints(sets)
    if splits_uri:
        fingerprints[f"reused splits ({splits_uri})"] = results_key_fingerprint(splits_uri)
    key_fingerprint = require_same_key(fingerprints, "evaluate")
    scans = _common_scans(sets)
    task_windows = _task_windows(cfg, sets)  # before any work: a set lacking a task's windows is refused
    runs: list[RunResult] = []
    report_rows: dict[str, dict[RowKey, dict[str, dict[str, Summary]]]] = {}  # task -> row -> class -> metric
    class_names: dict[str, list[str]] = {}
    notes: list[str] = []
    for task in cfg.tasks:
        data = task_data(scans, task)
        splits = _task_splits(data, cfg, out, task.name, splits_uri)
        class_names[task.name] = data.class_names
        notes.append(
            f"{task.name}: {len(data.scan_ids)} scans of {len(set(data.patients))} patients, "
            f"{splits.mode} {len(splits.folds)}-fold CV (patient-level, stratified), classes {data.class_names}"
        )
        for model, es in sets.items():
            windows = task_windows[task.name, model]
            bags = es.bags(data.scan_ids, windows)
            for protocol in task.protocols:
                res = _cross_validate(bags, data, cfg, protocol, splits)
                uri = _write_run(out, task.name, model, protocol, res, data, bags, es, windows, cfg)
                run = RunResult(task.name, model, protocol, res, uri, data.labels)
                runs.append(run)
                report_rows.setdefault(task.name, {})[run.key] = res.summary
                log.info("%s / %s / %s: %s", task.name, model, protocol, _macro_line(res.summary))
    continuity = _continuity(sets, scans["scan_id"].tolist(), cfg.continuity_metric)
    out.write_json("continuity.json", {k: {"mean": m, "sd": s} for k, (m, s) in continuity.items()})
    comparison = build_comparison([(r.task, r.protocol, r.model, r.result) for r in runs], cfg.headline_metric)
    md, page = _report(report_rows, class_names, notes, continuity, cfg, sets, comparison, _plots_html(runs))
    out.write_bytes("report.md", md.encode())
    out.write_bytes("report.html", page.encode())
    head_task = cfg.tasks[0].name
    headline = {key: summary["macro"] for key, summary in report_rows[head_task].items()}
    out.write_json(
        "results.json",
        {
            "headline_task": head_task,
            "macro": {
                task: {row.label: {m: _summary_dict(s["macro"][m]) for m in METRICS} for row, s in rr.items()}
                for task, rr in report_rows.items()
            },
            "paired_metric": comparison.metric,
            "paired_reference": comparison.reference,
            "paired": comparison.paired_json(),
            "continuity": {k: {"mean": m, "sd": s} for k, (m, s) in continuity.items()},
            "models": {name: es.meta["encoder"] for name, es in sets.items()},
            "pseudonym_key_fingerprint": key_fingerprint,
        },
    )
    return EvaluateResult(out.uri(""), md, head_task, headline, comparison, runs, continuity)


def _task_windows(cfg: EvaluateConfig, sets: Mapping[str, EmbeddingSet]) -> dict[tuple[str, str], list[str]]:
    """(task, set) -> the windows its bags are made of."""
    out = {}
    for task in cfg.tasks:
        for model, es in sets.items():
            try:
                out[task.name, model] = es.resolve_windows(task.windows)
            except ValueError as e:
                raise ValueError(f"task {task.name}, embedding set {model}: {e}") from e
    return out


def _summary_dict(s: Summary) -> dict:
    return {"mean": s.mean, "sd": s.sd, "n": s.n, "note": s.note}


def _macro_line(summary: Mapping[str, Mapping[str, Summary]]) -> str:
    return ", ".join(
        f"{m} {s.mean:.3f}±{s.sd:.3f}" if s.mean is not None else f"{m} {s.note}"
        for m, s in summary["macro"].items()
    )


def _task_splits(
    data: TaskData, cfg: EvaluateConfig, out: Store, task: str, splits_uri: str | None
) -> Splits:
    key = f"splits/{task}.json"
    if splits_uri:
        src = open_store(splits_uri)
        splits = Splits.loads(src.read_bytes(key), src.uri(key))
    else:
        splits = make_splits(data.labels, data.patients, cfg.splits, cfg.seed)
    for k, fold in enumerate(splits.folds):
        parts = [set(fold.train), set(fold.val), set(fold.test)]
        if parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]:
            raise ValueError(f"splits of task {task}, fold {k}: a patient is in two partitions")
    out.write_bytes(key, splits.dumps().encode())
    return splits


def _cross_validate(
    bags: list[Bag], data: TaskData, cfg: EvaluateConfig, protocol: str, splits: Splits
) -> CVResult:
    x = [b.x for b in bags]
    if protocol == "abmil":
        run_cfg = cfg.model_copy(update={"abmil": cfg.abmil.model_copy(update={"loss": data.loss})})
        keys = [b.key_instances for b in bags]
        return run_abmil_cv(x, data.labels, data.patients, data.class_names, run_cfg, cfg.seed, keys, splits)
    run_cfg = cfg.model_copy(update={"probe": cfg.probe.model_copy(update={"loss": data.loss})})
    return run_linear_probe(x, data.labels, data.patients, data.class_names, run_cfg, cfg.seed, splits)


def _metrics_rows(fold: int, split: str, table: Mapping[str, ClassScores]) -> list[dict]:
    return [
        {"fold": fold, "split": split, "class": c, "n_pos": s.n_pos, "n_neg": s.n_neg,
         **{m: s.get(m) for m in METRICS}, "threshold": s.threshold, "note": s.note or ""}
        for c, s in table.items()
    ]  # fmt: skip


def _write_run(
    out: Store,
    task: str,
    model: str,
    protocol: str,
    res: CVResult,
    data: TaskData,
    bags: list[Bag],
    es: EmbeddingSet,
    windows: list[str],
    cfg: EvaluateConfig,
) -> str:
    run = out.child(f"{task}/{model}/{protocol}")
    rows, preds = [], []
    for f in res.folds:
        rows += _metrics_rows(f.fold, "val", f.val_metrics) + _metrics_rows(f.fold, "test", f.test_metrics)
        for split, idx, scores in (("val", f.val_index, f.val_scores), ("test", f.test_index, f.test_scores)):
            for i, s in zip(idx, scores, strict=True):
                preds.append(
                    {"fold": f.fold, "split": split, "scan_id": data.scan_ids[i],
                     **{f"p_{c}": float(v) for c, v in zip(data.class_names, s, strict=True)},
                     **{f"y_{c}": int(v) for c, v in zip(data.class_names, data.labels[i], strict=True)}}
                )  # fmt: skip
        run.write_bytes(f"heads/fold-{f.fold}.safetensors", st_save(dict(f.head.state_dict)))
        run.write_json(
            f"heads/fold-{f.fold}.json",
            {"spec": f.head.spec.to_dict(), "class_names": data.class_names,
             "thresholds": f.thresholds.tolist(), "best_step": f.head.best_step,
             "best_score": f.head.best_score, "selected": f.selected, "grid": f.grid,
             "embeddings": es.meta["encoder"], "windows": windows, "task": task,
             "preprocess": es.meta.get("preprocess"), "channels": es.meta.get("channels")}
        )  # fmt: skip
    run.write_bytes("metrics.csv", pd.DataFrame(rows).to_csv(index=False).encode())
    run.write_parquet("predictions.parquet", pd.DataFrame(preds))
    run.write_json(
        "summary.json", {c: {m: _summary_dict(s) for m, s in per.items()} for c, per in res.summary.items()}
    )
    _plots(run, res, data, bags, windows, cfg, protocol)
    return run.uri("")


def pooled_test_scores(res: CVResult, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Test probabilities averaged over the folds that scored each bag, and which bags were scored."""
    total = np.zeros((n, len(res.class_names)))
    count = np.zeros(n)
    for f in res.folds:
        total[f.test_index] += f.test_scores
        count[f.test_index] += 1
    seen = count > 0
    total[seen] /= count[seen, None]
    return total, seen


def _plots(
    run: Store,
    res: CVResult,
    data: TaskData,
    bags: list[Bag],
    windows: list[str],
    cfg: EvaluateConfig,
    protocol: str,
) -> None:
    import tempfile

    scores, seen = pooled_test_scores(res, len(bags))
    with tempfile.TemporaryDirectory() as tmp:
        paths = plot_roc_pr(data.labels[seen], scores[seen], data.class_names, Path(tmp) / "roc_pr")
        if protocol == "abmil" and res.folds:
            fold = res.folds[0]
            for i in sorted(fold.attention)[: cfg.attention_plots]:
                b, a = bags[i], fold.attention[i]
                keys = sorted({float(z) for z in b.z_mm[b.is_key]})
                p = plot_attention(
                    a, b.z_mm, Path(tmp) / "attention" / f"{b.scan_id}.png", b.window_index, windows, keys,
                    f"{data.name} · {b.scan_id} · fold {fold.fold}",
                )  # fmt: skip
                paths.append(p)
                np.save(Path(tmp) / "attention" / f"{b.scan_id}.npy", a.astype(np.float32))
                paths.append(Path(tmp) / "attention" / f"{b.scan_id}.npy")
        for p in paths:
            run.upload_file(p, str(Path(p).relative_to(tmp)))


def _continuity(
    sets: Mapping[str, EmbeddingSet], scan_ids: list[str], metric: str
) -> dict[str, tuple[float, float]]:
    out = {}
    for name, es in sets.items():
        for w in es.windows:
            mean, sd, n = mean_continuity([es.matrix(s, w).astype(np.float32) for s in scan_ids], metric)
            if n:
                out[f"{name} ({w})"] = (mean, sd)
    return out


def _report(
    rows: Mapping[str, Mapping[RowKey, Mapping[str, Mapping[str, Summary]]]],
    class_names: Mapping[str, list[str]],
    notes: list[str],
    continuity: Mapping[str, tuple[float, float]],
    cfg: EvaluateConfig,
    sets: Mapping[str, EmbeddingSet],
    comparison: Comparison,
    plots_html: str = "",
) -> tuple[str, str]:
    """The all-tasks summary first, then per task its per-class tables; the HTML ends with the plots."""
    models = [f"{n}: {es.meta['encoder']['source']} ({es.meta['encoder']['name']}, windows {es.windows})"
              for n, es in sets.items()]  # fmt: skip
    md, page = comparison.report()
    mds, pages = [md], [page]
    for i, (task, task_rows) in enumerate(rows.items()):
        md, page = render_report(
            by_label(task_rows), class_names[task], title=f"slicefm evaluation · {task}",
            notes=[notes[i], *models] if i == 0 else [notes[i]],
            continuity=continuity if i == len(rows) - 1 else None, continuity_metric=cfg.continuity_metric,
        )  # fmt: skip
        mds.append(md)
        pages.append(page)
    if plots_html:
        pages.append(html_page("plots", plots_html))
    full = combine_pages("slicefm evaluation", pages)
    return "\n\n".join(mds), full


def _plots_html(runs: Sequence[RunResult]) -> str:
    """Every run's ROC/PR and attention plots, embedded (the HTML report is one self-contained file: the
    Kubeflow UI shows it without access to the store)."""
    import base64

    parts = []
    for run in runs:
        store = open_store(run.uri)
        pngs = sorted(k for k in store.list() if k.endswith(".png"))
        if not pngs:
            continue
        parts.append(f"<h3>{html.escape(f'{run.task} · {run.model} · {run.protocol}')}</h3>")
        for key in pngs:
            data = base64.b64encode(store.read_bytes(key)).decode("ascii")
            parts.append(f"<img alt='{html.escape(key)}' title='{html.escape(key)}' src='data:image/png;base64,{data}'>")
    return ("<h2>Plots</h2>\n" + "\n".join(parts)) if parts else ""


# --- heads saved by an evaluate run (used by the external stage) -------------------------------------


@dataclass
class SavedFold:
    fold: int
    head: TrainedHead
    thresholds: np.ndarray


@dataclass
class SavedHeads:
    """The fold heads of one (task, model, protocol) run, as run_external expects of a CVResult."""

    class_names: list[str]
    folds: list[SavedFold]
    windows: list[str]


def load_heads(eval_uri: str, task: str, model: str, protocol: str) -> SavedHeads:
    run = open_store(eval_uri).child(f"{task}/{model}/{protocol}")
    specs = sorted(k for k in run.list("heads/") if k.endswith(".json"))
    if not specs:
        raise FileNotFoundError(
            f"no heads under {run.uri('heads/')} (task {task}, model {model}, {protocol})"
        )
    folds, names, windows = [], None, None
    for key in sorted(specs, key=lambda k: int(re.findall(r"fold-(\d+)", k)[0])):
        meta = json.loads(run.read_bytes(key))
        state = st_load(run.read_bytes(key.replace(".json", ".safetensors")))
        spec = HeadSpec(**meta["spec"])
        head = TrainedHead(
            spec, {k: v.clone() for k, v in state.items()}, meta["best_step"], meta["best_score"]
        )
        folds.append(SavedFold(len(folds), head, np.asarray(meta["thresholds"], dtype=np.float64)))
        names, windows = meta["class_names"], meta["windows"]
    return SavedHeads(list(names or []), folds, list(windows or []))


__all__ = ["run_evaluate", "task_data", "load_heads", "EvaluateResult", "TaskData"]
