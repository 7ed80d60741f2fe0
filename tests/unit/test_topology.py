"""Cloud ML Engine scale tiers and CUSTOM machine types resolved into replica groups."""

import pytest

from cloudml_os.config import DEFAULT_MACHINE_TYPES, MachineType
from cloudml_os.frameworks.base import TopologyError, topology_from_training_input


def summary(training_input, machine_types=DEFAULT_MACHINE_TYPES):
    topology = topology_from_training_input(training_input, machine_types)
    return [(g.kind, g.count, g.machine_type.name) for g in topology.groups]


def test_basic_is_one_standard_master():
    assert summary({"scaleTier": "BASIC"}) == [("master", 1, "standard")]


def test_missing_scale_tier_means_basic():
    assert summary({}) == [("master", 1, "standard")]


def test_basic_gpu_master_has_a_gpu():
    topology = topology_from_training_input({"scaleTier": "BASIC_GPU"}, DEFAULT_MACHINE_TYPES)
    (group,) = topology.groups
    assert (group.kind, group.machine_type.name, group.machine_type.gpus) == ("master", "standard_gpu", 1)


def test_standard_1_has_four_workers_and_three_parameter_servers():
    assert summary({"scaleTier": "STANDARD_1"}) == [
        ("master", 1, "complex_model_m"),
        ("worker", 4, "complex_model_m"),
        ("parameterServer", 3, "standard"),
    ]


def test_premium_1_has_nineteen_workers_and_eleven_parameter_servers():
    assert summary({"scaleTier": "PREMIUM_1"}) == [
        ("master", 1, "complex_model_l"),
        ("worker", 19, "complex_model_l"),
        ("parameterServer", 11, "large_model"),
    ]


def test_tier_ignores_custom_fields():
    assert summary({"scaleTier": "BASIC", "workerType": "standard", "workerCount": 5}) == [
        ("master", 1, "standard")
    ]


def test_custom_with_every_group():
    training_input = {
        "scaleTier": "CUSTOM", "masterType": "n1-standard-4",
        "workerType": "n1-standard-8", "workerCount": 2,
        "parameterServerType": "standard", "parameterServerCount": 1,
        "evaluatorType": "standard", "evaluatorCount": 1,
    }
    assert summary(training_input) == [
        ("master", 1, "n1-standard-4"),
        ("worker", 2, "n1-standard-8"),
        ("parameterServer", 1, "standard"),
        ("evaluator", 1, "standard"),
    ]


def test_custom_master_alone():
    assert summary({"scaleTier": "CUSTOM", "masterType": "large_model"}) == [("master", 1, "large_model")]


def test_counts_sent_as_strings_are_integers():
    # v1 encodes int64 as JSON strings: "workerCount": "2"
    training_input = {"scaleTier": "CUSTOM", "masterType": "standard", "workerType": "standard",
                      "workerCount": "2", "parameterServerCount": "0"}
    assert summary(training_input) == [("master", 1, "standard"), ("worker", 2, "standard")]


def test_zero_count_drops_the_group_even_with_a_type():
    training_input = {"scaleTier": "CUSTOM", "masterType": "standard", "workerType": "standard",
                      "workerCount": 0}
    assert summary(training_input) == [("master", 1, "standard")]


def test_custom_without_master_type_is_rejected():
    with pytest.raises(TopologyError, match="masterType is required"):
        summary({"scaleTier": "CUSTOM", "workerType": "standard", "workerCount": 1})


def test_unknown_scale_tier_names_the_valid_ones():
    with pytest.raises(TopologyError) as error:
        summary({"scaleTier": "HUGE"})
    message = str(error.value)
    assert "'HUGE'" in message
    for tier in ("BASIC", "BASIC_GPU", "STANDARD_1", "PREMIUM_1", "CUSTOM"):
        assert tier in message


def test_negative_count_is_rejected():
    with pytest.raises(TopologyError, match="workerCount must not be negative"):
        summary({"scaleTier": "CUSTOM", "masterType": "standard", "workerType": "standard",
                 "workerCount": -1})


def test_negative_count_as_string_is_rejected():
    with pytest.raises(TopologyError, match="parameterServerCount must not be negative"):
        summary({"scaleTier": "CUSTOM", "masterType": "standard", "parameterServerType": "standard",
                 "parameterServerCount": "-3"})


@pytest.mark.parametrize("count", ["two", "1.5", [2]])
def test_non_integer_count_is_rejected(count):
    with pytest.raises(TopologyError, match="workerCount"):
        summary({"scaleTier": "CUSTOM", "masterType": "standard", "workerType": "standard",
                 "workerCount": count})


def test_count_without_type_is_rejected():
    with pytest.raises(TopologyError, match="workerType is required when workerCount > 0"):
        summary({"scaleTier": "CUSTOM", "masterType": "standard", "workerCount": 2})


def test_unknown_master_type_names_the_valid_ones():
    with pytest.raises(TopologyError) as error:
        summary({"scaleTier": "CUSTOM", "masterType": "n1-giant-96"})
    message = str(error.value)
    assert "masterType" in message and "'n1-giant-96'" in message
    assert "standard" in message and "n1-highmem-8" in message


def test_unknown_worker_type_is_rejected():
    with pytest.raises(TopologyError, match="workerType: unknown machine type 'gpu-monster'"):
        summary({"scaleTier": "CUSTOM", "masterType": "standard", "workerType": "gpu-monster",
                 "workerCount": 1})


def test_site_machine_types_replace_the_catalogue():
    site = {"tiny": MachineType("tiny", "m1.tiny")}
    assert summary({"scaleTier": "CUSTOM", "masterType": "tiny"}, site) == [("master", 1, "tiny")]
    with pytest.raises(TopologyError, match="valid: tiny"):
        summary({"scaleTier": "BASIC"}, site)
