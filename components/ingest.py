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
) -> int:
    """Read a DICOM/NIfTI/cohort dataset, quarantine bad scans, pseudonymise IDs, write volumes + manifests.

    Cacheable: no per-run input (its MLflow stage run is logged by the record step that follows it).

    Args:
        config_yaml: the config's data sections (start-tracking's data_config_yaml: data + ingest are used).
        data_source: dataset root as seen by the step (a path; DVC-pulled on a cluster).
        store_uri: artifact store (s3://...: output under cache/<stage>/<content hash>) or "" for the artifact.
        data_version: DVC revision / md5 of the dataset (lineage, and part of the cache key).
        cohort: "a" = the development cohort (config `data`), "b" = the external one (`external.data`),
            "p" = the pretraining cohort (`pretrain_data`).
        scans: output: scans.parquet, lesions.parquet, quarantine.csv, dataset.json, volumes/, stage_record.json.
    Returns:
        Number of usable scans.
    """
    from slicefm.config import config_from_yaml
    from slicefm.data.pseudonym import load_key
    from slicefm.edge.kfp_io import URI_KEY, cached_output_location
    from slicefm.edge.stages import cohort_data, ingest_stage

    cfg = config_from_yaml(config_yaml)
    stage = "ingest" if cohort == "a" else f"ingest-{cohort}"
    identity = {"data": cohort_data(cfg, cohort).model_dump(mode="json"), "ingest": cfg.ingest.model_dump(mode="json"),
                "source": data_source, "data_version": data_version}  # fmt: skip
    out = cached_output_location(scans.path, store_uri, stage, identity)
    key = load_key()  # $SLICEFM_PSEUDONYM_KEY from the slicefm-pseudonym Secret
    res = ingest_stage(cfg, data_source, out, key, data_version=data_version or None, cohort=cohort)
    scans.metadata.update({URI_KEY: res.out_uri, "n_scans": res.n_scans, "n_quarantined": res.n_quarantined})
    return res.n_scans
