"""Evaluation protocols: ABMIL cross-validation (CLEAR), linear-probe grid (DALE-CT), external cohorts.

Inputs are embeddings, not images: a cohort is a list of bags ([n_slices, d] float arrays; for multi-window
inputs the windows' matrices are concatenated along the slice axis), a label matrix [n_bags, C] of 1/0/-1
(-1 = unknown), patient ids and class names.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from slicefm.evaluate.config import EvaluateConfig
from slicefm.evaluate.metrics import ClassScores, Summary, macro, score_table, summarise_folds
from slicefm.evaluate.splits import Splits, make_splits
from slicefm.evaluate.thresholds import fit_thresholds
from slicefm.evaluate.train_head import (
    TrainedHead,
    predict_logits,
    to_probabilities,
    train_abmil,
    train_probe,
)

log = logging.getLogger(__name__)


@dataclass
class FoldResult:
    fold: int
    train_index: np.ndarray
    val_index: np.ndarray
    test_index: np.ndarray
    val_scores: np.ndarray  # probabilities [len(val_index), C]
    test_scores: np.ndarray  # probabilities [len(test_index), C]
    thresholds: np.ndarray  # per class, maximising validation F1
    val_metrics: dict[str, ClassScores]
    test_metrics: dict[str, ClassScores]
    head: TrainedHead
    attention: dict[int, np.ndarray] = field(default_factory=dict)  # test bag index -> weights per slice
    selected: dict | None = None  # probe: the chosen pooling and lr
    grid: list[dict] = field(default_factory=list)  # probe: validation macro AUPRC of every (pooling, lr)

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.head.state_dict


@dataclass
class CVResult:
    class_names: list[str]
    splits: Splits
    folds: list[FoldResult]
    summary: dict[str, dict[str, Summary]]  # class | "macro" -> metric -> mean/sd over folds (test sets)

    def oof_scores(self, n_bags: int) -> np.ndarray:
        """Out-of-fold probabilities [n_bags, C] (NaN where a bag was never scored out of fold).

        Held-out mode: each non-test bag is in exactly one fold's validation set. Nested: in one test set.
        """
        out = np.full((n_bags, len(self.class_names)), np.nan)
        for f in self.folds:
            idx, s = (
                (f.val_index, f.val_scores)
                if self.splits.mode == "holdout"
                else (f.test_index, f.test_scores)
            )
            out[idx] = s
        return out


@dataclass
class ProbeResult(CVResult):
    """CVResult of the linear probe; each fold carries its grid and the selected (pooling, lr)."""

    @property
    def selections(self) -> list[dict]:
        return [f.selected or {} for f in self.folds]


@dataclass
class ExternalResult:
    """ "frozen" (cohort A's heads on cohort B) and "retrained" (new heads on B) on B's same test sets."""

    class_names: list[str]
    frozen_folds: list[dict[str, ClassScores]]
    retrained: CVResult

    @property
    def summaries(self) -> dict[str, dict[str, dict[str, Summary]]]:
        return {"frozen": summarise_folds(self.frozen_folds), "retrained": self.retrained.summary}


def _check(
    bags: Sequence[np.ndarray], labels: np.ndarray, patients: Sequence[str], class_names: Sequence[str]
) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.float32)
    if labels.ndim != 2 or labels.shape != (len(bags), len(class_names)) or len(patients) != len(bags):
        raise ValueError(
            f"need labels [n_bags, n_classes] = [{len(bags)}, {len(class_names)}] and one patient per bag; "
            f"got labels {labels.shape}, {len(patients)} patients"
        )
    if not np.isin(labels, (-1, 0, 1)).all():
        raise ValueError("labels must be 1, 0 or -1 (unknown)")
    return labels


def _finish_fold(
    fold: int,
    head: TrainedHead,
    bags: Sequence[np.ndarray],
    labels: np.ndarray,
    idx: tuple[np.ndarray, np.ndarray, np.ndarray],
    class_names: Sequence[str],
    batch: int,
) -> FoldResult:
    tr, va, te = idx
    model = head.model()
    val_logits, _ = predict_logits(model, [bags[i] for i in va], batch)
    test_logits, attn = predict_logits(model, [bags[i] for i in te], batch)
    val_p, test_p = (
        to_probabilities(val_logits, head.spec.loss),
        to_probabilities(test_logits, head.spec.loss),
    )
    thr = fit_thresholds(labels[va], val_p)
    return FoldResult(
        fold, tr, va, te, val_p, test_p, thr,
        score_table(labels[va], val_p, class_names, thr),
        score_table(labels[te], test_p, class_names, thr),
        head,
        attention={int(i): a for i, a in zip(te, attn, strict=True)} if attn is not None else {},
    )  # fmt: skip


def _splits_for(
    labels: np.ndarray, patients: Sequence[str], cfg: EvaluateConfig, seed: int, splits: Splits | None
) -> Splits:
    return splits if splits is not None else make_splits(labels, patients, cfg.splits, seed)


def run_abmil_cv(
    bags: Sequence[np.ndarray],
    labels: np.ndarray,
    patients: Sequence[str],
    class_names: Sequence[str],
    cfg: EvaluateConfig,
    seed: int,
    key_slices: Sequence[Sequence[int]] | None = None,
    splits: Splits | None = None,
) -> CVResult:
    """CLEAR protocol: one ABMIL head per fold, early-stopped on the fold's validation set, scored on its test set."""
    labels = _check(bags, labels, patients, class_names)
    splits = _splits_for(labels, patients, cfg, seed, splits)
    folds = []
    for k, fold in enumerate(splits.folds):
        idx = fold.indices(patients)
        tr, va, _ = idx
        keys = [key_slices[i] for i in tr] if key_slices is not None else None
        head = train_abmil(
            [bags[i] for i in tr], labels[tr], [bags[i] for i in va], labels[va], cfg.abmil, seed + k, keys
        )
        folds.append(_finish_fold(k, head, bags, labels, idx, class_names, cfg.abmil.eval_batch_size))
        log.info("abmil fold %d: test macro %s", k, macro(folds[-1].test_metrics))
    return CVResult(list(class_names), splits, folds, summarise_folds([f.test_metrics for f in folds]))


def run_linear_probe(
    bags: Sequence[np.ndarray],
    labels: np.ndarray,
    patients: Sequence[str],
    class_names: Sequence[str],
    cfg: EvaluateConfig,
    seed: int,
    splits: Splits | None = None,
) -> ProbeResult:
    """DALE-CT protocol: per fold, a probe for every (pooling, lr); the best validation macro AUPRC is kept."""
    labels = _check(bags, labels, patients, class_names)
    splits = _splits_for(labels, patients, cfg, seed, splits)
    pcfg = cfg.probe
    folds = []
    for k, fold in enumerate(splits.folds):
        idx = fold.indices(patients)
        tr, va, _ = idx
        best: TrainedHead | None = None
        grid, selected = [], None
        for pooling in pcfg.poolings:
            for lr in pcfg.lrs:
                head = train_probe(
                    [bags[i] for i in tr], labels[tr], [bags[i] for i in va], labels[va], pooling, lr, pcfg,
                    seed + k, pcfg.loss,
                )  # fmt: skip
                grid.append(
                    {"pooling": pooling, "lr": lr, "val_auprc": head.best_score, "step": head.best_step}
                )
                if best is None or head.best_score > best.best_score:
                    best, selected = head, {"pooling": pooling, "lr": lr}
        result = _finish_fold(k, best, bags, labels, idx, class_names, pcfg.eval_batch_size)  # type: ignore[arg-type]
        result.grid, result.selected = grid, selected
        folds.append(result)
        log.info("probe fold %d: selected %s", k, selected)
    return ProbeResult(list(class_names), splits, folds, summarise_folds([f.test_metrics for f in folds]))


def apply_class_map(
    scores: np.ndarray,
    source_classes: Sequence[str],
    class_map: Mapping[str, str | Sequence[str]],
    target_classes: Sequence[str],
) -> np.ndarray:
    """Scores over target classes from source-class scores; a target mapped to several sources takes their max
    (DALE-CT: RAD-ChestCT calcification = max of CT-RATE's two calcification classes)."""
    src = {c: i for i, c in enumerate(source_classes)}
    out = np.empty((scores.shape[0], len(target_classes)), dtype=np.float64)
    for j, name in enumerate(target_classes):
        mapped = class_map.get(name, name)
        names = [mapped] if isinstance(mapped, str) else list(mapped)
        missing = [n for n in names if n not in src]
        if missing:
            raise KeyError(f"target class {name!r} maps to unknown source classes {missing}")
        out[:, j] = scores[:, [src[n] for n in names]].max(axis=1)
    return out


def run_external(
    source: CVResult,
    bags: Sequence[np.ndarray],
    labels: np.ndarray,
    patients: Sequence[str],
    class_names: Sequence[str],
    class_map: Mapping[str, str | Sequence[str]],
    cfg: EvaluateConfig,
    seed: int,
    protocol: str = "abmil",
    splits: Splits | None = None,
) -> ExternalResult:
    """Cohort B scored two ways on the same test sets: "frozen" = cohort A's fold heads unchanged (scores mapped
    to B's classes), "retrained" = new heads trained on B's train splits with the same protocol."""
    if protocol == "abmil":
        retrained: CVResult = run_abmil_cv(bags, labels, patients, class_names, cfg, seed, splits=splits)
    elif protocol == "probe":
        retrained = run_linear_probe(bags, labels, patients, class_names, cfg, seed, splits=splits)
    else:
        raise ValueError(f"unknown protocol {protocol!r}")
    labels = np.asarray(labels, dtype=np.float32)
    frozen = []
    for k, fold in enumerate(retrained.folds):
        src = source.folds[k % len(source.folds)]
        logits, _ = predict_logits(src.head.model(), [bags[i] for i in fold.test_index])
        mapped = apply_class_map(
            to_probabilities(logits, src.head.spec.loss), source.class_names, class_map, class_names
        )
        # Frozen thresholds come from cohort A; a many-to-one class takes the lowest of its sources' thresholds.
        thr = -apply_class_map(-src.thresholds[None, :], source.class_names, class_map, class_names)[0]
        frozen.append(score_table(labels[fold.test_index], mapped, class_names, thr))
    return ExternalResult(list(class_names), frozen, retrained)
