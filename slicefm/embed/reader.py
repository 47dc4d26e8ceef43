"""Read an extraction output back as bags: per scan, windows concatenated along the slice axis."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from slicefm.core.store import Store, open_store
from slicefm.embed.extract import EXTRACT_FORMAT_VERSION, STACKED_WINDOW


@dataclass
class Bag:
    """One scan's instances: x [n, d] float16, and per instance its window index, z (mm) and key-slice flag."""

    scan_id: str
    x: np.ndarray
    window_index: np.ndarray
    z_mm: np.ndarray
    is_key: np.ndarray

    @property
    def key_instances(self) -> list[int]:
        return np.flatnonzero(self.is_key).tolist()


class EmbeddingSet:
    """An `extract` output (or a merge of sharded ones): the index, the encoder info and the tables."""

    def __init__(self, uri: str) -> None:
        self.store: Store = open_store(uri)
        self.meta = self.store.read_json("extract.json")
        if self.meta.get("format_version") != EXTRACT_FORMAT_VERSION:
            raise ValueError(
                f"{self.store.uri('extract.json')}: format {self.meta.get('format_version')}, "
                f"expected {EXTRACT_FORMAT_VERSION}"
            )
        self.index = self.store.read_parquet("embeddings.parquet").set_index(["scan_id", "window"])
        self._roots: dict[str, Store] = {}

    @property
    def label(self) -> str:
        return str(self.meta["encoder"]["label"])

    @property
    def windows(self) -> list[str]:
        return list(self.meta["windows"])

    @cached_property
    def scans(self) -> pd.DataFrame:
        return self.store.read_parquet("scans.parquet")

    @cached_property
    def slices(self) -> pd.DataFrame:
        cols = ["scan_id", "row", "z_mm", "is_key_slice"]
        return self.store.read_parquet("slices.parquet", columns=cols).sort_values(["scan_id", "row"])

    @cached_property
    def _slices_by_scan(self) -> dict[str, pd.DataFrame]:
        return dict(tuple(self.slices.groupby("scan_id", sort=False)))

    def _root(self, root: str) -> Store:
        if not root:
            return self.store
        if root not in self._roots:
            self._roots[root] = open_store(root)
        return self._roots[root]

    def matrix(self, scan_id: str, window: str) -> np.ndarray:
        """[n_slices, d] float16 embeddings of one scan and window (rows = stack rows, feet to head)."""
        try:
            entry = self.index.loc[(scan_id, window)]
        except KeyError:
            raise KeyError(f"no {window!r} embeddings for scan {scan_id} in {self.store.uri('')}") from None
        return self._root(str(entry["root"])).read_npy(str(entry["key"]))

    def resolve_windows(self, windows: list[str] | None) -> list[str]:
        """The windows a task asks for (None: all), as extracted.

        Per-window sets: the task's windows as given (`bags` refuses any not extracted). Stacked sets (one
        embedding of every channel at once, window "all"): ["all"] when the task asks for all windows (None,
        ["all"] or every channel); any other list is an error (no embedding holds some channels without the
        others), where the set used to widen it to all of them silently."""
        if not windows:
            return self.windows
        if self.windows != [STACKED_WINDOW]:
            return list(windows)
        channels = list(self.meta.get("channels", []))
        if set(windows) in ({STACKED_WINDOW}, set(channels)):
            return [STACKED_WINDOW]
        raise ValueError(
            f"the task asks for windows {list(windows)}, but {self.store.uri('')} holds stacked embeddings: one "
            f"embedding per slice of all channels {channels} at once (window {STACKED_WINDOW!r}), none of the "
            f"windows alone; ask for all windows (none listed, or {channels}) or embed each window on its "
            "own (an encoder with input_channels: per_window)"
        )

    def bags(self, scan_ids: list[str], windows: list[str] | None = None) -> list[Bag]:
        """Bags of the given scans; every window in `windows` (default all) is one run of instances."""
        windows = windows or self.windows
        unknown = sorted(set(windows) - set(self.windows))
        if unknown:
            raise ValueError(f"windows {unknown} not extracted (available: {self.windows})")
        per_scan = self._slices_by_scan
        out = []
        for sid in scan_ids:
            mats = [self.matrix(sid, w) for w in windows]
            meta = per_scan.get(sid)
            n = mats[0].shape[0]
            z = meta["z_mm"].to_numpy(float) if meta is not None else np.arange(n, dtype=float)
            key = meta["is_key_slice"].to_numpy(bool) if meta is not None else np.zeros(n, bool)
            if z.size != n:
                raise ValueError(f"scan {sid}: {n} embeddings but {z.size} slices in slices.parquet")
            out.append(
                Bag(
                    sid,
                    np.concatenate(mats, axis=0),
                    np.repeat(np.arange(len(windows)), [m.shape[0] for m in mats]),
                    np.tile(z, len(windows)),
                    np.tile(key, len(windows)),
                )
            )
        return out
