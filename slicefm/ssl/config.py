"""The self-supervised methods' hyperparameters (MoCo-v3, CLEAR's LECL, LeJEPA with DALE-CT's auxiliary
supervision) and their views' augmentation: what `slicefm.ssl` builds losses and views from.
`slicefm.train.config.PretrainConfig` holds one of each."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from slicefm.core.config import Strict


class MoCoConfig(Strict):
    temperature: float = Field(0.2, gt=0)
    momentum: float = Field(0.99, ge=0, le=1)  # m0 of the cosine schedule towards 1
    proj_dim: int = Field(256, ge=1)
    mlp_dim: int = Field(4096, ge=1)
    proj_layers: int = Field(3, ge=1)
    pred_layers: int = Field(2, ge=1)
    scale_by_2t: bool = True
    freeze_patch_embed: bool = False  # moco-v3's stop-grad patch projection (patchify ViTs only)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area fraction (BYOL / moco-v3)


class LECLConfig(Strict):
    """CLEAR's lesion-enhanced contrastive learning on top of MoCo-v3 (method "lecl")."""

    lesion_lambda: float = Field(0.0, ge=0)  # paper grid {0, 1, 3, 5}; 0 was best
    lesion_term: Literal["paper", "code"] = "paper"
    # Side of the lesion-centred crop = max(context * longest box side, min_crop_frac * slice side).
    context: float = Field(2.0, ge=1.0)
    min_crop_frac: float = Field(0.25, gt=0, le=1)
    bank_refresh_per_step: int = Field(8, ge=0)  # key slices re-encoded by the momentum encoder per step
    bank_init_full: bool = True  # encode every key slice once before training


class LeJEPAConfig(Strict):
    lam: float = Field(0.02, ge=0, le=1)  # DALE-CT code / LeJEPA minimal recipe
    # SIGReg's statistic grows ~linearly with the global batch N, so lam alone means a different strength at
    # every batch size. reference_batch R states lam at global batch R (loss uses SIGReg * R / N); None = the
    # papers' formula as is (their lam assumes their batch: DALE-CT 512, LeJEPA's recipes ~hundreds).
    reference_batch: int | None = Field(None, ge=1)
    n_global: int = Field(2, ge=1)
    n_local: int = Field(8, ge=0)
    global_size: int | None = Field(None, ge=8)  # None = encoder.img_size
    local_size: int = Field(144, ge=8)
    global_scale: tuple[float, float] = (0.3, 1.0)  # crop side^2 / slice area
    local_scale: tuple[float, float] = (0.05, 0.3)
    depth_aware: bool = True  # False = pure 2D ablation (all crops from one slice)
    abnormal_prob: float = Field(0.8, ge=0, le=1)
    # "volume" (DALE-CT paper): with abnormal_prob a draw is swapped for a slab centred on an abnormal slice
    # of the same volume and all its crops are centred on the abnormality (a slice without one falls back to
    # anatomy); "slice": each crop is centred on an abnormality with abnormal_prob only when its own slice
    # happens to show one (most slabs show none, so few crops are label-guided).
    guidance: Literal["volume", "slice"] = "volume"
    proj_dim: int = Field(128, ge=1)
    proj_hidden: int = Field(2048, ge=1)
    proj_layers: int = Field(3, ge=1)
    num_directions: int = Field(256, ge=1)
    num_knots: int = Field(17, ge=2)


class AuxConfig(Strict):
    """DALE-CT auxiliary supervision (LeJEPA only): None, 1S (organs, CLS) or 2S (+ abnormalities, patches)."""

    mode: Literal["1S", "2S"] | None = None
    alpha: float = Field(0.1, ge=0)
    organ_pos_weight_cap: float = Field(1000.0, gt=0)
    abn_pos_weight: float = Field(800.0, gt=0)
    cls_patch_weights: tuple[float, float] = (0.5, 0.5)
    freq_sample_scans: int = Field(64, ge=1)  # scans read to estimate organ frequencies
    # Abnormality classes for lesions: "any" = one 'lesion' class; "typed" = one class per DeepLesion coarse
    # type (lesion_bone .. lesion_pelvis), like DALE-CT's typed ReXGroundingCT classes. Typed labels come from
    # lesions.parquet (mask value = lesion_index + 1). Pretrain on a cohort disjoint from the one you evaluate
    # lesion types on (pipeline `pretrain_data`), or the encoder has seen the test folds' labels.
    lesion_classes: Literal["any", "typed"] = "any"


class AugmentConfig(Strict):
    """BYOL / moco-v3 style photometric and geometric augmentation adapted to CT windows."""

    hflip_prob: float = Field(0.5, ge=0, le=1)
    vflip_prob: float = Field(0.0, ge=0, le=1)  # anterior/posterior flips are anatomically implausible
    brightness: float = Field(0.1, ge=0)  # additive shift, fraction of the intensity range
    contrast: float = Field(0.1, ge=0)  # multiplicative, around the per-image mean
    blur_prob: float = Field(0.5, ge=0, le=1)
    blur_sigma: tuple[float, float] = (0.1, 1.5)  # pixels, in the output frame
