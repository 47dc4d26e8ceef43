"""shard_indices, extract and merge_embeddings: frozen-encoder embeddings of every slice, fanned out over shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from kfp import dsl

from components.extract import extract, merge_embeddings, shard_indices
from slicefm.embed.reader import EmbeddingSet
from slicefm.models.export_format import load_encoder
from slicefm.train.stage import run_pretrain
from tests.components.conftest import component_config, dataset, stage_runs
from tests.train.conftest import tiny_config


@pytest.fixture(scope="module")
def encoder_dir(preprocessed: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A pretrain output (2 MoCo steps, one image per HU window) of the shared preprocessed slices."""
    out = tmp_path_factory.mktemp("encoder") / "encoder"
    run_pretrain(
        preprocessed, str(out), tiny_config("moco", steps=2, input_channels="per_window"), resume=False
    )
    return str(out)


def _encoder_input(uri: str) -> dsl.Model:
    return dsl.Model(name="encoder", uri=uri, metadata={"uri": uri})


def _expected(encoder_dir: str, preprocessed: str, scan_id: str, window: int) -> np.ndarray:
    """The encoder applied to one window of one scan's slices, as extract feeds it (uint8 / 255)."""
    model, _ = load_encoder(encoder_dir)
    slices = pd.read_parquet(Path(preprocessed) / "slices.parquet")
    stack = np.load(Path(preprocessed) / slices.loc[slices["scan_id"] == scan_id, "stack"].iloc[0])
    with torch.no_grad():
        return model(torch.from_numpy(stack[:, window : window + 1]).float() / 255.0).numpy()


def test_shard_indices_lists_every_shard():
    assert shard_indices.python_func(n_shards=3) == [0, 1, 2]
    assert shard_indices.python_func(n_shards=1) == [0]
    with pytest.raises(ValueError, match="n_shards"):
        shard_indices.python_func(n_shards=0)


def test_extract_shards_embed_every_scan_once_and_merge_into_one_set(
    preprocessed, encoder_dir, tmp_path, tracking_uri, parent_run
):
    config_yaml = component_config(tmp_path, "extract-test")  # workers 0, batch 64
    slices = dataset(tmp_path, "slices", uri=preprocessed)
    parts, counts = [], []
    for shard in range(2):
        part = dataset(tmp_path, f"part-{shard}")
        counts.append(
            extract.python_func(
                config_yaml=config_yaml,
                tracking_uri=tracking_uri,
                parent_run_id=parent_run,
                store_uri="",
                run_name="r",
                cohort="a",
                shard_index=shard,
                n_shards=2,
                random_baseline=False,
                slices=slices,
                encoder=_encoder_input(encoder_dir),
                embeddings=part,
            )  # fmt: skip
        )
        assert part.metadata == {
            "uri": part.path, "label": "pretrained", "n_slices": counts[-1], "accelerator": "", "gpus": 0
        }  # fmt: skip
        parts.append(part)
    all_slices = pd.read_parquet(Path(preprocessed) / "slices.parquet")
    n_by_scan = all_slices.groupby("scan_id").size().to_dict()
    indexes = [pd.read_parquet(Path(p.path) / "embeddings.parquet") for p in parts]
    scans = [set(ix["scan_id"]) for ix in indexes]
    assert scans[0] and scans[1] and not scans[0] & scans[1] and scans[0] | scans[1] == set(n_by_scan)
    assert counts == [sum(n_by_scan[s] for s in part_scans) for part_scans in scans]
    for part, index in zip(parts, indexes, strict=True):
        assert set(index["window"]) == {"abdomen", "lung"}
        for row in index.itertuples():
            matrix = np.load(Path(part.path) / row.key)
            assert matrix.shape == (n_by_scan[row.scan_id], 64) and matrix.dtype == np.float16
    # The matrices are the pretrained encoder's embeddings of the slices (not some other weights).
    scan = sorted(scans[1])[0]
    got = np.load(Path(parts[1].path) / "embeddings" / "lung" / f"{scan}.npy").astype(np.float32)
    np.testing.assert_allclose(got, _expected(encoder_dir, preprocessed, scan, 1), rtol=1e-2, atol=1e-2)
    runs = stage_runs(tracking_uri, parent_run)
    assert set(runs) == {"extract-0", "extract-1"}
    assert [runs[f"extract-{i}"].data.params["shard"] for i in range(2)] == ["0/2", "1/2"]
    assert [runs[f"extract-{i}"].data.metrics["n_slices"] for i in range(2)] == counts

    merged = dataset(tmp_path, "merged")
    label = merge_embeddings.python_func(
        store_uri="", run_name="r", name="extract-a-pretrained", parts=parts, embeddings=merged
    )
    assert label == "pretrained" and merged.metadata == {"uri": merged.path, "label": "pretrained"}
    assert json.loads((Path(merged.path) / "extract.json").read_text())["shards"] == [0, 1]
    combined = EmbeddingSet(merged.path)
    assert set(combined.scans["scan_id"]) == set(n_by_scan)
    for part, index in zip(parts, indexes, strict=True):  # each matrix read from the shard that wrote it
        for row in index.itertuples():
            np.testing.assert_array_equal(
                combined.matrix(row.scan_id, row.window), np.load(Path(part.path) / row.key)
            )


def test_random_baseline_embeds_with_the_same_architecture_untrained(preprocessed, encoder_dir, tmp_path):
    config_yaml = component_config(tmp_path, "extract-test")
    store = tmp_path / "store"
    random = dataset(tmp_path, "random")
    n = extract.python_func(
        config_yaml=config_yaml, tracking_uri="", parent_run_id="", store_uri=str(store), run_name="r",
        cohort="b", shard_index=0, n_shards=1, random_baseline=True,
        slices=dataset(tmp_path, "slices", uri=preprocessed), encoder=_encoder_input(encoder_dir),
        embeddings=random, accelerator="a100", gpus=0,
    )  # fmt: skip
    out = store / "r" / "extract-b-random" / "shard-0"
    assert random.metadata == {
        "uri": str(out),
        "label": "random",
        "n_slices": n,
        "accelerator": "a100",
        "gpus": 0,
    }
    assert n == len(pd.read_parquet(Path(preprocessed) / "slices.parquet"))
    info = json.loads((out / "extract.json").read_text())["encoder"]
    assert (info["label"], info["name"], info["embed_dim"]) == ("random", "vit_tiny_test", 64)
    scan = pd.read_parquet(out / "embeddings.parquet")["scan_id"].iloc[0]
    got = np.load(out / "embeddings" / "lung" / f"{scan}.npy").astype(np.float32)
    assert got.shape[1] == 64 and np.isfinite(got).all()
    assert not np.allclose(got, _expected(encoder_dir, preprocessed, scan, 1), atol=1e-2)
