"""The data step: a raw dataset -> pseudonymised manifests (ingest) and slice stacks (preprocess), in one pass."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.settings import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def ingest_preprocess(
    config_yaml: str,
    data_source: str,
    store_uri: str,
    data_version: str,
    scans: Output[Dataset],
    slices: Output[Dataset],
    cohort: str = "a",
    dvc_file: str = "",
    dvc_remote: str = "",
    workspace: str = "",
) -> int:
    """Ingest and preprocess one cohort, each scan decoded once and preprocessed from memory.

    Ingest: read a DICOM/NIfTI/cohort dataset, quarantine bad scans, pseudonymise IDs, write the manifests
    (and the canonical volumes with ingest.keep_volumes). Preprocess: HU windows / z-score, body crop,
    resize, optional 5-cut tiles, 12 mm slabs. The outputs are what `slicefm ingest` and `slicefm preprocess`
    write, one after the other (byte for byte, but the volumes). Cacheable: no per-run input (the record
    steps that follow log the two MLflow stage runs).

    Args:
        config_yaml: the config's data sections (start-tracking's data_config_yaml: data, ingest, preprocess).
        data_source: the dataset: a path the pod sees, an s3://bucket/prefix (downloaded into the workspace),
            or with dvc_file a path inside the DVC-tracked output (e.g. data/demo).
        store_uri: artifact store (s3://...: outputs under cache/<stage>/<content hash>) or "" for the artifacts.
        data_version: the dataset's version as submitted (part of the cache key: give one for an s3:// prefix
            whose content changes); the lineage records the version of what the step read.
        cohort: "a" = the development cohort (config `data`), "b" = the external one (`external.data`),
            "p" = the pretraining cohort (`pretrain_data`).
        scans: output: scans.parquet, lesions.parquet, quarantine.csv, dataset.json, stage_record.json
            (volumes/ with ingest.keep_volumes).
        slices: output: shards/, slices.parquet, scans.parquet, lesions.parquet, preprocess.json.
        dvc_file: the text of data.dvc at the revision to use ("" = no DVC): the step `dvc pull`s it.
        dvc_remote: the DVC remote's URL (s3://bucket/dvcstore) for dvc_file.
        workspace: where fetched data goes ("" = a temporary directory of the pod; a path on a mounted PVC
            keeps it for later steps and runs).
    Returns:
        Number of slices written.
    """
    import tempfile
    from pathlib import Path

    from slicefm.config import config_from_yaml
    from slicefm.data.pseudonym import load_key
    from slicefm.edge.data_fetch import fetch_source
    from slicefm.edge.kfp_io import URI_KEY, cached_output_location
    from slicefm.edge.stages import cohort_data, ingest_preprocess_stage

    cfg = config_from_yaml(config_yaml)
    suffix = "" if cohort == "a" else f"-{cohort}"
    identity = {"data": cohort_data(cfg, cohort).model_dump(mode="json"), "ingest": cfg.ingest.model_dump(mode="json"),
                "source": data_source, "data_version": data_version, "dvc_file": dvc_file, "dvc_remote": dvc_remote}  # fmt: skip
    scans_uri = cached_output_location(scans.path, store_uri, f"ingest{suffix}", identity)
    pre_identity = {"preprocess": cfg.preprocess.model_dump(mode="json", exclude={"workers"}), "scans": scans_uri}
    slices_uri = cached_output_location(slices.path, store_uri, f"preprocess{suffix}", pre_identity)
    key = load_key()  # $SLICEFM_PSEUDONYM_KEY from the slicefm-pseudonym Secret
    with tempfile.TemporaryDirectory(prefix="slicefm-data-") as tmp:
        data = fetch_source(
            data_source, Path(workspace or tmp), version=data_version, dvc_file=dvc_file, dvc_remote=dvc_remote
        )
        res = ingest_preprocess_stage(
            cfg, str(data.path), scans_uri, slices_uri, key, data_version=data.version or None, cohort=cohort
        )
    ing, pre = res.ingest, res.preprocess
    scans.metadata.update(
        {URI_KEY: ing.out_uri, "n_scans": ing.n_scans, "n_quarantined": ing.n_quarantined, "data_version": data.version}
    )
    slices.metadata.update({URI_KEY: pre.out_uri, "n_slices": pre.n_slices, "channels": ",".join(pre.channels)})
    return pre.n_slices
