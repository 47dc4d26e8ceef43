"""Atomic, deterministic file primitives the phantom writers share.

Files and directories are written through the artifact store's atomic writes (a temporary sibling, then a
rename: slicefm.core.store) and carry no timestamp, so a seed always gives the same bytes.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from slicefm.core.store import open_store, staged_output


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes `target` on success (removed on failure)."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not an empty directory")
    existed = target.exists()
    if existed:
        target.rmdir()  # empty: the staged directory takes its place
    try:
        # staged_output: readable by other users (the pipeline's uid 1000), not mkdtemp's 0700
        with staged_output(target) as tmp:
            yield Path(tmp)
    except BaseException:
        if existed:
            target.mkdir(exist_ok=True)
        raise


def write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` atomically (the store's temp sibling + rename, mode by the umask)."""
    path = Path(path)
    open_store(path.parent).write_bytes(path.name, data)
    return path


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    """Write a UTF-8 CSV (header, then rows; "\\n" line ends) atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return write_bytes(path, buf.getvalue().encode("utf-8"))


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """np.savez_compressed's format, minus its wall-clock zip timestamps (which break byte equality)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with archive.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def token(*parts: object) -> str:
    """A random-looking but reproducible hex string derived from `parts`."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()


def fmt_decimal(value: float) -> str:
    """`value` with at most 4 decimals and no trailing zeros (DICOM decimal strings, CSV cells)."""
    return f"{value:.4f}".rstrip("0").rstrip(".")
