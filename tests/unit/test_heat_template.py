"""The cluster's Heat stack: its exact shape per topology, the specs it refuses, and Heat's own verdict on it.

The last part runs ``tests/testcloud/validate_templates.py`` with the OpenStack services' python, so the
generated stacks and the two packaged HOT files go through heat-engine's validation (parameters, property
schemas of every resource including each ResourceGroup member, get_attr targets, outputs).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import time
from pathlib import Path

import pytest

from cloudml_os.cloud.base import ClusterSpec, DriverError, NodeSpec
from cloudml_os.cloud.heat_template import (
    NODE_TEMPLATE,
    StackOptions,
    build_stack,
    group_resource_name,
    installation_tag,
    parse_template,
    template_text,
)
from cloudml_os.keys import generate_keypair

VALIDATOR = Path(__file__).resolve().parents[1] / "testcloud" / "validate_templates.py"
PUBLIC_KEY = generate_keypair("cloudml-os-test")[1]
OPTIONS = StackOptions(network="cloudml-net", image="cloudml-os-node", gpu_image="cloudml-os-gpu",
                       control_plane_cidr="10.231.9.0/24", framework_port_min=20000, framework_port_max=20099)
FULL_OPTIONS = StackOptions(network="cloudml-net", image="cloudml-os-node", gpu_image="cloudml-os-gpu",
                            control_plane_cidr="10.231.9.0/24", framework_port_min=20000, framework_port_max=20099,
                            control_plane_port=8500, floating_network="public", volume_size=20)
NODE_OUTPUT_KEYS = {"name", "group", "index", "address", "floating_address", "server_id"}


def cluster(name, *nodes, labels=None):
    return ClusterSpec(name, tuple(NodeSpec(f"{t}-{i}", t, i, flavor, gpus) for t, i, flavor, gpus in nodes),
                       PUBLIC_KEY, labels or {})


TF = cluster("cml-train-7-team-a-job1", ("chief", 0, "m1.large", 0), ("worker", 0, "m1.medium", 0),
             ("worker", 1, "m1.medium", 0), ("ps", 0, "m1.small", 0),
             labels={"project": "team-a", "job": "job1"})
MXNET = cluster("cml-train-8-mx", ("scheduler", 0, "m1.small", 0), ("server", 1, "m1.medium", 0),
                ("server", 0, "m1.medium", 0), ("worker", 0, "m1.large", 0), ("worker", 1, "m1.large", 0))
SERVING = cluster("cml-serve-3-r1", ("server", 0, "m1.medium", 0))
GPU = cluster("cml-train-9-gpu", ("master", 0, "g1.large", 4), ("worker", 0, "g1.medium", 1),
              ("ps", 0, "m1.small", 0))


def member(group, flavor, image_parameter):
    """The resource_def every ResourceGroup holds: one node.yaml, its index filled in by Heat."""
    return {
        "type": "node.yaml",
        "properties": {
            "cluster_name": {"get_param": "cluster_name"},
            "group": group,
            "index": "%index%",
            "flavor": flavor,
            "image": {"get_param": image_parameter},
            "key_name": {"get_resource": "keypair"},
            "network": {"get_param": "network"},
            "security_group": {"get_resource": "security_group"},
            "server_group": {"get_resource": "server_group"},
            "floating_network": {"get_param": "floating_network"},
            "volume_size": {"get_param": "volume_size"},
            "store_mount": {"get_param": "store_mount"},
        },
    }


def group(name, count, flavor, image_parameter="image"):
    return {"type": "OS::Heat::ResourceGroup",
            "properties": {"count": count, "resource_def": member(name, flavor, image_parameter)}}


def nodes_output(*groups):
    return {"description": "Every node of the cluster: name, group, index, address, floating_address, server_id.",
            "value": {"list_concat": [{"get_attr": [f"{g}_nodes", "node"]} for g in groups]}}


def test_tensorflow_cluster_is_cluster_yaml_plus_one_group_per_task_type():
    request = build_stack(TF, OPTIONS)
    static = parse_template(template_text("cluster.yaml"))
    assert request.template["heat_template_version"] == "2021-04-16"
    assert {k: v for k, v in request.template["resources"].items() if not k.endswith("_nodes")} == static["resources"]
    assert {k: v for k, v in request.template["resources"].items() if k.endswith("_nodes")} == {
        "chief_nodes": group("chief", 1, "m1.large"),
        "worker_nodes": group("worker", 2, "m1.medium"),
        "ps_nodes": group("ps", 1, "m1.small"),
    }
    assert request.template["outputs"] == {**static["outputs"], "nodes": nodes_output("chief", "worker", "ps")}
    assert request.template["parameters"] == static["parameters"]
    assert request.template["conditions"] == static["conditions"]
    assert request.files == {"node.yaml": template_text("node.yaml")}
    assert request.parameters == {
        "cluster_name": "cml-train-7-team-a-job1", "public_key": PUBLIC_KEY, "network": "cloudml-net",
        "control_plane_cidr": "10.231.9.0/24", "framework_port_min": 20000, "framework_port_max": 20099,
        "control_plane_port": 0, "floating_network": "", "image": "cloudml-os-node", "gpu_image": "cloudml-os-gpu",
        "volume_size": 0,
    }
    assert request.tags == ["cloudml-os", "job=job1", "project=team-a"]
    json.dumps(request.template)  # Heat's API takes it as JSON


def test_the_installations_tag_follows_the_platforms_own_when_the_installation_has_an_id():
    request = build_stack(TF, dataclasses.replace(OPTIONS, installation_id="4f1c2a"))
    assert request.tags == ["cloudml-os", "cloudml-os-installation-4f1c2a", "job=job1", "project=team-a"]
    assert installation_tag("4f1c2a") == "cloudml-os-installation-4f1c2a"


def test_mxnet_groups_follow_first_appearance_and_members_any_order():
    request = build_stack(MXNET, OPTIONS)
    groups = {k: v for k, v in request.template["resources"].items() if k.endswith("_nodes")}
    assert groups == {"scheduler_nodes": group("scheduler", 1, "m1.small"),
                      "server_nodes": group("server", 2, "m1.medium"),
                      "worker_nodes": group("worker", 2, "m1.large")}
    assert request.template["outputs"]["nodes"] == nodes_output("scheduler", "server", "worker")
    assert group_resource_name("scheduler") == "scheduler_nodes"
    assert request.tags == ["cloudml-os"]


def test_serving_replica_opens_the_model_server_port_to_the_control_plane():
    options = StackOptions(**{**OPTIONS.__dict__, "control_plane_port": 8500})
    request = build_stack(SERVING, options)
    assert {k for k in request.template["resources"] if k.endswith("_nodes")} == {"server_nodes"}
    assert request.template["resources"]["server_nodes"] == group("server", 1, "m1.medium")
    assert request.parameters["control_plane_port"] == 8500
    rules = request.template["resources"]["security_group"]["properties"]["rules"]["list_concat"]
    assert rules[1] == {"if": ["has_control_plane_port", [{
        "direction": "ingress", "protocol": "tcp", "port_range_min": {"get_param": "control_plane_port"},
        "port_range_max": {"get_param": "control_plane_port"}, "remote_mode": "remote_ip_prefix",
        "remote_ip_prefix": {"get_param": "control_plane_cidr"}}], []]}


def test_gpu_groups_boot_the_gpu_image_and_others_the_plain_image():
    groups = build_stack(GPU, OPTIONS).template["resources"]
    assert groups["master_nodes"] == group("master", 1, "g1.large", "gpu_image")
    assert groups["worker_nodes"] == group("worker", 1, "g1.medium", "gpu_image")
    assert groups["ps_nodes"] == group("ps", 1, "m1.small", "image")


@pytest.mark.parametrize(("floating_network", "volume_size"), [("", 0), ("public", 0), ("", 30), ("public", 30)])
def test_floating_ip_and_boot_volume_are_parameters_of_the_same_template(floating_network, volume_size):
    options = StackOptions(**{**OPTIONS.__dict__, "floating_network": floating_network, "volume_size": volume_size})
    request = build_stack(TF, options)
    assert (request.parameters["floating_network"], request.parameters["volume_size"]) == (floating_network,
                                                                                            volume_size)
    assert request.template == build_stack(TF, OPTIONS).template


def test_node_template_is_prepared_by_cloud_init_and_named_cluster_group_index():
    node = parse_template(template_text(NODE_TEMPLATE))
    server = node["resources"]["server"]["properties"]
    assert server["name"]["str_replace"]["template"] == "$cluster-$group-$index"
    assert server["user_data_format"] == "RAW"
    user_data = server["user_data"]["str_replace"]["template"]
    assert user_data.startswith("#cloud-config\n")
    cloud_config = parse_template(user_data)
    assert cloud_config["ssh_pwauth"] is False
    assert cloud_config["ssh_genkeytypes"] == ["ed25519"]
    assert cloud_config["write_files"][0]["path"] == "/etc/cloudml-os/node.json"
    assert "/var/lib/cloudml-os" in cloud_config["bootcmd"][0]
    assert server["scheduler_hints"] == {"group": {"get_param": "server_group"}}
    assert server["networks"] == [{"port": {"get_resource": "port"}}]


def test_nodes_output_reads_an_output_that_node_yaml_has():
    # Heat passes unknown ResourceGroup attributes on to the members unchecked, so check the name here.
    outputs = parse_template(template_text(NODE_TEMPLATE))["outputs"]
    assert set(outputs["node"]["value"]) == NODE_OUTPUT_KEYS


def test_indices_left_out_become_the_groups_removal_list():
    # Heat names members "0", "1", … skipping removed names: members are then exactly indices 0 and 2.
    group = build_stack(cluster("c", ("worker", 2, "m1.small", 0), ("worker", 0, "m1.small", 0)),
                        OPTIONS).template["resources"]["worker_nodes"]["properties"]
    assert group["count"] == 2
    assert group["removal_policies"] == [{"resource_list": ["1"]}]
    contiguous = build_stack(cluster("c", ("worker", 0, "m1.small", 0)), OPTIONS)
    assert "removal_policies" not in contiguous.template["resources"]["worker_nodes"]["properties"]


def test_each_call_returns_a_fresh_template():
    first = build_stack(TF, OPTIONS)
    first.template["resources"].clear()
    assert "keypair" in build_stack(TF, OPTIONS).template["resources"]


@pytest.mark.parametrize(("spec", "options", "message"), [
    (cluster("c", ("worker", 0, "m1.small", 0), ("worker", 0, "m1.small", 0)), OPTIONS,
     r"the worker nodes have indices \[0, 0\]; a task type's nodes must have distinct indices"),
    (cluster("c", ("worker", -1, "m1.small", 0)), OPTIONS, r"indices \[-1\]"),
    (cluster("c", ("worker", 0, "m1.small", 0), ("worker", 1, "m1.large", 0)), OPTIONS,
     r"the worker nodes differ in machine \(m1.large with 0 GPUs, m1.small with 0 GPUs\)"),
    (cluster("c", ("worker", 0, "g1.medium", 1), ("worker", 1, "g1.medium", 0)), OPTIONS,
     r"differ in machine"),
    (cluster("c", ("master", 0, "g1.medium", 1)), StackOptions(**{**OPTIONS.__dict__, "gpu_image": ""}),
     r"the master nodes have 1 GPUs but no GPU image is configured"),
    (cluster("c"), OPTIONS, r"cluster 'c' has no nodes"),
    (cluster("9lives", ("worker", 0, "m1.small", 0)), OPTIONS, r"cluster name '9lives' must start with a letter"),
    (cluster("c", ("work er", 0, "m1.small", 0)), OPTIONS, r"task type 'work er' must start with a letter"),
    (cluster("c", ("worker", 0, "", 0)), OPTIONS, r"the worker nodes have no flavor"),
    (cluster("c", ("worker", 0, "m1.small", 0), labels={"job": "a,b"}), OPTIONS,
     r"label 'job=a,b' cannot be a Heat stack tag"),
    (cluster("c", ("worker", 0, "m1.small", 0), labels={"job": "x" * 77}), OPTIONS, r"at most 80 characters"),
    (cluster("c", ("worker", 0, "m1.small", 0)), StackOptions(**{**OPTIONS.__dict__, "framework_port_min": 30000}),
     r"framework ports 30000-20099 are not a range within 1-65535"),
    (cluster("c", ("worker", 0, "m1.small", 0)), StackOptions(**{**OPTIONS.__dict__, "control_plane_port": 70000}),
     r"control plane port 70000 is not within 0-65535"),
    (cluster("c", ("worker", 0, "m1.small", 0)), StackOptions(**{**OPTIONS.__dict__, "volume_size": -1}),
     r"volume size -1 GB is negative"),
    (cluster("c", ("worker", 0, "m1.small", 0)), StackOptions(**{**OPTIONS.__dict__, "network": ""}),
     r"the OpenStack driver needs a network"),
])
def test_specs_the_stack_cannot_express_are_refused(spec, options, message):
    with pytest.raises(DriverError, match=message):
        build_stack(spec, options)


# Heat's own validation -------------------------------------------------------------------------------------

RAW_CLUSTER_PARAMETERS = {"cluster_name": "c", "public_key": PUBLIC_KEY, "network": "cloudml-net",
                          "control_plane_cidr": "10.231.9.0/24", "framework_port_min": 20000,
                          "framework_port_max": 20099, "image": "cloudml-os-node"}
RAW_NODE_PARAMETERS = {"cluster_name": "c", "group": "worker", "index": 3, "flavor": "m1.small",
                       "image": "cloudml-os-node", "key_name": "c", "network": "cloudml-net",
                       "security_group": "sg", "server_group": "sg"}


def stack(spec, options=OPTIONS):
    request = build_stack(spec, options)
    return {"template": request.template, "files": request.files, "parameters": request.parameters}


def mutated(request, change):
    """A copy of a generated stack with ``change(template, node_template)`` applied to both documents."""
    request = copy.deepcopy(request)
    node = parse_template(request["files"][NODE_TEMPLATE])
    change(request["template"], node)
    request["files"][NODE_TEMPLATE] = json.dumps(node)  # JSON is YAML, and Heat reads either
    return request


def unknown_keypair_property(top, node):
    top["resources"]["keypair"]["properties"]["fingerprint"] = "aa:bb"


def unknown_server_property(top, node):
    node["resources"]["server"]["properties"]["flavour"] = "m1.small"


def bad_output_attribute(top, node):
    top["outputs"]["keypair"]["value"] = {"get_attr": ["keypair", "fingerprint"]}


def bad_member_attribute(top, node):
    node["outputs"]["node"]["value"]["address"] = {"get_attr": ["port", "ip_address"]}


def attribute_of_missing_resource(top, node):
    node["outputs"]["node"]["value"]["server_id"] = {"get_attr": ["vm", "show"]}


VALID = {
    "tensorflow": stack(TF, FULL_OPTIONS),
    "mxnet": stack(MXNET),
    "serving": stack(SERVING, StackOptions(**{**OPTIONS.__dict__, "control_plane_port": 8500})),
    "gpu with volume": stack(GPU, StackOptions(**{**OPTIONS.__dict__, "volume_size": 40})),
    "floating ip": stack(SERVING, StackOptions(**{**OPTIONS.__dict__, "floating_network": "public"})),
    "members with a removal list": stack(cluster("c", ("replica", 3, "m1.small", 0), ("replica", 1, "m1.small", 0))),
    "raw cluster.yaml": {"template": template_text("cluster.yaml"), "files": {},
                         "parameters": RAW_CLUSTER_PARAMETERS},
    "raw node.yaml": {"template": template_text("node.yaml"), "files": {}, "parameters": RAW_NODE_PARAMETERS},
    "raw node.yaml, floating ip and volume": {
        "template": template_text("node.yaml"), "files": {},
        "parameters": {**RAW_NODE_PARAMETERS, "floating_network": "public", "volume_size": 10}},
}
INVALID = {
    "unknown keypair property": (mutated(VALID["tensorflow"], unknown_keypair_property),
                                 "resources.keypair.properties: Unknown Property fingerprint"),
    "unknown server property": (mutated(VALID["tensorflow"], unknown_server_property),
                                "resources.server.properties: Unknown Property flavour"),
    "bad output attribute": (mutated(VALID["tensorflow"], bad_output_attribute),
                             "The Referenced Attribute (keypair fingerprint) is incorrect"),
    "bad member attribute": (mutated(VALID["mxnet"], bad_member_attribute),
                             "The Referenced Attribute (port ip_address) is incorrect"),
    "attribute of a missing resource": (mutated(VALID["mxnet"], attribute_of_missing_resource),
                                        'The specified reference "vm"'),
    "parameter out of range": ({**VALID["mxnet"], "parameters": {**VALID["mxnet"]["parameters"],
                                                                 "framework_port_max": 70000}},
                               "Parameter 'framework_port_max' is invalid"),
    "not a cidr": ({**VALID["mxnet"], "parameters": {**VALID["mxnet"]["parameters"], "control_plane_cidr": "lan"}},
                   "Parameter 'control_plane_cidr' is invalid"),
}


@pytest.fixture(scope="module")
def heat_verdicts():
    """Heat's verdict on every case of VALID and INVALID, from one validator process (Heat loads in ~4 s)."""
    from tests.testcloud.services import ensure_services_venv

    venv = ensure_services_venv()
    names = [*VALID, *INVALID]
    requests = [*VALID.values(), *(request for request, _ in INVALID.values())]
    started = time.perf_counter()
    result = subprocess.run([str(venv / "bin" / "python"), str(VALIDATOR)], input=json.dumps(requests),
                            capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    verdicts = dict(zip(names, json.loads(result.stdout), strict=True))
    print(f"validator: {elapsed:.1f} s for {len(names)} stacks; "
          + ", ".join(f"{name} {v['seconds'] * 1000:.0f} ms" for name, v in verdicts.items()))
    return verdicts


@pytest.mark.parametrize("name", list(VALID))
def test_heat_accepts_the_stack(heat_verdicts, name):
    assert heat_verdicts[name] == {"valid": True, "error": None, "seconds": heat_verdicts[name]["seconds"]}


@pytest.mark.parametrize("name", list(INVALID))
def test_heat_refuses_the_broken_stack(heat_verdicts, name):
    verdict = heat_verdicts[name]
    assert verdict["valid"] is False
    assert INVALID[name][1] in verdict["error"]
