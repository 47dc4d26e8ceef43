"""DICOM CT series: one Part 10 file per slice, with fake PHI, seeded UIDs and deterministic bytes.

UIDs come from ``generate_uid(entropy_srcs=...)`` over seeded strings, so the same scan and random
stream give the same files.
"""

from __future__ import annotations

import heapq
from datetime import date, timedelta
from pathlib import Path
from typing import Literal

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

from slicefm.phantom.records import PhantomScan
from slicefm.phantom.scanner import OUTSIDE_FOV_HU, PROFILES
from slicefm.phantom.writers.files import atomic_dir, fmt_decimal

RESCALE_INTERCEPT = -1024  # stored = HU + 1024, as most CT vendors write


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
        "SliceThickness": fmt_decimal(dz),
        "PixelSpacing": [fmt_decimal(dy), fmt_decimal(dx)],
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
    with atomic_dir(out_dir) as tmp:
        for k in range(n):
            z = round(z0 + k * scan.spacing_mm[0], 4)
            sop_uid = generate_uid(entropy_srcs=[uids["series"], str(k)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = sop_uid
            ds.InstanceNumber = int(instance[k])
            ds.ImagePositionPatient = [fmt_decimal(x0), fmt_decimal(y0), fmt_decimal(z)]
            ds.SliceLocation = fmt_decimal(z)
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


def series_uid(path: Path) -> str:
    """The SeriesInstanceUID in a DICOM file's header."""
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
