"""torchrun entry point: `python -m slicefm.train.launch --preprocessed URI --out URI --config YAML`.

Initialises the process group from torchrun's environment (nccl on GPU, gloo on CPU) or runs as a
single process when started without torchrun. The YAML is a bare PretrainConfig or a full pipeline
config with a `pretrain:` section.

An edge entry point (a TrainJob's pods run it): on rank 0 with MLFLOW_RUN_ID set it logs the training's
per-step metrics into that run through `slicefm.tracking.mlflow_runs`. The launcher that owns the run logs
the encoder files and the result once the job is done.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from slicefm.tracking.mlflow_runs import joined_run, log_step_metrics
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preprocessed", required=True, help="preprocess output (local dir or s3://)")
    parser.add_argument("--out", required=True, help="output location (local dir or s3://)")
    parser.add_argument("--config", required=True, type=Path, help="YAML with a pretrain: section")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_pretrain_config(yaml.safe_load(args.config.read_text()))
    started = init_distributed()
    try:
        with stage_run() as tracked:
            result = run_pretrain(
                args.preprocessed, args.out, cfg, resume=not args.no_resume,
                log_metrics=log_step_metrics if tracked else None,
            )  # fmt: skip
        if not dist.is_initialized() or dist.get_rank() == 0:
            logging.getLogger(__name__).info("result: %s", json.dumps(result.to_dict()))
    finally:
        if started:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
