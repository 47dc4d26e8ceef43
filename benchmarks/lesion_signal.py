"""Can this cohort resolve lesion location at all, and do these embeddings carry lesion signal?

A diagnostic for the "pretrained beats random weights" comparison (issue 4), printed side by side:

1. Slice-level lesion presence, per embedding set: logistic regression on each slice's embedding (one
   window), 5-fold CV grouped by scan, AUROC. Targets come from the lesion masks preprocessing wrote.
   0.5 = the embeddings do not tell a slice with a lesion from one without. Then lesion TYPE among the
   slices showing exactly one type: multinomial logistic regression, same folds, one-vs-rest macro AUROC
   (what lesion location needs; 0.5 = no type-specific lesion features).
2. The cohort's ceiling: the evaluate stage's own protocol (ABMIL, same task, same folds when --splits is
   given) on an ORACLE embedding set whose slices carry exact indicators of the lesion types they show
   plus `--noise`-sd Gaussian noise in 23 further dimensions. When the oracle stays near 0.5, the cohort
   is too small (or its labels too sparse) for any encoder to win; raise the number of scans.
3. The presence ceiling: the first embedding set's own (standardised) slice embeddings plus ONE exact
   "this slice shows a lesion" indicator, no type. What a perfect lesion detector on top of this encoder's
   anatomy gives: when it stays far below the types oracle, ABMIL cannot tell the lesion's location from
   presence + anatomy on this many bags, and the encoder must carry type-specific lesion features.

    .venv/bin/python benchmarks/lesion_signal.py --embeddings RUN/merge-embeddings/embeddings \\
        RUN/merge-embeddings-2/embeddings --config pipelines/configs/demo-cpu.yaml --splits RUN/evaluate/...
"""

from __future__ import annotations

import argparse
import io
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from slicefm.config import load_config
from slicefm.core.store import Store, open_store
from slicefm.embed.extract import embedding_key
from slicefm.embed.reader import EmbeddingSet
from slicefm.evaluate.stage import run_evaluate
from slicefm.train.data import LESION_NAMES, lesion_type_lookup, typed_lesion_mask

N_LESION_TYPES = len(LESION_NAMES)  # DeepLesion's coarse types 1..8
ORACLE_NOISE_DIMS = 23


def lesion_types_per_slice(pre: Store, scan_ids: list[str], lesions: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per scan, [n_slices, 8] 0/1: which lesion types each slice shows (read once, shared by every probe)."""
    type_of = lesion_type_lookup(lesions)
    out = {}
    for scan_id in scan_ids:
        with np.load(io.BytesIO(pre.read_bytes(f"masks/{scan_id}.npz"))) as npz:
            typed = typed_lesion_mask(npz["lesion"], type_of.get(scan_id))
        out[scan_id] = np.stack(
            [(typed == t).any(axis=(1, 2)) for t in range(1, N_LESION_TYPES + 1)], axis=1
        ).astype(np.float32)
    return out


def slice_table(es: EmbeddingSet, window: str, types: dict[str, np.ndarray]) -> tuple:
    """Every slice's embedding (one window), lesion types and scan id, over the set's scans."""
    scan_ids = list(es.scans["scan_id"])
    x = np.concatenate([es.matrix(scan_id, window).astype(np.float32) for scan_id in scan_ids])
    groups = np.concatenate([[scan_id] * len(types[scan_id]) for scan_id in scan_ids])
    return x, np.concatenate([types[scan_id] for scan_id in scan_ids]), groups


def slice_presence_auroc(x: np.ndarray, types: np.ndarray, g: np.ndarray) -> float:
    """Grouped 5-fold logistic-regression AUROC of 'this slice shows a lesion' from its embedding."""
    y = types.any(axis=1).astype(int)
    aucs = []
    for train, test in GroupKFold(5).split(x, y, g):
        model = make_pipeline(
            StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced")
        )
        model.fit(x[train], y[train])
        aucs.append(roc_auc_score(y[test], model.predict_proba(x[test])[:, 1]))
    return float(np.mean(aucs))


def slice_type_auroc(x: np.ndarray, types: np.ndarray, g: np.ndarray) -> float:
    """Grouped 5-fold one-vs-rest macro AUROC of the lesion type, on slices showing exactly one type."""
    one = types.sum(axis=1) == 1
    x, y, g = x[one], types[one].argmax(axis=1), g[one]
    aucs = []
    for train, test in GroupKFold(5).split(x, y, g):
        model = make_pipeline(
            StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, class_weight="balanced")
        )
        model.fit(x[train], y[train])
        proba = np.zeros((len(test), N_LESION_TYPES))
        proba[:, model.classes_] = model.predict_proba(x[test])
        present = [c for c in range(N_LESION_TYPES) if 0 < (y[test] == c).sum() < len(test)]
        aucs.append(np.mean([roc_auc_score(y[test] == c, proba[:, c]) for c in present]))
    return float(np.mean(aucs))


def oracle_slices(
    template: EmbeddingSet, scan_id: str, window: str, types: np.ndarray, kind: str, noise: float,
    rng: np.random.Generator,
) -> np.ndarray:  # fmt: skip
    """One scan's oracle slice features: "types" = lesion-type indicators, z and `noise`-sd nuisance dims;
    "presence" = the template's standardised embedding plus 3 x (slice shows any lesion)."""
    if kind == "types":
        z = np.linspace(0.0, 1.0, len(types), dtype=np.float32)[:, None]
        extra = rng.normal(scale=noise, size=(len(types), ORACLE_NOISE_DIMS)).astype(np.float32)
        return np.concatenate([types, z, extra], axis=1)
    x = template.matrix(scan_id, window).astype(np.float32)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    return np.concatenate([x, 3.0 * types.any(axis=1, keepdims=True)], axis=1)


def write_oracle_set(
    template: EmbeddingSet, types_of: dict[str, np.ndarray], out: Path, noise: float, kind: str = "types"
) -> Path:
    """An extract-layout set over the template's scans and windows with `oracle_slices` features: what a
    perfect lesion(-type) detector would give."""
    store = open_store(str(out))
    rng = np.random.default_rng(0)
    rows = []
    for scan_id in template.scans["scan_id"]:
        types = types_of[scan_id]
        for window in template.windows:
            x = oracle_slices(template, scan_id, window, types, kind, noise, rng)
            key = embedding_key(window, scan_id)
            store.write_npy(key, x.astype(np.float16))
            rows.append({"scan_id": scan_id, "window": window, "key": key, "n_slices": len(types),
                         "dim": x.shape[1], "patches_key": "", "root": ""})  # fmt: skip
    store.write_parquet("embeddings.parquet", pd.DataFrame(rows))
    for table in ("scans.parquet", "slices.parquet", "lesions.parquet"):
        store.write_bytes(table, template.store.read_bytes(table))
    meta = dict(template.meta)
    meta["encoder"] = {
        **meta["encoder"],
        "label": f"oracle_{kind}",
        "name": f"oracle_{kind}",
        "source": f"oracle {kind} (noise {noise})" if kind == "types" else f"oracle presence on {template.label}",
    }
    store.write_json("extract.json", meta)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", nargs="+", required=True, help="extract outputs (same cohort)")
    p.add_argument("--config", default="pipelines/configs/demo-cpu.yaml", help="its evaluate section")
    p.add_argument("--task", help="evaluate task to run the oracle on (default: the first)")
    p.add_argument("--splits", help="an evaluate output whose splits/<task>.json to reuse (same folds)")
    p.add_argument("--window", default=None, help="window for the slice probe (default: the first)")
    p.add_argument("--noise", type=float, default=1.0, help="sd of the types oracle's nuisance dimensions")
    p.add_argument("--oracles", nargs="*", default=["types", "presence"], choices=["types", "presence"])
    p.add_argument("--probes-only", action="store_true", help="slice probes only, no oracle ABMIL runs")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    sets = [EmbeddingSet(uri) for uri in args.embeddings]
    pre = open_store(sets[0].meta["preprocessed"])
    lesions = pre.read_parquet("lesions.parquet")
    window = args.window or sets[0].windows[0]
    print(f"cohort: {len(sets[0].scans)} scans, {len(lesions)} lesions; slice probe on the {window} window")
    types_of = lesion_types_per_slice(pre, list(sets[0].scans["scan_id"]), lesions)
    for es in sets:
        t = time.perf_counter()
        table = slice_table(es, window, types_of)
        auc, auc_type = slice_presence_auroc(*table), slice_type_auroc(*table)
        print(
            f"  {es.label:<12} slice lesion-presence AUROC {auc:.3f}, lesion-type macro AUROC {auc_type:.3f}"
            f"  ({time.perf_counter() - t:.0f} s)"
        )

    if args.probes_only:
        return
    cfg = load_config(args.config).evaluate
    task = next((t for t in cfg.tasks if t.name == args.task), cfg.tasks[0]) if args.task else cfg.tasks[0]
    cfg = cfg.model_copy(
        update={"tasks": [task.model_copy(update={"protocols": ["abmil"]})], "attention_plots": 0}
    )
    for kind in args.oracles:
        with tempfile.TemporaryDirectory() as tmp:
            oracle = write_oracle_set(sets[0], types_of, Path(tmp) / "oracle", args.noise, kind)
            t = time.perf_counter()
            res = run_evaluate([str(oracle)], str(Path(tmp) / "eval"), cfg, splits_uri=args.splits)
            what = f"noise sd {args.noise:g}" if kind == "types" else f"on {sets[0].label}'s embeddings"
            print(f"{kind} oracle ceiling ({what}, {time.perf_counter() - t:.0f} s):")
            print(res.headline_table(cfg.headline_metric))


if __name__ == "__main__":
    main()
