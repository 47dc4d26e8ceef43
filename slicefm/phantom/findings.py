"""Chest findings: which are present (drawn per scan, some depending on stage) and how each is painted.

CHEST_FINDINGS (CLEAR's eight chest abnormalities) and EXTRA_FINDINGS (more CT-RATE classes) are drawn by
sample_findings and painted by paint_findings over the anatomy, marking PhantomScan.finding_mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from slicefm.phantom import portable_math
from slicefm.phantom.canvas import Canvas
from slicefm.phantom.records import CHEST_FINDINGS, EXTRA_FINDINGS, FINDING_INDEX, ORGAN_INDEX

_FINDING_PROBABILITY = 0.3
_EXTRA_PROBABILITY = 0.15


def sample_findings(
    rng: np.random.Generator, stage: int, forced: Sequence[str] | None = None
) -> tuple[dict[str, int], dict[str, int]]:
    """Independent findings (p ~ 0.3); nodes and effusion depend on stage (marginal p stays ~0.3).

    `forced` (names from CHEST_FINDINGS and EXTRA_FINDINGS) replaces the draw: exactly those are present.
    """
    p = dict.fromkeys(CHEST_FINDINGS, _FINDING_PROBABILITY)
    p["lymphadenopathy"] = 0.45 if stage else 0.15
    p["pleural_effusion"] = 0.4 if stage else 0.2
    drawn = {name: int(rng.random() < p[name]) for name in CHEST_FINDINGS}
    drawn |= {name: int(rng.random() < _EXTRA_PROBABILITY) for name in EXTRA_FINDINGS[2:]}
    coronary, arterial = int(rng.random() < 0.6), int(rng.random() < 0.6)
    if forced is not None:
        unknown = set(forced) - set(CHEST_FINDINGS) - set(EXTRA_FINDINGS)
        if unknown:
            raise ValueError(f"unknown findings {sorted(unknown)}")
        drawn = {name: int(name in forced) for name in drawn}
        coronary, arterial = int("coronary_calcification" in forced), int("arterial_calcification" in forced)
        drawn["calcification"] |= coronary | arterial
    if not drawn["calcification"]:
        coronary = arterial = 0
    elif not (coronary or arterial):
        coronary = arterial = 1
    findings = {name: drawn[name] for name in CHEST_FINDINGS}
    extra = {"coronary_calcification": coronary, "arterial_calcification": arterial}
    return findings, extra | {name: drawn[name] for name in EXTRA_FINDINGS[2:]}


def paint_findings(canvas: Canvas) -> None:
    """Paint the findings drawn for this scan (canvas.findings, canvas.extra) over the anatomy.

    The order is fixed: each painter draws from the scan's random stream.
    """
    f, e = canvas.findings, canvas.extra
    steps = (
        (f["emphysema"], _emphysema),
        (f["opacity"], _opacity),
        (e["consolidation"], _consolidation),
        (f["pleural_effusion"], _effusion),
        (f["atelectasis"], _atelectasis),
        (f["nodule"], _nodules),
        (f["lymphadenopathy"], _lymph_nodes),
        (e["pericardial_effusion"], _pericardial_effusion),
        (e["hiatal_hernia"], _hiatal_hernia),
        (f["calcification"], _calcifications),
        (e["medical_material"], _medical_material),
    )
    for present, painter in steps:
        if present:
            painter(canvas)


def _emphysema(canvas: Canvas) -> None:
    upper = np.clip(canvas.g.s - canvas.s_dia, 0.0, None)  # centrilobular emphysema favours upper lobes
    for _ in range(int(canvas.rng.integers(3, 8))):
        lungs = canvas.free("lung_left", "lung_right")
        v = canvas.random_voxel(lungs, z_weight=upper)
        if v is not None:
            r = float(canvas.rng.uniform(10.0, 22.0))
            canvas.blob(v, (r, r, r), -965.0, lungs, "emphysema")


def _opacity(canvas: Canvas) -> None:
    for _ in range(int(canvas.rng.integers(1, 3))):
        lungs = canvas.free("lung_left", "lung_right")
        v = canvas.random_voxel(lungs)
        found = (
            None if v is None else canvas.g.ellipsoid(canvas.centre_mm(v), canvas.rng.uniform(15.0, 32.0, 3))
        )
        if found is not None:
            where, mask = found
            mask &= lungs[where]
            # Ground glass raises the parenchyma to ~-500 HU but leaves the denser vessels visible.
            canvas.hu[where][mask] = np.maximum(canvas.hu[where][mask], -500.0)
            canvas.mark((where, mask), "opacity")


def _consolidation(canvas: Canvas) -> None:
    lungs = canvas.free("lung_left", "lung_right")
    v = canvas.random_voxel(lungs)
    if v is not None:
        canvas.blob(v, canvas.rng.uniform(15.0, 30.0, 3), 35.0, lungs, "consolidation")


def _effusion(canvas: Canvas) -> None:
    sides = (
        list(canvas.lungs)
        if canvas.rng.random() < 0.5
        else [("lung_right", "lung_left")[int(canvas.rng.integers(2))]]
    )
    for side in sides:
        lung = canvas.free(side)
        present = np.flatnonzero(lung.any(axis=(1, 2)))
        if present.size == 0:
            continue
        _, cy, _, ry, _ = canvas.lungs[side]
        depth, height = canvas.rng.uniform(0.3, 0.6), 0.25 * canvas.g.length_mm
        t = np.clip((canvas.g.z - canvas.g.z[present[0]]) / height, 0.0, 1.0)[:, None, None]
        # Free fluid layers in the dependent (posterior) pleural space, thinning upwards.
        mask = lung & (canvas.g.y[None, :, None] >= cy + ry * (1.0 - 2.0 * depth * (1.0 - t)))
        canvas.hu[mask] = 10.0
        canvas.finding[mask] = FINDING_INDEX["pleural_effusion"]


def _atelectasis(canvas: Canvas) -> None:
    side = ("lung_right", "lung_left")[int(canvas.rng.integers(2))]
    lung = canvas.free(side)
    present = np.flatnonzero(lung.any(axis=(1, 2)))
    if present.size == 0:
        return
    _, cy, rx, ry, _ = canvas.lungs[side]
    top = present[0] + max(1, (present[-1] - present[0]) // 6)
    base = lung & (np.arange(canvas.shape[0]) <= top)[:, None, None] & (canvas.g.y[None, :, None] > cy)
    v = canvas.random_voxel(base if base.any() else lung)
    canvas.blob(v, (float(canvas.rng.uniform(6.0, 10.0)), 0.25 * ry, 0.5 * rx), 30.0, lung, "atelectasis")


def _nodules(canvas: Canvas) -> None:
    for _ in range(int(canvas.rng.integers(1, 4))):
        lungs = canvas.free("lung_left", "lung_right")
        v = canvas.random_voxel(lungs)
        if v is not None:
            r = float(canvas.rng.uniform(2.0, 5.0))
            canvas.blob(v, (r, r, r), float(canvas.rng.uniform(10.0, 60.0)), lungs, "nodule")


def _lymph_nodes(canvas: Canvas) -> None:
    tx, ty, z = *canvas.trachea_xy, canvas.g.z_of
    stations = [
        (z(canvas.s_car + 0.04), ty, tx - 16.0),  # right paratracheal
        (z(canvas.s_car - 0.04), ty + 6.0, tx + 2.0),  # subcarinal
        (z(canvas.s_car - 0.03), canvas.yc, canvas.xc - 0.3 * canvas.chest_cavity_rx),  # right hilum
        (z(canvas.s_car - 0.03), canvas.yc, canvas.xc + 0.3 * canvas.chest_cavity_rx),  # left hilum
        (z(canvas.s_car + 0.015), ty - 12.0, tx + 24.0),  # aortopulmonary window
    ]
    host = canvas.free("mediastinum", "lung_left", "lung_right")
    for i in canvas.rng.choice(len(stations), size=int(canvas.rng.integers(1, 4)), replace=False):
        r = float(canvas.rng.uniform(7.5, 12.5))
        centre = np.asarray(stations[i]) + canvas.rng.normal(0.0, 3.0, 3)
        shape = canvas.paint(
            canvas.g.ellipsoid(centre, (r, r, r)),
            float(canvas.rng.uniform(35.0, 55.0)),
            "mediastinum",
            within=host,
        )
        canvas.mark(shape, "lymphadenopathy")


def _pericardial_effusion(canvas: Canvas) -> None:
    above = (canvas.g.s >= canvas.s_dia)[:, None, None]
    host = canvas.free("mediastinum", "lung_left", "lung_right") & above
    shape = canvas.paint(
        canvas.g.ellipsoid(canvas.heart_c, tuple(1.15 * r for r in canvas.heart_r)),
        12.0,
        "mediastinum",
        within=host,
    )
    canvas.mark(shape, "pericardial_effusion")


def _hiatal_hernia(canvas: Canvas) -> None:
    r = float(canvas.rng.uniform(16.0, 24.0))
    centre = (canvas.g.z_of(canvas.s_dia + 0.03), canvas.y_v - canvas.r_v - 14.0, canvas.xc + 8.0)
    found = canvas.g.ellipsoid(centre, (r, r, r))
    if found is None:
        return
    where, mask = found
    mask &= ~np.isin(canvas.organ[where], [ORGAN_INDEX[n] for n in ("spine", "aorta", "ribs", "airway")])
    # Herniated stomach: gas above an air-fluid level.
    gas = (canvas.g.z[where[0]] > centre[0])[:, None, None]
    hu = np.where(gas, np.float32(-950.0), np.float32(20.0)) * np.ones(mask.shape, np.float32)
    canvas.mark(canvas.paint((where, mask), hu, "bowel"), "hiatal_hernia")


def _speck(canvas: Canvas, centre_mm: Sequence[float]) -> None:
    """A calcified speck (~400-800 HU); always at least the voxel nearest to `centre_mm`."""
    hu, r = float(canvas.rng.uniform(400.0, 800.0)), float(canvas.rng.uniform(1.5, 3.0))
    canvas.mark(canvas.paint(canvas.g.ellipsoid(centre_mm, (r, r, r)), hu), "calcification")
    idx = canvas.nearest_voxel(centre_mm)
    if idx is not None:
        canvas.hu[idx], canvas.finding[idx] = hu, FINDING_INDEX["calcification"]


def _calcifications(canvas: Canvas) -> None:
    if canvas.extra["coronary_calcification"]:
        for _ in range(int(canvas.rng.integers(2, 6))):
            # Coronary arteries run on the heart's anterior and left surface.
            theta, phi = canvas.rng.uniform(0.2, 1.3) * np.pi, canvas.rng.uniform(-0.4, 0.4)
            direction = np.array(
                [portable_math.sin(phi), -portable_math.sin(theta), portable_math.cos(theta)]
            )
            _speck(canvas, np.asarray(canvas.heart_c) + 0.95 * np.asarray(canvas.heart_r) * direction)
    zs = canvas.slab(0.25, canvas.s_arch)
    if canvas.extra["arterial_calcification"] and zs is not None:
        for _ in range(int(canvas.rng.integers(2, 6))):
            z = float(canvas.g.z[int(canvas.rng.integers(zs.start, zs.stop))])
            a = canvas.rng.uniform(0.0, 2 * np.pi)
            _speck(
                canvas,
                (
                    z,
                    canvas.desc_ao[1] + canvas.r_ao * float(portable_math.sin(a)),
                    canvas.desc_ao[0] + canvas.r_ao * float(portable_math.cos(a)),
                ),
            )


def _medical_material(canvas: Canvas) -> None:
    """A chest port in the right anterior wall, its catheter running to the superior vena cava."""
    y_port = canvas.yc - float(canvas.body_ry.max()) + 0.5 * canvas.wall
    port = np.array([canvas.g.z_of(canvas.s_car + 0.04), y_port, canvas.xc - 0.45 * canvas.h.half_width])
    x_svc = canvas.xc - 0.1 * canvas.chest_cavity_rx
    svc = np.array([canvas.g.z_of(canvas.s_car - 0.02), canvas.asc_ao[1], x_svc])
    for t in np.linspace(0.0, 1.0, 60):
        idx = canvas.nearest_voxel((1 - t) * port + t * svc)
        if idx is not None:
            canvas.hu[idx], canvas.finding[idx] = 1800.0, FINDING_INDEX["medical_material"]
    canvas.mark(canvas.paint(canvas.g.ellipsoid(port, (10.0, 6.0, 9.0)), 2500.0), "medical_material")
