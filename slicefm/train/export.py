"""Exported encoder: `encoder.safetensors` + `encoder.json`. The format lives in `slicefm.models.export_format`
(so the registry and extraction read it without importing the training package); this module keeps the
training-side names for its callers."""

from __future__ import annotations

from slicefm.models.export_format import (
    ENCODER_FILES,
    EXPORT_VERSION,
    META_KEY,
    WEIGHTS_KEY,
    export_encoder,
    load_encoder,
)

__all__ = ["ENCODER_FILES", "EXPORT_VERSION", "META_KEY", "WEIGHTS_KEY", "export_encoder", "load_encoder"]
