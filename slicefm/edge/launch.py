"""One rank of pretraining: `slicefm pretrain-worker --preprocessed URI --out URI --config YAML`, what torchrun
starts in a TrainJob's pods (`torchrun -m slicefm pretrain-worker ...`).

Initialises the process group from torchrun's environment (nccl on GPU, gloo on CPU) or runs as a
single process when started without torchrun. The YAML is a bare PretrainConfig or a full pipeline
config with a `pretrain:` section.

An edge entry point (a TrainJob's pods run it): on rank 0 with MLFLOW_RUN_ID set it logs the training's
per-step metrics into that run through `slicefm.edge.tracking.mlflow_runs`. The launcher that owns the run logs
the encoder files and the result once the job is done.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from slicefm.edge.tracking.mlflow_runs import joined_run, log_step_metrics
from slicefm.train.config import load_pretrain_config
from slicefm.train.stage import run_pretrain


def init_distributed() -> bool:
    """Join torchrun's process group when WORLD_SIZE > 1; returns whether one was initialised."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl")
    else:
        dist.init_process_group(backend="gloo")
    return True


@contextlib.contextmanager
def stage_run() -> Iterator[bool]:
    """On rank 0 with MLFLOW_RUN_ID set (a TrainJob's pods): log into that run, the launcher's stage run
    (handed back still RUNNING: its launcher ends it). Yields whether metrics go to a run."""
    run_id = os.environ.get("MLFLOW_RUN_ID") if int(os.environ.get("RANK", "0")) == 0 else None
    with joined_run(run_id) as tracked:
        yield tracked


def run_worker(preprocessed: str, out: str, config_path: Path, *, resume: bool = True) -> None:
    """Pretrain as this torchrun rank (or as the only process), logging to the launcher's run on rank 0."""
    cfg = load_pretrain_config(yaml.safe_load(config_path.read_text()))
    started = init_distributed()
    try:
        with stage_run() as tracked:
            result = run_pretrain(
                preprocessed, out, cfg, resume=resume, log_metrics=log_step_metrics if tracked else None
            )
        if not dist.is_initialized() or dist.get_rank() == 0:
            logging.getLogger(__name__).info("result: %s", json.dumps(result.to_dict()))
    finally:
        if started:
            dist.destroy_process_group()
