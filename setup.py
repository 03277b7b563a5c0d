"""Builds the optional fused cross-stitch kernel; everything else is declared in pyproject.toml.

The kernel is a plain C library loaded with ctypes, not a Python extension module. Where it
cannot be built (no C compiler) the install still succeeds and the units run their torch ops.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# No contraction into fused multiply-adds and no reassociation: the kernel must round as torch.
COMPILE_ARGS = {"msvc": ["/O2", "/fp:precise"]}
GCC_LIKE_ARGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-pthread"]


class BuildPlainLibrary(build_ext):
    """Compiler-specific flags, and no ``PyInit_`` symbol to export: ctypes loads the library."""

    def build_extension(self, ext: Extension) -> None:
        args = COMPILE_ARGS.get(self.compiler.compiler_type, GCC_LIKE_ARGS)
        ext.extra_compile_args = args
        ext.extra_link_args = [a for a in args if a == "-pthread"]
        super().build_extension(ext)

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return []


setup(
    ext_modules=[Extension("crossstitch._fused", ["crossstitch/_fused.c"], optional=True)],
    cmdclass={"build_ext": BuildPlainLibrary},
)
