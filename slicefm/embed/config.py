"""Typed configuration of embedding extraction (which encoder, how slices become encoder inputs)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from slicefm.core.config import Strict


class ExtractConfig(Strict):
    """Frozen encoder over every slice of every scan.

    `encoder` names where the weights come from:
    - "pretrained": the pipeline's pretrain output (the encoder URI given to the stage);
    - "random:<timm name>": that architecture with random weights (the same-architecture baseline);
    - "timm:<timm name>": any timm backbone, weights from `weights` (a local path or s3:// URI of a
      safetensors / torch state dict; never downloaded from a hub), random when `weights` is unset;
    - "models:/<name>@<alias>" or "models:/<name>/<version>": an encoder from the MLflow registry;
    - any other string: a directory or s3:// URI holding encoder.safetensors + encoder.json.
    """

    encoder: str = "pretrained"
    weights: str | None = None  # timm:<name> only
    img_size: int | None = Field(None, ge=16)  # timm/random only; default: the preprocessed slice size
    # "auto": what the encoder was pretrained with (encoder.json), per_window for plain timm backbones.
    input_channels: Literal["auto", "stacked", "per_window"] = "auto"
    in_chans: int | None = Field(None, ge=1)  # timm only; default 3 per window (grey replicated), C stacked
    batch_size: int = Field(256, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    patch_tokens: bool = False  # also store patch tokens [n_slices, n_patches, d] (large)
    workers: int = Field(2, ge=0)  # data-loading processes (prefetch overlaps reading with compute)
    chunk_slices: int = Field(64, ge=1)  # slices per read request (one byte-range GET on S3)
    n_shards: int = Field(1, ge=1)  # the pipeline fans extraction out over this many tasks
    # Also extract a randomly initialised copy of the pretrained architecture, evaluated side by side.
    random_baseline: bool = True

    @field_validator("encoder")
    @classmethod
    def _known_prefix(cls, v: str) -> str:
        for prefix in ("random:", "timm:"):
            if v.startswith(prefix) and not v[len(prefix) :]:
                raise ValueError(f"encoder {v!r} needs a timm model name after {prefix!r}")
        return v
