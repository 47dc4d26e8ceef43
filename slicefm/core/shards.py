"""Slice stacks on the artifact store: one .npy per scan, grouped into shard folders.

The format between preprocess, which writes it, and train and embed, which read it: it sits in the bottom
layer so its readers do not depend on the preprocess stage.

A stack is [n_slices, C, H, W] (or [n_slices, 5, C, H, W] with 5-cut tiles), uint8 for HU windows or
float16 for z-scored input. Stacks are plain .npy so a local reader memory-maps them and an S3
reader fetches a single slice with one byte-range GET (Store.read_npy_rows).
"""

from __future__ import annotations

import numpy as np

from slicefm.core.store import NpyHeader, Store


def shard_of(scan_id: str, n_shards: int) -> int:
    """Stable shard assignment from the pseudonymous ID (same scan -> same shard on every run)."""
    return int(scan_id[1:], 16) % n_shards


def stack_key(scan_id: str, shard: int) -> str:
    return f"shards/shard-{shard:03d}/{scan_id}.npy"


class StackReader:
    """Reads whole stacks or single slices from a preprocess output (local or s3://)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._headers: dict[str, NpyHeader] = {}

    def read_stack(self, key: str) -> np.ndarray:
        return self.store.read_npy(key, mmap=True)

    def read_slice(self, key: str, row: int) -> np.ndarray:
        local = self.store.local_path(key)
        if local is not None:
            return np.array(np.load(local, mmap_mode="r")[row])
        if key not in self._headers:
            self._headers[key] = self.store.read_npy_header(key)
        return self.store.read_npy_rows(key, row, row + 1, self._headers[key])[0]

    def read_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one stack as an array: one memory map or one byte-range GET."""
        local = self.store.local_path(key)
        if local is not None:
            return np.array(np.load(local, mmap_mode="r")[start:stop])
        if key not in self._headers:
            self._headers[key] = self.store.read_npy_header(key)
        return self.store.read_npy_rows(key, start, stop, self._headers[key])
