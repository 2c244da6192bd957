"""The package list; pyproject.toml holds everything else. Its `packages.find` only discovers packages where they
sit, and the top-level configs/ folder (with its subfolders) is installed as `aloe_jax.configs` (package-dir in
pyproject.toml), so both are listed here."""

from setuptools import find_namespace_packages, setup

CONFIGS = ["aloe_jax.configs", *(f"aloe_jax.configs.{name}" for name in find_namespace_packages(where="configs"))]

setup(packages=[*find_namespace_packages(include=["aloe_jax*", "data_pipeline*"]), *CONFIGS])
