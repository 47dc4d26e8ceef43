"""The phantom CT generator: determinism, anatomy, lesions, findings, stage signal, scanner profiles."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from slicefm.phantom.generate import generate_cohort, generate_scan
from slicefm.phantom.patient import sample_patient
from slicefm.phantom.records import (
    CHEST_FINDINGS,
    EXTRA_FINDINGS,
    FINDING_MASK_CLASSES,
    LESION_TYPES,
    ORGAN_CLASSES,
    PhantomScan,
)
from slicefm.phantom.scanner import DEFAULT_PROFILE, HU_RANGE, OUTSIDE_FOV_HU, SHIFTED_PROFILE

ORGAN = {name: i for i, name in enumerate(ORGAN_CLASSES)}
FINDING = {name: i for i, name in enumerate(FINDING_MASK_CLASSES)}
# Organ labels a lesion of each type may cover (the generator's hosts).
LESION_HOSTS = {
    "bone": {"spine", "ribs"},
    "abdomen": {"bowel", "body_fat"},
    "mediastinum": {"mediastinum"},
    "liver": {"liver"},
    "lung": {"lung_left", "lung_right"},
    "kidney": {"kidney_left", "kidney_right"},
    "soft_tissue": {"body_fat"},
    "pelvis": {"bowel", "body_fat"},
}


def organ_voxels(scan: PhantomScan, *names: str, clean: bool = True) -> np.ndarray:
    """HU of an organ's voxels; `clean` drops voxels taken by a finding or lesion."""
    mask = np.isin(scan.organ_mask, [ORGAN[n] for n in names])
    if clean:
        mask &= (scan.finding_mask == 0) & (scan.lesion_mask == 0)
    return scan.hu[mask].astype(np.float64)


@pytest.fixture(scope="module")
def scan() -> PhantomScan:
    """A full-size chest-abdomen phantom without findings (clean anatomy)."""
    return generate_scan(np.random.default_rng(11), shape_xy=128, n_slices=64, findings=())


@pytest.fixture(scope="module")
def lesion_cohort() -> list[PhantomScan]:
    return generate_cohort(8, seed=5, shape_xy=64, n_slices=40, min_lesions=3)


def test_same_seed_same_phantom_other_seed_differs():
    a = generate_cohort(3, seed=7, shape_xy=48, n_slices=24)
    b = generate_cohort(3, seed=7, shape_xy=48, n_slices=24)
    c = generate_cohort(3, seed=8, shape_xy=48, n_slices=24)
    for x, y in zip(a, b, strict=True):
        for name in ("hu", "organ_mask", "lesion_mask", "finding_mask"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
        assert (x.lesions, x.findings, x.spacing_mm, x.patient_id) == (
            y.lesions,
            y.findings,
            y.spacing_mm,
            y.patient_id,
        )
    assert not np.array_equal(a[0].hu, c[0].hu)
    assert a[0].patient_id != c[0].patient_id


def test_arrays_types_and_fov_padding(scan):
    n, h, w = scan.hu.shape
    assert (h, w) == (128, 128) and n == 64
    assert (
        scan.hu.dtype == np.int16 and scan.organ_mask.dtype == np.uint8 and scan.lesion_mask.dtype == np.uint8
    )
    assert scan.organ_mask.shape == scan.lesion_mask.shape == scan.finding_mask.shape == scan.hu.shape
    assert scan.organ_mask.max() < len(ORGAN_CLASSES)
    # Outside the reconstruction circle: padding in every corner, a small minority of pixels.
    padding = scan.hu == OUTSIDE_FOV_HU
    assert padding[:, 0, 0].all() and padding[:, -1, -1].all() and padding[:, 0, -1].all()
    assert 0.05 < padding.mean() < 0.2
    assert not padding[:, h // 2, :].any()  # the central row is inside the circle
    inside = scan.hu[~padding]
    assert inside.min() >= HU_RANGE[0] and inside.max() <= HU_RANGE[1]
    assert (scan.organ_mask[padding] == 0).all()
    assert all(s > 0 for s in scan.spacing_mm) and scan.spacing_mm[1] == scan.spacing_mm[2]
    assert np.isclose(scan.acquisition["fov_mm"], w * scan.spacing_mm[2], atol=0.01)


def test_tissue_hu_ranges(scan):
    medians = {name: float(np.median(organ_voxels(scan, name))) for name in ORGAN_CLASSES[1:]}
    assert medians["lung_left"] < -750 and medians["lung_right"] < -750
    assert medians["airway"] < -600
    assert -130 < medians["body_fat"] < -60
    assert 20 < medians["muscle"] < 80
    assert 40 < medians["liver"] < 130
    assert medians["spine"] > 200 and medians["ribs"] > 200 and medians["pelvic_bone"] > 200
    assert -15 < medians["bladder"] < 35
    assert medians["aorta"] > 100 if scan.contrast else 20 < medians["aorta"] < 70
    assert medians["kidney_left"] > 100 if scan.contrast else 10 < medians["kidney_left"] < 60
    air = scan.hu[(scan.organ_mask == 0) & (scan.hu > OUTSIDE_FOV_HU)]
    assert -1020 < np.median(air) < -960
    # Lungs have texture (vessels): a sizeable bright tail above the parenchyma.
    lungs = organ_voxels(scan, "lung_left", "lung_right")
    assert np.percentile(lungs, 99) > -500


def test_anatomical_layout(scan):
    def centroid(*names: str) -> np.ndarray:
        return np.argwhere(np.isin(scan.organ_mask, [ORGAN[n] for n in names])).mean(axis=0)

    n, h, w = scan.hu.shape
    # Canonical frame: column 0 is the patient's right, so the liver sits at low columns.
    assert centroid("liver")[2] < w / 2 < centroid("spleen")[2]
    assert centroid("lung_right")[2] < w / 2 < centroid("lung_left")[2]
    assert centroid("kidney_right")[2] < w / 2 < centroid("kidney_left")[2]
    # Slice 0 is inferior: bladder < kidneys < liver < heart < lungs along z.
    z = {name: centroid(name)[0] for name in ("bladder", "kidney_left", "liver", "heart", "lung_left")}
    assert z["bladder"] < z["kidney_left"] < z["liver"] < z["heart"] < z["lung_left"]
    lung_z = np.flatnonzero(
        np.isin(scan.organ_mask, [ORGAN["lung_left"], ORGAN["lung_right"]]).any(axis=(1, 2))
    )
    bladder_z = np.flatnonzero((scan.organ_mask == ORGAN["bladder"]).any(axis=(1, 2)))
    assert lung_z.min() > bladder_z.max()
    # Row 0 is anterior: heart in front of the spine; the spine is in every slice.
    assert centroid("heart")[1] < centroid("spine")[1]
    assert (scan.organ_mask == ORGAN["spine"]).any(axis=(1, 2)).all()
    airway_z = np.flatnonzero((scan.organ_mask == ORGAN["airway"]).any(axis=(1, 2)))
    assert airway_z.min() > n / 2


def test_lesions_sit_in_their_host_with_tight_boxes(lesion_cohort):
    n_lesions = 0
    for scan in lesion_cohort:
        assert len(scan.lesions) >= 3
        for number, lesion in enumerate(scan.lesions, start=1):
            n_lesions += 1
            mask = scan.lesion_mask == number
            assert mask.any()
            assert lesion.type_index == LESION_TYPES.index(lesion.lesion_type) + 1
            hosts = {ORGAN_CLASSES[i] for i in np.unique(scan.organ_mask[mask])}
            assert hosts <= LESION_HOSTS[lesion.lesion_type], (lesion.lesion_type, hosts)
            assert mask[lesion.centre_zyx] and lesion.key_slice == lesion.centre_zyx[0]
            rows, cols = np.nonzero(mask[lesion.key_slice])
            x0, y0, x1, y1 = lesion.box_xyxy
            assert abs(x0 - cols.min()) <= 1 and abs(x1 - cols.max()) <= 1
            assert abs(y0 - rows.min()) <= 1 and abs(y1 - rows.max()) <= 1
            assert 1.0 <= lesion.radius_mm <= 20.0
            assert 20 <= abs(lesion.contrast_hu) <= 950
        assert scan.location_labels == {
            t: int(any(les.lesion_type == t for les in scan.lesions)) for t in LESION_TYPES
        }
        assert int(scan.lesion_mask.max()) == len(scan.lesions)
    assert n_lesions >= 3 * len(lesion_cohort)


def _scan_with_lesion(lesion_type: str, seed: int, shape_xy: int, n_slices: int) -> tuple[PhantomScan, int]:
    """A scan with one lesion of this type required (no findings) and that lesion's mask number."""
    scan = generate_scan(
        np.random.default_rng(seed), shape_xy=shape_xy, n_slices=n_slices, lesion_types=(lesion_type,), findings=()
    )
    return scan, next(i for i, les in enumerate(scan.lesions, start=1) if les.lesion_type == lesion_type)


@pytest.mark.parametrize("lesion_type", LESION_TYPES)
def test_every_lesion_type_can_be_placed_and_is_visible(lesion_type):
    scan, number = _scan_with_lesion(lesion_type, seed=3, shape_xy=96, n_slices=48)
    assert scan.location_labels[lesion_type] == 1
    lesion = scan.lesion_mask == number
    # Visible: the lesion differs from the host tissue right around it.
    host = np.isin(scan.organ_mask, [ORGAN[n] for n in LESION_HOSTS[lesion_type]]) & (scan.lesion_mask == 0)
    shell = ndimage.binary_dilation(lesion, iterations=2) & host
    assert shell.sum() > 5
    assert abs(np.median(scan.hu[lesion]) - np.median(scan.hu[shell])) > 10



def test_lesions_in_fat_are_soft_tissue_dense_to_the_core():
    """Hypodense metastases have a fluid (necrotic / cystic) core, never fat density: in a fat host the
    whole lesion, core included, stands out, not only its enhancing rim."""
    contrasts = []
    for seed in range(8):
        scan, number = _scan_with_lesion("soft_tissue", seed, shape_xy=128, n_slices=48)
        contrasts.append(scan.lesions[number - 1].contrast_hu)
        key = scan.lesions[number - 1].key_slice
        lesion, hu = scan.lesion_mask[key] == number, scan.hu[key].astype(float)
        core = ndimage.binary_erosion(lesion)
        fat = ndimage.binary_dilation(lesion, iterations=3) & ~lesion & (scan.organ_mask[key] == ORGAN["body_fat"])
        assert core.sum() > 0 and fat.sum() > 5
        assert np.median(hu[core]) - np.median(hu[fat]) > 60, seed
    assert min(contrasts) < 0 < max(contrasts)  # hypo- and hyperdense cores both drawn


@pytest.mark.parametrize("lesion_type", ["liver", "kidney", "abdomen"])
def test_soft_tissue_lesions_are_rim_enhancing(lesion_type):
    """A brighter shell around the core: the texture that tells a metastasis from bowel or vessels."""
    differences = []
    for seed in range(6):
        scan, number = _scan_with_lesion(lesion_type, seed, shape_xy=128, n_slices=64)
        key = scan.lesions[number - 1].key_slice
        lesion, hu = scan.lesion_mask[key] == number, scan.hu[key]  # in-plane: slices are thicker than pixels
        core = ndimage.binary_erosion(lesion, iterations=2)
        shell = lesion & ~ndimage.binary_erosion(lesion)
        assert shell.sum() > 0
        if core.any():  # the smallest lesions have no core left after the erosion
            differences.append(float(np.median(hu[shell]) - np.median(hu[core])))
    # Every rim is brighter than its core; small lesions less so (the reconstruction kernel blurs the shell).
    assert len(differences) >= 4 and min(differences) > 0 and np.median(differences) > 40


def test_every_scan_carries_one_to_four_lesions_like_deeplesion():
    counts = [len(s.lesions) for s in generate_cohort(12, seed=3, shape_xy=48, n_slices=32)]
    assert min(counts) >= 1 and max(counts) <= 4 and len(set(counts)) > 1

def test_chest_region_has_no_pelvis():
    scan = generate_scan(np.random.default_rng(4), shape_xy=48, n_slices=24, region="chest", min_lesions=3)
    assert not (scan.organ_mask == ORGAN["bladder"]).any()
    assert scan.location_labels["pelvis"] == 0
    assert (np.isin(scan.organ_mask, [ORGAN["lung_left"], ORGAN["lung_right"]])).any(axis=(1, 2)).mean() > 0.6


@pytest.mark.parametrize(
    ("finding", "check"),
    [
        ("emphysema", lambda hu: np.median(hu) < -900),
        ("pleural_effusion", lambda hu: -30 < np.median(hu) < 50),
        ("opacity", lambda hu: -650 < np.median(hu) < -300),
        ("nodule", lambda hu: np.max(hu) > -600),  # small nodules are partial-volumed
        ("calcification", lambda hu: np.max(hu) > 300),
        ("atelectasis", lambda hu: np.median(hu) > -300),
        ("lymphadenopathy", lambda hu: -40 < np.median(hu) < 100),
        ("pericardial_effusion", lambda hu: -40 < np.median(hu) < 60),
        ("consolidation", lambda hu: np.median(hu) > -200),
        ("medical_material", lambda hu: np.max(hu) > 1500),
        ("hiatal_hernia", lambda hu: np.min(hu) < -700 and np.max(hu) > -100),
    ],
)
def test_each_finding_is_painted_where_flagged(finding, check):
    scan = generate_scan(
        np.random.default_rng(21), shape_xy=64, n_slices=40, region="chest", findings=(finding,)
    )
    flagged = {**scan.findings, **scan.extra_findings}
    assert flagged[finding] == 1 and sum(scan.findings.values()) == (finding in CHEST_FINDINGS)
    assert set(np.unique(scan.finding_mask)) == {
        0,
        FINDING[finding if finding in FINDING else "calcification"],
    }
    hu = scan.hu[scan.finding_mask == FINDING[finding]]
    assert check(hu.astype(float)), (finding, np.percentile(hu, [5, 50, 95]))


def test_cardiomegaly_enlarges_the_heart():
    patient = sample_patient(np.random.default_rng(2))
    sizes = {}
    for flag in ((), ("cardiomegaly",)):
        scan = generate_scan(
            np.random.default_rng(9), shape_xy=64, n_slices=48, region="chest", patient=patient, findings=flag
        )
        sizes[flag] = (scan.organ_mask == ORGAN["heart"]).sum() * np.prod(scan.spacing_mm)
        assert scan.findings["cardiomegaly"] == len(flag)
    assert sizes[("cardiomegaly",)] > 1.3 * sizes[()]


def test_calcification_subtypes_follow_calcification():
    coronary = generate_scan(
        np.random.default_rng(1), 48, 24, region="chest", findings=("coronary_calcification",)
    )
    assert coronary.findings["calcification"] == 1 and coronary.extra_findings["arterial_calcification"] == 0
    with pytest.raises(ValueError, match="unknown findings"):
        generate_scan(np.random.default_rng(1), 48, 24, findings=("fracture",))


def test_findings_are_drawn_independently_with_p_about_0_3():
    scans = generate_cohort(60, seed=13, shape_xy=32, n_slices=24, region="chest")
    rates = {f: np.mean([s.findings[f] for s in scans]) for f in CHEST_FINDINGS}
    assert all(0.1 <= r <= 0.55 for r in rates.values()), rates
    for s in scans:
        assert set(s.extra_findings) == set(EXTRA_FINDINGS)
        for f in CHEST_FINDINGS:
            assert (s.finding_mask == FINDING[f]).any() == bool(s.findings[f])


def test_stage_is_learnable_from_image_content_but_not_perfectly():
    """Stage III-IV: bigger lung tumours and more nodes/effusion, visible in the masks' content."""
    scans = generate_cohort(
        60, seed=3, shape_xy=48, n_slices=24, region="chest", lesion_types=("lung",), patients_per_scan=1.0
    )
    stages = np.array([s.stage for s in scans])
    assert 10 < stages.sum() < 50
    voxel_ml = np.array([np.prod(s.spacing_mm) / 1000.0 for s in scans])
    tumour_ml = np.array([(s.lesion_mask > 0).sum() for s in scans]) * voxel_ml
    nodes_ml = np.array([(s.finding_mask == FINDING["lymphadenopathy"]).sum() for s in scans]) * voxel_ml
    fluid_ml = np.array([(s.finding_mask == FINDING["pleural_effusion"]).sum() for s in scans]) * voxel_ml
    assert roc_auc_score(stages, tumour_ml) > 0.7
    score = np.log1p(tumour_ml) + np.log1p(nodes_ml) + 0.5 * np.log1p(fluid_ml)
    assert 0.7 < roc_auc_score(stages, score) < 0.99


def test_cohort_groups_scans_by_patient():
    scans = generate_cohort(10, seed=2, shape_xy=32, n_slices=24, patients_per_scan=0.6)
    ids = [s.patient_id for s in scans]
    assert len(set(ids)) == 6
    assert ids == sorted(ids, key=ids.index)  # a patient's scans are adjacent
    for pid in set(ids):
        mine = [s for s in scans if s.patient_id == pid]
        assert [s.study_index for s in mine] == list(range(1, len(mine) + 1))
        assert len({(s.sex, s.stage, s.patient_name) for s in mine}) == 1
        assert [s.age for s in mine] == sorted(s.age for s in mine)
    assert all(
        pid.startswith("PHA") and s.patient_name.startswith("PHANTOM^")
        for pid, s in zip(ids, scans, strict=True)
    )


@pytest.mark.parametrize("profile", [DEFAULT_PROFILE, SHIFTED_PROFILE])
def test_scanner_profile_sets_noise_and_calibration(profile):
    scan = generate_scan(np.random.default_rng(6), shape_xy=96, n_slices=24, profile=profile, findings=())
    # Air well away from the body and the couch: only noise and calibration offset remain.
    air = (scan.organ_mask == 0) & (scan.hu > OUTSIDE_FOV_HU)
    air[:, scan.hu.shape[1] // 2 :, :] = False  # the couch lies posterior
    air = ndimage.binary_erosion(air, structure=np.ones((1, 9, 9)))  # beyond the kernel's reach
    values = scan.hu[air].astype(float)
    values = values[values < -850]  # drop partial-volume skin edge
    # Air sits near the -1024 clip, which biases mean and sd: use median and IQR instead.
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    assert abs(q50 - (-1000.0 + profile.hu_offset)) <= 1.5
    assert abs((q75 - q25) / 1.349 - profile.noise_sd_hu) < 0.15 * profile.noise_sd_hu
    assert scan.profile == profile.name


def test_forced_spacing_shrinks_the_anatomy_to_fit():
    scan = generate_scan(np.random.default_rng(1), shape_xy=64, region="chest", spacing_mm=(0.8, 0.8, 0.8))
    assert scan.spacing_mm == (0.8, 0.8, 0.8)
    assert 0.1 < scan.acquisition["anatomy_scale"] < 1.0
    body = scan.organ_mask > 0
    assert not body[:, :, 0].any() and not body[:, :, -1].any()  # the whole body is in view
    assert 24 <= scan.hu.shape[0] <= 96


def test_slice_count_follows_spacing_within_limits():
    scans = generate_cohort(6, seed=4, shape_xy=32)
    for s in scans:
        assert 24 <= s.hu.shape[0] <= 96
    assert len({round(s.spacing_mm[0], 3) for s in scans}) > 1 and len({s.spacing_mm[1] for s in scans}) > 1


def test_invalid_arguments_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="region"):
        generate_scan(rng, 32, 24, region="head")
    with pytest.raises(ValueError, match="lesion types"):
        generate_scan(rng, 32, 24, lesion_types=("brain",))
    with pytest.raises(ValueError):
        generate_cohort(0, seed=1)
