"""Extract components: one shard of frozen-encoder embeddings, and the merge of the shards."""

from typing import List  # noqa: UP035  (KFP's type parser wants typing.List)

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.settings import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def shard_indices(n_shards: int) -> List[int]:  # noqa: UP006
    """The shard numbers 0..n_shards-1 the extraction fans out over (a ParallelFor needs a list).

    Args:
        n_shards: how many extraction tasks to run per encoder and cohort.
    Returns:
        [0, 1, ..., n_shards - 1].
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    return list(range(n_shards))


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def extract(
    config_yaml: str,
    tracking_uri: str,
    parent_run_id: str,
    store_uri: str,
    run_name: str,
    cohort: str,
    shard_index: int,
    n_shards: int,
    random_baseline: bool,
    slices: Input[Dataset],
    encoder: Input[Model],
    embeddings: Output[Dataset],
    accelerator: str = "",
    gpus: int = 0,
    set_name: str = "",
) -> int:
    """Embed every slice of one shard of scans with the frozen encoder (bf16 on GPU); skips finished scans.

    Args:
        config_yaml: pipeline config (extract section is used).
        tracking_uri: MLflow tracking URI; parent_run_id: the pipeline's parent run.
        store_uri: artifact store (s3://...) or "" to write into the KFP artifact; run_name: store prefix.
        cohort: "a" (development cohort) or "b" (external cohort); names the store folder.
        shard_index: this task's shard; n_shards: how many shards the scans are split into.
        random_baseline: embed with the same architecture, randomly initialised (the comparison baseline).
        slices: the preprocess output; encoder: the pretrain output.
        embeddings: output: embeddings/<window>/<scan>.npy (float16), embeddings.parquet, extract.json.
        accelerator, gpus: the GPU request of this task (recorded in the output's metadata; also what carries
            the pipeline's GPU parameters into the ParallelFor, where the task's resources refer to them).
            With gpus > 0 the task fails at once when torch sees fewer GPUs.
        set_name: the store folder's set name ("" = "random" or "pretrained"; "supervised" for the ceiling).
    Returns:
        Number of slices embedded by this task.
    """
    from slicefm.config import config_from_yaml
    from slicefm.edge.kfp_io import URI_KEY, input_location, output_location, require_gpus
    from slicefm.edge.stages import extract_stage

    require_gpus(gpus)
    cfg = config_from_yaml(config_yaml)
    which = set_name or ("random" if random_baseline else "pretrained")
    out = output_location(
        embeddings.path, store_uri, run_name, f"extract-{cohort}-{which}/shard-{shard_index}"
    )
    res = extract_stage(
        cfg, input_location(slices.path, slices.metadata), out, input_location(encoder.path, encoder.metadata),
        tracking_uri, parent_run_id, shard_index, n_shards, random_baseline, cohort,
    )  # fmt: skip
    embeddings.metadata.update(
        {
            URI_KEY: res.out_uri,
            "label": res.label,
            "n_slices": res.n_slices,
            "accelerator": accelerator,
            "gpus": gpus,
        }
    )
    return res.n_slices


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def merge_embeddings(
    store_uri: str,
    run_name: str,
    name: str,
    parts: Input[List[Dataset]],  # noqa: UP006
    embeddings: Output[Dataset],
) -> str:
    """Join the shards' indexes into one embedding set (the matrices stay where the shards wrote them).

    Args:
        store_uri: artifact store (s3://...) or "" to write into the KFP artifact; run_name: store prefix.
        name: folder name of the merged index in the store (e.g. extract-a-pretrained).
        parts: the extract tasks' outputs (collected from the ParallelFor).
        embeddings: output: embeddings.parquet (with each matrix's root), extract.json, the tables.
    Returns:
        The merged set's encoder label.
    """
    from slicefm.edge.kfp_io import URI_KEY, input_location, output_location
    from slicefm.embed.extract import merge_extracts
    from slicefm.embed.reader import EmbeddingSet

    out = output_location(embeddings.path, store_uri, run_name, name)
    uri = merge_extracts([input_location(p.path, p.metadata) for p in parts], out)
    label = EmbeddingSet(uri).label
    embeddings.metadata.update({URI_KEY: uri, "label": label})
    return label
