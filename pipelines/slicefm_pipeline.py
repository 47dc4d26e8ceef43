"""The slicefm pipeline: ingest -> preprocess -> pretrain (-> extract -> evaluate -> external as they land).

Only wiring lives here; every step is a component from components/ calling the slicefm library.
"""

from kfp import dsl

from components.ingest import ingest
from components.preprocess import preprocess
from components.pretrain import pretrain
from components.tracking import finish_tracking, start_tracking

PIPELINE_NAME = "slicefm"


@dsl.pipeline(
    name=PIPELINE_NAME, description="CT scans -> slice embeddings -> patient-level predictions (slicefm)"
)
def slicefm_pipeline(
    config_yaml: str,
    data_source: str,
    tracking_uri: str,
    store_uri: str = "",
    run_name: str = "slicefm-run",
    experiment: str = "slicefm",
    data_version: str = "",
) -> None:
    """Run every slicefm stage.

    Args:
        config_yaml: the whole pipeline config as YAML text (see pipelines/configs/*.yaml).
        data_source: dataset root visible to the steps (DVC-tracked path).
        tracking_uri: MLflow tracking URI.
        store_uri: s3://bucket/prefix for stage outputs, or "" to keep them as KFP artifacts.
        run_name: run name (MLflow parent run name and store prefix).
        experiment: MLflow experiment.
        data_version: DVC md5 / git revision of the dataset (lineage tag).
    """
    start = start_tracking(
        tracking_uri=tracking_uri,
        experiment=experiment,
        run_name=run_name,
        config_yaml=config_yaml,
        data_version=data_version,
    )
    finish = finish_tracking(tracking_uri=tracking_uri, experiment=experiment, run_name=run_name)
    with dsl.ExitHandler(finish):
        ing = ingest(
            config_yaml=config_yaml,
            data_source=data_source,
            tracking_uri=tracking_uri,
            parent_run_id=start.output,
            store_uri=store_uri,
            run_name=run_name,
            data_version=data_version,
        )
        ing.set_caching_options(True)
        pre = preprocess(
            config_yaml=config_yaml,
            tracking_uri=tracking_uri,
            parent_run_id=start.output,
            store_uri=store_uri,
            run_name=run_name,
            scans=ing.outputs["scans"],
        )
        pre.set_caching_options(True)
        train = pretrain(
            config_yaml=config_yaml,
            tracking_uri=tracking_uri,
            parent_run_id=start.output,
            store_uri=store_uri,
            run_name=run_name,
            slices=pre.outputs["slices"],
        )
        train.set_caching_options(False)  # training is not cached unless a user asks for it
