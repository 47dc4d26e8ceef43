"""What `slicefm predict` shows a person: one attention plot per scan (ABMIL heads) and a short HTML report."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from slicefm.evaluate.plots import plot_attention
from slicefm.evaluate.report import html_page
from slicefm.predict.bundle import ModelBundle
from slicefm.predict.scoring import ScanScores

# Plots embedded in report.html (each ~30 kB); every plot is a file under attention/ regardless.
EMBEDDED_PLOTS = 50


def write_attention_plot(
    bundle: ModelBundle, scan_id: str, scores: ScanScores, z_mm: np.ndarray, out: Path
) -> Path:
    """attention/<scan_id>.png (attention over slices per window, mean over the fold heads) and its .npy."""
    assert scores.attention is not None
    n_windows = len(bundle.windows)
    top = bundle.class_names[int(np.argmax(scores.probabilities))]
    title = f"{bundle.task} · {scan_id} · highest: {top} ({scores.probabilities.max():.2f})"
    path = plot_attention(
        scores.attention, np.tile(z_mm, n_windows), out / f"{scan_id}.png", scores.window_index, bundle.windows,
        title=title,
    )  # fmt: skip
    np.save(out / f"{scan_id}.npy", scores.attention.astype(np.float32))
    return path


def write_report(
    bundle: ModelBundle, out: Path, table: pd.DataFrame, quarantine: pd.DataFrame, summary: dict[str, Any]
) -> Path:
    """report.html: the model, the predictions table, what was quarantined and why, the attention plots."""
    model = summary["model"]
    name = f"{model['name']}:{model['version']}" if model.get("name") else str(bundle.root)
    lines = [
        f"<h1>slicefm predictions · {html.escape(bundle.task)}</h1>",
        f"<p>model <b>{html.escape(name)}</b> ({html.escape(bundle.protocol)}, {len(bundle.folds)} fold heads "
        f"averaged; thresholds = mean of the folds' validation-F1 thresholds), encoder "
        f"{html.escape(str(model['encoder'].get('encoder')))} "
        f"(sha256 {html.escape(str(model['encoder'].get('weights_sha256'))[:12])}...), windows "
        f"{html.escape(', '.join(bundle.windows))}</p>",
        f"<p>{summary['n_scans']} scans, {summary['n_slices']} slices predicted in {summary['seconds']:.1f} s "
        f"({summary['scans_per_s']} scans/s, {summary['slices_per_s']} slices/s); "
        f"{summary['n_quarantined']} quarantined</p>",
        "<h2>Predictions</h2>",
        table.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=1),
    ]
    if len(quarantine):
        lines += ["<h2>Quarantined</h2>", quarantine.to_html(index=False, border=1)]
    lineage = model.get("lineage") or {}
    if lineage:
        lines += ["<h2>Lineage</h2><table>"]
        lines += [
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
            for k, v in sorted(lineage.items())
        ]
        lines += ["</table>"]
    plots = sorted((out / "attention").glob("*.png"))
    if plots:
        lines.append("<h2>Attention over slices</h2>")
        lines.append(
            "<p>Which slices drove each prediction: the ABMIL attention weight of every slice, per window.</p>"
        )
        for p in plots[:EMBEDDED_PLOTS]:
            data = base64.b64encode(p.read_bytes()).decode("ascii")
            lines.append(f"<img alt='{html.escape(p.stem)}' src='data:image/png;base64,{data}'>")
        if len(plots) > EMBEDDED_PLOTS:
            lines.append(f"<p>{len(plots) - EMBEDDED_PLOTS} more under attention/</p>")
    path = out / "report.html"
    path.write_text(html_page(f"slicefm predictions · {bundle.task}", "\n".join(lines)), encoding="utf-8")
    return path
