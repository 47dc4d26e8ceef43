"""Write phantom scans as real files, in the layouts the public CT cohorts publish.

Formats: DICOM series (pydicom), NIfTI (nibabel), DeepLesion 16-bit PNG, RAD-ChestCT npz. Layouts:
DeepLesion, CT-RATE, RAD-ChestCT, NSCLC-Radiomics (TCIA), plus plain DICOM-tree and NIfTI-folder
layouts with label CSVs. The same adapter code must work on these files and on the real data.

Writes are atomic (temporary file or directory beside the target, then a rename) and the bytes are
deterministic for a seed: UIDs come from ``generate_uid(entropy_srcs=...)`` over seeded strings,
names from seeded hashes, and no timestamp is written anywhere (gzip mtime 0, zip dates 1980).
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import heapq
import io
import json
import logging
import struct
import zipfile
from collections.abc import Iterator, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element, write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from slicefm.io.png16 import write_png16
from slicefm.phantom.generate import generate_cohort
from slicefm.phantom.records import (
    CHEST_FINDINGS,
    FINDING_MASK_CLASSES,
    LESION_TYPES,
    ORGAN_CLASSES,
    PhantomScan,
)
from slicefm.phantom.scanner import OUTSIDE_FOV_HU, PROFILES
from slicefm.tracking.store import open_store, staged_output

logger = logging.getLogger(__name__)

RESCALE_INTERCEPT = -1024  # stored = HU + 1024, as most CT vendors write
DEEPLESION_WINDOW = "-175, 275"
RADCHEST_SPACING_MM = 0.8  # RAD-ChestCT volumes are resampled to 0.8 mm isotropic (no spacing file)
NSCLC_CLINICAL_CSV = "NSCLC-Radiomics-Lung1.clinical-version3-Oct-2019.csv"
CTRATE_CLASSES = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)
DatasetFormat = Literal["dicom", "nifti", "deeplesion", "ctrate", "radchest", "nsclc"]


# --- atomic, deterministic file primitives -------------------------------------------------------


@contextlib.contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
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


def _write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` atomically (the store's temp sibling + rename, mode by the umask)."""
    path = Path(path)
    open_store(path.parent).write_bytes(path.name, data)
    return path


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return _write_bytes(path, buf.getvalue().encode("utf-8"))


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
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


def _token(*parts: object) -> str:
    """A random-looking but reproducible hex string derived from `parts`."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()


def _fmt(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".")


# --- DICOM ---------------------------------------------------------------------------------------


def _fake_phi(scan: PhantomScan, rng: np.random.Generator, study_date: str | None) -> dict[str, str]:
    """Identifiers that look real, so ingestion's pseudonymisation has something to remove."""
    letters = list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    day = date(2012, 1, 1) + timedelta(days=int(rng.integers(0, 3000)))
    study = study_date or day.strftime("%Y%m%d")
    birth = date(int(study[:4]) - scan.age, int(rng.integers(1, 13)), int(rng.integers(1, 29)))
    return {
        "PatientName": scan.patient_name,
        "PatientID": scan.patient_id,
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "PatientSex": scan.sex,
        "PatientAge": f"{scan.age:03d}Y",
        "AccessionNumber": f"ACC{int(rng.integers(10**7, 10**8))}",
        "InstitutionName": "PHANTOM GENERAL HOSPITAL",
        "InstitutionAddress": f"{int(rng.integers(1, 999))} FAKE STREET, NOWHERE",
        "ReferringPhysicianName": "DR^" + "".join(rng.choice(letters, size=5)),
        "OperatorsName": "TECH^" + "".join(rng.choice(letters, size=4)),
        "StationName": f"CT{int(rng.integers(1, 9))}",
        "StudyDate": study,
        "StudyTime": f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}",
        "StudyID": str(int(rng.integers(1000, 99999))),
    }


def _series_dataset(scan: PhantomScan, phi: dict[str, str], uids: dict[str, str], series_number: int) -> dict:
    """Attributes shared by every slice of a series (keyword -> value)."""
    profile = PROFILES.get(scan.profile, PROFILES["default"])
    dz, dy, dx = scan.spacing_mm
    return {
        **phi,
        "SOPClassUID": CTImageStorage,
        "StudyInstanceUID": uids["study"],
        "SeriesInstanceUID": uids["series"],
        "FrameOfReferenceUID": uids["frame"],
        "PositionReferenceIndicator": "",
        "SeriesDate": phi["StudyDate"],
        "ContentDate": phi["StudyDate"],
        "SeriesTime": phi["StudyTime"],
        "Modality": "CT",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "Manufacturer": profile.manufacturer,
        "ManufacturerModelName": profile.model,
        "ConvolutionKernel": profile.kernel,
        "KVP": "120",
        "BodyPartExamined": "CHEST" if scan.region == "chest" else "CHEST_TO_PELVIS",
        "SeriesNumber": series_number,
        "AcquisitionNumber": 1,
        "PatientPosition": "HFS",
        "SliceThickness": _fmt(dz),
        "PixelSpacing": [_fmt(dy), _fmt(dx)],
        # Columns run to the patient's left (+x) and rows to posterior (+y): canonical in LPS.
        "ImageOrientationPatient": ["1", "0", "0", "0", "1", "0"],
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": scan.hu.shape[1],
        "Columns": scan.hu.shape[2],
        "BitsAllocated": 16,
        "BitsStored": 16,
        "HighBit": 15,
        "PixelRepresentation": 1,  # signed: the outside-FOV padding is below zero when stored
        "RescaleIntercept": str(RESCALE_INTERCEPT),
        "RescaleSlope": "1",
        "RescaleType": "HU",
        "WindowCenter": "40",
        "WindowWidth": "400",
        "PixelPaddingValue": OUTSIDE_FOV_HU - RESCALE_INTERCEPT,
    }


_PER_SLICE = ("SOPInstanceUID", "InstanceNumber", "ImagePositionPatient", "SliceLocation", "PixelData")


def _explicit_le() -> DicomBytesIO:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    return fp


class _Part10Encoder:
    """Part 10 files of one native (uncompressed) series, as ``dcmwrite`` would write them.

    The ~50 elements shared by every slice are encoded once; per slice only _PER_SLICE and the
    file meta are. ``dcmwrite`` re-encodes (and deep-copies, for the ambiguous VRs) everything per
    file, which made DICOM output 4x slower than generating the phantom.
    """

    def __init__(self, ds: Dataset) -> None:
        correct_ambiguous_vr(ds, is_little_endian=True)  # PixelPaddingValue -> SS, PixelData -> OW
        self.ds = ds
        self.changing = sorted(Tag(keyword) for keyword in _PER_SLICE)
        self.shared = [(int(e.tag), self._encode(e)) for e in ds if e.tag not in self.changing]

    @staticmethod
    def _encode(element) -> bytes:
        fp = _explicit_le()
        write_data_element(fp, element)
        return fp.getvalue()

    def encode(self) -> bytes:
        meta = _explicit_le()
        write_file_meta_info(meta, self.ds.file_meta, enforce_standard=True)
        changing = [(int(tag), self._encode(self.ds[tag])) for tag in self.changing]
        body = b"".join(chunk for _, chunk in heapq.merge(self.shared, changing))
        return b"\x00" * 128 + b"DICM" + meta.getvalue() + body


def write_dicom_series(
    scan: PhantomScan,
    out_dir: Path,
    rng: np.random.Generator,
    compress: bool = False,
    *,
    naming: Literal["random", "instance"] = "random",
    patient_id: str | None = None,
    study_date: str | None = None,
    series_number: int = 1,
) -> list[Path]:
    """Write `scan` as one CT series (one file per slice) into the new directory `out_dir`.

    CT Image Storage, Explicit VR Little Endian (RLE Lossless when `compress`), int16 stored values
    = HU + 1024 with PixelPaddingValue marking the outside-FOV pixels, ImagePositionPatient in LPS
    (z increases with the canonical slice index), and fake PHI (PatientName, PatientID, birth date,
    AccessionNumber, InstitutionName, ReferringPhysicianName, StudyDate, UIDs) for the
    pseudonymisation tests. `naming="random"`: random hex file names in no slice order;
    `naming="instance"`: TCIA-style ``1-{InstanceNumber:03d}.dcm``. InstanceNumber runs head to feet
    and is scrambled for ~30% of series, so readers must sort by position. `patient_id` overrides
    the scan's (PatientName follows it, as in TCIA's de-identified collections).
    Returns the file paths in canonical (inferior -> superior) slice order.
    """
    out_dir = Path(out_dir)
    n = scan.hu.shape[0]
    token = rng.bytes(16).hex()
    uids = {
        kind: generate_uid(entropy_srcs=[scan.patient_id, str(scan.study_index), token, kind])
        for kind in ("study", "series", "frame")
    }
    phi = _fake_phi(scan, rng, study_date)
    if patient_id is not None:
        phi["PatientID"] = phi["PatientName"] = patient_id
    series = _series_dataset(scan, phi, uids, series_number)
    instance = np.arange(n, 0, -1)  # scanners number head to feet: slice 0 (feet) is the last
    if rng.random() < 0.3:
        instance = rng.permutation(instance)
    if naming == "random":
        names = [f"{rng.bytes(8).hex()}.dcm" for _ in range(n)]
    else:
        names = [f"1-{int(i):03d}.dcm" for i in instance]
    if len(set(names)) != n:
        raise RuntimeError("file name collision")  # 64-bit random names: never in practice
    stored = (scan.hu.astype(np.int32) - RESCALE_INTERCEPT).astype(np.int16)
    x0, y0, z0 = scan.origin_lps
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ""
    ds.file_meta.TransferSyntaxUID = RLELossless if compress else ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "SLICEFM_PHANTOM"
    for keyword, value in {**series, **dict.fromkeys(_PER_SLICE[:-1], "0")}.items():
        setattr(ds, keyword, value)
    ds.PixelData = stored[0].tobytes()
    encoder = None if compress else _Part10Encoder(ds)
    paths = []
    with _atomic_dir(out_dir) as tmp:
        for k in range(n):
            z = round(z0 + k * scan.spacing_mm[0], 4)
            sop_uid = generate_uid(entropy_srcs=[uids["series"], str(k)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = sop_uid
            ds.InstanceNumber = int(instance[k])
            ds.ImagePositionPatient = [_fmt(x0), _fmt(y0), _fmt(z)]
            ds.SliceLocation = _fmt(z)
            if encoder is not None:
                ds.PixelData = stored[k].tobytes()
                (tmp / names[k]).write_bytes(encoder.encode())
            else:  # encapsulated RLE: let pydicom encode the fragments
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds.PixelData = stored[k].tobytes()
                ds.compress(
                    RLELossless, stored[k], generate_instance_uid=False
                )  # keep the seeded UID: bytes stay reproducible
                ds.save_as(tmp / names[k], enforce_file_format=True)
            paths.append(out_dir / names[k])
    return paths


# --- NIfTI ---------------------------------------------------------------------------------------


def _nifti_bytes(data_zyx: np.ndarray, spacing_zyx: Sequence[float], origin_lps: Sequence[float]) -> bytes:
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


def _nifti_write(path: Path, nii: bytes) -> Path:
    path = Path(path)
    if path.name.endswith(".nii.gz"):
        return _write_bytes(path, gzip.compress(nii, compresslevel=6, mtime=0))
    if path.suffix == ".nii":
        return _write_bytes(path, nii)
    raise ValueError(f"{path}: expected a .nii or .nii.gz file name")


def write_nifti(scan: PhantomScan, path: Path) -> Path:
    """Write `scan` as int16 HU NIfTI (.nii or .nii.gz by suffix) with its true RAS affine."""
    return _nifti_write(path, _nifti_bytes(scan.hu, scan.spacing_mm, scan.origin_lps))


# --- labels shared by several layouts ---------------------------------------------------------


def ctrate_labels(scan: PhantomScan) -> dict[str, int]:
    """The 18 CT-RATE classes from the phantom's findings; classes the phantom never draws are 0."""
    f, e = scan.findings, scan.extra_findings
    lung_lesion = any(lesion.lesion_type == "lung" for lesion in scan.lesions)
    labels = dict.fromkeys(CTRATE_CLASSES, 0)
    labels.update(
        {
            "Medical material": e["medical_material"],
            "Arterial wall calcification": e["arterial_calcification"],
            "Cardiomegaly": f["cardiomegaly"],
            "Pericardial effusion": e["pericardial_effusion"],
            "Coronary artery wall calcification": e["coronary_calcification"],
            "Hiatal hernia": e["hiatal_hernia"],
            "Lymphadenopathy": f["lymphadenopathy"],
            "Emphysema": f["emphysema"],
            "Atelectasis": f["atelectasis"],
            "Lung nodule": int(bool(f["nodule"] or lung_lesion)),  # CT-RATE reports masses as nodules too
            "Lung opacity": f["opacity"],
            "Pleural effusion": f["pleural_effusion"],
            "Consolidation": e["consolidation"],
        }
    )
    return labels


def _patients(scans: Sequence[PhantomScan]) -> tuple[list[int], list[int]]:
    """(1-based patient number, 1-based study number within the patient) per scan, by first appearance."""
    numbers: dict[str, int] = {}
    seen: dict[str, int] = {}
    patient, study = [], []
    for scan in scans:
        numbers.setdefault(scan.patient_id, len(numbers) + 1)
        seen[scan.patient_id] = seen.get(scan.patient_id, 0) + 1
        patient.append(numbers[scan.patient_id])
        study.append(seen[scan.patient_id])
    return patient, study


def patient_splits(scans: Sequence[PhantomScan], fractions: Sequence[float]) -> list[int]:
    """Split index per scan (0, 1, ...), cut by patient in order of first appearance.

    Every split gets at least one patient when there are enough patients.
    """
    patient, _ = _patients(scans)
    n = max(patient, default=0)
    edges = np.round(np.cumsum(fractions) / np.sum(fractions) * n).astype(int)
    if n >= len(fractions):  # keep every split non-empty
        for i in range(len(edges) - 1):
            edges[i] = min(max(edges[i], (edges[i - 1] if i else 0) + 1), n - (len(edges) - 1 - i))
    return [int(np.searchsorted(edges, p - 1, side="right")) for p in patient]


def _label_rows(
    scans: Sequence[PhantomScan], refs: Sequence[tuple[str, str]]
) -> tuple[list[str], list, list]:
    header = ["patient_ref", "scan_ref", *(f"location_{t}" for t in LESION_TYPES)]
    header += [*(f"finding_{f}" for f in CHEST_FINDINGS), "stage"]
    rows, lesion_rows = [], []
    for scan, (patient_ref, scan_ref) in zip(scans, refs, strict=True):
        rows.append(
            [patient_ref, scan_ref, *scan.location_labels.values(), *scan.findings.values(), scan.stage]
        )
        for lesion in scan.lesions:
            box = lesion.box_xyxy
            lesion_rows.append(
                [patient_ref, scan_ref, lesion.key_slice, *box, lesion.type_index, lesion.lesion_type]
            )
    return header, rows, lesion_rows


_LESION_HEADER = [
    "patient_ref",
    "scan_ref",
    "key_slice",
    "x0",
    "y0",
    "x1",
    "y1",
    "lesion_type",
    "lesion_name",
]


def _series_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)


# --- plain layouts -------------------------------------------------------------------------------


def _dicom_tree_dirs(scans: Sequence[PhantomScan], seed: int) -> list[str]:
    return [
        f"{_token(seed, s.patient_id)[:12]}/{_token(seed, s.patient_id, s.study_index)[:12]}" for s in scans
    ]


def _write_dicom_tree(
    scans: Sequence[PhantomScan], root: Path, compress_fraction: float, seed: int
) -> list[str]:
    """write_dicom_tree; returns the SeriesInstanceUID of every scan."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    uids = []
    for scan, series_dir in zip(scans, _dicom_tree_dirs(scans, seed), strict=True):
        compress = bool(rng.random() < compress_fraction)
        uids.append(_series_uid(write_dicom_series(scan, root / series_dir, rng, compress=compress)[0]))
    header, rows, lesion_rows = _label_rows(
        scans, [(s.patient_id, u) for s, u in zip(scans, uids, strict=True)]
    )
    _write_csv(root / "lesions.csv", _LESION_HEADER, lesion_rows)
    _write_csv(root / "labels.csv", header, rows)
    return uids


def write_dicom_tree(
    scans: Sequence[PhantomScan], root: Path, compress_fraction: float = 0.0, *, seed: int = 0
) -> Path:
    """Plain DICOM export: ``root/<patient dir>/<study dir>/<random>.dcm`` plus label CSVs.

    Directory names are random-looking (hashes of seed and patient); a `compress_fraction` of the
    series is RLE-compressed. ``labels.csv``: patient_ref (the fake PatientID), scan_ref (the
    SeriesInstanceUID: a patient may have several scans), location_<type> and finding_<name> 0/1
    columns, stage. ``lesions.csv``: patient_ref, scan_ref, key_slice (canonical index), x0, y0,
    x1, y1 (inclusive pixel box on the key slice, canonical frame), lesion_type (DeepLesion
    coarse type 1-8), lesion_name. These are the sidecars slicefm.data.adapters.sidecar reads.
    """
    _write_dicom_tree(scans, root, compress_fraction, seed)
    return Path(root)


def _nifti_dir_names(scans: Sequence[PhantomScan], seed: int) -> list[str]:
    return [f"scan_{_token(seed, s.patient_id, s.study_index)[:10]}" for s in scans]


def write_nifti_dir(scans: Sequence[PhantomScan], root: Path, *, seed: int = 0) -> Path:
    """Plain NIfTI folder: ``root/scan_<hash>.nii.gz`` plus ``labels.csv`` and ``lesions.csv``.

    Columns as in write_dicom_tree; patient_ref is the fake PatientID (a patient's scans share
    it) and scan_ref the file stem (name without .nii.gz).
    """
    root = Path(root)
    names = _nifti_dir_names(scans, seed)
    for scan, name in zip(scans, names, strict=True):
        write_nifti(scan, root / f"{name}.nii.gz")
    refs = [(s.patient_id, name) for s, name in zip(scans, names, strict=True)]
    header, rows, lesion_rows = _label_rows(scans, refs)
    _write_csv(root / "lesions.csv", _LESION_HEADER, lesion_rows)
    _write_csv(root / "labels.csv", header, rows)
    return root


# --- DeepLesion ----------------------------------------------------------------------------------

_DL_COLUMNS = [
    "File_name",
    "Patient_index",
    "Study_index",
    "Series_ID",
    "Key_slice_index",
    "Measurement_coordinates",
    "Bounding_boxes",
    "Lesion_diameters_Pixel_",
    "Normalized_lesion_location",
    "Coarse_lesion_type",
    "Possibly_noisy",
    "Slice_range",
    "Spacing_mm_px_",
    "Image_size",
    "DICOM_windows",
    "Patient_gender",
    "Patient_age",
    "Train_Val_Test",
]


def _deeplesion_names(scans: Sequence[PhantomScan]) -> list[str]:
    patient, study = _patients(scans)
    return [f"{p:06d}_{s:02d}_01" for p, s in zip(patient, study, strict=True)]


def _recist(box: Sequence[int]) -> tuple[list[float], tuple[float, float]]:
    """RECIST-like long and short axis end points through the box centre, and their lengths."""
    x0, y0, x1, y1 = (float(v) for v in box)
    xc, yc = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    horizontal, vertical = [x0, yc, x1, yc], [xc, y0, xc, y1]
    width, height = x1 - x0 + 1.0, y1 - y0 + 1.0
    if width >= height:
        return horizontal + vertical, (width, height)
    return vertical + horizontal, (height, width)


def _join(values: Sequence[float]) -> str:
    return ", ".join(_fmt(float(v)) for v in values)


def write_deeplesion(scans: Sequence[PhantomScan], root: Path) -> Path:
    """DeepLesion layout: ``root/Images_png/{patient:06d}_{study:02d}_{series:02d}/{slice:03d}.png``.

    16-bit PNGs with value = HU + 32768, slice numbers 1-based. DeepLesion publishes no slice
    positions; here increasing file number = canonical index (inferior -> superior), so file
    ``k.png`` is canonical slice k-1. ``root/DL_info.csv`` has DeepLesion's columns, one row per
    lesion: File_name (the key slice's PNG, e.g. 000001_01_01_023.png), Key_slice_index (1-based),
    Measurement_coordinates (RECIST long then short axis end points, px), Bounding_boxes
    ("x1, y1, x2, y2": the inclusive tight pixel box), Lesion_diameters_Pixel_ ("long, short"),
    Normalized_lesion_location ("x, y, z" in [0, 1]), Coarse_lesion_type (1-8), Possibly_noisy (0),
    Slice_range ("first, last"), Spacing_mm_px_ ("x, y, z"), Image_size ("w, h"), DICOM_windows,
    Patient_gender (M/F), Patient_age, Train_Val_Test (1 train, 2 val, 3 test; by patient, 70/15/15).
    Scans without lesions get PNGs but no row, as only annotated series appear in the real data.
    """
    root = Path(root)
    names = _deeplesion_names(scans)
    patient, study = _patients(scans)
    splits = patient_splits(scans, (0.7, 0.15, 0.15))
    rows = []
    for scan, name, p, s, split in zip(scans, names, patient, study, splits, strict=True):
        n, height, width = scan.hu.shape
        with _atomic_dir(root / "Images_png" / name) as tmp:
            for k in range(n):
                write_png16(tmp / f"{k + 1:03d}.png", scan.hu[k])
        dz, dy, dx = scan.spacing_mm
        for lesion in scan.lesions:
            coords, diameters = _recist(lesion.box_xyxy)
            x0, y0, x1, y1 = lesion.box_xyxy
            location = (
                (x0 + x1) / 2.0 / (width - 1),
                (y0 + y1) / 2.0 / (height - 1),
                lesion.key_slice / max(n - 1, 1),
            )
            rows.append(
                [
                    f"{name}_{lesion.key_slice + 1:03d}.png",
                    p,
                    s,
                    1,
                    lesion.key_slice + 1,
                    _join(coords),
                    _join(lesion.box_xyxy),
                    _join(diameters),
                    _join(location),
                    lesion.type_index,
                    0,
                    f"1, {n}",
                    _join((dx, dy, dz)),
                    f"{width}, {height}",
                    DEEPLESION_WINDOW,
                    scan.sex,
                    scan.age,
                    split + 1,
                ]
            )
    _write_csv(root / "DL_info.csv", _DL_COLUMNS, rows)
    return root


# --- CT-RATE -------------------------------------------------------------------------------------


def _ctrate_names(scans: Sequence[PhantomScan], split: str) -> list[str]:
    patient, study = _patients(scans)
    return [
        f"{split}_{p}_{'abcdefghijklmnopqrstuvwxyz'[s - 1]}_1" for p, s in zip(patient, study, strict=True)
    ]


def write_ctrate(scans: Sequence[PhantomScan], root: Path, split: str = "train") -> Path:
    """CT-RATE layout: ``root/dataset/{split}/{split}_{n}/{split}_{n}_{a|b..}/{split}_{n}_{a}_1.nii.gz``.

    n numbers patients, the letter their scans, _1 the reconstruction. As in the real release the
    NIfTI holds raw stored values (HU = stored * RescaleSlope + RescaleIntercept, intercept -1024)
    and a WRONG unit spacing (1, 1, 1) in its header (orientation is right): adapters must take
    spacing and rescale from ``root/dataset/metadata/{split}_metadata.csv`` (VolumeName,
    Manufacturer, XYSpacing "[x, y]", ZSpacing, RescaleIntercept, RescaleSlope, Rows, Columns,
    PatientSex, PatientAge "058Y"). Labels: ``root/dataset/multi_abnormality_labels/
    {split}_predicted_labels.csv`` with VolumeName and the 18 CT-RATE classes (see ctrate_labels).
    """
    root = Path(root) / "dataset"
    names = _ctrate_names(scans, split)
    metadata, labels = [], []
    for scan, name in zip(scans, names, strict=True):
        patient_dir, scan_dir = name.rsplit("_", 2)[0], name.rsplit("_", 1)[0]
        stored = (scan.hu.astype(np.int32) - RESCALE_INTERCEPT).astype(np.int16)
        _nifti_write(
            root / split / patient_dir / scan_dir / f"{name}.nii.gz",
            _nifti_bytes(stored, (1, 1, 1), (0, 0, 0)),
        )
        dz, dy, dx = scan.spacing_mm
        profile = PROFILES.get(scan.profile, PROFILES["default"])
        metadata.append(
            [
                f"{name}.nii.gz",
                profile.manufacturer,
                f"[{_fmt(dx)}, {_fmt(dy)}]",
                _fmt(dz),
                RESCALE_INTERCEPT,
                1,
            ]
            + [scan.hu.shape[1], scan.hu.shape[2], scan.sex, f"{scan.age:03d}Y"]
        )
        labels.append([f"{name}.nii.gz", *ctrate_labels(scan).values()])
    meta_header = ["VolumeName", "Manufacturer", "XYSpacing", "ZSpacing", "RescaleIntercept", "RescaleSlope"]
    meta_header += ["Rows", "Columns", "PatientSex", "PatientAge"]
    _write_csv(root / "metadata" / f"{split}_metadata.csv", meta_header, metadata)
    label_path = root / "multi_abnormality_labels" / f"{split}_predicted_labels.csv"
    _write_csv(label_path, ["VolumeName", *CTRATE_CLASSES], labels)
    return root.parent


# --- RAD-ChestCT ---------------------------------------------------------------------------------


def _radchest_names(scans: Sequence[PhantomScan], split: str) -> list[str]:
    return [f"{split}{i + 1:05d}" for i in range(len(scans))]


def write_radchest(scans: Sequence[PhantomScan], root: Path, split: str = "trn") -> Path:
    """RAD-ChestCT layout: ``root/{split}{n:05d}.npz`` (key 'ct': int16 HU, canonical [z, y, x]).

    The real release has no spacing file: its volumes are resampled to 0.8 mm isotropic, so make
    these phantoms with ``spacing_mm=(0.8, 0.8, 0.8)`` (generate_dataset does). Labels:
    ``root/{split}_labels.csv`` (a summary of imgtrn_Abnormality_and_Location_Labels.csv) with
    NoteAcc_DEID (e.g. trn00001) and one 0/1 column per CHEST_FINDINGS abnormality.
    """
    root = Path(root)
    names = _radchest_names(scans, split)
    rows = []
    for scan, name in zip(scans, names, strict=True):
        if not np.allclose(scan.spacing_mm, RADCHEST_SPACING_MM):
            logger.warning(
                "RAD-ChestCT %s: spacing %s is not the assumed 0.8 mm isotropic", name, scan.spacing_mm
            )
        _write_bytes(root / f"{name}.npz", _npz_bytes({"ct": scan.hu.astype(np.int16)}))
        rows.append([name, *(scan.findings[f] for f in CHEST_FINDINGS)])
    _write_csv(root / f"{split}_labels.csv", ["NoteAcc_DEID", *CHEST_FINDINGS], rows)
    return root


# --- NSCLC-Radiomics -----------------------------------------------------------------------------


def _nsclc_series(scans: Sequence[PhantomScan], seed: int) -> list[tuple[str, str]]:
    """(series directory, StudyDate) per scan; directories as TCIA names them:
    ``NSCLC-Radiomics/LUNG1-nnn/<MM-DD-YYYY>-StudyID-<nnnnn>/<k>.000000-NA-<nnnnn>``."""
    patient, study = _patients(scans)
    out = []
    for scan, p, s in zip(scans, patient, study, strict=True):
        h = int(_token(seed, scan.patient_id, s)[:12], 16)
        day = date(2008, 1, 1) + timedelta(days=h % 2500)
        study_dir = f"{day.strftime('%m-%d-%Y')}-StudyID-{h % 100000:05d}"
        out.append(
            (
                f"NSCLC-Radiomics/LUNG1-{p:03d}/{study_dir}/{s}.000000-NA-{(h // 7) % 100000:05d}",
                day.strftime("%Y%m%d"),
            )
        )
    return out


def _clinical_stage(scan: PhantomScan, rng: np.random.Generator) -> tuple[int, int, int, str]:
    """(T, N, M, Overall.Stage) consistent with scan.stage and the tumour's size (AJCC 7th)."""
    diameters = [2.0 * lesion.radius_mm for lesion in scan.lesions if lesion.lesion_type == "lung"]
    size = max(diameters, default=20.0)
    t = 1 if size <= 30.0 else 2 if size <= 50.0 else 3
    if scan.stage == 0:
        n = 0 if (t == 3 or rng.random() < 0.5) else 1
        overall = "I" if (n == 0 and t <= 2) else "II"
    else:
        n = 2 if rng.random() < 0.6 else 3
        overall = "IIIa" if n == 2 else "IIIb"
    return t, n, 0, overall


def write_nsclc(scans: Sequence[PhantomScan], root: Path, *, seed: int = 0) -> Path:
    """TCIA NSCLC-Radiomics layout: ``root/NSCLC-Radiomics/LUNG1-{n:03d}/{study}/{series}/1-{k:03d}.dcm``.

    DICOM via write_dicom_series (PatientID LUNG1-nnn, files named by InstanceNumber as TCIA
    does), and ``root/NSCLC-Radiomics-Lung1.clinical-version3-Oct-2019.csv`` with PatientID, age,
    clinical.T.Stage, Clinical.N.Stage, Clinical.M.Stage, Overall.Stage (I, II, IIIa, IIIb; stage
    I-II <=> scan.stage 0), Histology, gender, Survival.time (days), deadstatus.event. One clinical
    row per patient, from the patient's first scan (the collection has one planning CT each).
    """
    _write_nsclc(scans, root, seed)
    return Path(root)


def _write_nsclc(scans: Sequence[PhantomScan], root: Path, seed: int) -> list[str]:
    """write_nsclc; returns the SeriesInstanceUID of every scan."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    patient, _ = _patients(scans)
    rows, written, uids = [], set(), []
    for scan, (series_dir, study_date), p in zip(scans, _nsclc_series(scans, seed), patient, strict=True):
        pid = f"LUNG1-{p:03d}"
        paths = write_dicom_series(
            scan, root / series_dir, rng, naming="instance", patient_id=pid, study_date=study_date
        )
        uids.append(_series_uid(paths[0]))
        if p in written:
            continue
        written.add(p)
        t, n, m, overall = _clinical_stage(scan, rng)
        histology = str(rng.choice(["adenocarcinoma", "squamous cell carcinoma", "large cell", "nos"]))
        survival = int(rng.exponential(700.0 if scan.stage else 1500.0)) + 30
        dead = int(rng.random() < (0.8 if scan.stage else 0.55))
        gender = "male" if scan.sex == "M" else "female"
        rows.append([pid, scan.age, t, n, m, overall, histology, gender, survival, dead])
    header = ["PatientID", "age", "clinical.T.Stage", "Clinical.N.Stage", "Clinical.M.Stage", "Overall.Stage"]
    header += ["Histology", "gender", "Survival.time", "deadstatus.event"]
    _write_csv(root / NSCLC_CLINICAL_CSV, header, rows)
    return uids


# --- masks and the one-call dataset --------------------------------------------------------------


def write_masks(scans: Sequence[PhantomScan], root: Path, refs: Sequence[str] | None = None) -> Path:
    """``root/masks/<ref>.npz`` (keys organ, lesion, finding; uint8, canonical [z, y, x]) per scan.

    `refs` name the scans as the layout's adapter does (SeriesInstanceUID, file stem ...; default
    scan_0001 ...). ``root/masks/organ_classes.json`` lists ORGAN_CLASSES (index =
    mask value) and ``finding_classes.json`` FINDING_MASK_CLASSES; lesion masks hold lesion numbers
    in the order of PhantomScan.lesions.
    """
    masks = Path(root) / "masks"
    refs = list(refs) if refs is not None else [f"scan_{i + 1:04d}" for i in range(len(scans))]
    if len(refs) != len(scans) or len(set(refs)) != len(refs):
        raise ValueError("refs must name every scan once")
    for scan, ref in zip(scans, refs, strict=True):
        arrays = {"organ": scan.organ_mask, "lesion": scan.lesion_mask, "finding": scan.finding_mask}
        _write_bytes(masks / f"{ref}.npz", _npz_bytes(arrays))
    _write_bytes(masks / "organ_classes.json", json.dumps(list(ORGAN_CLASSES), indent=1).encode())
    _write_bytes(masks / "finding_classes.json", json.dumps(list(FINDING_MASK_CLASSES), indent=1).encode())
    return masks


def _write_cohort(scans: list[PhantomScan], root: Path, fmt: DatasetFormat, seed: int) -> list[str]:
    """Write one format's layout; returns each scan's ref for its mask file: the adapters' key
    (SeriesInstanceUID for DICOM layouts, file stem for NIfTI/CT-RATE/RAD-ChestCT, series folder
    name for DeepLesion)."""
    if fmt == "dicom":
        return _write_dicom_tree(scans, root, compress_fraction=0.05, seed=seed)
    if fmt == "nifti":
        write_nifti_dir(scans, root, seed=seed)
        return _nifti_dir_names(scans, seed)
    if fmt == "deeplesion":
        write_deeplesion(scans, root)
        return _deeplesion_names(scans)
    if fmt == "nsclc":
        return _write_nsclc(scans, root, seed)
    splits = ("train", "valid") if fmt == "ctrate" else ("trn", "val", "tst")
    fractions = (0.8, 0.2) if fmt == "ctrate" else (0.7, 0.15, 0.15)
    assignment = patient_splits(scans, fractions)
    refs = [""] * len(scans)
    for i, split in enumerate(splits):
        members = [j for j, a in enumerate(assignment) if a == i]
        subset = [scans[j] for j in members]
        if fmt == "ctrate":
            write_ctrate(subset, root, split)
            names = _ctrate_names(subset, split)
        else:
            write_radchest(subset, root, split)
            names = _radchest_names(subset, split)
        for j, name in zip(members, names, strict=True):
            refs[j] = name
    return refs


_COHORT_SETTINGS: dict[str, dict] = {
    "dicom": {"region": "chest_abdomen"},
    "nifti": {"region": "chest_abdomen"},
    "deeplesion": {"region": "chest_abdomen", "min_lesions": 1},
    "ctrate": {"region": "chest"},
    "radchest": {"region": "chest", "spacing_mm": (RADCHEST_SPACING_MM,) * 3, "patients_per_scan": 1.0},
    "nsclc": {"region": "chest", "lesion_types": ("lung",), "patients_per_scan": 1.0},
}


def generate_dataset(
    out: Path,
    n_scans: int,
    fmt: DatasetFormat,
    seed: int = 0,
    shape_xy: int = 128,
    profile: str = "default",
) -> Path:
    """Generate a phantom cohort and write it, with its masks, in `fmt`'s layout under `out`.

    `out` must not exist or be empty; everything is written into a temporary sibling directory
    first and renamed into place at the end. Only the layout's own files and ``masks/`` are written
    (a stray file would be quarantined by ingestion as an unreadable scan).
    """
    if fmt not in _COHORT_SETTINGS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(_COHORT_SETTINGS)}")
    if profile not in PROFILES:
        raise ValueError(f"unknown scanner profile {profile!r}; expected one of {sorted(PROFILES)}")
    settings = dict(_COHORT_SETTINGS[fmt])
    ratio = settings.pop("patients_per_scan", 0.8)
    scans = generate_cohort(n_scans, seed, shape_xy, PROFILES[profile], ratio, **settings)
    out = Path(out)
    with _atomic_dir(out) as tmp:
        refs = _write_cohort(scans, tmp, fmt, seed)
        write_masks(scans, tmp, refs)
    logger.info("phantom %s dataset: %d scans written to %s", fmt, n_scans, out)
    return out
