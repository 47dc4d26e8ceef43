"""Fake patients: identifiers, sex, age and stage, and the body habitus their scans share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slicefm.phantom.records import PatientInfo


def sample_patient(rng: np.random.Generator, patient_id: str | None = None) -> PatientInfo:
    """A fake patient: identifiers that look like PHI (for pseudonymisation tests), sex, age, stage."""
    letters = "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), size=6))
    if patient_id is None:
        patient_id = f"PHA{int(rng.integers(1_000_000, 10_000_000)):07d}"
    return PatientInfo(
        patient_id=patient_id,
        patient_name=f"PHANTOM^{letters}",
        sex=str(rng.choice(["M", "F"])),
        age=int(rng.integers(35, 86)),
        stage=int(rng.random() < 0.5),
        habitus_seed=int(rng.integers(0, 2**31 - 1)),
    )


@dataclass(frozen=True)
class Habitus:
    """Body shape in anatomical mm at scale 1 (sampled once per patient)."""

    half_width: float  # lateral semi-axis of the body outline (mm)
    depth_ratio: float  # antero-posterior / lateral semi-axis
    fat_mm: float
    muscle_mm: float
    belly: float  # abdominal bulge (fraction of the antero-posterior semi-axis)
    s_dia: float  # diaphragm level on the body axis
    organ_scale: float
    bladder_fill: float

    @classmethod
    def sample(cls, seed: int, sex: str) -> Habitus:
        """The habitus of a patient from its `habitus_seed`: the same seed gives the same body."""
        rng = np.random.default_rng(seed)
        male = sex == "M"
        return cls(
            half_width=float(rng.uniform(150.0, 185.0) if male else rng.uniform(138.0, 172.0)),
            depth_ratio=float(rng.uniform(0.6, 0.72)),
            fat_mm=float(rng.uniform(6.0, 26.0)),
            muscle_mm=float(rng.uniform(7.0, 14.0)),
            belly=float(rng.uniform(0.0, 0.15)),
            s_dia=float(rng.uniform(0.56, 0.62)),
            organ_scale=float(rng.uniform(0.9, 1.1)),
            bladder_fill=float(rng.uniform(0.7, 1.25)),
        )
