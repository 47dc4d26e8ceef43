"""Build configuration beyond pyproject.toml: the optional C kernel for slice resizing.

`slicefm.preprocess._bilinear` is Pillow's BILINEAR resize (bit-identical) with the HU windowing fused in,
vectorised across outputs. It is optional: without a C compiler the install still succeeds and preprocessing
falls back to Pillow + numpy, with the same output bytes, ~2-3x slower per slice.
-ffp-contract=off: no fused multiply-adds, so every CPU rounds exactly as Pillow's scalar loop does.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "slicefm.preprocess._bilinear",
            ["slicefm/preprocess/_bilinear.c"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math"],
            optional=True,
        )
    ]
)
