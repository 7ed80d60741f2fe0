"""The openstack driver's pure parts: reading pinned host keys from a cloud-init console log."""

from cloudml_os.cloud.openstack import parse_console_host_keys

CONSOLE = """\
[    2.1] cloud-init[412]: Cloud-init v. 24.1 running 'modules:final'
-----BEGIN SSH HOST KEY FINGERPRINTS-----
256 SHA256:7l3iCBZbH0zYF6g0v6kq7o4u0mJ7lHqL3o6l2s1kA0s root@node (ED25519)
-----END SSH HOST KEY FINGERPRINTS-----
-----BEGIN SSH HOST KEY KEYS-----
ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHd0W9F8r6QpY0lq3l5gkqS7b4m0Z0jJcYyP1d7d8x9o root@node
ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBB= root@node
-----END SSH HOST KEY KEYS-----
"""


def test_host_keys_come_from_the_keys_block_only():
    assert parse_console_host_keys(CONSOLE) == (
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHd0W9F8r6QpY0lq3l5gkqS7b4m0Z0jJcYyP1d7d8x9o",
        "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBB=",
    )


def test_a_console_without_the_block_gives_no_keys():
    assert parse_console_host_keys("login: \nssh-ed25519 AAAAforged root@x\n") == ()


def test_a_block_printed_twice_gives_each_key_once():
    assert len(parse_console_host_keys(CONSOLE + CONSOLE)) == 2


def test_lines_that_are_not_keys_are_ignored():
    console = "-----BEGIN SSH HOST KEY KEYS-----\n#comment\nssh-dss AAAA root\n-----END SSH HOST KEY KEYS-----\n"
    assert parse_console_host_keys(console) == ()


def test_keys_behind_newer_cloud_inits_log_prefix_are_found():
    console = ("<14>Nov 27 20:01:02 ec2: -----BEGIN SSH HOST KEY KEYS-----\n"
               "<14>Nov 27 20:01:02 ec2: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKEY root@node\n"
               "<14>Nov 27 20:01:02 ec2: -----END SSH HOST KEY KEYS-----\n")
    assert parse_console_host_keys(console) == ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKEY",)
