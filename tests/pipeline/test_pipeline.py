"""The Kubeflow pipeline: compiles, runs locally through kfp.local with MLflow tracking, demo data reproducible."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines import runner
from slicefm.config import config_from_yaml
from slicefm.data.pseudonym import key_fingerprint, load_key
from slicefm.edge.pipeline_data import dvc_dir_md5, ensure_demo_data
from slicefm.edge.tracking.pipeline_runs import child_runs, describe_run, find_parent_run, headline_report
from tests.pipeline.conftest import local_run_env, tiny_pipeline_config

ROOT = Path(__file__).resolve().parents[2]


def test_compiled_pipeline_wires_every_stage(tmp_path):
    path = runner.compile_pipeline(tmp_path / "p.yaml")
    spec, platform = yaml.safe_load_all(path.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert {"start-tracking", "finish-tracking", "exit-handler-1"} <= set(tasks)
    comps = spec["components"]

    def dag(task: dict) -> dict:
        return comps[task["componentRef"]["name"]].get("dag", {}).get("tasks", {})

    def find(tasks: dict, prefix: str) -> dict:
        return {n: t for n, t in tasks.items() if n.startswith(prefix)}

    inner_tasks = dag(tasks["exit-handler-1"])
    assert "ingest-preprocess" in inner_tasks  # one step, one pass over each scan
    # The pretraining cohort: cohort A itself, or its own ingest + preprocess (cohort "p"); the same
    # downstream graph in both branches (kfp.local cannot resolve dsl.OneOf).
    (by_source,) = find(inner_tasks, "condition-branches").values()
    on_a, on_p = (dag(t) for t in dag(by_source).values())
    ing_p = next(t for n, t in on_p.items() if n.startswith("ingest"))
    assert ing_p["inputs"]["parameters"]["cohort"]["runtimeValue"]["constant"] == "p"
    assert ing_p["inputs"]["parameters"]["data_source"] == {"componentInputParameter": "pipelinechannel--pretrain_source"}
    (pre_p_name,) = (n for n in on_p if n.startswith("ingest-preprocess"))
    for outer, train_slices_from in ((on_a, "ingest-preprocess"), (on_p, pre_p_name)):
        # Pretraining: inside the step (one node) or a Trainer TrainJob (several).
        (branches,) = find(outer, "condition-branches").values()
        producers = {}  # kind -> (branch, its producer task's name)
        for branch in (dag(t) for t in dag(branches).values()):
            for kind in ("pretrain", "launch-trainjob"):
                names = [n for n in branch if n == kind or n.removeprefix(kind + "-").isdigit()]
                if names:
                    producers[kind] = (branch, *names)
        assert set(producers) == {"pretrain", "launch-trainjob"}, "in the step, or a TrainJob"
        for branch, producer in producers.values():
            _check_pretrain_branch(comps, dag, find, branch, producer, train_slices_from)
    outs = comps["comp-evaluate"]["outputDefinitions"]["artifacts"]
    assert {o["artifactType"]["schemaTitle"] for o in outs.values()} >= {
        "system.Metrics", "system.ClassificationMetrics", "system.HTML", "system.Markdown"
    }
    assert tasks["finish-tracking"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    # The exit handler reads the pipeline's final status (a failed step without an MLflow run fails the
    # parent); the steps that open and close the run are never cached, ingest and preprocess are.
    finish_inputs = tasks["finish-tracking"]["inputs"]["parameters"]
    assert finish_inputs["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
    assert finish_inputs["kfp_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    # Every per-run step takes the run name start-tracking settled (unique per Kubeflow run); the cacheable
    # data steps take no per-run input at all (their config: the data sections start-tracking hands out).
    handler_inputs = tasks["exit-handler-1"]["inputs"]["parameters"]
    assert handler_inputs["pipelinechannel--start-tracking-run_name"] == {
        "taskOutputParameter": {"producerTask": "start-tracking", "outputParameterKey": "run_name"}
    }
    params = inner_tasks["ingest-preprocess"]["inputs"]["parameters"]
    assert not {"run_name", "parent_run_id", "tracking_uri"} & set(params)
    assert params["config_yaml"] == {"componentInputParameter": "pipelinechannel--start-tracking-data_config_yaml"}
    assert inner_tasks["ingest-preprocess"]["cachingOptions"] == {"enableCache": True}
    for record_name, output in (("record-stage", "scans"), ("record-stage-2", "slices")):  # one per stage
        record = inner_tasks[record_name]
        assert "enableCache" not in record["cachingOptions"]
        assert record["inputs"]["parameters"]["parent_run_id"] == {
            "componentInputParameter": "pipelinechannel--start-tracking-parent_run_id"
        }
        assert record["inputs"]["artifacts"]["output"]["taskOutputArtifact"] == {
            "producerTask": "ingest-preprocess", "outputArtifactKey": output
        }
    assert "enableCache" not in tasks["start-tracking"]["cachingOptions"]
    # The MLflow parent carries the Kubeflow run's id; start-tracking's Markdown links the MLflow run.
    kfp_run_id = tasks["start-tracking"]["inputs"]["parameters"]["kfp_run_id"]["runtimeValue"]["constant"]
    assert kfp_run_id == "{{$.pipeline_job_uuid}}"
    assert "mlflow_run" in comps["comp-start-tracking"]["outputDefinitions"]["artifacts"]
    pretrain_outs = comps["comp-pretrain"]["outputDefinitions"]["artifacts"]
    assert pretrain_outs["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    assert "enableCache" not in tasks["finish-tracking"]["cachingOptions"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"config_yaml", "data_source", "tracking_uri", "store_uri", "run_name", "data_version",
            "external_source", "run_external", "extract_shards"} <= set(params)  # fmt: skip


def test_compiled_pipeline_runs_on_gpu_node_pools_with_secrets_and_retries(tmp_path):
    spec, platform = yaml.safe_load_all(runner.compile_pipeline(tmp_path / "p.yaml").read_text())
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-pretrain", "exec-extract"):
        res = executors[name]["container"]["resources"]
        assert res["accelerator"]["resourceType"] == "{{$.inputs.parameters['pipelinechannel--gpu_accelerator']}}"
        assert "gpus" in res["accelerator"]["resourceCount"]
        assert k8s[name]["nodeSelector"] == {"nodeSelectorJson": {"componentInputParameter": "pipelinechannel--gpu_node_selector"}}
        assert k8s[name]["tolerations"] == [{"tolerationJson": {"componentInputParameter": "pipelinechannel--gpu_tolerations"}}]
        assert k8s[name]["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "volumeName": "dshm", "sizeLimit": "16Gi"}]
    for name, executor in executors.items():
        res = executor["container"].get("resources", {})
        assert res.get("resourceCpuRequest") and res.get("resourceMemoryRequest"), name  # requests everywhere
        assert int(k8s[name]["activeDeadlineSeconds"]) > 0, name  # timeouts everywhere
        secrets = {s["secretName"] for s in k8s[name].get("secretAsEnv", [])}
        if not name.startswith("exec-shard-indices"):
            assert "slicefm-s3" in secrets and "slicefm-mlflow" in secrets, name
    assert {s["secretName"] for s in k8s["exec-ingest-preprocess"]["secretAsEnv"]} >= {"slicefm-pseudonym"}
    assert "slicefm-pseudonym" not in {s["secretName"] for s in k8s["exec-evaluate"]["secretAsEnv"]}

    def all_tasks(dag_tasks: dict):
        for name, task in dag_tasks.items():
            yield name, task
            comp = spec["components"][task["componentRef"]["name"]]
            yield from all_tasks(comp.get("dag", {}).get("tasks", {}))

    retried = {name: t["retryPolicy"] for name, t in all_tasks(spec["root"]["dag"]["tasks"]) if "retryPolicy" in t}
    assert retried["ingest-preprocess"]["maxRetryCount"] == 2 and retried["ingest-preprocess"]["backoffFactor"] == 2.0
    assert "extract" in retried and "pretrain" in retried
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"pretrain_nodes", "gpu_accelerator", "pretrain_gpus", "extract_gpus", "gpu_node_selector",
            "gpu_tolerations"} <= set(params)  # fmt: skip


def test_demo_dataset_regenerates_to_the_dvc_tracked_version(tmp_path):
    cfg = runner.load_config(ROOT / "pipelines/configs/demo-cpu.yaml")
    # Cohort A, the pretraining cohort P and cohort B (the shifted scanner), each at its configured source.
    assert [d.source for d in cfg.data_sources()] == ["data/demo", "data/pretrain", "data/external"]
    for data in cfg.data_sources():
        ensure_demo_data(data, tmp_path / data.source)
    recorded = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]["md5"]
    assert dvc_dir_md5(tmp_path / "data") == recorded


def test_local_run_tracks_every_stage(tmp_path, monkeypatch, capsys):
    """Every stage, with the encoder pretrained on its own cohort (P, 6 scans) and evaluated on A (8 scans),
    and the supervised ceiling trained on P's labels and evaluated beside it."""
    config_path = tiny_pipeline_config(tmp_path, pretrain_cohort=True, supervised_ceiling=True)
    tracking = local_run_env(tmp_path, monkeypatch)
    assert runner.run_local(config_path, run_name="run-1") == 0
    # The end-of-run summary: every evaluated task once (with its paired difference and the ceiling's
    # gap closed: the ceiling's evaluation replaces the plain one there), the external cohort.
    printed = capsys.readouterr().out
    summary = printed[printed.index("\npipeline run run-1: FINISHED") :]
    # Before the summary: one line per task (each task's log in a file), not kfp.local's thousands.
    progress = printed[: printed.index("\npipeline run run-1: FINISHED")].splitlines()
    logs = tmp_path / "state" / "logs" / "run-1"
    task_logs = sorted(logs.glob("[0-9][0-9]-*.log"))
    assert [line for line in progress if line.startswith("  + ")] and len(progress) < len(task_logs) + 10
    assert any(line.startswith("  + ingest-preprocess ") for line in progress) and (logs / "pipeline.log").stat().st_size
    assert any(re.fullmatch(r"\d\d-pretrain(-\d+)?\.log", p.name) for p in task_logs)  # kfp.local's task names
    assert summary.count("evaluate-ceiling · every task") == 1 and "evaluate · every task" not in summary
    rows = [r for r in _table_rows(summary) if r[0] in ("location", "findings")]
    assert [r[:2] for r in rows] == [["location", "abmil"], ["findings", "probe"]]
    header = next(r for r in _table_rows(summary) if r[0] == "task")
    assert "supervised" in header and any("gap closed" in c for c in header)
    assert "pretrained − random [95% CI]" in summary and "external · task location" in summary
    parent = find_parent_run(tracking, "pipeline-test", "run-1")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["preprocess.size"] == "32"
    stages = {r.data.tags["slicefm.stage"]: r for r in child_runs(tracking, parent.info.run_id)}
    assert set(stages) == {
        "ingest", "preprocess", "pretrain", "extract", "extract-random", "evaluate",
        "ingest-p", "preprocess-p", "ingest-b", "preprocess-b", "extract-b", "extract-random-b", "external",
        "supervised-ceiling", "extract-supervised", "evaluate-ceiling",
    }  # fmt: skip
    # The ceiling: trained on P's slices, embedded on A, evaluated on the plain evaluation's folds.
    assert stages["supervised-ceiling"].data.metrics["n_slices"] > 0
    ceiling = json.loads(
        (Path(stages["evaluate-ceiling"].data.tags["slicefm.output_uri"]) / "results.json").read_text()
    )
    assert set(ceiling["macro"]["location"]) == {"pretrained · abmil", "random · abmil", "supervised · abmil"}
    assert "supervised" in ceiling["paired"]["location"]["abmil"]
    plain = json.loads((Path(stages["evaluate"].data.tags["slicefm.output_uri"]) / "results.json").read_text())
    assert ceiling["macro"]["location"]["pretrained · abmil"] == plain["macro"]["location"]["pretrained · abmil"]
    assert "slicefm.registered_head" not in stages["evaluate-ceiling"].data.tags
    assert stages["pretrain"].data.metrics["steps"] == 4
    # The encoder saw cohort P only; cohort A (8 scans) is what it embeds and what is evaluated.
    assert stages["ingest-p"].data.metrics["n_scans"] == stages["pretrain"].data.metrics["n_train_scans"] == 6
    assert stages["extract"].data.metrics["n_scans"] == 8
    assert all(r.info.status == "FINISHED" for r in stages.values())
    assert stages["ingest"].data.metrics["n_scans"] == 8
    out = Path(stages["preprocess"].data.tags["slicefm.output_uri"])
    slices = pd.read_parquet(out / "slices.parquet")
    assert len(slices) == stages["preprocess"].data.metrics["n_slices"] > 0
    artifacts = {a.path for a in MlflowClient(tracking).list_artifacts(stages["ingest"].info.run_id)}
    assert {"dataset.json", "quarantine.csv", "config.yaml"} <= artifacts
    # One key for every cohort: its fingerprint (never the key) travels ingest -> ... -> evaluate.
    fingerprint = key_fingerprint(load_key())
    assert not (tmp_path / "state" / "pseudonym.key").exists()  # the key lives by the rule, not in state
    assert stages["ingest"].data.params["pseudonym_key_fingerprint"] == fingerprint
    assert json.loads((out / "preprocess.json").read_text())["pseudonym_key_fingerprint"] == fingerprint
    encoder_dir = Path(stages["pretrain"].data.tags["slicefm.output_uri"])
    meta = yaml.safe_load((encoder_dir / "encoder.json").read_text())
    assert meta["data_key_fingerprint"] == fingerprint
    extracted = json.loads((Path(stages["extract"].data.tags["slicefm.output_uri"]) / "extract.json").read_text())
    assert extracted["pseudonym_key_fingerprint"] == extracted["encoder"]["data_key_fingerprint"] == fingerprint
    evaluated = json.loads((Path(stages["evaluate"].data.tags["slicefm.output_uri"]) / "results.json").read_text())
    assert evaluated["pseudonym_key_fingerprint"] == fingerprint
    assert meta["method"] == "lejepa" and (encoder_dir / "encoder.safetensors").stat().st_size > 0
    # The encoder is a registered model version that loads and embeds preprocessed slices.
    assert stages["pretrain"].data.tags["slicefm.registered_model"] == "t-encoder"
    import mlflow.pyfunc
    import numpy as np

    mlflow.set_tracking_uri(tracking)
    model = mlflow.pyfunc.load_model(
        f"models:/t-encoder/{stages['pretrain'].data.tags['slicefm.model_version']}"
    )
    emb = model.predict(np.random.default_rng(0).random((3, meta["in_chans"], 32, 32), dtype=np.float32))
    assert emb.shape[0] == 3 and np.isfinite(emb).all()


    # Evaluation: pretrained vs random on the same folds, report, plots, KFP UI artifacts.
    ev = Path(stages["evaluate"].data.tags["slicefm.output_uri"])
    results = yaml.safe_load((ev / "results.json").read_text())
    assert set(results["macro"]["location"]) == {"pretrained · abmil", "random · abmil"}
    assert set(results["macro"]["findings"]) == {"pretrained · probe", "random · probe"}
    assert "macro_pretrained_abmil_auroc" in stages["evaluate"].data.metrics
    eval_artifacts = {a.path for a in MlflowClient(tracking).list_artifacts(stages["evaluate"].info.run_id)}
    assert {"report.md", "report.html", "results.json"} <= eval_artifacts
    assert list(ev.glob("location/pretrained/abmil/attention/*.png"))
    ext = Path(stages["external"].data.tags["slicefm.output_uri"])
    ext_results = yaml.safe_load((ext / "results.json").read_text())
    assert set(ext_results["macro"]["location"]) == {
        "pretrained · frozen", "pretrained · retrained", "random · frozen", "random · retrained"
    }
    kfp_root = tmp_path / "state" / "kfp"
    html = list(kfp_root.rglob("report_html"))
    assert html and "<table>" in html[0].read_text()
    # The evaluate components' KFP Metrics: the headline task's, and every task's paired difference vs random
    # (the plain evaluation's, and the ceiling's, which adds the supervised set's).
    evaluations = {}
    for path in kfp_root.rglob("executor_output.json"):
        if re.fullmatch(r"evaluate(-\d+)?", path.parent.name):
            outputs = json.loads(path.read_text())
            (kfp_metrics,) = outputs["artifacts"]["metrics"]["artifacts"]
            logged = kfp_metrics["metadata"]
            evaluations["ceiling" if "macro_supervised_abmil_auroc" in logged else "plain"] = (outputs, logged)
    assert set(evaluations) == {"plain", "ceiling"}
    outputs, logged = evaluations["plain"]
    assert "macro_pretrained_abmil_auroc" in logged
    assert logged["findings/probe/pretrained_vs_random/auroc_diff"] == pytest.approx(
        results["paired"]["findings"]["probe"]["pretrained"]["mean_diff"]
    )
    assert outputs["parameterValues"]["Output"].startswith("Macro AUROC of every task")
    _, ceiling_logged = evaluations["ceiling"]
    assert ceiling_logged["findings/probe/supervised_vs_random/auroc_diff"] == pytest.approx(
        ceiling["paired"]["findings"]["probe"]["supervised"]["mean_diff"]
    )


def _summary(mean: float, sd: float) -> dict:
    return {"mean": mean, "sd": sd, "n": 5, "note": None}


def _table_rows(text: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")
    ]


def test_end_of_run_summary_shows_every_task_once(tmp_path):
    """run_local's last print (describe_run): the evaluate stage's all-tasks comparison with its paired
    differences, once, and the external cohort's headline table."""

    def auroc(mean: float, sd: float) -> dict:
        return {"auroc": _summary(mean, sd)}

    def diff(mean: float, low: float, high: float, verdict: str) -> dict:
        return {"mean_diff": mean, "ci_low": low, "ci_high": high, "n_folds": 5, "verdict": verdict}

    evaluated = {
        "headline_task": "lesion_location",
        "macro": {
            "lesion_location": {
                "pretrained · abmil": auroc(0.512, 0.03),
                "random · abmil": auroc(0.505, 0.02),
            },
            "chest_findings": {
                "pretrained · probe": auroc(0.567, 0.023),
                "random · probe": auroc(0.502, 0.015),
            },
        },
        "paired_metric": "auroc",
        "paired_reference": "random",
        "paired": {
            "lesion_location": {
                "abmil": {"pretrained": diff(0.007, -0.02, 0.034, "not resolved (interval includes 0)")}
            },
            "chest_findings": {"probe": {"pretrained": diff(0.065, 0.031, 0.099, "holds")}},
        },
    }
    external = {
        "headline_task": "lesion_location",
        "macro": {
            "lesion_location": {
                row: {"auroc": _summary(a, 0.05), "auprc": _summary(0.4, 0.04), "f1": _summary(0.3, 0.03)}
                for row, a in (("pretrained · frozen", 0.6), ("pretrained · retrained", 0.55))
            }
        },
    }
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking)
    exp = client.create_experiment("e")
    parent = client.create_run(exp, run_name="r1", tags={"slicefm.role": "pipeline"})
    for stage, results in (("evaluate", evaluated), ("external", external)):
        out = tmp_path / stage
        out.mkdir()
        (out / "results.json").write_text(json.dumps(results))
        tags = {
            "mlflow.parentRunId": parent.info.run_id,
            "slicefm.stage": stage,
            "slicefm.output_uri": str(out),
        }
        client.create_run(exp, run_name=stage, tags=tags)
    text = describe_run(tracking, "e", "r1")
    evaluate_part, external_part = text.split("\nexternal · ")
    assert "evaluate · every task" in evaluate_part
    assert _table_rows(evaluate_part) == [
        ["task", "protocol", "folds", "pretrained", "random", "pretrained − random [95% CI]"],
        ["lesion_location", "abmil", "5", "0.512 ± 0.030", "0.505 ± 0.020",
         "+0.007 [-0.020, +0.034] not resolved (interval includes 0)"],
        ["chest_findings", "probe", "5", "0.567 ± 0.023", "0.502 ± 0.015", "+0.065 [+0.031, +0.099] holds"],
    ]  # fmt: skip
    assert f"full report: {tmp_path / 'evaluate' / 'report.md'}" in evaluate_part
    # The external cohort's figures stay: its headline task, frozen vs retrained.
    assert external_part.startswith("task lesion_location · macro AUROC")
    assert _table_rows(external_part) == [
        ["model · setting", "AUROC", "AUPRC", "F1"],
        ["pretrained · frozen", "0.600 ± 0.050", "0.400 ± 0.040", "0.300 ± 0.030"],
        ["pretrained · retrained", "0.550 ± 0.050", "0.400 ± 0.040", "0.300 ± 0.030"],
    ]
    # An evaluate output from before the paired comparison: its headline table, as before.
    del evaluated["paired"]
    (tmp_path / "evaluate" / "results.json").write_text(
        json.dumps({**evaluated, "macro": {"lesion_location": external["macro"]["lesion_location"]}})
    )
    old = headline_report("evaluate", str(tmp_path / "evaluate"))
    assert old.startswith("\nevaluate · task lesion_location") and "every task" not in old


def test_submit_requires_a_host(tmp_path):
    with pytest.raises(SystemExit, match="KFP_HOST"):
        runner.submit(
            ROOT / "pipelines/configs/demo-cpu.yaml", host=None, namespace=None, experiment="e", token=None
        )


def test_forced_regeneration_replaces_an_existing_dataset(tmp_path):
    """`make data` over a stale dataset: the new cohort replaces it whole (no leftovers, no temp dirs)."""
    cfg = runner.load_config(ROOT / "pipelines/configs/demo-cpu.yaml").data.model_copy(
        update={"phantom_scans": 2, "phantom_size": 32}
    )
    out = tmp_path / "demo"
    out.mkdir()
    (out / "stale.txt").write_text("from an older generator")
    assert ensure_demo_data(cfg, out) == out and (out / "stale.txt").exists()  # not forced: kept as is
    ensure_demo_data(cfg, out, force=True)
    assert not (out / "stale.txt").exists()
    fresh = tmp_path / "fresh"
    ensure_demo_data(cfg, fresh)
    assert dvc_dir_md5(out) == dvc_dir_md5(fresh)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "fresh"]


def test_a_phantom_the_ingest_format_cannot_read_is_refused_before_generating(tmp_path):
    cfg = runner.load_config(ROOT / "pipelines/configs/demo-cpu.yaml").data.model_copy(
        update={"phantom_scans": 2, "phantom_size": 32, "phantom_format": "nifti"}
    )
    assert cfg.format == "dicom"
    with pytest.raises(ValueError, match="data.format 'dicom' cannot read .*phantom_format 'nifti'"):
        ensure_demo_data(cfg, tmp_path / "demo")
    assert not (tmp_path / "demo").exists()
    ensure_demo_data(cfg.model_copy(update={"format": "auto"}), tmp_path / "demo")
    assert sorted(p.suffix for p in (tmp_path / "demo").glob("scan_*")) == [".gz", ".gz"]


def _check_pretrain_branch(comps, dag, find, branch: dict, producer: str, train_slices_from: str) -> None:  # noqa: ANN001
    """One pretraining branch: the producer reads the pretraining cohort's slices, extraction fans out, evaluate
    and the external cohort follow."""
    slices = branch[producer]["inputs"]["artifacts"]["slices"]
    assert slices == {"componentInputArtifact": f"pipelinechannel--{train_slices_from}-slices"}
    assert find(branch, "shard-indices") and find(branch, "evaluate")
    # Both ways of pretraining open their MLflow stage run under the pipeline's parent run.
    assert branch[producer]["inputs"]["parameters"]["parent_run_id"] == {
        "componentInputParameter": "pipelinechannel--start-tracking-parent_run_id"
    }
    (ev_name,) = find(branch, "evaluate")
    # Extraction fans out over shards (pretrained + random-weight twin), collected by two merges.
    (loop,) = find(branch, "for-loop").values()
    loop_tasks = dag(loop)
    # The GPU parameters reach the tasks inside the loop (the compiler only forwards task inputs).
    loop_params = comps[loop["componentRef"]["name"]]["inputDefinitions"]["parameters"]
    assert {"pipelinechannel--extract_gpus", "pipelinechannel--gpu_accelerator"} <= set(loop_params)
    assert len(loop_tasks) == 2 and all(t["componentRef"]["name"].startswith("comp-extract") for t in loop_tasks.values())
    assert loop["inputs"]["artifacts"]["pipelinechannel--" + producer + "-encoder"]["taskOutputArtifact"][
        "producerTask"
    ] == producer
    merges = find(branch, "merge-embeddings")
    assert len(merges) == 2
    ev = branch[ev_name]["inputs"]["artifacts"]
    assert {ev[k]["taskOutputArtifact"]["producerTask"] for k in ("embeddings", "baseline")} == set(merges)
    # Two conditions: the external cohort, and the supervised ceiling.
    conditions = [dag(t) for t in find(branch, "condition").values()]
    (ext_tasks,) = (c for c in conditions if find(c, "external"))
    (ceiling_tasks,) = (c for c in conditions if find(c, "supervised-ceiling"))
    # The ceiling trains on the pretraining cohort's slices, is embedded on A, and is evaluated with the
    # pretrained and random sets on the plain evaluation's folds.
    (sup_name,) = find(ceiling_tasks, "supervised-ceiling")
    assert ceiling_tasks[sup_name]["inputs"]["artifacts"]["slices"] == {
        "componentInputArtifact": f"pipelinechannel--{train_slices_from}-slices"
    }
    (ev_ceiling,) = find(ceiling_tasks, "evaluate").values()
    ev_c = ev_ceiling["inputs"]["artifacts"]
    (sup_merge,) = find(ceiling_tasks, "merge-embeddings")
    assert ev_c["ceiling"]["taskOutputArtifact"]["producerTask"] == sup_merge
    assert ev_c["splits"] == {"componentInputArtifact": f"pipelinechannel--{ev_name}-results"}
    assert {ev_c[k]["componentInputArtifact"] for k in ("embeddings", "baseline")} == {
        f"pipelinechannel--{m}-embeddings" for m in merges
    }
    # The external cohort runs under a condition: its own ingest/preprocess, the same encoder, A's heads.
    ing_b = next(t for n, t in ext_tasks.items() if n.startswith("ingest"))
    assert ing_b["inputs"]["parameters"]["cohort"]["runtimeValue"]["constant"] == "b"
    (ext,) = find(ext_tasks, "external").values()
    assert ext["inputs"]["artifacts"]["source_results"] == {
        "componentInputArtifact": f"pipelinechannel--{ev_name}-results"
    }


def test_cluster_settings_at_compile_time_reach_every_step(tmp_path):
    """SLICEFM_IMAGE, SLICEFM_IMAGE_PULL_SECRETS and SLICEFM_SHM_SIZE, read when the pipeline is compiled
    (in a fresh interpreter: components read them at import)."""
    env = {**os.environ, "SLICEFM_IMAGE": "registry.example/slicefm:9", "SLICEFM_IMAGE_PULL_SECRETS": "regcred, other",
           "SLICEFM_SHM_SIZE": "48Gi", "SLICEFM_DATA_PVC": "ct-data"}  # fmt: skip
    out = tmp_path / "p.yaml"
    code = f"from pipelines import runner; runner.compile_pipeline(__import__('pathlib').Path({str(out)!r}))"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=ROOT, timeout=300)
    spec, platform = yaml.safe_load_all(out.read_text())
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name, executor in spec["deploymentSpec"]["executors"].items():
        assert executor["container"]["image"] == "registry.example/slicefm:9", name
        assert [s["secretName"] for s in k8s[name]["imagePullSecret"]] == ["regcred", "other"], name
    assert k8s["exec-pretrain"]["emptyDirMounts"][0]["sizeLimit"] == "48Gi"
    # The data steps keep fetched data on the PVC, mounted where their workspace parameter points.
    (mount,) = k8s["exec-ingest-preprocess"]["pvcMount"]
    assert mount["mountPath"] == "/mnt/slicefm-data" and mount["pvcNameParameter"]["runtimeValue"]["constant"] == "ct-data"
    assert "pvcMount" not in k8s["exec-pretrain"]


def test_the_kubeflow_ui_form_describes_every_parameter_and_defaults_to_the_demo_config(tmp_path):
    spec, _ = yaml.safe_load_all(runner.compile_pipeline(tmp_path / "p.yaml").read_text())
    params = spec["root"]["inputDefinitions"]["parameters"]
    described = {name: p.get("description", "") for name, p in params.items()}
    assert all(described.values()), [n for n, d in described.items() if not d]
    assert len(set(described.values())) == len(described)  # one description per parameter, none shared
    config = config_from_yaml(params["config_yaml"]["defaultValue"])
    assert config == runner.load_config(ROOT / "pipelines/configs/demo-cpu.yaml")

    def tasks_of(dag_tasks: dict):
        for name, task in dag_tasks.items():
            yield name, task
            yield from tasks_of(spec["components"][task["componentRef"]["name"]].get("dag", {}).get("tasks", {}))

    shown = {task["taskInfo"]["name"] for _, task in tasks_of(spec["root"]["dag"]["tasks"])}
    assert {"extract-a-pretrained", "extract-a-random", "merge-a-pretrained", "shards-a-pretrained-random",
            "extract-b-pretrained", "extract-a-supervised", "evaluate-ceiling"} <= shown  # fmt: skip
    loops = [t for _, t in tasks_of(spec["root"]["dag"]["tasks"]) if "parameterIterator" in t]
    assert loops and all(t["iteratorPolicy"] == {"parallelismLimit": 4} for t in loops)


def test_a_local_run_refuses_a_run_name_already_taken(tmp_path, monkeypatch):
    """Two local runs never share an MLflow parent or outputs: a taken --run-name stops before any data."""
    from slicefm.edge.tracking.mlflow_runs import start_pipeline_run

    config_path = tiny_pipeline_config(tmp_path)
    tracking = local_run_env(tmp_path, monkeypatch)
    cfg = runner.load_config(config_path)
    start_pipeline_run(tracking, cfg.experiment, "taken", {"slicefm.role": "pipeline"})
    with pytest.raises(SystemExit, match="run name 'taken' is taken"):
        runner.run_local(config_path, run_name="taken")
    assert not (tmp_path / "state" / "kfp").exists()


def test_submitted_runs_pull_the_checkouts_data_revision_when_a_dvc_remote_is_set(monkeypatch):
    cfg = runner.load_config(ROOT / "pipelines/configs/demo-cpu.yaml")
    monkeypatch.delenv("SLICEFM_DVC_REMOTE", raising=False)
    plain = runner._cluster_arguments(cfg, "http://mlflow:5000", "r")
    assert "data_dvc_file" not in plain and plain["data_source"] == "data/demo"
    monkeypatch.setenv("SLICEFM_DVC_REMOTE", "s3://bucket/dvcstore")
    args = runner._cluster_arguments(cfg, "http://mlflow:5000", "r")
    assert args["data_dvc_file"] == (ROOT / "data.dvc").read_text() and args["dvc_remote"] == "s3://bucket/dvcstore"
    assert args["data_version"] == runner.data_version(ROOT / "data/demo")  # the md5 the pull verifies
