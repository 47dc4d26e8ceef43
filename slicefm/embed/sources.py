"""Where an extraction encoder comes from: the pretrain output, a timm backbone, or the MLflow registry (fetched
by the caller: the edge downloads `models:/` specs, so the science never imports MLflow)."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from slicefm.core.store import open_store
from slicefm.embed.config import ExtractConfig
from slicefm.models.encoders import Encoder, create_encoder
from slicefm.models.export_format import load_encoder

log = logging.getLogger(__name__)


@dataclass
class EncoderInfo:
    """What an embedding set was made with (stored in extract.json and every report)."""

    label: str  # short name for tables: "pretrained", "random", a timm name, a registry name
    source: str  # the encoder spec as configured (+ URI)
    name: str  # timm architecture
    input_channels: str  # "stacked" | "per_window"
    in_chans: int
    embed_dim: int
    img_size: int
    method: str | None = None  # pretraining method, None for timm/random
    seed: int | None = None  # random init seed
    overrides: dict | None = None  # timm.create_model overrides the architecture was built with
    # Pseudonymisation key fingerprint of the data it was pretrained on (None: not recorded, or no data).
    data_key_fingerprint: str | None = None
    # sha256 of the loaded weights file (exported encoders only): the registry finds the encoder's version by it.
    weights_sha256: str | None = None


def _random_encoder(name: str, img_size: int, in_chans: int, seed: int, overrides: dict) -> Encoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_encoder(name, img_size, in_chans, **overrides)


def _state_dict_from(uri: str) -> dict[str, torch.Tensor]:
    parent, _, key = uri.rstrip("/").rpartition("/")
    data = open_store(parent or ".").read_bytes(key)
    if uri.endswith(".safetensors"):
        from safetensors.torch import load

        return load(data)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def resolve_encoder(
    cfg: ExtractConfig,
    pretrained_uri: str | None,
    n_channels: int,
    slice_size: int,
    seed: int = 0,
    fetch_registered: Callable[[str], str] | None = None,
) -> tuple[Encoder, EncoderInfo]:
    """Build the configured encoder (eval mode, CPU) and describe it.

    `fetch_registered` turns a `models:/` spec into a local directory holding encoder.json (the edge passes
    `slicefm.edge.tracking.models.download_encoder`); without it such a spec is refused."""
    spec = cfg.encoder
    if spec.startswith(("random:", "timm:")):
        kind, name = spec.split(":", 1)
        per_window = cfg.input_channels != "stacked"
        in_chans = cfg.in_chans or (3 if per_window else n_channels)
        size = cfg.img_size or slice_size
        encoder = _random_encoder(name, size, in_chans, seed, {})
        if kind == "timm" and cfg.weights:
            missing, unexpected = encoder.trunk.load_state_dict(_state_dict_from(cfg.weights), strict=False)
            if unexpected or missing:
                log.warning(
                    "loading %s: %d missing, %d unexpected keys", cfg.weights, len(missing), len(unexpected)
                )
        label = name if kind == "timm" else f"random {name}"
        info = EncoderInfo(
            label, spec, name, "per_window" if per_window else "stacked", in_chans, encoder.embed_dim, size,
            seed=seed if kind == "random" or not cfg.weights else None,
        )  # fmt: skip
        return encoder.eval(), info
    if spec == "pretrained":
        if not pretrained_uri:
            raise ValueError("encoder 'pretrained' needs the pretrain stage's output URI")
        uri, label = pretrained_uri, "pretrained"
    elif spec.startswith("models:/"):
        if fetch_registered is None:
            raise ValueError(
                f"encoder {spec!r} is in the model registry: resolving it needs a fetch_registered"
            )
        uri, label = fetch_registered(spec), spec.removeprefix("models:/")
    else:
        uri, label = spec, Path(spec.rstrip("/")).name or spec
    encoder, meta = load_encoder(uri)
    label = str(meta.get("label") or label)  # an export may name its set ("supervised" for the ceiling)
    input_channels = meta.get("input_channels", "stacked")
    if cfg.input_channels not in ("auto", input_channels):
        raise ValueError(
            f"{uri}: the encoder was pretrained with input_channels={input_channels!r}; "
            f"extract.input_channels={cfg.input_channels!r} would feed it inputs it never saw"
        )
    overrides = dict(meta.get("config", {}).get("encoder", {}).get("overrides", {}))
    info = EncoderInfo(
        label, f"{spec} ({open_store(uri).uri('')})", meta["encoder"], input_channels, int(meta["in_chans"]),
        int(meta["embed_dim"]), int(meta["img_size"]), method=meta.get("method"), overrides=overrides,
        data_key_fingerprint=meta.get("data_key_fingerprint"), weights_sha256=meta.get("weights_sha256"),
    )  # fmt: skip
    return encoder, info


def random_twin(info: EncoderInfo, seed: int) -> tuple[Encoder, EncoderInfo]:
    """The same architecture and input layout as `info`, randomly initialised (the baseline of issue 4)."""
    encoder = _random_encoder(info.name, info.img_size, info.in_chans, seed, dict(info.overrides or {}))
    twin = EncoderInfo(
        "random", f"random:{info.name}", info.name, info.input_channels, info.in_chans, encoder.embed_dim,
        info.img_size, seed=seed, overrides=info.overrides,
    )  # fmt: skip
    return encoder.eval(), twin
