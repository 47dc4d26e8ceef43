"""Body crop: a foreground (patient body) mask, its bounding box, squaring and cropping.

Boxes are ``(y0, y1, x0, x1)`` in pixel indices with exclusive ends, i.e. ``vol[..., y0:y1, x0:x1]``.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1), ends exclusive

AIR_HU = -1024.0  # what scanners store for air outside the reconstruction circle; used for padding

# 2-D connectivity inside each slice and none across slices: lets one scipy call handle every slice at once.
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndi.generate_binary_structure(2, 1)


def is_tensor(x: object) -> bool:
    """Whether `x` is a torch tensor, without importing torch (not imported: it cannot be one). Keeps the
    numpy-only preprocessing path (ingest + preprocess workers) free of torch's multi-second import."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _mask_stride(shape_yx: tuple[int, int]) -> int:
    # Work on a ~128 px grid: a 512 px slice is labelled at 4 px steps (~16x fewer voxels). The mask only
    # drives a bounding box with a margin, so a few px of boundary error do not matter.
    return max(1, min(shape_yx) // 128)


def _grid_counts(n: int, stride: int) -> np.ndarray:
    """Full-res pixels each sample ``stride//2 + k*stride`` stands for (the last takes the remainder)."""
    n_samples = len(range(stride // 2, n, stride))
    counts = np.full(n_samples, stride, dtype=np.intp)
    counts[-1] = n - (n_samples - 1) * stride
    return counts


def _erode_or_dilate_in_plane(mask: np.ndarray, radius: int, erode: bool) -> np.ndarray:
    """Binary erosion/dilation of every slice by a (2r+1)^2 square, as r 3-px passes along y and x.

    Shifted logical ops on the bool array: >10x faster than scipy's min/max filters here (same result as their
    "nearest" mode).
    Pixels beyond the image edge count as equal to the edge pixel (no erosion from the border itself).
    """
    op = np.logical_and if erode else np.logical_or
    out = mask.copy()
    for axis in (1, 2):
        for _ in range(radius):
            prev = out.copy()
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis], hi[axis] = slice(None, -1), slice(1, None)
            op(out[tuple(lo)], prev[tuple(hi)], out=out[tuple(lo)])  # neighbour after
            op(out[tuple(hi)], prev[tuple(lo)], out=out[tuple(hi)])  # neighbour before
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(mask)  # 6-connectivity in 3-D: the least eager to bridge body and table
    if n <= 1:
        return mask if n == 1 else np.zeros_like(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill 2-D holes of every slice: background not connected to the slice border becomes foreground.

    Per slice rather than in 3-D because the lungs connect to outside air through the airway in 3-D, but are
    enclosed by the chest wall in every axial slice. Done by labelling the background once (fast) rather than
    by iterated dilation (scipy's binary_fill_holes, ~8x slower on a 512 px volume).
    """
    labels, n = ndi.label(~mask, structure=_IN_PLANE)
    if n == 0:
        return mask
    border = np.concatenate(
        [labels[:, 0, :].ravel(), labels[:, -1, :].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]
    )
    outside = np.zeros(n + 1, dtype=bool)
    outside[border] = True
    outside[0] = False  # label 0 is the body itself
    return ~outside[labels]


def body_mask(
    hu: np.ndarray, threshold_hu: float = -500.0, opening_px: int = 1, stride: int | None = None
) -> np.ndarray:
    """Mask of the patient's body, ``bool [z, y, x]``, without the table, lungs included.

    Steps: threshold at `threshold_hu`; in-plane binary opening (square of side ``2*opening_px+1`` grid px)
    to cut thin bridges (blanket, table pad, cables); keep the largest 3-D connected component; fill holes
    slice by slice (lungs, bowel gas). The largest *3-D* component (rather than per slice) keeps both legs
    and any slice where the body is split, and drops the table, which is apart from the body along most of
    its length. Limitation: arms not joined to the trunk within the scanned range are dropped too.

    For speed the mask is computed on every `stride`-th pixel in y and x (default: a ~128 px grid, stride 4
    for 512 px slices) and expanded back by nearest neighbour, so its boundary is accurate to ~`stride` px.
    """
    coarse, stride = _coarse_body_mask(hu, threshold_hu, opening_px, stride)
    if stride == 1:
        return coarse
    _, h, w = hu.shape
    return np.repeat(np.repeat(coarse, _grid_counts(w, stride), axis=2), _grid_counts(h, stride), axis=1)


def _coarse_body_mask(
    hu: np.ndarray, threshold_hu: float, opening_px: int, stride: int | None, fill_holes: bool = True
) -> tuple[np.ndarray, int]:
    """`body_mask` on its sampling grid, before the expansion to full resolution, and the grid's stride
    (`fill_holes=False`: without the last step)."""
    if hu.ndim != 3:
        raise ValueError(f"expected HU [z, y, x], got shape {hu.shape}")
    _, h, w = hu.shape
    stride = _mask_stride((h, w)) if stride is None else int(stride)
    if not 1 <= stride <= min(h, w):
        raise ValueError(f"stride must be in [1, {min(h, w)}], got {stride}")
    # Sample block centres with plain slicing (a strided view, no gather).
    coarse = np.asarray(hu)[:, stride // 2 :: stride, stride // 2 :: stride] > threshold_hu
    if opening_px > 0:
        coarse = _erode_or_dilate_in_plane(coarse, opening_px, erode=True)
        coarse = _erode_or_dilate_in_plane(coarse, opening_px, erode=False)
    body = _largest_component(coarse)
    return (_fill_holes_per_slice(body) if fill_holes else body), stride


def body_box(hu: np.ndarray, margin_px: int = 4, threshold_hu: float = -500.0, opening_px: int = 1) -> Box:
    """``body_bbox(body_mask(hu), margin_px)`` computed on the mask's sampling grid: the same box, without
    expanding the mask to full resolution (each grid sample stands for a known block of pixels)."""
    # Filling holes cannot move a box: a hole is background enclosed by the slice's foreground, so inside its
    # bounding box (any background pixel outside that box reaches the border in a straight line). Skipping
    # it saves a third of the time.
    coarse, stride = _coarse_body_mask(hu, threshold_hu, opening_px, None, fill_holes=False)
    return _footprint_box(coarse.any(axis=0), hu.shape[-2:], margin_px, stride)


def body_bbox(mask: np.ndarray, margin_px: int = 4) -> Box:
    """One box around the mask's union over all slices, grown by `margin_px` and clipped to the image.

    A mask with no foreground gives the full image (and a warning): better uncropped than dropped.
    """
    if mask.ndim < 2:
        raise ValueError(f"expected a mask [..., y, x], got shape {mask.shape}")
    h, w = mask.shape[-2:]
    return _footprint_box(mask.reshape(-1, h, w).any(axis=0), (h, w), margin_px, 1)


def _footprint_box(footprint: np.ndarray, shape: tuple[int, ...], margin_px: int, stride: int) -> Box:
    """The box of a 2-D footprint sampled every `stride` px of an image of `shape` (sample k covers pixels
    [k * stride, k * stride + count_k), the last one the remainder), grown by `margin_px` and clipped."""
    h, w = shape
    rows, cols = np.flatnonzero(footprint.any(axis=1)), np.flatnonzero(footprint.any(axis=0))
    if rows.size == 0:
        logger.warning("body mask is empty: using the full %dx%d image as the crop box", h, w)
        return (0, h, 0, w)
    y_end, x_end = np.cumsum(_grid_counts(h, stride)), np.cumsum(_grid_counts(w, stride))
    return (
        max(0, int(rows[0]) * stride - margin_px),
        min(h, int(y_end[rows[-1]]) + margin_px),
        max(0, int(cols[0]) * stride - margin_px),
        min(w, int(x_end[cols[-1]]) + margin_px),
    )


def square_box(box: Box, shape: tuple[int, ...]) -> Box:
    """Grow the shorter side of `box` to a square, so resizing the crop keeps the aspect ratio.

    The square stays centred on the box, shifted back inside the image (last two entries of `shape`) where it
    fits; where the square is larger than the image it sticks out and `crop_to_box` pads it.
    """
    y0, y1, x0, x1 = box
    h, w = shape[-2:]
    side = max(y1 - y0, x1 - x0)

    def grow(a0: int, a1: int, n: int) -> tuple[int, int]:
        start = a0 - (side - (a1 - a0)) // 2
        if side <= n:
            start = min(max(start, 0), n - side)
        return start, start + side

    ny0, ny1 = grow(y0, y1, h)
    nx0, nx1 = grow(x0, x1, w)
    return (ny0, ny1, nx0, nx1)


def crop_to_box(
    vol: np.ndarray | torch.Tensor, box: Box, pad_value: float = AIR_HU
) -> np.ndarray | torch.Tensor:
    """Crop the last two axes of `vol` (``[z, ..., y, x]``) to `box`.

    A box inside the image gives a view (no copy). A box reaching outside the image gives a copy padded with
    `pad_value` (air by default; pass the windowed air value for uint8 data).
    """
    y0, y1, x0, x1 = (int(v) for v in box)
    if y1 <= y0 or x1 <= x0:
        raise ValueError(f"empty crop box {box}")
    h, w = vol.shape[-2:]
    if y0 >= 0 and x0 >= 0 and y1 <= h and x1 <= w:
        return vol[..., y0:y1, x0:x1]
    out_shape = (*vol.shape[:-2], y1 - y0, x1 - x0)
    if is_tensor(vol):
        import torch

        out = torch.full(out_shape, pad_value, dtype=vol.dtype, device=vol.device)
    else:
        info = np.iinfo(vol.dtype) if np.issubdtype(vol.dtype, np.integer) else None
        if info is not None and not info.min <= pad_value <= info.max:
            raise ValueError(f"pad_value {pad_value} does not fit {vol.dtype}; pass one that does")
        out = np.full(out_shape, pad_value, dtype=vol.dtype)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    if sy1 > sy0 and sx1 > sx0:
        out[..., sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = vol[..., sy0:sy1, sx0:sx1]
    return out
