from setuptools import find_packages, setup

# Trainers that read a CSV data set given as a path (a store:// URI of the job's args, mapped by the
# platform), one module per framework, and a probe of what a trainer must not reach. No dependencies: each
# runs in its framework's runtime as it is.
setup(name="storedata-trainer", version="0.1", packages=find_packages())
