"""Map lesion boxes between the input slice frame and the cropped + resized output frame.

Boxes are ``[x0, y0, x1, y1]`` in continuous pixel coordinates (pixel i spans [i, i + 1), DeepLesion's and
torchvision's convention). The crop box is ``(y0, y1, x0, x1)`` in input pixels (`crop.Box`); resizing uses
half-pixel centres (``align_corners=False``), under which that frame scales exactly by ``out / crop``.
"""

from __future__ import annotations

import numpy as np

from slicefm.preprocess.crop import Box


def _scales(
    crop_box: Box, out_size: int | tuple[int, int], crop_size: int | tuple[int, int] | None
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    cy0, cy1, cx0, cx1 = (float(v) for v in crop_box)
    crop_h, crop_w = cy1 - cy0, cx1 - cx0
    if crop_h <= 0 or crop_w <= 0:
        raise ValueError(f"empty crop box {crop_box}")
    if crop_size is not None:
        given = (crop_size, crop_size) if np.isscalar(crop_size) else tuple(crop_size)
        if (float(given[0]), float(given[1])) != (crop_h, crop_w):
            raise ValueError(
                f"crop_size {crop_size} does not match crop box {crop_box} ({crop_h} x {crop_w})"
            )
    out_h, out_w = (out_size, out_size) if np.isscalar(out_size) else out_size
    # per-coordinate factors in xyxy order
    scale = np.array([out_w / crop_w, out_h / crop_h, out_w / crop_w, out_h / crop_h])
    origin = np.array([cx0, cy0, cx0, cy0])
    return scale, origin, (float(out_h), float(out_w))


def _as_boxes(box_xyxy: np.ndarray) -> np.ndarray:
    boxes = np.asarray(box_xyxy, dtype=np.float64)
    if boxes.shape[-1] != 4 or boxes.ndim not in (1, 2):
        raise ValueError(f"expected boxes [4] or [n, 4] (x0, y0, x1, y1), got shape {boxes.shape}")
    return boxes


def map_box_to_output(
    box_xyxy: np.ndarray,
    crop_box: Box,
    out_size: int | tuple[int, int],
    crop_size: int | tuple[int, int] | None = None,
) -> np.ndarray:
    """Input-frame boxes ``[n, 4]`` (or one ``[4]``) -> output-frame boxes, clipped to ``[0, out_size]``.

    `crop_size` (the crop's side, or (h, w)) defaults to the extent of `crop_box`; if given, it must match.
    A box partly outside the crop is clipped to the part inside; one wholly outside collapses to zero area.
    """
    boxes = _as_boxes(box_xyxy)
    scale, origin, (out_h, out_w) = _scales(crop_box, out_size, crop_size)
    mapped = (boxes - origin) * scale
    upper = np.array([out_w, out_h, out_w, out_h])
    return np.clip(mapped, 0.0, upper)


def map_box_to_input(
    box_xyxy: np.ndarray,
    crop_box: Box,
    out_size: int | tuple[int, int],
    crop_size: int | tuple[int, int] | None = None,
    image_shape: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Inverse of `map_box_to_output`: output-frame boxes -> input-frame boxes.

    Clipped to the crop box, and also to the image (last two entries of `image_shape`) when given: a padded
    square crop can reach outside the image.
    """
    boxes = _as_boxes(box_xyxy)
    scale, origin, _ = _scales(crop_box, out_size, crop_size)
    mapped = boxes / scale + origin
    cy0, cy1, cx0, cx1 = (float(v) for v in crop_box)
    lower, upper = np.array([cx0, cy0, cx0, cy0]), np.array([cx1, cy1, cx1, cy1])
    if image_shape is not None:
        h, w = image_shape[-2:]
        lower = np.maximum(lower, 0.0)
        upper = np.minimum(upper, np.array([w, h, w, h], dtype=np.float64))
    return np.clip(mapped, lower, upper)
