"""Build script: the Python package, plus the native CPU kernel from csrc/ when torch is importable.

    pip install --no-build-isolation -e .        # builds prefix_attn._C in place (ninja, MAX_JOBS honoured)
    PREFIX_ATTN_SKIP_BUILD=1 pip install ...      # package only; the kernel is JIT-compiled on first use

``--no-build-isolation`` makes the build use the torch already installed (the extension must match it);
without it pip would fetch a second torch into a temporary build environment.
"""

import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def native_extension():
    """([ext_modules], {cmdclass}) for prefix_attn._C, or nothing when skipped or torch is missing."""
    if os.environ.get("PREFIX_ATTN_SKIP_BUILD", "0") == "1":
        print("prefix_attn: PREFIX_ATTN_SKIP_BUILD=1, not building the native CPU kernel", file=sys.stderr)
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        print(f"prefix_attn: torch not importable ({exc}); not building the native CPU kernel "
              f"(it is JIT-compiled on first use)", file=sys.stderr)
        return [], {}
    # relative source paths (setuptools requires them), absolute include path
    sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    cflags, ldflags = ["-O3"], []
    if sys.platform.startswith("linux"):  # OpenMP, as torch's own build: at::parallel_for needs it
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    ext = CppExtension("prefix_attn._C", sources, include_dirs=[os.path.join(HERE, "csrc")],
                       extra_compile_args={"cxx": cflags}, extra_link_args=ldflags)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
