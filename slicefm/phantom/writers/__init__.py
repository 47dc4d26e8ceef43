"""Write phantom scans as real files, in the layouts the public CT cohorts publish.

Formats: DICOM series (dicom), NIfTI (nifti), DeepLesion 16-bit PNG, RAD-ChestCT npz. Layouts: plain
DICOM tree and NIfTI folder with label CSVs (plain), DeepLesion (deeplesion), CT-RATE (ctrate),
RAD-ChestCT (radchest), NSCLC-Radiomics from TCIA (nsclc), and the ground-truth masks (masks). The same
adapter code must work on these files and on the real data.

Writes are atomic (files: temporary file or directory beside the target, then a rename) and the bytes
are deterministic for a seed: UIDs come from ``generate_uid(entropy_srcs=...)`` over seeded strings,
names from seeded hashes, and no timestamp is written anywhere (gzip mtime 0, zip dates 1980).
slicefm.phantom.dataset writes a whole dataset in one call.
"""
