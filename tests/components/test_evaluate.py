"""evaluate and external: cross-validated heads on embedding sets, the KFP UI artifacts, cohort B."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kfp.dsl import HTML, ClassificationMetrics, Markdown, Metrics
from mlflow.tracking import MlflowClient

from components.evaluate import evaluate, external
from slicefm.edge.tracking.mlflow_runs import start_pipeline_run
from slicefm.evaluate.summary import Comparison
from tests.components.conftest import component_config, dataset, stage_runs
from tests.evaluate.test_stage import CLASSES, write_set

EVALUATE = {
    "tasks": [{"name": "location", "labels": ["location_*"], "protocols": ["abmil", "probe"]}],
    "splits": {"n_folds": 2},
    "abmil": {"lr": 3e-3, "batch_size": 8, "epochs": 12, "patience": 6},
    "probe": {"poolings": ["mean"], "lrs": [0.1], "steps": 60, "eval_every": 20},
    "attention_plots": 1,
}
EXTERNAL = {"enabled": True, "tasks": ["location"], "protocol": "abmil"}
HEAD = "evaluate-test-location-head"


@pytest.fixture(autouse=True)
def _one_thread():
    """Heads this small spend their time in thread hand-offs (as in tests/evaluate)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ui_outputs(tmp_path: Path, *names: str) -> list:
    kinds = {"metrics": Metrics, "roc": ClassificationMetrics, "report_html": HTML, "report_md": Markdown}
    return [kinds[n](name=n, uri=str(tmp_path / n)) for n in names]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tracking_uri):
    """The evaluate step on a pretrained-like set (signal on one slice per positive) and its random twin."""
    root = tmp_path_factory.mktemp("evaluate")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    signal = write_set(root / "signal", "pretrained", 40, seed=1, strength=10.0)
    noise = write_set(root / "noise", "random", 40, seed=1, strength=0.0)
    config_yaml = component_config(root, "evaluate-test", evaluate=EVALUATE, external=EXTERNAL)
    parent = start_pipeline_run(tracking_uri, "components", "evaluate", {})
    results = dataset(root, "results")
    metrics, roc, report_html, report_md = _ui_outputs(root, "metrics", "roc", "report_html", "report_md")
    summary = evaluate.python_func(
        config_yaml=config_yaml, tracking_uri=tracking_uri, parent_run_id=parent, store_uri="", run_name="r",
        embeddings=dataset(root, "signal-in", uri=signal), baseline=dataset(root, "noise-in", uri=noise),
        results=results, metrics=metrics, roc=roc, report_html=report_html, report_md=report_md,
    )  # fmt: skip
    torch.set_num_threads(threads)
    outputs = {"results": results, "metrics": metrics, "roc": roc, "html": report_html, "md": report_md}
    return root, config_yaml, parent, summary, outputs


def test_evaluate_fills_the_kfp_ui_artifacts_from_its_results(evaluated):
    _, _, _, summary, out = evaluated
    results = out["results"]
    assert results.metadata == {"uri": results.path, "headline_task": "location"}
    written = json.loads((Path(results.path) / "results.json").read_text())
    assert summary == Comparison.from_results(written).text()  # the returned (and printed) comparison
    # Metrics: every headline row (both sets x both protocols), mean and sd, as results.json has them.
    logged = out["metrics"].metadata
    macro = written["macro"]["location"]
    assert set(macro) == {f"{s} · {p}" for s in ("pretrained", "random") for p in ("abmil", "probe")}
    for row, per_metric in macro.items():
        key = "macro_" + row.replace(" · ", "_")
        for metric, cell in per_metric.items():
            if cell["mean"] is not None:
                assert logged[f"{key}_{metric}"] == pytest.approx(cell["mean"])
                assert f"{key}_{metric}_sd" in logged
    assert logged["macro_pretrained_abmil_auroc"] > 0.8 > logged["macro_random_abmil_auroc"]
    diff = logged["location/abmil/pretrained_vs_random/auroc_diff"]
    assert diff > 0.2 and logged["location/abmil/pretrained_vs_random/auroc_ci_low"] <= diff
    # ROC of the headline task's most frequent class, and the report as KFP Markdown / HTML.
    roc = out["roc"].metadata
    assert roc["class"] in [f"location_{c}" for c in CLASSES]
    assert {"confidenceMetrics", "confusionMatrix"} <= set(roc)
    assert Path(out["md"].path).read_text() == (Path(results.path) / "report.md").read_text()
    assert Path(out["html"].path).read_text() == (Path(results.path) / "report.html").read_text()


def test_evaluate_is_tracked_and_registers_the_champion_head(evaluated, tracking_uri):
    _, _, parent, _, out = evaluated
    run = stage_runs(tracking_uri, parent)["evaluate"]
    assert run.info.status == "FINISHED" and run.data.params["n_embedding_sets"] == "2"
    assert (
        run.data.metrics["macro_pretrained_abmil_auroc"]
        == out["metrics"].metadata["macro_pretrained_abmil_auroc"]
    )
    # The best pretrained row of the headline task beats random weights and there is no champion yet: it
    # becomes <name>-location-head@champion, and its lineage says why.
    assert run.data.tags["slicefm.registered_head"] == HEAD
    assert run.data.tags["slicefm.promotion"].startswith("promoted: pretrained · ")
    champion = MlflowClient(tracking_uri).get_model_version_by_alias(HEAD, "champion")
    assert (
        str(champion.version) == run.data.tags["slicefm.head_version"] and champion.run_id == run.info.run_id
    )
    assert champion.tags["slicefm.embeddings"] == "pretrained"
    assert float(champion.tags["slicefm.macro_auroc"]) > float(champion.tags["slicefm.random_macro_auroc"])


def _evaluate_again(root: Path, config_yaml: str, tracking_uri: str, pretrained: str, random: str):
    root.mkdir(parents=True, exist_ok=True)
    parent = start_pipeline_run(tracking_uri, "components", "evaluate", {})
    results = dataset(root, "results")
    metrics, roc, report_html, report_md = _ui_outputs(root, "metrics", "roc", "report_html", "report_md")
    evaluate.python_func(
        config_yaml=config_yaml, tracking_uri=tracking_uri, parent_run_id=parent, store_uri="", run_name="r",
        embeddings=dataset(root, "p-in", uri=pretrained), baseline=dataset(root, "r-in", uri=random),
        results=results, metrics=metrics, roc=roc, report_html=report_html, report_md=report_md,
    )  # fmt: skip
    return stage_runs(tracking_uri, parent)["evaluate"]


def test_the_gate_keeps_the_champion_unless_a_head_beats_it_and_random_weights(
    evaluated, tracking_uri, tmp_path
):
    """A re-run on the same sets ties the champion (held); swapped sets lose to random weights (held). Both
    are registered as versions, with the reason in their lineage; the alias does not move."""
    root, config_yaml, *_ = evaluated
    client = MlflowClient(tracking_uri)
    before = client.get_model_version_by_alias(HEAD, "champion").version
    signal, noise = str(root / "signal"), str(root / "noise")

    tie = _evaluate_again(tmp_path / "tie", config_yaml, tracking_uri, signal, noise)
    assert "does not beat the current champion" in tie.data.tags["slicefm.promotion"]
    assert tie.data.tags["slicefm.promotion"].startswith("held: ")

    worse = write_set(tmp_path / "worse", "pretrained", 40, seed=1, strength=0.0)
    better = write_set(tmp_path / "better", "random", 40, seed=1, strength=10.0)
    lost = _evaluate_again(tmp_path / "lost", config_yaml, tracking_uri, worse, better)
    assert "does not beat random weights" in lost.data.tags["slicefm.promotion"]

    assert client.get_model_version_by_alias(HEAD, "champion").version == before
    for run in (tie, lost):
        version = client.get_model_version(HEAD, run.data.tags["slicefm.head_version"])
        assert version.version != before and version.tags["slicefm.promotion"].startswith("held: ")


def test_evaluate_without_the_random_baseline_reads_only_the_pretrained_set(evaluated, tmp_path):
    root, _, _, _, _ = evaluated
    config_yaml = component_config(
        tmp_path, "evaluate-test", evaluate={**EVALUATE, "tasks": [{**EVALUATE["tasks"][0], "protocols": ["probe"]}]},
        extract={"random_baseline": False},
    )  # fmt: skip
    results = dataset(tmp_path, "results")
    metrics, roc, report_html, report_md = _ui_outputs(tmp_path, "metrics", "roc", "report_html", "report_md")
    evaluate.python_func(
        config_yaml=config_yaml, tracking_uri="", parent_run_id="", store_uri="", run_name="r",
        embeddings=dataset(tmp_path, "signal-in", uri=str(root / "signal")),
        baseline=dataset(tmp_path, "absent", uri=str(tmp_path / "no-such-set")),
        results=results, metrics=metrics, roc=roc, report_html=report_html, report_md=report_md,
    )  # fmt: skip
    written = json.loads((Path(results.path) / "results.json").read_text())
    assert set(written["macro"]["location"]) == {"pretrained · probe"}
    assert not any(k.startswith("macro_random") for k in metrics.metadata)


def test_external_scores_cohort_a_heads_frozen_and_retrained_on_cohort_b(evaluated, tmp_path, tracking_uri):
    _, config_yaml, _, _, out = evaluated
    # Cohort B: the same signal through a shifted scanner; its random-weight twin is noise.
    cohort_b = write_set(tmp_path / "b", "pretrained", 30, seed=7, strength=6.0, shift=0.3)
    noise_b = write_set(tmp_path / "b-noise", "random", 30, seed=7, strength=0.0, shift=0.3)
    parent = start_pipeline_run(tracking_uri, "components", "external", {})
    results = dataset(tmp_path, "ext-results")
    metrics, report_html, report_md = _ui_outputs(tmp_path, "metrics", "report_html", "report_md")
    table = external.python_func(
        config_yaml=config_yaml, tracking_uri=tracking_uri, parent_run_id=parent, store_uri="", run_name="r",
        source_results=out["results"], embeddings=dataset(tmp_path, "b-in", uri=cohort_b),
        baseline=dataset(tmp_path, "b-noise-in", uri=noise_b), results=results, metrics=metrics,
        report_html=report_html, report_md=report_md,
    )  # fmt: skip
    assert results.metadata == {"uri": results.path, "headline_task": "location"}
    written = json.loads((Path(results.path) / "results.json").read_text())
    macro = written["macro"]["location"]
    rows = {f"{s} · {setting}" for s in ("pretrained", "random") for setting in ("frozen", "retrained")}
    assert set(macro) == rows
    for row in rows:  # the returned table shows each row's AUROC, the Metrics artifact logs it
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {row} |"))
        assert f"{macro[row]['auroc']['mean']:.3f}" in line
        key = "external_" + row.replace(" · ", "_") + "_auroc"
        assert metrics.metadata[key] == pytest.approx(macro[row]["auroc"]["mean"])
    assert metrics.metadata["external_pretrained_frozen_auroc"] > 0.8  # cohort A's heads carry over
    assert Path(report_md.path).read_text() == (Path(results.path) / "report.md").read_text()
    assert Path(report_html.path).read_text() == (Path(results.path) / "report.html").read_text()
    run = stage_runs(tracking_uri, parent)["external"]
    assert run.info.status == "FINISHED" and run.data.params["tasks"] == "location"
    assert (
        run.data.metrics["external_pretrained_frozen_auroc"]
        == metrics.metadata["external_pretrained_frozen_auroc"]
    )
