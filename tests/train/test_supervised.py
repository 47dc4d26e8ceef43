"""The supervised ceiling (slicefm.train.supervised): targets from the masks, the flip, training and export."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from slicefm.core.store import open_store
from slicefm.embed.config import ExtractConfig
from slicefm.embed.sources import resolve_encoder
from slicefm.train.config import PretrainConfig, SupervisedCeilingConfig
from slicefm.train.data import LESION_NAMES, lesion_type_lookup, typed_lesion_mask
from slicefm.train.supervised import (
    SUPERVISED_LABEL,
    cell_targets,
    hflip_cells,
    load_labelled_slices,
    run_supervised_ceiling,
)

PRETRAIN = PretrainConfig.model_validate(
    {"seed": 3, "input_channels": "per_window", "encoder": {"name": "vit_tiny_test", "img_size": 32}}
)


def test_cell_targets_mark_the_classes_each_cell_covers() -> None:
    class_map = torch.zeros(1, 4, 4, dtype=torch.uint8)
    class_map[0, 0, 0] = 2  # one pixel of class index 1 in the top-left cell
    class_map[0, 3, 2:] = 1  # class index 0 along the bottom-right cell's last row
    cells = cell_targets(class_map, grid=2, n_classes=2)
    assert cells.shape == (1, 4, 2)
    expected = torch.tensor([[[False, True], [False, False], [False, False], [True, False]]])
    assert torch.equal(cells, expected)
    with pytest.raises(ValueError, match="beyond the 2 classes"):
        cell_targets(class_map + 2, grid=2, n_classes=2)
    with pytest.raises(ValueError, match="not divisible"):
        cell_targets(class_map, grid=3, n_classes=2)


def test_flipped_targets_are_the_targets_of_the_flipped_image() -> None:
    class_map = torch.from_numpy(np.random.default_rng(0).integers(0, 4, (5, 8, 8)).astype(np.uint8))
    cells = cell_targets(class_map, grid=4, n_classes=3)
    assert torch.equal(hflip_cells(cells, 4), cell_targets(class_map.flip(-1), grid=4, n_classes=3))
    assert not torch.equal(hflip_cells(cells, 4), cells)


def test_slice_targets_come_from_the_lesion_and_finding_masks(preprocessed: str) -> None:
    data = load_labelled_slices(preprocessed, ["lesions", "findings"], img_size=32, grid=2)
    store = open_store(preprocessed)
    findings = store.read_json("masks/finding_classes.json")[1:]
    assert data.classes == [f"lesion_{t}" for t in LESION_NAMES] + [f"finding_{f}" for f in findings]
    assert data.images.shape[1:] == (2, 32, 32) and data.images.dtype == np.uint8
    assert len(data.images) == len(data.slice_targets) == len(data.cell_targets)
    # Every slice target is the union of its cells', and both agree with the masks read independently.
    np.testing.assert_array_equal(data.slice_targets, data.cell_targets.any(axis=1))
    first = store.read_parquet("scans.parquet")["scan_id"].sort_values().iloc[0]
    types = lesion_type_lookup(store.read_parquet("lesions.parquet")).get(first)
    with np.load(io.BytesIO(store.read_bytes(f"masks/{first}.npz"))) as npz:
        typed, finding = typed_lesion_mask(npz["lesion"], types), npz["finding"]
    n = len(typed)
    for k in range(len(LESION_NAMES)):
        np.testing.assert_array_equal(data.slice_targets[:n, k], (typed == k + 1).any(axis=(1, 2)))
    for k in range(len(findings)):
        column = len(LESION_NAMES) + k
        np.testing.assert_array_equal(data.slice_targets[:n, column], (finding == k + 1).any(axis=(1, 2)))
    assert data.slice_targets.any(), "the phantom cohort has lesions or findings"
    only_findings = load_labelled_slices(preprocessed, ["findings"], img_size=32, grid=2)
    np.testing.assert_array_equal(only_findings.slice_targets, data.slice_targets[:, len(LESION_NAMES) :])


def test_the_ceiling_learns_and_exports_a_supervised_set(preprocessed: str, tmp_path) -> None:
    cfg = SupervisedCeilingConfig(enabled=True, steps=60, batch_size=16, lr=3e-3)
    logged: list[tuple[dict, int]] = []
    out = str(tmp_path / "ceiling")
    result = run_supervised_ceiling(preprocessed, out, PRETRAIN, cfg, lambda m, s: logged.append((m, s)))
    assert result.steps == 60 and result.loss_last < 0.8 * result.loss_first
    assert [s for _, s in logged] == [0, 50, 59] and all(np.isfinite(m["loss"]) for m, _ in logged)
    store = open_store(out)
    assert store.read_json("supervised_result.json")["classes"] == result.classes
    meta = store.read_json("encoder.json")
    assert meta["method"] == "supervised_ceiling" and meta["input_channels"] == "per_window"
    # The extract stage reads the export like any encoder and labels its set as the evaluation's ceiling.
    encoder, info = resolve_encoder(ExtractConfig(encoder="pretrained"), out, 2, 32)
    assert info.label == SUPERVISED_LABEL and info.in_chans == 1
    with torch.no_grad():
        assert encoder(torch.rand(3, 1, 32, 32)).shape == (3, encoder.embed_dim)


def test_the_ceiling_needs_slices_with_and_without_a_class(preprocessed: str, tmp_path) -> None:
    data = load_labelled_slices(preprocessed, ["findings"], img_size=32, grid=2)
    data.slice_targets[:] = 0
    from slicefm.train.supervised import train_supervised

    with pytest.raises(ValueError, match="needs slices with and without a class"):
        train_supervised(data, PRETRAIN, SupervisedCeilingConfig(steps=2), torch.device("cpu"))
