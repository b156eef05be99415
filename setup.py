# Minimal shim: all metadata lives in pyproject.toml. An optional ahead-of-time build of the
# csrc extension will hang off this file behind an environment flag (see the csrc issue).
from setuptools import setup

setup()
