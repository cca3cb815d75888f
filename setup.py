"""Installs moreau_kernels and moreau_pruner (from python/)."""
from setuptools import setup

setup(
    packages=["moreau_kernels", "moreau_pruner"],
    package_dir={"moreau_kernels": "moreau_kernels", "moreau_pruner": "python/moreau_pruner"},
    package_data={"moreau_pruner": ["templates/*.py"]},
)
