"""Launch component: multi-node pretraining as a Kubeflow Trainer v2.3.0 TrainJob, waited for from this step.

The step itself needs no GPU: it creates the TrainJob (torchrun of `slicefm pretrain-worker` on num_nodes GPU
pods), follows it to Complete or Failed and deletes it. Around the job it keeps the pipeline's "pretrain"
MLflow stage run (tagged as a TrainJob) and, once the job completed, registers the encoder the job wrote,
exactly as the single-node pretrain step does. It must run under a service account bound to the
Role slicefm-launcher (k8s/base/rbac.yaml). Input and output live in the S3 artifact store, which every
training node reads and writes directly.
"""

from typing import Optional

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.settings import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def launch_trainjob(
    config_yaml: str,
    store_uri: str,
    run_name: str,
    slices: Input[Dataset],
    encoder: Output[Model],
    tracking_uri: str = "",
    parent_run_id: str = "",
    image: str = "",
    namespace: str = "slicefm",
    num_nodes: int = 2,
    gpus_per_node: int = 8,
    accelerator: str = "nvidia.com/gpu",
    node_selector: Optional[dict] = None,  # noqa: UP045 (KFP 2.17 cannot parse "dict | None")
    tolerations: Optional[list] = None,  # noqa: UP045
    runtime: str = "torch-distributed",
    shm_size: str = "16Gi",
    cpu_per_node: str = "8",
    memory_per_node: str = "64Gi",
    service_account: str = "slicefm-trainer",
    timeout_s: int = 172800,
    poll_s: int = 30,
    cleanup: bool = True,
) -> str:
    """Pretrain the encoder on a multi-node GPU TrainJob (MoCo-v3 / LECL / LeJEPA, as the pretrain step).

    Args:
        config_yaml: pipeline config; the TrainJob's pods read its pretrain section.
        store_uri: s3://bucket/prefix of the artifact store (required: every node reads and writes it).
        run_name: pipeline run name; names the TrainJob (<run_name>-pretrain) and the output prefix.
        slices: the preprocess output (its metadata "uri" must be an s3:// location).
        encoder: output: metadata "uri" = <store_uri>/<run_name>/pretrain (encoder.safetensors +
            encoder.json + checkpoints/), plus trainjob, namespace, num_nodes, gpus_per_node, method,
            encoder name; nothing is written into the artifact directory itself.
        tracking_uri: MLflow tracking URI of the stage run, also MLFLOW_TRACKING_URI of the training pods
            ("" = no tracking).
        parent_run_id: the pipeline's parent run; the stage run nests under it ("" = no stage run).
        image: training image, the project image ("" = slicefm:0.1.0).
        namespace: namespace of the TrainJob (where the slicefm-s3 / slicefm-mlflow secrets are).
        num_nodes: training pods (one per node).
        gpus_per_node: GPUs per pod, also torchrun processes per pod (0 = CPU pods, one process each).
        accelerator: extended resource name of the GPUs (nvidia.com/gpu, amd.com/gpu).
        node_selector: node labels of the GPU node pool, e.g. {"cloud.google.com/gke-accelerator":
            "nvidia-h100-80gb"} (None = no selector).
        tolerations: Kubernetes tolerations for the pool's taints, e.g. [{"key": "nvidia.com/gpu",
            "operator": "Exists", "effect": "NoSchedule"}] (None = none).
        runtime: ClusterTrainingRuntime of Trainer v2.3.0 to run on.
        shm_size: size of the in-memory /dev/shm of each pod (DataLoader workers, NCCL).
        cpu_per_node: CPU request per pod ("" = none).
        memory_per_node: memory request and limit per pod ("" = none).
        service_account: service account of the training pods.
        timeout_s: give up (and delete the TrainJob) after this many seconds.
        poll_s: seconds between status polls.
        cleanup: delete the TrainJob and its pods when it ends, whatever the outcome.
    Returns:
        The TrainJob name.
    """
    from slicefm.config import config_from_yaml
    from slicefm.edge.kfp_io import URI_KEY, input_location, output_location
    from slicefm.edge.stages import launched_pretrain_stage
    from slicefm.edge.trainjob import TrainJobConfig, run_trainjob, trainjob_name

    if not store_uri.startswith("s3://"):
        raise ValueError(
            "multi-node pretraining needs the S3 artifact store: set store_uri to s3://bucket/prefix"
        )
    cfg = config_from_yaml(config_yaml)
    settings = {
        "namespace": namespace,
        "num_nodes": num_nodes,
        "gpus_per_node": gpus_per_node,
        "accelerator": accelerator,
        "node_selector": node_selector or {},
        "tolerations": tolerations or [],
        "runtime": runtime,
        "shm_size": shm_size,
        "cpu_per_node": cpu_per_node,
        "memory_per_node": memory_per_node,
        "service_account": service_account,
        "tracking_uri": tracking_uri,
        "timeout_s": timeout_s,
        "poll_s": poll_s,
        "cleanup": cleanup,
    }
    if image:
        settings["image"] = image
    job = TrainJobConfig.model_validate(settings)
    name = trainjob_name(run_name, "pretrain")
    out = output_location(encoder.path, store_uri, run_name, "pretrain")
    launched_pretrain_stage(
        cfg,
        out,
        lambda stage_run_id: run_trainjob(
            job,
            name=name,
            preprocessed_uri=input_location(slices.path, slices.metadata),
            out_uri=out,
            config_yaml=config_yaml,
            mlflow_run_id=stage_run_id,
        ),
        tracking_uri,
        parent_run_id,
        launcher="trainjob",
        details={
            "name": name,
            "namespace": namespace,
            "num_nodes": num_nodes,
            "gpus_per_node": gpus_per_node,
        },
    )
    encoder.metadata.update(
        {
            URI_KEY: out,
            "trainjob": name,
            "namespace": namespace,
            "num_nodes": num_nodes,
            "gpus_per_node": gpus_per_node,
            "method": cfg.pretrain.method,
            "encoder": cfg.pretrain.encoder.name,
        }
    )
    return name
