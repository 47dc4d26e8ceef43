"""torchrun entry point: `python -m slicefm.train.launch --preprocessed URI --out URI --config YAML`.

Initialises the process group from torchrun's environment (nccl on GPU, gloo on CPU) or runs as a
single process when started without torchrun. The YAML is a bare PretrainConfig or a full pipeline
config with a `pretrain:` section.
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
def stage_run() -> Iterator[None]:
    """On rank 0 with MLFLOW_RUN_ID set (a TrainJob's pods): log into that run, the launcher's stage run.

    The run is handed back still RUNNING: its launcher ends it (FINISHED, or FAILED with the job)."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    import mlflow

    if mlflow.active_run() is not None:  # already inside a run (in-process callers)
        yield
        return
    mlflow.start_run(run_id=run_id)
    logging.getLogger(__name__).info("logging training metrics to MLflow run %s", run_id)
    try:
        yield
    finally:
        mlflow.end_run(status="RUNNING")


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
        with stage_run():
            result = run_pretrain(args.preprocessed, args.out, cfg, resume=not args.no_resume)
        if not dist.is_initialized() or dist.get_rank() == 0:
            logging.getLogger(__name__).info("result: %s", json.dumps(result.to_dict()))
    finally:
        if started:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
