"""Preprocess component: canonical volumes -> windowed, cropped, resized slice stacks + slices.parquet."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.settings import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def preprocess(
    config_yaml: str,
    store_uri: str,
    scans: Input[Dataset],
    slices: Output[Dataset],
    cohort: str = "a",
) -> int:
    """HU windows / z-score, body crop, resize, optional 5-cut tiles, 12 mm slabs; skips finished scans.

    Cacheable: no per-run input (its MLflow stage run is logged by the record step that follows it).

    Args:
        config_yaml: the config's data sections (start-tracking's data_config_yaml: preprocess is used).
        store_uri: artifact store (s3://...: output under cache/<stage>/<content hash>) or "" for the artifact.
        scans: the ingest output.
        cohort: "a" (development), "b" (external) or "p" (pretraining); names the store folder and the
            MLflow run.
        slices: output: shards/, slices.parquet, scans.parquet, lesions.parquet, preprocess.json.
    Returns:
        Number of slices written.
    """
    from slicefm.config import config_from_yaml
    from slicefm.edge.kfp_io import URI_KEY, cached_output_location, input_location
    from slicefm.edge.stages import preprocess_stage

    cfg = config_from_yaml(config_yaml)
    stage = "preprocess" if cohort == "a" else f"preprocess-{cohort}"
    scans_uri = input_location(scans.path, scans.metadata)
    identity = {"preprocess": cfg.preprocess.model_dump(mode="json", exclude={"workers"}), "scans": scans_uri}
    out = cached_output_location(slices.path, store_uri, stage, identity)
    res = preprocess_stage(cfg, scans_uri, out, stage=stage)
    slices.metadata.update(
        {URI_KEY: res.out_uri, "n_slices": res.n_slices, "channels": ",".join(res.channels)}
    )
    return res.n_slices
