"""The pretrain stage: preprocess output -> trained encoder (encoder.safetensors + encoder.json) + checkpoints.

Runs as one process or under torchrun (the caller, `slicefm pretrain-worker` in slicefm.edge.launch, initialises the process
group). Resumes from `checkpoints/latest.pt` in `out_uri` when `resume` is set. Tracking is the caller's:
per-step metrics go to its `log_metrics` callback, and the result names what was written where.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from slicefm.core.store import open_store
from slicefm.models.export_format import WEIGHTS_KEY, export_encoder
from slicefm.train.config import PretrainConfig
from slicefm.train.data import load_index
from slicefm.train.distributed import DistContext
from slicefm.train.loop import MetricsCallback, TrainOutcome, train
from slicefm.train.methods import build_method

logger = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    out_uri: str
    steps: int
    final_loss: float
    loss_first: float  # mean of the first few steps' losses
    loss_last: float  # mean of the last few steps' losses
    slices_per_s: float
    data_wait_s: float = 0.0  # mean per step
    compute_s: float = 0.0  # mean per step
    collapse: dict[str, float] = field(default_factory=dict)  # the last collapse check
    collapse_history: list[dict[str, float]] = field(default_factory=list)  # every check (step + metrics)
    encoder_uri: str | None = None
    n_train_scans: int = 0  # scans of the pretraining data (lineage: which cohort the encoder saw)

    def to_dict(self) -> dict:
        return asdict(self)


def loss_summary(losses: list[float], k: int | None = None) -> tuple[float, float]:
    """Mean of the first and of the last k losses (k = 20% of the run, at least 1)."""
    if not losses:
        return float("nan"), float("nan")
    k = k or max(1, len(losses) // 5)
    return float(np.mean(losses[:k])), float(np.mean(losses[-k:]))


def seed_everything(seed: int) -> None:
    """Seed the global RNGs used by model construction (weights init) and any library that reads them."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_pretrain(
    preprocessed_uri: str,
    out_uri: str,
    cfg: PretrainConfig,
    resume: bool = True,
    stop_after: int | None = None,
    *,
    log_metrics: MetricsCallback | None = None,
) -> PretrainResult:
    """Pretrain `cfg.method` on a preprocess output; writes checkpoints and the exported encoder to out_uri
    (`encoder_uri` of the result; None when nothing was exported).

    `log_metrics(metrics, step)` receives the training's step and collapse-check metrics on rank 0.
    `stop_after` ends the run after that many global steps without exporting (as if it had been killed):
    used to test resumption.
    """
    ctx = DistContext.current()
    out = open_store(out_uri)
    index = load_index(
        open_store(preprocessed_uri),
        cfg.loader.exclude_splits,
        per_window=cfg.input_channels == "per_window",
        typed_lesions=cfg.aux.mode is not None and cfg.aux.lesion_classes == "typed",
    )
    seed_everything(cfg.seed)
    method = build_method(cfg, index, ctx)
    if ctx.rank == 0:
        out.write_json("pretrain_config.json", cfg.model_dump(mode="json"))
    outcome: TrainOutcome = train(
        method, cfg, index, out, ctx, resume=resume, stop_after=stop_after, log_metrics=log_metrics
    )
    first, last = loss_summary(outcome.losses)
    result = PretrainResult(
        out_uri=out.uri(""),
        steps=outcome.step,
        final_loss=outcome.losses[-1] if outcome.losses else float("nan"),
        loss_first=first,
        loss_last=last,
        slices_per_s=outcome.slices_per_s,
        data_wait_s=outcome.data_wait_s / max(1, len(outcome.losses)),
        compute_s=outcome.compute_s / max(1, len(outcome.losses)),
        collapse=outcome.collapse,
        collapse_history=outcome.collapse_history,
        n_train_scans=int(index.slices["scan_id"].nunique()),
    )
    if outcome.stopped_early:
        return result
    if ctx.rank == 0:
        meta = {
            "method": cfg.method,
            "channels": index.channels,
            "input_channels": cfg.input_channels,
            "input_dtype": index.dtype,
            "config": cfg.model_dump(mode="json"),
            "data_version": index.data_version,
            "data_key_fingerprint": index.key_fingerprint,
            "git_commit": cfg.git_commit,
            "steps": outcome.step,
        }
        export_encoder(method.encoder, out.uri(""), meta)
        result.encoder_uri = out.uri(WEIGHTS_KEY)
        out.write_json("pretrain_result.json", result.to_dict())
    ctx.barrier()
    logger.info(
        "pretraining done: %d steps, loss %.4f -> %.4f, %.1f slices/s",
        result.steps,
        first,
        last,
        result.slices_per_s,
    )
    return result
