"""Elementary functions that give the same bits on every x86-64 machine.

numpy's transcendental ufuncs dispatch on the CPU: with AVX-512 it uses SVML (exp, log, arctan2, power,
cbrt ... in float64 and float32), with AVX2 its own float32 sin/cos/exp/log kernels, otherwise the C
library. glibc's libm in turn selects FMA or SSE2 builds of exp/log/sin/cos at load time. Each is accurate
to an ulp or so, but they round differently, so a phantom generated on an AVX-512 machine differed from
one generated without it (a threshold or an ``rint`` turns a last-bit difference into another voxel).

Everything here uses only IEEE-754 basic operations (+, -, *, /, sqrt, rint, frexp, ldexp), which are
correctly rounded on every machine and every vector width, in a fixed order: the results are identical
wherever they run. Accuracy is a few ulp (float64), plenty for a phantom. Inputs and outputs are float64.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

# Cody-Waite splits of ln 2 and pi/2 (fdlibm): the high parts have trailing zero bits, so k * HI is exact.
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
_PIO2_1 = 1.57079632673412561417e00
_PIO2_2 = 6.07710050630396597660e-11
_PIO2_3 = 2.02226624871116645580e-21
_TWO_OVER_PI = 6.36619772367581382433e-01
_SQRT_HALF = 0.70710678118654752440
_MAX_TRIG_ARG = 1.0e5  # the three-part pi/2 split stays exact for |k| < 2**20
_EXP_RANGE = (-700.0, 700.0)


def _horner(x: NDArray[np.float64], coefficients: list[float]) -> NDArray[np.float64]:
    """sum(c_i x**i), highest degree first in `coefficients`, as explicit multiply-then-add steps."""
    acc = np.full_like(x, coefficients[0])
    for c in coefficients[1:]:
        acc = acc * x + c
    return acc


def _factorials(n: int) -> list[float]:
    out, f = [], 1.0
    for k in range(n + 1):
        f = f * k if k else 1.0
        out.append(f)
    return out


_FACT = _factorials(20)
_EXP_COEFFS = [1.0 / _FACT[k] for k in range(14, -1, -1)]  # Taylor to degree 14 on |r| <= ln2 / 2
_SIN_COEFFS = [(-1.0) ** j / _FACT[2 * j + 1] for j in range(9, -1, -1)]  # in r**2, times r
_COS_COEFFS = [(-1.0) ** j / _FACT[2 * j] for j in range(10, -1, -1)]  # in r**2
_ATANH_COEFFS = [1.0 / (2 * j + 1) for j in range(13, -1, -1)]  # log(m) = 2 s sum s**2j / (2j+1)


def _as_float64(x: ArrayLike) -> NDArray[np.float64]:
    return np.asarray(x, dtype=np.float64)


def exp(x: ArrayLike) -> NDArray[np.float64]:
    """e**x for x in [-700, 700] (clipped outside)."""
    x = np.clip(_as_float64(x), *_EXP_RANGE)
    k = np.rint(x * _INV_LN2)
    r = (x - k * _LN2_HI) - k * _LN2_LO
    return np.ldexp(_horner(r, _EXP_COEFFS), k.astype(np.int64))


def log(x: ArrayLike) -> NDArray[np.float64]:
    """Natural logarithm of positive finite x."""
    x = _as_float64(x)
    if np.any(~(x > 0)) or not np.all(np.isfinite(x)):
        raise ValueError("portable_math.log needs positive finite input")
    m, e = np.frexp(x)  # x = m * 2**e, m in [0.5, 1)
    low = m < _SQRT_HALF
    m = np.where(low, m * 2.0, m)  # now in [sqrt(1/2), sqrt(2)): |s| <= 0.172
    e = np.where(low, e - 1, e).astype(np.float64)
    s = (m - 1.0) / (m + 1.0)
    log_m = 2.0 * s * _horner(s * s, _ATANH_COEFFS)
    return e * _LN2_HI + (log_m + e * _LN2_LO)


def _reduce_quadrant(x: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """(r, q): x = r + (pi/2) * k with |r| <= pi/4 and q = k mod 4."""
    x = _as_float64(x)
    if np.any(np.abs(x) > _MAX_TRIG_ARG):
        raise ValueError(f"portable_math trig functions take |x| <= {_MAX_TRIG_ARG:g}")
    k = np.rint(x * _TWO_OVER_PI)
    r = ((x - k * _PIO2_1) - k * _PIO2_2) - k * _PIO2_3
    return r, np.mod(k.astype(np.int64), 4)


def _sin_cos_reduced(r: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    r2 = r * r
    return r * _horner(r2, _SIN_COEFFS), _horner(r2, _COS_COEFFS)


def sin(x: ArrayLike) -> NDArray[np.float64]:
    """sin(x) for |x| <= 1e5."""
    r, q = _reduce_quadrant(x)
    s, c = _sin_cos_reduced(r)
    return np.choose(q, [s, c, -s, -c])


def cos(x: ArrayLike) -> NDArray[np.float64]:
    """cos(x) for |x| <= 1e5."""
    r, q = _reduce_quadrant(x)
    s, c = _sin_cos_reduced(r)
    return np.choose(q, [c, -s, -c, s])


def geometric_mean(values: ArrayLike) -> float:
    """exp(mean(log(values))) of positive values."""
    return float(exp(log(values).mean()))


# Acklam's rational approximation of the normal quantile (relative error < 1.2e-9).
_ACKLAM_A = [-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02]
_ACKLAM_A += [-3.066479806614716e01, 2.506628277459239e00]
_ACKLAM_B = [-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01]
_ACKLAM_B += [-1.328068155288572e01, 1.0]
_ACKLAM_C = [-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00]
_ACKLAM_C += [4.374664141464968e00, 2.938163982698783e00]
_ACKLAM_D = [7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00, 1.0]
_ACKLAM_P_LOW = 0.02425


def ndtri(p: float) -> float:
    """The standard normal quantile (inverse CDF) of p in (0, 1)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"ndtri needs 0 < p < 1, got {p}")
    x = np.float64(p)
    if _ACKLAM_P_LOW <= p <= 1.0 - _ACKLAM_P_LOW:
        q = x - 0.5
        r = np.asarray(q * q)
        return float(q * _horner(r, _ACKLAM_A) / _horner(r, _ACKLAM_B))
    tail = min(p, 1.0 - p)
    q = np.sqrt(-2.0 * log(tail))
    value = float(_horner(q, _ACKLAM_C) / _horner(q, _ACKLAM_D))
    return value if p < 0.5 else -value


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> NDArray[np.float64]:
    """Normalised 1-D Gaussian weights on [-radius, radius], radius = int(truncate * sigma + 0.5)
    (scipy.ndimage.gaussian_filter's support), from portable exp."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = exp((-0.5 / (sigma * sigma)) * (x * x))
    return weights / weights.sum()
