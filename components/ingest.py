"""Ingest component: raw dataset -> canonical volumes + validated manifests."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.settings import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def ingest(
    config_yaml: str,
    data_source: str,
    tracking_uri: str,
    parent_run_id: str,
    store_uri: str,
    run_name: str,
    data_version: str,
    scans: Output[Dataset],
    cohort: str = "a",
) -> int:
    """Read a DICOM/NIfTI/cohort dataset, quarantine bad scans, pseudonymise IDs, write volumes + manifests.

    Args:
        config_yaml: pipeline config (data + ingest sections are used).
        data_source: dataset root as seen by the step (a path; DVC-pulled on a cluster).
        tracking_uri: MLflow tracking URI; parent_run_id: the pipeline's parent run.
        store_uri: artifact store (s3://...) or "" to write into the KFP artifact.
        run_name: pipeline run name (store prefix); data_version: DVC revision / md5 (lineage).
        cohort: "a" = the development cohort (config `data`), "b" = the external one (`external.data`),
            "p" = the pretraining cohort (`pretrain_data`).
        scans: output: scans.parquet, lesions.parquet, quarantine.csv, dataset.json, volumes/.
    Returns:
        Number of usable scans.
    """
    from slicefm.config import config_from_yaml
    from slicefm.data.pseudonym import load_key
    from slicefm.edge.kfp_io import URI_KEY, output_location
    from slicefm.edge.stages import ingest_stage

    cfg = config_from_yaml(config_yaml)
    stage = "ingest" if cohort == "a" else f"ingest-{cohort}"
    out = output_location(scans.path, store_uri, run_name, stage)
    key = load_key()  # $SLICEFM_PSEUDONYM_KEY from the slicefm-pseudonym Secret
    res = ingest_stage(
        cfg, data_source, out, key, tracking_uri, parent_run_id, data_version or None, cohort=cohort
    )
    scans.metadata.update({URI_KEY: res.out_uri, "n_scans": res.n_scans, "n_quarantined": res.n_quarantined})
    return res.n_scans
