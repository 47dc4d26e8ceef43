"""Typed configuration of the preprocess stage, and the intensity types it shares with the transforms.

`HUWindow` and `ZScoreNorm` are what a config names and what `slicefm.preprocess.windows` computes with:
each is validated here, once, whether it comes from YAML or from code.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from slicefm.core.config import Strict


class HUWindow(Strict):
    """A display window: HU in [lo, hi] maps linearly onto 0..255, values outside are clipped."""

    model_config = ConfigDict(frozen=True)

    name: str
    lo: float
    hi: float

    @model_validator(mode="after")
    def _ordered(self) -> HUWindow:
        if not self.hi > self.lo:
            raise ValueError(f"window {self.name!r}: hi ({self.hi}) must exceed lo ({self.lo})")
        return self


# CLEAR windows (SCIENCE.md): abdomen/soft tissue -175..275 HU, lung -1500..500 HU.
ABDOMEN = HUWindow(name="abdomen", lo=-175.0, hi=275.0)
LUNG = HUWindow(name="lung", lo=-1500.0, hi=500.0)
BONE = HUWindow(name="bone", lo=-500.0, hi=1300.0)
BRAIN = HUWindow(name="brain", lo=0.0, hi=80.0)
WINDOWS: dict[str, HUWindow] = {
    "abdomen": ABDOMEN,
    "soft_tissue": ABDOMEN,
    "lung": LUNG,
    "bone": BONE,
    "brain": BRAIN,
}


class ZScoreNorm(Strict):
    """DALE-CT normalisation: clip HU to [clip_lo, clip_hi], then ``(hu - mean) / std``.

    Defaults are the DALE-CT code's constants. The paper derives them, nnU-Net style, from the foreground
    voxels of a 1,000-scan sample: clip range = their 0.5 / 99.5 percentiles, mean/std = their mean and
    standard deviation. `slicefm.preprocess.windows.fit_zscore_norm` refits them on another cohort.
    """

    model_config = ConfigDict(frozen=True)

    clip_lo: float = -997.0
    clip_hi: float = 888.0
    mean: float = -142.39
    std: float = Field(360.97, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> ZScoreNorm:
        if not self.clip_hi > self.clip_lo:
            raise ValueError(f"clip_hi ({self.clip_hi}) must exceed clip_lo ({self.clip_lo})")
        return self


class PreprocessConfig(Strict):
    """HU windows or z-score, body crop, resize, optional 5-cut tiling, 12 mm slabs."""

    normalisation: Literal["windows", "zscore"] = "windows"
    # Names from WINDOWS or explicit {name, lo, hi}; CLEAR: abdomen + lung.
    windows: list[str | HUWindow] = Field(default_factory=lambda: ["abdomen", "lung"])
    zscore: ZScoreNorm = Field(default_factory=ZScoreNorm)
    body_crop: bool = True
    crop_margin_px: int = Field(4, ge=0)
    size: int | None = Field(256, ge=16)  # output side in px; None = native (no resize)
    five_cut: bool = False
    slab_mm: float = Field(12.0, gt=0)
    n_shards: int = Field(4, ge=1)
    workers: int = Field(2, ge=1)


def resolve_windows(cfg: PreprocessConfig) -> list[HUWindow]:
    """The configured windows: names looked up in WINDOWS, explicit windows as they are."""
    out = []
    for w in cfg.windows:
        if isinstance(w, HUWindow):
            out.append(w)
        elif w in WINDOWS:
            out.append(WINDOWS[w])
        else:
            raise ValueError(f"unknown window {w!r}; known: {sorted(WINDOWS)} (or give name/lo/hi)")
    return out


def channel_names(cfg: PreprocessConfig) -> list[str]:
    """The stack's channels, in order: one per window, or the single z-score channel."""
    return ["zscore"] if cfg.normalisation == "zscore" else [w.name for w in resolve_windows(cfg)]
