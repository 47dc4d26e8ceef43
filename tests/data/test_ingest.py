"""Ingestion end to end on real files: every adapter, every bad-input class, PHI absence, exit codes."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from slicefm.core.store import open_store
from slicefm.data.adapters.ctrate import CTRATE_CLASSES
from slicefm.data.ingest import NoUsableScansError, ingest, label_slug, read_lesions, read_scans
from slicefm.edge.cli import main as cli_main
from slicefm.phantom.dataset import generate_dataset

KEY = b"test-key-0123456789abcdef"
PHI_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
            "ReferringPhysicianName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")  # fmt: skip


@pytest.fixture(scope="module")
def dicom_source(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("src") / "dicom", 4, "dicom", seed=3, shape_xy=64)


def _series_dirs(root: Path) -> list[Path]:
    files = [p for p in root.rglob("*") if p.is_file() and len(p.relative_to(root).parts) >= 3]
    return sorted({p.parent for p in files if "masks" not in p.parts})


def _phi_values(root: Path) -> set[str]:
    values = set()
    for path in root.rglob("*"):
        if path.is_file() and "masks" not in path.parts and path.suffix not in (".csv", ".json"):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except pydicom.errors.InvalidDicomError:
                continue
            for tag in PHI_TAGS:
                v = str(getattr(ds, tag, "") or "")
                if len(v) >= 4:
                    values.add(v)
    return values


def _rewrite(files: list[Path], dest: Path, edit) -> None:
    """Copy a series under a new SeriesInstanceUID, editing every dataset (edit(ds, index) -> ds or None to drop)."""
    dest.mkdir(parents=True)
    uid = pydicom.uid.generate_uid(entropy_srcs=[str(dest)])
    for i, f in enumerate(sorted(files)):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = uid
        ds = edit(ds, i)
        if ds is not None:
            ds.save_as(dest / f.name)


def _sorted_by_z(files: list[Path]) -> list[Path]:
    return sorted(
        files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
    )


@pytest.fixture(scope="module")
def messy_source(dicom_source, tmp_path_factory) -> Path:
    """The phantom DICOM tree plus one example of every bad-input class."""
    root = tmp_path_factory.mktemp("messy") / "src"
    shutil.copytree(dicom_source, root)
    series = _series_dirs(root)
    files = sorted(p for p in series[0].iterdir())
    bad = root / "bad"

    def set_attr(name, value):
        def edit(ds, i):
            setattr(ds, name, value)
            return ds

        return edit

    _rewrite(files, bad / "mr", set_attr("Modality", "MR"))
    _rewrite(files, bad / "scout", set_attr("ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    _rewrite(files[:1], bad / "single", lambda ds, i: ds)

    def no_rescale(ds, i):
        del ds.RescaleSlope
        del ds.RescaleIntercept
        return ds

    _rewrite(files, bad / "norescale", no_rescale)
    ordered = _sorted_by_z(files)
    shift_name = ordered[len(ordered) // 2].name

    def gap(ds, i):
        if Path(ds.filename).name == shift_name:
            pos = list(ds.ImagePositionPatient)
            ds.ImagePositionPatient = [pos[0], pos[1], pos[2] + 0.45 * float(ds.SliceThickness)]
        return ds

    _rewrite(files, bad / "spacing", gap)
    tilt_name = ordered[1].name

    def mixed(ds, i):
        if Path(ds.filename).name == tilt_name:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0.98, 0.199]
        return ds

    _rewrite(files, bad / "orientation", mixed)

    def constant(ds, i):
        ds.PixelData = np.full((ds.Rows, ds.Columns), 1000, dtype=ds.pixel_array.dtype).tobytes()
        return ds

    _rewrite(files, bad / "constant", constant)
    (bad / "notes.txt").write_text("not a dicom file")
    trunc = bad / "truncated"
    trunc.mkdir()
    (trunc / "x.dcm").write_bytes(files[0].read_bytes()[:600])
    return root


def test_good_scans_survive_every_bad_input(messy_source, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    res = ingest(messy_source, str(tmp_path / "out"), KEY, "dicom", "messy", workers=1)
    assert res.n_scans == 4
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    reasons = dict(zip(q["file"], q["reason"], strict=True))

    def reason(fragment: str) -> str:
        hits = [r for f, r in reasons.items() if fragment in f]
        assert hits, f"{fragment} not quarantined: {reasons}"
        return hits[0]

    assert "MR" in reason("bad/mr")
    assert "localizer" in reason("bad/scout").lower()
    assert "single-slice" in reason("bad/single")
    assert "Rescale" in reason("bad/norescale")
    assert "spacing" in reason("bad/spacing")
    assert "orientation" in reason("bad/orientation")
    assert "constant" in reason("bad/constant")
    assert "not a DICOM" in reason("notes.txt")
    assert "truncated" in reason("bad/truncated")
    scans = read_scans(open_store(str(tmp_path / "out")))
    assert len(scans) == 4 and set(scans["format"]) == {"dicom"}
    # Targets came through labels.csv (keyed by series) and lesions.csv.
    labels = pd.read_csv(messy_source / "labels.csv", dtype=str)
    assert sorted(c for c in scans.columns if c.startswith("label_")) == sorted(
        "label_" + label_slug(c) for c in labels.columns if c not in ("scan_ref", "patient_ref")
    )
    lesions = read_lesions(open_store(str(tmp_path / "out")))
    assert len(lesions) == len(pd.read_csv(messy_source / "lesions.csv"))
    # Two scans of the same patient share a pseudonym; counts match the source table.
    assert scans["patient_id"].nunique() == labels["patient_ref"].nunique()
    # Canonical volumes are int16 HU with the manifest's shape; masks were carried along.
    vol = np.load(tmp_path / "out" / scans["volume"].iloc[0])
    assert vol.dtype == np.int16 and vol.shape == tuple(scans.iloc[0][["n_slices", "height", "width"]])
    assert vol.min() == -1024 and vol.max() > 300
    assert len(list((tmp_path / "out" / "masks").glob("S*.npz"))) == 4
    # No identifier from any DICOM header in any output file or log line.
    phi = _phi_values(messy_source)
    assert phi
    blobs = [p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file() and p.suffix != ".npy"]
    for value in phi:
        assert not any(value.encode() in b for b in blobs), f"PHI value leaked into outputs: {value[:4]}..."
        assert value not in caplog.text


def test_everything_bad_exits_non_zero_with_summary(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.dcm").write_bytes(b"garbage")
    (src / "b.txt").write_text("nothing")
    with pytest.raises(NoUsableScansError, match="2 inputs quarantined"):
        ingest(src, str(tmp_path / "out"), KEY, "dicom")
    assert len(pd.read_csv(tmp_path / "out" / "quarantine.csv")) == 2
    monkeypatch.setenv("SLICEFM_PSEUDONYM_KEY", KEY.decode())
    assert (
        cli_main(["ingest", "--source", str(src), "--out", str(tmp_path / "out2"), "--format", "dicom"]) == 2
    )


def test_bad_label_tables_are_quarantined_not_fatal(dicom_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(dicom_source, src)
    labels = pd.read_csv(src / "labels.csv", dtype=str)
    labels.loc[0, labels.columns[2]] = "maybe"  # non-binary value
    extra = labels.iloc[[1]].copy()
    extra["scan_ref"] = "1.2.3.4.5.6.7"  # names no scan
    pd.concat([labels, extra]).to_csv(src / "labels.csv", index=False)
    res = ingest(src, str(tmp_path / "out"), KEY, "dicom")
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    assert res.n_scans == 4
    assert any("non-binary" in r for r in q["reason"])
    assert any("matches no scan" in r for r in q["reason"])
    assert not q["reason"].str.contains("1.2.3.4.5.6.7", regex=False).any()
    scans = read_scans(open_store(str(tmp_path / "out")))
    assert (scans.filter(like="label_") == -1).all(axis=1).sum() == 1  # the row with the bad value: unknown

    labels.rename(columns={"scan_ref": "id", "patient_ref": "pid"}).to_csv(src / "labels.csv", index=False)
    res = ingest(src, str(tmp_path / "out2"), KEY, "dicom")
    q = pd.read_csv(tmp_path / "out2" / "quarantine.csv")
    assert res.n_scans == 4 and q["reason"].str.contains("key column").any()


def test_nifti_adapter_and_bad_nifti(tmp_path):
    src = generate_dataset(tmp_path / "nii", 3, "nifti", seed=4, shape_xy=64)
    nib.save(nib.Nifti1Image(np.full((8, 8, 4), np.nan, np.float32), np.eye(4)), src / "nan_scan.nii.gz")
    (src / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    res = ingest(src, str(tmp_path / "out"), KEY)  # auto-detects nifti
    assert res.fmt == "nifti" and res.n_scans == 3
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    assert set(q["file"]) == {"nan_scan.nii.gz", "broken.nii.gz"}
    assert q["reason"].str.contains("NaN", case=False).any()


def test_deeplesion_adapter(tmp_path):
    src = generate_dataset(tmp_path / "dl", 4, "deeplesion", seed=5, shape_xy=64)
    res = ingest(src, str(tmp_path / "out"), KEY)
    assert res.fmt == "deeplesion" and res.n_quarantined == 0
    info = pd.read_csv(src / "DL_info.csv")
    scans = read_scans(open_store(str(tmp_path / "out")))
    lesions = read_lesions(open_store(str(tmp_path / "out")))
    assert len(lesions) == len(info)
    assert set(scans["split"]) <= {"train", "val", "test"} and scans["split"].ne("").all()
    # Each key slice carries the box DL_info gives, and its lesion type sets the location label.
    for _, row in info.iterrows():
        hits = lesions[(lesions.lesion_type == row.Coarse_lesion_type)]
        box = [float(v) for v in row.Bounding_boxes.split(",")]
        assert any(np.allclose(h[["x0", "y0", "x1", "y1"]].astype(float), box) for _, h in hits.iterrows())
    for _, les in lesions.iterrows():
        scan = scans[scans.scan_id == les.scan_id].iloc[0]
        assert scan["label_" + les.lesion_name] == 1
    spacing = [float(v) for v in info.Spacing_mm_px_.iloc[0].split(",")]
    assert spacing[2] in set(scans["spacing_z_mm"].round(6))


def test_ctrate_adapter_takes_spacing_and_rescale_from_metadata(tmp_path):
    src = generate_dataset(tmp_path / "ct", 4, "ctrate", seed=6, shape_xy=64)
    res = ingest(src, str(tmp_path / "out"), KEY)
    assert res.fmt == "ctrate" and res.n_scans == 4 and res.n_quarantined == 0
    scans = read_scans(open_store(str(tmp_path / "out")))
    meta = pd.concat(pd.read_csv(p) for p in (src / "dataset" / "metadata").glob("*.csv"))
    assert sorted(scans["spacing_z_mm"].round(4)) == sorted(meta["ZSpacing"].round(4))  # header says 1 mm
    assert {"train", "test"} >= set(scans["split"])
    assert [c for c in scans.columns if c.startswith("label_")] == [
        "label_" + label_slug(c) for c in CTRATE_CLASSES
    ]
    vol = np.load(tmp_path / "out" / scans["volume"].iloc[0])
    assert vol.min() == -1024  # stored values were shifted by +1024; HU restored with the CSV intercept


def test_radchest_and_nsclc_adapters(tmp_path):
    src = generate_dataset(tmp_path / "rc", 4, "radchest", seed=7, shape_xy=64)
    res = ingest(src, str(tmp_path / "out_rc"), KEY)
    assert res.fmt == "radchest" and res.n_scans == 4 and res.n_quarantined == 0
    scans = read_scans(open_store(str(tmp_path / "out_rc")))
    assert np.allclose(scans["spacing_z_mm"], 0.8)
    src = generate_dataset(tmp_path / "ns", 3, "nsclc", seed=8, shape_xy=64)
    res = ingest(src, str(tmp_path / "out_ns"), KEY)
    assert res.fmt == "nsclc" and res.n_scans == 3
    scans = read_scans(open_store(str(tmp_path / "out_ns")))
    clinical = pd.read_csv(next(src.glob("NSCLC-Radiomics-Lung1*.csv")))
    expected = sorted(int(str(s).upper().startswith(("III", "IV"))) for s in clinical["Overall.Stage"])
    assert sorted(scans["label_stage"]) == expected
    summary = json.loads((tmp_path / "out_ns" / "dataset.json").read_text())
    assert summary["n_scans"] == 3 and summary["labels"] == ["label_stage"]


# --- mixed NIfTI + DICOM trees ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_source(dicom_source, tmp_path_factory) -> Path:
    """The 4-series DICOM tree plus 2 NIfTI volumes in a subfolder; one labels/lesions table, one masks/."""
    root = tmp_path_factory.mktemp("mixed") / "src"
    shutil.copytree(dicom_source, root)
    nii = generate_dataset(tmp_path_factory.mktemp("nii") / "nii", 2, "nifti", seed=9, shape_xy=64)
    (root / "exports").mkdir()
    for path in nii.glob("*.nii.gz"):
        shutil.copy(path, root / "exports" / path.name)
    for path in (nii / "masks").glob("*.npz"):
        shutil.copy(path, root / "masks" / path.name)
    for table in ("labels.csv", "lesions.csv"):
        merged = pd.concat([pd.read_csv(root / table, dtype=str), pd.read_csv(nii / table, dtype=str)])
        merged.to_csv(root / table, index=False)
    (root / "notes.txt").write_text("export log, neither DICOM nor NIfTI")
    return root


def test_mixed_tree_ingests_both_formats(mixed_source, tmp_path, caplog):
    from slicefm.data.adapters import detect_format

    caplog.set_level(logging.INFO)
    assert detect_format(mixed_source) == "dicom+nifti"
    res = ingest(mixed_source, str(tmp_path / "out"), KEY, workers=1)  # --format auto
    assert res.fmt == "dicom+nifti" and res.n_scans == 6
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    assert list(q["file"]) == ["notes.txt"] and list(q["reason"]) == ["not a DICOM file"]
    scans = read_scans(open_store(str(tmp_path / "out")))
    assert scans["format"].value_counts().to_dict() == {"dicom": 4, "nifti": 2}
    assert set(scans.loc[scans["format"] == "nifti", "source"]) == {
        f"exports/{p.name}" for p in (mixed_source / "exports").iterdir()
    }
    # One label table serves both formats: every scan found its row, none is reported unmatched.
    labels = scans.filter(like="label_")
    assert labels.shape[1] > 0 and (labels >= 0).all().all()
    lesions = read_lesions(open_store(str(tmp_path / "out")))
    assert len(lesions) == len(pd.read_csv(mixed_source / "lesions.csv"))
    assert len(list((tmp_path / "out" / "masks").glob("S*.npz"))) == 6
    summary = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert summary["source_format"] == "dicom+nifti"
    assert summary["n_scans_by_format"] == {"dicom": 4, "nifti": 2}
    assert "4 DICOM series and 2 NIfTI volumes" in caplog.text


@pytest.mark.parametrize(("fmt", "n_scans", "other", "reason"), [
    ("dicom", 4, ".nii.gz", "not a DICOM file"),
    ("nifti", 2, ".dcm", "not a NIfTI file"),
])  # fmt: skip
def test_explicit_format_on_a_mixed_tree_keeps_quarantining_the_other(
    mixed_source, tmp_path, fmt, n_scans, other, reason
):
    res = ingest(mixed_source, str(tmp_path / "out"), KEY, fmt, workers=1)
    assert res.fmt == fmt and res.n_scans == n_scans
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    files = q[q["file"].str.endswith(other)]
    n_other = sum(1 for p in mixed_source.rglob(f"*{other}") if "masks" not in p.parts)
    assert len(files) == n_other > 0 and files["reason"].str.startswith(reason).all()
    assert set(read_scans(open_store(str(tmp_path / "out")))["format"]) == {fmt}


def test_plain_trees_keep_their_format(dicom_source, tmp_path):
    from slicefm.data.adapters import detect_format

    nii = generate_dataset(tmp_path / "nii", 2, "nifti", seed=10, shape_xy=64)
    (nii / "notes.txt").write_text("not an image")  # a stray non-DICOM file does not make it mixed
    assert detect_format(nii) == "nifti"
    assert detect_format(dicom_source) == "dicom"


# --- tilted gantry, non-image DICOM objects ----------------------------------------------------------


def _tilt(drift_y_mm: float, rank: dict[str, int], tag: str | None = None):
    """_rewrite edit shifting ImagePositionPatient in y by k * drift (k = rank[file name] along z)."""

    def edit(ds, i):
        ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient[1] += rank[Path(ds.filename).name] * drift_y_mm
        if tag is not None:
            ds.GantryDetectorTilt = tag
        return ds

    return edit


@pytest.fixture(scope="module")
def tilted_source(dicom_source, tmp_path_factory) -> Path:
    """One straight series and two copies with a y drift: 0.5 deg (kept) and 12 deg (quarantined)."""
    root = tmp_path_factory.mktemp("tilt") / "src"
    files = sorted(p for p in _series_dirs(dicom_source)[0].iterdir())
    ordered = _sorted_by_z(files)
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in ordered]
    spacing = float(np.median(np.diff(z)))
    rank = {f.name: k for k, f in enumerate(ordered)}
    for name, deg, tag in (("small", 0.5, "0"), ("large", 12.0, None)):
        _rewrite(files, root / "tilted" / name, _tilt(spacing * np.tan(np.radians(deg)), rank, tag))
    _rewrite(files, root / "straight", lambda ds, i: ds)
    return root


def test_tilted_series_kept_with_angle_or_quarantined(tilted_source, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    res = ingest(tilted_source, str(tmp_path / "out"), KEY, "dicom", workers=1)
    assert res.n_scans == 2
    scans = read_scans(open_store(str(tmp_path / "out"))).set_index("source")
    assert scans.loc["straight", "tilt_deg"] == 0.0
    assert scans.loc["tilted/small", "tilt_deg"] == pytest.approx(0.5, abs=1e-3)
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    assert q.to_dict("records") == [
        {
            "file": "tilted/large",
            "reason": "gantry tilt 12.00 deg exceeds max_tilt_deg 1; resample onto axial slices before "
            "ingestion or raise ingest.max_tilt_deg",
        }
    ]
    warnings = [r.getMessage() for r in caplog.records if "tilted/small" in r.getMessage()]
    assert len(warnings) == 1 and "gantry tilt 0.50 deg kept" in warnings[0]
    assert "GantryDetectorTilt says 0 deg" in warnings[0]  # the header disagrees with the geometry
    assert not any("straight" in r.getMessage() for r in caplog.records)


def test_max_tilt_from_config_and_cli(tilted_source, tmp_path, monkeypatch):
    from slicefm.config import config_from_yaml

    root = tilted_source
    assert config_from_yaml("ingest: {max_tilt_deg: 15}").ingest.max_tilt_deg == 15.0
    res = ingest(root, str(tmp_path / "out"), KEY, "dicom", max_tilt_deg=15.0)
    assert res.n_scans == 3 and res.n_quarantined == 0
    monkeypatch.setenv("SLICEFM_PSEUDONYM_KEY", KEY.decode())
    args = ["ingest", "--source", str(root), "--out", str(tmp_path / "cli"), "--format", "dicom"]
    assert cli_main([*args, "--max-tilt-deg", "0.1"]) == 0
    q = pd.read_csv(tmp_path / "cli" / "quarantine.csv")
    assert sorted(q["file"]) == ["tilted/large", "tilted/small"]
    assert read_scans(open_store(str(tmp_path / "cli")))["tilt_deg"].tolist() == [0.0]


def _non_image(path: Path, sop_class: str, modality: str) -> None:
    """A minimal valid non-image DICOM object (no pixel data), written as a Part 10 file."""
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.Modality, ds.PatientID = modality, "PHA-RT-0001"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_non_image_objects_are_named_not_called_truncated(dicom_source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(dicom_source, src)
    series = _series_dirs(src)[0]
    raw = next(series.glob("*.dcm")).read_bytes()
    _non_image(series / "rtstruct.dcm", "1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT")
    _non_image(src / "rt" / "plan.dcm", "1.2.840.10008.5.1.4.1.1.481.5", "RTPLAN")
    _non_image(src / "rt" / "report.dcm", "1.2.840.10008.5.1.4.1.1.88.11", "SR")
    (src / "rt" / "cut.dcm").write_bytes(raw[: raw.index(b"\xe0\x7f\x10\x00")])  # CT header, no pixels
    res = ingest(src, str(tmp_path / "out"), KEY, workers=1)
    assert res.fmt == "dicom" and res.n_scans == 4
    q = pd.read_csv(tmp_path / "out" / "quarantine.csv")
    reasons = {Path(f).name: r for f, r in zip(q["file"], q["reason"], strict=True)}
    assert reasons == {
        "rtstruct.dcm": "not an image: RT Structure Set Storage",
        "plan.dcm": "not an image: RT Plan Storage",
        "report.dcm": "not an image: Basic Text SR Storage",
        "cut.dcm": "truncated/corrupt DICOM: no pixel data (file cut short or not an image object)",
    }


def test_a_failure_half_way_leaves_no_output_behind(dicom_source, tmp_path, monkeypatch):
    """Volumes are written as scans are read; a failure after that must not leave a half-written output."""
    import slicefm.data.ingest as ingest_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ingest_module, "write_manifests", broken)
    with pytest.raises(OSError, match="disk full"):
        ingest(dicom_source, str(tmp_path / "out"), KEY, "dicom")
    assert list(tmp_path.iterdir()) == []  # neither the output nor its staging directory
    monkeypatch.undo()
    res = ingest(dicom_source, str(tmp_path / "out"), KEY, "dicom")
    assert res.out_uri.rstrip("/").endswith("out") and res.n_scans == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert len(list((tmp_path / "out" / "volumes").iterdir())) == 4


def test_ingest_starts_the_largest_scans_first_and_reports_in_candidate_order(tmp_path):
    """Longest-processing-time order: with one worker the scans are read largest first (by the bytes each
    adapter records), and the results still come back in the candidates' order."""
    from concurrent.futures import ThreadPoolExecutor
    from functools import partial

    from slicefm.data import ingest as ingest_module
    from slicefm.data.adapters import get_adapter

    for fmt in ("dicom", "nifti"):
        root = generate_dataset(tmp_path / fmt, 4, fmt, seed=7, shape_xy=32)
        cands = get_adapter(fmt)(root, None).candidates
        files = [sorted((root / c.source).glob("*.dcm")) if fmt == "dicom" else [root / c.source] for c in cands]
        assert [c.size_bytes for c in cands] == [sum(f.stat().st_size for f in fs) for fs in files]
        assert len({c.size_bytes for c in cands}) > 1  # the phantom's scans differ in length
        seen: list[int] = []
        with ThreadPoolExecutor(1) as pool:
            loaded = ingest_module._load_all(
                cands, b"k" * 32, "t", str(tmp_path / f"out-{fmt}"), 1.0,
                per_scan=partial(_record_sizes, seen), keep_volumes=False, pool=pool,
            )  # fmt: skip
        assert [res.index for res in loaded] == list(range(len(cands)))
        by_size = sorted(range(len(cands)), key=lambda i: -cands[i].size_bytes)
        assert by_size != list(range(len(cands)))  # else the order would not show
        assert seen == [loaded[i].shape[0] for i in by_size]  # read in that order


def _record_sizes(seen: list[int], scan_id: str, hu: np.ndarray, cand, spacing_z_mm: float) -> int:
    seen.append(hu.shape[0])
    return hu.shape[0]
