"""NIfTI-1 volumes: int16 HU (or stored values) with a RAS affine, as .nii or deterministic .nii.gz."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from slicefm.phantom.records import PhantomScan
from slicefm.phantom.writers.files import write_bytes


def nifti_bytes(data_zyx: np.ndarray, spacing_zyx: Sequence[float], origin_lps: Sequence[float]) -> bytes:
    """Single-file NIfTI-1 bytes of a canonical [z, y, x] int16 array with a RAS affine."""
    dz, dy, dx = (float(v) for v in spacing_zyx)
    x0, y0, z0 = (float(v) for v in origin_lps)
    # Canonical axes point to +L, +P, +S; RAS flips the first two, hence the negative x/y diagonal.
    affine = np.array([[-dx, 0, 0, -x0], [0, -dy, 0, -y0], [0, 0, dz, z0], [0, 0, 0, 1]], dtype=np.float64)
    img = nib.Nifti1Image(np.ascontiguousarray(data_zyx.transpose(2, 1, 0)), affine)
    img.header.set_data_dtype(np.int16)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    raw = bytearray(img.to_bytes())
    # nibabel writes scl_slope = NaN ("no scaling") for unscaled int16; store the explicit 1 / 0
    # many CT pipelines expect. scl_slope and scl_inter are float32 at header bytes 112 and 116.
    struct.pack_into(img.header.endianness + "ff", raw, 112, 1.0, 0.0)
    return bytes(raw)


def write_nii(path: Path, nii: bytes) -> Path:
    """Write NIfTI bytes as .nii, or gzipped (mtime 0) as .nii.gz, by the file name."""
    path = Path(path)
    if path.name.endswith(".nii.gz"):
        return write_bytes(path, gzip.compress(nii, compresslevel=6, mtime=0))
    if path.suffix == ".nii":
        return write_bytes(path, nii)
    raise ValueError(f"{path}: expected a .nii or .nii.gz file name")


def write_nifti(scan: PhantomScan, path: Path) -> Path:
    """Write `scan` as int16 HU NIfTI (.nii or .nii.gz by suffix) with its true RAS affine."""
    return write_nii(path, nifti_bytes(scan.hu, scan.spacing_mm, scan.origin_lps))
