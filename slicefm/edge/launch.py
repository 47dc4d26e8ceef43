"""One rank of pretraining: `slicefm pretrain-worker --preprocessed URI --out URI --config YAML`, what torchrun
starts in a TrainJob's pods (`torchrun -m slicefm pretrain-worker ...`) and, through `run_torchrun`, in a
pretrain step given several GPUs of one node.

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
import subprocess
import sys
import tempfile
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


def torchrun_command(nproc: int, preprocessed: str, out: str, config_path: Path) -> list[str]:
    """torchrun on this node: `nproc` ranks of `slicefm pretrain-worker` (a rendezvous of its own)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "slicefm", "pretrain-worker", "--preprocessed", preprocessed, "--out", out,
        "--config", str(config_path),
    ]  # fmt: skip


def run_torchrun(
    nproc: int,
    preprocessed: str,
    out: str,
    config_yaml: str,
    *,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
) -> None:
    """Pretrain with `nproc` processes on this node (one per GPU) and wait; rank 0 logs its per-step metrics
    into `mlflow_run_id`. Raises naming the exit code when any rank fails."""
    env = dict(os.environ)
    if mlflow_run_id:
        env["MLFLOW_RUN_ID"] = mlflow_run_id
        if tracking_uri:
            env["MLFLOW_TRACKING_URI"] = tracking_uri
    with tempfile.TemporaryDirectory(prefix="slicefm-torchrun-") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(config_yaml)
        done = subprocess.run(torchrun_command(nproc, preprocessed, out, config), env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun of {nproc} pretraining processes exited {done.returncode} (see the log above)")
