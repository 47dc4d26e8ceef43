"""The RAD-ChestCT layout: one npz of int16 HU per scan (0.8 mm isotropic) and a labels CSV."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from slicefm.phantom.records import CHEST_FINDINGS, PhantomScan
from slicefm.phantom.writers.files import npz_bytes, write_bytes, write_csv

logger = logging.getLogger(__name__)


RADCHEST_SPACING_MM = 0.8  # RAD-ChestCT volumes are resampled to 0.8 mm isotropic (no spacing file)


def radchest_names(scans: Sequence[PhantomScan], split: str) -> list[str]:
    return [f"{split}{i + 1:05d}" for i in range(len(scans))]


def write_radchest(scans: Sequence[PhantomScan], root: Path, split: str = "trn") -> Path:
    """RAD-ChestCT layout: ``root/{split}{n:05d}.npz`` (key 'ct': int16 HU, canonical [z, y, x]).

    The real release has no spacing file: its volumes are resampled to 0.8 mm isotropic, so make
    these phantoms with ``spacing_mm=(0.8, 0.8, 0.8)`` (generate_dataset does). Labels:
    ``root/{split}_labels.csv`` (a summary of imgtrn_Abnormality_and_Location_Labels.csv) with
    NoteAcc_DEID (e.g. trn00001) and one 0/1 column per CHEST_FINDINGS abnormality.
    """
    root = Path(root)
    names = radchest_names(scans, split)
    rows = []
    for scan, name in zip(scans, names, strict=True):
        if not np.allclose(scan.spacing_mm, RADCHEST_SPACING_MM):
            logger.warning(
                "RAD-ChestCT %s: spacing %s is not the assumed 0.8 mm isotropic", name, scan.spacing_mm
            )
        write_bytes(root / f"{name}.npz", npz_bytes({"ct": scan.hu.astype(np.int16)}))
        rows.append([name, *(scan.findings[f] for f in CHEST_FINDINGS)])
    write_csv(root / f"{split}_labels.csv", ["NoteAcc_DEID", *CHEST_FINDINGS], rows)
    return root
