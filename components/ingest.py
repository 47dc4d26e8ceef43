"""Ingest component: raw dataset -> canonical volumes + validated manifests."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.settings import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def ingest(
    config_yaml: str,
    data_source: str,
    store_uri: str,
    data_version: str,
    scans: Output[Dataset],
    cohort: str = "a",
    dvc_file: str = "",
    dvc_remote: str = "",
    workspace: str = "",
) -> int:
    """Read a DICOM/NIfTI/cohort dataset, quarantine bad scans, pseudonymise IDs, write volumes + manifests.

    Cacheable: no per-run input (its MLflow stage run is logged by the record step that follows it).

    Args:
        config_yaml: the config's data sections (start-tracking's data_config_yaml: data + ingest are used).
        data_source: the dataset: a path the pod sees, an s3://bucket/prefix (downloaded into the workspace),
            or with dvc_file a path inside the DVC-tracked output (e.g. data/demo).
        store_uri: artifact store (s3://...: output under cache/<stage>/<content hash>) or "" for the artifact.
        data_version: the dataset's version as submitted (part of the cache key: give one for an s3:// prefix
            whose content changes); the lineage records the version of what the step read.
        cohort: "a" = the development cohort (config `data`), "b" = the external one (`external.data`),
            "p" = the pretraining cohort (`pretrain_data`).
        scans: output: scans.parquet, lesions.parquet, quarantine.csv, dataset.json, volumes/, stage_record.json.
        dvc_file: the text of data.dvc at the revision to use ("" = no DVC): the step `dvc pull`s it.
        dvc_remote: the DVC remote's URL (s3://bucket/dvcstore) for dvc_file.
        workspace: where fetched data goes ("" = a temporary directory of the pod; a path on a mounted PVC
            keeps it for later steps and runs).
    Returns:
        Number of usable scans.
    """
    import tempfile
    from pathlib import Path

    from slicefm.config import config_from_yaml
    from slicefm.data.pseudonym import load_key
    from slicefm.edge.data_fetch import fetch_source
    from slicefm.edge.kfp_io import URI_KEY, cached_output_location
    from slicefm.edge.stages import cohort_data, ingest_stage

    cfg = config_from_yaml(config_yaml)
    stage = "ingest" if cohort == "a" else f"ingest-{cohort}"
    identity = {"data": cohort_data(cfg, cohort).model_dump(mode="json"), "ingest": cfg.ingest.model_dump(mode="json"),
                "source": data_source, "data_version": data_version, "dvc_file": dvc_file, "dvc_remote": dvc_remote}  # fmt: skip
    out = cached_output_location(scans.path, store_uri, stage, identity)
    key = load_key()  # $SLICEFM_PSEUDONYM_KEY from the slicefm-pseudonym Secret
    with tempfile.TemporaryDirectory(prefix="slicefm-data-") as tmp:
        data = fetch_source(
            data_source, Path(workspace or tmp), version=data_version, dvc_file=dvc_file, dvc_remote=dvc_remote
        )
        res = ingest_stage(cfg, str(data.path), out, key, data_version=data.version or None, cohort=cohort)
    scans.metadata.update(
        {URI_KEY: res.out_uri, "n_scans": res.n_scans, "n_quarantined": res.n_quarantined, "data_version": data.version}
    )
    return res.n_scans
