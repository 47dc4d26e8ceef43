"""The KFP components' bodies (`<component>.python_func`) run in-process on tiny real inputs.

One MLflow sqlite store serves the whole session (creating its schema takes seconds); every test gets a
parent run of its own in it, so the stage runs a component records are the test's alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp import dsl

from slicefm.config import PipelineConfig, dump_config
from slicefm.edge.tracking.mlflow_runs import start_pipeline_run
from slicefm.edge.tracking.pipeline_runs import child_runs
from tests.pipeline.conftest import tiny_pipeline_config


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    start_pipeline_run(uri, "components", "schema", {})  # creates the schema once
    return uri


@pytest.fixture
def parent_run(tracking_uri: str, request: pytest.FixtureRequest) -> str:
    """A fresh pipeline parent run for this test."""
    return start_pipeline_run(tracking_uri, "components", request.node.name, {})


def stage_runs(tracking_uri: str, parent_run_id: str) -> dict[str, Any]:
    """The stage runs recorded under `parent_run_id`, by stage name."""
    runs = child_runs(tracking_uri, parent_run_id)
    by_stage = {r.data.tags["slicefm.stage"]: r for r in runs}
    assert len(by_stage) == len(runs), "one run per stage"
    return by_stage


def component_config(tmp_path: Path, name: str, **sections: dict) -> str:
    """The pipeline tests' CPU-sized config (tests/pipeline/conftest.py) named `name`, with `sections`
    merged into it (one level deep), as the YAML text a component receives."""
    data = yaml.safe_load(tiny_pipeline_config(tmp_path).read_text())
    data["name"] = name
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    return dump_config(PipelineConfig.model_validate(data))


def dataset(tmp_path: Path, name: str, uri: str | None = None) -> dsl.Dataset:
    """A KFP Dataset artifact: an empty output under tmp_path, or an input whose data lies at `uri`."""
    return dsl.Dataset(name=name, uri=str(tmp_path / name), metadata={"uri": uri} if uri else {})
