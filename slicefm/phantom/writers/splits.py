"""Patient numbering and patient-level splits, shared by the layouts that number patients or split them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from slicefm.phantom.records import PhantomScan


def patient_numbers(scans: Sequence[PhantomScan]) -> tuple[list[int], list[int]]:
    """(1-based patient number, 1-based study number within the patient) per scan, by first appearance."""
    numbers: dict[str, int] = {}
    seen: dict[str, int] = {}
    patient, study = [], []
    for scan in scans:
        numbers.setdefault(scan.patient_id, len(numbers) + 1)
        seen[scan.patient_id] = seen.get(scan.patient_id, 0) + 1
        patient.append(numbers[scan.patient_id])
        study.append(seen[scan.patient_id])
    return patient, study


def patient_splits(scans: Sequence[PhantomScan], fractions: Sequence[float]) -> list[int]:
    """Split index per scan (0, 1, ...), cut by patient in order of first appearance.

    Every split gets at least one patient when there are enough patients.
    """
    patient, _ = patient_numbers(scans)
    n = max(patient, default=0)
    edges = np.round(np.cumsum(fractions) / np.sum(fractions) * n).astype(int)
    if n >= len(fractions):  # keep every split non-empty
        for i in range(len(edges) - 1):
            edges[i] = min(max(edges[i], (edges[i - 1] if i else 0) + 1), n - (len(edges) - 1 - i))
    return [int(np.searchsorted(edges, p - 1, side="right")) for p in patient]
