"""Pseudonymisation keys/IDs and the manifest schemas."""

from __future__ import annotations

import stat

import pandas as pd
import pytest

from slicefm.data import pseudonym
from slicefm.data.ingest import label_slug
from slicefm.data.schemas import LesionsSchema, ScansSchema, SchemaValidationError, validate

KEY = b"k" * 32


def test_pseudonyms_are_keyed_stable_and_cohort_scoped():
    a = pseudonym.patient_pseudonym(KEY, "c1", "PAT-001")
    assert a == pseudonym.patient_pseudonym(KEY, "c1", "PAT-001")
    assert a != pseudonym.patient_pseudonym(b"x" * 32, "c1", "PAT-001")
    assert a != pseudonym.patient_pseudonym(KEY, "c2", "PAT-001")
    assert a.startswith("P") and len(a) == 17 and "PAT" not in a
    assert pseudonym.scan_pseudonym(KEY, "c1", "1.2.3").startswith("S")


def test_load_key_env_then_file(tmp_path):
    assert pseudonym.load_key(None, {pseudonym.KEY_ENV: "e" * 20}) == b"e" * 20
    key_file = tmp_path / "sub" / "pseudonym.key"
    first = pseudonym.load_key(key_file, {})
    assert len(first) == 64 and pseudonym.load_key(key_file, {}) == first
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    with pytest.raises(ValueError, match="too short"):
        pseudonym.load_key(None, {pseudonym.KEY_ENV: "short"})
    with pytest.raises(ValueError, match="no pseudonymisation key"):
        pseudonym.load_key(None, {})


def _scan_row(**over):
    row = dict(
        scan_id="S" + "a" * 16,
        patient_id="P" + "b" * 16,
        cohort="c",
        format="dicom",
        source="x",
        volume="v",
        modality="CT",
        n_slices=10,
        height=64,
        width=64,
        spacing_z_mm=2.5,
        spacing_y_mm=0.7,
        spacing_x_mm=0.7,
        split="train",
        scanner="",
        label_liver=1,
    )
    row.update(over)
    return row


def test_scans_schema_accepts_valid_and_names_every_failure():
    validate(pd.DataFrame([_scan_row()]), ScansSchema, "scans")
    bad = pd.DataFrame([_scan_row(patient_id="John Doe", n_slices=1, label_liver=7, modality="MR")])
    with pytest.raises(SchemaValidationError) as err:
        validate(bad, ScansSchema, "scans")
    for col in ("patient_id", "n_slices", "label_liver", "modality"):
        assert col in str(err.value)
    with pytest.raises(SchemaValidationError, match="PatientName"):
        validate(pd.DataFrame([_scan_row(PatientName="Doe^John")]), ScansSchema, "scans")


def test_lesion_boxes_must_be_ordered():
    row = dict(
        scan_id="S" + "a" * 16,
        lesion_index=0,
        key_slice=3,
        x0=10.0,
        y0=5.0,
        x1=4.0,
        y1=9.0,
        lesion_type=4,
        lesion_name="liver",
    )
    with pytest.raises(SchemaValidationError, match="boxes_are_ordered"):
        validate(pd.DataFrame([row]), LesionsSchema, "lesions")


def test_label_slug():
    assert label_slug("Arterial wall calcification") == "arterial_wall_calcification"
    assert label_slug("location_soft_tissue") == "location_soft_tissue"
