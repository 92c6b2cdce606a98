"""The native FastCDC scan (native/fastcdc.pyx), compiled by Cython; everything else is
in pyproject.toml (setuptools' ext-modules table there is still experimental and warns
on every build)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "p2pfs.chunking._fastcdc",
            ["native/fastcdc.pyx"],
            # Warnings are errors in `make setup` and CI (CFLAGS=-Werror there), not in a
            # user's pip install, where a newer compiler's new warning must not break it.
            extra_compile_args=[
                "-O3",
                "-Wall",
                "-Wextra",
                "-Wno-unused-function",
                "-Wno-unused-parameter",
                "-Wno-missing-field-initializers",
            ],
        )
    ]
)
