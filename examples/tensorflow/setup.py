"""The example trainer package, built as Cloud ML Engine trainers are: ``python setup.py sdist``.

TensorFlow is not a dependency here: the runtime (``trainingInput.runtimeVersion``) provides it. Requirements
listed in ``install_requires`` would be installed for the job, except what the runtime already has.
"""

from setuptools import find_packages, setup

setup(
    name="trainer",
    version="0.1.0",
    description="cloudml-os example: linear regression with TensorFlow, single or distributed",
    packages=find_packages(include=["trainer", "trainer.*"]),
    python_requires=">=3.10",
)
