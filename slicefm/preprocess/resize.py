"""In-plane resizing of slices: a batched torch call (numpy or tensors, any device), and a torch-free one
for numpy HU (the preprocessing workers, which then need not import torch).

The torch-free one runs in the optional C kernel `slicefm.preprocess._bilinear` (built by setup.py when a C
compiler is there) and falls back to Pillow otherwise, with the same output bytes: the kernel computes Pillow's
BILINEAR filter sum for sum, vectorised across outputs. ``SLICEFM_RESIZE_KERNEL=pillow`` forces the fallback
(benchmarks compare both paths side by side with it).
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from slicefm.preprocess.crop import is_tensor

try:
    from slicefm.preprocess import _bilinear
except ImportError:  # built without a C compiler: Pillow does the same arithmetic, ~2-3x slower per slice
    _bilinear = None

if TYPE_CHECKING:
    import torch


def resize_kernel() -> ModuleType | None:
    """The C kernel, or None where it was not built or ``SLICEFM_RESIZE_KERNEL=pillow`` turns it off."""
    return None if os.environ.get("SLICEFM_RESIZE_KERNEL", "").lower() == "pillow" else _bilinear


def kernel_sources(x: np.ndarray) -> np.ndarray:
    """`x` as the kernel reads it: int16 or float32 ``[z, H, W]`` in native byte order (views stay views)."""
    if x.ndim != 3:
        raise ValueError(f"expected [z, H, W], got shape {tuple(x.shape)}")
    if x.dtype == np.int16 or x.dtype == np.float32:
        return x if x.dtype.isnative else x.astype(x.dtype.newbyteorder("="))
    return x.astype(np.float32)


def resize_hu_slices(x: np.ndarray, size: int | None) -> np.ndarray:
    """``[z, H, W]`` HU (float32 or int16, any strides) -> float32 ``[z, size, size]``, Pillow's bilinear filter.

    The filter of `resize_slices` (bilinear, half-pixel centres, the kernel widened by the scale factor when an
    axis shrinks: torch's ``antialias=True`` was made to match Pillow), equal to it within float32 rounding
    (measured max relative difference ~1e-7 at 412 -> 256 px), without importing torch. Rows are resized
    first, then columns, each pass rounding to float32 (`_pillow_two_pass`: the reference the C kernel matches
    bit for bit). ``size=None`` or an input already at that size returns the input as float32.
    """
    if size is not None and size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if x.ndim != 3:
        raise ValueError(f"expected [z, H, W], got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if size is None or (h == size and w == size):
        return np.asarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], size, size), dtype=np.float32)
    kernel = resize_kernel()
    if kernel is not None:
        kernel.resize(kernel_sources(x), out)
        return out
    for i, plane in enumerate(x):
        out[i] = _pillow_two_pass(plane, size, size)
    return out


def _pillow_two_pass(plane: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """One slice with Pillow, rows first then columns: one pass per call, so the order is fixed (a single
    two-axis call lets Pillow pick the order, which changes the float32 rounding of non-square resizes)."""
    img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    if img.width != out_w:
        img = img.resize((out_w, img.height), Image.Resampling.BILINEAR)
    if img.height != out_h:
        img = img.resize((out_w, out_h), Image.Resampling.BILINEAR)
    return np.asarray(img)


def resize_slices(x: np.ndarray | torch.Tensor, size: int | None) -> np.ndarray | torch.Tensor:
    """Resize every slice to ``size x size``: ``[z, C, H, W]`` -> ``[z, C, size, size]``.

    ``[z, H, W]`` gives ``[z, size, size]`` (the rank is kept).

    Returns the same kind (numpy or torch) and dtype as `x`. ``size=None`` or an input already at that size
    returns `x` itself. Bilinear (half-pixel centres, ``align_corners=False``) with antialiasing when an axis
    shrinks, so downsampling averages rather than aliases. A non-square input is stretched: square it first
    (`crop.square_box`) to keep the aspect ratio.

    Order in the pipeline: resize HU (float32) first, then window. It is as fast as windowing first and
    resizing uint8 for one or two windows, faster for more (windowing runs on the smaller image), rounds once,
    and matches a coarser reconstruction (partial-volume averaging of HU). uint8 input is supported too.
    """
    if size is not None and size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if x.ndim not in (3, 4):
        raise ValueError(f"expected [z, H, W] or [z, C, H, W], got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if size is None or (h == size and w == size):
        return x
    import torch
    import torch.nn.functional as F

    is_numpy = not is_tensor(x)
    if is_numpy:
        # torch.from_numpy shares memory (crop views included) but refuses negative strides (flipped views),
        # and warns on read-only arrays (np.load memmaps), which interpolate only reads.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(np.ascontiguousarray(x) if any(s < 0 for s in x.strides) else x)
    else:
        t = x
    if not (t.dtype.is_floating_point or t.dtype == torch.uint8):
        raise TypeError(f"resize_slices supports float and uint8 inputs, got {t.dtype}")
    batch = t.unsqueeze(1) if t.ndim == 3 else t
    # torch's anti-aliased bilinear kernel exists for float32/float64 and uint8 (its fast Pillow-like path) only.
    native = batch.dtype in (torch.float32, torch.float64, torch.uint8)
    work = batch if native else batch.float()  # float16/bfloat16: compute in float32
    out = F.interpolate(
        work, size=(size, size), mode="bilinear", align_corners=False, antialias=size < h or size < w
    )
    out = out.to(t.dtype) if out.dtype != t.dtype else out
    out = out.squeeze(1) if t.ndim == 3 else out
    return out.numpy() if is_numpy else out
