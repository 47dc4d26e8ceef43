"""Acquisition and reconstruction: scanner profiles, the scanned region and slice geometry, and what the
scanner does to the image (kernel blur, correlated noise, calibration offset, 12-bit clip, FOV padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from slicefm.phantom import portable_math

# Body-coordinate range (s) each region covers, and its cranio-caudal extent in anatomical mm.
REGIONS = {"chest_abdomen": (0.0, 1.0), "chest": (0.44, 1.0)}
_EXTENT_MM = {"chest_abdomen": (360.0, 480.0), "chest": (260.0, 340.0)}
N_SLICES_RANGE = (24, 96)  # keeps test and demo volumes small
OUTSIDE_FOV_HU = -2000  # what scanners write outside the reconstruction circle
HU_RANGE = (-1024, 3071)  # 12-bit CT range; stored = HU + 1024 fits in [0, 4095]
FOV_CIRCLE = 0.53  # reconstruction circle radius / FOV: only the corners fall outside


@dataclass(frozen=True)
class ScannerProfile:
    """Acquisition and reconstruction settings of one (simulated) scanner."""

    name: str
    noise_sd_hu: float  # Gaussian quantum noise after the reconstruction kernel
    hu_offset: float  # calibration offset added to every tissue voxel
    blur_sigma_px: float  # in-plane Gaussian standing in for the reconstruction kernel
    fov_mm: tuple[float, float]  # display field of view range (enlarged when a body would not fit)
    slice_thickness_mm: tuple[float, float]  # sampled, then adjusted to keep n_slices in range
    manufacturer: str = "PhantomCT"
    model: str = "Phantom 64"
    kernel: str = "B30f"


DEFAULT_PROFILE = ScannerProfile("default", 15.0, 0.0, 0.6, (340.0, 440.0), (2.5, 5.0))
# The "second scanner" of the external cohort: noisier, smoother kernel, +6 HU miscalibration,
# wider FOV (smaller body in the image) and thinner slices.
SHIFTED_PROFILE = ScannerProfile(
    "shifted", 24.0, 6.0, 1.2, (400.0, 500.0), (1.0, 3.0), "OtherCT Systems", "Phantom 128", "STANDARD"
)
PROFILES = {p.name: p for p in (DEFAULT_PROFILE, SHIFTED_PROFILE)}


def scanner_effects(
    rng: np.random.Generator, hu: np.ndarray, profile: ScannerProfile, fov_circle: np.ndarray
) -> np.ndarray:
    """Kernel blur with kernel-correlated noise, calibration offset, 12-bit clip, FOV padding."""
    hu = scanner_signal(rng, hu, profile)
    out = np.clip(np.rint(hu), *HU_RANGE).astype(np.int16)
    out[:, ~fov_circle] = OUTSIDE_FOV_HU
    return out


def scanner_signal(rng: np.random.Generator, hu: np.ndarray, profile: ScannerProfile) -> np.ndarray:
    """The float32 image a scanner reconstructs from `hu` (which it may overwrite): noise, in-plane blur,
    calibration offset; still unrounded, so its bits show any platform dependence of the arithmetic."""
    sigma = profile.blur_sigma_px
    noise_sd = profile.noise_sd_hu
    # scipy's gaussian_filter builds its weights with numpy's exp, whose last bits depend on the CPU:
    # the same separable blur with portable weights (see portable_math).
    kernel = portable_math.gaussian_kernel(sigma) if sigma > 0 else None
    if kernel is not None:
        # Noise is added before the kernel so it comes out correlated like real CT noise; scale it up by
        # 1 / ||kernel||_2 so its sd after the blur is still noise_sd_hu (||k x k||_2 = sum(k**2)).
        noise_sd /= float((kernel * kernel).sum())
    hu += noise_sd * rng.standard_normal(hu.shape, dtype=np.float32)
    if kernel is not None:
        for axis in (1, 2):  # in-plane only, like the reconstruction kernel
            hu = ndimage.correlate1d(hu, kernel, axis=axis, mode="nearest")
    hu += profile.hu_offset
    return hu


def slice_geometry(
    rng: np.random.Generator,
    region: str,
    profile: ScannerProfile,
    n_slices: int | None,
    spacing_mm: tuple[float, float, float] | None,
    shape_xy: int,
    fov_needed: float,
) -> tuple[int, float, float, float]:
    """(n_slices, z spacing, pixel spacing, anatomy scale), spacings in physical mm."""
    extent = float(rng.uniform(*_EXTENT_MM[region]))
    if spacing_mm is not None:
        dz, pixel = float(spacing_mm[0]), float(spacing_mm[2])
        # A forced fine spacing shows too little body at this matrix size: shrink the patient instead.
        scale = min(1.0, pixel * shape_xy / fov_needed)
    else:
        fov = max(float(rng.uniform(*profile.fov_mm)), fov_needed)
        pixel, scale = round(fov / shape_xy, 4), 1.0
        dz = float(rng.uniform(*profile.slice_thickness_mm))
    if n_slices is None:
        n_slices = int(np.clip(round(extent * scale / dz), *N_SLICES_RANGE))
        if spacing_mm is None:
            dz = extent / n_slices  # keep the anatomy's coverage; thickness adapts
    elif spacing_mm is None:
        dz = extent / n_slices
    return int(n_slices), round(dz, 4), pixel, scale
