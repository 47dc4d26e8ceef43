"""Pretraining data: the preprocess output as slice / slab datasets and a resumable, rank-split loader.

Items are raw (un-augmented) slices read by byte range / memory map from the shards; views are made
on whole batches in `slicefm.ssl.views` (torch, on the training device). The batch order is a pure
function of (seed, epoch, rank), so a resumed run restarts at (epoch, step-in-epoch) exactly.
"""

from __future__ import annotations

import io
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from slicefm.core.shards import StackReader
from slicefm.core.store import Store
from slicefm.data.adapters.sidecar import LESION_NAMES  # DeepLesion types 1..8, the typed aux order

logger = logging.getLogger(__name__)

MASK_KEYS = ("organ", "lesion", "finding")
# Decompressing a scan's mask npz is the slow part of a LeJEPA item, and shuffled batches hit a new scan
# almost every item: keep decompressed masks up to this many bytes per reader (per loader worker), least
# recently used out first. A 320-scan 128 px phantom cohort fits (~5 MB a scan); one 512 px scan is ~0.2 GB.
MASK_CACHE_BYTES = 1 << 30


@dataclass
class PretrainIndex:
    """What the datasets need from a preprocess output (slices of the training scans, channels, masks)."""

    store: Store
    slices: pd.DataFrame  # one row per slice, with `boxes` (parsed lesion_boxes) and `key_id` (-1 if none)
    channels: list[str]
    dtype: str
    organ_classes: list[str] | None = None
    finding_classes: list[str] | None = None
    scans_with_masks: set[str] = field(default_factory=set)
    data_version: str | None = None
    key_fingerprint: str | None = None  # pseudonymisation key of the data (preprocess.json)
    # CLEAR embeds every HU window separately (one single-channel image per window): with per_window each
    # slice row is repeated once per channel (`channel` column) and the encoder sees 1-channel images.
    per_window: bool = False
    # Typed lesion aux classes: per scan, mask lesion number -> DeepLesion type 1..8 (0: none or unknown).
    lesion_type_of: dict[str, np.ndarray] | None = None

    @property
    def in_chans(self) -> int:
        return 1 if self.per_window else len(self.channels)

    @property
    def n_key_slices(self) -> int:
        return int((self.slices["key_id"] >= 0).sum())

    @property
    def image_size(self) -> int:
        return int(self.store.read_npy_header(self.slices["stack"].iloc[0]).shape[-1])

    @property
    def n_abnormal(self) -> int:
        """Binary abnormality classes for aux supervision: finding classes without 'none', then the lesion
        classes ('lesion', or one per DeepLesion type when typed)."""
        return len(self.abnormal_classes)

    @property
    def n_lesion_classes(self) -> int:
        return len(LESION_NAMES) if self.lesion_type_of is not None else 1

    @property
    def abnormal_classes(self) -> list[str]:
        lesions = [f"lesion_{t}" for t in LESION_NAMES] if self.lesion_type_of is not None else ["lesion"]
        return list((self.finding_classes or ["none"])[1:]) + lesions


def lesion_type_lookup(lesions: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per scan: array mapping lesion mask value (lesion_index + 1) to its DeepLesion type 1..8, 0 for
    background and unknown types (-1), so an untyped lesion is never taught as some type."""
    lookup: dict[str, np.ndarray] = {}
    for scan_id, group in lesions.groupby("scan_id", sort=False):
        numbers = group["lesion_index"].to_numpy(np.int64) + 1
        table = np.zeros(int(numbers.max()) + 1, np.uint8)
        types = group["lesion_type"].to_numpy(np.int64)
        table[numbers] = np.where((types >= 1) & (types <= len(LESION_NAMES)), types, 0)
        lookup[str(scan_id)] = table
    return lookup


def typed_lesion_mask(numbers: np.ndarray, types: np.ndarray | None) -> np.ndarray:
    """Lesion-number mask -> DeepLesion-type mask (0 where no lesion, or the lesion has no known type)."""
    table = np.zeros(max(int(numbers.max(initial=0)) + 1, 0 if types is None else len(types)), np.uint8)
    if types is not None:
        table[: len(types)] = types
    return table[numbers]


def load_index(
    store: Store,
    exclude_splits: list[str] | tuple[str, ...] = ("test",),
    per_window: bool = False,
    typed_lesions: bool = False,
) -> PretrainIndex:
    """Read slices.parquet / scans.parquet / preprocess.json; drop scans of `exclude_splits`.

    `per_window`: one item per (slice, channel), in that order, so samplers, slabs and key slices
    work unchanged on single-window images. `typed_lesions`: lesion masks read as DeepLesion types
    (needs lesions.parquet)."""
    meta = store.read_json("preprocess.json")
    if meta.get("layout") != "[slice, channel, H, W]":
        raise ValueError(
            f"pretraining needs [slice, channel, H, W] stacks, got layout {meta.get('layout')!r}"
        )
    slices = store.read_parquet("slices.parquet")
    scans = store.read_parquet("scans.parquet")
    if exclude_splits and "split" in scans.columns:
        keep = set(scans.loc[~scans["split"].isin(list(exclude_splits)), "scan_id"])
        slices = slices[slices["scan_id"].isin(keep)]
    if slices.empty:
        raise ValueError(f"no training slices in {store.uri('')} (excluded splits: {list(exclude_splits)})")
    slices = slices.sort_values(["scan_id", "slice_index"]).reset_index(drop=True)
    n_channels = len(meta["channels"])
    if per_window:
        slices = slices.loc[slices.index.repeat(n_channels)].reset_index(drop=True)
        slices["channel"] = np.tile(np.arange(n_channels), len(slices) // n_channels)
    else:
        slices["channel"] = -1
    slices["boxes"] = [json.loads(b) if isinstance(b, str) else [] for b in slices["lesion_boxes"]]
    has_box = slices["boxes"].map(len) > 0
    slices["key_id"] = -1
    slices.loc[has_box, "key_id"] = np.arange(int(has_box.sum()))
    organ = store.read_json("masks/organ_classes.json") if store.exists("masks/organ_classes.json") else None
    finding = (
        store.read_json("masks/finding_classes.json") if store.exists("masks/finding_classes.json") else None
    )
    with_masks = {sid for sid in slices["scan_id"].unique() if store.exists(f"masks/{sid}.npz")}
    lesion_type_of = None
    if typed_lesions:
        if not store.exists("lesions.parquet"):
            raise ValueError(f"typed lesion classes need {store.uri('lesions.parquet')} (lesion types)")
        lesion_type_of = lesion_type_lookup(store.read_parquet("lesions.parquet"))
    logger.info(
        "pretraining index: %d slices of %d scans, %d key slices, masks for %d scans",
        len(slices), slices["scan_id"].nunique(), int(has_box.sum()), len(with_masks),
    )  # fmt: skip
    return PretrainIndex(
        store=store,
        slices=slices,
        channels=list(meta["channels"]),
        dtype=str(meta["dtype"]),
        organ_classes=organ,
        finding_classes=finding,
        scans_with_masks=with_masks,
        data_version=meta.get("source"),
        key_fingerprint=meta.get("pseudonym_key_fingerprint"),
        per_window=per_window,
        lesion_type_of=lesion_type_of,
    )


def to_float(stack: np.ndarray) -> np.ndarray:
    """uint8 windows -> [0, 1] float32; float16 z-scores are used as they are (float32)."""
    if stack.dtype == np.uint8:
        return stack.astype(np.float32) / 255.0
    return stack.astype(np.float32)


class _Reader:
    """Slice and mask access shared by the datasets (one per worker process after pickling)."""

    def __init__(self, index: PretrainIndex, cache_bytes: int = MASK_CACHE_BYTES, raw: bool = False) -> None:
        self.index = index
        self.raw = raw
        self.reader = StackReader(index.store)
        self.cache_bytes = cache_bytes
        self._masks: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._mask_bytes = 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_masks"], state["_mask_bytes"] = OrderedDict(), 0
        return state

    def _out(self, images: np.ndarray) -> np.ndarray:
        if self.raw:  # bytes from S3 arrive read-only; torch wants writable arrays
            return images if images.flags.writeable else images.copy()
        return to_float(images)

    def image(self, row: pd.Series) -> np.ndarray:
        """[C, H, W] float32 (stored dtype when raw); [1, H, W] of the row's channel in per-window mode."""
        image = self.reader.read_slice(row["stack"], int(row["row"]))
        channel = int(row.get("channel", -1))
        return self._out(image[channel : channel + 1] if channel >= 0 else image)

    def images(self, rows: pd.DataFrame) -> np.ndarray:
        """[n, C, H, W] of `rows` (one channel each in per-window mode): one read per stack for a run of
        consecutive rows (a slab), else one per row."""
        stacks, at = rows["stack"].to_numpy(), rows["row"].to_numpy(np.int64)
        channel = rows["channel"].to_numpy(np.int64) if "channel" in rows else np.full(len(rows), -1)
        if (stacks == stacks[0]).all() and (np.diff(at) == 1).all():
            block = self.reader.read_rows(str(stacks[0]), int(at[0]), int(at[-1]) + 1)
        else:
            block = np.stack(
                [self.reader.read_slice(str(k), int(r)) for k, r in zip(stacks, at, strict=True)]
            )
        if (channel >= 0).any():
            block = block[np.arange(len(rows)), channel][:, None]
        return self._out(block)

    def masks(self, scan_id: str, rows: np.ndarray, hw: tuple[int, int]) -> dict[str, np.ndarray]:
        """organ / lesion / finding label maps [len(rows), H, W] uint8 (zeros when the scan has none)."""
        if scan_id not in self.index.scans_with_masks:
            return {k: np.zeros((len(rows), *hw), np.uint8) for k in MASK_KEYS}
        cached = self._masks_of(scan_id)
        return {
            k: (cached[k][rows] if k in cached else np.zeros((len(rows), *hw), np.uint8)) for k in MASK_KEYS
        }

    def _masks_of(self, scan_id: str) -> dict[str, np.ndarray]:
        """The scan's whole decompressed label maps (lesions as types when typed), through the LRU cache."""
        if scan_id in self._masks:
            self._masks.move_to_end(scan_id)
            return self._masks[scan_id]
        with np.load(io.BytesIO(self.index.store.read_bytes(f"masks/{scan_id}.npz"))) as npz:
            masks = {k: npz[k] for k in MASK_KEYS if k in npz.files}
        if self.index.lesion_type_of is not None and "lesion" in masks:
            masks["lesion"] = typed_lesion_mask(masks["lesion"], self.index.lesion_type_of.get(scan_id))
        self._masks[scan_id] = masks
        self._mask_bytes += sum(a.nbytes for a in masks.values())
        while self._mask_bytes > self.cache_bytes and len(self._masks) > 1:
            _, evicted = self._masks.popitem(last=False)
            self._mask_bytes -= sum(a.nbytes for a in evicted.values())
        return masks


def first_box(boxes: list) -> np.ndarray:
    """The first annotated box (x0, y0, x1, y1) as float32, NaNs when the slice has none."""
    if not boxes:
        return np.full(4, np.nan, np.float32)
    return np.asarray(boxes[0][:4], np.float32)


class SliceDataset(Dataset):
    """MoCo / LECL items: one slice -> image [C, H, W], its first lesion box (NaN if none), key-slice id."""

    def __init__(self, index: PretrainIndex, raw: bool = False) -> None:
        """`raw`: images in their stored dtype (uint8 windows, float16 z-scores), made float on the device."""
        self.index = index
        self._io = _Reader(index, raw=raw)

    def __len__(self) -> int:
        return len(self.index.slices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.index.slices.iloc[int(i)]
        return {
            "image": self._io.image(row),
            "box": first_box(row["boxes"]),
            "key_id": np.int64(row["key_id"]),
            "item": np.int64(i),
        }


def abnormal_slices(index: PretrainIndex) -> np.ndarray:
    """bool per row of `index.slices`: the slice shows an abnormality (a lesion or finding mask pixel, or an
    annotated lesion box for scans without masks). Reads every scan's mask file once."""
    flags = index.slices["boxes"].map(len).to_numpy() > 0
    io_ = _Reader(index)
    for scan_id, pos in index.slices.groupby("scan_id", sort=False).indices.items():
        if scan_id not in index.scans_with_masks:
            continue
        rows = index.slices["row"].to_numpy()[pos]
        masks = io_.masks(str(scan_id), rows, (1, 1))
        flags[pos] |= ((masks["lesion"] > 0) | (masks["finding"] > 0)).any(axis=(1, 2))
    return flags


class SlabDataset(Dataset):
    """LeJEPA items: one 12 mm slab (depth-aware) or one slice (2D ablation), padded to `max_slices`.

    Returns stack [S, C, H, W], organ / lesion / finding [S, H, W], box_mask [S, H, W] (lesion boxes
    rasterised, for scans without masks), slice_index [S] (-1 = padding), n (valid slices), centre row,
    and `targeted` (the item was drawn centred on an abnormality, see below).

    `label_guided=True` (DALE-CT): besides the `len(self)` regular slabs, the dataset holds one *targeted*
    item per abnormal slice: a window of its slab's length centred on that slice (`centre` = the slice),
    so a sampler can, with the paper's probability, swap a drawn slab for an abnormality of the same
    volume (`targets_of[i]`: the targeted ids of regular item i's volume and channel).
    """

    def __init__(
        self, index: PretrainIndex, depth_aware: bool = True, label_guided: bool = False, raw: bool = False
    ) -> None:
        self.index = index
        self.depth_aware = depth_aware
        self._io = _Reader(index, raw=raw)  # raw: stacks in their stored dtype (see SliceDataset)
        s = index.slices
        if depth_aware:
            groups = s.groupby(["scan_id", "slab_id", "channel"], sort=True).indices
            self.items = [np.sort(v) for v in groups.values()]
        else:
            self.items = [np.array([i]) for i in range(len(s))]
        self.centres = [len(v) // 2 for v in self.items]  # DALE-CT: global crops from the slab's middle slice
        self.n_regular = len(self.items)
        self.targets_of: list[np.ndarray] = []
        if label_guided:
            self._add_targeted_items(abnormal_slices(index))
        self.max_slices = max(len(v) for v in self.items)

    def _add_targeted_items(self, abnormal: np.ndarray) -> None:
        s = self.index.slices
        volume_ids: dict[tuple[str, int], list[int]] = {}
        slab_len = np.ones(len(s), np.int64)
        for rows in self.items:
            slab_len[rows] = len(rows)
        for (scan_id, channel), pos in s.groupby(["scan_id", "channel"], sort=True).indices.items():
            pos = pos[np.argsort(s["slice_index"].to_numpy()[pos], kind="stable")]
            ids = volume_ids.setdefault((str(scan_id), int(channel)), [])
            for k in np.flatnonzero(abnormal[pos]):
                n = int(slab_len[pos[k]])
                start = int(np.clip(k - n // 2, 0, max(len(pos) - n, 0)))
                window = pos[start : start + n]
                ids.append(len(self.items))
                self.items.append(window)
                self.centres.append(int(k - start))
        empty = np.zeros(0, np.int64)
        for rows in self.items[: self.n_regular]:
            first = s.iloc[int(rows[0])]
            volume = (str(first["scan_id"]), int(first["channel"]))
            self.targets_of.append(np.asarray(volume_ids.get(volume, empty)))
        logger.info(
            "label-guided sampling: %d abnormal slices in %d of %d volumes",
            len(self.items) - self.n_regular, sum(bool(v) for v in volume_ids.values()),
            s.groupby(["scan_id", "channel"]).ngroups,
        )  # fmt: skip

    def __len__(self) -> int:
        """Regular items only: an epoch is one pass over the slabs (targeted items replace some of them)."""
        return self.n_regular

    def __getitem__(self, i: int) -> dict[str, Any]:
        rows = self.index.slices.iloc[self.items[int(i)]]
        images = self._io.images(rows)
        n, (h, w) = len(rows), images.shape[-2:]
        masks = self._io.masks(str(rows["scan_id"].iloc[0]), rows["row"].to_numpy(), (h, w))
        box_mask = np.zeros((n, h, w), np.uint8)
        for k, boxes in enumerate(rows["boxes"]):
            for x0, y0, x1, y1, *_ in boxes:
                # at least the box's own pixel: a lesion smaller than a pixel after resizing is a point box
                r0, c0 = min(int(y0), h - 1), min(int(x0), w - 1)
                box_mask[k, r0 : max(int(np.ceil(y1)), r0 + 1), c0 : max(int(np.ceil(x1)), c0 + 1)] = 1
        pad = self.max_slices - n
        out: dict[str, Any] = {
            "stack": np.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0))),
            "box_mask": np.pad(box_mask, ((0, pad), (0, 0), (0, 0))),
            "slice_index": np.pad(rows["slice_index"].to_numpy(np.int64), (0, pad), constant_values=-1),
            "n": np.int64(n),
            "centre": np.int64(self.centres[int(i)]),
            "targeted": np.bool_(int(i) >= self.n_regular),
            "item": np.int64(i),
        }
        for k in MASK_KEYS:
            out[k] = np.pad(masks[k], ((0, pad), (0, 0), (0, 0)))
        return out


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of one rank for one epoch: permutation from (seed, epoch), split by rank, drop_last.

    Every rank gets the same number of batches; `start_batch` skips the batches a resumed run has done.
    `redirect=(prob, targets_of)` applies `redirect_items` to the permutation (its own (seed, epoch) stream,
    so resumed runs still see the same batches).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        rank: int,
        world: int,
        seed: int,
        epoch: int,
        start_batch: int = 0,
        redirect: tuple[float, list[np.ndarray]] | None = None,
    ) -> None:
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.epoch, self.start_batch = seed, epoch, start_batch
        self.redirect = redirect
        if self.batches_per_epoch(n, batch_size, world) < 1:
            raise ValueError(f"{n} items are fewer than one global batch ({batch_size} x {world} ranks)")

    @staticmethod
    def batches_per_epoch(n: int, batch_size: int, world: int) -> int:
        return n // (batch_size * world)

    def __len__(self) -> int:
        return self.batches_per_epoch(self.n, self.batch_size, self.world) - self.start_batch

    def __iter__(self):
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        if self.redirect is not None:
            perm = redirect_items(perm, *self.redirect, np.random.default_rng([self.seed, self.epoch, 1]))
        n_batches = self.batches_per_epoch(self.n, self.batch_size, self.world)
        mine = perm[: n_batches * self.batch_size * self.world][self.rank :: self.world]
        for b in range(self.start_batch, n_batches):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size].tolist()


def redirect_items(
    perm: np.ndarray, prob: float, targets_of: list[np.ndarray], rng: np.random.Generator
) -> np.ndarray:
    """Label-guided draws: each drawn item whose volume has targeted items is swapped, with probability
    `prob`, for one of them chosen uniformly (DALE-CT: a crop is centred on an abnormality with p 0.8 when
    the volume has one)."""
    u, pick = rng.random(len(perm)), rng.random(len(perm))
    out = perm.copy()
    for k, item in enumerate(perm):
        targets = targets_of[int(item)]
        if len(targets) and u[k] < prob:
            out[k] = targets[int(pick[k] * len(targets))]
    return out


def make_loader(
    dataset: Dataset,
    sampler: EpochBatchSampler,
    workers: int,
    pin_memory: bool,
    prefetch_factor: int = 2,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """DataLoader over `sampler`'s batches; workers come from a forkserver (forking a process with live
    torch / OpenMP thread pools can deadlock), pinned memory only matters with CUDA."""
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(multiprocessing_context="forkserver", prefetch_factor=prefetch_factor)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        generator=generator,
        **kwargs,
    )
