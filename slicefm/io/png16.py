"""DeepLesion 16-bit PNG slices -> Volume (HU = stored value - 32768)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from slicefm.io.orientation import check_spacing_mm
from slicefm.io.volume import InvalidScanError, Volume

logger = logging.getLogger(__name__)

HU_OFFSET = 32768  # DeepLesion stores HU + 32768 as uint16
_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def read_png_slices(paths: list[Path], spacing_mm: tuple[float, float, float]) -> Volume:
    """Stack DeepLesion PNG slices into a Volume(fmt="deeplesion").

    Slices are stacked in the given list order, which the caller guarantees is inferior -> superior
    (DeepLesion names slices by index; nothing here sorts them). `spacing_mm` is (z, y, x).
    """
    paths = [Path(p) for p in paths]
    source = os.path.commonpath([str(p.parent) for p in paths]) if paths else "<no slices>"
    if not paths:
        raise InvalidScanError(source, "no PNG slices given")
    try:
        spacing = check_spacing_mm(spacing_mm)
    except ValueError as exc:
        raise InvalidScanError(source, str(exc)) from exc

    slices = [_read_png16(path, source) for path in paths]
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        shown = ", ".join("x".join(map(str, s)) for s in sorted(shapes))
        raise InvalidScanError(source, f"slices differ in shape ({shown})")
    hu = np.stack(slices).astype(np.float32)
    logger.debug("%s: read %d PNG slices", source, len(slices))
    return Volume(hu=hu, spacing_mm=spacing, source=source, fmt="deeplesion")


def _read_png16(path: Path, source: str) -> np.ndarray:
    """One slice as int32 HU (int32 so the offset subtraction cannot wrap around as uint16 would)."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            stored = np.asarray(img).astype(np.int32) if mode in _16BIT_MODES else None
    except (OSError, SyntaxError, UnidentifiedImageError, ValueError) as exc:
        # Pillow reports a cut-short PNG as OSError and a broken chunk as SyntaxError.
        raise InvalidScanError(source, f"{path.name}: unreadable PNG: {exc}") from exc
    if stored is None:
        raise InvalidScanError(source, f"{path.name}: not a 16-bit grayscale PNG (mode {mode})")
    if stored.ndim != 2:
        raise InvalidScanError(source, f"{path.name}: expected a 2-D slice, got shape {stored.shape}")
    if stored.min() < 0 or stored.max() > 65535:  # mode "I" could hold any int32
        raise InvalidScanError(source, f"{path.name}: values outside the uint16 range")
    return stored - HU_OFFSET


def write_png16(path: Path, hu_slice: np.ndarray) -> None:
    """Write one HU slice as a DeepLesion-style 16-bit PNG (inverse of the reader); HU is rounded."""
    hu = np.rint(np.asarray(hu_slice, dtype=np.float64))
    if hu.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {hu.shape}")
    if not np.isfinite(hu).all() or hu.min() < -HU_OFFSET or hu.max() > 65535 - HU_OFFSET:
        raise ValueError(f"HU must be finite and within [{-HU_OFFSET}, {65535 - HU_OFFSET}]")
    Image.fromarray((hu + HU_OFFSET).astype(np.uint16)).save(path, format="PNG")
