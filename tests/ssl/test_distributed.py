"""Distributed InfoNCE, SIGReg and lesion bank (2 gloo processes) equal their global-batch values."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slicefm.ssl.infonce import InfoNCELoss, LesionKeyBank
from slicefm.ssl.sigreg import SIGReg

WORLD = 2
SIGREG_STEP = 11


def _make_data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(8, 6, generator=g, dtype=torch.float64)
    return {
        "q": q,
        "k": q + 0.4 * torch.randn(8, 6, generator=g, dtype=torch.float64),
        "lesion": torch.randn(3, 6, generator=g, dtype=torch.float64),
        "mask": torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool),
        "z": torch.randn(8, 5, generator=g, dtype=torch.float64) * 1.5 + 0.3,
        # rank 0 encodes 3 key slices, rank 1 encodes 1: uneven sizes exercise the padded gather.
        "bank_keys": torch.randn(4, 6, generator=g),
        "bank_ids": torch.tensor([4, 0, 7, 2]),
    }


def _losses(q, k, lesion, mask) -> dict[str, torch.Tensor]:
    paper = InfoNCELoss(temperature=0.2, lesion_lambda=1.0, scale_by_2t=True)
    code = InfoNCELoss(temperature=0.5, lesion_lambda=3.0, scale_by_2t=False, lesion_term="code")
    return {"paper": paper(q, k, lesion_keys=lesion), "code": code(q, k, lesion_mask=mask)}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        data = _make_data()
        b = data["q"].shape[0] // WORLD
        sl = slice(rank * b, (rank + 1) * b)
        q = data["q"][sl].clone().requires_grad_(True)
        losses = _losses(q, data["k"][sl], data["lesion"], data["mask"][sl])
        losses["paper"].backward()
        z = data["z"][sl].clone().requires_grad_(True)
        sig = SIGReg(num_directions=16)(z, step=SIGREG_STEP)
        sig.backward()
        bank = LesionKeyBank(size=8, dim=6)
        own = slice(0, 3) if rank == 0 else slice(3, 4)
        bank.update(data["bank_keys"][own], data["bank_ids"][own])
        result = {
            "paper": losses["paper"].detach(),
            "code": losses["code"].detach(),
            "q_grad": q.grad,
            "sigreg": sig.detach(),
            "z_grad": z.grad,
            "bank": bank.bank.clone(),
            "filled": bank.filled.clone(),
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_losses_equal_global_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    data = _make_data()

    q = data["q"].clone().requires_grad_(True)
    expected = _losses(q, data["k"], data["lesion"], data["mask"])
    expected["paper"].backward()
    # Each rank averages over its own queries; DDP's mean over ranks gives the global-batch loss.
    for key in ("paper", "code"):
        got = torch.stack([r[key] for r in ranks]).mean()
        torch.testing.assert_close(got, expected[key].detach(), rtol=1e-6, atol=1e-8)
    b = data["q"].shape[0] // WORLD
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["q_grad"] / WORLD, q.grad[r * b : (r + 1) * b])

    z = data["z"].clone().requires_grad_(True)
    sig = SIGReg(num_directions=16)(z, step=SIGREG_STEP)
    sig.backward()
    for r in range(WORLD):
        # Every rank holds the global statistic; its local gradient is WORLD x the global one so that
        # DDP's gradient averaging reproduces the global-batch gradient exactly.
        torch.testing.assert_close(ranks[r]["sigreg"], sig.detach())
        torch.testing.assert_close(ranks[r]["z_grad"] / WORLD, z.grad[r * b : (r + 1) * b])
    assert z.grad.abs().sum() > 0

    bank = LesionKeyBank(size=8, dim=6)
    bank.update(data["bank_keys"], data["bank_ids"])
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["bank"], bank.bank)
        assert ranks[r]["filled"].tolist() == bank.filled.tolist()
