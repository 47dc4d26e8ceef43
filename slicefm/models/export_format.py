"""The exported-encoder format: `encoder.safetensors` (the timm trunk's state dict) + `encoder.json` (how to
rebuild it). Written by the training stages, read by extraction and the model registry.

Low level on purpose (models + the artifact store only): `slicefm.train` writes it, `slicefm.edge.tracking` and
`slicefm.embed` read it, and none of them needs the other. Nothing here talks to MLflow: the stage that
owns the run logs the files (`ENCODER_FILES`) as artifacts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from slicefm.core.store import open_store
from slicefm.models.encoders import Encoder, create_encoder

logger = logging.getLogger(__name__)

EXPORT_VERSION = 1
WEIGHTS_KEY = "encoder.safetensors"
META_KEY = "encoder.json"
ENCODER_FILES = (WEIGHTS_KEY, META_KEY)


def export_encoder(encoder: Encoder, out_uri: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Write the trunk weights and `meta` (+ name, img_size, in_chans, embed_dim, format version) to out_uri,
    as `ENCODER_FILES`. Returns the full meta."""
    store = open_store(out_uri)
    weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in encoder.trunk.state_dict().items()}
    full = {
        "format_version": EXPORT_VERSION,
        "encoder": encoder.name,
        "img_size": encoder.img_size,
        "in_chans": encoder.in_chans,
        "embed_dim": encoder.embed_dim,
        **meta,
    }
    store.write_bytes(WEIGHTS_KEY, st_save(weights, metadata={"format_version": str(EXPORT_VERSION)}))
    store.write_json(META_KEY, full)
    logger.info("exported encoder %s (%d tensors) to %s", encoder.name, len(weights), store.uri(""))
    return full


def load_encoder(uri: str, map_location: str | torch.device = "cpu") -> tuple[Encoder, dict[str, Any]]:
    """Rebuild the exported encoder by name and load its weights (strict). Returns (encoder in eval mode, meta
    with `weights_sha256` added)."""
    store = open_store(uri)
    meta = json.loads(store.read_bytes(META_KEY))
    if meta.get("format_version") != EXPORT_VERSION:
        raise ValueError(
            f"{store.uri(META_KEY)}: export format {meta.get('format_version')}, expected {EXPORT_VERSION}"
        )
    overrides = dict(meta.get("config", {}).get("encoder", {}).get("overrides", {}))
    encoder = create_encoder(meta["encoder"], meta["img_size"], meta["in_chans"], **overrides)
    weights = store.read_bytes(WEIGHTS_KEY)
    encoder.trunk.load_state_dict(st_load(weights), strict=True)
    # Not stored in the file: the hash of the weights actually loaded (how a head finds its encoder's version).
    meta["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    return encoder.to(map_location).eval(), meta
