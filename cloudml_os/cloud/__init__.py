"""Compute drivers: where a cluster's nodes come from (``local`` sshd nodes, ``openstack`` Heat stacks)."""
