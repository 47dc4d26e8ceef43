"""Two-process gloo DDP pretraining on CPU: replicas stay in sync."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slicefm.core.store import open_store
from slicefm.train.data import load_index
from slicefm.train.distributed import DistContext
from slicefm.train.loop import train
from slicefm.train.methods import build_method
from slicefm.train.stage import seed_everything
from tests.train.conftest import tiny_config


def _worker(rank: int, tmp: str, pre: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    try:
        cfg = tiny_config("lecl", "vit_tiny_test", steps=4, loader={"batch_size": 4})
        ctx = DistContext.current()
        index = load_index(open_store(pre))
        seed_everything(cfg.seed + rank)  # different init per rank: DDP must broadcast rank 0's weights
        method = build_method(cfg, index, ctx)
        outcome = train(method, cfg, index, open_store(f"{tmp}/out"), ctx, resume=False)
        torch.save({"model": method.model.state_dict(), "step": outcome.step}, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_ddp_keeps_replicas_in_sync(preprocessed: str, tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path), preprocessed), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=False)
    b = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    # Weights must agree exactly across ranks; BatchNorm running statistics are per-rank (SyncBatchNorm
    # is used on CUDA only) and are not compared.
    for key, value in a["model"].items():
        if value.is_floating_point() and "running_" not in key:
            torch.testing.assert_close(value, b["model"][key], rtol=0, atol=1e-6, msg=key)
    assert (tmp_path / "out" / "checkpoints" / "latest.pt").exists()
