"""NIfTI CT volumes (.nii, .nii.gz; e.g. CT-RATE) -> canonical HU Volume."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from slicefm.io.orientation import check_spacing_mm, reorient_to_canonical
from slicefm.io.volume import InvalidScanError, Volume

logger = logging.getLogger(__name__)

# Everything nibabel / gzip / numpy raise on unreadable, truncated or corrupt files.
_READ_ERRORS = (ImageFileError, OSError, EOFError, ValueError, zlib.error, MemoryError)


def read_nifti(
    path: Path,
    spacing_override_mm: tuple[float, float, float] | None = None,
    rescale: tuple[float, float] | None = None,
) -> Volume:
    """Read a NIfTI CT into a canonical Volume (HU, float32).

    The header's scl_slope/scl_inter are applied exactly once (by nibabel's scaled data proxy).
    `rescale=(slope, intercept)` is an extra stored->HU mapping for files whose values are raw
    stored values (CT-RATE gives it in its metadata CSV). `spacing_override_mm` is (z, y, x) in the
    canonical frame and replaces the header spacing. Raises InvalidScanError with a clear reason.
    """
    source = str(path)
    try:
        img = nib.load(str(path))
    except _READ_ERRORS as exc:
        raise InvalidScanError(source, f"unreadable NIfTI: {type(exc).__name__}: {exc}") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InvalidScanError(source, f"not a NIfTI image ({type(img).__name__})")

    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        raise InvalidScanError(source, f"expected 3-D data (or 4-D with one volume), got shape {shape}")
    if min(shape[:3]) < 1:
        raise InvalidScanError(source, f"empty volume, shape {shape}")
    if rescale is not None:
        # nibabel moves scl_slope/scl_inter from the loaded header onto the data proxy.
        slope = float(getattr(img.dataobj, "slope", 1.0))
        inter = float(getattr(img.dataobj, "inter", 0.0))
        if slope != 1.0 or inter != 0.0:
            # Both the header and the caller rescale: almost certainly a double HU conversion.
            logger.warning(
                "%s: header scl_slope/scl_inter (%s, %s) and an extra rescale are both applied",
                source,
                slope,
                inter,
            )
    if img.header.get_sform(coded=True)[1] == 0 and img.header.get_qform(coded=True)[1] == 0:
        logger.warning("%s: no sform/qform; orientation taken from nibabel's default affine", source)

    try:
        # dataobj applies scl_slope/scl_inter; reading it once (no get_fdata on top) scales once.
        data = np.asarray(img.dataobj, dtype=np.float32)
    except _READ_ERRORS as exc:
        raise InvalidScanError(source, f"truncated/corrupt NIfTI data: {type(exc).__name__}: {exc}") from exc
    data = data.reshape(shape[:3])
    n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if n_bad:
        raise InvalidScanError(source, f"{n_bad} non-finite voxels (NaN/inf)")
    if rescale is not None:
        slope_hu, intercept_hu = (float(v) for v in rescale)
        data *= np.float32(slope_hu)
        data += np.float32(intercept_hu)

    try:
        hu, spacing = reorient_to_canonical(data, img.affine, frame="RAS")
        if spacing_override_mm is not None:
            spacing = check_spacing_mm(spacing_override_mm)
        else:
            spacing = check_spacing_mm(spacing)
    except ValueError as exc:
        raise InvalidScanError(source, str(exc)) from exc
    logger.debug("%s: read NIfTI shape %s spacing %s", source, hu.shape, spacing)
    return Volume(hu=hu, spacing_mm=spacing, source=source, fmt="nifti")
