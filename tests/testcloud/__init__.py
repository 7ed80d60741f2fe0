"""A real OpenStack test cloud on this machine: Keystone, Heat, Glance, Neutron and Swift from PyPI,
plus an emulated Nova whose servers are real sshd nodes in network namespaces.

Not a test module: the fixtures in ``tests/openstack/conftest.py`` start it once per session.
"""
