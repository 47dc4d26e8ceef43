"""The TCIA NSCLC-Radiomics layout: DICOM series in TCIA's folder names and the clinical CSV."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from slicefm.phantom.records import PhantomScan
from slicefm.phantom.writers.dicom import series_uid, write_dicom_series
from slicefm.phantom.writers.files import token, write_csv
from slicefm.phantom.writers.splits import patient_numbers

NSCLC_CLINICAL_CSV = "NSCLC-Radiomics-Lung1.clinical-version3-Oct-2019.csv"


def _nsclc_series(scans: Sequence[PhantomScan], seed: int) -> list[tuple[str, str]]:
    """(series directory, StudyDate) per scan; directories as TCIA names them:
    ``NSCLC-Radiomics/LUNG1-nnn/<MM-DD-YYYY>-StudyID-<nnnnn>/<k>.000000-NA-<nnnnn>``."""
    patient, study = patient_numbers(scans)
    out = []
    for scan, p, s in zip(scans, patient, study, strict=True):
        h = int(token(seed, scan.patient_id, s)[:12], 16)
        day = date(2008, 1, 1) + timedelta(days=h % 2500)
        study_dir = f"{day.strftime('%m-%d-%Y')}-StudyID-{h % 100000:05d}"
        out.append(
            (
                f"NSCLC-Radiomics/LUNG1-{p:03d}/{study_dir}/{s}.000000-NA-{(h // 7) % 100000:05d}",
                day.strftime("%Y%m%d"),
            )
        )
    return out


def _clinical_stage(scan: PhantomScan, rng: np.random.Generator) -> tuple[int, int, int, str]:
    """(T, N, M, Overall.Stage) consistent with scan.stage and the tumour's size (AJCC 7th)."""
    diameters = [2.0 * lesion.radius_mm for lesion in scan.lesions if lesion.lesion_type == "lung"]
    size = max(diameters, default=20.0)
    t = 1 if size <= 30.0 else 2 if size <= 50.0 else 3
    if scan.stage == 0:
        n = 0 if (t == 3 or rng.random() < 0.5) else 1
        overall = "I" if (n == 0 and t <= 2) else "II"
    else:
        n = 2 if rng.random() < 0.6 else 3
        overall = "IIIa" if n == 2 else "IIIb"
    return t, n, 0, overall


def write_nsclc(scans: Sequence[PhantomScan], root: Path, *, seed: int = 0) -> Path:
    """TCIA NSCLC-Radiomics layout: ``root/NSCLC-Radiomics/LUNG1-{n:03d}/{study}/{series}/1-{k:03d}.dcm``.

    DICOM via write_dicom_series (PatientID LUNG1-nnn, files named by InstanceNumber as TCIA
    does), and ``root/NSCLC-Radiomics-Lung1.clinical-version3-Oct-2019.csv`` with PatientID, age,
    clinical.T.Stage, Clinical.N.Stage, Clinical.M.Stage, Overall.Stage (I, II, IIIa, IIIb; stage
    I-II <=> scan.stage 0), Histology, gender, Survival.time (days), deadstatus.event. One clinical
    row per patient, from the patient's first scan (the collection has one planning CT each).
    """
    write_nsclc_refs(scans, root, seed)
    return Path(root)


def write_nsclc_refs(scans: Sequence[PhantomScan], root: Path, seed: int) -> list[str]:
    """write_nsclc; returns the SeriesInstanceUID of every scan."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    patient, _ = patient_numbers(scans)
    rows, written, uids = [], set(), []
    for scan, (series_dir, study_date), p in zip(scans, _nsclc_series(scans, seed), patient, strict=True):
        pid = f"LUNG1-{p:03d}"
        paths = write_dicom_series(
            scan, root / series_dir, rng, naming="instance", patient_id=pid, study_date=study_date
        )
        uids.append(series_uid(paths[0]))
        if p in written:
            continue
        written.add(p)
        t, n, m, overall = _clinical_stage(scan, rng)
        histology = str(rng.choice(["adenocarcinoma", "squamous cell carcinoma", "large cell", "nos"]))
        survival = int(rng.exponential(700.0 if scan.stage else 1500.0)) + 30
        dead = int(rng.random() < (0.8 if scan.stage else 0.55))
        gender = "male" if scan.sex == "M" else "female"
        rows.append([pid, scan.age, t, n, m, overall, histology, gender, survival, dead])
    header = ["PatientID", "age", "clinical.T.Stage", "Clinical.N.Stage", "Clinical.M.Stage", "Overall.Stage"]
    header += ["Histology", "gender", "Survival.time", "deadstatus.event"]
    write_csv(root / NSCLC_CLINICAL_CSV, header, rows)
    return uids
