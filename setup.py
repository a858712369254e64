"""Maps the folder `operator/` to the import package `medmo_operator`.

A top-level package named `operator` would shadow the standard library, so the folder is
installed under another name; subpackages are found here so none is forgotten.
"""

from setuptools import find_packages, setup

operator_packages = ["medmo_operator"] + [f"medmo_operator.{p}" for p in find_packages("operator")]
trainer_packages = find_packages(include=["medmo_trainer", "medmo_trainer.*"])

setup(
    packages=operator_packages + trainer_packages,
    package_dir={"medmo_operator": "operator"},
)
