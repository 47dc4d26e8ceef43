"""Ground-truth masks: organ, lesion and finding labels per scan as npz, with the class lists as JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from slicefm.phantom.records import FINDING_MASK_CLASSES, ORGAN_CLASSES, PhantomScan
from slicefm.phantom.writers.files import npz_bytes, write_bytes


def write_masks(scans: Sequence[PhantomScan], root: Path, refs: Sequence[str] | None = None) -> Path:
    """``root/masks/<ref>.npz`` (keys organ, lesion, finding; uint8, canonical [z, y, x]) per scan.

    `refs` name the scans as the layout's adapter does (SeriesInstanceUID, file stem ...; default
    scan_0001 ...). ``root/masks/organ_classes.json`` lists ORGAN_CLASSES (index =
    mask value) and ``finding_classes.json`` FINDING_MASK_CLASSES; lesion masks hold lesion numbers
    in the order of PhantomScan.lesions.
    """
    masks = Path(root) / "masks"
    refs = list(refs) if refs is not None else [f"scan_{i + 1:04d}" for i in range(len(scans))]
    if len(refs) != len(scans) or len(set(refs)) != len(refs):
        raise ValueError("refs must name every scan once")
    for scan, ref in zip(scans, refs, strict=True):
        arrays = {"organ": scan.organ_mask, "lesion": scan.lesion_mask, "finding": scan.finding_mask}
        write_bytes(masks / f"{ref}.npz", npz_bytes(arrays))
    write_bytes(masks / "organ_classes.json", json.dumps(list(ORGAN_CLASSES), indent=1).encode())
    write_bytes(masks / "finding_classes.json", json.dumps(list(FINDING_MASK_CLASSES), indent=1).encode())
    return masks
