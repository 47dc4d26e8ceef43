"""Phantom writers: real DICOM / NIfTI / PNG / npz files in the public cohorts' layouts, read back."""

from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from slicefm.data import adapters
from slicefm.io import dicom as dicom_io
from slicefm.io import nifti as nifti_io
from slicefm.io import npz as npz_io
from slicefm.io import png16
from slicefm.phantom import dataset
from slicefm.phantom.generate import generate_cohort
from slicefm.phantom.records import (
    CHEST_FINDINGS,
    FINDING_MASK_CLASSES,
    LESION_TYPES,
    ORGAN_CLASSES,
    PhantomScan,
)
from slicefm.phantom.scanner import OUTSIDE_FOV_HU
from slicefm.phantom.writers import ctrate, deeplesion, dicom, masks, nifti, nsclc, plain, radchest, splits

AIR_FLOOR = -1024  # readers map padding and anything below to air


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def sorted_by_position(paths: list[Path]) -> list[pydicom.Dataset]:
    datasets = [pydicom.dcmread(p) for p in paths]
    return sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))


@pytest.fixture(scope="module")
def scans() -> list[PhantomScan]:
    """Three small scans of two patients, every one with at least one lesion."""
    return generate_cohort(3, seed=4, shape_xy=48, n_slices=24, patients_per_scan=0.67, min_lesions=1)


@pytest.fixture(scope="module")
def scan(scans) -> PhantomScan:
    return scans[0]


# --- DICOM ---------------------------------------------------------------------------------------


def test_dicom_series_is_real_ct_with_exact_hu(tmp_path, scan):
    paths = dicom.write_dicom_series(scan, tmp_path / "series", np.random.default_rng(1))
    assert len(paths) == scan.hu.shape[0] and all(p.exists() for p in paths)
    assert [p.name for p in sorted(paths)] != [p.name for p in paths]  # names are not in slice order
    assert all(re.fullmatch(r"[0-9a-f]{16}\.dcm", p.name) for p in paths)
    datasets = sorted_by_position(paths)
    assert [pydicom.dcmread(p).SOPInstanceUID for p in paths] == [ds.SOPInstanceUID for ds in datasets]
    first = datasets[0]
    assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert first.SOPClassUID == pydicom.uid.CTImageStorage and first.Modality == "CT"
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in first.PixelSpacing] == pytest.approx(scan.spacing_mm[1:])
    assert float(first.RescaleIntercept) == -1024 and float(first.RescaleSlope) == 1
    assert first.PixelRepresentation == 1 and first.PixelPaddingValue == OUTSIDE_FOV_HU + 1024
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in datasets])
    np.testing.assert_allclose(np.diff(z), scan.spacing_mm[0], atol=1e-3)
    assert [float(v) for v in first.ImagePositionPatient] == pytest.approx(scan.origin_lps, abs=1e-3)
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
    np.testing.assert_array_equal(hu, scan.hu)  # padding included: stored -976 -> -2000 HU
    assert sorted(int(ds.InstanceNumber) for ds in datasets) == list(range(1, len(datasets) + 1))
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    assert len({(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID) for ds in datasets}) == 1


def test_dicom_carries_fake_phi_for_pseudonymisation(tmp_path, scan):
    ds = pydicom.dcmread(dicom.write_dicom_series(scan, tmp_path / "s", np.random.default_rng(2))[0])
    assert str(ds.PatientName) == scan.patient_name and ds.PatientID == scan.patient_id
    assert re.fullmatch(r"\d{8}", ds.PatientBirthDate) and re.fullmatch(r"\d{8}", ds.StudyDate)
    assert int(ds.StudyDate[:4]) - int(ds.PatientBirthDate[:4]) == scan.age
    assert ds.AccessionNumber.startswith("ACC") and ds.InstitutionName and str(ds.ReferringPhysicianName)
    for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
        assert pydicom.uid.UID(uid).is_valid


def test_dicom_fast_encoder_writes_what_dcmwrite_writes(tmp_path, scan):
    path = dicom.write_dicom_series(scan, tmp_path / "s", np.random.default_rng(3))[5]
    ds = pydicom.dcmread(path)
    ds.save_as(tmp_path / "reference.dcm", enforce_file_format=True)
    assert path.read_bytes() == (tmp_path / "reference.dcm").read_bytes()


def test_dicom_rle_and_instance_naming(tmp_path, scan):
    paths = dicom.write_dicom_series(
        scan, tmp_path / "s", np.random.default_rng(4), compress=True, naming="instance"
    )
    datasets = sorted_by_position(paths)
    assert datasets[0].file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(np.stack([ds.pixel_array for ds in datasets]).astype(int) - 1024, scan.hu)
    for path in paths:
        assert path.name == f"1-{int(pydicom.dcmread(path, stop_before_pixels=True).InstanceNumber):03d}.dcm"


def test_dicom_instance_numbers_scrambled_for_some_series(tmp_path, scan):
    orders = set()
    for seed in range(8):
        datasets = sorted_by_position(
            dicom.write_dicom_series(scan, tmp_path / f"s{seed}", np.random.default_rng(seed))
        )
        numbers = [int(ds.InstanceNumber) for ds in datasets]
        orders.add("head-first" if numbers == sorted(numbers, reverse=True) else "scrambled")
    assert orders == {"head-first", "scrambled"}


def test_dicom_bytes_are_deterministic(tmp_path, scan):
    dicom.write_dicom_series(scan, tmp_path / "a", np.random.default_rng(5))
    dicom.write_dicom_series(scan, tmp_path / "b", np.random.default_rng(5))
    dicom.write_dicom_series(scan, tmp_path / "c", np.random.default_rng(6))
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    assert set(tree_bytes(tmp_path / "a")) != set(tree_bytes(tmp_path / "c"))


def test_dicom_reader_round_trip(tmp_path, scan):
    paths = dicom.write_dicom_series(scan, tmp_path / "s", np.random.default_rng(7))
    volume = dicom_io.read_dicom_series(paths)
    np.testing.assert_array_equal(volume.hu, np.maximum(scan.hu, AIR_FLOOR))
    assert volume.spacing_mm == pytest.approx(scan.spacing_mm, abs=1e-3)
    assert volume.identifiers["PatientID"] == scan.patient_id


def test_series_directory_is_written_atomically(tmp_path, scan, monkeypatch):
    target = tmp_path / "s"
    target.mkdir()
    (target / "other.dcm").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        dicom.write_dicom_series(scan, target, np.random.default_rng(0))
    calls = []

    def failing_encode(self):
        calls.append(1)
        if len(calls) == 4:
            raise OSError("disk full")
        return original(self)

    original = dicom._Part10Encoder.encode
    monkeypatch.setattr(dicom._Part10Encoder, "encode", failing_encode)
    with pytest.raises(OSError, match="disk full"):
        dicom.write_dicom_series(scan, tmp_path / "t", np.random.default_rng(0))
    assert len(calls) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no partial series, no temporary directory


# --- NIfTI ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_has_ras_affine_and_exact_hu(tmp_path, scan, suffix):
    path = nifti.write_nifti(scan, tmp_path / f"scan{suffix}")
    img = nib.load(path)
    dz, dy, dx = scan.spacing_mm
    np.testing.assert_allclose(np.diag(img.affine)[:3], [-dx, -dy, dz], atol=1e-4)  # L, P, S in RAS
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert img.get_data_dtype() == np.int16
    # nibabel moves the on-disk scl_slope/scl_inter into the array proxy when loading.
    assert (float(img.dataobj.slope), float(img.dataobj.inter)) == (1.0, 0.0)
    assert (int(img.header["qform_code"]), int(img.header["sform_code"])) == (1, 1)
    np.testing.assert_array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), scan.hu)
    x0, y0, z0 = scan.origin_lps
    np.testing.assert_allclose(img.affine[:3, 3], [-x0, -y0, z0], atol=1e-4)


def test_nifti_gz_is_deterministic(tmp_path, scan):
    a = nifti.write_nifti(scan, tmp_path / "a.nii.gz").read_bytes()
    b = nifti.write_nifti(scan, tmp_path / "b.nii.gz").read_bytes()
    assert a == b and a[4:8] == b"\x00\x00\x00\x00"  # gzip MTIME = 0
    assert gzip.decompress(a)[344:348] == b"n+1\x00"
    with pytest.raises(ValueError, match="nii"):
        nifti.write_nifti(scan, tmp_path / "scan.img")


def test_nifti_reader_round_trip(tmp_path, scan):
    volume = nifti_io.read_nifti(nifti.write_nifti(scan, tmp_path / "s.nii.gz"))
    np.testing.assert_array_equal(volume.hu, scan.hu)
    assert volume.spacing_mm == pytest.approx(scan.spacing_mm, abs=1e-4)


# --- plain layouts with label tables -------------------------------------------------------------


def check_label_tables(root: Path, scans: list[PhantomScan], scan_refs: list[str]) -> None:
    header, rows = read_csv(root / "labels.csv")
    expected = ["patient_ref", "scan_ref", *(f"location_{t}" for t in LESION_TYPES)]
    assert header == [*expected, *(f"finding_{f}" for f in CHEST_FINDINGS), "stage"]
    assert [r["scan_ref"] for r in rows] == scan_refs
    for scan, row in zip(scans, rows, strict=True):
        assert row["patient_ref"] == scan.patient_id
        assert {t: int(row[f"location_{t}"]) for t in LESION_TYPES} == scan.location_labels
        assert {f: int(row[f"finding_{f}"]) for f in CHEST_FINDINGS} == scan.findings
        assert int(row["stage"]) == scan.stage
    header, lesion_rows = read_csv(root / "lesions.csv")
    assert header == [
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
    expected_rows = [
        [ref, str(les.key_slice), *map(str, les.box_xyxy), str(les.type_index), les.lesion_type]
        for scan, ref in zip(scans, scan_refs, strict=True)
        for les in scan.lesions
    ]
    assert [[r[c] for c in header[1:]] for r in lesion_rows] == expected_rows


def test_dicom_tree_layout_and_labels(tmp_path, scans):
    root = plain.write_dicom_tree(scans, tmp_path / "tree", compress_fraction=0.0, seed=3)
    series_dirs = sorted({p.parent for p in root.rglob("*.dcm")})
    assert len(series_dirs) == len(scans) and all(len(d.relative_to(root).parts) == 2 for d in series_dirs)
    # One directory per patient, one sub-directory per study.
    assert len({d.parent for d in series_dirs}) == len({s.patient_id for s in scans})
    by_uid = {
        pydicom.dcmread(next(d.iterdir()), stop_before_pixels=True).SeriesInstanceUID: d for d in series_dirs
    }
    _, rows = read_csv(root / "labels.csv")
    check_label_tables(root, scans, [r["scan_ref"] for r in rows])
    for scan, row in zip(scans, rows, strict=True):  # scan_ref = SeriesInstanceUID names this scan's images
        datasets = sorted_by_position(sorted(by_uid[row["scan_ref"]].iterdir()))
        assert {ds.PatientID for ds in datasets} == {row["patient_ref"]}
        np.testing.assert_array_equal(
            np.stack([ds.pixel_array for ds in datasets]).astype(int) - 1024, scan.hu
        )


def test_nifti_dir_layout_and_labels(tmp_path, scans):
    root = plain.write_nifti_dir(scans, tmp_path / "nifti", seed=3)
    files = sorted(root.glob("*.nii.gz"))
    assert len(files) == len(scans)
    _, rows = read_csv(root / "labels.csv")
    stems = [r["scan_ref"] for r in rows]
    assert sorted(f"{s}.nii.gz" for s in stems) == [f.name for f in files]
    check_label_tables(root, scans, stems)
    for scan, stem in zip(scans, stems, strict=True):
        np.testing.assert_array_equal(
            np.asarray(nib.load(root / f"{stem}.nii.gz").dataobj).transpose(2, 1, 0), scan.hu
        )


# --- cohort layouts ------------------------------------------------------------------------------


def test_deeplesion_layout(tmp_path, scans):
    root = deeplesion.write_deeplesion(scans, tmp_path / "dl")
    header, rows = read_csv(root / "DL_info.csv")
    assert header == deeplesion._DL_COLUMNS and header[:5] == [
        "File_name",
        "Patient_index",
        "Study_index",
        "Series_ID",
        "Key_slice_index",
    ]
    folders = sorted(p.name for p in (root / "Images_png").iterdir())
    assert folders == ["000001_01_01", "000001_02_01", "000002_01_01"]
    assert len(rows) == sum(len(s.lesions) for s in scans)
    lesions = [
        (scan, folder, les) for scan, folder in zip(scans, folders, strict=True) for les in scan.lesions
    ]
    for row, (scan, folder, les) in zip(rows, lesions, strict=True):
        n, h, w = scan.hu.shape
        assert row["File_name"] == f"{folder}_{les.key_slice + 1:03d}.png"
        assert int(row["Key_slice_index"]) == les.key_slice + 1 and row["Slice_range"] == f"1, {n}"
        assert [float(v) for v in row["Bounding_boxes"].split(",")] == list(les.box_xyxy)
        assert int(row["Coarse_lesion_type"]) == les.type_index and row["Possibly_noisy"] == "0"
        dz, dy, dx = scan.spacing_mm
        assert [float(v) for v in row["Spacing_mm_px_"].split(",")] == pytest.approx([dx, dy, dz], abs=1e-4)
        assert row["Image_size"] == f"{w}, {h}" and row["DICOM_windows"] == "-175, 275"
        assert row["Patient_gender"] == scan.sex and int(row["Patient_age"]) == scan.age
        coords = [float(v) for v in row["Measurement_coordinates"].split(",")]
        long_axis, short_axis = (float(v) for v in row["Lesion_diameters_Pixel_"].split(","))
        assert len(coords) == 8 and long_axis >= short_axis >= 1
        # Slice files: k.png is canonical slice k-1, value = HU + 32768.
        png = np.asarray(Image.open(root / "Images_png" / folder / f"{les.key_slice + 1:03d}.png")).astype(
            int
        )
        np.testing.assert_array_equal(png - 32768, scan.hu[les.key_slice])
        assert len(list((root / "Images_png" / folder).glob("*.png"))) == n
    split_of = {}
    for row in rows:  # the split is a property of the patient
        assert split_of.setdefault(row["Patient_index"], row["Train_Val_Test"]) == row["Train_Val_Test"]


def test_deeplesion_reader_round_trip(tmp_path, scan):
    root = deeplesion.write_deeplesion([scan], tmp_path / "dl")
    files = sorted((root / "Images_png" / "000001_01_01").glob("*.png"), key=lambda p: int(p.stem))
    volume = png16.read_png_slices(files, scan.spacing_mm)
    np.testing.assert_array_equal(volume.hu, scan.hu)


def test_ctrate_layout_stores_raw_values_and_wrong_header_spacing(tmp_path, scans):
    root = ctrate.write_ctrate(scans, tmp_path / "ctrate", split="valid")
    names = ["valid_1_a_1", "valid_1_b_1", "valid_2_a_1"]
    for name in names:
        patient, scan_dir = name.rsplit("_", 2)[0], name.rsplit("_", 1)[0]
        assert (root / "dataset" / "valid" / patient / scan_dir / f"{name}.nii.gz").exists()
    header, meta = read_csv(root / "dataset" / "metadata" / "valid_metadata.csv")
    assert header == [
        "VolumeName",
        "Manufacturer",
        "XYSpacing",
        "ZSpacing",
        "RescaleIntercept",
        "RescaleSlope",
        "Rows",
        "Columns",
        "PatientSex",
        "PatientAge",
    ]
    header, labels = read_csv(root / "dataset" / "multi_abnormality_labels" / "valid_predicted_labels.csv")
    assert header == ["VolumeName", *ctrate.CTRATE_CLASSES] and len(ctrate.CTRATE_CLASSES) == 18
    for scan, name, row, label in zip(scans, names, meta, labels, strict=True):
        assert row["VolumeName"] == label["VolumeName"] == f"{name}.nii.gz"
        assert (
            re.fullmatch(r"\[[\d.]+, [\d.]+\]", row["XYSpacing"]) and row["PatientAge"] == f"{scan.age:03d}Y"
        )
        path = next(root.rglob(f"{name}.nii.gz"))
        img = nib.load(path)
        assert img.header.get_zooms() == (1.0, 1.0, 1.0)  # wrong on purpose, as released
        stored = np.asarray(img.dataobj).transpose(2, 1, 0)
        hu = stored * float(row["RescaleSlope"]) + float(row["RescaleIntercept"])
        np.testing.assert_array_equal(hu, scan.hu)
        assert {k: int(v) for k, v in label.items() if k != "VolumeName"} == ctrate.ctrate_labels(scan)
        assert int(label["Emphysema"]) == scan.findings["emphysema"]
        assert int(label["Lung nodule"]) == int(scan.findings["nodule"] or scan.location_labels["lung"])
        x, y = (float(v) for v in row["XYSpacing"].strip("[]").split(","))
        volume = nifti_io.read_nifti(path, (float(row["ZSpacing"]), y, x), (1.0, -1024.0))
        np.testing.assert_array_equal(volume.hu, scan.hu)
        assert volume.spacing_mm == pytest.approx(scan.spacing_mm, abs=1e-4)


def test_radchest_layout(tmp_path):
    scans = generate_cohort(2, seed=1, shape_xy=32, region="chest", spacing_mm=(0.8, 0.8, 0.8))
    root = radchest.write_radchest(scans, tmp_path / "rad", split="tst")
    assert sorted(p.name for p in root.glob("*.npz")) == ["tst00001.npz", "tst00002.npz"]
    header, rows = read_csv(root / "tst_labels.csv")
    assert header == ["NoteAcc_DEID", *CHEST_FINDINGS] and [r["NoteAcc_DEID"] for r in rows] == [
        "tst00001",
        "tst00002",
    ]
    for scan, row in zip(scans, rows, strict=True):
        with np.load(root / f"{row['NoteAcc_DEID']}.npz") as archive:
            assert archive.files == ["ct"] and archive["ct"].dtype == np.int16
            np.testing.assert_array_equal(archive["ct"], scan.hu)
        assert {f: int(row[f]) for f in CHEST_FINDINGS} == scan.findings
    first = (root / "tst00001.npz").read_bytes()
    radchest.write_radchest(scans, tmp_path / "again", split="tst")
    assert (tmp_path / "again" / "tst00001.npz").read_bytes() == first  # no zip timestamps
    np.testing.assert_array_equal(npz_io.read_npz_volume(root / "tst00001.npz").hu, scans[0].hu)


def test_nsclc_layout_and_clinical_table(tmp_path):
    scans = generate_cohort(
        4, seed=8, shape_xy=32, n_slices=24, region="chest", lesion_types=("lung",), patients_per_scan=1.0
    )
    root = nsclc.write_nsclc(scans, tmp_path / "nsclc", seed=1)
    files = sorted(root.rglob("*.dcm"))
    pattern = r"NSCLC-Radiomics/LUNG1-00\d/\d\d-\d\d-\d{4}-StudyID-\d{5}/1\.000000-NA-\d{5}/1-\d{3}\.dcm"
    assert files and all(re.fullmatch(pattern, f.relative_to(root).as_posix()) for f in files)
    header, rows = read_csv(root / nsclc.NSCLC_CLINICAL_CSV)
    assert header == [
        "PatientID",
        "age",
        "clinical.T.Stage",
        "Clinical.N.Stage",
        "Clinical.M.Stage",
        "Overall.Stage",
        "Histology",
        "gender",
        "Survival.time",
        "deadstatus.event",
    ]
    for i, (scan, row) in enumerate(zip(scans, rows, strict=True), start=1):
        assert row["PatientID"] == f"LUNG1-{i:03d}"
        assert (row["Overall.Stage"] in ("IIIa", "IIIb")) == bool(scan.stage)
        assert row["Overall.Stage"] in ("I", "II", "IIIa", "IIIb")
        assert (int(row["Clinical.N.Stage"]) >= 2) == bool(scan.stage)
        assert row["gender"] == ("male" if scan.sex == "M" else "female")
        headers = [
            pydicom.dcmread(f, stop_before_pixels=True)
            for f in root.glob(f"NSCLC-Radiomics/LUNG1-{i:03d}/*/*/*.dcm")
        ]
        assert {h.PatientID for h in headers} == {f"LUNG1-{i:03d}"} and len(headers) == scan.hu.shape[0]


def test_patient_splits_keep_patients_together_and_fill_every_split(scans):
    many = generate_cohort(12, seed=2, shape_xy=32, n_slices=24, patients_per_scan=0.75)
    assignment = splits.patient_splits(many, (0.7, 0.15, 0.15))
    assert set(assignment) == {0, 1, 2}
    for pid in {s.patient_id for s in many}:
        assert len({a for a, s in zip(assignment, many, strict=True) if s.patient_id == pid}) == 1
    # 2 patients: no test split possible
    assert set(splits.patient_splits(scans, (0.7, 0.15, 0.15))) == {0, 1}


def test_masks(tmp_path, scans):
    out = masks.write_masks(scans, tmp_path, refs=["a", "b/c", "d"])
    assert json.loads((out / "organ_classes.json").read_text()) == list(ORGAN_CLASSES)
    assert json.loads((out / "finding_classes.json").read_text()) == list(FINDING_MASK_CLASSES)
    for scan, ref in zip(scans, ["a", "b/c", "d"], strict=True):
        with np.load(out / f"{ref}.npz") as archive:
            assert sorted(archive.files) == ["finding", "lesion", "organ"]
            np.testing.assert_array_equal(archive["organ"], scan.organ_mask)
            np.testing.assert_array_equal(archive["lesion"], scan.lesion_mask)
    with pytest.raises(ValueError, match="once"):
        masks.write_masks(scans, tmp_path / "x", refs=["a", "a", "b"])


# --- the one-call dataset ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["dicom", "nifti", "deeplesion", "ctrate", "radchest", "nsclc"])
def test_generate_dataset_is_byte_deterministic(tmp_path, fmt):
    a = dataset.generate_dataset(tmp_path / "a", 3, fmt, seed=1, shape_xy=32)
    b = dataset.generate_dataset(tmp_path / "b", 3, fmt, seed=1, shape_xy=32)
    c = dataset.generate_dataset(tmp_path / "c", 3, fmt, seed=2, shape_xy=32)
    files_a = tree_bytes(a)
    assert files_a == tree_bytes(b)
    assert files_a != tree_bytes(c)
    assert sum(name.startswith("masks/") and name.endswith(".npz") for name in files_a) == 3
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # temporary dirs renamed away


def test_generate_dataset_masks_follow_adapter_keys(tmp_path):
    root = dataset.generate_dataset(tmp_path / "d", 2, "dicom", seed=3, shape_xy=32)
    _, rows = read_csv(root / "labels.csv")
    assert sorted(p.name for p in (root / "masks").glob("*.npz")) == sorted(
        f"{r['scan_ref']}.npz" for r in rows
    )
    with pytest.raises(FileExistsError):
        dataset.generate_dataset(root, 2, "dicom", seed=3, shape_xy=32)
    with pytest.raises(ValueError, match="format"):
        dataset.generate_dataset(tmp_path / "e", 2, "png", shape_xy=32)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="profile"):
        dataset.generate_dataset(tmp_path / "e", 2, "dicom", shape_xy=32, profile="other")


def test_generated_datasets_ingest_cleanly(tmp_path):
    """The adapters (written against the real layouts) accept every phantom layout without quarantine."""
    for fmt in ("dicom", "nifti", "deeplesion", "ctrate", "radchest", "nsclc"):
        root = dataset.generate_dataset(tmp_path / fmt, 2, fmt, seed=5, shape_xy=32)
        assert adapters.detect_format(root) == fmt
        result = adapters.get_adapter(fmt)(root, None)
        assert result.rejected == [] and len(result.candidates) == 2, (fmt, result.rejected)
        volume = result.candidates[0].load()
        assert volume.hu.ndim == 3 and volume.hu.max() > 0


@pytest.mark.slow
def test_demo_dataset_size(tmp_path):
    """The 40-scan demo set at 128 px (the pipeline's default); generation must stay well under 30 s."""
    root = dataset.generate_dataset(tmp_path / "demo", 40, "dicom", seed=0)
    _, rows = read_csv(root / "labels.csv")
    assert len(rows) == 40 and len(list((root / "masks").glob("*.npz"))) == 40


def test_datasets_are_readable_by_other_users(tmp_path):
    """The pipeline's containers run as uid 1000: a dataset written by another user must be readable."""
    import os
    import stat

    previous = os.umask(0o022)
    try:
        root = dataset.generate_dataset(tmp_path / "ds", 2, "nsclc", seed=1, shape_xy=32)
    finally:
        os.umask(previous)
    paths = [root, *root.rglob("*")]
    assert any(p.suffix == ".npz" for p in paths) and any(p.suffix == ".csv" for p in paths)
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        wanted = 0o755 if path.is_dir() else 0o644
        assert mode & wanted == wanted, f"{path.relative_to(tmp_path)}: {oct(mode)}"
