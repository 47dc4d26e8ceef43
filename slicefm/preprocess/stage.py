"""The preprocess stage: canonical HU volumes (from ingest) -> fixed-size slice stacks + slices.parquet.

Per scan: body crop (one square box for the whole volume) -> resize -> HU windows (uint8, one channel
per window) or DALE-CT clip + z-score (float16) -> optional 5-cut tiles; 12 mm slab ids from z spacing;
lesion boxes mapped into the output frame. Scans run in parallel; finished scans (stack + index present)
are skipped on re-runs; every file is written atomically by the store.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm import tqdm

from slicefm.core.parallel import process_pool
from slicefm.core.resume import may_resume
from slicefm.core.shards import shard_of, stack_key
from slicefm.core.store import Store, open_store
from slicefm.data.ingest import read_lesions, read_scans
from slicefm.data.schemas import SlicesSchema, validate
from slicefm.preprocess.boxes import map_box_to_output
from slicefm.preprocess.config import PreprocessConfig, channel_names, resolve_windows
from slicefm.preprocess.crop import AIR_HU, body_box, crop_to_box, square_box
from slicefm.preprocess.resize import resize_hu_slices
from slicefm.preprocess.slabs import slab_ids
from slicefm.preprocess.windows import apply_windows_uint8, apply_zscore, resize_windows_uint8

log = logging.getLogger(__name__)

# Slices cropped, cast, resized and normalised per step: an 8-slice float32 crop (~5 MiB at 420 px) stays in
# cache, where a whole-volume float32 copy (~200 MB for 300 slices) paid page faults and memory traffic
# (measured 1.3 -> ~0.1 ms/slice for the cast, side by side); the result is the same (each step is per slice).
_CHUNK_SLICES = 8


@dataclass
class PreprocessResult:
    out_uri: str
    n_scans: int
    n_skipped: int
    n_slices: int
    channels: list[str]


def crop_box_for(hu: np.ndarray, cfg: PreprocessConfig) -> tuple[int, int, int, int]:
    """Square body box (y0, y1, x0, x1) in the input frame; may extend past the image (padded with air)."""
    h, w = hu.shape[1:]
    # The box is a union over slices, so every other slice is enough (halves the costliest step).
    box = body_box(hu[::2], margin_px=cfg.crop_margin_px) if cfg.body_crop else (0, h, 0, w)
    return square_box(box, (h, w))


def normalise(hu_resized: np.ndarray, cfg: PreprocessConfig, out: np.ndarray | None = None) -> np.ndarray:
    """[z, H, W] HU -> [z, C, H, W] uint8 windows or float16 z-scores (written into `out` when given)."""
    if cfg.normalisation == "zscore":
        return apply_zscore(hu_resized, cfg.zscore, out=out)
    return apply_windows_uint8(hu_resized, resolve_windows(cfg), out=out)


def preprocess_volume(
    hu: np.ndarray, cfg: PreprocessConfig
) -> tuple[np.ndarray, tuple[int, int, int, int], int]:
    """One canonical HU volume -> (stack, crop box, crop side). Resizing happens in HU, windowing after.

    Works through the volume `_CHUNK_SLICES` slices at a time (every step is per slice, so the result does not
    depend on the chunking); int16 volumes from ingest may be memory-mapped.
    """
    box = crop_box_for(hu, cfg)
    side = box[1] - box[0]
    size = cfg.size or side
    z = hu.shape[0]
    channels = len(channel_names(cfg))
    dtype = np.float16 if cfg.normalisation == "zscore" else np.uint8
    stack = np.empty((z, 5, channels, size, size) if cfg.five_cut else (z, channels, size, size), dtype=dtype)
    for i in range(0, z, _CHUNK_SLICES):
        _preprocess_slices(hu[i : i + _CHUNK_SLICES], box, cfg, stack[i : i + _CHUNK_SLICES])
    return stack, box, side


def _preprocess_slices(
    hu: np.ndarray, box: tuple[int, int, int, int], cfg: PreprocessConfig, out: np.ndarray
) -> None:
    """A few slices -> their rows of the stack (`out`): crop, resize or 5-cut tiles, normalise. Windows read
    the crop (a view of the volume) directly and resize and window in one pass (`resize_windows_uint8`);
    the other paths cast the crop to float32 first."""
    if cfg.normalisation == "windows" and not cfg.five_cut:
        resize_windows_uint8(crop_to_box(hu, box, pad_value=AIR_HU), cfg.size, resolve_windows(cfg), out=out)
        return
    cropped = np.asarray(crop_to_box(hu, box, pad_value=AIR_HU), dtype=np.float32)
    side = cropped.shape[-1]
    size = cfg.size or side
    if cfg.five_cut:
        from slicefm.preprocess.tiling import five_cut_boxes, tile_slices  # torch: only DALE-CT's tiles

        tiles = tile_slices(cropped, five_cut_boxes((0, side, 0, side)), size)  # [z, 5, H, W]
        z, t = tiles.shape[:2]
        flat = normalise(tiles.reshape(z * t, size, size), cfg)
        out[...] = flat.reshape(z, t, *flat.shape[1:])
        return
    normalise(resize_hu_slices(cropped, cfg.size), cfg, out=out)


def resize_masks(
    masks: dict[str, np.ndarray], box: tuple[int, int, int, int], size: int | None
) -> dict[str, np.ndarray]:
    """Label masks [z, y, x] -> the stack's frame: same crop (padded with 0), nearest-neighbour resize."""
    out = {}
    for name, mask in masks.items():
        cropped = np.ascontiguousarray(crop_to_box(mask.astype(np.uint8), box, pad_value=0))
        if size is not None and cropped.shape[-1] != size:
            rows, cols = _nearest_exact(cropped.shape[-2], size), _nearest_exact(cropped.shape[-1], size)
            # take() keeps C order (chained fancy indexing does not, and the training loader then reads
            # every row of the saved mask strided: measured ~4x slower slab reads).
            cropped = cropped.take(rows, axis=1).take(cols, axis=2)
        out[name] = cropped
    return out


def _nearest_exact(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel for nearest-neighbour resizing with half-pixel centres (torch's
    "nearest-exact", Pillow's NEAREST): ``min(floor((i + 0.5) * n_in / n_out), n_in - 1)``."""
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.intp), n_in - 1)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _scan_task(args: tuple) -> tuple[str, pd.DataFrame | None]:
    """Process one scan of an ingest output (worker process). Returns its id and slice rows (None: skipped)."""
    scan, lesions, in_uri, out_uri, cfg_json, skip_done = args
    cfg = PreprocessConfig.model_validate_json(cfg_json)
    out = open_store(out_uri)
    scan_id = scan["scan_id"]
    if skip_done and out.exists(stack_key(scan_id, shard_of(scan_id, cfg.n_shards))) and out.exists(
        f"index/{scan_id}.parquet"
    ):
        return scan_id, None
    vol_store = open_store(in_uri)
    local = vol_store.local_path(scan["volume"])
    hu16 = np.load(local, mmap_mode="r") if local is not None else vol_store.read_npy(scan["volume"])
    masks = None
    if vol_store.exists(mask_key := f"masks/{scan_id}.npz"):
        masks = masks_from_npz(vol_store.read_bytes(mask_key))
    return scan_id, preprocess_scan(scan_id, float(scan["spacing_z_mm"]), hu16, lesions, masks, out, cfg)


def masks_from_npz(npz_bytes: bytes) -> dict[str, np.ndarray]:
    """Every array of a masks/<scan>.npz file."""
    with np.load(io.BytesIO(npz_bytes)) as npz:
        return {k: npz[k] for k in npz.files}


def preprocess_scan(
    scan_id: str,
    spacing_z_mm: float,
    hu: np.ndarray,
    lesions: list[dict],
    masks: dict[str, np.ndarray] | None,
    out: Store,
    cfg: PreprocessConfig,
) -> pd.DataFrame:
    """One canonical int16 HU volume -> its stack, index rows, crop record (and resized masks) in `out`.

    `lesions`: dicts with key_slice, x0, y0, x1, y1 (input pixels) and lesion_type. Returns the index rows.
    The stack is written first and the index second: the index's presence marks the scan finished.
    """
    shard = shard_of(scan_id, cfg.n_shards)
    key = stack_key(scan_id, shard)
    stack, box, side = preprocess_volume(hu, cfg)
    n = hu.shape[0]
    z_mm = np.arange(n, dtype=np.float64) * spacing_z_mm
    boxes: list[list] = [[] for _ in range(n)]
    out_size = cfg.size or side
    for les in lesions:
        mapped = map_box_to_output(
            np.array([[les["x0"], les["y0"], les["x1"], les["y1"]]]), box, out_size, side
        )[0]
        boxes[int(les["key_slice"])].append([round(float(v), 2) for v in mapped] + [int(les["lesion_type"])])
    rows = pd.DataFrame(
        {
            "scan_id": scan_id,
            "slice_index": np.arange(n),
            "z_mm": z_mm,
            "slab_id": slab_ids(z_mm, cfg.slab_mm),
            "shard": shard,
            "stack": key,
            "row": np.arange(n),
            "is_key_slice": [bool(b) for b in boxes],
            "lesion_boxes": [json.dumps(b) if b else "[]" for b in boxes],  # json.dumps([]) == "[]"
        }
    )
    if masks is not None:
        out.write_bytes(f"masks/{scan_id}.npz", _npz_bytes(resize_masks(masks, box, cfg.size)))
    out.write_npy(key, stack)
    out.write_parquet(f"index/{scan_id}.parquet", rows)
    crop_info = {
        "scan_id": scan_id,
        "crop_y0": box[0],
        "crop_y1": box[1],
        "crop_x0": box[2],
        "crop_x1": box[3],
        "crop_side": side,
    }
    out.write_json(f"index/{scan_id}.crop.json", crop_info)
    return rows


def run_preprocess(
    scans_uri: str, out_uri: str, cfg: PreprocessConfig, resume: bool = True
) -> PreprocessResult:
    """Preprocess every scan of an ingest output into slice stacks (skips finished scans when resume)."""
    in_store, out = open_store(scans_uri), open_store(out_uri)
    scans = read_scans(in_store)
    require_volumes(scans, in_store)
    lesions = read_lesions(in_store)
    by_scan = {sid: g.to_dict("records") for sid, g in lesions.groupby("scan_id")}
    cfg_json = cfg.model_dump_json()
    # Finished scans are kept only when made from the same ingest output with the same settings.
    resume = may_resume(out, "preprocess", preprocess_identity(in_store, cfg)) and resume
    tasks = [
        (row, by_scan.get(row["scan_id"], []), in_store.uri(""), out.uri(""), cfg_json, resume)
        for row in scans.to_dict("records")
    ]
    if cfg.workers > 1 and len(tasks) > 1:
        with process_pool(cfg.workers, preload=(__name__,)) as pool:  # torch and data.ingest with it
            results = list(
                tqdm(pool.map(_scan_task, tasks), total=len(tasks), desc="preprocess", unit="scan")
            )
    else:
        results = [_scan_task(t) for t in tqdm(tasks, desc="preprocess", unit="scan")]
    skipped = sum(1 for _, rows in results if rows is None)
    return finish_preprocess(in_store, out, cfg, skipped)


def preprocess_identity(in_store: Store, cfg: PreprocessConfig) -> dict:
    """What a preprocess output is made from: the settings (not the worker count) and the ingest manifest."""
    return {
        "config": cfg.model_dump(mode="json", exclude={"workers"}),
        "scans_manifest_sha256": hashlib.sha256(in_store.read_bytes("scans.parquet")).hexdigest(),
    }


class MissingVolumesError(ValueError):
    """An ingest output without canonical volumes was given where the volumes are read."""


def require_volumes(scans: pd.DataFrame, in_store: Store) -> None:
    """Refuse an ingest output written without canonical volumes (the fused step's default)."""
    if len(scans) and (scans["volume"] == "").any():
        raise MissingVolumesError(
            f"{in_store.uri('')} was written without canonical volumes (by `slicefm ingest --preprocess-out` "
            "or the pipeline's ingest-preprocess step, with ingest.keep_volumes false): preprocess the raw data "
            "in that one pass again, or ingest it with `slicefm ingest` (or `--keep-volumes`) to keep them"
        )


def finish_preprocess(in_store: Store, out: Store, cfg: PreprocessConfig, skipped: int = 0) -> PreprocessResult:
    """The stage's manifests once the stack and index of every scan in the ingest manifest are written:
    slices.parquet (from the per-scan indexes), the ingest manifests it was made from, class names of the
    masks, preprocess.json."""
    scans = read_scans(in_store)
    lesions = read_lesions(in_store)
    slices = _collect(out, scans["scan_id"].tolist())
    out.write_parquet("slices.parquet", slices)
    out.write_parquet("scans.parquet", scans)
    out.write_parquet("lesions.parquet", lesions)
    for name in ("organ_classes.json", "finding_classes.json"):
        if in_store.exists(f"masks/{name}"):
            out.write_bytes(f"masks/{name}", in_store.read_bytes(f"masks/{name}"))
    meta = {
        "config": cfg.model_dump(mode="json"),
        "channels": channel_names(cfg),
        "dtype": "float16" if cfg.normalisation == "zscore" else "uint8",
        "layout": "[slice, tile, channel, H, W]" if cfg.five_cut else "[slice, channel, H, W]",
        "n_scans": len(scans),
        "n_slices": len(slices),
        "source": in_store.uri(""),
        "pseudonym_key_fingerprint": _key_fingerprint(in_store),
    }
    out.write_json("preprocess.json", meta)
    log.info(
        "preprocessed %d scans (%d skipped as finished), %d slices",
        len(scans) - skipped,
        skipped,
        len(slices),
    )
    return PreprocessResult(out.uri(""), len(scans), skipped, len(slices), meta["channels"])


def _key_fingerprint(scans: Store) -> str | None:
    """The pseudonymisation key fingerprint ingest recorded in dataset.json (None for older outputs)."""
    return (
        scans.read_json("dataset.json").get("pseudonym_key_fingerprint")
        if scans.exists("dataset.json")
        else None
    )


def _collect(out: Store, scan_ids: list[str]) -> pd.DataFrame:
    frames = [out.read_parquet(f"index/{sid}.parquet") for sid in scan_ids]
    if not frames:
        return validate(
            pd.DataFrame(columns=list(SlicesSchema.to_schema().columns)), SlicesSchema, "slices.parquet"
        )
    return validate(pd.concat(frames, ignore_index=True), SlicesSchema, "slices.parquet")


def read_slices(store: Store) -> pd.DataFrame:
    return validate(store.read_parquet("slices.parquet"), SlicesSchema, store.uri("slices.parquet"))


__all__ = ["MissingVolumesError", "run_preprocess", "preprocess_volume", "preprocess_scan", "finish_preprocess", "read_slices", "PreprocessResult"]
