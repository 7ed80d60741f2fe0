"""An all-in-one Swift (account, container and object servers plus the proxy) for the test cloud.

One device, one replica, rings on 127.0.0.1, everything under ``ctx.root/"swift"``. Nothing is
written to ``/etc/swift``: every server's ``swift_dir`` points at our folder, the override Swift's
``run_wsgi`` supports (rings, and the hash suffix of our ``swift.conf``, come from there). Storage
policies and constraints are read once, at import, from ``/etc/swift/swift.conf``; that file does not
exist here, so they are Swift's defaults (one policy, Policy-0; 5 GiB objects), which is what we want.
The proxy has the production pipeline the platform relies on, Keystone auth included; there is
no memcached, and Swift's cache client then treats every lookup as a miss (Keystone validates each
token, ratelimit does nothing), which is slower but correct.

Storage lives on this machine's ext4, which has the user xattrs Swift keeps object metadata in, but
only one 4 KiB block of them per file: an object with more than about 3 KiB of user metadata is
refused (507 from the object server, 503 from the proxy) where XFS would take Swift's full 4 KiB.
The platform's objects carry a few hundred bytes.
"""

from __future__ import annotations

import getpass
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.testcloud.base import CloudContext
from tests.testcloud.services import authtoken_options, run_setup, write_config

RINGS = {"account": "swift-account", "container": "swift-container", "object": "swift-object"}
PART_POWER = 6
DEVICE = "d1"

# Production order: auth before everything that acts on behalf of a user; proxy-logging twice so
# that subrequests (SLO segments, copies) are logged too.
PROXY_PIPELINE = ("catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk tempurl ratelimit "
                  "authtoken keystoneauth copy container-quotas account-quotas slo dlo versioned_writes symlink "
                  "proxy-logging proxy-server")

PROXY_FILTERS = {
    "catch_errors": "catch_errors", "gatekeeper": "gatekeeper", "healthcheck": "healthcheck",
    "proxy-logging": "proxy_logging", "cache": "memcache", "listing_formats": "listing_formats", "bulk": "bulk",
    "tempurl": "tempurl", "ratelimit": "ratelimit", "copy": "copy", "container-quotas": "container_quotas",
    "account-quotas": "account_quotas", "slo": "slo", "dlo": "dlo", "symlink": "symlink",
}


def swift_folder(ctx: CloudContext) -> Path:
    return ctx.root / "swift"


def start_swift(ctx: CloudContext) -> None:
    """Write Swift's configuration and rings, start its four servers and wait until the proxy answers.

    The object-store endpoint and the ``swift`` Keystone user are registered by ``register_cloud``;
    the proxy only needs them when the first authenticated request arrives.
    """
    folder = swift_folder(ctx)
    (folder / "devices" / DEVICE).mkdir(parents=True, exist_ok=True)
    _write_swift_conf(folder)
    # Each ring is three swift-ring-builder runs of about half a second each; the three rings build side by side.
    with ThreadPoolExecutor(len(RINGS)) as pool:
        builds = [pool.submit(_build_ring, ctx, folder, ring, ctx.port(service)) for ring, service in RINGS.items()]
        for build in builds:
            build.result()
    for ring, service in RINGS.items():
        write_config(folder / f"{ring}-server.conf", _storage_server_conf(ctx, folder, ring, ctx.port(service)))
    write_config(folder / "proxy-server.conf", _proxy_conf(ctx, folder))

    # -v adds a console log (our log file) next to syslog, which has no /dev/log here and goes nowhere.
    processes = {name: ctx.spawn(f"swift-{name}", [ctx.bin(f"swift-{name}"), str(folder / f"{name}.conf"), "-v"])
                 for name in ("account-server", "container-server", "object-server", "proxy-server")}
    for name, service in [*((f"{ring}-server", port) for ring, port in RINGS.items()), ("proxy-server", "swift")]:
        ctx.wait_http(ctx.url(service, "/healthcheck"), processes[name])


def _write_swift_conf(folder: Path) -> None:
    """The hash suffix is made once: a new one would make the stored objects unreachable."""
    path = folder / "swift.conf"
    if path.exists():
        return
    write_config(path, {"swift-hash": {"swift_hash_path_suffix": secrets.token_hex(16)}})


def _build_ring(ctx: CloudContext, folder: Path, ring: str, port: int) -> None:
    """One device, one replica; kept once built, since the ports of an instance never change."""
    if (folder / f"{ring}.ring.gz").exists():
        return
    builder = [ctx.bin("swift-ring-builder"), str(folder / f"{ring}.builder")]
    # It never resolves a name; skipping eventlet's green DNS (dnspython) takes a third off each run.
    env = {"EVENTLET_NO_GREENDNS": "yes"}
    run_setup(ctx, "swift-ring-builder", [*builder, "create", str(PART_POWER), "1", "1"], env=env)
    run_setup(ctx, "swift-ring-builder", [*builder, "add", f"r1z1-{ctx.host}:{port}/{DEVICE}", "100"], env=env)
    run_setup(ctx, "swift-ring-builder", [*builder, "rebalance", "--format-version=2"], env=env)


def _common(ctx: CloudContext, folder: Path, port: int, name: str) -> dict[str, str]:
    # workers = 0 serves from the started process itself (eventlet, concurrent): one process per server,
    # and ctx.stop's SIGTERM reaches the server directly.
    return {"bind_ip": ctx.host, "bind_port": str(port), "workers": "0", "swift_dir": str(folder),
            "user": getpass.getuser(), "log_name": name, "devices": str(folder / "devices"),
            "mount_check": "false"}


def _storage_server_conf(ctx: CloudContext, folder: Path, ring: str, port: int) -> dict[str, dict[str, str]]:
    return {
        "DEFAULT": _common(ctx, folder, port, f"{ring}-server"),
        "pipeline:main": {"pipeline": f"healthcheck {ring}-server"},
        "filter:healthcheck": {"use": "egg:swift#healthcheck"},
        f"app:{ring}-server": {"use": f"egg:swift#{ring}"},
    }


def _proxy_conf(ctx: CloudContext, folder: Path) -> dict[str, dict[str, str]]:
    conf: dict[str, dict[str, str]] = {
        "DEFAULT": _common(ctx, folder, ctx.port("swift"), "proxy-server"),
        "pipeline:main": {"pipeline": PROXY_PIPELINE},
        "app:proxy-server": {"use": "egg:swift#proxy", "account_autocreate": "true"},
    }
    for name, entry_point in PROXY_FILTERS.items():
        conf[f"filter:{name}"] = {"use": f"egg:swift#{entry_point}"}
    # No memcached here: every cache call fails fast (the server is error-limited after a few refusals)
    # and would log an error per request; only the cache's own logger is quietened.
    conf["filter:cache"]["log_level"] = "CRITICAL"
    conf["filter:versioned_writes"] = {"use": "egg:swift#versioned_writes", "allow_versioned_writes": "true"}
    conf["filter:keystoneauth"] = {"use": "egg:swift#keystoneauth", "operator_roles": "admin, member",
                                   "reseller_prefix": "AUTH_"}
    # delay_auth_decision lets keystoneauth answer anonymous requests itself (tempurl, public containers).
    # service_type makes the middleware enforce application credentials' access rules (the platform's nodes get
    # one that reads only their project's container); without it, every token carrying rules is refused. The
    # rules are matched against the token's catalog, so the middleware must fetch it (include_service_catalog).
    conf["filter:authtoken"] = {"paste.filter_factory": "keystonemiddleware.auth_token:filter_factory",
                                **authtoken_options(ctx, "swift"), "delay_auth_decision": "true",
                                "cache": "swift.cache", "include_service_catalog": "true",
                                "service_type": "object-store"}
    return conf

