"""Embedding extraction on a real preprocess output: equals the bare encoder, resumes, shards, S3, sources."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from slicefm.embed.config import ExtractConfig
from slicefm.embed.extract import encoder_inputs, merge_extracts, run_extract
from slicefm.embed.reader import EmbeddingSet
from slicefm.embed.sources import random_twin, resolve_encoder
from slicefm.models.encoders import create_encoder
from slicefm.models.export_format import export_encoder

SIZE = 32


def _direct(encoder, stack: np.ndarray, input_channels: str, in_chans: int) -> list[np.ndarray]:
    """The reference: the encoder on the whole stack at once, in memory, one window at a time."""
    with torch.no_grad():
        return [encoder(x).numpy() for x in encoder_inputs(torch.from_numpy(stack), input_channels, in_chans)]


def _random(cfg: ExtractConfig, seed: int = 0):
    return resolve_encoder(cfg, None, n_channels=2, slice_size=SIZE, seed=seed)


def test_embeddings_equal_the_bare_encoder_per_window(preprocessed, tmp_path):
    # Odd batch and chunk sizes: batches straddle scans and windows, so the FIFO bookkeeping is exercised.
    cfg = ExtractConfig(encoder="random:vit_tiny_test", batch_size=7, chunk_slices=5, workers=0)
    encoder, info = _random(cfg)
    assert info.input_channels == "per_window" and info.in_chans == 3
    res = run_extract(preprocessed, str(tmp_path / "emb"), encoder, info, cfg)
    es = EmbeddingSet(res.out_uri)
    assert es.windows == ["abdomen", "lung"] and res.n_skipped == 0
    slices = pd.read_parquet(f"{preprocessed}/slices.parquet")
    assert res.n_slices == len(slices)
    for sid, rows in slices.groupby("scan_id"):
        stack = np.load(f"{preprocessed}/{rows['stack'].iloc[0]}")
        want = _direct(encoder, stack, "per_window", 3)
        for w, window in enumerate(es.windows):
            got = es.matrix(sid, window)
            assert got.dtype == np.float16 and got.shape == (len(rows), info.embed_dim)
            np.testing.assert_allclose(got.astype(np.float32), want[w], rtol=2e-3, atol=2e-3)
    # The two windows are different images, so their embeddings differ.
    assert not np.allclose(es.matrix(sid, "abdomen"), es.matrix(sid, "lung"))
    # A task takes any of the windows, alone or together.
    assert es.resolve_windows(None) == es.resolve_windows(["abdomen", "lung"]) == ["abdomen", "lung"]
    assert es.resolve_windows(["lung"]) == ["lung"]
    assert es.bags([sid], es.resolve_windows(["lung"]))[0].x.shape == (len(rows), info.embed_dim)


def test_stacked_input_and_patch_tokens(preprocessed, tmp_path):
    cfg = ExtractConfig(
        encoder="random:vit_tiny_test", input_channels="stacked", patch_tokens=True, batch_size=16, workers=1
    )
    encoder, info = _random(cfg)
    assert info.in_chans == 2
    res = run_extract(preprocessed, str(tmp_path / "emb"), encoder, info, cfg)
    es = EmbeddingSet(res.out_uri)
    assert es.windows == ["all"]
    # Every channel is in each embedding: a task asking for all windows gets them, one asking for fewer is
    # refused (no embedding holds the abdomen window alone), naming the task's windows and the set's layout.
    for windows in (None, ["all"], ["abdomen", "lung"], ["lung", "abdomen"]):
        assert es.resolve_windows(windows) == ["all"]
    refused = r"asks for windows \[.*\], but .* stacked .*channels \['abdomen', 'lung'\]"
    for windows in (["abdomen"], ["lung"], ["all", "lung"]):
        with pytest.raises(ValueError, match=refused):
            es.resolve_windows(windows)
    entry = es.index.reset_index().iloc[0]
    patches = np.load(tmp_path / "emb" / entry["patches_key"])
    n = entry["n_slices"]
    assert patches.shape == (n, (SIZE // 16) ** 2, info.embed_dim) and patches.dtype == np.float16
    stack = np.load(
        f"{preprocessed}/{pd.read_parquet(f'{preprocessed}/slices.parquet').query('scan_id == @entry.scan_id')['stack'].iloc[0]}"
    )
    with torch.no_grad():
        _, want = encoder.forward_tokens(encoder_inputs(torch.from_numpy(stack), "stacked", 2)[0])
    np.testing.assert_allclose(patches.astype(np.float32), want.numpy(), rtol=2e-3, atol=2e-3)


def test_rerun_skips_finished_scans_and_redoes_missing_ones(preprocessed, tmp_path):
    cfg = ExtractConfig(encoder="random:vit_tiny_test", batch_size=32, workers=0)
    encoder, info = _random(cfg)
    out = tmp_path / "emb"
    first = run_extract(preprocessed, str(out), encoder, info, cfg)
    files = sorted((out / "embeddings").rglob("*.npy"))
    before = {p: p.read_bytes() for p in files}
    files[0].unlink()  # as if the run had been killed before writing this scan
    second = run_extract(preprocessed, str(out), encoder, info, cfg)
    assert second.n_skipped == first.n_scans - 1
    assert 0 < second.n_slices < first.n_slices
    assert {p: p.read_bytes() for p in files} == before
    assert not list(out.rglob("*.tmp*"))


def test_a_rerun_with_another_encoder_reembeds_every_scan(preprocessed, tmp_path):
    """Embeddings of another encoder (here: other random weights) are never kept as finished scans."""
    cfg = ExtractConfig(encoder="random:vit_tiny_test", batch_size=32, workers=0)
    out = tmp_path / "emb"
    first = run_extract(preprocessed, str(out), *_random(cfg), cfg)
    before = {p: p.read_bytes() for p in (out / "embeddings").rglob("*.npy")}
    other_encoder, other_info = _random(cfg, seed=1)
    second = run_extract(preprocessed, str(out), other_encoder, other_info, cfg)
    assert second.n_skipped == 0 and second.n_slices == first.n_slices
    after = {p: p.read_bytes() for p in (out / "embeddings").rglob("*.npy")}
    assert after.keys() == before.keys() and all(after[p] != before[p] for p in before)


def test_shards_cover_every_scan_once_and_merge(preprocessed, tmp_path):
    cfg = ExtractConfig(encoder="random:vit_tiny_test", batch_size=32, workers=0)
    encoder, info = _random(cfg)
    whole = EmbeddingSet(run_extract(preprocessed, str(tmp_path / "whole"), encoder, info, cfg).out_uri)
    parts = [
        run_extract(
            preprocessed, str(tmp_path / f"part{k}"), encoder, info, cfg, shard_index=k, n_shards=3
        ).out_uri
        for k in range(3)
    ]
    merged = EmbeddingSet(merge_extracts(parts, str(tmp_path / "merged")))
    scans = sorted(whole.index.index.get_level_values(0).unique())
    assert sorted(merged.index.index.get_level_values(0).unique()) == scans
    for a, b in zip(whole.bags(scans), merged.bags(scans), strict=True):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.window_index, b.window_index)
    with pytest.raises(ValueError, match="more than one part"):
        merge_extracts([parts[0], parts[0]], str(tmp_path / "dup"))
    with pytest.raises(ValueError, match="shard_index"):
        run_extract(preprocessed, str(tmp_path / "bad"), encoder, info, cfg, shard_index=3, n_shards=3)


def test_sources_pretrained_export_timm_weights_and_random_twin(tmp_path):
    enc = create_encoder("vit_tiny_test", SIZE, 1)
    export_encoder(enc, str(tmp_path / "enc"), {"method": "lejepa", "input_channels": "per_window"})
    loaded, info = resolve_encoder(ExtractConfig(), str(tmp_path / "enc"), n_channels=2, slice_size=SIZE)
    assert (info.label, info.input_channels, info.in_chans, info.method) == (
        "pretrained",
        "per_window",
        1,
        "lejepa",
    )
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), enc.eval()(x))
        twin, tinfo = random_twin(info, seed=0)
        assert tinfo.label == "random" and tinfo.in_chans == 1
        assert not torch.allclose(twin(x), enc(x))  # same architecture, different (random) weights
        again, _ = random_twin(info, seed=0)
        assert torch.equal(twin(x), again(x))  # the baseline is reproducible
    # A pretrained encoder refuses inputs it never saw.
    with pytest.raises(ValueError, match="input_channels"):
        resolve_encoder(ExtractConfig(input_channels="stacked"), str(tmp_path / "enc"), 2, SIZE)
    # timm:<name> with a local state dict: the weights are the ones in the file.
    save_file(enc.trunk.state_dict(), str(tmp_path / "w.safetensors"))
    cfg = ExtractConfig(encoder="timm:vit_tiny_test", weights=str(tmp_path / "w.safetensors"), in_chans=1)
    timm_enc, tinfo = resolve_encoder(cfg, None, 2, SIZE)
    with torch.no_grad():
        assert torch.equal(timm_enc(x), enc(x))
    assert tinfo.label == "vit_tiny_test"
    with pytest.raises(ValueError, match="pretrain stage"):
        resolve_encoder(ExtractConfig(), None, 2, SIZE)
    # A registry spec is fetched by the caller (the edge's MLflow download), never by the library itself.
    fetched = []
    reg, rinfo = resolve_encoder(
        ExtractConfig(encoder="models:/enc@champion"), None, 2, SIZE,
        fetch_registered=lambda spec: fetched.append(spec) or str(tmp_path / "enc"),
    )  # fmt: skip
    assert fetched == ["models:/enc@champion"] and rinfo.label == "enc@champion"
    with torch.no_grad():
        assert torch.equal(reg(x), enc(x))
    with pytest.raises(ValueError, match="model registry"):
        resolve_encoder(ExtractConfig(encoder="models:/enc@champion"), None, 2, SIZE)


def test_extract_to_and_from_s3(preprocessed, s3_env):
    cfg = ExtractConfig(encoder="random:vit_tiny_test", batch_size=64, workers=0)
    encoder, info = _random(cfg)
    res = run_extract(preprocessed, f"{s3_env}/emb", encoder, info, cfg)
    es = EmbeddingSet(res.out_uri)
    sid = es.index.index.get_level_values(0)[0]
    bag = es.bags([sid])[0]
    assert bag.x.shape[1] == info.embed_dim and set(bag.window_index.tolist()) == {0, 1}
    assert len(bag.z_mm) == bag.x.shape[0] and np.all(np.diff(bag.z_mm[bag.window_index == 0]) > 0)
