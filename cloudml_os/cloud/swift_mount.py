"""What a VM node of a job needs to see its project's Swift container as read-only files under ``/store``.

In OpenStack mode (:mod:`cloudml_os.cloud.openstack`) every job's cluster gets a Keystone application
credential of its own, made by the platform's account when the cluster is created and deleted with it. Its
access rules admit only ``GET`` and ``HEAD`` of the project's container (``swift_container_prefix + PROJECT``)
and the objects in it, so the credential reads that container and nothing else: no other project's objects,
no writes, no other service, no new credentials (an application credential cannot make another unless made
``unrestricted``). Deleting it revokes the tokens made from it at once (within the token cache time of the
Swift proxy's authtoken middleware, where one is set), so a node's mount stops working when its job ends.

On the node, a first-boot script (cloud-init ``runcmd``) writes an rclone configuration (mode 0600, root
only) and runs ``rclone mount --read-only`` of the container at ``/store/PROJECT``. Reads stream: rclone
asks Swift for the byte ranges a reader reads, so 1 MiB of a 10 GiB object costs about 1 MiB. This module
makes the text of the rules and of the script; it calls no cloud and must never log what it returns.
"""

from __future__ import annotations

import base64
import shlex
from urllib.parse import urlsplit

from cloudml_os.cloud.node_view import STORE_ROOT

CONFIG_PATH = "/etc/cloudml-os/store/rclone.conf"
LOG_PATH = "/var/lib/cloudml-os/store-mount.log"
REMOTE = "store"
# How long a listing stays cached on the node: objects put while a job runs appear within this time.
DIR_CACHE_SECONDS = 10


def credential_name(cluster: str, installation_id: str) -> str:
    """The application credential of a cluster: named after it, so that it is found again (and deleted) by name."""
    return f"cloudml-os-{installation_id or 'default'}-{cluster}"


def access_rules(account_path: str, container: str) -> list[dict[str, str]]:
    """Keystone access rules: read (GET, HEAD) of ``container`` and its objects under ``account_path``
    (``/v1/AUTH_…``, the path of the platform's object-store endpoint)."""
    base = f"{account_path.rstrip('/')}/{container}"
    return [{"service": "object-store", "method": method, "path": path}
            for method in ("GET", "HEAD") for path in (base, f"{base}/**")]


def rclone_config(identity_url: str, storage_url: str, credential_id: str, secret: str) -> str:
    """rclone's configuration of the remote ``store``: Swift through the application credential."""
    return "\n".join([
        f"[{REMOTE}]", "type = swift", f"auth = {identity_url}", "auth_version = 3",
        f"application_credential_id = {credential_id}", f"application_credential_secret = {secret}",
        f"storage_url = {storage_url}", "",
    ])


def mount_script(project: str, container: str, config: str) -> str:
    """The node's first-boot script: write ``config`` (0600) and mount ``container`` at ``/store/PROJECT``.

    ``rclone mount --daemon`` returns once the mount is ready, so cloud-init's later modules (the host keys on
    the console, which the platform waits for) run after it. The configuration reaches the node base64-encoded
    in the script, and the script never echoes it.
    """
    target = f"{STORE_ROOT}/{project}"
    encoded = base64.b64encode(config.encode()).decode()
    mount = ["rclone", "mount", f"{REMOTE}:{container}", target, "--config", CONFIG_PATH, "--read-only",
             "--allow-other", "--daemon", "--dir-cache-time", f"{DIR_CACHE_SECONDS}s", "--log-file", LOG_PATH,
             "--log-level", "NOTICE"]
    return "\n".join([
        "#!/bin/sh",
        "set -eu",
        f"install -d -m 0700 {shlex.quote(CONFIG_PATH.rsplit('/', 1)[0])}",
        f"(umask 077 && printf %s {shlex.quote(encoded)} | base64 -d > {shlex.quote(CONFIG_PATH)})",
        f"install -d -m 0755 {shlex.quote(STORE_ROOT)} {shlex.quote(target)}",
        shlex.join(mount),
        "",
    ])


def user_data_parameter(script: str) -> str:
    """The script as the stack's ``store_mount`` parameter (base64: node.yaml writes it with ``encoding: b64``)."""
    return base64.b64encode(script.encode()).decode()


def storage_url(endpoint: str, node_url: str, project_id: str) -> str:
    """Swift's account URL as nodes reach it: ``node_url`` (``{project_id}`` filled in) or the catalog's."""
    return node_url.format(project_id=project_id) if node_url else endpoint


def account_path(endpoint: str) -> str:
    """The path of an object-store endpoint URL (``/v1/AUTH_…``), what access rules match."""
    return urlsplit(endpoint).path.rstrip("/")
