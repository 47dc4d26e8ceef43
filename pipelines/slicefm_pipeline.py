"""The slicefm pipeline: ingest + preprocess -> pretrain -> extract (fan-out over shards) -> evaluate,
and the external cohort: ingest + preprocess -> extract with the same encoder -> external (frozen vs retrained).
Ingest and preprocess run as one step (one pass over each scan), with a record step for each.

Only wiring lives here; every step is a component from components/ calling the slicefm library.
"""

import json
from pathlib import Path

from kfp import dsl, kubernetes

from components.evaluate import evaluate, external
from components.extract import extract, merge_embeddings, shard_indices
from components.ingest_preprocess import ingest_preprocess
from components.launch_trainjob import launch_trainjob
from components.pretrain import pretrain
from components.pretrain import supervised_ceiling as supervised_ceiling_task
from components.settings import DATA_PVC, DATA_WORKSPACE, EXTRACT_PARALLELISM, IMAGE_PULL_SECRETS, SHM_SIZE
from components.tracking import finish_tracking, record_stage, start_tracking
from slicefm.config import load_config

# The pipeline's name in the Kubeflow UI, whatever the config's `name` (`slicefm pipeline submit` adds a version
# per git commit to it).
PIPELINE_NAME = "slicefm"
PIPELINE_DESCRIPTION = "CT scans -> slice embeddings -> patient-level predictions (slicefm)"
# The pipeline's default config in the Kubeflow UI: the demo preset in YAML's flow style (JSON) on one line;
# the compiler copies defaults into the YAML file's header comment, where a multi-line value breaks the file.
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "demo-cpu.yaml"
DEFAULT_CONFIG_YAML = json.dumps(load_config(DEFAULT_CONFIG).model_dump(mode="json"), separators=(",", ":"))

# Kubernetes Secrets (k8s/base/secrets.yaml) turned into environment variables of the steps.
S3_SECRET = {
    k: k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
}
MLFLOW_SECRET = {k: k for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
PSEUDONYM_SECRET = {"SLICEFM_PSEUDONYM_KEY": "SLICEFM_PSEUDONYM_KEY"}
# (cpu request, memory request, memory limit, timeout s) per kind of step.
RESOURCES = {
    "light": ("1", "2Gi", "4Gi", 3600),
    "data": ("4", "16Gi", "32Gi", 12 * 3600),
    "gpu": ("8", "64Gi", "128Gi", 48 * 3600),
    "eval": ("4", "16Gi", "32Gi", 12 * 3600),
}


def _on_cluster(task, kind: str, retries: int = 0, secrets: bool = True):  # noqa: ANN001, ANN202
    """Requests, limits, timeout, retries with backoff, credentials from Secrets and the image pull secrets
    (ignored by kfp.local)."""
    cpu, mem, mem_limit, timeout = RESOURCES[kind]
    task.set_cpu_request(cpu).set_memory_request(mem).set_memory_limit(mem_limit)
    kubernetes.set_timeout(task, timeout)
    if retries:
        task.set_retry(
            num_retries=retries, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="900s"
        )
    if IMAGE_PULL_SECRETS:
        kubernetes.set_image_pull_secrets(task, IMAGE_PULL_SECRETS)
    if secrets:
        kubernetes.use_secret_as_env(task, "slicefm-s3", S3_SECRET, optional=True)
        kubernetes.use_secret_as_env(task, "slicefm-mlflow", MLFLOW_SECRET, optional=True)
    return task


def _on_gpu_pool(task, accelerator: str, gpus, node_selector, tolerations):  # noqa: ANN001, ANN202
    """GPU request on the GPU node pool (selector + tolerations), /dev/shm in memory (SHM_SIZE) for loader workers."""
    task.set_accelerator_type(accelerator).set_accelerator_limit(gpus)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=SHM_SIZE)
    return task


def _stage_args(common: dict) -> dict:
    """The inputs every per-run stage takes (the data steps' own config is not one of them)."""
    return {k: v for k, v in common.items() if k not in _DATA_ONLY}


# Inputs of the data steps alone (not of the per-run stages).
_DATA_ONLY = ("data_config_yaml", "data_dvc_file", "dvc_remote")


def _ingest_and_preprocess(common: dict, source, version, cohort: str, label: str):  # noqa: ANN001, ANN202
    """Ingest + preprocess one cohort ("a" development, "b" external, "p" pretraining) in one step (each scan
    decoded once); returns it (its `slices` output is the preprocess output). Cacheable (no per-run input: the
    data sections of the config, the source, its version, the store); an uncached record step per stage logs
    its MLflow stage run under this run's parent."""
    data = {"config_yaml": common["data_config_yaml"], "store_uri": common["store_uri"]}
    pre = ingest_preprocess(
        data_source=source, data_version=version, cohort=cohort, dvc_file=common["data_dvc_file"],
        dvc_remote=common["dvc_remote"], workspace=DATA_WORKSPACE if DATA_PVC else "", **data,
    )  # fmt: skip
    if DATA_PVC:  # fetched data kept on a volume between steps and runs
        kubernetes.mount_pvc(pre, pvc_name=DATA_PVC, mount_path=DATA_WORKSPACE)
    pre.set_display_name("ingest-preprocess" if cohort == "a" else f"ingest-preprocess-{label}")
    kubernetes.use_secret_as_env(_on_cluster(pre, "data", retries=2), "slicefm-pseudonym", PSEUDONYM_SECRET)
    pre.set_caching_options(True)
    for stage, output in (("ingest", "scans"), ("preprocess", "slices")):
        rec = record_stage(
            tracking_uri=common["tracking_uri"], parent_run_id=common["parent_run_id"], output=pre.outputs[output]
        )
        rec.set_display_name(f"record-{stage}" + ("" if cohort == "a" else f"-{label}"))
        _on_cluster(rec, "light", retries=3).set_caching_options(False)
    return pre


def _embed_cohort(common: dict, gpu: dict, cohort: str, slices, encoder, n_shards, sets=None) -> dict:  # noqa: ANN001
    """Embedding sets of one cohort, each fanned out over shards and merged: by default the encoder's
    ("pretrained") and its random-weight twin's ("random"); `sets` maps set name -> random_baseline."""
    sets = sets or {"pretrained": False, "random": True}
    shards = _on_cluster(shard_indices(n_shards=n_shards), "light", secrets=False)
    shards.set_caching_options(True)
    shards.set_display_name(f"shards-{cohort}-{'-'.join(sets)}")
    loop = dsl.ParallelFor(
        shards.output, name=f"extract-{cohort}-{'-'.join(sets)}-shards", parallelism=EXTRACT_PARALLELISM
    )
    with loop as shard:
        parts = {}
        for which, random_baseline in sets.items():
            task = extract(
                **_stage_args(common), cohort=cohort, shard_index=shard, n_shards=n_shards, random_baseline=random_baseline,
                slices=slices, encoder=encoder, accelerator=gpu["pool"]["accelerator"], gpus=gpu["extract_gpus"],
                set_name=which,
            )  # fmt: skip
            task.set_caching_options(True)  # deterministic given the encoder and the slices
            task.set_display_name(f"extract-{cohort}-{which}")
            _on_gpu_pool(_on_cluster(task, "gpu", retries=2), gpus=gpu["extract_gpus"], **gpu["pool"])
            parts[which] = task
    merged = {}
    for which, task in parts.items():
        m = merge_embeddings(
            store_uri=common["store_uri"], run_name=common["run_name"], name=f"extract-{cohort}-{which}",
            parts=dsl.Collected(task.outputs["embeddings"]),
        )  # fmt: skip
        _on_cluster(m, "light", retries=2).set_caching_options(True)
        m.set_display_name(f"merge-{cohort}-{which}")
        merged[which] = m.outputs["embeddings"]
    return merged


def _evaluate_encoder(
    common: dict, gpu: dict, train_pre, pre, encoder, external_source, data_version, run_external,  # noqa: ANN001
    supervised_ceiling,  # noqa: ANN001
) -> None:
    """extract (pretrained + random twin) -> evaluate on cohort A; the external cohort B under a condition;
    and, when asked, the supervised ceiling (trained on `train_pre`'s labels, in parallel with pretraining)
    evaluated beside them on the same folds ("evaluate-ceiling": kfp.local cannot merge branches with
    dsl.OneOf, so the ceiling gets an evaluation of its own instead of a second copy of the whole graph)."""
    emb_a = _embed_cohort(common, gpu, "a", pre.outputs["slices"], encoder, gpu["shards"])
    ev = _on_cluster(evaluate(embeddings=emb_a["pretrained"], baseline=emb_a["random"], **_stage_args(common)), "eval", retries=1)
    ev.set_caching_options(False)
    with dsl.If(run_external == True, name="external-cohort"):  # noqa: E712  (a KFP condition)
        pre_b = _ingest_and_preprocess(common, external_source, data_version, "b", "external")
        emb_b = _embed_cohort(common, gpu, "b", pre_b.outputs["slices"], encoder, gpu["shards"])
        ext = external(
            source_results=ev.outputs["results"], embeddings=emb_b["pretrained"], baseline=emb_b["random"], **_stage_args(common)
        )
        _on_cluster(ext, "eval", retries=1).set_caching_options(False)
    with dsl.If(supervised_ceiling == True, name="supervised-ceiling"):  # noqa: E712  (a KFP condition)
        sup = supervised_ceiling_task(
            slices=train_pre.outputs["slices"], accelerator=gpu["pool"]["accelerator"], gpus=gpu["pretrain_gpus"],
            **_stage_args(common),
        )  # fmt: skip
        _on_gpu_pool(_on_cluster(sup, "gpu", retries=1), gpus=gpu["pretrain_gpus"], **gpu["pool"])
        sup.set_caching_options(False)
        emb_sup = _embed_cohort(
            common, gpu, "a", pre.outputs["slices"], sup.outputs["encoder"], gpu["shards"], {"supervised": False}
        )
        ev_sup = evaluate(
            embeddings=emb_a["pretrained"], baseline=emb_a["random"], ceiling=emb_sup["supervised"],
            splits=ev.outputs["results"], **_stage_args(common),
        )  # fmt: skip
        ev_sup.set_display_name("evaluate-ceiling")
        _on_cluster(ev_sup, "eval", retries=1).set_caching_options(False)


def _pretrain_and_evaluate(
    common: dict, gpu: dict, train_pre, eval_pre, external_source, data_version, run_external,  # noqa: ANN001
    pretrain_nodes, trainer_namespace, trainer_image, supervised_ceiling,  # noqa: ANN001
) -> None:
    """Pretrain on `train_pre`'s slices (in the step on one node, or a Trainer TrainJob over several), then
    extract + evaluate on `eval_pre`'s cohort (and the external one)."""
    pool = gpu["pool"]
    downstream = (external_source, data_version, run_external, supervised_ceiling)
    with dsl.If(pretrain_nodes <= 1, name="pretrain-single-node"):
        train = pretrain(
            slices=train_pre.outputs["slices"], accelerator=pool["accelerator"], gpus=gpu["pretrain_gpus"],
            **_stage_args(common),
        )  # fmt: skip
        _on_gpu_pool(_on_cluster(train, "gpu", retries=1), gpus=gpu["pretrain_gpus"], **pool)
        train.set_caching_options(False)  # training is not cached unless a user asks for it
        _evaluate_encoder(common, gpu, train_pre, eval_pre, train.outputs["encoder"], *downstream)
    with dsl.Else(name="pretrain-trainjob"):
        job = launch_trainjob(
            config_yaml=common["config_yaml"], store_uri=common["store_uri"], run_name=common["run_name"],
            slices=train_pre.outputs["slices"], tracking_uri=common["tracking_uri"],
            parent_run_id=common["parent_run_id"], image=trainer_image, namespace=trainer_namespace,
            num_nodes=pretrain_nodes, gpus_per_node=gpu["pretrain_gpus"], accelerator=pool["accelerator"],
            node_selector=pool["node_selector"], tolerations=pool["tolerations"],
        )  # fmt: skip
        _on_cluster(job, "light", retries=1).set_caching_options(False)
        kubernetes.set_timeout(job, 72 * 3600)
        _evaluate_encoder(common, gpu, train_pre, eval_pre, job.outputs["encoder"], *downstream)


@dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)
def slicefm_pipeline(
    data_source: str,
    tracking_uri: str,
    store_uri: str = "",
    run_name: str = "",
    experiment: str = "slicefm",
    data_version: str = "",
    external_source: str = "",
    run_external: bool = True,
    pretrain_source: str = "",
    pretrain_data_version: str = "",
    supervised_ceiling: bool = False,
    extract_shards: int = 1,
    pretrain_nodes: int = 1,
    gpu_accelerator: str = "nvidia.com/gpu",
    pretrain_gpus: int = 1,
    extract_gpus: int = 1,
    gpu_node_selector: dict = {"nvidia.com/gpu.present": "true"},  # noqa: B006 (a KFP default, never mutated)
    gpu_tolerations: list = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],  # noqa: B006
    trainer_namespace: str = "slicefm",
    trainer_image: str = "",
    data_dvc_file: str = "",
    dvc_remote: str = "",
    config_yaml: str = DEFAULT_CONFIG_YAML,
) -> None:
    """Run every slicefm stage.

    Args:
        config_yaml: the whole pipeline config as YAML text (pipelines/configs/*.yaml); defaults to the demo
            preset, so a run from the UI needs no pasted YAML.
        data_source: the dataset the steps read: a path they see (a mounted volume), an s3://bucket/prefix
            (downloaded by the ingest step), or with data_dvc_file a path inside the DVC-tracked output
            (data/demo).
        tracking_uri: MLflow tracking URI.
        store_uri: s3://bucket/prefix for stage outputs, or "" to keep them as KFP artifacts.
        run_name: run name (MLflow parent run name and store prefix); "" = <experiment>-<KFP run id>. A name
            another run already used (a cloned run) gets this run's id appended.
        experiment: MLflow experiment.
        data_version: DVC md5 / git revision of the dataset (lineage tag).
        external_source: root of the external cohort (B) visible to the steps.
        run_external: also run the external-cohort branch (frozen vs retrained heads on cohort B).
        pretrain_source: root of the pretraining cohort (P) visible to the steps; "" = pretrain on cohort A.
        pretrain_data_version: DVC md5 / git revision of the pretraining cohort (lineage tag).
        supervised_ceiling: also train the pretraining architecture on the pretraining cohort's labels and
            evaluate it beside pretrained and random (config section supervised_ceiling).
        extract_shards: extraction tasks per encoder and cohort (ParallelFor fan-out).
        pretrain_nodes: 1 = pretrain inside the step on one GPU node; > 1 = a Kubeflow Trainer TrainJob
            over that many nodes (needs store_uri = s3://...).
        gpu_accelerator: accelerator resource requested by GPU steps (nvidia.com/gpu, amd.com/gpu).
        pretrain_gpus: GPUs of the pretraining step (per node for a TrainJob); more than 1 trains with one
            process per GPU (torchrun).
        extract_gpus: GPUs of each extract task.
        gpu_node_selector: node labels of the GPU node pool (e.g. {"cloud.google.com/gke-accelerator":
            "nvidia-h100-80gb"}).
        gpu_tolerations: tolerations for the GPU pool's taints.
        trainer_namespace: namespace of the TrainJob (pretrain_nodes > 1).
        trainer_image: image of the TrainJob's pods ("" = the project image the steps run in).
        data_dvc_file: the text of data.dvc at the data revision to use (`make submit` sends the checkout's);
            the ingest steps `dvc pull` it from dvc_remote ("" = read data_source as it is).
        dvc_remote: URL of the DVC remote holding the data (s3://bucket/dvcstore).
    """
    start = _on_cluster(
        start_tracking(
            tracking_uri=tracking_uri, experiment=experiment, run_name=run_name, config_yaml=config_yaml,
            data_version=data_version, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ),
        "light", retries=3,
    )  # fmt: skip
    # The tracking steps open and close this run's MLflow parent: never served from the cache.
    start.set_caching_options(False)
    finish = _on_cluster(
        finish_tracking(tracking_uri=tracking_uri, experiment=experiment, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER),
        "light",
        retries=3,
    )
    finish.set_caching_options(False)
    pool = {
        "accelerator": gpu_accelerator,
        "node_selector": gpu_node_selector,
        "tolerations": gpu_tolerations,
    }
    gpu = {"extract_gpus": extract_gpus, "pretrain_gpus": pretrain_gpus, "pool": pool, "shards": extract_shards}
    with dsl.ExitHandler(finish):
        common = {
            "config_yaml": config_yaml,
            "tracking_uri": tracking_uri,
            "parent_run_id": start.outputs["parent_run_id"],
            "store_uri": store_uri,
            "run_name": start.outputs["run_name"],  # settled by start-tracking: unique per Kubeflow run
            "data_config_yaml": start.outputs["data_config_yaml"],  # the cacheable data steps' config
            "data_dvc_file": data_dvc_file,
            "dvc_remote": dvc_remote,
        }
        pre = _ingest_and_preprocess(common, data_source, data_version, "a", "development")
        downstream = {
            "external_source": external_source, "data_version": data_version, "run_external": run_external,
            "pretrain_nodes": pretrain_nodes, "trainer_namespace": trainer_namespace, "trainer_image": trainer_image,
            "supervised_ceiling": supervised_ceiling,
        }  # fmt: skip
        # Pretraining cohort: the evaluation cohort itself, or its own (a foundation model's corpus; needed
        # when pretraining reads labels the evaluation predicts). kfp.local cannot resolve dsl.OneOf, so each
        # branch carries the same downstream graph.
        with dsl.If(pretrain_source == "", name="pretrain-on-cohort-a"):
            _pretrain_and_evaluate(common, gpu, pre, pre, **downstream)
        with dsl.Else(name="pretrain-on-cohort-p"):
            pre_p = _ingest_and_preprocess(common, pretrain_source, pretrain_data_version, "p", "pretrain")
            _pretrain_and_evaluate(common, gpu, pre_p, pre, **downstream)
