"""Training and inference of MIL heads (CLEAR ABMIL, DALE-CT linear probes) on padded, masked bag batches."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slicefm.evaluate.config import AbmilConfig, ProbeConfig
from slicefm.evaluate.metrics import macro, score_table
from slicefm.mil.abmil import ABMIL
from slicefm.mil.bags import collate_bags, pack_bags, subsample_indices
from slicefm.mil.pooling import LinearProbe

log = logging.getLogger(__name__)
HEAD_FORMAT_VERSION = 1


@dataclass
class HeadSpec:
    """Everything needed to rebuild a head before loading its state dict."""

    kind: str  # "abmil" | "probe"
    d: int
    n_classes: int
    loss: str = "bce"  # "bce" (multi-label, sigmoid) | "ce" (exclusive classes, softmax)
    hidden: int = 256
    dropout: float = 0.5
    pooling: str = "mean"
    n_queries: int = 4
    version: int = HEAD_FORMAT_VERSION

    def to_dict(self) -> dict:
        return asdict(self)


def build_head(spec: HeadSpec) -> nn.Module:
    if spec.version != HEAD_FORMAT_VERSION:
        raise ValueError(f"head format {spec.version} != supported {HEAD_FORMAT_VERSION}")
    if spec.kind == "abmil":
        return ABMIL(spec.d, spec.n_classes, spec.hidden, spec.dropout)
    if spec.kind == "probe":
        return LinearProbe(spec.d, spec.n_classes, spec.pooling, spec.n_queries)
    raise ValueError(f"unknown head kind {spec.kind!r}")


@dataclass
class TrainedHead:
    spec: HeadSpec
    state_dict: dict[str, torch.Tensor]
    best_step: int  # epoch (ABMIL) or optimiser step (probe) whose weights were kept
    best_score: float
    history: list[dict] = field(default_factory=list)

    def model(self) -> nn.Module:
        m = build_head(self.spec)
        m.load_state_dict(self.state_dict)
        return m.eval()


def masked_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, kind: str, pos_weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """(sum of per-term losses, number of terms): BCE terms over known labels only (-1 masked out), or CE
    terms over rows with exactly one known positive. Sums let chunked batches add up to the batch mean."""
    if kind == "bce":
        known = (labels >= 0).to(logits.dtype)
        per = F.binary_cross_entropy_with_logits(
            logits, labels.clamp_min(0).to(logits.dtype), pos_weight=pos_weight, reduction="none"
        )
        return (per * known).sum(), float(known.sum())
    if kind == "ce":
        valid = (labels >= 0).all(dim=1) & ((labels == 1).sum(dim=1) == 1)
        if not bool(valid.any()):
            return logits.sum() * 0.0, 0.0
        return F.cross_entropy(logits[valid], labels[valid].argmax(dim=1), reduction="sum"), float(
            valid.sum()
        )
    raise ValueError(f"unknown loss {kind!r}")


def masked_loss(
    logits: torch.Tensor, labels: torch.Tensor, kind: str, pos_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of masked_loss_sum's terms (0 when there are none)."""
    total, count = masked_loss_sum(logits, labels, kind, pos_weight)
    return total / max(count, 1.0)


def instance_chunks(lengths: np.ndarray, max_instances: int | None) -> list[np.ndarray]:
    """Split a batch (positions 0..B-1) into consecutive chunks of at most `max_instances` padded instances.

    On CPU one huge padded tensor spills the caches (the element-wise ops become memory-bound); chunks of a
    few thousand instances with gradients accumulated give the same update faster. None = one chunk.
    """
    if max_instances is None:
        return [np.arange(lengths.size)]
    chunks, start = [], 0
    for end in range(1, lengths.size + 1):
        if end - start > 1 and lengths[start:end].max() * (end - start) > max_instances:
            chunks.append(np.arange(start, end - 1))
            start = end - 1
    chunks.append(np.arange(start, lengths.size))
    return chunks


def to_probabilities(logits: np.ndarray, kind: str) -> np.ndarray:
    t = torch.from_numpy(logits)
    return (torch.sigmoid(t) if kind == "bce" else torch.softmax(t, dim=1)).numpy()


def class_pos_weight(labels: np.ndarray) -> torch.Tensor:
    """CLEAR's per-class positive weight n_neg / n_pos over known labels (1 where a class has no positives)."""
    pos = (labels == 1).sum(axis=0).astype(np.float64)
    neg = (labels == 0).sum(axis=0).astype(np.float64)
    return torch.tensor(np.where(pos > 0, neg / np.maximum(pos, 1), 1.0), dtype=torch.float32)


# An ABMIL head packs its validation bags (float32) once and reuses them every epoch if they fit in this.
VAL_CACHE_BYTES = 2 << 30

EvalBatch = tuple[np.ndarray, tuple[torch.Tensor, torch.Tensor]]  # bag positions, model inputs


def _packs(model: nn.Module) -> bool:
    """Heads with a packed forward (ABMIL) take concatenated bags; the others (probes) a padded batch."""
    return hasattr(model, "forward_packed")


def eval_batches(bags: Sequence[np.ndarray], batch_size: int, packed: bool) -> list[EvalBatch]:
    """Inference inputs for `bags`, batched by similar length (sorted) so padded batches stay small."""
    order = np.argsort([b.shape[0] for b in bags], kind="stable")
    make = pack_bags if packed else collate_bags
    return [
        (idx, make([bags[i] for i in idx]))
        for idx in (order[start : start + batch_size] for start in range(0, len(bags), batch_size))
    ]


@torch.no_grad()
def _predict(
    model: nn.Module, batches: Sequence[EvalBatch], lengths: Sequence[int]
) -> tuple[np.ndarray, list[np.ndarray] | None]:
    model.eval()
    packed = _packs(model)
    logits: list[np.ndarray | None] = [None] * len(lengths)
    attn: list[np.ndarray | None] = [None] * len(lengths)
    has_attn = False
    for idx, inputs in batches:
        out, a = model.forward_packed(*inputs) if packed else model(*inputs)  # type: ignore[operator]
        out = out.numpy()
        for j, i in enumerate(idx):
            logits[i] = out[j]
            if a is not None:
                has_attn = True
                attn[i] = a[j, : lengths[i]].numpy().copy()
    return np.stack(logits), (attn if has_attn else None)  # type: ignore[return-value,arg-type]


def predict_logits(
    model: nn.Module, bags: Sequence[np.ndarray], batch_size: int = 256
) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """Logits [n, C] and (for attention heads) each bag's attention weights over its full slice sequence.

    Bags are batched by similar length (sorted) to keep padding small; order is restored on return.
    """
    batches = eval_batches(bags, batch_size, _packs(model))
    return _predict(model, batches, [int(b.shape[0]) for b in bags])


def _validation_score(
    model: nn.Module,
    bags: Sequence[np.ndarray],
    labels: np.ndarray,
    kind: str,
    monitor: str,
    batch: int,
    cached: Sequence[EvalBatch] | None = None,
) -> tuple[float, dict]:
    """Higher is better: -loss, macro AUROC or macro AUPRC on the validation bags (`cached`: their inputs)."""
    batches = cached if cached is not None else eval_batches(bags, batch, _packs(model))
    logits, _ = _predict(model, batches, [int(b.shape[0]) for b in bags])
    if not np.isfinite(logits).all():  # a diverged run (e.g. LR 0.3 with max pooling) loses the selection
        return -math.inf, {"val_loss": math.inf, "val_auroc": None, "val_auprc": None}
    loss = float(masked_loss(torch.from_numpy(logits), torch.from_numpy(labels), kind))
    m = macro(score_table(labels, to_probabilities(logits, kind), [str(c) for c in range(labels.shape[1])]))
    info = {"val_loss": loss, "val_auroc": m["auroc"], "val_auprc": m["auprc"]}
    if monitor == "val_loss":
        return -loss, info
    value = info[monitor]
    return (-math.inf if value is None else float(value)), info


def bucketed_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, bucket: int = 8
) -> list[np.ndarray]:
    """Random batches whose members have similar lengths, to waste little compute on padding.

    Shuffle, sort each run of `bucket` batches' worth of bags by length, cut into batches, shuffle the
    batch order: every epoch still sees every bag once in random company, yet padding stays small.
    """
    perm = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(perm), batch_size * bucket):
        chunk = perm[start : start + batch_size * bucket]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def train_abmil(
    train_bags: Sequence[np.ndarray],
    train_labels: np.ndarray,
    val_bags: Sequence[np.ndarray],
    val_labels: np.ndarray,
    cfg: AbmilConfig,
    seed: int,
    key_slices: Sequence[Sequence[int]] | None = None,
) -> TrainedHead:
    """CLEAR recipe: Adam, mini-batches of bags sub-sampled to <= max_instances slices (key slices kept),
    early stopping on the validation monitor with the best epoch's weights restored."""
    rng = np.random.default_rng(seed)
    spec = HeadSpec(
        "abmil", int(train_bags[0].shape[1]), int(train_labels.shape[1]), cfg.loss, cfg.hidden, cfg.dropout
    )
    pos_weight = class_pos_weight(train_labels) if (cfg.loss == "bce" and cfg.pos_weight) else None
    y_all = torch.from_numpy(np.asarray(train_labels, dtype=np.float32))
    keys = key_slices if key_slices is not None else [()] * len(train_bags)
    n_all = np.asarray([b.shape[0] for b in train_bags])
    lengths = np.minimum(n_all, cfg.max_instances or n_all.max())
    val_bytes = sum(b.shape[0] for b in val_bags) * spec.d * 4
    val_cache = eval_batches(val_bags, cfg.eval_batch_size, True) if val_bytes <= VAL_CACHE_BYTES else None

    def bag_rows(i: int) -> np.ndarray:
        # subsample_indices draws from rng only for bags over the cap; below it, skip the identity copy.
        if lengths[i] == n_all[i]:
            return train_bags[i]
        return train_bags[i][subsample_indices(int(n_all[i]), cfg.max_instances, rng, keys[i])]

    # fork_rng: seed torch (init, dropout) for this head only, leaving the caller's global RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_head(spec)
        assert isinstance(model, ABMIL)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        best, best_epoch, best_state, stale, history = -math.inf, -1, None, 0, []
        for epoch in range(cfg.epochs):
            model.train()
            total = 0.0
            for idx in bucketed_batches(lengths, cfg.batch_size, rng):
                sub = [bag_rows(i) for i in idx]
                opt.zero_grad(set_to_none=True)
                n_terms = masked_loss_sum(torch.zeros(len(idx), spec.n_classes), y_all[idx], cfg.loss)[1]
                batch_loss = 0.0
                # Gradients of the chunks add up to the gradient of the whole batch's mean loss (no batch
                # statistics anywhere in ABMIL: LayerNorm is per bag).
                for chunk in instance_chunks(lengths[idx], cfg.chunk_instances):
                    logits, _ = model.forward_packed(*pack_bags([sub[j] for j in chunk]))
                    loss_sum, _ = masked_loss_sum(logits, y_all[idx[chunk]], cfg.loss, pos_weight)
                    (loss_sum / max(n_terms, 1.0)).backward()
                    batch_loss += float(loss_sum.detach())
                opt.step()
                total += batch_loss / max(n_terms, 1.0) * len(idx)
            score, info = _validation_score(
                model, val_bags, val_labels, cfg.loss, cfg.monitor, cfg.eval_batch_size, val_cache
            )
            history.append({"epoch": epoch, "train_loss": total / len(train_bags), **info})
            if score > best:
                best, best_epoch, best_state, stale = score, epoch, copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    log.info("early stop at epoch %d (best %d)", epoch, best_epoch)
                    break
    return TrainedHead(spec, best_state or model.state_dict(), best_epoch, best, history)


def train_probe(
    train_bags: Sequence[np.ndarray],
    train_labels: np.ndarray,
    val_bags: Sequence[np.ndarray],
    val_labels: np.ndarray,
    pooling: str,
    lr: float,
    cfg: ProbeConfig,
    seed: int,
    loss: str = "bce",
) -> TrainedHead:
    """DALE-CT probe recipe: SGD (momentum 0.95, wd 0), cosine LR over `steps`, batches of 16 bags; the
    step with the best validation macro AUPRC (checked every `eval_every` steps and at the end) is kept."""
    rng = np.random.default_rng(seed)
    spec = HeadSpec(
        "probe",
        int(train_bags[0].shape[1]),
        int(train_labels.shape[1]),
        loss,
        pooling=pooling,
        n_queries=cfg.n_queries,
    )
    y_all = torch.from_numpy(np.asarray(train_labels, dtype=np.float32))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_head(spec)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps))
        )
        best, best_step, best_state, history = -math.inf, -1, None, []
        perm, pos = rng.permutation(len(train_bags)), 0
        for step in range(1, cfg.steps + 1):
            model.train()
            if pos + cfg.batch_size > len(perm):  # new epoch: reshuffle
                perm, pos = rng.permutation(len(train_bags)), 0
            idx = perm[pos : pos + cfg.batch_size]
            pos += cfg.batch_size
            x, mask = collate_bags([train_bags[i] for i in idx])
            logits, _ = model(x, mask)
            loss_value = masked_loss(logits, y_all[idx], loss)
            opt.zero_grad(set_to_none=True)
            loss_value.backward()
            opt.step()
            sched.step()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                score, info = _validation_score(
                    model, val_bags, val_labels, loss, "val_auprc", cfg.eval_batch_size
                )
                history.append({"step": step, "train_loss": float(loss_value.detach()), **info})
                if score > best or best_state is None:
                    best, best_step, best_state = score, step, copy.deepcopy(model.state_dict())
    return TrainedHead(spec, best_state, best_step, best, history)  # type: ignore[arg-type]
