"""The native CPU kernel's build configuration, read by ``setup.py`` (the prebuilt ``prefix_attn._C``) and by the
JIT loader in ``cpu.py``: one list of sources and one set of flags. Imports nothing (setup.py loads it by path).

The C++ sources are ``csrc/*.cpp`` with the headers beside them: in a source checkout the top-level ``csrc/``; in
an installed wheel or sdist build, the copy ``prefix_attn/_csrc/`` that ``setup.py`` ships inside the package.
"""

import glob
import os
import sys

EXTENSION = "prefix_attn._C"
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
CANDIDATE_DIRS = (os.path.join(os.path.dirname(_PACKAGE), "csrc"), os.path.join(_PACKAGE, "_csrc"))


def source_dir() -> str:
    """The first of CANDIDATE_DIRS that holds C++ sources ("" if none)."""
    for d in CANDIDATE_DIRS:
        if glob.glob(os.path.join(d, "*.cpp")):
            return d
    return ""


def sources(root: str) -> list:
    """The .cpp files under ``root`` (a csrc directory), sorted."""
    return sorted(glob.glob(os.path.join(root, "*.cpp")))


def headers(root: str) -> list:
    return sorted(glob.glob(os.path.join(root, "*.h")))


def flags():
    """(cflags, ldflags). OpenMP, as torch's own build: at::parallel_for needs it."""
    cflags, ldflags = ["-O3"], []
    if sys.platform.startswith("linux"):
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags
