"""Segmentation masks shipped beside a dataset: <root>/masks/<ref>.npz (organ, lesion, finding; canonical)."""

from __future__ import annotations

from pathlib import Path


def mask_for(root: Path, ref: str | None) -> Path | None:
    if not ref:
        return None
    path = Path(root) / "masks" / f"{ref}.npz"
    return path if path.exists() else None
