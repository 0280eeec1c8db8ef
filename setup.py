"""Which files the wheel ships; everything else is in pyproject.toml.

pyproject.toml cannot map a folder outside the package next to package discovery, and its
package-data would replace the one here, so all three live here. sample_checkpoints/ ships as
the data folder ``attnviz/samples`` (every file in it, subfolders included): a pip-installed
``attnviz demo`` runs without a checkout, while docs and tests keep their
``sample_checkpoints/...`` paths.
"""

from setuptools import find_namespace_packages, setup

SAMPLES = "sample_checkpoints"
# setuptools ships data only from packages: each subfolder of the samples is listed as one
sample_packages = ["attnviz.samples"] + [
    f"attnviz.samples.{name}" for name in find_namespace_packages(where=SAMPLES)]

setup(
    # namespace discovery, as pyproject's packages.find did: attnviz/models has no __init__.py
    packages=find_namespace_packages(include=["attnviz*"]) + sample_packages,
    package_dir={"attnviz.samples": SAMPLES},
    package_data={"attnviz": ["report_assets/*.js", "report_assets/*.css"]}
    | {name: ["*"] for name in sample_packages},
)
