"""Sweep pretraining recipes on the demo cohorts: does the backbone stay uncollapsed, and does it beat random?

For every variant (overrides of the demo config's `pretrain` section) the script pretrains on the pretraining
cohort, embeds the evaluation cohort with the product's extract stage, and prints side by side:
- the scale-free SIGReg (`SIGReg.collapse_fraction`: 0 Gaussian, 1 collapsed) of the run's collapse checks
  (mean over the run's steps and the worst window) and the projector's effective rank at the end;
- the backbone's effective rank (RankMe) on 2,048 extracted slices per window, and random weights' rank;
- the chest-findings linear probe (the evaluate stage's own protocol and folds), pretrained vs random:
  macro AUROC and the paired per-fold difference with its 95% interval;
- the slice lesion-presence probe (abdomen window, grouped 5-fold logistic regression), pretrained / random.

    .venv/bin/python benchmarks/ssl_sweep.py --pretrain-data PRE_P --eval-data PRE_A --splits EVAL_OUT \\
        --variants benchmarks/ssl_sweep_variants.yaml [--only NAME ...] --out /tmp/sweep

`--variants` YAML: {name: {<pretrain overrides>}}; the reference is pipelines/configs/demo-cpu.yaml (`--config`).
No asserts: record the printed table in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lesion_signal import lesion_types_per_slice, slice_presence_auroc, slice_table

from slicefm.core.store import open_store
from slicefm.embed.reader import EmbeddingSet
from slicefm.train.collapse import effective_rank
from slicefm.train.config import PretrainConfig
from slicefm.train.stage import run_pretrain

RANK_SLICES = 2048


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = (
            merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def slicefm(*args: str) -> None:
    subprocess.run(
        [str(Path(sys.executable).parent / "slicefm"), *args], check=True, stdout=subprocess.DEVNULL
    )


def backbone_rank(es: EmbeddingSet) -> dict[str, float]:
    """RankMe of RANK_SLICES random slices per window (fixed draw)."""
    out = {}
    for window in es.windows:
        x = np.concatenate([es.matrix(s, window).astype(np.float32) for s in es.scans["scan_id"]])
        rows = np.random.default_rng(0).permutation(len(x))[:RANK_SLICES]
        out[window] = effective_rank(torch.from_numpy(x[rows]))
    return out


def extract(pre_a: str, out: Path, config: str, encoder: str, random: bool = False) -> EmbeddingSet:
    """The extract stage on the evaluation cohort: the pretrained encoder, or its architecture with random
    weights (`random`)."""
    if not (out / "extract.json").exists():
        args = [
            "extract",
            "--preprocessed",
            pre_a,
            "--out",
            str(out),
            "--config",
            config,
            "--encoder",
            encoder,
        ]
        slicefm(*(args + (["--random-baseline"] if random else [])))
    return EmbeddingSet(str(out))


def evaluate(pre: Path, rand: Path, out: Path, splits: str, config: str) -> dict[str, Any]:
    if not (out / "results.json").exists():
        slicefm(
            "evaluate",
            "--embeddings",
            str(pre),
            str(rand),
            "--out",
            str(out),
            "--splits",
            splits,
            "--config",
            config,
        )
    return json.loads((out / "results.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain-data", required=True)
    p.add_argument("--eval-data", required=True)
    p.add_argument("--splits", required=True, help="an evaluate output of the same cohort (its folds)")
    p.add_argument("--variants", required=True)
    p.add_argument("--only", nargs="*")
    p.add_argument("--config", default="pipelines/configs/demo-cpu.yaml")
    p.add_argument("--out", default="/tmp/ssl_sweep")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = yaml.safe_load(Path(args.config).read_text())
    # Evaluate the chest-findings probe only (the lesion-location ABMIL is near chance at this scale).
    eval_cfg = copy.deepcopy(base)
    eval_cfg["evaluate"]["tasks"] = [t for t in base["evaluate"]["tasks"] if t["name"] == "chest_findings"]
    eval_cfg["evaluate"]["attention_plots"] = 0
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    eval_yaml = out_root / "evaluate.yaml"
    eval_yaml.write_text(yaml.safe_dump(eval_cfg))
    variants = yaml.safe_load(Path(args.variants).read_text())
    pre_store = open_store(args.eval_data)
    types = None
    for name, over in variants.items():
        if args.only and name not in args.only:
            continue
        work = out_root / name
        cfg = PretrainConfig.model_validate(merged(base["pretrain"], over or {}))
        cfg = cfg.model_copy(update={"logging": cfg.logging.model_copy(update={"collapse_action": "warn"})})
        t0 = time.time()
        result = run_pretrain(args.pretrain_data, str(work / "encoder"), cfg, resume=True)
        train_s = time.time() - t0
        pre = extract(args.eval_data, work / "pretrained", str(eval_yaml), str(work / "encoder"))
        # Random weights depend on the architecture only: one set per encoder spec, shared by variants.
        arch = json.dumps(cfg.encoder.model_dump(mode="json"), sort_keys=True)
        rand_dir = out_root / f"random-{hashlib.sha1(arch.encode()).hexdigest()[:8]}"
        rand = extract(args.eval_data, rand_dir, str(eval_yaml), str(work / "encoder"), random=True)
        res = evaluate(work / "pretrained", rand_dir, work / "evaluate", args.splits, str(eval_yaml))
        if types is None:
            types = lesion_types_per_slice(
                pre_store, list(pre.scans["scan_id"]), pre_store.read_parquet("lesions.parquet")
            )
        presence = {}
        for label, es in (("pretrained", pre), ("random", rand)):
            x, t, g = slice_table(es, "abdomen", types)
            presence[label] = slice_presence_auroc(x, t, g)
        macro = res["macro"]["chest_findings"]
        paired = res["paired"]["chest_findings"]["probe"]["pretrained"]
        hist = result.collapse_history
        row = {
            "variant": name, "train_s": round(train_s), "steps": result.steps,
            "sigreg_mean": float(np.mean([h["sigreg_collapse"] for h in hist if "sigreg_collapse" in h] or [np.nan])),
            "sigreg_worst": float(np.max([h.get("sigreg_collapse_max", np.nan) for h in hist] or [np.nan])),
            "proj_rank": result.collapse.get("proj_eff_rank"),
            "rank_pre": backbone_rank(pre), "rank_rand": backbone_rank(rand), "dim": pre.meta["encoder"].get("embed_dim"),
            "chest_pre": macro["pretrained · probe"]["auroc"], "chest_rand": macro["random · probe"]["auroc"],
            "chest_diff": paired, "presence": presence,
        }  # fmt: skip
        (work / "row.json").write_text(json.dumps(row, indent=1, default=str))
        print(json.dumps(row, default=lambda v: round(v, 3) if isinstance(v, float) else str(v)), flush=True)


if __name__ == "__main__":
    main()
