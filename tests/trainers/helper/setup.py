from setuptools import setup

# On no index: the dependencies tests upload its wheel beside the trainer that requires it.
setup(name="cmlos-helper", version="1.0", packages=["cmlos_helper"])
