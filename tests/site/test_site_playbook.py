"""site.yml for real: a Debian host booted with systemd gets PostgreSQL, RabbitMQ, the platform's units and
nginx; the API answers /healthz over TLS; a second run changes nothing; no secret reaches the output."""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

import requests
import yaml

from tests.site.ansible_runner import Ansible
from tests.site.host import SiteHost

HOST = "cml-site"


def write_inventory(folder: Path, host: SiteHost, archive: Path, ansible: Ansible,
                    vault: dict[str, str]) -> tuple[Path, Path]:
    """A one-host site (database, broker and control plane together), its secrets in an encrypted vault."""
    group_vars = folder / "group_vars" / "all"
    group_vars.mkdir(parents=True)
    network = host.address.rsplit(".", 1)[0]
    (folder / "hosts.yml").write_text(yaml.safe_dump({"all": {
        "hosts": {HOST: host.inventory_vars()},
        "children": {group: {"hosts": {HOST: None}} for group in ("cloudml_database", "cloudml_broker",
                                                                   "cloudml_control")}}}))
    (group_vars / "main.yml").write_text(yaml.safe_dump({
        "cloudml_os_source_archive": str(archive),
        "cloudml_os_database_address": "127.0.0.1",
        "cloudml_os_broker_address": "127.0.0.1",
        "cloudml_os_database_password": "{{ vault_database_password }}",
        "cloudml_os_broker_password": "{{ vault_broker_password }}",
        "cloudml_os_key_encryption_key": "{{ vault_key_encryption_key }}",
        "postgresql_databases": [{"name": "cloudml", "owner": "cloudml", "password": "{{ vault_database_password }}"}],
        "postgresql_client_cidrs": [f"{network}.0/24"],
        "rabbitmq_vhosts": [{"vhost": "cloudml", "user": "cloudml", "password": "{{ vault_broker_password }}"}],
        "cloudml_os_server_name": "cml-site.test",
        "cloudml_os_tls_subject_alt_names": ["DNS:cml-site.test", "IP:127.0.0.1", f"IP:{host.address}"],
        "cloudml_os_machine_types": {"standard": {"flavor": "m1.medium"}, "standard_gpu": {"flavor": "g1.medium",
                                                                                          "gpus": 1}},
    }))
    password_file = folder / "vault-password"
    password_file.write_text(secrets.token_urlsafe(24))
    password_file.chmod(0o600)
    vault_file = group_vars / "vault.yml"
    vault_file.write_text(yaml.safe_dump(vault))
    result = ansible.run("ansible-vault", "encrypt", "--vault-password-file", str(password_file), str(vault_file))
    assert result.returncode == 0, result.stderr
    assert vault_file.read_text().startswith("$ANSIBLE_VAULT;")
    return folder / "hosts.yml", password_file


def test_site_playbook_installs_a_healthy_control_plane_and_a_second_run_changes_nothing(
        site_host: SiteHost, source_archive: Path, ansible: Ansible, tmp_path: Path):
    # Characters that must be quoted in the database and broker URLs.
    vault = {"vault_database_password": "db/p@ss%:" + secrets.token_hex(8),
             "vault_broker_password": "mq/p@ss%:" + secrets.token_hex(8),
             "vault_key_encryption_key": base64.urlsafe_b64encode(os.urandom(32)).decode()}
    inventory, password_file = write_inventory(tmp_path / "inventory", site_host, source_archive, ansible, vault)
    arguments = ("-i", str(inventory), "--vault-password-file", str(password_file))

    first = ansible.playbook("site.yml", *arguments)
    assert first.returncode == 0, first.tail()
    assert first.recap[HOST]["failed"] == 0 and first.recap[HOST]["changed"] > 0, first.recap

    # From outside the host, through nginx and TLS, trusting only the certificate the role made.
    certificate = site_host.root / "etc" / "ssl" / "cloudml-os" / "cert.pem"
    response = requests.get(f"https://{site_host.address}/healthz", verify=str(certificate), timeout=30)
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    plain = requests.get(f"http://{site_host.address}/healthz", allow_redirects=False, timeout=30)
    assert plain.status_code == 301 and plain.headers["Location"].startswith("https://")
    sign_in = requests.get(f"https://{site_host.address}/dashboard/login", verify=str(certificate), timeout=30)
    assert sign_in.status_code == 200 and "vendor/bootstrap.min.css" in sign_in.text
    assert sign_in.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"
    # gunicorn takes the scheme from nginx's X-Forwarded-Proto (it trusts 127.0.0.1): the session cookie is Secure.
    cookie = sign_in.headers["Set-Cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie, cookie
    styles = requests.get(f"https://{site_host.address}/dashboard/static/vendor/bootstrap.min.css",
                          verify=str(certificate), timeout=30)
    assert styles.status_code == 200 and "Bootstrap" in styles.text[:500]  # the npm-built assets were installed

    second = ansible.playbook("site.yml", *arguments)
    assert second.returncode == 0, second.tail()
    assert second.recap[HOST]["changed"] == 0 and second.recap[HOST]["failed"] == 0, second.tail(120)

    for secret in vault.values():
        assert secret not in first.output and secret not in second.output
    config = (site_host.root / "etc" / "cloudml-os" / "cloudml-os.toml")
    assert oct(config.stat().st_mode & 0o777) == "0o640"
