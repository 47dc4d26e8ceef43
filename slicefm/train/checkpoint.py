"""Training checkpoints on the artifact store: one torch.save buffer, written atomically, versioned.

A checkpoint holds everything an exact resume needs: model (query + momentum branches), LECL key
bank, optimizer, global step and data position (epoch, step in epoch), loss history, collapse
monitor, and the RNG states of torch / numpy / python (view RNGs are derived from (seed, rank, step),
so they need no state of their own).
"""

from __future__ import annotations

import io
import logging
import random
from typing import Any

import numpy as np
import torch

from slicefm.core.store import Store

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
LATEST_KEY = "checkpoints/latest.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed (format version or run identity differs)."""


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(store: Store, state: dict[str, Any], keep_history: bool = False) -> str:
    """Write `state` (stamped with the format version) to checkpoints/latest.pt; returns its URI."""
    buf = io.BytesIO()
    torch.save({"format_version": CHECKPOINT_VERSION, **state}, buf)
    data = buf.getvalue()
    if keep_history:
        store.write_bytes(f"checkpoints/step-{int(state['step']):08d}.pt", data)
    store.write_bytes(LATEST_KEY, data)
    logger.info(
        "checkpoint at step %d -> %s (%.1f MB)", state["step"], store.uri(LATEST_KEY), len(data) / 1e6
    )
    return store.uri(LATEST_KEY)


def load_checkpoint(store: Store, identity: dict[str, Any], key: str = LATEST_KEY) -> dict[str, Any] | None:
    """The checkpoint at `key` (None if absent). Refuses other format versions and runs whose
    `identity` (method, encoder, ...) differs from the one stored."""
    if not store.exists(key):
        return None
    state = torch.load(io.BytesIO(store.read_bytes(key)), map_location="cpu", weights_only=False)
    version = state.get("format_version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{store.uri(key)}: checkpoint format {version}, this code reads {CHECKPOINT_VERSION}"
        )
    if state.get("identity") != identity:
        raise CheckpointError(
            f"{store.uri(key)} belongs to another run: {state.get('identity')} != {identity}; "
            "use a fresh output location or resume=False"
        )
    return state
