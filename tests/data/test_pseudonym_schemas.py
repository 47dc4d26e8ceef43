"""Pseudonymisation keys/IDs and the manifest schemas."""

from __future__ import annotations

import json
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


def test_key_rule_env_then_key_file_then_user_config_dir(tmp_path, monkeypatch):
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    assert pseudonym.load_key({**env, pseudonym.KEY_ENV: "e" * 20}) == b"e" * 20
    # Never created silently: the error names the path and how to make a key; nothing is written.
    with pytest.raises(pseudonym.MissingKeyError, match=r"cfg/slicefm/pseudonym.key.*slicefm key init"):
        pseudonym.load_key(env)
    assert not (tmp_path / "cfg").exists()
    created = pseudonym.load_key(env, create=True)
    key_file = tmp_path / "cfg" / "slicefm" / "pseudonym.key"
    assert len(created) == 64 and pseudonym.load_key(env) == created
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # The rule does not depend on the working directory (the bug: a second key per folder).
    monkeypatch.chdir(tmp_path / "cfg")
    assert pseudonym.load_key(env) == created and pseudonym.key_file_path(env) == key_file
    other = tmp_path / "site.key"
    other.write_text("s" * 32)
    assert pseudonym.load_key({**env, pseudonym.KEY_FILE_ENV: str(other)}) == b"s" * 32
    with pytest.raises(FileExistsError):
        pseudonym.create_key(key_file)  # an existing key is never replaced
    assert pseudonym.load_key(env) == created
    with pytest.raises(ValueError, match="too short"):
        pseudonym.load_key({pseudonym.KEY_ENV: "short"})


def test_key_fingerprint_identifies_the_key_without_revealing_it():
    fp = pseudonym.key_fingerprint(KEY)
    assert fp == pseudonym.key_fingerprint(KEY) != pseudonym.key_fingerprint(b"x" * 32)
    assert fp.startswith("K") and len(fp) == 17 and KEY.decode()[:8] not in fp
    assert fp[1:] not in pseudonym.patient_pseudonym(KEY, "c", "k")
    same = {"a": fp, "b": fp, "old": None}
    assert pseudonym.require_same_key(same, "test") == fp
    with pytest.raises(pseudonym.KeyMismatchError, match=r"a: K.*b: K"):
        pseudonym.require_same_key({"a": fp, "b": pseudonym.key_fingerprint(b"x" * 32)}, "test")


def test_key_cli_init_show_and_ingest_from_any_folder(tmp_path, monkeypatch, capsys, caplog):
    from slicefm.edge.cli import main as cli_main
    from slicefm.phantom.dataset import generate_dataset

    dicom_source = generate_dataset(tmp_path / "src", 2, "dicom", seed=3, shape_xy=64)

    monkeypatch.delenv(pseudonym.KEY_FILE_ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # No key yet: ingest refuses (exit 2) and creates none, here or anywhere.
    args = ["ingest", "--source", str(dicom_source), "--format", "dicom"]
    assert cli_main([*args, "--out", str(tmp_path / "o0")]) == 2
    assert "slicefm key init" in caplog.text
    assert not (tmp_path / "cfg").exists() and not (elsewhere / ".slicefm").exists()
    assert cli_main(["key", "init"]) == 0
    fp = pseudonym.key_fingerprint(pseudonym.load_key())
    assert fp in capsys.readouterr().out
    assert cli_main(["key", "init"]) == 1 and cli_main(["key", "init", "--if-missing"]) == 0
    capsys.readouterr()
    assert cli_main(["key", "show"]) == 0 and fp in capsys.readouterr().out
    assert cli_main([*args, "--out", str(tmp_path / "o1")]) == 0
    monkeypatch.chdir(tmp_path)  # another folder: the same key, so the same pseudonyms
    assert cli_main([*args, "--out", str(tmp_path / "o2")]) == 0
    ids = [pd.read_parquet(tmp_path / o / "scans.parquet")["patient_id"].tolist() for o in ("o1", "o2")]
    assert ids[0] == ids[1]
    assert json.loads((tmp_path / "o1" / "dataset.json").read_text())["pseudonym_key_fingerprint"] == fp


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
