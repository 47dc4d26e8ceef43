"""Pretrain component: preprocessed slices -> self-supervised encoder (single node, inside the step)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.settings import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def pretrain(
    config_yaml: str,
    tracking_uri: str,
    parent_run_id: str,
    store_uri: str,
    run_name: str,
    slices: Input[Dataset],
    encoder: Output[Model],
    metrics: Output[Metrics],
    accelerator: str = "",
    gpus: int = 0,
) -> float:
    """MoCo-v3 / LECL / LeJEPA (+ auxiliary supervision) pretraining, resumable from its checkpoints.

    Args:
        config_yaml: pipeline config (pretrain section is used).
        tracking_uri: MLflow tracking URI; parent_run_id: the pipeline's parent run.
        store_uri: artifact store (s3://...) or "" to write into the KFP artifact; run_name: store prefix.
        slices: the preprocess output.
        encoder: output: encoder.safetensors + encoder.json, checkpoints/.
        metrics: output: steps, first/last loss, slices/s and the last collapse check (Kubeflow UI).
        accelerator, gpus: this step's GPU request (recorded in the metadata; passing them as inputs is what
            makes the pipeline's GPU parameters reach the task inside its condition). With gpus > 0 the step
            fails at once when torch sees fewer GPUs; with gpus > 1 it trains with one process per GPU
            (torchrun, DDP).
    Returns:
        Mean loss over the last steps.
    """
    from slicefm.config import config_from_yaml
    from slicefm.core.store import open_store
    from slicefm.edge.kfp_io import encoder_metadata, input_location, output_location, require_gpus
    from slicefm.edge.launch import run_torchrun
    from slicefm.edge.stages import launched_pretrain_stage, pretrain_scalars, pretrain_stage

    require_gpus(gpus)
    cfg = config_from_yaml(config_yaml)
    out = output_location(encoder.path, store_uri, run_name, "pretrain")
    pre = input_location(slices.path, slices.metadata)
    if gpus > 1:  # one process per GPU of this node (DDP), started by torchrun inside the step
        launched_pretrain_stage(
            cfg, out,
            lambda run_id: run_torchrun(gpus, pre, out, config_yaml, mlflow_run_id=run_id, tracking_uri=tracking_uri),
            tracking_uri, parent_run_id, launcher="torchrun", details={"nproc_per_node": gpus},
        )  # fmt: skip
        result = open_store(out).read_json("pretrain_result.json")  # what the ranks wrote
    else:
        result = pretrain_stage(cfg, pre, out, tracking_uri, parent_run_id).to_dict()
    for name, value in pretrain_scalars(result).items():
        metrics.log_metric(name, value)
    steps, loss_last = int(result["steps"]), float(result["loss_last"])
    encoder.metadata.update(
        encoder_metadata(out, cfg.pretrain.method, cfg.pretrain.encoder.name, steps, accelerator, gpus)
    )
    return loss_last


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def supervised_ceiling(
    config_yaml: str,
    tracking_uri: str,
    parent_run_id: str,
    store_uri: str,
    run_name: str,
    slices: Input[Dataset],
    encoder: Output[Model],
    accelerator: str = "",
    gpus: int = 0,
) -> float:
    """The supervised ceiling: pretrain.encoder's architecture trained on the cohort's lesion / finding labels.

    Args:
        config_yaml: pipeline config (pretrain.encoder and supervised_ceiling sections are used).
        tracking_uri: MLflow tracking URI; parent_run_id: the pipeline's parent run.
        store_uri: artifact store (s3://...) or "" to write into the KFP artifact; run_name: store prefix.
        slices: the preprocess output of the pretraining cohort (never the evaluated scans' labels).
        encoder: output: encoder.safetensors + encoder.json (label "supervised"), supervised_result.json.
        accelerator, gpus: this step's GPU request (as for pretrain).
    Returns:
        Mean loss over the last steps.
    """
    from slicefm.config import config_from_yaml
    from slicefm.edge.kfp_io import encoder_metadata, input_location, output_location, require_gpus
    from slicefm.edge.stages import supervised_ceiling_stage

    require_gpus(gpus)
    cfg = config_from_yaml(config_yaml)
    out = output_location(encoder.path, store_uri, run_name, "supervised-ceiling")
    res = supervised_ceiling_stage(
        cfg, input_location(slices.path, slices.metadata), out, tracking_uri, parent_run_id
    )
    encoder.metadata.update(
        encoder_metadata(out, "supervised_ceiling", cfg.pretrain.encoder.name, res.steps, accelerator, gpus)
    )
    return float(res.loss_last)
