"""The in-memory CT volume every reader returns, in one canonical orientation."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Canonical orientation (every reader returns this, whatever the source):
#   hu[z, y, x] with
#   axis 0 (z): inferior -> superior  (slice 0 is the feet end; z_mm increases with the index)
#   axis 1 (y): anterior -> posterior (image row 0 is the patient's front)
#   axis 2 (x): patient right -> patient left (radiological display: patient right on image left)
# In DICOM LPS terms the array axes (x, y, z) point to +L, +P, +S ("LPS" axcodes for (i, j, k)).
CANONICAL_AXCODES = ("L", "P", "S")


class InvalidScanError(ValueError):
    """A scan that cannot be used; `path` names the file or series, `reason` says why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass
class Volume:
    """A CT volume in Hounsfield units, canonical orientation (see CANONICAL_AXCODES)."""

    hu: np.ndarray  # float32 [z, y, x]
    spacing_mm: tuple[float, float, float]  # (z, y, x) voxel spacing
    source: str  # file or series directory the volume was read from (relative where possible)
    fmt: str  # "dicom" | "nifti" | "deeplesion" | "npz"
    # Identifiers straight from the source (PatientID, StudyInstanceUID, SeriesInstanceUID ...).
    # These are PHI: ingestion pseudonymises them and must never write them anywhere.
    identifiers: dict[str, str] = field(default_factory=dict)
    # Non-identifying acquisition info (Manufacturer, ConvolutionKernel, KVP, SliceThickness ...).
    info: dict[str, str | float] = field(default_factory=dict)
    # z position (mm) of every slice along the slice normal, ascending; len == hu.shape[0].
    z_mm: np.ndarray | None = None
    # Gantry tilt (deg, >= 0) measured from DICOM slice positions; left unresampled. 0.0 otherwise.
    tilt_deg: float = 0.0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)  # type: ignore[return-value]

    def z_positions_mm(self) -> np.ndarray:
        """Slice positions along z; derived from spacing when the source has none."""
        if self.z_mm is not None:
            return np.asarray(self.z_mm, dtype=np.float64)
        return np.arange(self.hu.shape[0], dtype=np.float64) * float(self.spacing_mm[0])
