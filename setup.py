"""Build script: the Python package, plus the native CPU kernel from csrc/ when torch is importable.

    pip install --no-build-isolation -e .        # builds prefix_attn._C in place (ninja, MAX_JOBS honoured)
    PREFIX_ATTN_SKIP_BUILD=1 pip install ...      # package only; the kernel is JIT-compiled on first use

``--no-build-isolation`` makes the build use the torch already installed (the extension must match it);
without it pip would fetch a second torch into a temporary build environment.

The sources and flags come from ``prefix_attn/build_config.py`` (read by path: the package is not importable
while it is being built), the same configuration the JIT loader uses. A wheel carries a copy of ``csrc/`` as
``prefix_attn/_csrc/`` (``build_py`` below), so the JIT fallback works from an installed wheel too; the sdist
carries ``csrc/`` itself (MANIFEST.in).
"""

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def _build_config():
    spec = importlib.util.spec_from_file_location("_prefix_attn_build_config",
                                                  os.path.join(HERE, "prefix_attn", "build_config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


config = _build_config()


class BuildPyWithSources(build_py):
    """build_py that also copies csrc/*.cpp and *.h into the package as prefix_attn/_csrc/."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "prefix_attn", "_csrc")
        os.makedirs(target, exist_ok=True)
        for path in config.sources(CSRC) + config.headers(CSRC):
            shutil.copy2(path, target)


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
    sources = [os.path.relpath(p, HERE) for p in config.sources(CSRC)]
    cflags, ldflags = config.flags()
    ext = CppExtension(config.EXTENSION, sources, include_dirs=[CSRC], extra_compile_args={"cxx": cflags},
                       extra_link_args=ldflags)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extension()
cmdclass["build_py"] = BuildPyWithSources
assert glob.glob(os.path.join(CSRC, "*.cpp")), f"no C++ sources in {CSRC}"
setup(ext_modules=ext_modules, cmdclass=cmdclass)
