"""Intensity transforms: HU display windows (CLEAR) and foreground z-scoring (DALE-CT).

The window and z-score types (and the named windows) live in `slicefm.preprocess.config`.

Both take canonical HU volumes ``[z, y, x]`` (any in-plane size, e.g. after resizing) or ``[z, 1, y, x]``,
as numpy arrays or CPU torch tensors, and return numpy arrays with a channel axis ``[z, C, y, x]``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from slicefm.preprocess.config import HUWindow, ZScoreNorm
from slicefm.preprocess.crop import is_tensor
from slicefm.preprocess.resize import kernel_sources, resize_hu_slices, resize_kernel

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Slices processed per step. The arithmetic is memory-bound: an 8-slice float32 scratch buffer (8 MiB at
# 512 px) stays mostly in cache, which measured ~2x faster than whole-volume temporaries.
_CHUNK_SLICES = 8


def _as_slices(hu: np.ndarray | torch.Tensor) -> np.ndarray:
    """[z, y, x] or [z, 1, y, x] (numpy or CPU torch) -> numpy [z, y, x] without copying when possible."""
    arr = hu.detach().cpu().numpy() if is_tensor(hu) else np.asarray(hu)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"expected HU [z, y, x] or [z, 1, y, x], got shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"expected a real numeric HU array, got {arr.dtype}")
    return arr


def window_affine(win: HUWindow) -> tuple[np.float32, np.float32]:
    """float32 (scale, offset) of a window: channel = trunc(clip(hu * scale + offset, 0.5, 255.5)).

    "+0.5 then truncate" is folded into the offset and the clip is in the output domain: round-half-up in three
    float32 steps, no float64. Clipping to [0.5, 255.5] equals clipping HU to [lo, hi] first.
    """
    scale = np.float32(255.0 / (win.hi - win.lo))
    return scale, np.float32(0.5 - win.lo * scale)


def resize_windows_uint8(
    hu: np.ndarray, size: int | None, windows: Sequence[HUWindow], out: np.ndarray | None = None
) -> np.ndarray:
    """`resize_hu_slices` then `apply_windows_uint8`, in one pass through the C kernel when it is built.

    ``[z, H, W]`` int16 or float32 HU (any strides: a crop view is read in place) -> uint8 ``[z, C, size, size]``
    (into `out` when given), byte for byte what the two steps give; without the kernel it is those two steps.
    """
    kernel = resize_kernel()
    if kernel is None or not 0 < len(windows) <= kernel.MAX_CHANNELS:
        return apply_windows_uint8(resize_hu_slices(hu, size), windows, out=out)
    src = kernel_sources(np.asarray(hu))
    side = size or src.shape[-1]
    out = _output(out, (src.shape[0], len(windows), size or src.shape[-2], side), np.uint8)
    if not out.flags.c_contiguous:
        out[...] = resize_windows_uint8(src, size, windows)
        return out
    affine = [window_affine(w) for w in windows]
    kernel.resize_windows(src, out, [float(s) for s, _ in affine], [float(o) for _, o in affine])
    return out


def apply_windows_uint8(
    hu: np.ndarray | torch.Tensor, windows: Sequence[HUWindow], out: np.ndarray | None = None
) -> np.ndarray:
    """Window HU into uint8 channels: ``[z, y, x]`` or ``[z, 1, y, x]`` -> ``[z, C, y, x]``, C = len(windows).

    Channel c is ``round(255 * (clip(hu, lo, hi) - lo) / (hi - lo))`` for ``windows[c]``, rounding halves up.
    `out`: an optional uint8 ``[z, C, y, x]`` array to write into (e.g. rows of a whole scan's stack).
    """
    if len(windows) == 0:
        raise ValueError("need at least one window")
    vol = _as_slices(hu)
    z = vol.shape[0]
    out = _output(out, (z, len(windows), *vol.shape[1:]), np.uint8)
    scratch = np.empty((min(z, _CHUNK_SLICES), *vol.shape[1:]), dtype=np.float32)
    for c, win in enumerate(windows):
        scale, offset = window_affine(win)
        for i in range(0, z, _CHUNK_SLICES):
            src = vol[i : i + _CHUNK_SLICES]
            tmp = scratch[: src.shape[0]]
            np.multiply(src, scale, out=tmp, casting="unsafe")
            tmp += offset
            np.clip(tmp, 0.5, 255.5, out=tmp)
            out[i : i + src.shape[0], c] = tmp  # float -> uint8 truncates, completing the rounding
    return out


def apply_zscore(
    hu: np.ndarray | torch.Tensor, norm: ZScoreNorm = ZScoreNorm(), out: np.ndarray | None = None
) -> np.ndarray:
    """Clip and z-score HU: ``[z, y, x]`` (or ``[z, 1, y, x]``) -> float16 ``[z, 1, y, x]`` (into `out` if given)."""
    vol = _as_slices(hu)
    z = vol.shape[0]
    out = _output(out, (z, 1, *vol.shape[1:]), np.float16)
    scratch = np.empty((min(z, _CHUNK_SLICES), *vol.shape[1:]), dtype=np.float32)
    lo, hi = np.float32(norm.clip_lo), np.float32(norm.clip_hi)
    mean, inv_std = np.float32(norm.mean), np.float32(1.0 / norm.std)
    for i in range(0, z, _CHUNK_SLICES):
        src = vol[i : i + _CHUNK_SLICES]
        tmp = scratch[: src.shape[0]]
        np.clip(src, lo, hi, out=tmp, casting="unsafe")
        tmp -= mean
        tmp *= inv_std
        _to_float16(tmp, out[i : i + src.shape[0], 0])
    return out


def _output(out: np.ndarray | None, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=dtype)
    if out.shape != shape or out.dtype != dtype:
        raise ValueError(f"out must be {np.dtype(dtype)} {shape}, got {out.dtype} {out.shape}")
    return out


def _to_float16(src: np.ndarray, dst: np.ndarray) -> None:
    """float32 -> float16 (round to nearest even, as both libraries do). torch's cast is vectorised (F16C),
    numpy's measured ~3x slower: torch when the process has it loaded, numpy rather than importing it."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.from_numpy(dst).copy_(torch.from_numpy(src))
    else:
        with np.errstate(over="ignore"):  # beyond float16's range -> inf, silently, as torch does
            dst[...] = src


def fit_zscore_norm(
    volumes: Iterable[np.ndarray],
    body_masks: Iterable[np.ndarray] | None = None,
    lo_pct: float = 0.5,
    hi_pct: float = 99.5,
    max_voxels_per_volume: int | None = 100_000,
    rng: np.random.Generator | None = None,
) -> ZScoreNorm:
    """Fit a `ZScoreNorm` on the foreground voxels of a cohort (the DALE-CT / nnU-Net "CT" recipe).

    clip range = the `lo_pct` / `hi_pct` percentiles of the pooled foreground HU; mean and std are those of
    the same (unclipped) foreground voxels, as nnU-Net's CT normalisation computes them.

    volumes: HU arrays ``[z, y, x]``; body_masks: matching boolean foreground masks, or None to compute them
    with `slicefm.preprocess.crop.body_mask`. Each volume contributes at most `max_voxels_per_volume` voxels
    (drawn with replacement from `rng`, default ``default_rng(0)``) so memory stays bounded for 1,000 scans
    and large scans do not dominate; None keeps every foreground voxel.
    """
    from slicefm.preprocess.crop import body_mask  # local: crop is only needed when masks are not given

    if not 0.0 <= lo_pct < hi_pct <= 100.0:
        raise ValueError(f"need 0 <= lo_pct < hi_pct <= 100, got {lo_pct}, {hi_pct}")
    rng = np.random.default_rng(0) if rng is None else rng
    vols = list(volumes)
    masks = [body_mask(v) for v in vols] if body_masks is None else list(body_masks)
    if len(masks) != len(vols):
        raise ValueError(f"{len(vols)} volumes but {len(masks)} body masks")
    samples: list[np.ndarray] = []
    for i, (vol, mask) in enumerate(zip(vols, masks, strict=True)):
        if mask.shape != vol.shape:
            raise ValueError(f"volume {i}: mask shape {mask.shape} != volume shape {vol.shape}")
        fg = np.asarray(vol)[np.asarray(mask, dtype=bool)]
        if fg.size == 0:
            logger.warning("volume %d has no foreground voxels; skipped for the z-score fit", i)
            continue
        if max_voxels_per_volume is not None and fg.size > max_voxels_per_volume:
            fg = fg[rng.integers(0, fg.size, size=max_voxels_per_volume)]
        samples.append(fg.astype(np.float32, copy=False))
    if not samples:
        raise ValueError("no foreground voxels in any volume: cannot fit a z-score normalisation")
    pooled = np.concatenate(samples)
    clip_lo, clip_hi = np.percentile(pooled, [lo_pct, hi_pct])
    # float64 accumulation only on the (bounded) sample: float32 sums drift over millions of voxels.
    mean = float(pooled.mean(dtype=np.float64))
    std = float(pooled.std(dtype=np.float64))
    norm = ZScoreNorm(clip_lo=float(clip_lo), clip_hi=float(clip_hi), mean=mean, std=std)
    logger.info("fitted %s on %d foreground voxels from %d volumes", norm, pooled.size, len(samples))
    return norm
