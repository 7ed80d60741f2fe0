from pathlib import Path

import pytest

from cloudml_os.config import ConfigError, load_settings


def test_the_embedded_default_lives_under_the_data_dir(tmp_path):
    settings = load_settings(environ={"CLOUDML_OS_DATA_DIR": str(tmp_path)})
    assert settings.database_url == f"sqlite:///{tmp_path}/cloudml-os.db"
    assert settings.broker_url.startswith("sqla+sqlite:///")
    assert settings.artifacts_root == tmp_path / "artifacts"
    assert settings.api_port == 8080


def test_environment_overrides_the_file_and_flags_override_both(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('api_port = 9000\nwatch_interval = 2.5\n[machine_types.tiny]\nflavor = "m1.tiny"\n')
    settings = load_settings(config, environ={"CLOUDML_OS_API_PORT": "9100"}, data_dir=tmp_path)
    assert settings.api_port == 9100
    assert settings.watch_interval == 2.5
    assert settings.machine_types["tiny"].flavor == "m1.tiny"
    assert load_settings(config, environ={}, api_port=9200).api_port == 9200


@pytest.mark.parametrize("content, message", [
    ("api_port = 'eighty'", "api_port"),
    ("api_port = 70000", "api_port"),
    ("no_such_setting = 1", "no_such_setting"),
    ("[machine_types.gpu]\ngpus = 1", "machine_types.gpu"),
    ("local_address_prefix = '10.0'", "local_address_prefix"),
    ("api_port = ", "c.toml"),
    ("driver = 'openstack'\nartifacts = 's3'", "artifacts"),
    ("auth = 'ldap'", "auth"),
    ("openstack_node_port_first = 20100\nopenstack_node_port_last = 20000", "openstack_node_port_first"),
    ("swift_segment_size = 1000", "swift_segment_size"),
    ("output_sync_seconds = -1", "output_sync_seconds"),
    ("output_sync_seconds = 3601", "output_sync_seconds"),
])
def test_a_bad_setting_is_named_in_the_error(tmp_path, content, message):
    config = tmp_path / "c.toml"
    config.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_settings(config, environ={})


def test_the_sample_configuration_is_valid():
    sample = Path(__file__).resolve().parents[2] / "etc" / "cloudml-os.toml.sample"
    assert load_settings(sample, environ={}).machine_types["standard_gpu"].gpus == 1


@pytest.mark.parametrize("bad", ["has,comma", "-leading-dash", "x" * 57, "white space"])
def test_an_installation_id_that_cannot_be_part_of_a_heat_tag_is_refused(tmp_path, bad):
    with pytest.raises(ConfigError, match="'installation_id' must be 1-56"):
        load_settings(environ={}, data_dir=tmp_path, installation_id=bad)


def test_an_installation_id_of_56_characters_is_the_longest_that_fits_a_tag(tmp_path):
    assert load_settings(environ={}, data_dir=tmp_path, installation_id="a" * 56).installation_id == "a" * 56


@pytest.mark.parametrize("settings, message", [
    ({"pip_index_url": "pypi.example.org/simple"}, "'pip_index_url' must be an http://"),
    ({"pip_extra_args": "--target /opt/runtime"}, "'pip_extra_args': '--target' is not one of pip's index options"),
    ({"pip_extra_args": "--trusted-host h --user"}, "'--user' is not one of"),
    ({"pip_extra_args": "--extra-index-url 'unclosed"}, "'pip_extra_args': No closing quotation"),
])
def test_pip_settings_take_an_index_url_and_index_options_only(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(environ={}, data_dir=tmp_path, **settings)


def test_pip_settings_accept_a_mirror_and_its_options(tmp_path):
    extra = "--extra-index-url=https://b/simple --trusted-host b"
    settings = load_settings(environ={"CLOUDML_OS_PIP_EXTRA_ARGS": extra}, data_dir=tmp_path,
                             pip_index_url="https://mirror.example/simple")
    assert (settings.pip_index_url, settings.pip_extra_args) == ("https://mirror.example/simple", extra)
