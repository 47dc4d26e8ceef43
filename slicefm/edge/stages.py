"""Stage entry points shared by the CLI and the Kubeflow components.

Each takes URIs and a typed config, runs the science from the library, and (when a tracking URI is
given) records a nested MLflow run under the pipeline's parent run: params, metrics, the resolved config.

Each stage imports the library it runs inside its own function, and MLflow only when a run is tracked:
`slicefm ingest` must not pay for torch, timm, MLflow or the evaluation (tests/test_verb_imports.py).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from slicefm.config import PipelineConfig, dump_config
from slicefm.core.store import open_store
from slicefm.data.config import DataConfig
from slicefm.data.pseudonym import key_fingerprint
from slicefm.edge.tracking import mlflow_runs  # standard library only: mlflow is imported by a tracked run

if TYPE_CHECKING:
    from slicefm.data.ingest import IngestResult
    from slicefm.embed.extract import ExtractResult
    from slicefm.evaluate.external_stage import ExternalStageResult
    from slicefm.evaluate.stage import EvaluateResult
    from slicefm.preprocess.fused import FusedResult
    from slicefm.preprocess.stage import PreprocessResult
    from slicefm.train.stage import PretrainResult
    from slicefm.train.supervised import SupervisedResult

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _tracked(
    tracking_uri: str | None,
    parent_run_id: str | None,
    stage: str,
    cfg: PipelineConfig,
    params: dict,
    tags: Mapping[str, str] | None = None,
) -> Iterator:
    if not tracking_uri or not parent_run_id:
        yield None
        return
    all_tags = {
        **(tags or {}),
        "slicefm.stage": stage,
        "slicefm.config_hash": mlflow_runs.config_hash(cfg.model_dump(mode="json")),
    }
    with mlflow_runs.stage_run(tracking_uri, parent_run_id, stage, params, all_tags) as run:
        yield run


STAGE_RECORD = "stage_record.json"
# What the data stages' MLflow runs log from their outputs.
INGEST_ARTIFACTS = ["dataset.json", "quarantine.csv", "config.yaml"]
PREPROCESS_ARTIFACTS = ["preprocess.json", "config.yaml"]


def _write_record(
    out_uri: str, stage: str, cfg: PipelineConfig, params: Mapping, metrics: Mapping, artifacts: list[str]
) -> None:
    """What the stage run logs, kept beside the output: a cached step's record step logs it in a later run."""
    import time

    record = {
        "stage": stage, "params": dict(params), "metrics": {k: float(v) for k, v in metrics.items()},
        "artifacts": artifacts, "config_hash": mlflow_runs.config_hash(cfg.model_dump(mode="json")),
        "written_at": time.time(),
    }  # fmt: skip
    open_store(out_uri).write_json(STAGE_RECORD, record)


def record_stage(tracking_uri: str, parent_run_id: str, out_uri: str) -> str:
    """The nested stage run of a cacheable step, from the record in its output; tagged `slicefm.cached=true`
    when the output predates this pipeline run (a cache hit). Returns the stage's name."""
    from mlflow.tracking import MlflowClient

    record = open_store(out_uri).read_json(STAGE_RECORD)
    parent_start = MlflowClient(tracking_uri).get_run(parent_run_id).info.start_time / 1000.0
    tags = {
        "slicefm.stage": record["stage"],
        "slicefm.config_hash": record["config_hash"],
        "slicefm.output": out_uri,
        "slicefm.cached": str(record["written_at"] < parent_start).lower(),
    }
    with mlflow_runs.stage_run(tracking_uri, parent_run_id, record["stage"], record["params"], tags):
        _log_metrics(record["metrics"])
        _log_artifacts(out_uri, record["artifacts"])
    return str(record["stage"])


def data_config_yaml(cfg: PipelineConfig) -> str:
    """Only the sections ingest and preprocess read (every cohort's data, ingest, preprocess), as the config
    YAML those steps receive: a change elsewhere (training, evaluation, the run's name) keeps their cache."""
    from slicefm.config import ExternalSection

    slim = PipelineConfig(
        data=cfg.data, ingest=cfg.ingest, preprocess=cfg.preprocess, pretrain_data=cfg.pretrain_data,
        external=ExternalSection(data=cfg.external.data),
    )  # fmt: skip
    return dump_config(slim)


def ingest_stage(
    cfg: PipelineConfig,
    source: str,
    out_uri: str,
    key: bytes,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    data_version: str | None = None,
    cohort: str = "a",
) -> IngestResult:
    """Ingest cohort "a" (config `data`), the external cohort "b" (`external.data`) or the pretraining
    cohort "p" (`pretrain_data`)."""
    from slicefm.data.ingest import ingest

    stage = "ingest" if cohort == "a" else f"ingest-{cohort}"
    data = cohort_data(cfg, cohort)
    params = _ingest_params(cfg, data, data_version, key)
    with _tracked(tracking_uri, parent_run_id, stage, cfg, params):
        result = ingest(
            Path(source), out_uri, key, data.format, data.cohort, cfg.ingest.workers, data_version,
            max_tilt_deg=cfg.ingest.max_tilt_deg,
        )  # fmt: skip
        metrics = _ingest_metrics(result)
        _keep_record(out_uri, stage, cfg, params, metrics, INGEST_ARTIFACTS)
        _log_metrics(metrics)
        _log_artifacts(out_uri, INGEST_ARTIFACTS)
    return result


def ingest_preprocess_stage(
    cfg: PipelineConfig,
    source: str,
    ingest_out: str,
    preprocess_out: str,
    key: bytes,
    data_version: str | None = None,
    cohort: str = "a",
) -> FusedResult:
    """Ingest and preprocess one cohort in one pass (`slicefm.preprocess.fused`): each scan decoded once, one
    worker pool, canonical volumes only with `ingest.keep_volumes`. Writes both stages' outputs with the
    records their record steps log (stage names and params as the stages alone; param pass=fused)."""
    from slicefm.preprocess.fused import ingest_and_preprocess

    suffix = "" if cohort == "a" else f"-{cohort}"
    data = cohort_data(cfg, cohort)
    result = ingest_and_preprocess(
        Path(source), ingest_out, preprocess_out, key, cfg.preprocess, data.format, data.cohort,
        cfg.ingest.workers, data_version, max_tilt_deg=cfg.ingest.max_tilt_deg, keep_volumes=cfg.ingest.keep_volumes,
    )  # fmt: skip
    ing, pre = result.ingest, result.preprocess
    fused = {"pass": "fused"}
    ingest_params = {**_ingest_params(cfg, data, data_version, key), "keep_volumes": cfg.ingest.keep_volumes, **fused}
    preprocess_params = {**cfg.preprocess.model_dump(mode="json"), **fused}
    _keep_record(ing.out_uri, f"ingest{suffix}", cfg, ingest_params, _ingest_metrics(ing), INGEST_ARTIFACTS)
    _keep_record(pre.out_uri, f"preprocess{suffix}", cfg, preprocess_params, _preprocess_metrics(pre), PREPROCESS_ARTIFACTS)
    return result


def _ingest_params(cfg: PipelineConfig, data: DataConfig, data_version: str | None, key: bytes) -> dict:
    return {
        "source_format": data.format,
        "workers": cfg.ingest.workers,
        "max_tilt_deg": cfg.ingest.max_tilt_deg,
        "data_version": data_version or "",
        "pseudonym_key_fingerprint": key_fingerprint(key),
    }


def _ingest_metrics(result: IngestResult) -> dict[str, float]:
    return {"n_scans": result.n_scans, "n_quarantined": result.n_quarantined, "n_lesions": result.n_lesions}


def _preprocess_metrics(result: PreprocessResult) -> dict[str, float]:
    return {"n_scans": result.n_scans, "n_slices": result.n_slices, "n_skipped": result.n_skipped}


def _keep_record(
    out_uri: str, stage: str, cfg: PipelineConfig, params: Mapping, metrics: Mapping, artifacts: list[str]
) -> None:
    """The resolved config and the stage record beside a data stage's output."""
    open_store(out_uri).write_bytes("config.yaml", dump_config(cfg).encode())
    _write_record(out_uri, stage, cfg, params, metrics, artifacts)


def cohort_data(cfg: PipelineConfig, cohort: str) -> DataConfig:
    """The data section of a pipeline cohort: "a" evaluation, "b" external, "p" pretraining."""
    if cohort == "p" and cfg.pretrain_data is None:
        raise ValueError("cohort 'p' (pretraining) needs a pretrain_data section in the config")
    sections = {"a": cfg.data, "b": cfg.external.data, "p": cfg.pretrain_data}
    if cohort not in sections:
        raise ValueError(f"unknown cohort {cohort!r} (a: data, b: external.data, p: pretrain_data)")
    return sections[cohort]  # type: ignore[return-value]


def preprocess_stage(
    cfg: PipelineConfig,
    scans_uri: str,
    out_uri: str,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    stage: str = "preprocess",
) -> PreprocessResult:
    from slicefm.preprocess.stage import run_preprocess

    params = cfg.preprocess.model_dump(mode="json")
    with _tracked(tracking_uri, parent_run_id, stage, cfg, params):
        result = run_preprocess(scans_uri, out_uri, cfg.preprocess)
        metrics = _preprocess_metrics(result)
        _keep_record(out_uri, stage, cfg, params, metrics, PREPROCESS_ARTIFACTS)
        _log_metrics(metrics)
        _log_artifacts(out_uri, PREPROCESS_ARTIFACTS)
    return result


def pretrain_stage(
    cfg: PipelineConfig,
    preprocessed_uri: str,
    out_uri: str,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    resume: bool = True,
) -> PretrainResult:
    """Self-supervised pretraining; checkpoints (resumable) and encoder.safetensors/json under out_uri."""
    from slicefm.train.stage import run_pretrain

    with _pretrain_run(cfg, out_uri, tracking_uri, parent_run_id):
        result = run_pretrain(
            preprocessed_uri, out_uri, cfg.pretrain, resume=resume, log_metrics=mlflow_runs.log_step_metrics
        )
        _log_pretrain_metrics(result.to_dict())
    return result


def supervised_ceiling_stage(
    cfg: PipelineConfig,
    preprocessed_uri: str,
    out_uri: str,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
) -> SupervisedResult:
    """The supervised ceiling (pretrain.encoder trained on the cohort's labels), exported like an encoder."""
    from slicefm.train.supervised import run_supervised_ceiling

    params = {**cfg.supervised_ceiling.model_dump(mode="json"), "encoder": cfg.pretrain.encoder.name}
    with _tracked(tracking_uri, parent_run_id, "supervised-ceiling", cfg, params):
        result = run_supervised_ceiling(
            preprocessed_uri, out_uri, cfg.pretrain, cfg.supervised_ceiling, mlflow_runs.log_step_metrics
        )
        _log_metrics({k: getattr(result, k) for k in ("loss_first", "loss_last", "n_slices", "train_s")})
        _log_artifacts(out_uri, ["supervised_result.json"])
        _log_encoder_files(out_uri)
    return result


def launched_pretrain_stage(
    cfg: PipelineConfig,
    out_uri: str,
    launch: Callable[[str | None], object],
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    *,
    launcher: str = "trainjob",
    details: Mapping[str, object] | None = None,
) -> None:
    """Pretraining in other processes: `launch(stage_run_id)` starts them (a multi-node TrainJob, or torchrun
    over this node's GPUs) and returns once they completed; their rank 0 logs its per-step metrics into that
    run (None when untracked); they write pretrain_result.json beside the encoder.

    The same stage run, metrics and encoder registration as `pretrain_stage`; the run is tagged
    `slicefm.launcher=<launcher>` plus `slicefm.<launcher>.<key>` for each item of `details`.
    """
    tags = {
        "slicefm.launcher": launcher,
        **{f"slicefm.{launcher}.{k}": str(v) for k, v in (details or {}).items()},
    }
    with _pretrain_run(cfg, out_uri, tracking_uri, parent_run_id, tags) as run:
        launch(run.info.run_id if run is not None else None)
        if run is not None:
            _log_pretrain_metrics(open_store(out_uri).read_json("pretrain_result.json"))


@contextlib.contextmanager
def _pretrain_run(
    cfg: PipelineConfig,
    out_uri: str,
    tracking_uri: str | None,
    parent_run_id: str | None,
    tags: Mapping[str, str] | None = None,
) -> Iterator:
    """The pretrain stage run around the training; once the block succeeds, the encoder it wrote to
    out_uri becomes a new version of `<name>-encoder` (a failed block registers nothing)."""
    params = cfg.pretrain.model_dump(mode="json")
    with _tracked(tracking_uri, parent_run_id, "pretrain", cfg, params, tags) as run:
        yield run
        _log_artifacts(out_uri, [])
        _log_encoder_files(out_uri)
        _register(out_uri, f"{cfg.name}-encoder")


def pretrain_scalars(result: Mapping) -> dict[str, float]:
    """A PretrainResult (as its dict) -> the scalars the stage run and the step's KFP Metrics show."""
    keys = ("steps", "loss_first", "loss_last", "slices_per_s")
    return {
        **{k: float(result[k]) for k in keys},
        **({"n_train_scans": float(result["n_train_scans"])} if result.get("n_train_scans") else {}),
        **{f"collapse_{k}": float(v) for k, v in result.get("collapse", {}).items()},
    }


def _log_pretrain_metrics(result: Mapping) -> None:
    _log_metrics(pretrain_scalars(result))


def extract_stage(
    cfg: PipelineConfig,
    preprocessed_uri: str,
    out_uri: str,
    encoder_uri: str | None = None,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    shard_index: int = 0,
    n_shards: int = 1,
    random_baseline: bool = False,
    cohort: str = "a",
) -> ExtractResult:
    """Embed every slice with the configured encoder (or, with `random_baseline`, its random-weight twin)."""
    from slicefm.edge.tracking.models import download_encoder
    from slicefm.embed.extract import run_extract
    from slicefm.embed.sources import random_twin, resolve_encoder
    from slicefm.train.supervised import SUPERVISED_LABEL

    pre = open_store(preprocessed_uri)
    meta = pre.read_json("preprocess.json")
    size = int(pre.read_npy_header(_first_stack(pre)).shape[-1])
    encoder, info = resolve_encoder(
        cfg.extract, encoder_uri, len(meta["channels"]), size, cfg.seed, fetch_registered=download_encoder
    )
    if random_baseline:
        encoder, info = random_twin(info, cfg.seed)
    which = "-random" if random_baseline else ("-supervised" if info.label == SUPERVISED_LABEL else "")
    stage = f"extract{which}" + ("" if cohort == "a" else f"-{cohort}")
    params = {
        **cfg.extract.model_dump(mode="json"),
        "label": info.label,
        "shard": f"{shard_index}/{n_shards}",
    }
    with _tracked(
        tracking_uri, parent_run_id, stage if n_shards == 1 else f"{stage}-{shard_index}", cfg, params
    ):
        result = run_extract(preprocessed_uri, out_uri, encoder, info, cfg.extract, shard_index, n_shards)
        _log_metrics(
            {"n_scans": result.n_scans, "n_slices": result.n_slices, "slices_per_s": result.slices_per_s}
        )
        _log_artifacts(out_uri, ["extract.json"])
    return result


def _first_stack(pre) -> str:  # noqa: ANN001
    return str(pre.read_parquet("slices.parquet", columns=["stack"])["stack"].iloc[0])


def evaluate_stage(
    cfg: PipelineConfig,
    embedding_uris: list[str],
    out_uri: str,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    splits_uri: str | None = None,
    stage: str = "evaluate",
) -> EvaluateResult:
    """Cross-validated heads for every task on every embedding set (same folds), report and plots.

    The "evaluate" stage registers the headline task's candidate head and promotes it through the gate
    (slicefm.edge.promotion); the supervised ceiling's evaluation, "evaluate-ceiling", registers nothing."""
    from slicefm.edge.kfp_reports import comparison_scalars, headline_scalars
    from slicefm.evaluate.stage import run_evaluate

    params = {"tasks": ",".join(t.name for t in cfg.evaluate.tasks), "n_embedding_sets": len(embedding_uris)}
    with _tracked(tracking_uri, parent_run_id, stage, cfg, params):
        result = run_evaluate(embedding_uris, out_uri, cfg.evaluate, splits_uri)
        _log_metrics(
            headline_scalars(result.headline, "macro", with_sd=False) | comparison_scalars(result.comparison)
        )
        _log_artifacts(out_uri, ["report.md", "report.html", "results.json", "continuity.json"])
        _log_tree(out_uri, ".png", "plots")
        if stage == "evaluate":
            _register_heads(cfg, result)
    return result


def _register_heads(cfg: PipelineConfig, result: EvaluateResult) -> None:
    """The headline task's candidate head -> a new version of `<name>-<task>-head` with its encoder's version
    in its lineage; `champion` (head and encoder) moves only through the gate (slicefm.edge.promotion)."""
    if (mlflow := mlflow_runs.active_mlflow()) is None:
        return
    from mlflow.tracking import MlflowClient

    from slicefm.edge import promotion
    from slicefm.edge.tracking.models import pull_model, set_alias
    from slicefm.edge.tracking.registry import register_head
    from slicefm.train.supervised import SUPERVISED_LABEL

    metric = cfg.evaluate.headline_metric
    rows = [
        promotion.Scored(r.model, r.protocol, float(m), r.uri)
        for r in result.runs
        if r.task == result.headline_task and (m := result.headline[r.key][metric].mean) is not None
    ]
    candidate = promotion.pick_candidate(rows, excluded=(promotion.RANDOM_LABEL, SUPERVISED_LABEL))
    if candidate is None:
        mlflow.set_tag(promotion.PROMOTION_TAG, "held: no head of a pretrained encoder to register")
        return
    client = MlflowClient()
    head_name, encoder_name = f"{cfg.name}-{result.headline_task}-head", f"{cfg.name}-encoder"
    metric_key = f"macro_{metric}"
    # results.json records each set's encoder (EncoderInfo), the weights' hash with it.
    models = open_store(result.out_uri).read_json("results.json")["models"]
    weights = models.get(candidate.model, {}).get("weights_sha256")
    encoder_version = promotion.encoder_version(client, encoder_name, weights)
    baseline = promotion.baseline_for(rows, candidate)
    decision = promotion.decide(
        candidate, baseline, promotion.champion_value(client, head_name, f"slicefm.{metric_key}"), metric
    )
    lineage = {
        "task": result.headline_task,
        "embeddings": candidate.model,
        "protocol": candidate.protocol,
        metric_key: candidate.value,
        f"random_{metric_key}": baseline.value if baseline else None,
        "encoder_model": encoder_name if encoder_version else None,
        "encoder_version": encoder_version,
        "encoder_weights_sha256": weights,
        "promotion": ("promoted: " if decision.promote else "held: ") + decision.reason,
    }
    with tempfile.TemporaryDirectory(prefix="slicefm-encoder-") as tmp:
        # The head is registered with its encoder (pulled and verified from the registry) so it predicts on its
        # own; without a registered encoder it carries its files only and `slicefm predict` refuses it.
        encoder_dir = (
            pull_model(f"{encoder_name}:{encoder_version}", Path(tmp) / "encoder", client.tracking_uri).path
            if encoder_version
            else None
        )
        version = register_head(
            f"{candidate.uri.rstrip('/')}/heads", head_name, lineage=lineage, encoder_dir=encoder_dir
        )
    if decision.promote:
        set_alias(head_name, version, promotion.CHAMPION)
        if encoder_version:
            set_alias(encoder_name, encoder_version, promotion.CHAMPION)
    (log.info if decision.promote else log.warning)(
        "%s version %s %s: %s", head_name, version, "promoted" if decision.promote else "held", decision.reason
    )
    mlflow.set_tags(
        {
            "slicefm.registered_head": head_name,
            "slicefm.head_version": version,
            promotion.PROMOTION_TAG: lineage["promotion"],
        }
    )


def external_stage(
    cfg: PipelineConfig,
    source_eval_uri: str,
    embedding_uris: list[str],
    out_uri: str,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
) -> ExternalStageResult:
    """Cohort A's heads on cohort B (frozen) vs heads retrained on B, on B's test sets."""
    from slicefm.edge.kfp_reports import headline_scalars
    from slicefm.evaluate.external_stage import run_external_stage

    params = {"tasks": ",".join(cfg.external.tasks), "protocol": cfg.external.protocol}
    with _tracked(tracking_uri, parent_run_id, "external", cfg, params):
        result = run_external_stage(source_eval_uri, embedding_uris, out_uri, cfg.evaluate, cfg.external)
        _log_metrics(headline_scalars(result.headline, "external", with_sd=False))
        _log_artifacts(out_uri, ["report.md", "report.html", "results.json"])
    return result


def _log_tree(out_uri: str, suffix: str, artifact_path: str, limit: int = 200) -> None:
    """Files under out_uri ending in `suffix` (plots) as MLflow artifacts, keeping their folders."""
    if (mlflow := mlflow_runs.active_mlflow()) is None:
        return
    store = open_store(out_uri)
    keys = [k for k in store.list("") if k.endswith(suffix)][:limit]
    with tempfile.TemporaryDirectory() as tmp:
        for key in keys:
            path = Path(tmp) / key
            store.download_file(key, path)
            mlflow.log_artifact(str(path), artifact_path=f"{artifact_path}/{Path(key).parent}")


def _register(encoder_uri: str, model_name: str) -> None:
    """New registry version of the encoder, tagged on the stage run (only when tracking is on)."""
    if (mlflow := mlflow_runs.active_mlflow()) is not None:
        from slicefm.edge.tracking.models import edge_lineage
        from slicefm.edge.tracking.registry import register_encoder

        # stages.py is the edge shared by the CLI and the components: the image tag and commit are read here.
        version = register_encoder(encoder_uri, model_name, lineage=edge_lineage())
        mlflow.set_tags({"slicefm.registered_model": model_name, "slicefm.model_version": version})


def _log_metrics(metrics: dict) -> None:
    if (mlflow := mlflow_runs.active_mlflow()) is not None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})


def _log_encoder_files(out_uri: str) -> None:
    """The encoder a stage exported to out_uri (encoder.safetensors + .json) as run artifacts under `encoder/`."""
    from slicefm.models.export_format import ENCODER_FILES

    mlflow_runs.log_store_files(out_uri, ENCODER_FILES, artifact_path="encoder")


def _log_artifacts(out_uri: str, keys: list[str]) -> None:
    """Small summary files go to MLflow too; bulk data stays in the artifact store."""
    if (mlflow := mlflow_runs.active_mlflow()) is None:
        return
    store = open_store(out_uri)
    mlflow.set_tag("slicefm.output_uri", store.uri(""))
    with tempfile.TemporaryDirectory() as tmp:
        for key in keys:
            if store.exists(key):
                path = Path(tmp) / key
                path.write_bytes(store.read_bytes(key))
                mlflow.log_artifact(str(path))


__all__ = [
    "ingest_stage",
    "preprocess_stage",
    "pretrain_stage",
    "launched_pretrain_stage",
    "record_stage",
    "data_config_yaml",
    "extract_stage",
    "evaluate_stage",
    "external_stage",
]
