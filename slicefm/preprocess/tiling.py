"""DALE-CT "5-cut" tiling: five overlapping tiles of the body-cropped region, each resized to the model input.

Geometry (per axis, crop side ``L``): every tile spans ``t = round(L * (1 + overlap) / 2)`` pixels, so the
two tiles of a corner pair share ``overlap * L`` pixels (``t = 0.6 L`` for the default ``overlap = 0.2``).
The four corner tiles sit flush with the crop's corners and together cover it; the fifth tile has the same
size and is centred, covering the middle where the corner tiles meet. Order: top-left, top-right, bottom-left,
bottom-right, centre (top = anterior, left = patient right, in the canonical orientation).
"""

from __future__ import annotations

import numpy as np
import torch

from slicefm.preprocess.crop import AIR_HU, Box, crop_to_box
from slicefm.preprocess.resize import resize_slices

TILE_NAMES = ("top_left", "top_right", "bottom_left", "bottom_right", "centre")


def five_cut_boxes(box: Box, overlap: float = 0.2) -> list[Box]:
    """The five tile boxes ``(y0, y1, x0, x1)`` inside `box`, in `TILE_NAMES` order (see module docstring)."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    y0, y1, x0, x1 = (int(v) for v in box)
    if y1 <= y0 or x1 <= x0:
        raise ValueError(f"empty box {box}")

    def spans(a0: int, a1: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        n = a1 - a0
        # ceil-half guarantees 2t >= n, so the corner tiles cover the crop even with overlap 0 and odd n.
        t = min(n, max(round(n * (1.0 + overlap) / 2.0), (n + 1) // 2))
        mid = a0 + (n - t) // 2
        return (a0, a0 + t), (a1 - t, a1), (mid, mid + t)

    (ty, by, cy), (lx, rx, cx) = spans(y0, y1), spans(x0, x1)
    return [(*ty, *lx), (*ty, *rx), (*by, *lx), (*by, *rx), (*cy, *cx)]


def tile_slices(
    x: np.ndarray | torch.Tensor, boxes: list[Box], size: int | None, pad_value: float = AIR_HU
) -> np.ndarray | torch.Tensor:
    """Crop every box from every slice and resize it: ``[z, C, H, W] -> [z, n_boxes, C, size, size]``.

    ``[z, H, W]`` gives ``[z, n_boxes, size, size]``. Boxes are in `x`'s frame; parts outside it are filled
    with `pad_value` (air HU by default: tile HU before windowing). Same kind (numpy/torch) and dtype as `x`.
    ``size=None`` keeps the native tile size (the boxes must then all be the same size, as 5-cut tiles are).
    """
    if not boxes:
        raise ValueError("need at least one box")
    tiles = [resize_slices(crop_to_box(x, b, pad_value=pad_value), size) for b in boxes]
    if isinstance(x, torch.Tensor):
        return torch.stack(tiles, dim=1)
    return np.stack(tiles, axis=1)
