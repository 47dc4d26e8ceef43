"""RAD-ChestCT .npz volumes -> Volume.

Assumption (from the published dataset, not verifiable from the file): the array under 'ct' holds
HU, is indexed [z, y, x] and is already in the canonical orientation of slicefm.io.volume (slice 0
inferior, row 0 anterior, column 0 patient right), resampled to 0.8 mm isotropic. Nothing is
flipped here; if a source breaks this, reorient before calling.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np

from slicefm.io.orientation import check_spacing_mm
from slicefm.io.volume import InvalidScanError, Volume

logger = logging.getLogger(__name__)


def read_npz_volume(
    path: Path, key: str = "ct", spacing_mm: tuple[float, float, float] = (0.8, 0.8, 0.8)
) -> Volume:
    """Read the HU array under `key` of a .npz file as a Volume(fmt="npz"); `spacing_mm` is (z, y, x)."""
    source = str(path)
    try:
        spacing = check_spacing_mm(spacing_mm)
    except ValueError as exc:
        raise InvalidScanError(source, str(exc)) from exc
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise InvalidScanError(source, "not a .npz archive (a bare .npy array?)")
        with archive:
            if key not in archive.files:
                raise InvalidScanError(source, f"missing array {key!r} (keys: {sorted(archive.files)})")
            data = archive[key]
    except InvalidScanError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InvalidScanError(source, f"unreadable .npz: {type(exc).__name__}: {exc}") from exc

    if data.ndim != 3:
        raise InvalidScanError(source, f"expected a 3-D [z, y, x] array, got shape {data.shape}")
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise InvalidScanError(source, f"array {key!r} has non-numeric dtype {data.dtype}")
    hu = np.ascontiguousarray(data, dtype=np.float32)
    n_bad = int(hu.size - np.count_nonzero(np.isfinite(hu)))
    if n_bad:
        raise InvalidScanError(source, f"{n_bad} non-finite voxels (NaN/inf)")
    logger.debug("%s: read npz shape %s", source, hu.shape)
    return Volume(hu=hu, spacing_mm=spacing, source=source, fmt="npz")
