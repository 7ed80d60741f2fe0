"""Static checks of the site setup: ansible-lint (production profile), syntax of every playbook, shellcheck
of every shell script under images/."""

from __future__ import annotations

import subprocess

from tests.site.ansible_runner import ANSIBLE_DIR, REPOSITORY, Ansible

PLAYBOOKS = sorted(path.name for path in ANSIBLE_DIR.glob("*.yml"))


def test_ansible_lint_production_profile_is_clean(ansible: Ansible):
    result = ansible.run("ansible-lint", "--profile", "production", "--offline", "--nocolor")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


def test_every_playbook_passes_syntax_check(ansible: Ansible):
    assert PLAYBOOKS == ["openstack.yml", "site.yml"]
    for playbook in PLAYBOOKS:
        result = ansible.run("ansible-playbook", "--syntax-check", "-i", "inventories/example/hosts.yml", playbook)
        assert result.returncode == 0, f"{playbook}: {result.stdout[-3000:]}{result.stderr[-3000:]}"


def _shell_scripts() -> list[str]:
    scripts = []
    for path in sorted((REPOSITORY / "images").rglob("*")):
        if path.is_file() and not path.suffix == ".txt":
            with open(path, "rb") as file:
                first_line = file.readline()
            if first_line.startswith(b"#!") and (b"bash" in first_line or b"/sh" in first_line):
                scripts.append(str(path.relative_to(REPOSITORY)))
    return scripts


def test_image_scripts_are_shellcheck_clean():
    scripts = _shell_scripts()
    # The build script and the elements' install and setup hooks: an empty list would prove nothing.
    assert "images/build.sh" in scripts and len(scripts) >= 8, scripts
    result = subprocess.run(["shellcheck", "--external-sources", "--severity=style", *scripts], cwd=REPOSITORY,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:]
