"""Result tables laid out like the papers' (rows = models/settings, columns = classes + macro, "mean ± sd"),
as markdown and HTML, and plain-Python structures for KFP Metrics / ClassificationMetrics artifacts."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from sklearn.metrics import confusion_matrix, roc_curve

from slicefm.evaluate.metrics import METRICS, Summary

Table = list[list[str]]  # first row = header
ROW_SEPARATOR = " · "
V = TypeVar("V")


@dataclass(frozen=True)
class RowKey:
    """One row of the result tables: an embedding set ("pretrained", "random", ...) and the protocol that
    scored it ("abmil", "probe"; in the external stage the setting, "frozen" or "retrained").

    Rows are keyed by this, never by their text: `label` ("pretrained · abmil") is for what people read (the
    reports, the metric names) and for results.json, whose row names `parse` turns back into keys."""

    model: str
    protocol: str

    def __post_init__(self) -> None:
        if ROW_SEPARATOR in self.model or ROW_SEPARATOR in self.protocol:
            raise ValueError(f"{self!r}: {ROW_SEPARATOR!r} in a model or protocol makes the label ambiguous")

    @property
    def label(self) -> str:
        return f"{self.model}{ROW_SEPARATOR}{self.protocol}"

    @classmethod
    def parse(cls, label: str) -> RowKey:
        """The key of a row `label` (as results.json names rows)."""
        model, sep, protocol = label.partition(ROW_SEPARATOR)
        if not sep:
            raise ValueError(f"row {label!r} is not '<model>{ROW_SEPARATOR}<protocol>'")
        return cls(model, protocol)


def by_label(rows: Mapping[RowKey, V]) -> dict[str, V]:
    """The same rows named by their labels, in order: for tables and results.json."""
    return {key.label: value for key, value in rows.items()}


def format_cell(s: Summary, digits: int = 3) -> str:
    """ "0.812 ± 0.034", or the reason the value is missing ("n/a: no positives")."""
    if s.mean is None:
        return s.note or "n/a"
    return f"{s.mean:.{digits}f} ± {s.sd or 0.0:.{digits}f}"


def results_table(
    rows: Mapping[str, Mapping[str, Mapping[str, Summary]]], class_names: Sequence[str], metric: str = "auroc"
) -> Table:
    """rows: setting name -> summarise_folds() output. One row per setting, one column per class + macro."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}")
    cols = [*class_names, "macro"]
    table: Table = [["model / setting", *cols]]
    for name, summary in rows.items():
        table.append([name, *(format_cell(summary[c][metric]) if c in summary else "n/a" for c in cols)])
    return table


def to_markdown(table: Table) -> str:
    esc = [[cell.replace("|", "\\|") for cell in row] for row in table]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(esc[0])]
    lines += ["| " + " | ".join(row) + " |" for row in esc[1:]]
    return "\n".join(lines)


def to_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table[1:])
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody>\n</table>"


def render_report(
    rows: Mapping[str, Mapping[str, Mapping[str, Summary]]],
    class_names: Sequence[str],
    title: str = "slicefm evaluation",
    metrics: Sequence[str] = METRICS,
    notes: Sequence[str] = (),
    continuity: Mapping[str, tuple[float, float]] | None = None,
    continuity_metric: str = "cosine",
) -> tuple[str, str]:
    """(markdown, html) with one table per metric; `notes` (split mode, ...) listed first. `continuity` maps a
    model to its (mean, sd) latent continuity over scans, reported with the distance it used."""
    md = [f"# {title}", "", *(f"- {n}" for n in notes), ""]
    body = [
        f"<h1>{html.escape(title)}</h1>",
        "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>",
    ]
    for m in metrics:
        t = results_table(rows, class_names, m)
        md += [f"## {m.upper()} (mean ± sd over folds)", "", to_markdown(t), ""]
        body += [f"<h2>{html.escape(m.upper())} (mean ± sd over folds)</h2>", to_html(t)]
    if continuity:
        head = f"Latent continuity ({continuity_metric} distance; D(e_1, e_n) / sum_i D(e_i, e_i+1))"
        t = [["model", "continuity"], *([k, f"{m:.3f} ± {sd:.3f}"] for k, (m, sd) in continuity.items())]
        md += [f"## {head}", "", to_markdown(t), ""]
        body += [f"<h2>{html.escape(head)}</h2>", to_html(t)]
    return "\n".join(md), html_page(title, "\n".join(body))


def html_page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #999;"
        "padding:2px 6px}</style></head><body>" + body + "</body></html>"
    )


def combine_pages(title: str, pages: Sequence[str]) -> str:
    """One HTML page holding the bodies of several render_report pages, separated by rules."""
    bodies = [p[p.index("<body>") + len("<body>") : p.index("</body>")] for p in pages]
    return html_page(title, "\n<hr>\n".join(bodies))


def headline_markdown(
    caption: str, header: str, headline: Mapping[str, Mapping[str, Summary]], metric: str
) -> str:
    """A two-column markdown table: row name -> macro `metric` as "mean ± sd", under a caption line."""
    rows = [[header, f"macro {metric.upper()} (mean ± sd over folds)"]]
    rows += [[name, format_cell(s[metric])] for name, s in headline.items()]
    return f"{caption}\n" + to_markdown(rows)


def kfp_scalar_metrics(summary: Mapping[str, Mapping[str, Summary]], prefix: str = "") -> dict[str, float]:
    """Flat {name: float} for kfp Metrics.log_metric: "<prefix><class>_<metric>_mean|_sd"; n/a cells omitted."""
    out: dict[str, float] = {}
    for cls, per_metric in summary.items():
        safe = "".join(ch if ch.isalnum() else "_" for ch in cls)
        for m, s in per_metric.items():
            if s.mean is not None:
                out[f"{prefix}{safe}_{m}_mean"] = float(s.mean)
                out[f"{prefix}{safe}_{m}_sd"] = float(s.sd or 0.0)
    return out


def kfp_roc(y_true: np.ndarray, y_score: np.ndarray) -> dict[str, list[float]]:
    """fpr / tpr / thresholds lists for ClassificationMetrics.log_roc_curve (-1 labels ignored).

    sklearn's first threshold is +inf (nothing predicted positive), which JSON cannot hold: it is
    replaced by a value just above the highest score.
    """
    known = np.asarray(y_true) >= 0
    y, s = np.asarray(y_true)[known].astype(int), np.asarray(y_score, dtype=float)[known]
    fpr, tpr, thr = roc_curve(y, s)
    thr = np.where(np.isfinite(thr), thr, (s.max() if s.size else 1.0) + 1e-6)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thr.tolist()}


def kfp_confusion_matrix(
    y_true: np.ndarray,
    y_score: np.ndarray,
    threshold: float,
    categories: Sequence[str] = ("negative", "positive"),
) -> dict[str, list]:
    """{"categories", "matrix"} for ClassificationMetrics.log_confusion_matrix; rows = truth, cols = prediction."""
    known = np.asarray(y_true) >= 0
    y = np.asarray(y_true)[known].astype(int)
    pred = (np.asarray(y_score, dtype=float)[known] >= threshold).astype(int)
    return {"categories": list(categories), "matrix": confusion_matrix(y, pred, labels=[0, 1]).tolist()}
