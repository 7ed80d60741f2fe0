"""The Heat stack of a cluster: cluster.yaml with one ``OS::Heat::ResourceGroup`` of node.yaml per task type.

The HOT files live in ``cloudml_os/cloud/heat_templates/`` (package data, so an installed worker has them).
:func:`build_stack` turns a :class:`ClusterSpec` into what Heat's stack-create takes: the template, the
``files`` map holding node.yaml, the parameters and the tags. The stack's ``nodes`` output lists one map
per node: ``name`` (CLUSTER-GROUP-INDEX), ``group``, ``index``, ``address``, ``floating_address`` and
``server_id``. This module is pure data: it must not talk to a cloud (only ``cloud/openstack.py`` does).
"""

from __future__ import annotations

import dataclasses
import re
from importlib import resources
from typing import Any

import yaml

from cloudml_os.cloud.base import ClusterSpec, DriverError, NodeSpec

TEMPLATE_PACKAGE = "cloudml_os.cloud"
TEMPLATE_FOLDER = "heat_templates"
CLUSTER_TEMPLATE = "cluster.yaml"
NODE_TEMPLATE = "node.yaml"
NODES_OUTPUT = "nodes"
STACK_TAG = "cloudml-os"
# A stack's installation: STACK_TAG-installation-ID (see installation_tag).
INSTALLATION_TAG_PREFIX = f"{STACK_TAG}-installation-"
# Heat refuses longer tags, and its API carries the tag list as one comma-separated string.
MAX_TAG_LENGTH = 80
# Same rules as cluster.yaml's and node.yaml's allowed_pattern: the names also go into cloud-init's JSON.
_CLUSTER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,127}")
_TASK_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}")


@dataclasses.dataclass(frozen=True)
class StackOptions:
    """The installation's side of a cluster: where nodes go, what they boot, which ports are open to whom.

    :param network: name or ID of the tenant network.
    :param image: image of nodes without GPUs.
    :param control_plane_cidr: the platform's addresses; admitted to SSH and to ``control_plane_port``.
    :param framework_port_min: first port the framework processes use (open between members only).
    :param framework_port_max: last such port.
    :param gpu_image: image of nodes with GPUs; required when a node has GPUs.
    :param control_plane_port: a port the control plane reaches on every node (model server); 0 = none.
    :param floating_network: external network giving each node a floating IP; empty = none.
    :param volume_size: GB of a boot volume made from the image per node; 0 = boot from the image.
    :param installation_id: the installation's id, a tag of the stack (:func:`installation_tag`); empty = none.
    """

    network: str
    image: str
    control_plane_cidr: str
    framework_port_min: int
    framework_port_max: int
    gpu_image: str = ""
    control_plane_port: int = 0
    floating_network: str = ""
    volume_size: int = 0
    installation_id: str = ""


@dataclasses.dataclass(frozen=True)
class StackRequest:
    """The arguments of Heat's stack-create (``template``, ``files``, ``parameters``, ``tags``)."""

    template: dict[str, Any]
    files: dict[str, str]
    parameters: dict[str, Any]
    tags: list[str]


class _HotLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``2021-04-16`` as a date; HOT wants the version string, as Heat's own loader does."""


_HotLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def template_text(name: str) -> str:
    """The text of one of the packaged HOT files (``cluster.yaml`` or ``node.yaml``)."""
    return resources.files(TEMPLATE_PACKAGE).joinpath(TEMPLATE_FOLDER, name).read_text(encoding="utf-8")


def parse_template(text: str) -> dict[str, Any]:
    """Parse HOT YAML the way Heat does (dates stay strings)."""
    return yaml.load(text, Loader=_HotLoader)


def group_resource_name(task_type: str) -> str:
    """The ResourceGroup holding the nodes of one task type."""
    return f"{task_type}_nodes"


def build_stack(spec: ClusterSpec, options: StackOptions, store_mount: str = "") -> StackRequest:
    """The Heat stack that creates ``spec``'s nodes.

    :param store_mount: the ``store_mount`` parameter (:func:`cloudml_os.cloud.swift_mount.user_data_parameter`),
        a secret: Heat hides it; empty leaves it out (the nodes mount nothing, or keep what a stack has).

    :raises DriverError: when the spec or the options cannot be expressed as this stack (names Heat or
        cloud-init would mangle, a task type whose indices repeat or whose nodes differ in flavor or
        GPUs, GPUs without a GPU image, a port range out of order, a label too long for a Heat tag).
    """
    _check_options(options)
    if not _CLUSTER_NAME.fullmatch(spec.name):
        raise DriverError(f"cluster name {spec.name!r} must start with a letter and hold only letters, digits, "
                          "'_', '.' and '-' (at most 128 characters)")
    if not spec.nodes:
        raise DriverError(f"cluster {spec.name!r} has no nodes")
    template = parse_template(template_text(CLUSTER_TEMPLATE))
    groups = _groups(spec.nodes)
    for task_type, nodes in groups.items():
        template["resources"][group_resource_name(task_type)] = _group_resource(task_type, nodes, options)
    template["outputs"][NODES_OUTPUT] = {
        "description": "Every node of the cluster: name, group, index, address, floating_address, server_id.",
        "value": {"list_concat": [{"get_attr": [group_resource_name(t), "node"]} for t in groups]},
    }
    parameters = {
        "cluster_name": spec.name,
        "public_key": spec.public_key,
        "network": options.network,
        "control_plane_cidr": options.control_plane_cidr,
        "framework_port_min": options.framework_port_min,
        "framework_port_max": options.framework_port_max,
        "control_plane_port": options.control_plane_port,
        "floating_network": options.floating_network,
        "image": options.image,
        "gpu_image": options.gpu_image,
        "volume_size": options.volume_size,
    }
    if store_mount:
        parameters["store_mount"] = store_mount
    return StackRequest(template=template, files={NODE_TEMPLATE: template_text(NODE_TEMPLATE)},
                        parameters=parameters, tags=_tags(spec.labels, options.installation_id))


def _check_options(options: StackOptions) -> None:
    if not 1 <= options.framework_port_min <= options.framework_port_max <= 65535:
        raise DriverError(f"framework ports {options.framework_port_min}-{options.framework_port_max} are not a "
                          "range within 1-65535")
    if not 0 <= options.control_plane_port <= 65535:
        raise DriverError(f"control plane port {options.control_plane_port} is not within 0-65535")
    if options.volume_size < 0:
        raise DriverError(f"volume size {options.volume_size} GB is negative")
    for field in ("network", "image", "control_plane_cidr"):
        if not getattr(options, field):
            raise DriverError(f"the OpenStack driver needs a {field}")


def _groups(nodes: tuple[NodeSpec, ...]) -> dict[str, list[NodeSpec]]:
    """Nodes by task type in the order of first appearance, each list sorted by index and checked."""
    groups: dict[str, list[NodeSpec]] = {}
    for node in nodes:
        if not _TASK_TYPE.fullmatch(node.task_type):
            raise DriverError(f"task type {node.task_type!r} must start with a letter and hold only letters, "
                              "digits, '_' and '-' (at most 63 characters)")
        groups.setdefault(node.task_type, []).append(node)
    for task_type, members in groups.items():
        members.sort(key=lambda node: node.task_index)
        indices = [node.task_index for node in members]
        if indices[0] < 0 or len(set(indices)) != len(indices):
            raise DriverError(f"the {task_type} nodes have indices {indices}; a task type's nodes must have "
                              "distinct indices from 0 up")
        machines = {(node.flavor, node.gpus) for node in members}
        if len(machines) > 1:
            described = ", ".join(f"{flavor} with {gpus} GPUs" for flavor, gpus in sorted(machines))
            raise DriverError(f"the {task_type} nodes differ in machine ({described}); a task type's nodes "
                              "must share one flavor and GPU count")
        if not members[0].flavor:
            raise DriverError(f"the {task_type} nodes have no flavor")
        if members[0].gpus < 0:
            raise DriverError(f"the {task_type} nodes have a negative GPU count")
    return groups


def _group_resource(task_type: str, members: list[NodeSpec], options: StackOptions) -> dict[str, Any]:
    gpus = members[0].gpus
    if gpus and not options.gpu_image:
        raise DriverError(f"the {task_type} nodes have {gpus} GPUs but no GPU image is configured")
    # Heat names a group's members "0", "1", … skipping the names in its removal list, so listing the
    # indices below the highest that the spec leaves out makes the members exactly the spec's indices
    # (and a removed member is never recreated under its old name).
    present = {node.task_index for node in members}
    removed = [str(index) for index in range(max(present)) if index not in present]
    removal = {"removal_policies": [{"resource_list": removed}]} if removed else {}
    return {
        "type": "OS::Heat::ResourceGroup",
        "properties": {
            **removal,
            "count": len(members),
            "resource_def": {
                "type": NODE_TEMPLATE,
                "properties": {
                    "cluster_name": {"get_param": "cluster_name"},
                    "group": task_type,
                    "index": "%index%",
                    "flavor": members[0].flavor,
                    "image": {"get_param": "gpu_image" if gpus else "image"},
                    "key_name": {"get_resource": "keypair"},
                    "network": {"get_param": "network"},
                    "security_group": {"get_resource": "security_group"},
                    "server_group": {"get_resource": "server_group"},
                    "floating_network": {"get_param": "floating_network"},
                    "volume_size": {"get_param": "volume_size"},
                    "store_mount": {"get_param": "store_mount"},
                },
            },
        },
    }


def installation_tag(installation_id: str) -> str:
    """The tag of the stacks the installation ``installation_id`` makes (the ``installation_id`` setting)."""
    return INSTALLATION_TAG_PREFIX + installation_id


def installation_of(tags: list[str]) -> str:
    """The id of the installation a stack with ``tags`` belongs to; "" for a stack made before ids."""
    return next((tag[len(INSTALLATION_TAG_PREFIX):] for tag in tags if tag.startswith(INSTALLATION_TAG_PREFIX)), "")


def _tags(labels: dict[str, str], installation_id: str) -> list[str]:
    tags = [STACK_TAG] + ([installation_tag(installation_id)] if installation_id else [])
    for key, value in sorted(labels.items()):
        tag = f"{key}={value}"
        if "," in tag or len(tag) > MAX_TAG_LENGTH:
            raise DriverError(f"label {tag!r} cannot be a Heat stack tag (at most {MAX_TAG_LENGTH} characters, "
                              "no commas)")
        tags.append(tag)
    return tags
