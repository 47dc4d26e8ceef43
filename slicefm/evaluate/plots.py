"""PNG plots: ABMIL attention along z per scan, ROC and precision-recall curves per class."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: pipeline pods and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve  # noqa: E402


def plot_attention(
    attention: np.ndarray,
    z_mm: np.ndarray,
    path: str | Path,
    window_index: np.ndarray | None = None,
    window_names: Sequence[str] | None = None,
    key_slices_mm: Sequence[float] = (),
    title: str = "",
) -> Path:
    """Attention weight of every instance vs its z (mm), one colour per window; key slices as vertical lines.

    For multi-window bags, `attention`, `z_mm` and `window_index` are aligned per instance (windows
    concatenated along the slice axis), so each window is drawn as its own curve over the same z range.
    """
    attention, z_mm = np.asarray(attention, dtype=float), np.asarray(z_mm, dtype=float)
    if attention.shape != z_mm.shape:
        raise ValueError(f"attention {attention.shape} and z_mm {z_mm.shape} must align")
    win = np.zeros(attention.size, dtype=int) if window_index is None else np.asarray(window_index)
    fig, ax = plt.subplots(figsize=(8, 3))
    for w in np.unique(win):
        sel = win == w
        order = np.argsort(z_mm[sel])
        label = window_names[w] if window_names is not None else f"window {w}"
        ax.plot(z_mm[sel][order], attention[sel][order], marker=".", lw=1, label=label)
    for i, z in enumerate(key_slices_mm):
        ax.axvline(float(z), color="red", ls="--", lw=1, label="key slice" if i == 0 else None)
    ax.set_xlabel("z (mm)")
    ax.set_ylabel("attention weight")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_attention_maps(
    attention: Mapping[int, np.ndarray],
    out_dir: str | Path,
    z_mm: Sequence[np.ndarray] | None = None,
    window_index: Sequence[np.ndarray] | None = None,
    key_slices: Sequence[Sequence[int]] | None = None,
    window_names: Sequence[str] | None = None,
    bag_names: Sequence[str] | None = None,
) -> list[Path]:
    """One attention plot per bag of a fold's `attention` dict (bag index -> weights); per-bag arrays are
    indexed by bag. Key slices are instance indices, drawn at their z; without z_mm the x axis is the index."""
    paths = []
    for i, a in sorted(attention.items()):
        z = np.asarray(z_mm[i], dtype=float) if z_mm is not None else np.arange(a.size, dtype=float)
        keys_mm = sorted({float(z[k]) for k in key_slices[i]}) if key_slices is not None else []
        name = bag_names[i] if bag_names is not None else f"bag{i:05d}"
        win = window_index[i] if window_index is not None else None
        paths.append(
            plot_attention(a, z, Path(out_dir) / f"attention_{name}.png", win, window_names, keys_mm, name)
        )
    return paths


def plot_roc_pr(
    labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str], out_dir: str | Path, prefix: str = ""
) -> list[Path]:
    """One PNG per class with its ROC and PR curves (-1 labels ignored); classes lacking a positive or a
    negative are skipped, as their curves are undefined."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for c, name in enumerate(class_names):
        known = labels[:, c] >= 0
        y, s = labels[known, c].astype(int), scores[known, c]
        if y.sum() == 0 or y.sum() == y.size:
            continue
        fpr, tpr, _ = roc_curve(y, s)
        prec, rec, _ = precision_recall_curve(y, s)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 4))
        a1.plot(fpr, tpr, label=f"AUROC {auc(fpr, tpr):.3f}")
        a1.plot([0, 1], [0, 1], color="grey", ls=":")
        a1.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC {name}")
        a2.step(rec, prec, where="post", label=f"AUPRC {average_precision_score(y, s):.3f}")
        a2.axhline(y.mean(), color="grey", ls=":")
        a2.set(xlabel="recall", ylabel="precision", title=f"PR {name}")
        a1.legend(loc="lower right")
        a2.legend(loc="upper right")
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
        paths.append(_save(fig, out / f"{prefix}roc_pr_{safe}.png"))
    return paths


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
