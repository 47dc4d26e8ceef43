"""DALE-CT probe poolings over a slice sequence (no projections) and the linear probe built on them."""

from __future__ import annotations

import math

import torch
from torch import nn

POOLINGS = ("mean", "max", "learned_query", "avg_query", "multi_query")


def masked_sdpa(query: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Plain scaled dot-product attention, keys = values = tokens (the DALE-CT code has no projections).

    query [B, Q, d], tokens [B, N, d], mask [B, N] -> out [B, Q, d] with
    out_q = sum_k softmax_k(q . t_k / sqrt(d)) t_k, padded tokens excluded.
    """
    scores = torch.einsum("bqd,bnd->bqn", query, tokens) / math.sqrt(tokens.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.einsum("bqn,bnd->bqd", torch.softmax(scores, dim=-1), tokens)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return tokens.mean(dim=1)
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class MeanPool(nn.Module):
    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return masked_mean(tokens, mask)


class MaxPool(nn.Module):
    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            tokens = tokens.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        return tokens.max(dim=1).values


class LearnedQueryPool(nn.Module):
    """`n_queries` learned queries attend over the slices; their outputs are averaged (DALE-CT uses 1 or 4)."""

    def __init__(self, d: int, n_queries: int = 1) -> None:
        super().__init__()
        # Small init keeps the initial attention near uniform (a mean pool) so high probe LRs stay stable.
        self.queries = nn.Parameter(torch.randn(n_queries, d) * 0.02)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return masked_sdpa(q, tokens, mask).mean(dim=1)


class AvgQueryPool(nn.Module):
    """The query is the mean of the tokens themselves: parameter-free attention pooling."""

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q = masked_mean(tokens, mask).unsqueeze(1)
        return masked_sdpa(q, tokens, mask).squeeze(1)


def make_pooling(name: str, d: int, n_queries: int = 4) -> nn.Module:
    """One of POOLINGS by name."""
    if name == "mean":
        return MeanPool()
    if name == "max":
        return MaxPool()
    if name == "learned_query":
        return LearnedQueryPool(d, 1)
    if name == "avg_query":
        return AvgQueryPool()
    if name == "multi_query":
        return LearnedQueryPool(d, n_queries)
    raise ValueError(f"unknown pooling {name!r}; choose from {POOLINGS}")


class LinearProbe(nn.Module):
    """Pooling over slices, then one Linear to the classes; same call signature as ABMIL (attention None)."""

    def __init__(self, d: int, n_classes: int, pooling: str = "mean", n_queries: int = 4) -> None:
        super().__init__()
        self.pooling_name = pooling
        self.pool = make_pooling(pooling, d, n_queries)
        self.linear = nn.Linear(d, n_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        return self.linear(self.pool(x, mask)), None
