"""Frozen-encoder embedding extraction: every slice of every scan, per window (and 5-cut tile).

Output (a directory or s3://):
- `embeddings/<window>/<scan_id>.npy`: float16 [n_slices, d] (d = tiles x embed_dim with 5-cut tiles);
- `patches/<window>/<scan_id>.npy`: float16 [n_slices, tiles x n_patches, embed_dim] when configured;
- `embeddings.parquet`: the index (scan_id, window, key, n_slices, dim, patches_key, root);
- `extract.json`: the encoder (EncoderInfo), windows, config; copies of scans/slices/lesions.parquet.

Slices of many scans share a batch (reads come in chunks from DataLoader workers, so reading overlaps
compute); chunks go to the device as stored (uint8) and become float encoder inputs there; bf16 autocast
on CUDA. Finished scans are skipped on a re-run; `shard_index`/`n_shards` pick a stable subset of scans so
the pipeline can fan extraction out, and `merge_extracts` joins the parts.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from slicefm.core.resume import may_resume
from slicefm.core.shards import shard_of
from slicefm.core.store import Store, open_store
from slicefm.embed.config import ExtractConfig
from slicefm.embed.sources import EncoderInfo
from slicefm.models.encoders import Encoder

log = logging.getLogger(__name__)

EXTRACT_FORMAT_VERSION = 1
STACKED_WINDOW = "all"  # the window name of embeddings made from every channel at once
TABLES = ("scans.parquet", "slices.parquet", "lesions.parquet")


def windows_for(channels: list[str], input_channels: str) -> list[str]:
    return list(channels) if input_channels == "per_window" else [STACKED_WINDOW]


def embedding_key(window: str, scan_id: str) -> str:
    return f"embeddings/{window}/{scan_id}.npy"


def patches_key(window: str, scan_id: str) -> str:
    return f"patches/{window}/{scan_id}.npy"


@dataclass
class ExtractResult:
    out_uri: str
    label: str
    n_scans: int
    n_skipped: int  # finished by an earlier run
    n_slices: int  # slices embedded by this run
    windows: list[str]
    embed_dim: int
    seconds: float
    slices_per_s: float
    info: dict = field(default_factory=dict)


class _Chunks(Dataset):
    """Item i = rows [start, stop) of one scan's stack, read in one request (mmap locally, one GET on S3)."""

    def __init__(self, store: Store, items: list[tuple[int, str, int, int]]) -> None:
        self.store, self.items = store, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        scan, key, start, stop = self.items[i]
        local = self.store.local_path(key)
        if local is not None:
            rows = np.array(np.load(local, mmap_mode="r")[start:stop])
        else:
            rows = self.store.read_npy_rows(key, start, stop)
        return {"scan": scan, "start": start, "stop": stop, "x": torch.from_numpy(rows)}


def encoder_inputs(x: torch.Tensor, input_channels: str, in_chans: int) -> list[torch.Tensor]:
    """A chunk [k, C, H, W] or [k, T, C, H, W] -> one float tensor [k * T, in_chans, H, W] per window.

    uint8 windows scale to [0, 1] (as in pretraining); float16 z-scores pass through. Per window, the
    single channel is repeated to `in_chans` (grey image for 3-channel timm backbones).
    """
    if x.ndim == 4:
        x = x.unsqueeze(1)
    k, t, c, h, w = x.shape
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if input_channels == "stacked":
        if c != in_chans:
            raise ValueError(f"the encoder takes {in_chans} channels, the slices have {c}")
        return [x.reshape(k * t, c, h, w)]
    return [x[:, :, i : i + 1].expand(k, t, in_chans, h, w).reshape(k * t, in_chans, h, w) for i in range(c)]


class _Embedder:
    """Batches images of many scans through the encoder in arrival order (FIFO) at a fixed batch size."""

    def __init__(self, encoder: Encoder, batch_size: int, device: torch.device, bf16: bool, tokens: bool):
        self.encoder, self.batch_size, self.device = encoder, batch_size, device
        self.bf16, self.tokens = bf16, tokens
        self.pending: deque[torch.Tensor] = deque()
        self.n_pending = 0

    def add(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        self.pending.append(images)
        self.n_pending += images.shape[0]
        out = []
        while self.n_pending >= self.batch_size:
            out.append(self._run(self._take(self.batch_size)))
        return out

    def flush(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [self._run(self._take(self.n_pending))] if self.n_pending else []

    def _take(self, n: int) -> torch.Tensor:
        parts, need = [], n
        while need:
            head = self.pending[0]
            if head.shape[0] <= need:
                parts.append(self.pending.popleft())
                need -= head.shape[0]
            else:
                parts.append(head[:need])
                self.pending[0] = head[need:]
                need = 0
        self.n_pending -= n
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    @torch.inference_mode()
    def _run(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch = batch.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if self.tokens:
                pooled, patches = self.encoder.forward_tokens(batch)
            else:
                pooled, patches = self.encoder(batch), None
        pooled = pooled.to(torch.float16).cpu()
        return pooled, (patches.to(torch.float16).cpu() if patches is not None else None)


def _device_and_precision(precision: str) -> tuple[torch.device, bool]:
    if torch.cuda.is_available():
        return torch.device("cuda"), precision in ("auto", "bf16")
    return torch.device("cpu"), precision == "bf16"


def _scan_table(pre: Store, shard_index: int, n_shards: int) -> pd.DataFrame:
    slices = pre.read_parquet("slices.parquet", columns=["scan_id", "stack", "row"])
    per_scan = slices.groupby("scan_id", sort=True).agg(stack=("stack", "first"), n=("row", "max"))
    per_scan["n"] += 1
    per_scan = per_scan.reset_index()
    mine = per_scan["scan_id"].map(lambda s: shard_of(s, n_shards) == shard_index)
    return per_scan[mine].reset_index(drop=True)


def run_extract(
    preprocessed_uri: str,
    out_uri: str,
    encoder: Encoder,
    info: EncoderInfo,
    cfg: ExtractConfig,
    shard_index: int = 0,
    n_shards: int = 1,
) -> ExtractResult:
    """Embed every slice of this shard's scans with the frozen `encoder`; skips scans already written."""
    if not 0 <= shard_index < n_shards:
        raise ValueError(f"shard_index {shard_index} not in [0, {n_shards})")
    pre, out = open_store(preprocessed_uri), open_store(out_uri)
    meta = pre.read_json("preprocess.json")
    windows = windows_for(list(meta["channels"]), info.input_channels)
    scans = _scan_table(pre, shard_index, n_shards)
    # Finished scans are kept only when embedded by the same encoder, from the same slices, the same way.
    identity = {
        "encoder": asdict(info),
        "slices_sha256": hashlib.sha256(pre.read_bytes("slices.parquet")).hexdigest(),
        "config": cfg.model_dump(mode="json", include={"precision", "patch_tokens", "input_channels"}),
        "windows": windows,
    }
    existing = set()
    if may_resume(out, f"extract-{shard_index}-of-{n_shards}", identity):
        existing = set(out.list("embeddings/")) | (set(out.list("patches/")) if cfg.patch_tokens else set())

    def finished(scan_id: str) -> bool:
        keys = [embedding_key(w, scan_id) for w in windows]
        keys += [patches_key(w, scan_id) for w in windows] if cfg.patch_tokens else []
        return all(k in existing for k in keys)

    done_mask = scans["scan_id"].map(finished).to_numpy(bool)
    todo = scans[~done_mask].reset_index(drop=True)
    items = [
        (i, str(r.stack), s, min(s + cfg.chunk_slices, int(r.n)))
        for i, r in enumerate(todo.itertuples())
        for s in range(0, int(r.n), cfg.chunk_slices)
    ]
    device, bf16 = _device_and_precision(cfg.precision)
    encoder = encoder.to(device).eval()
    if device.type == "cuda" and not encoder.is_vit:
        encoder = encoder.to(memory_format=torch.channels_last)
    embedder = _Embedder(encoder, cfg.batch_size, device, bf16, cfg.patch_tokens)
    t0 = time.perf_counter()
    n_slices = _embed_all(pre, out, todo, items, windows, info, cfg, embedder, device)
    seconds = time.perf_counter() - t0
    _write_index(pre, out, scans, windows, info, cfg, meta, shard_index, n_shards)
    log.info(
        "extracted %s embeddings of %d scans (%d already done), %d slices in %.1f s",
        info.label, len(todo), int(done_mask.sum()), n_slices, seconds,
    )  # fmt: skip
    return ExtractResult(
        out.uri(""), info.label, len(scans), int(done_mask.sum()), n_slices, windows, info.embed_dim,
        seconds, n_slices / seconds if seconds > 0 and n_slices else 0.0, asdict(info),
    )  # fmt: skip


def _embed_all(
    pre: Store,
    out: Store,
    todo: pd.DataFrame,
    items: list[tuple[int, str, int, int]],
    windows: list[str],
    info: EncoderInfo,
    cfg: ExtractConfig,
    embedder: _Embedder,
    device: torch.device,
) -> int:
    """Feed every chunk through the embedder; write each scan as soon as all its rows are embedded."""
    if not items:
        return 0
    loader_kwargs: dict[str, Any] = {}
    if cfg.workers > 0:
        # Workers fork from a server that imported this module (torch, pandas, timm) once. Without the
        # preload each worker imports them itself before its first chunk: ~5 s of CPU per worker per run on
        # a 2-core host (Python 3.11's own "__main__" preload never takes effect for forkserver).
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        loader_kwargs.update(multiprocessing_context=ctx, prefetch_factor=4)
    loader = DataLoader(
        _Chunks(pre, items), batch_size=None, shuffle=False, num_workers=min(cfg.workers, len(items)),
        pin_memory=device.type == "cuda", **loader_kwargs,
    )  # fmt: skip
    n_windows = len(windows)
    pooled: dict[int, list[np.ndarray]] = {}
    patches: dict[int, list[np.ndarray]] = {}
    filled: dict[int, int] = {}
    # FIFO of (scan, window, start, stop, tiles): outputs come back in the order images went in.
    segments: deque[tuple[int, int, int, int, int]] = deque()
    carry: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    n_done = 0

    def consume(outputs: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        nonlocal n_done
        carry.extend(outputs)
        while segments:
            scan, w, start, stop, tiles = segments[0]
            need = (stop - start) * tiles
            if sum(p.shape[0] for p, _ in carry) < need:
                return
            segments.popleft()
            got_p, got_t, rest = [], [], need
            while rest:
                p, t = carry[0]
                take = min(rest, p.shape[0])
                got_p.append(p[:take])
                got_t.append(t[:take] if t is not None else None)
                if take == p.shape[0]:
                    carry.pop(0)
                else:
                    carry[0] = (p[take:], t[take:] if t is not None else None)
                rest -= take
            emb = torch.cat(got_p).reshape(stop - start, -1).numpy()
            pooled[scan][w][start:stop] = emb
            if cfg.patch_tokens:
                if got_t[0] is None:
                    raise ValueError(f"{info.name} has no patch tokens; set extract.patch_tokens: false")
                tok = torch.cat(got_t).reshape(stop - start, -1, got_t[0].shape[-1]).numpy()  # type: ignore[arg-type]
                if patches[scan][w] is None:
                    patches[scan][w] = np.empty((int(todo.at[scan, "n"]), *tok.shape[1:]), np.float16)
                patches[scan][w][start:stop] = tok
            filled[scan] += stop - start
            if filled[scan] == int(todo.at[scan, "n"]) * n_windows:
                _write_scan(
                    out, str(todo.at[scan, "scan_id"]), windows, pooled.pop(scan), patches.pop(scan, None)
                )
                n_done += int(todo.at[scan, "n"])

    for chunk in loader:
        scan, start, stop = int(chunk["scan"]), int(chunk["start"]), int(chunk["stop"])
        # Move the chunk as stored (uint8: 1 byte a pixel a window) and make the float, per-window,
        # in_chans-repeated inputs on the device: 12x fewer bytes over PCIe than the float inputs, and the
        # conversion off the one CPU thread that also has to keep the GPU fed. A no-op on CPU.
        x = chunk["x"].to(device, non_blocking=True)
        tiles = x.shape[1] if x.ndim == 5 else 1
        if scan not in pooled:
            n = int(todo.at[scan, "n"])
            pooled[scan] = [np.empty((n, tiles * info.embed_dim), np.float16) for _ in windows]
            filled[scan] = 0
            if cfg.patch_tokens:
                patches[scan] = [None] * n_windows  # type: ignore[list-item]
        for w, images in enumerate(encoder_inputs(x, info.input_channels, info.in_chans)):
            segments.append((scan, w, start, stop, tiles))
            consume(embedder.add(images))
    consume(embedder.flush())
    if segments:
        raise RuntimeError(f"extraction ended with {len(segments)} unfinished segments")
    return n_done


def _write_scan(
    out: Store, scan_id: str, windows: list[str], pooled: list[np.ndarray], patches: list[np.ndarray] | None
) -> None:
    # Patches first, pooled last: a scan counts as finished only when every file exists, and each file is
    # written to a temp name and renamed, so a killed run never leaves a truncated matrix behind.
    for w, name in enumerate(windows):
        if patches is not None:
            out.write_npy(patches_key(name, scan_id), patches[w])
    for w, name in enumerate(windows):
        if not np.isfinite(pooled[w]).all():
            raise ValueError(f"scan {scan_id}, window {name}: non-finite embeddings (overflow in float16?)")
        out.write_npy(embedding_key(name, scan_id), pooled[w])


def _write_index(
    pre: Store,
    out: Store,
    scans: pd.DataFrame,
    windows: list[str],
    info: EncoderInfo,
    cfg: ExtractConfig,
    meta: dict,
    shard_index: int,
    n_shards: int,
) -> None:
    rows = [
        {
            "scan_id": sid,
            "window": w,
            "key": embedding_key(w, sid),
            "n_slices": int(n),
            "dim": int(info.embed_dim * (5 if "tile" in meta.get("layout", "") else 1)),
            "patches_key": patches_key(w, sid) if cfg.patch_tokens else "",
            "root": "",
        }
        for sid, n in zip(scans["scan_id"], scans["n"], strict=True)
        for w in windows
    ]
    for table in TABLES:
        if pre.exists(table):
            out.write_bytes(table, pre.read_bytes(table))
    out.write_parquet("embeddings.parquet", pd.DataFrame(rows, columns=list(_INDEX_COLUMNS)))
    out.write_json(
        "extract.json",
        {
            "format_version": EXTRACT_FORMAT_VERSION,
            "encoder": asdict(info),
            "windows": windows,
            "channels": list(meta["channels"]),
            "layout": meta.get("layout"),
            "preprocessed": pre.uri(""),
            # The preprocessing these embeddings assume: a head trained on them records it (slicefm predict).
            "preprocess": meta.get("config"),
            "pseudonym_key_fingerprint": meta.get("pseudonym_key_fingerprint"),
            "shards": [shard_index] if n_shards > 1 else [0],
            "n_shards": n_shards,
            "config": cfg.model_dump(mode="json"),
        },
    )


_INDEX_COLUMNS = ("scan_id", "window", "key", "n_slices", "dim", "patches_key", "root")


def merge_extracts(part_uris: list[str], out_uri: str) -> str:
    """Join the outputs of sharded extraction tasks into one index at out_uri (matrices stay where they are)."""
    if not part_uris:
        raise ValueError("merge_extracts needs at least one part")
    out = open_store(out_uri)
    frames, metas = [], []
    for uri in part_uris:
        part = open_store(uri)
        df = part.read_parquet("embeddings.parquet")
        df["root"] = [r if r else part.uri("") for r in df["root"]]
        frames.append(df)
        metas.append(part.read_json("extract.json"))
    encoders = {(m["encoder"]["source"], m["encoder"]["name"]) for m in metas}
    if len(encoders) > 1:
        raise ValueError(f"cannot merge embeddings of different encoders: {sorted(encoders)}")
    index = pd.concat(frames, ignore_index=True)
    dup = index.duplicated(["scan_id", "window"])
    if dup.any():
        raise ValueError(f"scans extracted by more than one part: {sorted(index.loc[dup, 'scan_id'])[:5]}")
    first = open_store(part_uris[0])
    for table in TABLES:
        if first.exists(table):
            out.write_bytes(table, first.read_bytes(table))
    merged = dict(metas[0], shards=sorted(s for m in metas for s in m["shards"]))
    out.write_parquet("embeddings.parquet", index)
    out.write_json("extract.json", merged)
    return out.uri("")
