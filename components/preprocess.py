"""Preprocess component: canonical volumes -> windowed, cropped, resized slice stacks + slices.parquet."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.settings import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def preprocess(
    config_yaml: str,
    tracking_uri: str,
    parent_run_id: str,
    store_uri: str,
    run_name: str,
    scans: Input[Dataset],
    slices: Output[Dataset],
    cohort: str = "a",
) -> int:
    """HU windows / z-score, body crop, resize, optional 5-cut tiles, 12 mm slabs; skips finished scans.

    Args:
        config_yaml: pipeline config (preprocess section is used).
        tracking_uri: MLflow tracking URI; parent_run_id: the pipeline's parent run.
        store_uri: artifact store (s3://...) or "" to write into the KFP artifact; run_name: store prefix.
        scans: the ingest output.
        cohort: "a" (development), "b" (external) or "p" (pretraining); names the store folder and the
            MLflow run.
        slices: output: shards/, slices.parquet, scans.parquet, lesions.parquet, preprocess.json.
    Returns:
        Number of slices written.
    """
    from slicefm.config import config_from_yaml
    from slicefm.edge.kfp_io import URI_KEY, input_location, output_location
    from slicefm.edge.stages import preprocess_stage

    cfg = config_from_yaml(config_yaml)
    stage = "preprocess" if cohort == "a" else f"preprocess-{cohort}"
    out = output_location(slices.path, store_uri, run_name, stage)
    res = preprocess_stage(
        cfg, input_location(scans.path, scans.metadata), out, tracking_uri, parent_run_id, stage=stage
    )
    slices.metadata.update(
        {URI_KEY: res.out_uri, "n_slices": res.n_slices, "channels": ",".join(res.channels)}
    )
    return res.n_slices
