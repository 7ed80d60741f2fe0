"""The test cloud's core services: the services virtualenv, Keystone, Heat and Glance, and the Keystone catalog.

Every function here runs real OpenStack code from PyPI (the services virtualenv) as separate processes
started through :meth:`CloudContext.spawn`; nothing is faked. The platform's own virtualenv only talks to
them over HTTP with openstacksdk, exactly as the OpenStack driver will. Databases are MariaDB, made anew
at each start (:func:`recreate_database`). Neutron, Swift and the emulated Nova live in their own modules
and rely on :func:`register_cloud` for their users and endpoints; the helpers they share are
:func:`authtoken_options`, :func:`write_config`, :func:`run_setup`, :func:`serve_wsgi` and
:func:`recreate_database`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tests.testcloud.base import REGION, CloudContext

if TYPE_CHECKING:
    from openstack.connection import Connection

SERVICES_VENV = Path.home() / ".cache" / "cloudml-os" / "openstack-services"
REQUIREMENTS = Path(__file__).resolve().with_name("requirements.txt")
# Holds the SHA-256 of the requirements file the virtualenv was built from.
STAMP_NAME = ".requirements-sha256"
# What a usable services virtualenv must import; a half-finished pip install fails here.
SERVICE_PACKAGES = ("keystone", "heat", "glance", "neutron", "swift", "gunicorn", "pymysql")
# Users that get role admin on project `service` (each service authenticates tokens as itself).
SERVICE_USERS = ("heat", "glance", "neutron", "swift", "nova")
# Heat's own domain for the users it makes for servers and wait conditions (heat-keystone-setup-domain).
HEAT_DOMAIN = "heat"
HEAT_DOMAIN_ADMIN = "heat_domain_admin"
# Catalog: service name -> (type, path on that service's port); every endpoint is public, in REGION.
CATALOG = {
    "heat": ("orchestration", "/v1/%(tenant_id)s"),
    "glance": ("image", ""),
    "neutron": ("network", ""),
    "swift": ("object-store", "/v1/AUTH_%(tenant_id)s"),
    "nova": ("compute", "/v2.1"),
}
# Projects of the platform and its API-auth tests: project -> {user: role}.
# The platform's account also holds Keystone's "service" role on project "service", so that
# keystonemiddleware in the API may validate callers' tokens with it (clouds.yaml entry cloudml-os-auth).
PROJECT_USERS = {
    "cloudml": {"cloudml-os": ("member",)},
    "service": {"cloudml-os": ("service",)},
    "team-a": {"alice": ("member",), "carol": ("reader",)},
    "team-b": {"bob": ("member",)},
}
GUNICORN_OPTIONS = ("--workers", "1", "--worker-class", "gthread", "--threads", "4", "--graceful-timeout", "5",
                    "--timeout", "300", "--access-logfile", "-",
                    "--access-logformat", '%(h)s "%(r)s" %(s)s %(b)s %(L)ss')

# The caller's interpreter settings must not leak into a build of another environment.
_ENVIRONMENT_NOT_PASSED = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_USER", "PIP_TARGET", "PIP_PREFIX")

# Run by the services venv's python: is every requirement installed at an allowed version, and does each
# service import? Exit status 0 means the venv is usable.
_VENV_CHECK = """
import importlib, importlib.metadata, sys
from packaging.requirements import Requirement
bad = []
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    requirement = Requirement(line)
    try:
        installed = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        bad.append(f"{requirement.name} missing")
        continue
    if not requirement.specifier.contains(installed, prereleases=True):
        bad.append(f"{requirement.name} {installed} not {requirement.specifier}")
for name in sys.argv[2:]:
    importlib.import_module(name)
sys.exit("; ".join(bad) or None)
"""


# keystone-manage's own CLI, several commands in one process: each separate run spends seconds importing.
_KEYSTONE_MANAGE = """
import json, sys
import keystone.conf
from keystone.cmd import cli
for step in json.loads(sys.argv[2]):
    cli.main(argv=["keystone-manage", "--config-file", sys.argv[1], *step])
    keystone.conf.CONF.clear()
"""


# MariaDB steps run by the services venv's python (the platform's venv has no MySQL driver).
_RECREATE_DATABASE = """
import sys, pymysql
host, port, user, database = sys.argv[1:5]
with pymysql.connect(host=host, port=int(port), user=user) as connection, connection.cursor() as cursor:
    cursor.execute(f"DROP DATABASE IF EXISTS `{database}`")
    cursor.execute(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4")
"""
_DROP_DATABASES = """
import sys, pymysql
host, port, user, prefix = sys.argv[1:5]
with pymysql.connect(host=host, port=int(port), user=user) as connection, connection.cursor() as cursor:
    cursor.execute("SHOW DATABASES LIKE %s", (prefix.replace("_", "\\\\_") + "%",))
    for (database,) in cursor.fetchall():
        cursor.execute(f"DROP DATABASE `{database}`")
"""
_WAIT_FOR_ROW = """
import sys, time, pymysql
host, port, user, database, query, timeout = sys.argv[1:7]
deadline = time.monotonic() + float(timeout)
with pymysql.connect(host=host, port=int(port), user=user, database=database, autocommit=True) as connection:
    while time.monotonic() < deadline:
        with connection.cursor() as cursor:
            if cursor.execute(query):
                sys.exit(0)
        time.sleep(0.2)
sys.exit(1)
"""
# Written into a service's folder once its database is migrated.
SYNCED_MARKER = ".db-synced"


class ServiceStartError(RuntimeError):
    """A service's setup command failed; the message has the command and its output's tail."""


def ensure_services_venv(venv: Path = SERVICES_VENV, requirements: Path = REQUIREMENTS) -> Path:
    """Return the OpenStack services' virtualenv, building it only when its requirements changed or it is broken.

    A venv without a stamp (built by hand) is adopted when it satisfies the requirements, so an existing
    install is not redone. Concurrent callers build once under a file lock.
    """
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    stamp = venv / STAMP_NAME
    if _stamp(stamp) == digest and _venv_problem(venv, requirements) is None:
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp_now = _stamp(stamp)
        problem = _venv_problem(venv, requirements)
        if stamp_now is not None and stamp_now != digest:
            problem = f"{requirements.name} changed since the build"
        if problem is not None:
            _build_venv(venv, requirements, problem)
            problem = _venv_problem(venv, requirements)
            if problem is not None:
                raise ServiceStartError(f"{venv} was just built from {requirements} but is unusable: {problem}")
        if stamp_now != digest:
            stamp.write_text(digest + "\n")
    return venv


def _stamp(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


def _venv_problem(venv: Path, requirements: Path) -> str | None:
    """Why the venv cannot serve (a missing or wrong package, a failing import), or None."""
    python = venv / "bin" / "python"
    if not python.exists():
        return f"{python} does not exist"
    result = subprocess.run([str(python), "-W", "ignore", "-c", _VENV_CHECK, str(requirements), *SERVICE_PACKAGES],
                            capture_output=True, text=True, env=_clean_environment())
    return None if result.returncode == 0 else (result.stderr.strip()[-500:] or f"exit {result.returncode}")


def _build_venv(venv: Path, requirements: Path, reason: str) -> None:
    from cloudml_os.runtimes import base_python

    print(f"testcloud: rebuilding {venv} from {requirements} (minutes): {reason}", file=sys.stderr, flush=True)
    if venv.exists():
        shutil.rmtree(venv)
    for argv in ([base_python(), "-m", "venv", str(venv)],
                 [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                  "--progress-bar", "off", "-r", str(requirements)]):
        result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=_clean_environment())
        if result.returncode != 0:
            raise ServiceStartError(f"{' '.join(argv)} failed (exit {result.returncode}):\n{result.stdout[-3000:]}")


def _clean_environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in _ENVIRONMENT_NOT_PASSED}


def recreate_database(ctx: CloudContext, name: str) -> str:
    """Drop and create this cloud's MariaDB database ``name``; return its SQLAlchemy URL.

    MariaDB rather than SQLite: SQLite answers "database is locked" at once when two threads of one
    service (Keystone's token requests, Heat's resource workers) write together.
    """
    _mariadb(ctx, _RECREATE_DATABASE, name)
    return ctx.mariadb_url(name)


def drop_databases(ctx: CloudContext) -> None:
    """Drop every MariaDB database of this cloud instance (``cmlosN_*``)."""
    _mariadb(ctx, _DROP_DATABASES, "")


def _mariadb(ctx: CloudContext, script: str, database: str, *args: str, wait: bool = True) -> subprocess.Popen:
    """Run ``script`` with the services venv's python (PyMySQL): argv host, port, user, database, *args."""
    url = urlsplit(ctx.mariadb_url(database))
    argv = [ctx.bin("python"), "-c", script, url.hostname or "127.0.0.1", str(url.port or 3306),
            url.username or "root", url.path.lstrip("/"), *args]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=_clean_environment())
    if wait:
        output, _ = process.communicate()
        if process.returncode != 0:
            raise ServiceStartError(f"MariaDB step on {url.path.lstrip('/')} failed: {output.decode()[-2000:]}")
    return process


def write_config(path: Path, sections: Mapping[str, Mapping[str, object]]) -> Path:
    """Write an oslo.config / paste style INI file (no interpolation, values as given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for section, options in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {value}" for key, value in options.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def authtoken_options(ctx: CloudContext, username: str) -> dict[str, str]:
    """The ``[keystone_authtoken]`` section of a service validating tokens as its own user.

    ``interface = public`` because the catalog has only public endpoints.
    """
    return {
        "www_authenticate_uri": ctx.url("keystone"),
        "auth_url": ctx.auth_url,
        "auth_type": "password",
        "username": username,
        "password": ctx.service_password,
        "project_name": "service",
        "user_domain_id": "default",
        "project_domain_id": "default",
        "interface": "public",
        "region_name": REGION,
    }


def run_setup(ctx: CloudContext, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> None:
    """Run one setup command (db_sync and the like) to completion, its output appended to ``logs/NAME.log``.

    :raises ServiceStartError: it exited non-zero; the message has its output's tail.
    """
    logs = ctx.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**_clean_environment(), **(env or {})}, cwd=ctx.root)
    with open(logs / f"{name}.log", "ab") as log:
        log.write(result.stdout)
    if result.returncode != 0:
        tail = result.stdout.decode(errors="replace")[-3000:]
        raise ServiceStartError(f"{' '.join(argv)} failed (exit {result.returncode}):\n{tail}")


def serve_wsgi(ctx: CloudContext, name: str, app: str, argv: list[str] | None = None,
               env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Serve WSGI ``app`` (``module:attribute``) with the services venv's gunicorn on ``ctx.port(name)``.

    OpenStack WSGI modules parse ``sys.argv`` with oslo.config when imported, and would choke on gunicorn's;
    a generated module sets it to ``[NAME-api, *argv]`` first. One gthread worker keeps each API at
    about one Python process of memory.
    """
    module, attribute = app.split(":")
    shims = ctx.root / "wsgi"
    shims.mkdir(parents=True, exist_ok=True)
    shim = f"{name.replace('-', '_')}_wsgi"
    (shims / f"{shim}.py").write_text(
        f"import sys\n\nsys.argv = {[f'{name}-api', *(argv or [])]!r}\n"
        f"from {module} import {attribute} as application  # noqa: E402\n")
    command = [ctx.bin("gunicorn"), "--bind", f"{ctx.host}:{ctx.port(name)}", "--name", f"{name}-api",
               *GUNICORN_OPTIONS, "--pythonpath", str(shims), f"{shim}:application"]
    return ctx.spawn(f"{name}-api", command, env=dict(env or {}))


def start_keystone(ctx: CloudContext) -> None:
    """Configure, bootstrap and serve Keystone (MariaDB, fernet tokens) at ``ctx.url("keystone")``."""
    home = ctx.root / "keystone"
    fernet_keys, credential_keys = home / "fernet-keys", home / "credential-keys"
    for folder in (fernet_keys, credential_keys):
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
    conf = write_config(home / "keystone.conf", {
        "DEFAULT": {"use_stderr": "true"},
        "database": {"connection": recreate_database(ctx, "keystone")},
        "token": {"provider": "fernet", "expiration": 43200},
        "fernet_tokens": {"key_repository": fernet_keys},
        "credential": {"key_repository": credential_keys},
        # bcrypt's default cost makes every user creation and password login take a quarter second.
        "identity": {"password_hash_rounds": 4},
        # One worker process, so an in-process cache stays coherent; it saves token validation and role
        # lookups on every request, the bulk of each call's time.
        "cache": {"enabled": "true", "backend": "dogpile.cache.memory"},
    })
    owner = ["--keystone-user", "root", "--keystone-group", "root"]
    steps = [["db_sync"], ["fernet_setup", *owner], ["credential_setup", *owner],
             ["bootstrap", "--bootstrap-password", ctx.admin_password, "--bootstrap-username", "admin",
              "--bootstrap-project-name", "admin", "--bootstrap-role-name", "admin", "--bootstrap-service-name",
              "keystone", "--bootstrap-region-id", REGION, "--bootstrap-public-url", ctx.auth_url]]
    run_setup(ctx, "keystone-manage", [ctx.bin("python"), "-c", _KEYSTONE_MANAGE, str(conf), json.dumps(steps)])
    for folder in (fernet_keys, credential_keys):
        if not (folder / "0").is_file():
            raise ServiceStartError(f"keystone-manage did not write its keys into {folder}")
    process = serve_wsgi(ctx, "keystone", "keystone.wsgi.api:application",
                         env={"OS_KEYSTONE_CONFIG_FILES": str(conf)})
    ctx.wait_http(ctx.auth_url, process)


def connect(ctx: CloudContext, username: str, password: str, project: str) -> Connection:
    """An openstacksdk connection of one user scoped to one project (Default domain), public endpoints."""
    from openstack.connection import Connection

    return Connection(auth={"auth_url": ctx.auth_url, "username": username, "password": password,
                            "project_name": project, "user_domain_id": "default", "project_domain_id": "default"},
                      region_name=REGION, interface="public", identity_api_version="3")


def admin_connection(ctx: CloudContext) -> Connection:
    """The bootstrap admin (project ``admin``)."""
    return connect(ctx, "admin", ctx.admin_password, "admin")


def register_cloud(ctx: CloudContext) -> None:
    """Make the users, projects, roles, Heat's stack-user domain and the service catalog in Keystone.

    Idempotent: what exists already is kept, so a restarted cloud can re-register. Everything is listed
    once and only the missing pieces are created, which keeps this to about forty API calls.
    """
    conn = admin_connection(ctx)
    try:
        identity = conn.identity
        existing = _Identity(identity)
        roles = {name: existing.ensure("role", name) for name in
                 ("admin", "member", "reader", "service", "heat_stack_owner", "heat_stack_user")}
        service = existing.ensure("project", "service", domain_id="default", description="OpenStack services")
        for name in SERVICE_USERS:
            user = existing.ensure("user", name, domain_id="default", password=ctx.service_password,
                                   default_project_id=service.id)
            identity.assign_project_role_to_user(service, user, roles["admin"])
        # Servers with software config and wait-condition handles get users in this domain; stacks of
        # plain resources never touch it, but Heat is configured the way a production install is.
        heat_domain = existing.ensure("domain", HEAT_DOMAIN, description="Users and projects made by Heat")
        domain_admin = existing.ensure("user", HEAT_DOMAIN_ADMIN, domain_id=heat_domain.id,
                                       password=ctx.service_password)
        identity.assign_domain_role_to_user(heat_domain, domain_admin, roles["admin"])
        for project_name, members in PROJECT_USERS.items():
            project = existing.ensure("project", project_name, domain_id="default")
            for username, granted in members.items():
                user = existing.ensure("user", username, domain_id="default", password=ctx.service_password,
                                       default_project_id=project.id)
                for role in granted:
                    identity.assign_project_role_to_user(project, user, roles[role])
        endpoints = {(endpoint.service_id, endpoint.url) for endpoint in identity.endpoints(interface="public")}
        for name, (service_type, path) in CATALOG.items():
            catalog_service = existing.ensure("service", name, type=service_type)
            url = ctx.url(name, path)
            if (catalog_service.id, url) not in endpoints:
                identity.create_endpoint(service_id=catalog_service.id, interface="public", url=url,
                                         region_id=REGION)
    finally:
        conn.close()


class _Identity:
    """Keystone's roles, projects, users, domains and services, listed once, created when missing."""

    def __init__(self, identity) -> None:
        self.identity = identity
        self.found = {kind: {(getattr(item, "domain_id", None), item.name): item for item in listing}
                      for kind, listing in (("role", identity.roles()), ("project", identity.projects()),
                                            ("user", identity.users()), ("domain", identity.domains()),
                                            ("service", identity.services()))}

    def ensure(self, kind: str, name: str, **attributes):
        key = (attributes.get("domain_id"), name)
        if key not in self.found[kind]:
            self.found[kind][key] = getattr(self.identity, f"create_{kind}")(name=name, **attributes)
        return self.found[kind][key]


def configure_heat(ctx: CloudContext) -> Path:
    """Write heat.conf and make Heat's database anew; needs only MariaDB, so it can overlap Keystone's start."""
    home = ctx.root / "heat"
    (home / "plugins").mkdir(parents=True, exist_ok=True)
    etc = ctx.venv / "etc" / "heat"
    conf = write_config(home / "heat.conf", {
        "DEFAULT": {
            "transport_url": ctx.rabbit_url(),
            "num_engine_workers": 1,
            "plugin_dirs": home / "plugins",
            "environment_dir": etc / "environment.d",
            "template_dir": etc / "templates",
            "region_name_for_services": REGION,
            "stack_user_domain_name": HEAT_DOMAIN,
            "stack_domain_admin": HEAT_DOMAIN_ADMIN,
            "stack_domain_admin_password": ctx.service_password,
            "graceful_shutdown_timeout": 5,
            "use_stderr": "true",
        },
        "database": {"connection": recreate_database(ctx, "heat")},
        "keystone_authtoken": authtoken_options(ctx, "heat"),
        "trustee": {"auth_type": "password", "auth_url": ctx.auth_url, "username": "heat",
                    "password": ctx.service_password, "user_domain_id": "default"},
        # Every OpenStack client Heat makes (nova, neutron, glance, swift, keystone) reads [clients] unless
        # its own [clients_*] says otherwise: the catalog has only public endpoints.
        "clients": {"endpoint_type": "public"},
        "clients_keystone": {"auth_uri": ctx.url("keystone")},
        "oslo_messaging_notifications": {"driver": "noop"},
        "oslo_concurrency": {"lock_path": home / "locks"},
        "paste_deploy": {"api_paste_config": etc / "api-paste.ini"},
    })
    run_setup(ctx, "heat-manage", [ctx.bin("heat-manage"), "--config-file", str(conf), "db_sync"])
    (home / SYNCED_MARKER).touch()
    return conf


def start_heat(ctx: CloudContext, timeout: float = 120) -> None:
    """Start heat-engine and heat-api (gunicorn) at ``ctx.url("heat")``; Keystone must be registered.

    Returns once the API answers and the engine has registered itself, so the first stack is not
    queued behind an engine still importing.
    """
    home = ctx.root / "heat"
    if not (home / SYNCED_MARKER).exists():
        configure_heat(ctx)
    conf = home / "heat.conf"
    engine = ctx.spawn("heat-engine", [ctx.bin("heat-engine"), "--config-file", str(conf)])
    api = serve_wsgi(ctx, "heat", "heat.wsgi.api:application", argv=["--config-file", str(conf)])
    # heat-engine writes its row in ``service`` right after its RPC server starts listening.
    registered = _mariadb(ctx, _WAIT_FOR_ROW, "heat", "SELECT 1 FROM service WHERE deleted_at IS NULL",
                          str(timeout), wait=False)
    try:
        ctx.wait_http(ctx.url("heat", "/"), api, timeout=timeout)
        while registered.poll() is None:
            if engine.poll() is not None:
                raise ServiceStartError(f"heat-engine exited with {engine.returncode}; see {ctx.root / 'logs'}")
            time.sleep(0.2)
    finally:
        if registered.poll() is None:
            registered.kill()
        registered.wait()
    if registered.returncode != 0:
        raise ServiceStartError(f"heat-engine did not register within {timeout:g}s; see {ctx.root / 'logs'}")


def configure_glance(ctx: CloudContext) -> Path:
    """Write glance-api.conf (file store) and make Glance's database anew; needs only MariaDB."""
    home = ctx.root / "glance"
    stores = {name: home / name for name in ("images", "staging", "tasks")}
    for folder in stores.values():
        folder.mkdir(parents=True, exist_ok=True)
    conf = write_config(home / "glance-api.conf", {
        "DEFAULT": {"enabled_backends": "fs:file", "use_stderr": "true"},
        "glance_store": {"default_backend": "fs"},
        "fs": {"filesystem_store_datadir": stores["images"]},
        "os_glance_staging_store": {"filesystem_store_datadir": stores["staging"]},
        "os_glance_tasks_store": {"filesystem_store_datadir": stores["tasks"]},
        "database": {"connection": recreate_database(ctx, "glance")},
        "keystone_authtoken": authtoken_options(ctx, "glance"),
        "paste_deploy": {"flavor": "keystone", "config_file": ctx.venv / "etc" / "glance" / "glance-api-paste.ini"},
        "oslo_concurrency": {"lock_path": home / "locks"},
    })
    run_setup(ctx, "glance-manage", [ctx.bin("glance-manage"), "--config-file", str(conf), "db_sync"])
    (home / SYNCED_MARKER).touch()
    return conf


def start_glance(ctx: CloudContext) -> None:
    """Serve glance-api (gunicorn, file store) at ``ctx.url("glance")``."""
    home = ctx.root / "glance"
    if not (home / SYNCED_MARKER).exists():
        configure_glance(ctx)
    # glance.wsgi.api reads glance-api.conf from the folder OS_GLANCE_CONFIG_DIR names.
    process = serve_wsgi(ctx, "glance", "glance.wsgi.api:application", env={"OS_GLANCE_CONFIG_DIR": str(home)})
    ctx.wait_http(ctx.url("glance", "/"), process)


def upload_image(conn: Connection, name: str, data: bytes, *, visibility: str = "public",
                 disk_format: str = "raw", container_format: str = "bare", timeout: float = 120) -> str:
    """Upload ``data`` as a Glance image, wait until it is active, and return its id.

    Public by default so every project's servers can boot it (needs an admin connection).
    """
    image = conn.image.create_image(name, data=data, disk_format=disk_format, container_format=container_format,
                                    visibility=visibility, wait=True, timeout=timeout)
    return image.id
