"""The pipeline config's cohorts: evaluation (a), external (b) and the pretraining cohort (p)."""

from __future__ import annotations

import pytest

from slicefm.config import PipelineConfig
from slicefm.stages import cohort_data


def test_pretraining_cohort_is_its_own_data_section() -> None:
    cfg = PipelineConfig.model_validate(
        {
            "data": {"source": "data/demo"},
            "pretrain_data": {"source": "data/pretrain", "phantom_seed": 2},
            "external": {"enabled": True},
        }
    )
    assert cohort_data(cfg, "a").source == "data/demo"
    assert cohort_data(cfg, "p").source == "data/pretrain" and cohort_data(cfg, "p").phantom_seed == 2
    assert cohort_data(cfg, "b").source == "data/external"
    assert [d.source for d in cfg.data_sources()] == ["data/demo", "data/pretrain", "data/external"]


def test_without_a_pretraining_cohort_the_encoder_trains_on_cohort_a() -> None:
    cfg = PipelineConfig.model_validate({"external": {"enabled": False}})
    assert cfg.pretrain_data is None and [d.source for d in cfg.data_sources()] == ["data/demo"]
    with pytest.raises(ValueError, match="pretrain_data"):
        cohort_data(cfg, "p")
    with pytest.raises(ValueError, match="unknown cohort 'c'"):
        cohort_data(cfg, "c")
