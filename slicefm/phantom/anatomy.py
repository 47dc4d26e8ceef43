"""Normal anatomy: body wall, bowel, abdominal and pelvic organs, lungs, mediastinum, airways, spine, ribs.

Every structure is an ellipse, ellipsoid or smooth random field painted into a Canvas in a fixed order
(each draws from the scan's random stream, so the order is part of the output). Positions and sizes come
from the canvas's body geometry (Canvas._derive_geometry).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from slicefm.phantom import portable_math
from slicefm.phantom.canvas import Canvas
from slicefm.phantom.geometry import span
from slicefm.phantom.records import ORGAN_INDEX


def _upsample_axis(coarse: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Linear interpolation of `coarse` along `axis` onto n_out samples spanning its nodes."""
    n_in = coarse.shape[axis]
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.clip(np.floor(pos).astype(np.intp), 0, n_in - 2)
    w = (pos - lo).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(coarse.ndim)])
    return np.take(coarse, lo, axis=axis) * (1.0 - w) + np.take(coarse, lo + 1, axis=axis) * w


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], cells: Sequence[int]) -> np.ndarray:
    """Unit-variance random field: coarse Gaussian noise, trilinearly upsampled to `shape`.

    Separable gather-and-lerp (no BLAS: its threads thrash on small shared machines).
    """
    field = rng.standard_normal(tuple(max(2, int(c)) for c in cells), dtype=np.float32)
    for axis in (2, 1, 0):  # smallest intermediate arrays first
        field = _upsample_axis(field, shape[axis], axis)
    return field / max(float(field.std()), 1e-6)


def _cells(shape: tuple[int, ...], spacing: Sequence[float], cell_mm: float) -> list[int]:
    """Coarse-grid node counts per axis for a smooth field with cells of about `cell_mm`."""
    return [int(math.ceil(n * d / cell_mm)) + 1 for n, d in zip(shape, spacing, strict=True)]


def _cos_7theta_plus(y: np.ndarray, x: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """cos(7 * atan2(y, x) + phase) from Chebyshev polynomials of the angle's cosine and sine.

    Basic arithmetic only: numpy's arctan2 / cos round differently per CPU (see portable_math).
    """
    x, y = x.astype(np.float64), y.astype(np.float64)
    r = np.maximum(np.sqrt(x * x + y * y), 1e-12)
    c, s = x / r, y / r
    c2 = c * c
    cos7 = (((64.0 * c2 - 112.0) * c2 + 56.0) * c2 - 7.0) * c  # T7(cos)
    sin7 = (((64.0 * c2 - 80.0) * c2 + 24.0) * c2 - 1.0) * s  # sin * U6(cos)
    return cos7 * portable_math.cos(phase) - sin7 * portable_math.sin(phase)


def paint_anatomy(canvas: Canvas) -> None:
    """Paint the body into `canvas`: couch, body wall and bowel, abdominal organs, pelvic bones, lungs,
    mediastinum, airways, spine, ribs (in this order: several draw from the scan's random stream)."""
    _table(canvas)
    _body_wall(canvas)
    _abdominal_organs(canvas)
    _pelvic_bones(canvas)
    _lungs(canvas)
    _mediastinum(canvas)
    _airways(canvas)
    _spine(canvas)
    _ribs(canvas)


def _table(canvas: Canvas) -> None:
    top = canvas.yc + float(canvas.body_ry.max()) + 12.0
    ys = span(canvas.g.y, top, top + 5.0)
    xs = span(canvas.g.x, canvas.xc - 0.9 * canvas.h.half_width, canvas.xc + 0.9 * canvas.h.half_width)
    canvas.hu[:, ys, xs] = 80.0  # carbon-fibre couch: thin and moderately dense; label background


def _body_wall(canvas: Canvas) -> None:
    all_z, xc, yc, rx, ry = slice(0, canvas.shape[0]), canvas.xc, canvas.yc, canvas.body_rx, canvas.body_ry
    canvas.paint(canvas.ellipses(all_z, xc, yc, rx, ry), 40.0, "skin")
    canvas.paint(canvas.ellipses(all_z, xc, yc, rx - 2.0, ry - 2.0), -100.0, "body_fat")
    canvas.inner_wall = canvas.full(canvas.ellipses(all_z, xc, yc, rx - canvas.wall, ry - canvas.wall))
    canvas.hu[canvas.inner_wall], canvas.organ[canvas.inner_wall] = 50.0, ORGAN_INDEX["muscle"]
    canvas.cavity = canvas.full(canvas.ellipses(all_z, xc, yc, canvas.cavity_rx, canvas.cavity_ry))
    above = (canvas.g.s >= canvas.s_dia)[:, None, None]
    chest = canvas.cavity & above
    canvas.hu[chest], canvas.organ[chest] = -60.0, ORGAN_INDEX["mediastinum"]  # fat; lungs come later
    _bowel(canvas, canvas.cavity & ~above)


def _bowel(canvas: Canvas, region: np.ndarray) -> None:
    """Abdominal cavity: bowel loops (~25 HU), visceral fat (-100 HU) and gas pockets."""
    present = np.flatnonzero(region.any(axis=(1, 2)))
    if present.size == 0:
        return
    zs = slice(0, int(present[-1]) + 1)
    sub = region[zs]
    loops = _smooth_field(canvas.rng, sub.shape, _cells(sub.shape, canvas.spacing_anat, 18.0))
    gas = _smooth_field(canvas.rng, sub.shape, _cells(sub.shape, canvas.spacing_anat, 14.0))
    fat_fraction = float(np.clip(0.15 + canvas.h.fat_mm / 60.0, 0.15, 0.55))
    is_fat = loops < portable_math.ndtri(fat_fraction)
    hu = np.where(is_fat, np.float32(-100.0), np.float32(25.0) + 6.0 * loops)
    hu = np.where(~is_fat & (gas > 2.0), np.float32(-950.0), hu)
    box = (zs, slice(None), slice(None))
    canvas.paint((box, sub & ~is_fat), hu, "bowel")
    canvas.paint((box, sub & is_fat), hu, "body_fat")  # visceral fat


def _abdominal_organs(canvas: Canvas) -> None:
    g, h, L, o, c = canvas.g, canvas.h, canvas.g.length_mm, canvas.h.organ_scale, canvas.contrast
    chest_rx, chest_ry = canvas.chest_cavity_rx, canvas.chest_cavity_ry
    liver = ((g.z_of(canvas.s_dia - 0.07), canvas.yc - 0.02 * chest_ry, canvas.xc - 0.33 * chest_rx),)
    liver += ((0.12 * L * o, 0.85 * chest_ry, 0.62 * chest_rx * o),)
    canvas.paint(g.ellipsoid(*liver), 95.0 if c else 60.0, "liver", within=canvas.cavity)
    spleen = (g.z_of(canvas.s_dia - 0.06), canvas.yc + 0.45 * chest_ry, canvas.xc + 0.6 * chest_rx)
    canvas.paint(
        g.ellipsoid(spleen, (0.06 * L * o, 0.3 * chest_ry, 0.2 * chest_rx)),
        100.0 if c else 50.0,
        "spleen",
        within=canvas.cavity,
    )
    for side, sign, shift in (("kidney_right", -1.0, -0.02), ("kidney_left", 1.0, 0.0)):
        centre = (
            g.z_of(canvas.s_dia - 0.2 + shift),
            canvas.y_v + 0.3 * canvas.r_v,
            canvas.xc + sign * (canvas.r_v + 38.0),
        )
        canvas.paint(g.ellipsoid(centre, (0.1 * L * o, 24.0 * o, 22.0 * o)), 150.0 if c else 32.0, side)
    f = h.bladder_fill
    bladder = (
        (g.z_of(0.07), canvas.yc - 0.3 * chest_ry, canvas.xc),
        (0.07 * L * f, 0.35 * chest_ry * f, 0.28 * chest_rx * f),
    )
    canvas.paint(g.ellipsoid(*bladder), 10.0, "bladder", within=canvas.cavity)


def _bone(canvas: Canvas, zs: slice | None, cx, cy, rx, ry, organ: str, cortex_mm: float = 2.5) -> None:
    """Cortical shell (~700 HU) around cancellous bone (~250 HU)."""
    canvas.paint(canvas.ellipses(zs, cx, cy, rx, ry), 700.0, organ)
    canvas.paint(canvas.ellipses(zs, cx, cy, rx - cortex_mm, ry - cortex_mm), 250.0, organ)


def _pelvic_bones(canvas: Canvas) -> None:
    chest_rx, chest_ry = canvas.chest_cavity_rx, canvas.chest_cavity_ry
    wings, heads = canvas.slab(0.12, 0.26), canvas.slab(0.0, 0.12)
    for sign in (-1.0, 1.0):
        x_wing, y_wing = canvas.xc + sign * 0.62 * chest_rx, canvas.yc + 0.25 * chest_ry
        _bone(canvas, wings, x_wing, y_wing, 10.0, 0.42 * chest_ry, "pelvic_bone")
        x_head, y_head = canvas.xc + sign * 0.55 * chest_rx, canvas.yc + 0.05 * chest_ry
        _bone(canvas, heads, x_head, y_head, 22.0, 22.0, "pelvic_bone")


def _lungs(canvas: Canvas) -> None:
    g, zs = canvas.g, canvas.slab(canvas.s_dia - 0.06, 0.96)
    if zs is None:
        return
    s = g.s[zs][:, None, None].astype(np.float32)
    taper = np.sqrt(np.clip((0.96 - s) / 0.1, 0.0, 1.0))  # apices narrow to a cone
    cavity = canvas.cavity[zs]
    X, Y = g.x[None, None, :], g.y[None, :, None]
    cells = _cells(cavity.shape, canvas.spacing_anat, 14.0)
    f1, f2 = (_smooth_field(canvas.rng, cavity.shape, cells) for _ in range(2))
    # Where two smooth fields are both near zero lies a random curve: tube-like vessels.
    tube = np.clip(1.0 - np.sqrt(f1**2 + f2**2) / 0.35, 0.0, 1.0)
    box = (zs, slice(None), slice(None))
    for name, (cx, cy, rx, ry, dome_shift) in canvas.lungs.items():
        rx_s, ry_s = rx * taper + 1e-3, ry * np.minimum(taper * 1.2, 1.0) + 1e-3
        q = ((X - cx) / rx_s) ** 2 + ((Y - cy) / ry_s) ** 2
        # Domed base: lowest at the periphery and posteriorly (costophrenic recesses).
        base = canvas.s_dia + dome_shift + 0.05 * (1.0 - np.minimum(q, 1.0)) - 0.03 * (Y - cy) / ry
        mask = (q <= 1.0) & (s >= base) & cavity
        hu = -860.0 + 30.0 * np.clip((Y - cy) / ry, -1.0, 1.0) + 880.0 * tube  # dependent lung denser
        canvas.paint((box, mask), hu.astype(np.float32), name)


def _mediastinum(canvas: Canvas) -> None:
    chest_rx, chest_ry = canvas.chest_cavity_rx, canvas.chest_cavity_ry
    g, c = canvas.g, canvas.contrast
    zs = canvas.slab(canvas.s_dia, 1.0)
    if zs is not None:  # central band between the lungs
        half = chest_rx * np.interp(g.s[zs], [canvas.s_dia, canvas.s_dia + 0.2, 1.0], [0.2, 0.17, 0.12])
        canvas.paint(
            canvas.ellipses(zs, canvas.xc + 0.03 * chest_rx, canvas.yc, half, 1.05 * chest_ry),
            -60.0,
            "mediastinum",
            within=canvas.cavity,
        )
    paraspinal = canvas.slab(0.0, 1.0)
    for sign in (-1.0, 1.0):  # erector spinae: replace lung/fat behind the ribs' necks
        shape = canvas.ellipses(
            paraspinal, canvas.xc + sign * (canvas.r_v + 14.0), canvas.y_v + canvas.r_v + 18.0, 20.0, 22.0
        )
        canvas.paint(shape, 50.0, "muscle", within=canvas.inner_wall)
    above = (g.s >= canvas.s_dia)[:, None, None]
    heart = canvas.paint(
        g.ellipsoid(canvas.heart_c, canvas.heart_r), 45.0, "heart", within=canvas.cavity & above
    )
    if canvas.findings["cardiomegaly"]:
        canvas.mark(heart, "cardiomegaly")
    inner = tuple(0.72 * r for r in canvas.heart_r)
    canvas.paint(g.ellipsoid(canvas.heart_c, inner), 150.0 if c else 42.0, "heart", within=above)
    ao_hu = 180.0 if c else 40.0
    canvas.paint(
        canvas.ellipses(canvas.slab(0.2, canvas.s_arch), *canvas.desc_ao, canvas.r_ao, canvas.r_ao),
        ao_hu,
        "aorta",
    )
    r_asc = 1.1 * canvas.r_ao
    canvas.paint(
        canvas.ellipses(canvas.slab(canvas.s_dia + 0.1, canvas.s_arch), *canvas.asc_ao, r_asc, r_asc),
        ao_hu,
        "aorta",
    )
    arch = canvas.slab(canvas.s_arch - 0.015, canvas.s_arch + 0.02)
    for t in np.linspace(0.0, 1.0, 9):
        cx = (1 - t) * canvas.asc_ao[0] + t * canvas.desc_ao[0]
        cy = (1 - t) * canvas.asc_ao[1] + t * canvas.desc_ao[1]
        canvas.paint(canvas.ellipses(arch, cx, cy, canvas.r_ao, canvas.r_ao), ao_hu, "aorta")
    esophagus = canvas.slab(canvas.s_dia - 0.03, 1.0)
    canvas.paint(
        canvas.ellipses(esophagus, canvas.xc + 4.0, canvas.y_v - canvas.r_v - 7.0, 7.0, 6.0),
        40.0,
        "mediastinum",
    )


def _airways(canvas: Canvas) -> None:
    tx, ty = canvas.trachea_xy
    trachea = canvas.slab(canvas.s_car, 1.0)
    canvas.paint(canvas.ellipses(trachea, tx, ty, 11.0, 10.0), 40.0, "mediastinum")  # cartilage wall
    canvas.paint(canvas.ellipses(trachea, tx, ty, 9.0, 8.0), -1000.0, "airway")
    bronchi = canvas.slab(canvas.s_car - 0.06, canvas.s_car)
    if bronchi is not None:
        spread = (canvas.s_car - canvas.g.s[bronchi]) / 0.06 * 0.3 * canvas.chest_cavity_rx
        for sign in (-1.0, 1.0):
            canvas.paint(canvas.ellipses(bronchi, tx + sign * spread, ty + 4.0, 6.0, 6.0), -1000.0, "airway")


def _spine(canvas: Canvas) -> None:
    all_z, x, y, r = slice(0, canvas.shape[0]), canvas.xc, canvas.y_v, canvas.r_v
    _bone(canvas, all_z, x, y, r, 0.9 * r, "spine")
    # Intervertebral discs every ~28 mm give the spine a z rhythm.
    disc = canvas.ellipses(all_z, x, y, r - 2.5, 0.9 * r - 2.5)
    canvas.paint(disc, 90.0, "spine", within=((canvas.g.z % 28.0) < 6.0)[:, None, None])
    canal_y = y + 0.9 * r + 9.0
    canvas.paint(canvas.ellipses(all_z, x, canal_y, 11.0, 10.0), 450.0, "spine")  # neural arch
    canvas.paint(canvas.ellipses(all_z, x, canal_y + 20.0, 5.0, 12.0), 450.0, "spine")  # spinous process
    for sign in (-1.0, 1.0):
        canvas.paint(canvas.ellipses(all_z, x + sign * (r + 8.0), canal_y - 2.0, 10.0, 5.0), 450.0, "spine")
    canvas.paint(canvas.ellipses(all_z, x, canal_y, 7.0, 6.0), 15.0, "spine")  # CSF in the canal


def _ribs(canvas: Canvas) -> None:
    g, zs = canvas.g, canvas.slab(canvas.s_dia - 0.1, 0.97)
    if zs is None:
        return
    width = min(9.0, canvas.h.muscle_mm)
    rx, ry = canvas.cavity_rx[zs].astype(np.float32), canvas.cavity_ry[zs].astype(np.float32)
    (_, ys, xs), outer = canvas.ellipses(zs, canvas.xc, canvas.yc, rx + width, ry + width)
    X, Y = g.x[None, None, xs] - canvas.xc, g.y[None, ys, None] - canvas.yc
    inner = (X / (rx[:, None, None] + 0.5)) ** 2 + (Y / (ry[:, None, None] + 0.5)) ** 2 <= 1.0
    k, i, j = np.nonzero(outer & ~inner)  # the chest-wall ring the ribs live in
    X, Y = X[0, 0, j], Y[0, i, 0]
    # Ribs slope caudally towards the front, so their cross-sections move round with z.
    phase = (2.0 * np.pi / 30.0) * g.z[zs]
    keep = (_cos_7theta_plus(Y / ry[k], np.abs(X) / rx[k], phase[k]) > 0.6) & (np.abs(X) > canvas.r_v + 14.0)
    keep &= (np.abs(X) > 28.0) | (Y > 0)  # costal cartilage gap beside the sternum
    rib = np.zeros_like(outer)
    rib[k[keep], i[keep], j[keep]] = True
    canvas.paint(((zs, ys, xs), rib), 550.0, "ribs")
    sternum = canvas.slab(canvas.s_dia + 0.02, 0.95)
    if sternum is not None:
        y_st = canvas.yc - canvas.cavity_ry[sternum] - 0.5 * canvas.h.muscle_mm
        canvas.paint(canvas.ellipses(sternum, canvas.xc, y_st, 15.0, 5.0), 450.0, "ribs")
