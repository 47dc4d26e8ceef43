"""CLEAR attention-based MIL head (Ilse et al. 2018 attention, CLEAR's layer sizes), batched with a mask
or packed (the bags' real instances concatenated, no padding)."""

from __future__ import annotations

import torch
from torch import nn


class ABMIL(nn.Module):
    """Linear(d,256)+ReLU -> a_k = softmax_k(w^T tanh(V h_k)) -> z = sum a_k h_k -> LayerNorm -> MLP.

    The MLP is Linear(256,256) -> Dropout(0.5) -> SiLU -> Linear(256, n_classes), as in the CLEAR code.
    Unlike that code, padded instances get -inf before the softmax, so attention sums to 1 over real slices
    and a bag's output does not depend on how much padding its batch carries.
    """

    def __init__(self, d: int, n_classes: int, hidden: int = 256, dropout: float = 0.5) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(d, hidden), nn.ReLU())
        self.attn_v = nn.Linear(hidden, hidden)
        self.attn_w = nn.Linear(hidden, 1)
        self.norm = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, hidden), nn.Dropout(dropout), nn.SiLU(), nn.Linear(hidden, n_classes)
        )

    def attention(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention weights [B, N] over instances from embedded instances h [B, N, hidden]."""
        scores = self.attn_w(torch.tanh(self.attn_v(h))).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, N, d], mask [B, N] (True = real slice) -> (logits [B, C], attention [B, N])."""
        h = self.embed(x)
        a = self.attention(h, mask)
        z = torch.einsum("bn,bnh->bh", a, h)
        return self.mlp(self.norm(z)), a

    def forward_packed(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [sum n_i, d] (bags concatenated), lengths [B] -> (logits [B, C], attention [B, max n_i]).

        Same function as `forward` on the padded batch, but every per-instance layer (embedding, attention
        MLP) runs on real instances only: with ~300-slice bags those layers are nearly all of the FLOPs, so
        padding would be paid for in full. Only the [B, N] scores are padded (with -inf) for the softmax.
        """
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        n_bags, n_max = lengths.numel(), int(lengths.max())
        mask = torch.arange(n_max)[None, :] < lengths[:, None]
        h = self.embed(x)
        s = self.attn_w(torch.tanh(self.attn_v(h))).squeeze(-1)
        a = torch.softmax(s.new_full((n_bags, n_max), float("-inf")).masked_scatter(mask, s), dim=1)
        bag = torch.repeat_interleave(torch.arange(n_bags), lengths)
        z = h.new_zeros((n_bags, h.shape[1])).index_add(0, bag, a[mask].unsqueeze(1) * h)
        return self.mlp(self.norm(z)), a
