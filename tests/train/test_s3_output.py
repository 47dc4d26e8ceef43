"""Pretraining writes checkpoints and the encoder to s3:// and resumes from the S3 checkpoint."""

from __future__ import annotations

import torch

from slicefm.core.store import open_store
from slicefm.models.export_format import load_encoder
from slicefm.train.stage import run_pretrain
from tests.train.conftest import tiny_config


def test_checkpoint_and_encoder_on_s3_resume(preprocessed, s3_env):
    out = f"{s3_env}/pretrain"
    cfg = tiny_config("moco", steps=6, checkpoint={"every_steps": 2})
    first = run_pretrain(preprocessed, out, cfg, resume=False, stop_after=4)
    assert first.steps == 4
    store = open_store(out)
    assert any(k.startswith("checkpoints/") for k in store.list())
    done = run_pretrain(preprocessed, out, cfg, resume=True)
    assert done.steps == 6
    assert store.exists("encoder.safetensors") and store.exists("encoder.json")
    encoder, meta = load_encoder(out)
    assert meta["method"] == "moco"
    with torch.no_grad():
        emb = encoder(torch.rand(2, 2, 32, 32))
    assert emb.shape == (2, encoder.embed_dim) and torch.isfinite(emb).all()
