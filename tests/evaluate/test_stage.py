"""The evaluate and external stages on embedding sets written in the extract output format."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from kfp.dsl import ClassificationMetrics, Metrics
from mlflow.tracking import MlflowClient
from scipy import stats

from slicefm.config import PipelineConfig
from slicefm.data.pseudonym import KeyMismatchError
from slicefm.edge.kfp_reports import comparison_scalars, log_headline_metrics, log_run_roc
from slicefm.edge.stages import evaluate_stage
from slicefm.edge.tracking import mlflow_runs
from slicefm.embed.extract import EXTRACT_FORMAT_VERSION, embedding_key
from slicefm.evaluate.config import EvaluateConfig, ExternalConfig
from slicefm.evaluate.external_stage import run_external_stage
from slicefm.evaluate.paired import NOT_RESOLVED
from slicefm.evaluate.report import RowKey
from slicefm.evaluate.splits import Splits
from slicefm.evaluate.stage import load_heads, resolve_label_columns, run_evaluate
from slicefm.evaluate.summary import Comparison

D = 16
CLASSES = ["liver", "lung", "bone"]
WINDOWS = ["abdomen", "lung"]
KEY_A, KEY_B = "K" + "a" * 16, "K" + "b" * 16  # fingerprints of two pseudonymisation keys




def write_set(
    root: Path,
    label: str,
    n_scans: int,
    seed: int,
    strength: float,
    shift: float = 0.0,
    key_fingerprint: str | None = KEY_A,
    encoder_key_fingerprint: str | None = None,
) -> str:
    """An extract output: per scan and window [n, D] float16; a positive class puts its direction on one
    slice of the abdomen window (strength 0 = pure noise). Patients own 1-2 scans; stage = liver.
    `key_fingerprint`: the pseudonymisation key of its data; `encoder_key_fingerprint`: of the encoder's
    pretraining data."""
    rng = np.random.default_rng(seed)
    scans, slices, index = [], [], []
    for i in range(n_scans):
        sid, pid = f"S{i:016x}", f"P{i // 2 if i % 3 else i + 1000:016x}"
        n = int(rng.integers(10, 20))
        y = (rng.random(len(CLASSES)) < 0.4).astype(int)
        key = np.zeros(n, bool)
        for w in WINDOWS:
            x = rng.normal(size=(n, D)) + shift
            if w == "abdomen":
                for c in np.flatnonzero(y):
                    k = int(rng.integers(n))
                    x[k, c] += strength
                    key[k] = True
            path = root / embedding_key(w, sid)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, x.astype(np.float16))
            index.append({"scan_id": sid, "window": w, "key": embedding_key(w, sid), "n_slices": n, "dim": D,
                          "patches_key": "", "root": ""})  # fmt: skip
        scans.append({"scan_id": sid, "patient_id": pid, **{f"label_location_{c}": int(v) for c, v in zip(CLASSES, y, strict=True)},
                      "label_stage": int(y[0]), "label_other": -1})  # fmt: skip
        slices += [
            {"scan_id": sid, "row": r, "z_mm": 2.5 * r, "is_key_slice": bool(key[r])} for r in range(n)
        ]
    pd.DataFrame(scans).to_parquet(root / "scans.parquet")
    pd.DataFrame(slices).to_parquet(root / "slices.parquet")
    pd.DataFrame(index).to_parquet(root / "embeddings.parquet")
    info = {"label": label, "source": label, "name": "synthetic", "input_channels": "per_window", "in_chans": 1,
            "embed_dim": D, "img_size": 32, "data_key_fingerprint": encoder_key_fingerprint}  # fmt: skip
    meta = {"format_version": EXTRACT_FORMAT_VERSION, "encoder": info, "windows": WINDOWS}
    (root / "extract.json").write_text(json.dumps({**meta, "pseudonym_key_fingerprint": key_fingerprint}))
    return str(root)


def small_config(**updates) -> EvaluateConfig:
    data = {
        "tasks": [
            {"name": "location", "labels": ["location_*"], "protocols": ["abmil", "probe"]},
            {"name": "stage", "labels": ["stage"], "windows": ["abdomen"], "loss": "ce"},
        ],
        "splits": {"n_folds": 3},
        "abmil": {"lr": 3e-3, "batch_size": 8, "epochs": 30, "patience": 10},
        "probe": {"poolings": ["mean", "max"], "lrs": [0.1], "steps": 120, "eval_every": 40},
        "attention_plots": 2,
    }
    data.update(updates)
    return EvaluateConfig.model_validate(data)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    signal = write_set(root / "signal", "pretrained", 60, seed=1, strength=10.0)
    noise = write_set(root / "noise", "random", 60, seed=1, strength=0.0)
    res = run_evaluate([signal, noise], str(root / "out"), small_config())
    return root, res


def test_signal_beats_noise_on_identical_folds(evaluated):
    root, res = evaluated
    auroc = {(row.model, row.protocol): s["auroc"].mean for row, s in res.headline.items()}
    assert auroc["pretrained", "abmil"] > 0.8 and auroc["pretrained", "probe"] > 0.8, auroc
    assert auroc["random", "abmil"] < 0.7 and auroc["random", "probe"] < 0.7, auroc
    assert [r.key for r in res.runs if r.task == "location"] == list(res.headline)  # typed keys, in run order
    out = root / "out"
    splits = Splits.from_json(out / "splits" / "location.json")
    for fold in splits.folds:  # folds never share a patient
        assert not (set(fold.train) & set(fold.test)) and not (set(fold.val) & set(fold.test))
        assert not set(fold.train) & set(fold.val)
    preds = {
        m: pd.read_parquet(out / "location" / m / "abmil" / "predictions.parquet")
        for m in ("pretrained", "random")
    }
    key = ["fold", "split", "scan_id"]
    pd.testing.assert_frame_equal(preds["pretrained"][key], preds["random"][key])  # same folds, same scans


def test_outputs_report_plots_and_heads(evaluated):
    root, res = evaluated
    out = root / "out"
    md = (out / "report.md").read_text()
    assert "| model / setting | location_liver | location_lung | location_bone | macro |" in md
    assert "pretrained · probe" in md and "Latent continuity (cosine" in md
    page = (out / "report.html").read_text()
    assert "<table>" in page
    # The HTML is self-contained: every run's ROC/PR and attention plots embedded, byte for byte.
    embedded = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    on_disk = sorted(out.rglob("*.png"))
    assert len(on_disk) >= 6 and sorted(base64.b64decode(e) for e in embedded) == sorted(p.read_bytes() for p in on_disk)
    metrics = pd.read_csv(out / "location" / "pretrained" / "abmil" / "metrics.csv")
    assert set(metrics["split"]) == {"val", "test"} and set(metrics["fold"]) == {0, 1, 2}
    assert list(metrics.columns[:5]) == ["fold", "split", "class", "n_pos", "n_neg"]
    pngs = sorted(p.name for p in (out / "location" / "pretrained" / "abmil" / "attention").glob("*.png"))
    assert len(pngs) == 2
    attn = np.load(next((out / "location" / "pretrained" / "abmil" / "attention").glob("*.npy")))
    assert attn.sum() == pytest.approx(1.0, abs=1e-5)
    assert (
        out / "location" / "pretrained" / "abmil" / "roc_pr" / "roc_pr_location_liver.png"
    ).stat().st_size > 0
    heads = load_heads(str(out), "location", "pretrained", "probe")
    assert len(heads.folds) == 3 and heads.class_names == [f"location_{c}" for c in CLASSES]
    assert heads.windows == WINDOWS
    assert heads.folds[0].head.spec.kind == "probe"
    # The staging task: one binary column became two exclusive classes trained with cross-entropy.
    stage = load_heads(str(out), "stage", "pretrained", "abmil")
    assert stage.class_names == ["stage_0", "stage_1"] and stage.folds[0].head.spec.loss == "ce"
    results = json.loads((out / "results.json").read_text())
    assert results["headline_task"] == "location"
    # results.json names rows by their labels (the format saved runs and Comparison.from_results read).
    assert set(results["macro"]["stage"]) == {"pretrained · abmil", "random · abmil"}
    assert list(results["macro"]["location"]) == [k.label for k in res.headline]
    head = res.headline[RowKey("pretrained", "probe")]["auroc"]
    assert results["macro"]["location"]["pretrained · probe"]["auroc"]["mean"] == head.mean
    assert "| pretrained · probe | " in res.headline_table()


def _hand_paired(out: Path, task: str, protocol: str) -> tuple[float, float, float]:
    """pretrained − random per fold from the test rows of metrics.csv (n/a classes are empty cells, skipped):
    mean and the t-interval."""
    macro = {}
    for s in ("pretrained", "random"):
        rows = pd.read_csv(out / task / s / protocol / "metrics.csv")
        macro[s] = rows[rows["split"] == "test"].groupby("fold")["auroc"].mean()
    d = (macro["pretrained"] - macro["random"]).dropna().to_numpy()
    assert len(d) == 3
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return d.mean(), d.mean() - half, d.mean() + half


def test_summary_of_every_task_with_paired_differences(evaluated):
    root, res = evaluated
    out = root / "out"
    cmp = res.comparison
    assert res.headline_task == "location"  # the headline stays; the summary holds every task
    assert {t: list(p) for t, p in cmp.macro.items()} == {"location": ["abmil", "probe"], "stage": ["abmil"]}
    text = cmp.text()
    rows = {
        tuple(cells[:2]): cells
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()[3:])
    }
    assert rows[("task", "protocol")] == ["task", "protocol", "folds", "pretrained", "random",
                                          "pretrained − random [95% CI]"]  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for task, protocol in [("location", "abmil"), ("location", "probe"), ("stage", "abmil")]:
        mean, low, high = _hand_paired(out, task, protocol)
        d = cmp.paired[task][protocol]["pretrained"]
        assert (d.mean_diff, d.ci_low, d.ci_high) == pytest.approx((mean, low, high), abs=1e-12)
        assert d.verdict == ("holds" if low > 0 else "worse than random" if high < 0 else NOT_RESOLVED)
        pre, rand = (cmp.macro[task][protocol][s] for s in ("pretrained", "random"))
        assert pre.mean - rand.mean == pytest.approx(mean)  # no fold n/a: the difference of the means
        cell = f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] {d.verdict}"
        assert rows[(task, protocol)] == [task, protocol, "3", f"{pre.mean:.3f} ± {pre.sd:.3f}",
                                          f"{rand.mean:.3f} ± {rand.sd:.3f}", cell]  # fmt: skip
        assert cell in md and cell in page
        assert results["paired"][task][protocol]["pretrained"] == d.to_dict()
    assert cmp.paired["location"]["probe"]["pretrained"].verdict == "holds"  # 1.000 vs 0.565 on every fold
    # The summary comes first in the report; the pipeline's final print rebuilds it from results.json.
    assert md.startswith("# slicefm evaluation · every task")
    assert md.index(text) < md.index("| model / setting |")
    assert page.index("pretrained − random [95% CI]") < page.index("<h1>slicefm evaluation · location</h1>")
    assert Comparison.from_results(results).text() == text
    # MLflow / KFP scalars: every task's macro per set and the paired difference with its interval.
    scalars = comparison_scalars(cmp)
    assert len(scalars) == 3 * 2 + 3 * 3 and all(re.fullmatch(r"[A-Za-z0-9_\-. /]+", k) for k in scalars)
    assert scalars["stage/abmil/random/auroc"] == cmp.macro["stage"]["abmil"]["random"].mean
    probe = cmp.paired["location"]["probe"]["pretrained"]
    key = "location/probe/pretrained_vs_random/auroc"
    logged = [scalars[f"{key}_{k}"] for k in ("diff", "ci_low", "ci_high")]
    assert logged == [probe.mean_diff, probe.ci_low, probe.ci_high]


def test_evaluate_stage_logs_every_task_to_mlflow(evaluated, tmp_path, monkeypatch):
    root, res = evaluated
    monkeypatch.setattr("slicefm.evaluate.stage.run_evaluate", lambda *args: res)
    monkeypatch.setattr("slicefm.edge.stages._register_heads", lambda cfg, result: None)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = mlflow_runs.start_pipeline_run(tracking, "e", "r", {})
    evaluate_stage(PipelineConfig(), [], str(root / "out"), tracking, parent)
    (run,) = MlflowClient(tracking).search_runs([MlflowClient(tracking).get_run(parent).info.experiment_id],
                                               "tags.slicefm.stage = 'evaluate'")  # fmt: skip
    logged = run.data.metrics
    assert {k: logged[k] for k in comparison_scalars(res.comparison)} == comparison_scalars(res.comparison)
    assert logged["macro_pretrained_abmil_auroc"] == res.headline[RowKey("pretrained", "abmil")]["auroc"].mean


def test_fixed_seed_reproduces_metrics_exactly(evaluated, tmp_path):
    root, _ = evaluated
    cfg = small_config(tasks=[{"name": "location", "labels": ["location_*"]}])
    a = run_evaluate([str(root / "signal")], str(tmp_path / "a"), cfg)
    b = run_evaluate([str(root / "signal")], str(tmp_path / "b"), cfg, splits_uri=str(root / "out"))
    ma = (tmp_path / "a" / "location" / "pretrained" / "abmil" / "metrics.csv").read_bytes()
    mb = (tmp_path / "b" / "location" / "pretrained" / "abmil" / "metrics.csv").read_bytes()
    assert ma == mb
    assert a.headline == b.headline


def test_kfp_ui_artifacts(evaluated, tmp_path):
    _, res = evaluated
    metrics = Metrics(name="metrics", uri=str(tmp_path / "m"))
    logged = log_headline_metrics(metrics, res.headline, "macro")
    assert metrics.metadata["macro_pretrained_abmil_auroc"] == pytest.approx(
        res.headline[RowKey("pretrained", "abmil")]["auroc"].mean
    )
    assert "macro_random_probe_auprc_sd" in logged
    roc = ClassificationMetrics(name="roc", uri=str(tmp_path / "r"))
    name = log_run_roc(roc, res.runs[0])
    assert name in [f"location_{c}" for c in CLASSES]
    assert {"confidenceMetrics", "confusionMatrix"} <= set(roc.metadata)
    curve = roc.metadata["confidenceMetrics"]
    assert curve[0]["falsePositiveRate"] == 0.0 and curve[-1]["recall"] == 1.0


def test_external_frozen_vs_retrained(evaluated, tmp_path):
    root, _ = evaluated
    cohort_b = write_set(tmp_path / "b", "pretrained", 36, seed=7, strength=6.0, shift=0.3)
    ext = ExternalConfig(enabled=True, tasks=["location"], protocol="abmil")
    res = run_external_stage(str(root / "out"), [cohort_b], str(tmp_path / "ext"), small_config(), ext)
    assert set(res.headline) == {RowKey("pretrained", "frozen"), RowKey("pretrained", "retrained")}
    assert res.headline[RowKey("pretrained", "frozen")]["auroc"].mean > 0.8  # same signal, shifted scanner
    written = json.loads((tmp_path / "ext" / "results.json").read_text())
    assert list(written["macro"]["location"]) == ["pretrained · frozen", "pretrained · retrained"]
    assert "| pretrained · frozen | " in res.headline_table()
    md = (tmp_path / "ext" / "report.md").read_text()
    assert "pretrained · frozen" in md and "pretrained · retrained" in md
    frozen = pd.read_csv(tmp_path / "ext" / "location" / "pretrained" / "frozen" / "metrics.csv")
    assert set(frozen["class"]) == {f"location_{c}" for c in CLASSES}
    # Unknown task names are refused before any work.
    with pytest.raises(ValueError, match="not evaluate tasks"):
        run_external_stage(str(root / "out"), [cohort_b], str(tmp_path / "x"), small_config(),
                           ExternalConfig(tasks=["nope"]))  # fmt: skip


def test_cohorts_pseudonymised_with_different_keys_are_refused(evaluated, tmp_path):
    root, _ = evaluated
    assert json.loads((root / "out" / "results.json").read_text())["pseudonym_key_fingerprint"] == KEY_A
    other_key = write_set(tmp_path / "b", "random", 12, seed=3, strength=0.0, key_fingerprint=KEY_B)
    cfg = small_config()
    # Two embedding sets of data pseudonymised with different keys.
    with pytest.raises(KeyMismatchError, match=rf"pretrained embeddings .*{KEY_A}.*random embeddings .*{KEY_B}"):
        run_evaluate([str(root / "signal"), other_key], str(tmp_path / "o1"), cfg)
    # An encoder pretrained on a cohort pseudonymised with another key.
    foreign = write_set(tmp_path / "c", "pretrained", 12, seed=3, strength=1.0, encoder_key_fingerprint=KEY_B)
    with pytest.raises(KeyMismatchError, match="encoder's pretraining cohort"):
        run_evaluate([foreign], str(tmp_path / "o2"), cfg)
    # Folds of an evaluation whose patients had other IDs.
    with pytest.raises(KeyMismatchError, match="reused splits"):
        run_evaluate([other_key], str(tmp_path / "o3"), cfg, splits_uri=str(root / "out"))
    # Cohort A's heads carried over to a cohort B pseudonymised with another key.
    ext = ExternalConfig(enabled=True, tasks=["location"], protocol="abmil")
    with pytest.raises(KeyMismatchError, match="cohort A's evaluation"):
        run_external_stage(str(root / "out"), [other_key], str(tmp_path / "o4"), cfg, ext)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))  # refused before writing anything


def test_stacked_set_refuses_a_task_on_fewer_windows_before_any_work(tmp_path):
    """A stacked set (one embedding of every channel, window "all") cannot give the stage task its abdomen
    window alone: the run is refused up front, naming the task, the set, its windows and the set's layout."""
    root = Path(write_set(tmp_path / "stacked", "pretrained", 12, seed=3, strength=1.0))
    index = pd.read_parquet(root / "embeddings.parquet")
    index = index[index["window"] == "abdomen"].assign(window="all")  # the abdomen matrices stand in
    index.to_parquet(root / "embeddings.parquet")
    meta = json.loads((root / "extract.json").read_text())
    (root / "extract.json").write_text(json.dumps({**meta, "windows": ["all"], "channels": WINDOWS}))
    with pytest.raises(ValueError, match=r"task stage, embedding set pretrained: .*\['abdomen'\].* stacked"):
        run_evaluate([str(root)], str(tmp_path / "out"), small_config())
    assert not (tmp_path / "out").exists()
    # Asking for every window (none listed, or all of them) evaluates the stacked embeddings.
    cfg = small_config(tasks=[{"name": "stage", "labels": ["stage"], "windows": WINDOWS, "protocols": ["probe"],
                               "loss": "ce"}])  # fmt: skip
    res = run_evaluate([str(root)], str(tmp_path / "ok"), cfg)
    assert load_heads(res.out_uri, "stage", "pretrained", "probe").windows == ["all"]


def test_label_patterns_and_bad_tables():
    cols = ["scan_id", "label_location_liver", "label_location_lung", "label_stage"]
    assert resolve_label_columns(cols, ["location_*"]) == ["location_liver", "location_lung"]
    assert resolve_label_columns(cols, ["stage", "location_lung"]) == ["stage", "location_lung"]
    with pytest.raises(ValueError, match="matches no column.*available"):
        resolve_label_columns(cols, ["finding_*"])
    with pytest.raises(ValueError, match="unique"):
        EvaluateConfig.model_validate(
            {"tasks": [{"name": "a", "labels": ["x"]}, {"name": "a", "labels": ["y"]}]}
        )
