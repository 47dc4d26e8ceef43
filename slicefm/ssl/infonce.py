"""InfoNCE of MoCo-v3 with the LECL lesion term (CLEAR Eq. 1 and 4), and the lesion key bank.

Paper (default, `lesion_term="paper"`), for query q, its key k+ and batch keys k_i (all ranks):

    L_q = -log( psi(q, k+) / (sum_i psi(q, k_i) + lambda * sum_j psi(q, l_j)) ),  psi = exp(cos / T)

with l_j the momentum encodings of the training set's key slices (`LesionKeyBank`). The CLEAR code
(`lesion_term="code"`) instead puts lambda inside the exponent, exp(lambda * cos(q, l_j) / T), and
takes the lesion keys from the current batch (the keys of lesion slices, the query's own positive
excluded); pass `lesion_mask` for that. With lambda = 0 both variants reduce to plain InfoNCE (the
code skips its lesion term when lambda = 0).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def dist_ready() -> bool:
    """True inside an initialised torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Upcast bf16/fp16 to float32 (float64 stays): softmax over cosine / T needs the precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def autocast_off(t: torch.Tensor) -> torch.autocast:
    """Context that disables autocast on `t`'s device: under bf16 autocast a matmul would downcast
    the float32 operands we prepared, and loss statistics need full precision."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def concat_all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` [B, ...] from all ranks along dim 0 (rank order); identity without distributed.

    Every rank must pass the same B. Other ranks' parts carry no gradient; this rank's part keeps its
    own, so a differentiable `t` still receives gradients from the local loss.
    """
    if not dist_ready() or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    parts[dist.get_rank()] = t
    return torch.cat(parts, dim=0)


class InfoNCELoss(nn.Module):
    """MoCo-v3 contrastive loss for one direction, optionally with the LECL lesion term.

    forward(q [B, D], k [B, D], lesion_keys [L, D] | None, lesion_mask [B] bool | None) -> scalar.
    Keys are gathered across ranks (no queue); the positive of local query i is global key
    rank * B + i. With `scale_by_2t` the loss is multiplied by 2T as in the official code.
    """

    def __init__(
        self,
        temperature: float = 0.2,
        lesion_lambda: float = 0.0,
        scale_by_2t: bool = True,
        lesion_term: Literal["paper", "code"] = "paper",
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if lesion_lambda < 0:
            raise ValueError(f"lesion_lambda must be >= 0, got {lesion_lambda}")
        if lesion_term not in ("paper", "code"):
            raise ValueError(f"lesion_term must be 'paper' or 'code', got {lesion_term!r}")
        self.lesion_term = lesion_term
        self.scale_by_2t = scale_by_2t
        # Python floats, not buffers: exact in float64 tests and no GPU sync when branching on lambda.
        self.temperature = float(temperature)
        self.lesion_lambda = float(lesion_lambda)

    def _lesion_logits(self, q: torch.Tensor, lesion_keys: torch.Tensor) -> torch.Tensor:
        lam = self.lesion_lambda
        sim = q @ F.normalize(lesion_keys.to(q.dtype), dim=1).T
        if self.lesion_term == "paper":
            # lambda * sum_j exp(s_j / T) == sum_j exp(s_j / T + log lambda): stays inside one logsumexp.
            return sim / self.temperature + math.log(lam)
        return lam * sim / self.temperature

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        lesion_keys: torch.Tensor | None = None,
        lesion_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        with autocast_off(q):
            return self._forward(q, k, lesion_keys, lesion_mask)

    def _forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        lesion_keys: torch.Tensor | None,
        lesion_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        # At least float32: bf16 cosine / 0.2 loses the small differences the softmax amplifies.
        q = F.normalize(at_least_fp32(q), dim=1)
        k_all = F.normalize(concat_all_gather(at_least_fp32(k)).to(q.dtype), dim=1)
        logits = q @ k_all.T / self.temperature  # [B, B * world]
        n = q.shape[0]
        offset = n * (dist.get_rank() if dist_ready() else 0)
        idx = torch.arange(n, device=q.device)
        positive = logits[idx, idx + offset]
        denominators = [logits]
        # lambda = 0: paper, log(0) = -inf, the term vanishes exactly; code, CLEAR skips the term.
        if lesion_keys is not None and lesion_keys.shape[0] > 0 and self.lesion_lambda > 0:
            denominators.append(self._lesion_logits(q, lesion_keys.to(device=q.device)))
        if lesion_mask is not None and self.lesion_lambda > 0:
            denominators.append(self._in_batch_lesion_logits(logits, lesion_mask, offset))
        loss = (torch.logsumexp(torch.cat(denominators, dim=1), dim=1) - positive).mean()
        if self.scale_by_2t:
            loss = loss * (2.0 * self.temperature)
        return loss

    def _in_batch_lesion_logits(
        self, logits: torch.Tensor, lesion_mask: torch.Tensor, offset: int
    ) -> torch.Tensor:
        """CLEAR-code lesion term from the batch: keys of lesion slices (all ranks), own positive removed."""
        mask_all = concat_all_gather(lesion_mask.to(device=logits.device, dtype=torch.uint8)).bool()
        lam = self.lesion_lambda
        # The code reuses the batch logits, so "paper" scaling means adding log(lambda), "code" multiplying.
        if self.lesion_term == "paper":
            scaled = logits + math.log(lam)
        else:
            scaled = lam * logits
        n = logits.shape[0]
        idx = torch.arange(n, device=logits.device)
        own = torch.zeros_like(logits, dtype=torch.bool)
        own[idx, idx + offset] = True
        keep = mask_all[None, :].expand_as(logits) & ~own
        return scaled.masked_fill(~keep, float("-inf"))

    def symmetric(
        self,
        q1: torch.Tensor,
        q2: torch.Tensor,
        k1: torch.Tensor,
        k2: torch.Tensor,
        lesion_keys: torch.Tensor | None = None,
        lesion_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """moco-v3's symmetrised loss: loss(q1, k2) + loss(q2, k1)."""
        return self(q1, k2, lesion_keys, lesion_mask) + self(q2, k1, lesion_keys, lesion_mask)


class LesionKeyBank(nn.Module):
    """Momentum-encoder embeddings l_j of the training set's key slices (the LECL xi term).

    `size` is the number of annotated key slices; `update(keys, indices)` overwrites the rows of those
    key-slice ids so every key slice keeps its latest encoding. Without `indices` the bank is a FIFO
    ring buffer. Inside torch.distributed the update is gathered across ranks so all ranks agree.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"size and dim must be >= 1, got {size}, {dim}")
        self.register_buffer("bank", torch.zeros(size, dim))
        self.register_buffer("filled", torch.zeros(size, dtype=torch.bool))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return int(self.bank.shape[0])

    @torch.no_grad()
    def update(self, keys: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        """Store `keys` [n, D] at key-slice ids `indices` [n] (FIFO when None).

        Collective under torch.distributed: every rank must call it (n may differ, also 0).
        """
        keys = keys.detach().to(self.bank)
        if indices is not None:
            indices = indices.to(device=self.bank.device, dtype=torch.long)
        if dist_ready() and dist.get_world_size() > 1:
            keys = _gather_variable(keys)
            indices = None if indices is None else _gather_variable(indices)
        if indices is None:
            # FIFO slots are assigned after the gather so ranks never claim the same slot.
            keys = keys[-self.size :]
            indices = (self.ptr + torch.arange(keys.shape[0], device=self.bank.device)) % self.size
            self.ptr.copy_((self.ptr + keys.shape[0]) % self.size)
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.size):
            raise IndexError(
                f"key-slice ids must lie in [0, {self.size}), got {indices.min()}..{indices.max()}"
            )
        self.bank[indices] = F.normalize(keys, dim=1)
        self.filled[indices] = True

    def keys(self) -> torch.Tensor:
        """The filled rows [L, D] (L2-normalised)."""
        return self.bank[self.filled]


def _gather_variable(t: torch.Tensor) -> torch.Tensor:
    """all_gather for tensors whose first dim differs between ranks (pad to the max, then trim)."""
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    n_max = int(max(int(s) for s in sizes))
    padded = torch.zeros((n_max, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes, strict=True)], dim=0)
