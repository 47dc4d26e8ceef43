"""View sampling and augmentation for MoCo-v3 / LECL / LeJEPA, on whole batches in torch.

Geometry (crop boxes, flips, crop centres) is drawn with an explicit `numpy.random.Generator`;
photometric noise with an explicit `torch.Generator`. Crops are one `grid_sample` per batch, so the
same boxes can resample images (bilinear) and label masks (nearest) identically; auxiliary targets
are measured on the crop's output pixel grid.
Boxes are (x0, y0, x1, y1) in source pixels, continuous coordinates (pixel k spans [k, k + 1)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from slicefm.ssl.config import AugmentConfig, LECLConfig, LeJEPAConfig

# Crop-centre kinds reported per crop (LeJEPA): abnormality, organ (anatomy), body.
ABNORMAL, ORGAN, BODY = 0, 1, 2


def crop_resize(
    images: torch.Tensor,
    boxes: torch.Tensor,
    out_size: int,
    hflip: torch.Tensor | None = None,
    vflip: torch.Tensor | None = None,
    mode: str = "bilinear",
) -> torch.Tensor:
    """images [B, C, H, W], boxes [B, 4] -> crops [B, C, S, S] (optionally mirrored per sample)."""
    b, _, h, w = images.shape
    boxes = boxes.to(device=images.device, dtype=torch.float32)
    frac = (torch.arange(out_size, device=images.device, dtype=torch.float32) + 0.5) / out_size
    xs = boxes[:, 0:1] + frac * (boxes[:, 2:3] - boxes[:, 0:1])  # [B, S] source x of each output column
    ys = boxes[:, 1:2] + frac * (boxes[:, 3:4] - boxes[:, 1:2])
    if hflip is not None:
        xs = torch.where(hflip.to(images.device)[:, None], xs.flip(1), xs)
    if vflip is not None:
        ys = torch.where(vflip.to(images.device)[:, None], ys.flip(1), ys)
    # grid_sample(align_corners=False): -1 and 1 are the outer edges of the border pixels.
    gx = (2.0 * xs / w - 1.0)[:, None, :].expand(b, out_size, out_size)
    gy = (2.0 * ys / h - 1.0)[:, :, None].expand(b, out_size, out_size)
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(images, grid.to(images.dtype), mode=mode, padding_mode="border", align_corners=False)


def crop_labels(
    labels: torch.Tensor, boxes: torch.Tensor, out_size: int, **flips: torch.Tensor
) -> torch.Tensor:
    """Label maps [B, H, W] (integer) -> [B, S, S] long, nearest-neighbour through the same boxes."""
    out = crop_resize(labels[:, None].float(), boxes, out_size, mode="nearest", **flips)
    return out[:, 0].round().long()


def random_resized_boxes(
    rng: np.random.Generator,
    n: int,
    hw: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    tries: int = 10,
) -> np.ndarray:
    """torchvision RandomResizedCrop geometry: area fraction in `scale`, log-uniform aspect ratio; the first
    of `tries` draws that fits the image, placed uniformly (the whole image when none fits). All n at once."""
    h, w = hw
    area = h * w * rng.uniform(*scale, size=(n, tries))
    r = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, tries)))
    cw, ch = np.sqrt(area * r), np.sqrt(area / r)
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.argmax(axis=1)
    ok = fits[np.arange(n), first]
    cw, ch = cw[np.arange(n), first], ch[np.arange(n), first]
    u = rng.random((n, 2))
    x0, y0 = u[:, 0] * (w - cw), u[:, 1] * (h - ch)
    out = np.stack([x0, y0, x0 + cw, y0 + ch], axis=1)
    out[~ok] = (0, 0, w, h)
    return out.astype(np.float32)


def centred_boxes(centres: np.ndarray, sides: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Square boxes of `sides` centred on `centres` [n, 2] (x, y), shifted to lie inside the image.

    The shift keeps a centred box's content: a region inside both the image and the unshifted box
    (e.g. a lesion box no larger than the crop) stays inside the shifted box.
    """
    h, w = hw
    sides = np.minimum(np.asarray(sides, np.float32), min(h, w))
    x0 = np.clip(centres[:, 0] - sides / 2, 0, w - sides)
    y0 = np.clip(centres[:, 1] - sides / 2, 0, h - sides)
    return np.stack([x0, y0, x0 + sides, y0 + sides], axis=1).astype(np.float32)


def lesion_crop_boxes(lesion_boxes: np.ndarray, hw: tuple[int, int], cfg: LECLConfig) -> np.ndarray:
    """LECL key-encoder crop: square, centred on the lesion box, side = max(context x its longest side,
    min_crop_frac x slice side), so the crop always contains the box and some surrounding anatomy."""
    b = np.asarray(lesion_boxes, np.float32)
    longest = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    sides = np.maximum(cfg.context * longest, cfg.min_crop_frac * min(hw))
    centres = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)
    return centred_boxes(centres, sides, hw)


def photometric(
    x: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig, clamp: tuple[float, float] | None
) -> torch.Tensor:
    """Brightness shift, contrast around the image mean, Gaussian blur (per-sample sigma); batched.

    `gen` lives on the CPU so draws do not depend on the device; values move to x's device.
    """
    b, c = x.shape[:2]

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(*shape, generator=gen)).to(x.device, x.dtype)

    # Range of the input representation: [0, 1] windows, or roughly +-3 for z-scores.
    span = 1.0 if clamp is None else clamp[1] - clamp[0]
    shift = uniform(-cfg.brightness, cfg.brightness, b, 1, 1, 1) * span
    gain = uniform(1 - cfg.contrast, 1 + cfg.contrast, b, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    # (x - mean) * gain + mean + shift, in place on one new tensor: the same operations in the same order
    # (bit-identical views), one image-sized allocation instead of four (~30% of the CPU views' time).
    x = (x - mean).mul_(gain).add_(mean).add_(shift)
    blur = torch.rand(b, generator=gen) < cfg.blur_prob
    sigma = cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * torch.rand(b, generator=gen)
    if blur.any():
        idx = torch.nonzero(blur)[:, 0].to(x.device)
        x.index_copy_(0, idx, gaussian_blur(x.index_select(0, idx), sigma[blur]))
    if clamp is not None:
        x.clamp_(*clamp)  # x is this function's own tensor since the brightness / contrast step
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample (sigma 0 = identity), as grouped convolutions."""
    b, c, h, w = x.shape
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    s = sigma.clamp_min(1e-6)[:, None]
    k = torch.exp(-0.5 * (t[None] / s) ** 2)
    k = torch.where(sigma[:, None] > 0, k / k.sum(1, keepdim=True), (t[None] == 0).float())
    k = k.to(x.device, x.dtype).repeat_interleave(c, dim=0)  # [B*C, K]
    flat = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="replicate")
    flat = F.conv2d(flat, k[:, None, None, :], groups=b * c)
    flat = F.conv2d(flat, k[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def _flips(rng: np.random.Generator, n: int, cfg: AugmentConfig) -> dict[str, torch.Tensor]:
    return {
        "hflip": torch.from_numpy(rng.random(n) < cfg.hflip_prob),
        "vflip": torch.from_numpy(rng.random(n) < cfg.vflip_prob),
    }


def _clamp_for(images: torch.Tensor) -> tuple[float, float] | None:
    """The range augmented views are clamped to: [0, 1] for windows (uint8 as stored, or already scaled
    floats), none for z-scores. uint8 needs no look at the values (no device sync)."""
    if images.dtype == torch.uint8:
        return (0.0, 1.0)
    return (0.0, 1.0) if images.min() >= 0 and images.max() <= 1 else None


def as_float(images: torch.Tensor) -> torch.Tensor:
    """Loader images on their device -> float32: uint8 windows to [0, 1] (x / 255, as `train.data.to_float`),
    float16 z-scores widened; float32 as it is. Items travel to the device in their stored dtype."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)  # in place on the new float copy: one pass fewer
    return images.float()


@dataclass
class MoCoViews:
    x1: torch.Tensor
    x2: torch.Tensor
    key_x1: torch.Tensor | None  # LECL: lesion-centred crops for the momentum encoder
    key_x2: torch.Tensor | None
    lesion_mask: torch.Tensor  # [B] bool: rows with a key-slice lesion box
    key_boxes: np.ndarray  # [B, 4] the momentum encoder's crop boxes (LECL) or the x2 boxes


def moco_views(
    images: torch.Tensor,
    lesion_boxes: np.ndarray,
    out_size: int,
    rng: np.random.Generator,
    gen: torch.Generator,
    crop_scale: tuple[float, float],
    aug: AugmentConfig,
    lecl: LECLConfig | None = None,
) -> MoCoViews:
    """Two augmented views per slice. With `lecl`, slices with a lesion box give the query encoder the
    full slice and the momentum encoder a lesion-centred crop (CLEAR, paper variant)."""
    b, _, h, w = images.shape
    clamp = _clamp_for(images)
    images = as_float(images)
    has_lesion = ~np.isnan(lesion_boxes).any(axis=1) if lecl is not None else np.zeros(b, bool)
    full = np.tile(np.array([0, 0, w, h], np.float32), (b, 1))
    views, boxes = [], []
    for _ in range(2):
        box = random_resized_boxes(rng, b, (h, w), crop_scale)
        box[has_lesion] = full[has_lesion]
        boxes.append(box)
        crop = crop_resize(images, torch.from_numpy(box), out_size, **_flips(rng, b, aug))
        views.append(photometric(crop, gen, aug, clamp))
    key_views: list[torch.Tensor | None] = [None, None]
    key_boxes = boxes[1]
    if lecl is not None:
        key_boxes = boxes[1].copy()
        if has_lesion.any():
            key_boxes[has_lesion] = lesion_crop_boxes(lesion_boxes[has_lesion], (h, w), lecl)
        key_views = []
        # Slices without a lesion keep plain MoCo (the key view is the other encoder's view): only the
        # lesion slices get a lesion-centred key crop.
        rows = torch.from_numpy(np.flatnonzero(has_lesion)).to(images.device)
        n_les = len(rows)
        for v in views:
            if not n_les:
                key_views.append(v)
                continue
            kbox = torch.from_numpy(key_boxes[has_lesion])
            crop = crop_resize(images.index_select(0, rows), kbox, out_size, **_flips(rng, n_les, aug))
            key_views.append(v.index_copy(0, rows, photometric(crop, gen, aug, clamp)))
    return MoCoViews(views[0], views[1], key_views[0], key_views[1], torch.from_numpy(has_lesion), key_boxes)


def body_masks(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, H, W] bool: pixels brighter than 10% of their slice's range (air is the minimum in
    every window and in z-scores); a constant slice is all body."""
    m = images.float().mean(1)
    lo, hi = m.amin(dim=(1, 2), keepdim=True), m.amax(dim=(1, 2), keepdim=True)
    return (m > lo + 0.1 * (hi - lo)) | (hi <= lo)


def sample_centres(
    rng: np.random.Generator,
    abnormal: torch.Tensor,
    organ: torch.Tensor,
    body: torch.Tensor,
    p_abnormal: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop centres for N slices at once: masks [N, H, W] bool (any device), p_abnormal [N].

    Slice n's centre is a uniformly drawn pixel (its centre, (x + 0.5, y + 0.5)) of its abnormal mask with
    probability p_abnormal[n] when that mask has a pixel, else of its organ mask, else of its body mask, else
    the image centre; kinds say which (ABNORMAL / ORGAN / BODY). The mask work is batched (one device sync for
    the pixel counts); the random numbers come from `rng` on the host, drawn slice by slice in the order the
    per-crop sampler drew them (`random()` only where an abnormal pixel exists, then `integers(count)`), so a
    seed gives the views it gave before batching. Returns centres [N, 2] float32 and kinds [N] int64.
    """
    n, h, w = body.shape
    counts = torch.stack([m.reshape(n, -1).sum(1) for m in (abnormal, organ, body)]).cpu().numpy()
    kinds = np.full(n, BODY, np.int64)
    k = np.zeros(n, np.int64)
    for i in range(n):  # scalar draws only: ~1 us each
        if counts[0, i] and rng.random() < p_abnormal[i]:
            kinds[i], total = ABNORMAL, counts[0, i]
        elif counts[1, i]:
            kinds[i], total = ORGAN, counts[1, i]
        else:
            total = counts[2, i]
        k[i] = rng.integers(total) if total else 0
    dev = body.device
    kinds_t = torch.from_numpy(kinds).to(dev)[:, None, None]
    chosen = torch.where(kinds_t == ABNORMAL, abnormal, torch.where(kinds_t == ORGAN, organ, body))
    row_counts = chosen.view(torch.uint8).sum(2, dtype=torch.int32).long()  # [N, H]; ~2x a bool sum
    # k-th pixel (row-major, as torch.nonzero orders them) of the chosen mask: first the row, then the column.
    k_t = torch.from_numpy(k).to(dev)[:, None]
    cum_rows = row_counts.cumsum(1)
    y = torch.searchsorted(cum_rows, k_t, right=True).clamp_max(h - 1)  # [N, 1]
    before = cum_rows.gather(1, y) - row_counts.gather(1, y)
    row = chosen.gather(1, y[:, :, None].expand(n, 1, w))[:, 0].to(torch.int64).cumsum(1)  # [N, W]
    x = torch.searchsorted(row, k_t - before, right=True).clamp_max(w - 1)
    centres = torch.cat([x, y], dim=1).cpu().numpy().astype(np.float32) + 0.5
    empty = counts[2] == 0
    centres[empty] = (w / 2, h / 2)
    return centres, kinds


@dataclass
class LeJEPAViews:
    global_views: torch.Tensor  # [G, B, C, S, S]
    local_views: torch.Tensor | None  # [L, B, C, s, s]
    rows: np.ndarray  # [G + L, B] row of the item's slab each crop came from
    slice_index: np.ndarray  # [G + L, B] slice_index of that row
    centres: np.ndarray  # [G + L, B, 2] (x, y) crop centres chosen before shifting into the image
    kinds: np.ndarray  # [G + L, B] ABNORMAL / ORGAN / BODY
    boxes: np.ndarray  # [G + L, B, 4]
    aux_targets: dict[str, torch.Tensor] | None


def lejepa_views(
    batch: dict[str, torch.Tensor],
    rng: np.random.Generator,
    gen: torch.Generator,
    cfg: LeJEPAConfig,
    aug: AugmentConfig,
    global_size: int,
    n_organs: int | None = None,
    n_abnormal: int | None = None,
    token_grid: int | None = None,
    n_lesion_classes: int = 1,
) -> LeJEPAViews:
    """DALE-CT multi-crop: G global crops from the slab's centre slice, L local crops from random slices
    of the slab (depth-aware) or all from one slice (2D items have one slice). Guidance "volume": every crop
    of a targeted item (`batch["targeted"]`, drawn with `abnormal_prob` by the sampler) is centred on an
    abnormality when its slice shows one, crops of other items on anatomy; "slice": every crop is centred
    on an abnormality with probability `abnormal_prob` when its slice has one, else on anatomy.

    With `n_organs` the aux targets of the global crops are returned: organ fractions per crop
    (organ_cls [G, B, n_organs]) and per token cell (organ_patch [G, B, grid^2, n_organs]), and binary
    abnormality labels (finding classes 1.. and 'lesion') at both levels.
    """
    stack = batch["stack"]  # uint8 / float16 as stored, or float32; crops are made in float32
    b, _, _, h, w = stack.shape
    n_valid = batch["n"].numpy()
    centre = batch["centre"].numpy()
    if cfg.guidance == "volume" and "targeted" in batch:
        # the sampler already drew targeted items with abnormal_prob: their crops always aim at the abnormality
        p_abnormal = np.where(batch["targeted"].numpy(), 1.0, 0.0)
    else:
        p_abnormal = np.full(b, cfg.abnormal_prob)
    n_views = cfg.n_global + cfg.n_local
    rows = np.empty((n_views, b), np.int64)
    rows[: cfg.n_global] = centre[None]
    local_rows = rng.integers(0, n_valid[None].repeat(cfg.n_local, 0)) if cfg.depth_aware else None
    rows[cfg.n_global :] = centre[None] if local_rows is None else local_rows
    # Every crop's slice at once: view-major [V * B], the crop order used below.
    ar = torch.arange(b)
    items = ar.repeat(n_views).to(stack.device)
    flat_rows = torch.from_numpy(rows.reshape(-1)).to(stack.device)
    at = {k: batch[k][items, flat_rows] for k in ("lesion", "finding", "box_mask", "organ")}
    abnormal = (at["lesion"] > 0) | (at["finding"] > 0) | (at["box_mask"] > 0)
    centres, kinds = sample_centres(
        rng,
        abnormal,
        at["organ"] > 0,
        body_masks(as_float(stack[items, flat_rows])),
        np.tile(p_abnormal, n_views),
    )
    centres, kinds = centres.reshape(n_views, b, 2), kinds.reshape(n_views, b)
    side = min(h, w)
    scales = [cfg.global_scale] * cfg.n_global + [cfg.local_scale] * cfg.n_local
    sides = np.stack([np.sqrt(rng.uniform(*s, size=b)) * side for s in scales])
    boxes = np.stack([centred_boxes(centres[v], sides[v], (h, w)) for v in range(n_views)])
    clamp = _clamp_for(stack)

    def crops(vs: range, size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        idx = torch.from_numpy(rows[list(vs)]).reshape(-1)
        src = as_float(stack[ar.repeat(len(vs)), idx])
        box = torch.from_numpy(boxes[list(vs)].reshape(-1, 4))
        flips = _flips(rng, len(idx), aug)
        out = photometric(crop_resize(src, box, size, **flips), gen, aug, clamp)
        return out.view(len(vs), b, *out.shape[1:]), flips, idx

    g_views, g_flips, g_idx = crops(range(cfg.n_global), global_size)
    l_views = None
    if cfg.n_local:
        l_views = crops(range(cfg.n_global, n_views), cfg.local_size)[0]
    slice_index = batch["slice_index"].numpy()[np.arange(b)[None], rows]
    targets = None
    if n_organs is not None:
        g_boxes = torch.from_numpy(boxes[: cfg.n_global].reshape(-1, 4))
        labels = {
            k: crop_labels(batch[k][ar.repeat(cfg.n_global), g_idx], g_boxes, global_size, **g_flips)
            for k in ("organ", "finding", "lesion")
        }
        targets = aux_targets(
            labels["organ"],
            labels["finding"],
            labels["lesion"],
            n_organs,
            n_abnormal or 1,
            token_grid,
            n_lesion_classes,
        )
        targets = {k: t.view(cfg.n_global, b, *t.shape[1:]) for k, t in targets.items()}
    return LeJEPAViews(g_views, l_views, rows, slice_index, centres, kinds, boxes, targets)


def cell_class_counts(labels: torch.Tensor, n_classes: int, grid: int) -> torch.Tensor:
    """Label maps [N, S, S] -> pixel counts [N, grid*grid, n_classes] per cell of a grid x grid partition.

    One bincount instead of one-hot maps (the one-hot version was most of a CPU LeJEPA step at 128 px).
    Values are clamped into [0, n_classes - 1]. Needs S divisible by grid (equal cells).
    """
    n, s = labels.shape[0], labels.shape[-1]
    cell = torch.arange(s, device=labels.device) * grid // s
    cell_id = cell[:, None] * grid + cell[None, :]  # [S, S]
    key = (torch.arange(n, device=labels.device)[:, None, None] * grid * grid + cell_id) * n_classes
    key = key + labels.long().clamp(0, n_classes - 1)
    counts = torch.bincount(key.reshape(-1), minlength=n * grid * grid * n_classes)
    return counts.view(n, grid * grid, n_classes).float()


def aux_targets(
    organ: torch.Tensor,
    finding: torch.Tensor,
    lesion: torch.Tensor,
    n_organs: int,
    n_abnormal: int,
    token_grid: int | None,
    n_lesion_classes: int = 1,
) -> dict[str, torch.Tensor]:
    """Cropped label maps [N, S, S] -> DALE-CT aux targets.

    organ_cls [N, n_organs]: fraction of the crop's pixels of each organ class (soft labels);
    abn_cls [N, n_abnormal]: 1 where any pixel has that finding (classes 1..), then the lesion classes: one
    ('lesion' > 0) or, with `n_lesion_classes` k > 1, one per lesion type 1..k (`lesion` holds types).
    With `token_grid` g: the same per cell of a g x g grid (the encoder's patch tokens), [N, g*g, C].
    """
    s = organ.shape[-1]
    grid = token_grid or 1
    if s % grid:
        raise ValueError(f"crop size {s} is not divisible by the token grid {grid}")
    n_find = n_abnormal - n_lesion_classes
    lesion_labels = (lesion > 0).long() if n_lesion_classes == 1 else lesion
    organ_n = cell_class_counts(organ, n_organs, grid)  # [N, g*g, n_organs]
    find_n = cell_class_counts(finding, n_find + 1, grid)[..., 1:]  # drop class 0 (no finding)
    les_n = cell_class_counts(lesion_labels, n_lesion_classes + 1, grid)[..., 1:]
    abn_patch = (torch.cat([find_n, les_n], dim=-1) > 0).float()
    out = {"organ_cls": organ_n.sum(dim=1) / (s * s), "abn_cls": abn_patch.amax(dim=1)}
    if token_grid is not None:
        out["organ_patch"] = organ_n / (s // grid) ** 2
        out["abn_patch"] = abn_patch
    return out
