from setuptools import find_packages, setup

# What the runtimes lack: pandas (whose numpy the runtime has and keeps), cloudml-hypertune (an sdist only on
# PyPI: built into a wheel on the fetching node), and cmlos-helper, on no index: a wheel uploaded beside this
# package (packageUris) satisfies it.
setup(name="dependencies-trainer", version="0.1", packages=find_packages(),
      install_requires=["pandas", "cloudml-hypertune", "cmlos-helper>=1.0"])
