"""A folder of NIfTI volumes (.nii / .nii.gz), one scan per file; ref = path relative to the root."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from slicefm.data.adapters.base import AdapterResult, ScanCandidate, files_size, rel
from slicefm.data.adapters.masks import mask_for
from slicefm.data.adapters.sidecar import Sidecars, is_sidecar, read_sidecars
from slicefm.io.nifti import read_nifti


def nifti_stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else path.stem


def is_nifti(path: Path) -> bool:
    return path.name.endswith(".nii") or path.name.endswith(".nii.gz")


def nifti_files(source: Path) -> list[Path]:
    """Every .nii / .nii.gz file under the source, sorted."""
    return sorted(p for p in source.rglob("*") if p.is_file() and is_nifti(p))


def file_candidates(source: Path, files: list[Path], side: Sidecars) -> tuple[list[ScanCandidate], set[str]]:
    """One candidate per NIfTI file with its labels, lesions and mask; also the label keys that matched."""
    cands, used = [], set()
    for path in files:
        stem = nifti_stem(path)
        cand = ScanCandidate(
            ref=rel(path, source), source=rel(path, source), load=partial(read_nifti, path), patient_ref=stem,
            size_bytes=files_size(path),
        )
        cand.labels, cand.lesions, key = side.lookup(stem, stem)
        cand.mask_file = mask_for(source, stem)
        cand.patient_ref = side.patients.get(stem, stem)
        if key is not None:
            used.add(key)
        cands.append(cand)
    return cands, used


def discover(source: Path, cohort: str | None = None) -> AdapterResult:
    side = read_sidecars(source)
    files = nifti_files(source)
    rejected = [
        (rel(p, source), "not a NIfTI file (.nii/.nii.gz expected)")
        for p in sorted(source.rglob("*"))
        if p.is_file() and not is_nifti(p) and not is_sidecar(p, source) and not p.name.startswith(".")
    ]
    cands, used = file_candidates(source, files, side)
    rejected += side.rejected + side.unmatched(used)
    return AdapterResult(cohort or source.name, "nifti", cands, rejected, side.label_names)
