"""View sampling on the real preprocess output: lesion crops, slab crops, abnormality centring, aux targets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import default_collate

from slicefm.core.store import open_store
from slicefm.ssl.config import AugmentConfig, LECLConfig, LeJEPAConfig
from slicefm.ssl.views import ABNORMAL, aux_targets, crop_labels, lejepa_views, lesion_crop_boxes, moco_views
from slicefm.train.data import (
    LESION_NAMES,
    EpochBatchSampler,
    SlabDataset,
    SliceDataset,
    _Reader,
    abnormal_slices,
    lesion_type_lookup,
    load_index,
    typed_lesion_mask,
)


def _batch(ds, items):
    return default_collate([ds[int(i)] for i in items])


def test_lesion_crop_contains_the_lesion_box(preprocessed: str) -> None:
    index = load_index(open_store(preprocessed))
    ds = SliceDataset(index)
    key_items = np.flatnonzero(index.slices["key_id"].to_numpy() >= 0)
    assert len(key_items) > 0
    batch = _batch(ds, key_items[:8])
    boxes = batch["box"].numpy()
    crops = lesion_crop_boxes(boxes, (32, 32), LECLConfig())
    assert (crops[:, 0] <= boxes[:, 0]).all() and (crops[:, 1] <= boxes[:, 1]).all()
    assert (crops[:, 2] >= boxes[:, 2]).all() and (crops[:, 3] >= boxes[:, 3]).all()
    assert (crops >= 0).all() and (crops <= 32).all()
    views = moco_views(
        batch["image"], boxes, 32, np.random.default_rng(0), torch.Generator().manual_seed(0),
        (0.08, 1.0), AugmentConfig(), LECLConfig(),
    )  # fmt: skip
    assert views.lesion_mask.all()
    np.testing.assert_allclose(views.key_boxes, crops)
    assert views.key_x1.shape == (8, 2, 32, 32)
    # The key encoder sees a zoomed crop, the query encoder the full slice: they differ.
    assert not torch.allclose(views.key_x1, views.x1)


def _abnormal_items(ds: SlabDataset) -> list[int]:
    out = []
    for i in range(len(ds)):
        it = ds[i]
        c = int(it["centre"])
        if (it["lesion"][c] > 0).any() or (it["finding"][c] > 0).any() or (it["box_mask"][c] > 0).any():
            out.append(i)
    return out


def test_lejepa_crops_come_from_the_slab_or_slice(preprocessed: str) -> None:
    index = load_index(open_store(preprocessed))
    cfg = LeJEPAConfig(local_size=16, n_local=8)
    for depth_aware in (True, False):
        ds = SlabDataset(index, depth_aware=depth_aware)
        batch = _batch(ds, range(0, len(ds), max(1, len(ds) // 6))[:6])
        v = lejepa_views(
            batch, np.random.default_rng(1), torch.Generator().manual_seed(1),
            cfg.model_copy(update={"depth_aware": depth_aware}), AugmentConfig(), 32,
        )  # fmt: skip
        assert v.global_views.shape == (2, 6, 2, 32, 32) and v.local_views.shape == (8, 6, 2, 16, 16)
        assert (v.slice_index >= 0).all()  # never a padding row
        for b, item in enumerate(batch["item"].tolist()):
            rows = index.slices.iloc[ds.items[item]]
            slab_of = dict(zip(rows["slice_index"], rows["slab_id"], strict=True))
            centre = int(rows["slice_index"].iloc[len(rows) // 2])
            assert (v.slice_index[:2, b] == centre).all()  # global crops: the slab's middle slice
            locals_ = v.slice_index[2:, b]
            assert all(s in slab_of for s in locals_)  # same scan, same slab
            if not depth_aware:
                assert (locals_ == centre).all()
        if depth_aware and ds.max_slices > 1:
            assert len(np.unique(v.slice_index[2:])) > len(np.unique(v.slice_index[:2]))


def test_slice_guidance_centres_crops_on_abnormality_with_p08(preprocessed: str) -> None:
    index = load_index(open_store(preprocessed))
    ds = SlabDataset(index, depth_aware=False)
    items = _abnormal_items(ds)[:8]
    assert items, "the phantom set must have slices with abnormalities"
    batch = _batch(ds, items)
    cfg = LeJEPAConfig(n_global=2, n_local=0, depth_aware=False, guidance="slice")
    kinds = []
    for seed in range(25):
        v = lejepa_views(batch, np.random.default_rng(seed), torch.Generator(), cfg, AugmentConfig(), 32)
        kinds.append(v.kinds.ravel())
        ab = v.kinds == ABNORMAL
        for g, b in zip(*np.nonzero(ab), strict=True):
            x, y = (v.centres[g, b] - 0.5).astype(int)
            r = 0
            hit = batch["lesion"][b, r, y, x] + batch["finding"][b, r, y, x] + batch["box_mask"][b, r, y, x]
            assert hit > 0  # the chosen centre is an abnormal pixel
            x0, y0, x1, y1 = v.boxes[g, b]
            assert x0 <= x + 0.5 <= x1 and y0 <= y + 0.5 <= y1  # and it lies in the crop
    frac = float(np.mean(np.concatenate(kinds) == ABNORMAL))
    assert 0.7 < frac < 0.9, frac  # 400 crops: binomial sd 0.02 around 0.8


def test_aux_targets_equal_direct_mask_fractions() -> None:
    rng = np.random.default_rng(0)
    organ = torch.from_numpy(rng.integers(0, 5, size=(3, 24, 24)))
    finding = torch.from_numpy(rng.choice([0, 0, 0, 2], size=(3, 24, 24)))
    lesion = torch.zeros(3, 24, 24, dtype=torch.long)
    lesion[1, 20, 18] = 1  # inside box 1 only
    boxes = torch.tensor([[0, 0, 16, 16], [4, 8, 20, 24], [8, 2, 24, 18]], dtype=torch.float32)
    crops = {k: crop_labels(m, boxes, 16) for k, m in (("o", organ), ("f", finding), ("l", lesion))}
    t = aux_targets(crops["o"], crops["f"], crops["l"], n_organs=5, n_abnormal=4, token_grid=2)
    for b, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        region = organ[b, y0:y1, x0:x1].numpy()
        np.testing.assert_allclose(t["organ_cls"][b].numpy(), np.bincount(region.ravel(), minlength=5) / 256)
        quad = region[:8, 8:]  # token cell 1 (row 0, column 1)
        np.testing.assert_allclose(
            t["organ_patch"][b, 1].numpy(), np.bincount(quad.ravel(), minlength=5) / 64
        )
        f = finding[b, y0:y1, x0:x1].numpy()
        expected = [float((f == c).any()) for c in (1, 2, 3)] + [float((lesion[b, y0:y1, x0:x1] > 0).any())]
        np.testing.assert_array_equal(t["abn_cls"][b].numpy(), expected)
    assert t["abn_cls"][:, 1].sum() == 3 and t["abn_cls"][1, 3] == 1 and t["abn_cls"][0, 3] == 0


def test_typed_aux_targets_have_one_class_per_lesion_type() -> None:
    finding = torch.zeros(2, 8, 8, dtype=torch.long)
    finding[0, 0, 0] = 2
    lesion = torch.zeros(2, 8, 8, dtype=torch.long)  # lesion types 1..3
    lesion[0, 2:4, 2:4], lesion[1, 5, 5], lesion[1, 0, 7] = 3, 1, 3
    organ = torch.zeros(2, 8, 8, dtype=torch.long)
    t = aux_targets(organ, finding, lesion, n_organs=2, n_abnormal=5, token_grid=2, n_lesion_classes=3)
    # columns: findings 1, 2, then lesion types 1, 2, 3
    np.testing.assert_array_equal(t["abn_cls"].numpy(), [[0, 1, 0, 0, 1], [0, 0, 1, 0, 1]])
    np.testing.assert_array_equal(
        t["abn_patch"][1, :, 2:].numpy(), [[0, 0, 0], [0, 0, 1], [0, 0, 0], [1, 0, 0]]
    )
    untyped = aux_targets(organ, finding, lesion, n_organs=2, n_abnormal=3, token_grid=None)
    np.testing.assert_array_equal(untyped["abn_cls"][:, -1].numpy(), [1, 1])


def test_lesion_numbers_map_to_their_types_and_unknown_types_to_none() -> None:
    lesions = pd.DataFrame(
        {"scan_id": ["a", "a", "a", "b"], "lesion_index": [0, 1, 2, 0], "lesion_type": [4, -1, 5, 8]}
    )
    lookup = lesion_type_lookup(lesions)
    np.testing.assert_array_equal(lookup["a"], [0, 4, 0, 5])
    numbers = np.array([[0, 1, 2], [3, 3, 0]], np.uint8)
    np.testing.assert_array_equal(typed_lesion_mask(numbers, lookup["a"]), [[0, 4, 0], [5, 5, 0]])
    # a mask number with no lesions.parquet row (or a scan without rows) has no type
    np.testing.assert_array_equal(typed_lesion_mask(numbers, None), np.zeros_like(numbers))
    np.testing.assert_array_equal(typed_lesion_mask(numbers, lookup["b"]), [[0, 8, 0], [0, 0, 0]])


def test_typed_index_reads_each_lesions_deeplesion_type(preprocessed: str) -> None:
    store = open_store(preprocessed)
    typed, plain = load_index(store, typed_lesions=True), load_index(store)
    assert typed.abnormal_classes == plain.abnormal_classes[:-1] + [f"lesion_{t}" for t in LESION_NAMES]
    ds_typed, ds_plain = SlabDataset(typed, depth_aware=False), SlabDataset(plain, depth_aware=False)
    n_boxes = 0
    for i in np.flatnonzero(typed.slices["boxes"].map(len).to_numpy() > 0):
        lesion_typed, lesion_plain = ds_typed[int(i)]["lesion"][0], ds_plain[int(i)]["lesion"][0]
        np.testing.assert_array_equal(lesion_typed > 0, lesion_plain > 0)  # every phantom lesion has a type
        for x0, y0, x1, y1, lesion_type in typed.slices["boxes"].iloc[int(i)]:
            box = np.s_[int(y0) : int(np.ceil(y1)) + 1, int(x0) : int(np.ceil(x1)) + 1]
            if (lesion_plain[box] > 0).any():  # (a lesion smaller than a pixel at 32 px can vanish)
                assert lesion_type in set(lesion_typed[box].ravel().tolist()), (i, lesion_type)
                n_boxes += 1
    assert n_boxes >= 6


def test_mask_cache_keeps_recent_scans_within_its_byte_budget(preprocessed: str) -> None:
    index = load_index(open_store(preprocessed), typed_lesions=True)
    scans = sorted(index.scans_with_masks)[:3]
    first = _Reader(index).masks(scans[0], np.arange(2), (0, 0))
    scan_bytes = sum(a.nbytes for a in _Reader(index)._masks_of(scans[0]).values())
    reader = _Reader(index, cache_bytes=int(2.5 * scan_bytes))  # room for two scans of this size
    reader.masks(scans[0], np.arange(2), (0, 0))
    reader.masks(scans[1], np.arange(2), (0, 0))
    reader.masks(scans[0], np.arange(2), (0, 0))  # scans[0] is now the most recently used
    reader.masks(scans[2], np.arange(2), (0, 0))  # over budget: the least recently used (scans[1]) goes
    assert list(reader._masks) == [scans[0], scans[2]]
    assert reader._mask_bytes == sum(a.nbytes for m in reader._masks.values() for a in m.values())
    again = reader.masks(scans[0], np.arange(2), (0, 0))  # served from the cache, typed like a fresh read
    for key in first:
        np.testing.assert_array_equal(again[key], first[key])


def _shows_abnormality(item: dict, row: int) -> bool:
    return bool(
        (item["lesion"][row] > 0).any()
        or (item["finding"][row] > 0).any()
        or (item["box_mask"][row] > 0).any()
    )


def test_volume_guidance_targets_abnormal_slices_of_the_same_volume(preprocessed: str) -> None:
    index = load_index(open_store(preprocessed), per_window=True)
    ds = SlabDataset(index, depth_aware=True, label_guided=True)
    plain = SlabDataset(index, depth_aware=True)
    assert len(ds) == len(plain)  # an epoch is still one pass over the slabs
    assert all((a == b).all() for a, b in zip(ds.items[: len(ds)], plain.items, strict=True))
    abnormal = abnormal_slices(index)
    s = index.slices
    assert len(ds.items) - len(ds) == int(abnormal.sum()) > 0  # one targeted item per abnormal slice
    for t in range(len(ds), len(ds.items)):
        item, rows = ds[t], s.iloc[ds.items[t]]
        assert bool(item["targeted"])
        assert _shows_abnormality(item, int(item["centre"]))  # global crops come from an abnormal slice
        assert rows["scan_id"].nunique() == 1 and rows["channel"].nunique() == 1
        assert (np.diff(rows["slice_index"].to_numpy()) == 1).all()  # a contiguous window of the volume
    for i in range(len(ds)):
        first = s.iloc[int(ds.items[i][0])]
        volume = (s["scan_id"] == first["scan_id"]) & (s["channel"] == first["channel"])
        assert len(ds.targets_of[i]) == int(abnormal[volume.to_numpy()].sum())
        for t in ds.targets_of[i]:
            assert s.iloc[int(ds.items[t][0])][["scan_id", "channel"]].tolist() == [
                first["scan_id"],
                first["channel"],
            ]
        assert not bool(ds[i]["targeted"])


def test_sampler_swaps_draws_for_abnormalities_with_p08_and_resumes_exactly(preprocessed: str) -> None:
    index = load_index(open_store(preprocessed), per_window=True)
    ds = SlabDataset(index, depth_aware=False, label_guided=True)  # one item per slice: many draws
    assert all(len(t) for t in ds.targets_of)  # every phantom volume has a lesion: drop some targets
    targets_of = [t if (i // 7) % 2 else t[:0] for i, t in enumerate(ds.targets_of)]
    redirect = (0.8, targets_of)
    has_targets = np.array([len(t) > 0 for t in targets_of])
    swapped = eligible = 0
    for epoch in range(3):
        batches = list(EpochBatchSampler(len(ds), 4, 0, 1, seed=3, epoch=epoch, redirect=redirect))
        drawn = np.concatenate(batches)
        plain = np.concatenate(list(EpochBatchSampler(len(ds), 4, 0, 1, seed=3, epoch=epoch)))
        assert (
            drawn[~has_targets[plain]] == plain[~has_targets[plain]]
        ).all()  # no abnormality: never swapped
        for d, p in zip(drawn, plain, strict=True):
            if has_targets[p]:
                eligible += 1
                swapped += int(d != p)
                assert d == p or d in targets_of[p]
        resumed = list(
            EpochBatchSampler(len(ds), 4, 0, 1, seed=3, epoch=epoch, start_batch=5, redirect=redirect)
        )
        assert resumed == batches[5:]
    frac = swapped / eligible
    sd = (0.8 * 0.2 / eligible) ** 0.5
    assert abs(frac - 0.8) < 4 * sd, (frac, eligible)


def test_volume_guidance_centres_every_crop_of_a_targeted_item(preprocessed: str) -> None:
    index = load_index(open_store(preprocessed))
    ds = SlabDataset(index, depth_aware=True, label_guided=True)
    targeted = list(range(len(ds), min(len(ds.items), len(ds) + 6)))
    untargeted = list(range(6))
    cfg = LeJEPAConfig(n_global=2, n_local=4, local_size=16)
    batch = _batch(ds, targeted + untargeted)
    v = lejepa_views(
        batch, np.random.default_rng(0), torch.Generator().manual_seed(0), cfg, AugmentConfig(), 32
    )
    nt = len(targeted)
    assert (v.kinds[:2, :nt] == ABNORMAL).all()  # global crops: the abnormal centre slice, always
    for g in range(2, v.kinds.shape[0]):  # local crops: abnormal whenever their slice shows one
        for b in range(nt):
            row = int(v.rows[g, b])
            assert (v.kinds[g, b] == ABNORMAL) == _shows_abnormality({k: batch[k][b] for k in batch}, row)
    assert not (v.kinds[:, nt:] == ABNORMAL).any()  # untargeted draws are centred on anatomy


_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _on(batch: dict, device: str) -> dict:
    return {k: v.to(device) if k in ("image", "stack", "organ", "lesion", "finding", "box_mask") else v
            for k, v in batch.items()}  # fmt: skip


@pytest.mark.parametrize("device", _DEVICES)
def test_device_path_moco_lecl_views_equal_the_cpu_float_path(preprocessed: str, device: str) -> None:
    """Stored-dtype (uint8) items made float on `device` give the views of float32 items on the CPU."""
    index = load_index(open_store(preprocessed))
    is_key = index.slices["key_id"].to_numpy() >= 0
    items = [*np.flatnonzero(is_key)[:3], *np.flatnonzero(~is_key)[:5]]
    raw, flt = _batch(SliceDataset(index, raw=True), items), _batch(SliceDataset(index), items)
    assert raw["image"].dtype == torch.uint8 and flt["image"].dtype == torch.float32
    for lecl in (None, LECLConfig()):
        out = []
        for b, dev in ((raw, device), (flt, "cpu")):
            v = moco_views(
                _on(b, dev)["image"], b["box"].numpy(), 24, np.random.default_rng(5),
                torch.Generator().manual_seed(5), (0.3, 1.0), AugmentConfig(blur_prob=0.5), lecl,
            )  # fmt: skip
            out.append(v)
        a, c = out
        assert np.array_equal(a.key_boxes, c.key_boxes)
        for name in ("x1", "x2", "key_x1", "key_x2"):
            if getattr(c, name) is not None:
                torch.testing.assert_close(getattr(a, name).cpu(), getattr(c, name), atol=1e-5, rtol=1e-5)
    assert bool(out[0].lesion_mask[:3].all()) and not bool(out[0].lesion_mask[3:].any())
    # the lesion slices' key views are lesion-centred crops, not the other encoder's view
    assert not torch.allclose(out[1].key_x2[:3], out[1].x1[:3]) and torch.equal(
        out[1].key_x2[3:], out[1].x2[3:]
    )


@pytest.mark.parametrize("device", _DEVICES)
def test_device_path_lejepa_views_equal_the_cpu_float_path(preprocessed: str, device: str) -> None:
    index = load_index(open_store(preprocessed))
    raw_ds = SlabDataset(index, depth_aware=True, label_guided=True, raw=True)
    flt_ds = SlabDataset(index, depth_aware=True, label_guided=True)
    items = [*range(len(raw_ds), min(len(raw_ds.items), len(raw_ds) + 3)), 0, 1, 2]
    raw, flt = _batch(raw_ds, items), _batch(flt_ds, items)
    assert raw["stack"].dtype == torch.uint8
    cfg = LeJEPAConfig(n_global=2, n_local=4, local_size=16)
    outs = [
        lejepa_views(_on(b, dev), np.random.default_rng(9), torch.Generator().manual_seed(9), cfg,
                     AugmentConfig(), 32, n_organs=4, n_abnormal=2, token_grid=4)
        for b, dev in ((raw, device), (flt, "cpu"))
    ]  # fmt: skip
    a, c = outs
    for name in ("rows", "centres", "kinds", "boxes"):
        assert np.array_equal(getattr(a, name), getattr(c, name)), name
    torch.testing.assert_close(a.global_views.cpu(), c.global_views, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.local_views.cpu(), c.local_views, atol=1e-5, rtol=1e-5)
    for k in c.aux_targets:
        torch.testing.assert_close(a.aux_targets[k].cpu(), c.aux_targets[k])
