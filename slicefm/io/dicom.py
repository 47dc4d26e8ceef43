"""CT DICOM: walk a directory tree into series, read one series into a canonical HU Volume.

Slices are ordered by ImagePositionPatient projected on the slice normal, never by file name or
InstanceNumber (both are unreliable across PACS exports). Log messages name paths and reasons only:
patient names and UIDs are PHI and never reach a log.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from slicefm.io.orientation import reorient_to_canonical
from slicefm.io.redact import redact_uids
from slicefm.io.volume import InvalidScanError, Volume

logger = logging.getLogger(__name__)

ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
AIR_HU = -1024.0  # padding and outside-field values (-2000, -3024 ...) are set to air
IOP_TOLERANCE = 1e-4
PIXEL_SPACING_TOLERANCE_MM = 1e-4
AXIAL_MIN_ABS_NZ = 0.9  # |normal . (0, 0, 1)| of an axial series
DUPLICATE_POSITION_MM = 1e-2  # two slices closer than this along the normal are the same position
SPACING_REL_TOLERANCE = 0.10
SPACING_ABS_TOLERANCE_MM = 0.1
# Below this the positions follow the normal (DS rounding noise): a tilt of 0.01 deg shears 0.05 mm over 300 mm.
TILT_TOLERANCE_DEG = 0.01

# Tags the tree walk needs: the grouping key and what sizes the pixel data (truncation check).
_SCAN_TAGS = [
    "SeriesInstanceUID", "SOPClassUID", "Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "NumberOfFrames"
]  # fmt: skip
_INFO_TEXT = ("Manufacturer", "ManufacturerModelName", "ConvolutionKernel")
_INFO_FLOAT = ("KVP", "SliceThickness", "GantryDetectorTilt")
_IDENTIFIERS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")
_UNDEFINED_LENGTH = 0xFFFFFFFF
_NO_PIXEL_DATA = "truncated/corrupt DICOM: no pixel data (file cut short or not an image object)"


@dataclass
class DicomTree:
    """Result of walking a directory: files grouped by series, and the files that were set aside.

    `series` maps SeriesInstanceUID (PHI: pseudonymise before writing) to its files, sorted by path.
    `rejected` holds (file path relative to the walked root, reason) pairs.
    """

    series: dict[str, list[Path]] = field(default_factory=dict)
    rejected: list[tuple[str, str]] = field(default_factory=list)


def scan_dicom_tree(root: Path, skip: Callable[[Path], bool] | None = None) -> DicomTree:
    """Walk `root` (any file names; DICOMDIR skipped), read headers only and group files by series.

    `skip` leaves out files another reader owns (the NIfTI volumes of a mixed tree): neither grouped nor
    rejected.
    """
    root = Path(root)
    tree = DicomTree()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.upper() == "DICOMDIR":
                continue
            path = Path(dirpath) / name
            if skip is not None and skip(path):
                continue
            uid, reason = _scan_file(path)
            if reason is not None:
                rel = path.relative_to(root).as_posix()
                logger.debug("DICOM scan: skipping %s: %s", redact_uids(rel), redact_uids(reason))
                tree.rejected.append((rel, reason))
            else:
                tree.series.setdefault(uid, []).append(path)  # type: ignore[arg-type]
    for series_files in tree.series.values():
        series_files.sort()
    logger.info("DICOM scan of %s: %d series, %d files rejected", root, len(tree.series), len(tree.rejected))
    return tree


def looks_like_dicom(path: Path) -> bool:
    """Cheap sniff (first 132 bytes): a Part 10 'DICM' marker, or a preamble-less group 0008 start."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or head[:2] == b"\x08\x00"


def read_dicom_header(path: Path, specific_tags: Sequence[str] | None = None) -> Dataset:
    """Read a DICOM file's header without pixel data (also preamble-less files, see `_dcmread`)."""
    return _dcmread(path, stop_before_pixels=True, specific_tags=specific_tags)


def read_dicom_series(files: list[Path], root: Path | None = None) -> Volume:
    """Read one CT series into a Volume in canonical orientation, HU as float32.

    Raises InvalidScanError(series directory, reason) for anything that cannot be read as an axial
    single-frame CT series with consistent geometry (see the checks below for the reasons).
    """
    files = [Path(p) for p in files]
    source = _series_source(files, root)
    if not files:
        raise InvalidScanError(source, "empty series (no files)")

    slices: list[tuple[str, Dataset]] = []
    n_localizers = 0
    for path in files:
        rel = _relative(path, root)
        ds = _read_slice_dataset(path, rel, source)
        _check_single_frame_ct(ds, source)
        if "LOCALIZER" in [str(v).upper() for v in _as_list(ds.get("ImageType"))]:
            n_localizers += 1
            continue
        slices.append((rel, ds))
    if not slices:
        raise InvalidScanError(source, "localizer/scout series")
    if n_localizers:
        logger.info("%s: dropped %d localizer/scout images", redact_uids(source), n_localizers)
    if len(slices) < 2:
        raise InvalidScanError(source, "single-slice series (need >= 2 slices)")
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
    if len(series_uids) > 1:
        raise InvalidScanError(source, f"files from {len(series_uids)} different series")

    geometry = _SeriesGeometry.from_slices(slices, source)
    ordered = [slices[i] for i in geometry.order]
    hu = np.empty((len(ordered), geometry.rows, geometry.columns), dtype=np.float32)
    for out_index, (rel, ds) in enumerate(ordered):
        _slice_hu(ds, rel, source, out=hu[out_index])

    # Stack axis 0 follows ascending position along the superior-pointing normal; the affine says so.
    data_ijk = hu.transpose(2, 1, 0)  # [column, row, slice]
    hu_canonical, spacing = reorient_to_canonical(data_ijk, geometry.affine(), frame="LPS")
    first = ordered[0][1]
    logger.debug("%s: read %d slices, shape %s", redact_uids(source), len(ordered), hu_canonical.shape)
    return Volume(
        hu=hu_canonical,
        spacing_mm=spacing,
        source=source,
        fmt="dicom",
        identifiers={k: str(first.get(k)) for k in _IDENTIFIERS if first.get(k) not in (None, "")},
        info=_acquisition_info(first),
        z_mm=geometry.z_mm,
        tilt_deg=geometry.tilt_deg,
    )


# --- tree walk ---------------------------------------------------------------------------------


def _scan_file(path: Path) -> tuple[str | None, str | None]:
    """(SeriesInstanceUID, None) for a usable image file, else (None, reason)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            ds = _dcmread(fh, stop_before_pixels=True, specific_tags=_SCAN_TAGS)
            pixel_tag_offset = fh.tell()  # stop_before_pixels rewinds to the (7FE0,0010) tag
            problem = _pixel_data_problem(fh, ds, pixel_tag_offset, size)
    except InvalidDicomError:
        return None, "not a DICOM file"
    except OSError as exc:
        return None, f"unreadable file: {exc.strerror or exc}"
    except Exception as exc:  # pydicom raises many types on corrupt input
        return None, f"truncated/corrupt DICOM: {type(exc).__name__}: {exc}"
    # Truncation first: a file cut inside its header also lacks the UID, and that is not the story.
    if problem is not None:
        return None, problem
    uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    if not uid:
        return None, "missing SeriesInstanceUID"
    return uid, None


def _pixel_data_problem(fh: Any, ds: Dataset, offset: int, size: int) -> str | None:
    """Check the pixel data element header against the file size and the image dimensions.

    pydicom reads a file cut short inside the header without complaint (it just stops), and a
    header-only read never looks at the pixel bytes, so truncation is detected here from lengths.
    """
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax == DeflatedExplicitVRLittleEndian:  # offsets refer to the inflated stream: not checkable
        return None
    implicit_vr, little_endian = ds.original_encoding
    if implicit_vr is None or offset >= size:
        return _no_pixel_data_reason(ds)
    fh.seek(offset)
    header = fh.read(12)
    endian = "<" if little_endian else ">"
    if len(header) < 8:
        return "truncated/corrupt DICOM: file ends inside the pixel data header"
    (group,) = struct.unpack(endian + "H", header[:2])
    if group != 0x7FE0:
        return _no_pixel_data_reason(ds)
    if implicit_vr:
        (length,) = struct.unpack(endian + "I", header[4:8])
        header_len = 8
    else:
        if len(header) < 12:
            return "truncated/corrupt DICOM: file ends inside the pixel data header"
        (length,) = struct.unpack(endian + "I", header[8:12])
        header_len = 12
    if length == _UNDEFINED_LENGTH:  # encapsulated (compressed) frames: checked when decoded
        return None
    available = size - offset - header_len
    if length > available:
        return f"truncated/corrupt DICOM: pixel data declares {length} bytes but the file holds {available}"
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits >= 8:
        expected = (
            int(ds.get("Rows", 0) or 0)
            * int(ds.get("Columns", 0) or 0)
            * int(ds.get("SamplesPerPixel", 1) or 1)
            * int(ds.get("NumberOfFrames", 1) or 1)
            * (bits // 8)
        )
        if length < expected:
            return f"truncated/corrupt DICOM: pixel data has {length} bytes, image needs {expected}"
    return None


def _no_pixel_data_reason(ds: Dataset) -> str:
    """Why a file without pixel data is set aside: a valid non-image object, or a file cut short.

    RT structure sets, RT plans, structured reports ... legitimately carry no pixels and are named as
    such. An image SOP class, or a header with Rows/Columns (RT Dose, Segmentation), promises pixels:
    their absence means truncation. Without a SOP class, or with an unregistered one, both stay possible.
    """
    sop_class = _sop_class(ds)
    if sop_class is None or sop_class.name == str(sop_class):  # unregistered: name is the UID
        return _NO_PIXEL_DATA
    if "Image Storage" in sop_class.name or ("Rows" in ds and "Columns" in ds):
        return _NO_PIXEL_DATA
    return f"not an image: {sop_class.name}"


def _sop_class(ds: Dataset) -> UID | None:
    """SOPClassUID of the dataset, else MediaStorageSOPClassUID of its file meta (None when neither)."""
    value = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    return UID(str(value).strip()) if value else None


def _dcmread(path_or_file: Any, **kwargs: Any) -> Dataset:
    """pydicom.dcmread, also accepting preamble-less files that start with a group 0008 element.

    Old ACR-NEMA style exports lack the 128-byte preamble and 'DICM'; pydicom refuses them unless
    forced, and forcing on arbitrary files parses garbage, so force only when the first tag looks
    like a real dataset start.
    """
    try:
        return pydicom.dcmread(path_or_file, **kwargs)
    except InvalidDicomError:
        if isinstance(path_or_file, str | os.PathLike):
            with open(path_or_file, "rb") as fh:
                start = fh.read(2)
        else:
            path_or_file.seek(0)
            start = path_or_file.read(2)
            path_or_file.seek(0)
        if start != b"\x08\x00":
            raise
        ds = pydicom.dcmread(path_or_file, force=True, **kwargs)
        _ensure_transfer_syntax(ds)
        return ds


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Give a meta-less dataset the transfer syntax it was actually read with (pixel decoding needs it)."""
    if "TransferSyntaxUID" in getattr(ds, "file_meta", {}):
        return
    implicit_vr, little_endian = ds.original_encoding
    if implicit_vr is None:
        return
    if implicit_vr:
        uid: UID = ImplicitVRLittleEndian
    else:
        uid = ExplicitVRLittleEndian if little_endian else ExplicitVRBigEndian
    if not hasattr(ds, "file_meta"):
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid


# --- series reading ----------------------------------------------------------------------------


def _read_slice_dataset(path: Path, rel: str, source: str) -> Dataset:
    """Read one file with its pixel data (each file is read exactly once)."""
    try:
        return _dcmread(path)
    except InvalidDicomError as exc:
        raise InvalidScanError(source, f"not a DICOM file: {rel}") from exc
    except OSError as exc:
        raise InvalidScanError(source, f"unreadable file {rel}: {exc.strerror or exc}") from exc
    except Exception as exc:
        raise InvalidScanError(source, f"truncated/corrupt DICOM {rel}: {type(exc).__name__}: {exc}") from exc


def _check_single_frame_ct(ds: Dataset, source: str) -> None:
    modality = str(ds.get("Modality", "") or "").strip() or "<missing>"
    if modality != "CT":
        raise InvalidScanError(source, f"modality {modality} is not CT")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if str(ds.get("SOPClassUID", "")) == ENHANCED_CT_IMAGE_STORAGE or n_frames > 1:
        raise InvalidScanError(source, "enhanced multi-frame CT is not supported; convert to single-frame")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise InvalidScanError(source, f"not a grayscale image (SamplesPerPixel={samples})")


@dataclass
class _SeriesGeometry:
    """Validated geometry of a series: slice order along the normal and the voxel->LPS affine."""

    order: np.ndarray  # indices into the unsorted slice list, inferior -> superior
    z_mm: np.ndarray  # sorted positions along the superior-pointing normal
    rows: int
    columns: int
    row_cosine: np.ndarray  # direction of increasing column index (DICOM IOP[:3])
    column_cosine: np.ndarray  # direction of increasing row index (IOP[3:])
    normal: np.ndarray  # unit slice normal with a positive S component
    pixel_spacing: np.ndarray  # (between rows, between columns) as in DICOM PixelSpacing
    origin: np.ndarray  # ImagePositionPatient of the first (most inferior) slice
    slice_spacing_mm: float
    tilt_deg: float = 0.0  # angle between the normal and the line of slice positions (gantry tilt)

    @classmethod
    def from_slices(cls, slices: list[tuple[str, Dataset]], source: str) -> _SeriesGeometry:
        iops = np.stack([_float_values(ds, "ImageOrientationPatient", 6, rel, source) for rel, ds in slices])
        ipps = np.stack([_float_values(ds, "ImagePositionPatient", 3, rel, source) for rel, ds in slices])
        spacings = np.stack([_float_values(ds, "PixelSpacing", 2, rel, source) for rel, ds in slices])
        sizes = {(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) for _, ds in slices}

        iop_dev = float(np.abs(iops - iops[0]).max())
        if iop_dev > IOP_TOLERANCE:
            raise InvalidScanError(
                source, f"mixed orientations within series (ImageOrientationPatient differs by {iop_dev:.4g})"
            )
        if len(sizes) > 1:
            shown = ", ".join(f"{r}x{c}" for r, c in sorted(sizes))
            raise InvalidScanError(source, f"mixed image sizes within series (Rows x Columns: {shown})")
        rows, columns = next(iter(sizes))
        if rows < 1 or columns < 1:
            raise InvalidScanError(source, f"invalid image size {rows}x{columns}")
        if float(np.abs(spacings - spacings[0]).max()) > PIXEL_SPACING_TOLERANCE_MM:
            raise InvalidScanError(source, "mixed pixel spacings within series (PixelSpacing differs)")
        if not (spacings[0] > 0).all():
            raise InvalidScanError(source, f"invalid PixelSpacing {spacings[0].tolist()}")

        row_cosine, column_cosine = _unit(iops[0, :3]), _unit(iops[0, 3:])
        if row_cosine is None or column_cosine is None:
            raise InvalidScanError(source, f"invalid ImageOrientationPatient {iops[0].tolist()}")
        normal = _unit(np.cross(row_cosine, column_cosine))
        if normal is None:
            raise InvalidScanError(source, "invalid ImageOrientationPatient (row and column are parallel)")
        if abs(normal[2]) < AXIAL_MIN_ABS_NZ:
            shown = "[" + ", ".join(f"{v + 0.0:.3f}" for v in normal) + "]"  # + 0.0: no "-0.000"
            raise InvalidScanError(source, f"not an axial series (normal={shown})")
        if normal[2] < 0:  # e.g. IOP [-1,0,0,0,1,0]: make positions increase towards the head
            normal = -normal

        positions = ipps @ normal
        order = np.argsort(positions, kind="stable")
        z_mm = positions[order]
        diffs = np.diff(z_mm)
        n_duplicates = int((diffs < DUPLICATE_POSITION_MM).sum())
        if n_duplicates:
            raise InvalidScanError(
                source, f"duplicate slice positions ({n_duplicates} slices repeat an earlier position)"
            )
        median = float(np.median(diffs))
        tolerance = max(SPACING_REL_TOLERANCE * median, SPACING_ABS_TOLERANCE_MM)
        if float(np.abs(diffs - median).max()) > tolerance:
            raise InvalidScanError(
                source,
                f"inconsistent slice spacing: gaps from {diffs.min():.3f} to {diffs.max():.3f} mm "
                f"(median {median:.3f} mm, tolerance {tolerance:.3f} mm)",
            )
        return cls(
            order=order,
            z_mm=z_mm,
            rows=rows,
            columns=columns,
            row_cosine=row_cosine,
            column_cosine=column_cosine,
            normal=normal,
            pixel_spacing=spacings[0],
            origin=ipps[order[0]],
            slice_spacing_mm=median,
            tilt_deg=_tilt_deg(ipps[order], z_mm, normal),
        )

    def affine(self) -> np.ndarray:
        """Voxel (column, row, slice) -> LPS mm, per DICOM PS3.3 C.7.6.2.1.1.

        The slice axis uses the normal times the median spacing: a gantry tilt (IPP drifting in y)
        is not resampled, as the canonical frame allows flips/permutations only; `tilt_deg` measures
        it so that ingestion can report it and refuse large ones.
        """
        affine = np.eye(4)
        affine[:3, 0] = self.row_cosine * self.pixel_spacing[1]
        affine[:3, 1] = self.column_cosine * self.pixel_spacing[0]
        affine[:3, 2] = self.normal * self.slice_spacing_mm
        affine[:3, 3] = self.origin
        return affine


def _tilt_deg(ipps: np.ndarray, z_mm: np.ndarray, normal: np.ndarray) -> float:
    """Angle (deg, >= 0) between the slice normal and the line the slice positions follow.

    Measured from the geometry, not from GantryDetectorTilt (absent, 0 or nominal in many exports):
    the least-squares drift of ImagePositionPatient per mm along the normal has a component across
    the normal of tan(tilt), the shear a tilted gantry leaves in a stack of axial-looking slices.
    """
    z = z_mm - z_mm.mean()
    drift = (z @ (ipps - ipps.mean(axis=0))) / float(z @ z)  # mm of IPP per mm along the normal
    along = float(drift @ normal)
    across = float(np.linalg.norm(drift - along * normal))
    tilt = float(np.degrees(np.arctan2(across, along)))
    return tilt if tilt >= TILT_TOLERANCE_DEG else 0.0


def _slice_hu(ds: Dataset, rel: str, source: str, out: np.ndarray) -> None:
    """Decode one slice into `out` (float32) as HU, with padding and outside-field set to air."""
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope in (None, "") or intercept in (None, ""):
        # Without these a CT's stored values could be HU or HU+1024: refuse rather than guess.
        raise InvalidScanError(source, f"missing RescaleSlope/RescaleIntercept (in {rel})")
    try:
        stored = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = syntax.name if isinstance(syntax, UID) else "unknown transfer syntax"
        raise InvalidScanError(
            source, f"cannot decode pixel data of {rel} ({name}): {type(exc).__name__}: {exc}"
        ) from exc
    if stored.shape != out.shape:
        raise InvalidScanError(source, f"pixel data of {rel} has shape {stored.shape}, expected {out.shape}")

    np.multiply(stored, np.float32(float(slope)), out=out, dtype=np.float32)
    out += np.float32(float(intercept))
    padding = _padding_mask(ds, stored)
    if padding is not None:
        out[padding] = AIR_HU
    np.maximum(out, AIR_HU, out=out)


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Stored values marked as padding by PixelPaddingValue (and PixelPaddingRangeLimit), if any."""
    value = ds.get("PixelPaddingValue")
    if value is None:
        return None
    bits = int(ds.get("BitsAllocated", 16) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1

    # Padding is 'US or SS': writers often store the signed value as US (e.g. 63536 for -2000),
    # so reinterpret it with the pixel representation's sign.
    def as_stored(v: Any) -> int:
        v = int(v)
        if signed and v >= 2 ** (bits - 1):
            v -= 2**bits
        elif not signed and v < 0:
            v += 2**bits
        return v

    low = as_stored(value)
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None:
        return stored == low
    high = as_stored(limit)
    low, high = min(low, high), max(low, high)
    return (stored >= low) & (stored <= high)


# --- small helpers -----------------------------------------------------------------------------


def _float_values(ds: Dataset, keyword: str, n: int, rel: str, source: str) -> np.ndarray:
    raw = ds.get(keyword)
    values = _as_list(raw)
    if raw is None or len(values) != n:
        raise InvalidScanError(source, f"missing {keyword} (in {rel})")
    try:
        out = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidScanError(source, f"invalid {keyword} {values!r} (in {rel})") from exc
    if not np.isfinite(out).all():
        raise InvalidScanError(source, f"invalid {keyword} {values!r} (in {rel})")
    return out


def _as_list(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def _unit(vector: np.ndarray) -> np.ndarray | None:
    norm = float(np.linalg.norm(vector))
    return None if norm < 1e-6 else vector / norm


def _acquisition_info(ds: Dataset) -> dict[str, str | float]:
    """Non-identifying acquisition fields only (no dates, names, institutions or UIDs)."""
    info: dict[str, str | float] = {}
    for key in _INFO_TEXT:
        values = [str(v).strip() for v in _as_list(ds.get(key))]
        if any(values):
            info[key] = "\\".join(values)
    for key in _INFO_FLOAT:
        value = ds.get(key)
        try:
            if value not in (None, ""):
                info[key] = float(value)
        except (TypeError, ValueError):
            logger.debug("ignoring unparsable %s", key)
    return info


def _relative(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return path.as_posix()


def _series_source(files: list[Path], root: Path | None) -> str:
    """The directory holding the series, relative to `root` when given."""
    if not files:
        return "<empty series>"
    common = Path(os.path.commonpath([str(p.parent) for p in files]))
    return _relative(common, Path(root) if root is not None else None)
