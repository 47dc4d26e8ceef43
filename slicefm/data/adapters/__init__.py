"""Dataset adapters: one per published layout, all returning an AdapterResult."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from slicefm.data.adapters.base import AdapterResult

FORMAT_NAMES = ("dicom", "nifti", "deeplesion", "ctrate", "radchest", "nsclc")


def detect_format(source: Path) -> str:
    """Guess the layout from marker files; plain DICOM is the fallback."""
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
        return "nifti"
    return "dicom"


def get_adapter(fmt: str) -> Callable[[Path, str | None], AdapterResult]:
    """The discover() function of one layout."""
    from slicefm.data.adapters import ctrate, deeplesion, dicom_tree, nifti_dir, nsclc, radchest

    adapters = {
        "dicom": dicom_tree.discover,
        "nifti": nifti_dir.discover,
        "deeplesion": deeplesion.discover,
        "ctrate": ctrate.discover,
        "radchest": radchest.discover,
        "nsclc": nsclc.discover,
    }
    if fmt not in adapters:
        raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(adapters)} or 'auto'")
    return adapters[fmt]
