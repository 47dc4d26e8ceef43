"""What a phantom comes out as: the label vocabularies and the records of a patient, a lesion and a scan.

Every array is in the canonical orientation of slicefm.io.volume: ``[z, y, x]`` with slice 0 at the
feet end, row 0 anterior and column 0 on the patient's right.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# DeepLesion coarse lesion types 1..8, in the published order.
LESION_TYPES = ("bone", "abdomen", "mediastinum", "liver", "lung", "kidney", "soft_tissue", "pelvis")
# The eight RadChest-style chest abnormalities CLEAR's Task 2 predicts.
CHEST_FINDINGS = (
    "nodule",
    "emphysema",
    "pleural_effusion",
    "opacity",
    "calcification",
    "atelectasis",
    "cardiomegaly",
    "lymphadenopathy",
)
# Further phantom features, so more of CT-RATE's 18 classes carry image signal.
EXTRA_FINDINGS = (
    "coronary_calcification",
    "arterial_calcification",
    "pericardial_effusion",
    "consolidation",
    "medical_material",
    "hiatal_hernia",
)
# Values of PhantomScan.finding_mask (0 = none); calcification subtypes share "calcification".
FINDING_MASK_CLASSES = ("none", *CHEST_FINDINGS, *EXTRA_FINDINGS[2:])
ORGAN_CLASSES = (
    "background",
    "body_fat",
    "muscle",
    "lung_left",
    "lung_right",
    "airway",
    "spine",
    "ribs",
    "liver",
    "kidney_left",
    "kidney_right",
    "bladder",
    "heart",
    "aorta",
    "spleen",
    "bowel",
    "mediastinum",
    "pelvic_bone",
    "skin",
)
ORGAN_INDEX = {name: i for i, name in enumerate(ORGAN_CLASSES)}
FINDING_INDEX = {name: i for i, name in enumerate(FINDING_MASK_CLASSES)}


@dataclass(frozen=True)
class PatientInfo:
    """Patient-level attributes shared by all scans of one (fake) patient."""

    patient_id: str
    patient_name: str
    sex: str  # "M" | "F"
    age: int
    stage: int  # 0 = stage I-II, 1 = stage III-IV
    habitus_seed: int  # seeds body size and organ sizes, shared across the patient's scans


@dataclass
class PhantomLesion:
    """One DeepLesion-style lesion; voxel indices and boxes are in the canonical frame."""

    lesion_type: str
    type_index: int  # 1..8, DeepLesion's Coarse_lesion_type
    centre_zyx: tuple[int, int, int]
    radius_mm: float
    contrast_hu: float  # lesion HU minus its host tissue's reference HU
    key_slice: int  # canonical z index of the lesion centre
    box_xyxy: tuple[int, int, int, int]  # inclusive pixel indices (x0, y0, x1, y1) on key_slice


@dataclass
class PhantomScan:
    """One phantom CT with its ground truth."""

    hu: np.ndarray  # int16 [z, y, x], canonical orientation
    spacing_mm: tuple[float, float, float]  # (z, y, x)
    organ_mask: np.ndarray  # uint8 [z, y, x], indices into ORGAN_CLASSES
    lesion_mask: np.ndarray  # uint8 [z, y, x], 0 or lesion number 1..n
    finding_mask: np.ndarray  # uint8 [z, y, x], indices into FINDING_MASK_CLASSES
    lesions: list[PhantomLesion]
    findings: dict[str, int]  # over CHEST_FINDINGS
    extra_findings: dict[str, int]  # over EXTRA_FINDINGS
    stage: int
    patient_id: str
    patient_name: str
    sex: str
    age: int
    study_index: int = 1  # 1-based index of this scan among the patient's scans
    region: str = "chest_abdomen"
    profile: str = "default"
    contrast: bool = True  # intravenous contrast phase
    origin_lps: tuple[float, float, float] = (0.0, 0.0, 0.0)  # centre of voxel [0, 0, 0], LPS mm
    acquisition: dict[str, float] = field(default_factory=dict)  # fov_mm, anatomy_scale

    @property
    def location_labels(self) -> dict[str, int]:
        """1 for every DeepLesion location with at least one lesion."""
        present = {lesion.lesion_type for lesion in self.lesions}
        return {t: int(t in present) for t in LESION_TYPES}
