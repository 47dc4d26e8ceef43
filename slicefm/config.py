"""The pipeline's one YAML: `PipelineConfig` gathers every package's config section (each package owns its own,
e.g. `slicefm.preprocess.config`), and the YAML loaders.

Defaults reproduce the papers (see ../shared/SCIENCE.md); presets live in pipelines/configs/.
`slicefm config default` writes a commented default file.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, Field, model_validator

from slicefm.core.config import Strict
from slicefm.data.config import DataConfig, IngestConfig
from slicefm.embed.config import ExtractConfig
from slicefm.evaluate.config import EvaluateConfig, ExternalConfig
from slicefm.preprocess.config import PreprocessConfig
from slicefm.train.config import PretrainConfig, SupervisedCeilingConfig


def _external_data() -> DataConfig:
    return DataConfig(source="data/external", phantom_profile="shifted", phantom_seed=1, phantom_scans=40)


class ExternalSection(ExternalConfig):
    """The external cohort (B) and how cohort A's heads are carried over to it."""

    data: DataConfig = Field(default_factory=_external_data)


# Sections with a seed of their own; the run's `seed` fills any of them that does not set one explicitly.
SEEDED_SECTIONS = ("pretrain", "supervised_ceiling", "evaluate")


class PipelineConfig(Strict):
    """The whole run: one YAML, one section per stage.

    `seed` drives the whole run: pretraining, the supervised ceiling, the evaluation's folds and heads, and the
    random-weight baseline; a section's own `seed` overrides it for that section only. (Phantom data seeds are
    the datasets' identity, not the run's: they stay per cohort.)
    """

    name: str = "slicefm"
    experiment: str = "slicefm"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    # The cohort the encoder is pretrained on (a foundation model's corpus), ingested and preprocessed like
    # `data`; None = pretrain on the evaluation cohort itself. Use a disjoint cohort whenever pretraining
    # reads labels the evaluation predicts (pretrain.aux.lesion_classes "typed"), so no test fold's labels
    # reach the encoder.
    pretrain_data: DataConfig | None = None
    # The same architecture trained on the pretraining cohort's labels: a ceiling every task's summary shows
    # beside pretrained and random (off by default: it trains a second encoder).
    supervised_ceiling: SupervisedCeilingConfig = Field(default_factory=SupervisedCeilingConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    external: ExternalSection = Field(default_factory=ExternalSection)

    @model_validator(mode="before")
    @classmethod
    def _one_seed(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        seed = data.get("seed", 0)
        data = dict(data)
        for name in SEEDED_SECTIONS:
            section = data.get(name)
            if section is None:
                data[name] = {"seed": seed}
            elif isinstance(section, dict) and "seed" not in section:
                data[name] = {**section, "seed": seed}
        return data

    def data_sources(self) -> list[DataConfig]:
        """Every cohort the run reads: evaluation, pretraining (when its own), external (when enabled)."""
        cohorts = [self.data] + ([self.pretrain_data] if self.pretrain_data is not None else [])
        return cohorts + ([self.external.data] if self.external.enabled else [])


def config_from_yaml(text: str) -> PipelineConfig:
    """A pipeline config from YAML text (what pipeline steps receive as a parameter)."""
    return PipelineConfig.model_validate(yaml.safe_load(text) or {})


def load_config(path: str | Path, model: type[Strict] = PipelineConfig) -> Strict:
    """Load and validate a YAML config (unknown keys are errors naming the key)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    return model.model_validate(data)


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
