"""Dataset adapters: one per published layout, all returning an AdapterResult."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from slicefm.data.adapters.base import AdapterResult

FORMAT_NAMES = ("dicom", "nifti", "deeplesion", "ctrate", "radchest", "nsclc")
MIXED_FORMAT = "dicom+nifti"  # a plain tree holding both: auto-detected only, see adapters/mixed.py


def detect_format(source: Path) -> str:
    """Guess the layout from marker files; plain DICOM is the fallback.

    A plain tree with NIfTI volumes and DICOM files both is "dicom+nifti", so that neither reader
    quarantines the other's files.
    """
    source = Path(source)
    if (source / "DL_info.csv").exists():
        return "deeplesion"
    if (source / "dataset" / "metadata").is_dir():
        return "ctrate"
    if (source / "NSCLC-Radiomics").is_dir() or any(source.glob("NSCLC-Radiomics-Lung1*.csv")):
        return "nsclc"
    if any(source.glob("*.npz")) and any(source.glob("*_labels.csv")):
        return "radchest"
    if any(source.rglob("*.nii")) or any(source.rglob("*.nii.gz")):
        return MIXED_FORMAT if _has_dicom_files(source) else "nifti"
    return "dicom"


def _has_dicom_files(source: Path) -> bool:
    """Whether any file beside the NIfTI volumes and label sidecars looks like DICOM (stops at the first)."""
    from slicefm.data.adapters.nifti_dir import is_nifti
    from slicefm.data.adapters.sidecar import is_sidecar
    from slicefm.io.dicom import looks_like_dicom

    return any(
        looks_like_dicom(p)
        for p in source.rglob("*")
        if p.is_file() and not is_nifti(p) and not is_sidecar(p, source)
    )


def get_adapter(fmt: str) -> Callable[[Path, str | None], AdapterResult]:
    """The discover() function of one layout."""
    from slicefm.data.adapters import ctrate, deeplesion, dicom_tree, mixed, nifti_dir, nsclc, radchest

    adapters = {
        "dicom": dicom_tree.discover,
        "nifti": nifti_dir.discover,
        "deeplesion": deeplesion.discover,
        "ctrate": ctrate.discover,
        "radchest": radchest.discover,
        "nsclc": nsclc.discover,
        MIXED_FORMAT: mixed.discover,
    }
    if fmt not in adapters:
        raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(adapters)} or 'auto'")
    return adapters[fmt]
