"""Running the playbooks of ``ansible/`` from tests: Ansible's own virtualenv, playbook runs, play recaps.

Ansible and ansible-lint live in a virtualenv of their own (``~/.cache/cloudml-os/ansible``, built from
``ansible/requirements.txt``, as an operator installs them on a workstation) rather than in the platform's
``.venv``: ansible-core pins Jinja2 and friends on its own schedule, and the playbooks never import the
platform.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPOSITORY / "ansible"
REQUIREMENTS = ANSIBLE_DIR / "requirements.txt"
ANSIBLE_VENV = Path.home() / ".cache" / "cloudml-os" / "ansible"
STAMP_NAME = ".requirements-sha256"
# `host : ok=12 changed=0 unreachable=0 failed=0 skipped=3 rescued=0 ignored=0`
_RECAP_LINE = re.compile(r"^(?P<host>\S+)\s+:\s+(?P<counts>(?:\w+=\d+\s*)+)$", re.MULTILINE)


def ensure_ansible_venv(venv: Path = ANSIBLE_VENV, requirements: Path = REQUIREMENTS) -> Path:
    """Build Ansible's virtualenv once per content of ``requirements`` (rebuilt when the file changes)."""
    return ensure_tool_venv(venv, requirements)


def ensure_tool_venv(venv: Path, requirements: Path) -> Path:
    """A virtualenv of one tool (Ansible, diskimage-builder), rebuilt only when its requirements file changes."""
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    stamp = venv / STAMP_NAME
    if stamp.exists() and stamp.read_text().strip() == digest:
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text().strip() == digest:
            return venv
        print(f"tests/site: building {venv} from {requirements} (a minute)", file=sys.stderr, flush=True)
        shutil.rmtree(venv, ignore_errors=True)
        base = getattr(sys, "_base_executable", None) or shutil.which("python3.11") or sys.executable
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", "-q",
                        "-r", str(requirements)], check=True, env=_clean_environment())
        stamp.write_text(digest + "\n")
    return venv


def _clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


@dataclasses.dataclass
class PlaybookRun:
    """One ``ansible-playbook`` run: its exit status, output and play recap (host -> counter -> n)."""

    returncode: int
    output: str
    recap: dict[str, dict[str, int]]

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP's counters per host (the last recap when the output holds several)."""
    recap_start = output.rfind("PLAY RECAP")
    if recap_start < 0:
        return {}
    recap = {}
    for match in _RECAP_LINE.finditer(output[recap_start:]):
        counts = dict(item.split("=") for item in match["counts"].split())
        recap[match["host"]] = {name: int(value) for name, value in counts.items()}
    return recap


@dataclasses.dataclass
class Ansible:
    """Ansible's commands from its virtualenv, run in ``ansible/`` so that ansible.cfg applies."""

    venv: Path

    def environment(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**_clean_environment(), "PATH": f"{self.venv / 'bin'}:{os.environ.get('PATH', '')}",
                "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1", "PY_COLORS": "0",
                "ANSIBLE_LOCAL_TEMP": str(self.venv / "tmp"), **(extra or {})}

    def run(self, command: str, *args: str, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.venv / "bin" / command), *args], cwd=ANSIBLE_DIR, capture_output=True,
                              text=True, env=self.environment(env), timeout=timeout)

    def playbook(self, playbook: str, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 1800) -> PlaybookRun:
        result = self.run("ansible-playbook", playbook, *args, env=env, timeout=timeout)
        output = result.stdout + result.stderr
        return PlaybookRun(result.returncode, output, parse_recap(result.stdout))
