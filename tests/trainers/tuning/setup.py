from setuptools import find_packages, setup

# cloudml-hypertune is uploaded beside this package (packageUris), as Cloud ML Engine users did before
# trainers' own dependencies were installed from an index.
setup(name="tuning-trainer", version="0.1", packages=find_packages())
