"""Tiny pretraining configs (the shared `preprocessed` fixture lives in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from slicefm.train.config import PretrainConfig


def tiny_config(
    method: str, name: str = "vit_tiny_test", steps: int = 12, **overrides: Any
) -> PretrainConfig:
    """A CPU-sized config: 32 px, small heads, batch 8, no loader workers."""
    data: dict[str, Any] = {
        "method": method,
        "encoder": {"name": name, "img_size": 32},
        "optimizer": {"lr": 1e-3, "lr_scaling": "none", "weight_decay": 0.0},
        "schedule": {"max_steps": steps, "warmup_steps": 2},
        "moco": {"proj_dim": 32, "mlp_dim": 64},
        "lecl": {"lesion_lambda": 1.0, "bank_refresh_per_step": 2},
        "lejepa": {
            "local_size": 16, "n_local": 2, "proj_dim": 32, "proj_hidden": 64, "num_directions": 32,
            "reference_batch": 512,
        },  # fmt: skip
        "loader": {"batch_size": 8, "workers": 0},
        # warn: runs of a few dozen steps are still leaving the projector's initial scale (SIGReg near its
        # collapse value); collapse itself is tested by the SSL known-answer test and the monitor's own test.
        "logging": {"every_steps": 5, "collapse_every": 5, "collapse_batch": 16, "collapse_action": "warn"},
        "checkpoint": {"every_steps": 5},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return PretrainConfig.model_validate(data)


@pytest.fixture
def out_dir(tmp_path: Path) -> str:
    return str(tmp_path / "out")
