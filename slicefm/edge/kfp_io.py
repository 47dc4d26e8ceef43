"""Where a pipeline step writes: the KFP artifact directory, or the artifact store when one is set.

With `store_uri` empty the step writes into its KFP output artifact (kfp.local keeps it under the
pipeline root; a cluster uploads it to the KFP object store). With `store_uri` = s3://bucket/prefix the
step writes to <store_uri>/<run_name>/<stage>/ and the artifact records that URI in its metadata, so
the next step (and users) read the data from S3 directly. Cacheable steps (ingest, preprocess) take no
per-run input: they write to <store_uri>/cache/<stage>/<content hash> instead.
"""

from __future__ import annotations

from pathlib import Path

URI_KEY = "uri"


def output_location(artifact_path: str, store_uri: str, run_name: str, stage: str) -> str:
    if store_uri:
        return f"{store_uri.rstrip('/')}/{run_name}/{stage}"
    Path(artifact_path).mkdir(parents=True, exist_ok=True)
    return artifact_path


def cached_output_location(artifact_path: str, store_uri: str, stage: str, identity: dict) -> str:
    """Where a cacheable step writes: with a store, <store_uri>/cache/<stage>/<hash of what determines the
    output> (no run name: an unchanged step of a later run is a cache hit that points here); else its artifact."""
    import hashlib
    import json

    from slicefm import __version__

    key = {**identity, "slicefm_version": __version__}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return output_location(artifact_path, store_uri, "cache", f"{stage}/{digest}")


def input_location(artifact_path: str, metadata: dict | None) -> str:
    return str((metadata or {}).get(URI_KEY) or artifact_path)


class MissingGPUError(RuntimeError):
    """A step was given GPUs but torch sees fewer (no driver, no device plugin, a CPU-only torch)."""


def require_gpus(requested: int) -> None:
    """Fail at once when a step requested `requested` GPUs and torch sees fewer, instead of quietly
    training on the CPU for hours. 0 requests nothing."""
    if requested <= 0:
        return
    import torch

    visible = torch.cuda.device_count()
    if visible < requested:
        raise MissingGPUError(
            f"this step requested {requested} GPU(s) but torch sees {visible} (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}): check the node's NVIDIA driver and device plugin, "
            "or run it with 0 GPUs"
        )


def encoder_metadata(uri: str, method: str, encoder: str, steps: int, accelerator: str, gpus: int) -> dict:
    """What an encoder-producing step (pretrain, supervised ceiling) records on its Model artifact."""
    return {
        URI_KEY: uri,
        "method": method,
        "encoder": encoder,
        "steps": steps,
        "accelerator": accelerator,
        "gpus": gpus,
    }
