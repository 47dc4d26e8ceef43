"""The phantom generator gives the same bytes on every x86-64 machine, whatever its vector extensions.

data.dvc versions the demo data by its bytes, so a phantom must not depend on which SIMD kernels numpy
dispatches to (AVX-512 SVML, AVX2, SSE) or which build of libm glibc selects (FMA or not). The variant test
runs the generator in subprocesses with those code paths switched off (NPY_DISABLE_CPU_FEATURES,
GLIBC_TUNABLES) and compares everything bit for bit, including unrounded float intermediates, where a
last-bit difference shows at once (after rounding to HU it flips a voxel only now and then).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from scipy import special

from slicefm.phantom import anatomy, portable_math
from slicefm.phantom.writers import files

ROOT = Path(__file__).resolve().parents[2]

# The machine without AVX-512 (numpy's X86_V4 / AVX512_* groups), and an x86-64-v2 one: no AVX2 or FMA in
# numpy's dispatch nor in glibc's libm (features this machine lacks are ignored by both).
NO_AVX512 = {"NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"}
X86_64_V2 = {
    "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
    "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F,-AVX2,-FMA,-FMA4,-AVX",
}

_PROBE = r"""
import hashlib, json, math, sys, tempfile
from pathlib import Path
import numpy as np
from slicefm.phantom import anatomy, generate, scanner, portable_math as pm
from slicefm.phantom.dataset import generate_dataset

def h(data):
    return hashlib.sha256(data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()).hexdigest()

rng = np.random.default_rng(7)
x = rng.uniform(-60.0, 60.0, 200_000)
out = {"exp": h(pm.exp(x / 8)), "log": h(pm.log(np.abs(x) + 1e-3)), "sin": h(pm.sin(x)), "cos": h(pm.cos(x)),
       "ndtri": h(np.array([pm.ndtri(p) for p in np.linspace(0.001, 0.999, 999)])),
       "ribs": h(anatomy._cos_7theta_plus(x[:1000].reshape(10, 100), x[1000:2000].reshape(10, 100), x[:100] / 10))}
for profile in scanner.PROFILES.values():  # noise + kernel blur, before rounding to HU
    volume = rng.uniform(-1000.0, 1000.0, (4, 96, 96)).astype(np.float32)
    out[f"signal_{profile.name}"] = h(scanner.scanner_signal(np.random.default_rng(3), volume, profile))
for name, kwargs in {"default": {}, "shifted": {"profile": scanner.SHIFTED_PROFILE},
                     "nsclc": {"region": "chest", "lesion_types": ("lung",)}}.items():
    for i, scan in enumerate(generate.generate_cohort(3, 11, 64, **kwargs)):
        for field in ("hu", "organ_mask", "lesion_mask", "finding_mask"):
            out[f"{name}{i}.{field}"] = h(getattr(scan, field))
        out[f"{name}{i}.lesions"] = h(repr([vars(lesion) for lesion in scan.lesions]).encode())
with tempfile.TemporaryDirectory() as tmp:
    for fmt in ("dicom", "nifti", "nsclc"):
        root = generate_dataset(Path(tmp) / fmt, 2, fmt, seed=5, shape_xy=64)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            out[f"file:{path.relative_to(tmp)}"] = h(path.read_bytes())
# Controls: the code paths the portable functions avoid (they must differ between variants when this
# machine has the features, or the variants would prove nothing).
out["control:numpy"] = h(np.exp(x / 8)) + h(np.cos(x.astype(np.float32)))
out["control:libm"] = h(repr([math.exp(v / 8) for v in x[:50_000]]).encode())
json.dump(out, sys.stdout)
"""


def _probe(extra_env: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, **extra_env, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _cpu_features() -> dict[str, bool]:
    from numpy._core._multiarray_umath import __cpu_features__

    return dict(__cpu_features__)


def test_generator_bytes_do_not_depend_on_vector_extensions():
    native, no_avx512, v2 = _probe({}), _probe(NO_AVX512), _probe(X86_64_V2)
    probes = sorted(k for k in native if not k.startswith("control:"))
    assert len([k for k in probes if k.startswith("file:")]) > 100  # every file of three small datasets
    for name, variant in (("without AVX-512", no_avx512), ("x86-64-v2 (no AVX2/FMA)", v2)):
        differing = [k for k in probes if native[k] != variant[k]]
        assert not differing, f"phantom bytes differ {name}: {differing[:10]}"
    # The variants really switch code paths on this machine (else the comparison above proves nothing).
    features = _cpu_features()
    if features.get("AVX512F"):
        assert native["control:numpy"] != no_avx512["control:numpy"]
    if features.get("FMA3"):
        assert no_avx512["control:libm"] != v2["control:libm"]


def test_portable_functions_match_the_reference_within_a_few_ulp():
    rng = np.random.default_rng(0)
    x = rng.uniform(-700.0, 700.0, 100_000)
    np.testing.assert_allclose(portable_math.exp(x), np.exp(x), rtol=4e-16, atol=0)
    positive = np.exp(rng.uniform(-700.0, 700.0, 100_000))
    np.testing.assert_allclose(portable_math.log(positive), np.log(positive), rtol=4e-16, atol=4e-16)
    angles = rng.uniform(-1e4, 1e4, 100_000)
    np.testing.assert_allclose(portable_math.sin(angles), np.sin(angles), rtol=0, atol=4e-16)
    np.testing.assert_allclose(portable_math.cos(angles), np.cos(angles), rtol=0, atol=4e-16)
    p = np.linspace(1e-6, 1 - 1e-6, 2001)
    np.testing.assert_allclose(
        [portable_math.ndtri(float(q)) for q in p], special.ndtri(p), rtol=2e-9, atol=0
    )
    assert portable_math.geometric_mean([2.0, 4.0, 8.0]) == pytest.approx(4.0, rel=1e-15)
    with pytest.raises(ValueError, match="positive"):
        portable_math.log([1.0, 0.0])
    with pytest.raises(ValueError, match="100000"):
        portable_math.cos([2e5])


def test_portable_gaussian_blur_equals_scipys_to_float_precision():
    from scipy import ndimage

    volume = np.random.default_rng(1).normal(0.0, 100.0, (3, 40, 40)).astype(np.float32)
    kernel = portable_math.gaussian_kernel(1.2)
    assert kernel.size == 2 * int(4.0 * 1.2 + 0.5) + 1 and kernel.sum() == pytest.approx(1.0, abs=1e-15)
    ours = ndimage.correlate1d(
        ndimage.correlate1d(volume, kernel, axis=1, mode="nearest"), kernel, 2, mode="nearest"
    )
    reference = ndimage.gaussian_filter(volume, (0.0, 1.2, 1.2), mode="nearest")
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-3)


def test_rib_pattern_is_cos_of_seven_times_the_angle_plus_phase():
    rng = np.random.default_rng(2)
    y, x, phase = rng.uniform(-3, 3, 1000), rng.uniform(0.01, 3, 1000), rng.uniform(0, 40, 1000)
    expected = np.cos(7.0 * np.arctan2(y, x) + phase)
    np.testing.assert_allclose(anatomy._cos_7theta_plus(y, x, phase), expected, rtol=0, atol=1e-12)


# Calls whose results depend on the CPU's vector extensions or libm build; the generator must not use them.
_PLATFORM_DEPENDENT = {
    "np": {"exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sin", "cos", "tan", "arcsin", "arccos",
           "arctan", "arctan2", "sinh", "cosh", "tanh", "power", "float_power", "cbrt", "hypot", "logaddexp"},
    "math": {"exp", "log", "log2", "log10", "log1p", "expm1", "sin", "cos", "tan", "atan", "atan2", "asin",
             "acos", "pow", "hypot", "cbrt", "erf", "erfc", "sinh", "cosh", "tanh"},
    "special": None,  # any scipy.special function
    "ndimage": {"gaussian_filter", "gaussian_filter1d", "gaussian_laplace", "gaussian_gradient_magnitude"},
}  # fmt: skip


# Every module of the generator and its writers (portable_math is the sanctioned implementation: exempt).
PHANTOM_DIR = ROOT / "slicefm" / "phantom"
GENERATOR_FILES = sorted(
    path.relative_to(ROOT).as_posix() for path in PHANTOM_DIR.rglob("*.py") if path.name != "portable_math.py"
)


def test_the_platform_check_sees_every_generator_module():
    generator = {"anatomy", "canvas", "findings", "generate", "geometry", "lesions", "patient", "scanner"}
    writers = {"dicom", "nifti", "plain", "deeplesion", "ctrate", "radchest", "nsclc", "masks", "files"}
    assert {Path(f).stem for f in GENERATOR_FILES} >= generator | writers | {"dataset", "splits"}


@pytest.mark.parametrize("path", GENERATOR_FILES)
def test_generator_calls_no_platform_dependent_function(path):
    tree = ast.parse((ROOT / path).read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            banned = _PLATFORM_DEPENDENT.get(node.value.id, set())
            if node.value.id in _PLATFORM_DEPENDENT and (banned is None or node.attr in banned):
                found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            exponent = node.right
            if not (isinstance(exponent, ast.Constant) and isinstance(exponent.value, int)):
                found.append(f"line {node.lineno}: ** with a non-integer exponent (libm pow)")
    assert not found, "use slicefm.phantom.portable_math instead: " + "; ".join(found)


def test_npz_members_are_deflated_by_the_reference_zlib():
    """The demo's masks (.npz), NIfTI (.nii.gz) and PNGs are deflate streams, and deflate's output is not
    standardised: data.dvc assumes the reference zlib (as Debian/Ubuntu ship it), not zlib-ng or a vendor
    fork. If this fails, the demo data cannot match data.dvc on this machine: that is the cause."""
    payload = np.arange(4096, dtype=np.uint16).reshape(64, 64) % 37
    npz = files.npz_bytes({"organ": payload.astype(np.uint8)})
    assert zlib.ZLIB_RUNTIME_VERSION.startswith("1.")
    assert hashlib.sha256(npz).hexdigest() == NPZ_DIGEST, f"zlib {zlib.ZLIB_RUNTIME_VERSION}"


NPZ_DIGEST = "1b6060ffc08a6ce0b15d5cde3f6faf5f99852e20e03c236602faea7ac2ca7a69"
