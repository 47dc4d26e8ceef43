"""`slicefm predict`: the evaluate stage's probabilities from raw DICOM, the outputs a user reads, bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from slicefm.edge.cli import main
from slicefm.models.encoders import create_encoder
from slicefm.models.export_format import export_encoder
from slicefm.predict.bundle import ModelBundleError, load_bundle
from slicefm.predict.run import BY_FOLD, PredictError, run_predict
from slicefm.predict.scoring import check_stack
from tests.predict.conftest import KEY, Trained


def _evaluate_predictions(trained: Trained) -> pd.DataFrame:
    return pd.read_parquet(
        Path(trained.evaluate) / "location" / "pretrained" / "abmil" / "predictions.parquet"
    )


def _assert_matches_evaluate(trained: Trained, out: Path, classes: list[str]) -> None:
    """Every (scan, fold) the evaluate stage scored has the same probability from predict's fold heads."""
    ev = _evaluate_predictions(trained)
    pred = pd.read_parquet(out / BY_FOLD)
    merged = ev.merge(pred, on=["scan_id", "fold"], suffixes=("_eval", "_pred"), validate="one_to_one")
    assert len(merged) == len(ev) > 0  # same pseudonyms (same key), every evaluated row found
    for c in classes:
        np.testing.assert_allclose(merged[f"p_{c}_pred"], merged[f"p_{c}_eval"], rtol=0, atol=2e-5)


@pytest.fixture(scope="module")
def from_raw(trained: Trained, tmp_path_factory: pytest.TempPathFactory):
    bundle = load_bundle(trained.model_dir)
    out = tmp_path_factory.mktemp("predict-raw") / "out"
    return bundle, run_predict(bundle, trained.raw, out, KEY, progress=False)


def test_predict_from_raw_dicom_gives_the_evaluate_stage_probabilities(trained, from_raw):
    bundle, res = from_raw
    assert res.n_scans == 8 and res.n_quarantined == 0
    _assert_matches_evaluate(trained, res.out_dir, bundle.class_names)
    # The table: the fold heads' mean, labels by the mean of the folds' thresholds.
    by_fold = pd.read_parquet(res.out_dir / BY_FOLD)
    table = pd.read_parquet(res.out_dir / "predictions.parquet")
    thresholds = np.mean(
        [json.loads(p.read_text())["thresholds"] for p in trained.model_dir.glob("fold-*.json")], axis=0
    )
    for i, c in enumerate(bundle.class_names):
        mean = by_fold.groupby("scan_id")[f"p_{c}"].mean()
        np.testing.assert_allclose(table.set_index("scan_id")[f"p_{c}"].loc[mean.index], mean, atol=1e-12)
        assert (table[f"label_{c}"] == (table[f"p_{c}"] >= thresholds[i]).astype(int)).all()
    csv = pd.read_csv(res.out_dir / "predictions.csv")
    pd.testing.assert_frame_equal(csv, table, check_dtype=False)
    assert sorted(table["scan_id"]) == sorted(_evaluate_predictions(trained)["scan_id"].unique())


def test_predict_writes_attention_plots_a_report_and_no_identifiers(trained, from_raw):
    bundle, res = from_raw
    out = res.out_dir
    table = pd.read_parquet(out / "predictions.parquet")
    pngs = sorted(p.stem for p in (out / "attention").glob("*.png"))
    assert pngs == sorted(table["scan_id"])
    for sid, n in zip(table["scan_id"], table["n_slices"], strict=True):
        attention = np.load(out / "attention" / f"{sid}.npy")
        assert attention.shape == (n * len(bundle.windows),)  # every slice of every window
        assert attention.sum() == pytest.approx(1.0, abs=1e-4)  # one softmax over the bag, mean of folds
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") == len(table)
    assert all(sid in report for sid in table["scan_id"])
    summary = json.loads((out / "predict.json").read_text())
    assert summary["n_scans"] == 8 and summary["slices_per_s"] > 0
    assert summary["model"]["preprocess"]["size"] == 32
    # Sources relative to the source root; no DICOM patient ID or name anywhere in the outputs.
    assert all(not Path(s).is_absolute() and (trained.raw / s).is_dir() for s in table["source"])
    first = next(p for p in trained.raw.rglob("*") if p.is_file() and p.suffix in ("", ".dcm"))
    ds = pydicom.dcmread(first, stop_before_pixels=True)
    identifiers = {str(ds.PatientID), str(ds.PatientName)} - {""}
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".csv", ".json", ".html", ".parquet"):
            data = path.read_bytes()
            assert not any(i.encode() in data for i in identifiers), path


def test_predict_from_a_preprocess_output_with_the_models_preprocessing(trained, from_raw, tmp_path):
    bundle, raw = from_raw
    res = run_predict(bundle, trained.preprocessed, tmp_path / "out", progress=False)
    a = pd.read_parquet(raw.out_dir / BY_FOLD)
    b = pd.read_parquet(res.out_dir / BY_FOLD)
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=2e-5, rtol=0)


def test_a_preprocess_output_made_differently_is_refused_and_nothing_written(trained, tmp_path):
    data = tmp_path / "pre"
    shutil.copytree(trained.preprocessed, data)
    meta = json.loads((data / "preprocess.json").read_text())
    meta["config"]["size"], meta["config"]["windows"] = 48, ["abdomen", "bone"]
    (data / "preprocess.json").write_text(json.dumps(meta))
    with pytest.raises(PredictError, match=r"size: model 32, data 48") as err:
        run_predict(load_bundle(trained.model_dir), data, tmp_path / "out", progress=False)
    assert "windows" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pre"]  # no output, no staging leftovers


def test_an_ingest_output_without_volumes_is_refused_and_nothing_written(trained, tmp_path):
    """The fused data step keeps no canonical volumes by default: predict says what to give it instead."""
    data = tmp_path / "ingest"
    shutil.copytree(trained.ingested, data, ignore=shutil.ignore_patterns("volumes"))
    scans = pd.read_parquet(data / "scans.parquet")
    scans["volume"] = ""
    scans.to_parquet(data / "scans.parquet", index=False)
    with pytest.raises(PredictError, match="without canonical volumes.*give the raw data or the preprocess output"):
        run_predict(load_bundle(trained.model_dir), data, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ingest"]


def _rewrite_series(src: Path, dest: Path, **attrs) -> None:
    dest.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(f)
        for k, v in attrs.items():
            setattr(ds, k, v)
        if "SeriesInstanceUID" in attrs:
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(dest / f.name)


def test_good_scans_are_predicted_and_bad_ones_quarantined_with_reasons(trained, from_raw, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(trained.raw, src)  # the cohort (a pseudonym input) is named as before
    series = sorted({p.parent for p in src.rglob("*") if p.is_file() and p.parent != src})
    _rewrite_series(
        series[0], src / "bad" / "mr", Modality="MR", SeriesInstanceUID=pydicom.uid.generate_uid()
    )
    (src / "bad" / "cut.dcm").write_bytes((next(series[1].iterdir())).read_bytes()[:600])
    res = run_predict(
        load_bundle(trained.model_dir), src, tmp_path / "out", KEY, cohort="raw", progress=False
    )
    assert res.n_scans == 8
    quarantine = pd.read_csv(res.out_dir / "quarantine.csv")
    reasons = dict(zip(quarantine["file"], quarantine["reason"], strict=True))
    assert any(f.startswith("bad/mr") and "MR" in r for f, r in reasons.items()), reasons
    assert any(f.startswith("bad/cut.dcm") for f in reasons), reasons
    good = pd.read_parquet(res.out_dir / "predictions.parquet").set_index("scan_id")
    before = pd.read_parquet(from_raw[1].out_dir / "predictions.parquet").set_index("scan_id")
    pd.testing.assert_frame_equal(
        good.drop(columns="source"), before.drop(columns="source"), atol=2e-5, check_exact=False
    )


def test_no_usable_scan_is_an_error_and_writes_nothing(trained, tmp_path):
    series = sorted({p.parent for p in trained.raw.rglob("*") if p.is_file() and p.parent != trained.raw})
    _rewrite_series(series[0], tmp_path / "src" / "mr", Modality="MR")
    with pytest.raises(PredictError, match="no usable scan.*MR"):
        run_predict(load_bundle(trained.model_dir), tmp_path / "src", tmp_path / "out", KEY, progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def _copy_model(trained: Trained, dest: Path) -> Path:
    shutil.copytree(trained.model_dir, dest)
    return dest


def test_models_that_cannot_be_applied_are_refused_with_the_reason(trained, tmp_path):
    no_encoder = _copy_model(trained, tmp_path / "no-encoder")
    shutil.rmtree(no_encoder / "encoder")
    with pytest.raises(ModelBundleError, match="no encoder beside the heads"):
        load_bundle(no_encoder)

    other = _copy_model(trained, tmp_path / "other-encoder")
    export_encoder(
        create_encoder("vit_tiny_test", 32, 1), str(other / "encoder"), {"input_channels": "per_window"}
    )
    with pytest.raises(ModelBundleError, match="not the ones the heads' embeddings were made with"):
        load_bundle(other)

    unlinked = _copy_model(trained, tmp_path / "unlinked")
    (unlinked / "lineage.json").write_text(json.dumps({"kind": "head", "lineage": {"task": "location"}}))
    load_bundle(unlinked)  # fine on its own...
    with pytest.raises(ModelBundleError, match="names no encoder version"):
        load_bundle(unlinked, require_encoder_version=True)  # ...but not as a registered model

    old = _copy_model(trained, tmp_path / "old")
    for path in old.glob("fold-*.json"):
        meta = json.loads(path.read_text())
        del meta["preprocess"]
        path.write_text(json.dumps(meta))
    with pytest.raises(ModelBundleError, match="do not record the preprocessing"):
        load_bundle(old)

    odd = _copy_model(trained, tmp_path / "odd")
    for path in odd.glob("fold-*.json"):
        meta = json.loads(path.read_text())
        meta["preprocess"]["windows"] = ["no-such-window"]
        path.write_text(json.dumps(meta))
    with pytest.raises(ModelBundleError, match="cannot be reproduced by this slicefm.*no-such-window"):
        load_bundle(odd)


def test_a_stack_not_made_by_the_models_preprocessing_is_refused(trained):
    bundle = load_bundle(trained.model_dir)
    good = np.zeros((3, 2, 32, 32), np.uint8)
    check_stack(bundle, good)
    for bad, match in (
        (np.zeros((3, 2, 48, 48), np.uint8), "32x32 slices; got 48x48"),
        (np.zeros((3, 3, 32, 32), np.uint8), "2 channels"),
        (np.zeros((3, 2, 32, 32), np.float32), "uint8"),
        (np.zeros((2, 32, 32), np.uint8), "shape"),
    ):
        with pytest.raises(ValueError, match=match):
            check_stack(bundle, bad)


def test_cli_predict_prints_the_table_and_never_overwrites_without_force(
    trained, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("SLICEFM_PSEUDONYM_KEY", KEY.decode())
    out = tmp_path / "out"
    args = [
        "predict",
        "--model-dir",
        str(trained.model_dir),
        "--source",
        trained.preprocessed,
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "predicted 8 scans" in printed and "slices/s" in printed and "report.html" in printed
    first = (out / "predictions.csv").read_bytes()
    assert main(args) == 2  # exists: refused, untouched
    assert (out / "predictions.csv").read_bytes() == first
    assert main([*args, "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
