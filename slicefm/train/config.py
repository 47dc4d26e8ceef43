"""PretrainConfig: every pretraining hyperparameter, defaults from the papers / official code.

Defaults reproduce CLEAR's MoCo-v3 recipe (official ViT settings: T 0.2, m 0.99 -> 1 cosine, AdamW,
lr 1e-4 x batch / 256, 10 warm-up epochs of 100). Presets in `pipelines/configs/` override the
method-specific parts (LECL lambda, LeJEPA crops, auxiliary supervision, ViT-L schedule). The methods'
own sections (MoCo, LECL, LeJEPA, auxiliary supervision, augmentation) live in `slicefm.ssl.config`.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field, model_validator

from slicefm.core.config import Strict
from slicefm.ssl.config import AugmentConfig, AuxConfig, LECLConfig, LeJEPAConfig, MoCoConfig

logger = logging.getLogger(__name__)


class EncoderConfig(Strict):
    """Backbone by timm / slicefm registry name; `overrides` go to timm.create_model (e.g. drop_path_rate)."""

    name: str = "vit_conv_base"
    img_size: int = Field(224, ge=16)
    overrides: dict[str, Any] = Field(default_factory=dict)


class OptimizerConfig(Strict):
    name: Literal["adamw", "lars"] = "adamw"
    # Base lr per 256 samples when lr_scaling == "batch/256" (moco-v3 / CLEAR code), else absolute.
    lr: float = Field(1e-4, gt=0)
    lr_scaling: Literal["batch/256", "none"] = "batch/256"
    min_lr: float = Field(0.0, ge=0)  # end of the cosine (absolute, not scaled)
    weight_decay: float = Field(0.1, ge=0)  # moco-v3 ViT recipe
    weight_decay_end: float | None = None  # None = constant weight decay
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0, lt=1)  # LARS
    trust_coefficient: float = Field(0.001, gt=0)  # LARS eta (moco-v3)
    grad_clip: float | None = Field(None, gt=0)  # max global grad norm; None = no clipping


class ScheduleConfig(Strict):
    """Length of training and the linear warm-up (epochs unless the *_steps fields are set)."""

    epochs: int = Field(100, ge=1)
    warmup_epochs: float = Field(10, ge=0)
    max_steps: int | None = Field(None, ge=1)  # total optimizer steps (overrides epochs; DALE-CT: 50k)
    warmup_steps: int | None = Field(None, ge=0)  # overrides warmup_epochs


class CheckpointConfig(Strict):
    every_steps: int = Field(1000, ge=1)
    keep_history: bool = False  # also keep step-numbered copies


class LoggingConfig(Strict):
    every_steps: int = Field(50, ge=1)
    collapse_every: int = Field(200, ge=1)
    # Whole slices the backbone's effective rank is measured on (RankMe needs many more rows than dims).
    collapse_batch: int = Field(256, ge=2)
    collapse_min_rank: float = Field(2.0, ge=0)  # effective rank of the backbone (exp of singular-value entropy)
    # LeJEPA: where SIGReg lies between Gaussian projections (0) and a collapse to a point (1), averaged over the
    # steps since the last check (`SIGReg.collapse_fraction`).
    collapse_max_sigreg: float = Field(0.5, gt=0)
    collapse_patience: int = Field(3, ge=1)
    collapse_action: Literal["error", "warn"] = "error"

    @model_validator(mode="before")
    @classmethod
    def _drop_std(cls, data: Any) -> Any:
        """`collapse_min_std` (older configs) is ignored: a layer-scale ViT's CLS std is ~0 at random init."""
        if isinstance(data, dict) and "collapse_min_std" in data:
            logger.warning("logging.collapse_min_std is no longer used (embedding std flags nothing); ignored")
            data = {k: v for k, v in data.items() if k != "collapse_min_std"}
        return data


class LoaderConfig(Strict):
    batch_size: int = Field(256, ge=2)  # per rank
    workers: int = Field(4, ge=0)
    pin_memory: bool = True
    prefetch_factor: int = Field(2, ge=1)
    exclude_splits: list[str] = Field(default_factory=lambda: ["test"])  # never pretrain on test scans


class PretrainConfig(Strict):
    method: Literal["moco", "lecl", "lejepa"] = "moco"
    seed: int = 0
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16 autocast on CUDA only; CPU always fp32
    # "stacked": every preprocessed channel (HU window) is one input channel of one image.
    # "per_window": CLEAR, each window is its own single-channel image (a scan is embedded once per window).
    input_channels: Literal["stacked", "per_window"] = "stacked"
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    moco: MoCoConfig = Field(default_factory=MoCoConfig)
    lecl: LECLConfig = Field(default_factory=LECLConfig)
    lejepa: LeJEPAConfig = Field(default_factory=LeJEPAConfig)
    aux: AuxConfig = Field(default_factory=AuxConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    git_commit: str | None = None  # stamped into encoder.json when the caller knows it

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        if self.aux.mode is not None and self.method != "lejepa":
            raise ValueError("auxiliary supervision (aux.mode) is a LeJEPA option; set method: lejepa")
        return self


def load_pretrain_config(data: dict[str, Any]) -> PretrainConfig:
    """Validate a mapping that is either a bare PretrainConfig or a full config with a `pretrain:` section."""
    if "pretrain" in data and isinstance(data["pretrain"], dict):
        data = data["pretrain"]
    return PretrainConfig.model_validate(data)


class SupervisedCeilingConfig(Strict):
    """The supervised ceiling (slicefm.train.supervised): pretrain.encoder's architecture trained on the
    pretraining cohort's labels, evaluated beside the pretrained and random-weight encoders."""

    enabled: bool = False
    targets: list[Literal["lesions", "findings"]] = Field(default_factory=lambda: ["lesions", "findings"], min_length=1)
    cells: bool = True  # also supervise every patch token with the classes its cell covers
    cell_pos_weight: float = Field(20.0, gt=0)
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    seed: int | None = None  # None = pretrain.seed
    max_scans: int | None = Field(None, ge=1)  # training scans held in memory (None = all)
    log_every_steps: int = Field(50, ge=1)
