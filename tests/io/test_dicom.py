"""DICOM CT series: real files written with pydicom in tmp_path, under random names."""

from __future__ import annotations

import copy
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from slicefm.io.dicom import AIR_HU, DicomTree, read_dicom_header, read_dicom_series, scan_dicom_tree
from slicefm.io.volume import InvalidScanError

STANDARD_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
PIXEL_SPACING = (0.7, 0.9)  # (between rows = y, between columns = x): unequal to catch swaps
SLICE_SPACING = 2.5
ORIGIN = np.array([-100.0, -80.0, -300.0])  # LPS position of canonical voxel [0, 0, 0]
PHI = {"PatientName": "Doe^Jane", "PatientID": "PID-4711", "InstitutionName": "St Example Hospital"}


def make_truth(rng: np.random.Generator, shape=(6, 12, 10), slope=1.0, intercept=-1024.0) -> np.ndarray:
    """Canonical HU [z, y, x] that a stored int16 with this slope/intercept represents exactly."""
    stored = rng.integers(0, 1500, size=shape)
    return (stored * slope + intercept).astype(np.float32)


def ct_slice(
    stored: np.ndarray,
    ipp: Sequence[float],
    iop: Sequence[float] = STANDARD_IOP,
    *,
    series_uid: str,
    study_uid: str,
    instance_number: int,
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    modality: str = "CT",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    pixel_spacing: Sequence[float] = PIXEL_SPACING,
    extra: dict[str, Any] | None = None,
) -> Dataset:
    """One single-frame CT Image Storage dataset with int16 pixels (Explicit VR Little Endian)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.ImageType = list(image_type)
    ds.StudyDate = "20240102"
    ds.Manufacturer = "ACME"
    ds.ManufacturerModelName = "Scanner 9000"
    ds.ConvolutionKernel = "B30f"
    ds.KVP = "120"
    ds.SliceThickness = "2.5"
    for key, value in PHI.items():
        setattr(ds, key, value)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
    ds.PixelSpacing = [f"{v:.4f}" for v in pixel_spacing]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    if slope is not None:
        ds.RescaleSlope = f"{slope:g}"
    if intercept is not None:
        ds.RescaleIntercept = f"{intercept:g}"
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(stored, dtype=np.int16).tobytes()
    return ds


def write_series(
    directory: Path,
    truth: np.ndarray,
    rng: np.random.Generator,
    *,
    iop: Sequence[float] = STANDARD_IOP,
    slope: float = 1.0,
    intercept: float = -1024.0,
    z_positions: Sequence[float] | None = None,
    series_uid: str | None = None,
    **kwargs: Any,
) -> list[Path]:
    """Write canonical HU `truth` [z, y, x] as a CT series with the given IOP, in random file order.

    Each slice's pixels and ImagePositionPatient follow DICOM's geometry for that IOP, so every
    variant represents the same patient. File names and InstanceNumbers are random.
    """
    directory.mkdir(parents=True, exist_ok=True)
    n_z, n_y, n_x = truth.shape
    row_dir, col_dir = np.array(iop[:3]), np.array(iop[3:])
    # Stored pixel [r, c] lies at ORIGIN-based canonical (y, x); flip where IOP points to R or A.
    flip_x = row_dir[0] < 0 if abs(row_dir[0]) > 0.5 else col_dir[0] < 0
    flip_y = col_dir[1] < 0 if abs(col_dir[1]) > 0.5 else row_dir[1] < 0
    swap = abs(row_dir[1]) > 0.5  # columns run along y, rows along x: transpose the slice
    # PixelSpacing is (between rows, between columns); keep the physical y/x spacing fixed.
    pixel_spacing = PIXEL_SPACING[::-1] if swap else PIXEL_SPACING
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    z_positions = (
        ORIGIN[2] + SLICE_SPACING * np.arange(n_z) if z_positions is None else np.asarray(z_positions)
    )
    instance_numbers = rng.permutation(n_z) + 1
    paths = []
    for k in range(n_z):
        hu = truth[k][:: -1 if flip_y else 1, :: -1 if flip_x else 1]
        if swap:
            hu = hu.T
        stored = np.rint((hu - intercept) / slope)
        ipp = [
            ORIGIN[0] + (n_x - 1) * PIXEL_SPACING[1] * flip_x,
            ORIGIN[1] + (n_y - 1) * PIXEL_SPACING[0] * flip_y,
            z_positions[k],
        ]
        ds = ct_slice(
            stored,
            ipp,
            iop,
            series_uid=series_uid,
            study_uid=study_uid,
            instance_number=int(instance_numbers[k]),
            slope=slope,
            intercept=intercept,
            pixel_spacing=pixel_spacing,
            **kwargs,
        )
        path = directory / uuid.UUID(int=int(rng.integers(2**62))).hex
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def reason_of(files: list[Path], root: Path | None = None) -> str:
    with pytest.raises(InvalidScanError) as info:
        read_dicom_series(files, root=root)
    return info.value.reason


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# --- ordering and geometry ----------------------------------------------------------------------


def test_order_comes_from_positions_not_names_or_instance_numbers(tmp_path: Path, rng) -> None:
    truth = make_truth(rng)
    files = write_series(tmp_path / "s", truth, rng)
    # Make InstanceNumber run against anatomy and hand the files over in reverse-name order.
    for path in files:
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = 1000 - int(round(float(ds.ImagePositionPatient[2])))
        ds.save_as(path)
    vol = read_dicom_series(sorted(files, reverse=True), root=tmp_path)
    np.testing.assert_array_equal(vol.hu, truth)
    assert vol.hu.dtype == np.float32
    assert vol.spacing_mm == pytest.approx((SLICE_SPACING, *PIXEL_SPACING))
    np.testing.assert_allclose(vol.z_mm, ORIGIN[2] + SLICE_SPACING * np.arange(truth.shape[0]))
    assert vol.source == "s"
    assert vol.fmt == "dicom"


@pytest.mark.parametrize(
    "iop",
    [
        (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),  # rows and columns both flipped
        (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0),  # feet-first supine: normal points to the feet
        (1.0, 0.0, 0.0, 0.0, -1.0, 0.0),  # prone-like: normal points to the feet
        (0.0, 1.0, 0.0, 1.0, 0.0, 0.0),  # rows along y: transposed in-plane axes
    ],
)
def test_flipped_and_feet_first_series_give_the_same_canonical_array(tmp_path: Path, rng, iop) -> None:
    truth = make_truth(rng)
    reference = read_dicom_series(write_series(tmp_path / "std", truth, rng))
    vol = read_dicom_series(write_series(tmp_path / "var", truth, rng, iop=iop))
    np.testing.assert_array_equal(vol.hu, truth)
    np.testing.assert_array_equal(vol.hu, reference.hu)
    assert vol.spacing_mm == pytest.approx(reference.spacing_mm)
    np.testing.assert_allclose(vol.z_mm, reference.z_mm)


def test_z_spacing_comes_from_positions_and_tolerates_jitter(tmp_path: Path, rng) -> None:
    truth = make_truth(rng, shape=(5, 8, 8))
    z = np.array([10.0, 13.02, 15.98, 19.0, 22.03])  # 3 mm nominal, < 0.1 mm jitter
    vol = read_dicom_series(write_series(tmp_path, truth, rng, z_positions=z, extra={"SliceThickness": "5"}))
    assert vol.spacing_mm[0] == pytest.approx(np.median(np.diff(z)))
    np.testing.assert_allclose(vol.z_mm, z, atol=1e-3)
    assert vol.info["SliceThickness"] == 5.0  # header thickness is reported, not used as spacing


def drift_positions(files: list[Path], drift_mm: Sequence[float], tag: str | None = None) -> None:
    """Shift each slice's ImagePositionPatient by k * drift_mm (k = rank along z): a tilted gantry."""
    by_z = sorted(
        files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
    )
    for k, path in enumerate(by_z):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [
            f"{float(v) + k * d:.4f}" for v, d in zip(ds.ImagePositionPatient, drift_mm, strict=True)
        ]
        if tag is not None:
            ds.GantryDetectorTilt = tag
        ds.save_as(path)


@pytest.mark.parametrize("iop", [STANDARD_IOP, (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)], ids=["hfs", "ffs"])
@pytest.mark.parametrize("drift_y", [0.01, 0.05, -0.5, 0.7])  # mm per slice at 2.5 mm: 0.23 to 15.6 deg
def test_gantry_tilt_is_measured_from_positions(tmp_path: Path, rng, iop, drift_y: float) -> None:
    truth = make_truth(rng, shape=(7, 8, 8))
    files = write_series(tmp_path, truth, rng, iop=iop)
    drift_positions(files, (0.0, drift_y, 0.0))
    vol = read_dicom_series(files)
    expected = np.degrees(np.arctan(abs(drift_y) / SLICE_SPACING))
    assert vol.tilt_deg == pytest.approx(expected, abs=1e-3)
    assert vol.spacing_mm[0] == pytest.approx(SLICE_SPACING)
    np.testing.assert_array_equal(vol.hu, truth)  # measured, not resampled
    assert "GantryDetectorTilt" not in vol.info


def test_tilt_is_zero_for_straight_positions_whatever_the_tag_says(tmp_path: Path, rng) -> None:
    files = write_series(tmp_path / "a", make_truth(rng, shape=(5, 8, 8)), rng)
    assert read_dicom_series(files).tilt_deg == 0.0
    drift_positions(files, (0.0, 0.0, 0.0), tag="15")  # nominal tag, positions already axial
    vol = read_dicom_series(files)
    assert vol.tilt_deg == 0.0 and vol.info["GantryDetectorTilt"] == 15.0
    files = write_series(tmp_path / "b", make_truth(rng, shape=(5, 8, 8)), rng)
    drift_positions(files, (0.0002, 0.0, 0.0))  # 0.005 deg: below the numerical tolerance
    assert read_dicom_series(files).tilt_deg == 0.0
    files = write_series(tmp_path / "c", make_truth(rng, shape=(5, 8, 8)), rng)
    drift_positions(files, (0.1, 0.0, 0.0))  # drift along x: still a shear of atan(0.1 / 2.5)
    assert read_dicom_series(files).tilt_deg == pytest.approx(np.degrees(np.arctan(0.04)), abs=1e-3)


# --- HU -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("slope", "intercept"), [(1.0, -1024.0), (2.0, -1024.0), (0.5, -1000.0)])
def test_hu_from_slope_and_intercept(tmp_path: Path, rng, slope: float, intercept: float) -> None:
    truth = make_truth(rng, slope=slope, intercept=intercept)
    files = write_series(tmp_path, truth, rng, slope=slope, intercept=intercept)
    stored0 = pydicom.dcmread(files[0]).pixel_array
    if slope == 2.0:  # stored values are half the HU offset: the slope really is in play
        assert stored0.max() < (truth.max() - intercept)
    np.testing.assert_array_equal(read_dicom_series(files).hu, truth)


def test_padding_and_outside_field_become_air(tmp_path: Path, rng) -> None:
    truth = make_truth(rng, shape=(3, 8, 8))
    files = write_series(tmp_path, truth, rng, extra={"PixelPaddingValue": 50})
    for path in files:
        ds = pydicom.dcmread(path)
        px = ds.pixel_array.copy()
        px[0, :] = 50  # padding: would be -974 HU without the padding rule
        px[1, :] = -2000  # outside field: -3024 HU
        px[2, :3] = 1000  # -24 HU, ordinary tissue
        ds.PixelData = px.tobytes()
        ds.save_as(path)
    hu = read_dicom_series(files).hu
    assert (hu[:, 0, :] == AIR_HU).all()
    assert (hu[:, 1, :] == AIR_HU).all()
    assert (hu[:, 2, :3] == -24.0).all()
    assert hu.min() == AIR_HU


def test_padding_range_limit_and_unsigned_padding_value(tmp_path: Path, rng) -> None:
    truth = make_truth(rng, shape=(2, 6, 6))
    files = write_series(tmp_path, truth, rng)
    for path in files:
        ds = pydicom.dcmread(path)
        px = ds.pixel_array.copy()
        px[0, :] = -40  # inside [-40, 60]: padding
        px[0, :2] = (0, 60)
        px[1, :] = 61  # just outside: -963 HU stays
        ds.PixelData = px.tobytes()
        # Some writers store a signed padding value as US; 65496 is -40 for signed pixels
        # (read literally, the range would be [60, 65496] and swallow row 1 instead).
        ds.add_new(0x00280120, "US", 65496)
        ds.add_new(0x00280121, "US", 60)
        ds.save_as(path)
    hu = read_dicom_series(files).hu
    assert (hu[:, 0, :] == AIR_HU).all()
    assert (hu[:, 1, :] == 61 - 1024).all()


# --- tree walk ----------------------------------------------------------------------------------


def test_scan_groups_mixed_series_in_one_directory(tmp_path: Path, rng) -> None:
    truth_a, truth_b = make_truth(rng, shape=(4, 8, 8)), make_truth(rng, shape=(7, 8, 10))
    uid_a, uid_b = generate_uid(), generate_uid()
    write_series(tmp_path / "mixed", truth_a, rng, series_uid=uid_a)
    write_series(tmp_path / "mixed", truth_b, rng, series_uid=uid_b)
    (tmp_path / "DICOMDIR").write_bytes(b"not read at all")
    tree = scan_dicom_tree(tmp_path)
    assert isinstance(tree, DicomTree)
    assert {uid: len(files) for uid, files in tree.series.items()} == {uid_a: 4, uid_b: 7}
    assert tree.rejected == []  # DICOMDIR is skipped, not rejected
    np.testing.assert_array_equal(read_dicom_series(tree.series[uid_a], root=tmp_path).hu, truth_a)
    np.testing.assert_array_equal(read_dicom_series(tree.series[uid_b], root=tmp_path).hu, truth_b)


def test_scan_rejects_non_dicom_and_truncated_files_with_reasons(tmp_path: Path, rng) -> None:
    files = write_series(tmp_path / "a" / "b", make_truth(rng, shape=(4, 16, 16)), rng)
    raw = files[0].read_bytes()
    (tmp_path / "a" / "notes").write_text("radiology report, not an image\n")
    (tmp_path / "a" / "empty").write_bytes(b"")
    (tmp_path / "a" / "cut_in_pixels").write_bytes(raw[: len(raw) - 100])
    (tmp_path / "a" / "cut_in_header").write_bytes(raw[:400])
    no_uid = pydicom.dcmread(files[1])
    del no_uid.SeriesInstanceUID
    no_uid.save_as(tmp_path / "a" / "no_uid")

    tree = scan_dicom_tree(tmp_path)
    assert [len(v) for v in tree.series.values()] == [4]
    rejected = dict(tree.rejected)
    assert set(rejected) == {"a/notes", "a/empty", "a/cut_in_pixels", "a/cut_in_header", "a/no_uid"}
    assert rejected["a/notes"] == "not a DICOM file"
    assert rejected["a/empty"] == "not a DICOM file"
    assert rejected["a/cut_in_pixels"].startswith("truncated/corrupt DICOM: pixel data declares")
    assert rejected["a/cut_in_header"].startswith("truncated/corrupt DICOM")
    assert rejected["a/no_uid"] == "missing SeriesInstanceUID"


def non_image_object(path: Path, sop_class: str, *, in_dataset: bool = True, **extra: Any) -> Path:
    """A minimal valid DICOM object without pixel data (RT structure set, plan, SR ...), Part 10 file."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if in_dataset:
        ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID = PHI["PatientID"]
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_scan_names_valid_non_image_objects_and_keeps_truncation_apart(tmp_path: Path, rng) -> None:
    files = write_series(tmp_path / "ct", make_truth(rng, shape=(3, 16, 16)), rng)
    objects = tmp_path / "objects"
    objects.mkdir()
    non_image_object(objects / "rtstruct", "1.2.840.10008.5.1.4.1.1.481.3", Modality="RTSTRUCT")
    non_image_object(objects / "sr", "1.2.840.10008.5.1.4.1.1.88.11", Modality="SR")
    non_image_object(objects / "plan_meta_only", "1.2.840.10008.5.1.4.1.1.481.5", in_dataset=False)
    non_image_object(objects / "private", "1.2.3.4.5.6.7.8")  # unregistered class: cannot tell
    non_image_object(objects / "dose_no_pixels", "1.2.840.10008.5.1.4.1.1.481.2", Rows=4, Columns=4)
    raw = files[0].read_bytes()
    (objects / "ct_cut_before_pixels").write_bytes(raw[: raw.index(b"\xe0\x7f\x10\x00")])

    rejected = dict(scan_dicom_tree(tmp_path).rejected)
    assert rejected["objects/rtstruct"] == "not an image: RT Structure Set Storage"
    assert rejected["objects/sr"] == "not an image: Basic Text SR Storage"
    assert rejected["objects/plan_meta_only"] == "not an image: RT Plan Storage"  # file meta fallback
    for name in ("private", "dose_no_pixels", "ct_cut_before_pixels"):  # pixels promised or unknown
        assert rejected[f"objects/{name}"].startswith("truncated/corrupt DICOM: no pixel data"), name
    assert len(rejected) == 6


def test_scan_names_bundled_rt_objects(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    names = {"rtstruct.dcm": "RT Structure Set Storage", "rtplan.dcm": "RT Plan Storage"}
    paths = {name: get_testdata_file(name, download=False) for name in names}
    if None in paths.values():
        pytest.skip("pydicom RT test files not bundled")
    for name, source in paths.items():  # preamble-less / implicit VR files from real systems
        (tmp_path / name).write_bytes(Path(source).read_bytes())
    assert dict(scan_dicom_tree(tmp_path).rejected) == {n: f"not an image: {c}" for n, c in names.items()}


def test_truncated_file_inside_a_series_fails_the_read(tmp_path: Path, rng) -> None:
    files = write_series(tmp_path / "s", make_truth(rng, shape=(3, 16, 16)), rng)
    raw = files[1].read_bytes()
    files[1].write_bytes(raw[: len(raw) - 64])
    reason = reason_of(files, root=tmp_path)
    assert reason.startswith("cannot decode pixel data of s/")


def test_preamble_less_files_are_read(tmp_path: Path, rng) -> None:
    truth = make_truth(rng, shape=(3, 6, 6))
    files = write_series(tmp_path, truth, rng)
    for path in files:  # rewrite as old-style raw datasets: no preamble, no 'DICM', no meta
        ds = pydicom.dcmread(path)
        del ds.file_meta
        ds.preamble = None
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
        assert path.read_bytes()[:2] == b"\x08\x00"
    tree = scan_dicom_tree(tmp_path)
    assert tree.rejected == [] and len(tree.series) == 1
    np.testing.assert_array_equal(read_dicom_series(files).hu, truth)


# --- invalid series -----------------------------------------------------------------------------


def test_mr_modality_rejected(tmp_path: Path, rng) -> None:
    files = write_series(tmp_path / "mr", make_truth(rng), rng, modality="MR")
    with pytest.raises(InvalidScanError) as info:
        read_dicom_series(files, root=tmp_path)
    assert info.value.reason == "modality MR is not CT"
    assert info.value.path == "mr"


def test_localizers_dropped_and_localizer_only_series_rejected(tmp_path: Path, rng) -> None:
    truth = make_truth(rng, shape=(4, 8, 8))
    axial = write_series(tmp_path / "s", truth, rng, series_uid="1.2.3.4")
    scout = write_series(
        tmp_path / "s",
        make_truth(rng, shape=(1, 20, 30)),
        rng,
        series_uid="1.2.3.4",
        iop=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    vol = read_dicom_series(axial + scout)
    np.testing.assert_array_equal(vol.hu, truth)
    assert reason_of(scout) == "localizer/scout series"


def test_single_slice_rejected(tmp_path: Path, rng) -> None:
    files = write_series(tmp_path, make_truth(rng, shape=(1, 8, 8)), rng)
    assert reason_of(files) == "single-slice series (need >= 2 slices)"


def test_inconsistent_spacing_rejected(tmp_path: Path, rng) -> None:
    z = [0.0, 2.5, 5.0, 10.0, 12.5]  # one missing slice
    files = write_series(tmp_path, make_truth(rng, shape=(5, 8, 8)), rng, z_positions=z)
    assert reason_of(files).startswith("inconsistent slice spacing: gaps from 2.500 to 5.000 mm")


def test_duplicate_positions_rejected(tmp_path: Path, rng) -> None:
    files = write_series(tmp_path, make_truth(rng, shape=(4, 8, 8)), rng, z_positions=[0, 2.5, 2.5, 5])
    assert reason_of(files).startswith("duplicate slice positions")


def test_mixed_orientation_rejected(tmp_path: Path, rng) -> None:
    files = write_series(tmp_path, make_truth(rng, shape=(4, 8, 8)), rng)
    ds = pydicom.dcmread(files[2])
    ds.ImageOrientationPatient = ["0.999950", "0.010000", "0", "-0.010000", "0.999950", "0"]
    ds.save_as(files[2])
    assert reason_of(files).startswith("mixed orientations within series")


def test_mixed_pixel_spacing_and_size_rejected(tmp_path: Path, rng) -> None:
    files = write_series(tmp_path / "a", make_truth(rng, shape=(3, 8, 8)), rng)
    ds = pydicom.dcmread(files[0])
    ds.PixelSpacing = ["0.8", "0.9"]
    ds.save_as(files[0])
    assert reason_of(files).startswith("mixed pixel spacings within series")
    files = write_series(tmp_path / "b", make_truth(rng, shape=(3, 8, 8)), rng)
    files += write_series(tmp_path / "b", make_truth(rng, shape=(1, 8, 6)), rng, z_positions=[-292.5])
    for path in files:  # same series UID everywhere
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = "1.2.3"
        ds.save_as(path)
    assert reason_of(files) == "mixed image sizes within series (Rows x Columns: 8x6, 8x8)"


def test_missing_rescale_rejected(tmp_path: Path, rng) -> None:
    files = write_series(tmp_path, make_truth(rng, shape=(3, 8, 8)), rng)
    ds = pydicom.dcmread(files[1])
    del ds.RescaleIntercept
    ds.save_as(files[1])
    assert reason_of(files).startswith("missing RescaleSlope/RescaleIntercept")


@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_missing_geometry_rejected(tmp_path: Path, rng, keyword: str) -> None:
    files = write_series(tmp_path, make_truth(rng, shape=(3, 8, 8)), rng)
    ds = pydicom.dcmread(files[0])
    delattr(ds, keyword)
    ds.save_as(files[0])
    assert reason_of(files).startswith(f"missing {keyword}")


def test_sagittal_series_rejected(tmp_path: Path, rng) -> None:
    files = write_series(tmp_path, make_truth(rng, shape=(3, 8, 8)), rng)
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]
        ds.ImagePositionPatient = [f"{2.0 * k:.1f}", "0", "0"]
        ds.save_as(path)
    assert reason_of(files) == "not an axial series (normal=[-1.000, 0.000, 0.000])"


def test_enhanced_multiframe_refused(tmp_path: Path, rng) -> None:
    files = write_series(tmp_path, make_truth(rng, shape=(2, 8, 8)), rng)
    ds = pydicom.dcmread(files[0])
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.save_as(files[0])
    assert reason_of(files) == "enhanced multi-frame CT is not supported; convert to single-frame"


# --- compressed transfer syntaxes ---------------------------------------------------------------


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_compressed_series_decode_to_the_same_hu(tmp_path: Path, rng, syntax) -> None:
    if not get_encoder(syntax).is_available:
        pytest.skip(f"no {syntax.name} encoder in this environment")
    truth = make_truth(rng, shape=(3, 64, 48))  # OpenJPEG's default 6 resolutions need >= 32 px
    files = write_series(tmp_path, truth, rng)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.compress(syntax)
        ds.save_as(path)
        assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    assert scan_dicom_tree(tmp_path).rejected == []
    np.testing.assert_array_equal(read_dicom_series(files).hu, truth)


def test_jpeg_ls_lossless_bundled_file_decodes_like_the_uncompressed_one(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    names = ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm")
    paths = [get_testdata_file(name, download=False) for name in names]
    if None in paths:
        pytest.skip("pydicom test files not bundled")
    volumes = []
    for label, source in zip(("raw", "jls"), paths, strict=True):
        files = []
        for k in range(2):  # pretend it is a 2-slice CT: only the codec matters here
            ds = pydicom.dcmread(source)
            ds.Modality, ds.SOPClassUID = "CT", CTImageStorage
            ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
            ds.ImageOrientationPatient = list(STANDARD_IOP)
            ds.ImagePositionPatient = ["0", "0", str(5.0 * k)]
            files.append(tmp_path / label / f"{k}")
            files[-1].parent.mkdir(exist_ok=True)
            ds.save_as(files[-1])
        volumes.append(read_dicom_series(files))
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"
    np.testing.assert_array_equal(volumes[0].hu, volumes[1].hu)
    assert volumes[0].hu.std() > 0


# --- bundled real CT, PHI -----------------------------------------------------------------------


def test_bundled_real_ct_small(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    source = get_testdata_file("CT_small.dcm", download=False)
    if source is None:
        pytest.skip("CT_small.dcm not bundled with this pydicom")
    original = pydicom.dcmread(source)
    assert reason_of([Path(source)]) == "single-slice series (need >= 2 slices)"
    files = []
    for k in range(3):
        ds = copy.deepcopy(original)
        ds.SOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [
            *original.ImagePositionPatient[:2],
            float(original.ImagePositionPatient[2]) + 5 * k,
        ]
        files.append(tmp_path / f"{k:03d}.dcm")
        ds.save_as(files[-1])
    vol = read_dicom_series(files)
    expected = original.pixel_array.astype(np.float32) - 1024.0  # slope 1, intercept -1024
    assert vol.shape == (3, 128, 128)
    np.testing.assert_array_equal(vol.hu[1], np.maximum(expected, AIR_HU))
    assert vol.spacing_mm == pytest.approx((5.0, 0.661468, 0.661468))
    assert vol.info == {
        "Manufacturer": "GE MEDICAL SYSTEMS",
        "ManufacturerModelName": "RHAPSODE",
        "ConvolutionKernel": "STANDARD",
        "KVP": 120.0,
        "SliceThickness": 5.0,
        "GantryDetectorTilt": 0.0,
    }
    assert vol.tilt_deg == 0.0
    assert vol.identifiers["PatientID"] == "1CT1"


def test_phi_stays_out_of_info_and_logs(tmp_path: Path, rng, caplog: pytest.LogCaptureFixture) -> None:
    files = write_series(tmp_path / "p", make_truth(rng, shape=(3, 8, 8)), rng)
    header = read_dicom_header(files[0])
    assert "PixelData" not in header
    with caplog.at_level(logging.DEBUG, logger="slicefm"):
        scan_dicom_tree(tmp_path)
        vol = read_dicom_series(files, root=tmp_path)
        with pytest.raises(InvalidScanError):
            read_dicom_series(files[:1], root=tmp_path)
    assert vol.identifiers == {
        "PatientID": PHI["PatientID"],
        "StudyInstanceUID": str(header.StudyInstanceUID),
        "SeriesInstanceUID": str(header.SeriesInstanceUID),
    }
    assert set(vol.info) == {
        "Manufacturer",
        "ManufacturerModelName",
        "ConvolutionKernel",
        "KVP",
        "SliceThickness",
    }
    secrets = [*PHI.values(), "Doe", str(header.StudyInstanceUID), str(header.SeriesInstanceUID), "20240102"]
    text = " ".join(str(v) for v in vol.info.values()) + caplog.text
    assert caplog.records, "expected some log output to check"
    for secret in secrets:
        assert secret not in text
