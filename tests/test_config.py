"""The pipeline config's cohorts: evaluation (a), external (b) and the pretraining cohort (p)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slicefm.config import PipelineConfig, config_from_yaml, dump_config
from slicefm.edge.stages import cohort_data


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


def test_one_seed_drives_every_seeded_section() -> None:
    """The run's seed reaches pretraining, the supervised ceiling and the evaluation unless a section sets its
    own; the dumped config (what every pipeline step receives) keeps them."""
    cfg = PipelineConfig.model_validate({"seed": 7, "evaluate": {"splits": {"n_folds": 3}}})
    assert cfg.pretrain.seed == cfg.supervised_ceiling.seed == cfg.evaluate.seed == 7
    assert cfg.evaluate.splits.n_folds == 3  # the section's other settings are kept
    explicit = PipelineConfig.model_validate({"seed": 7, "pretrain": {"seed": 2}})
    assert (explicit.pretrain.seed, explicit.evaluate.seed) == (2, 7)
    assert PipelineConfig().pretrain.seed == PipelineConfig().evaluate.seed == 0
    again = config_from_yaml(dump_config(cfg))
    assert (again.seed, again.pretrain.seed, again.evaluate.seed) == (7, 7, 7)
    # The demo preset leaves the sections' seeds to the run's: `seed: 4` at the top reseeds all of it.
    demo = yaml.safe_load((Path(__file__).resolve().parents[1] / "pipelines/configs/demo-cpu.yaml").read_text())
    reseeded = PipelineConfig.model_validate({**demo, "seed": 4})
    assert reseeded.pretrain.seed == reseeded.supervised_ceiling.seed == reseeded.evaluate.seed == 4
