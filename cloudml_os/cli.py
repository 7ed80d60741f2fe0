"""``cloudml-os``: the server-side command (up, api, worker, beat, monitor, db, token, runtime).

``up`` is the embedded default in one foreground command: it migrates the database, builds the node
runtime if missing, and supervises one API server, one Celery worker, Celery beat (the reconciler's
clock) and the health monitor until interrupted.
Settings come from ``--config``/``CLOUDML_OS_CONFIG``, the environment, then these flags.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cloudml_os.config import ConfigError, Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        getattr(args, "config", None),
        data_dir=getattr(args, "data_dir", None),
        api_port=getattr(args, "port", None),
        api_host=getattr(args, "host", None),
    )


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from cloudml_os.store import migrate

    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.database_url)
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    from cloudml_os.auth.tokens import create_token
    from cloudml_os.store import Store, migrate

    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.database_url)
    try:
        token = create_token(Store.from_settings(settings), args.project, args.role, args.description)
    except ValueError as exc:
        print(f"cloudml-os: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def cmd_runtime_build(args: argparse.Namespace) -> int:
    from cloudml_os.runtimes import available_runtimes, ensure_runtime

    settings = _settings(args)
    for name in args.names or available_runtimes():
        print(ensure_runtime(name, settings.runtimes_dir))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from cloudml_os.platform import worker_celery

    settings = _settings(args)
    app = worker_celery(settings)
    app.worker_main([
        "worker", "--pool=threads", f"--concurrency={args.concurrency}", f"--queues={settings.task_queue}",
        f"--loglevel={args.loglevel}", "--without-gossip", "--without-mingle", "--without-heartbeat",
        f"--hostname=cloudml-os-{os.getpid()}@%h",
    ])
    return 0


def cmd_beat(args: argparse.Namespace) -> int:
    from cloudml_os.tasks import make_celery, run_beat

    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    run_beat(make_celery(settings), str(settings.data_dir / "celerybeat-schedule"), args.loglevel)
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    from cloudml_os.platform import run_monitor

    run_monitor(_settings(args))
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    from gunicorn.app.base import BaseApplication

    from cloudml_os.platform import wsgi_app

    settings = _settings(args)
    application = wsgi_app(settings)

    class Server(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"{settings.api_host}:{settings.api_port}")
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("workers", 1)
            self.cfg.set("threads", args.threads)
            self.cfg.set("timeout", 0)  # log following holds a request open
            # Clients such as the ml v1 library keep connections idle between calls for a while; a
            # short keep-alive closes them under the client, which then fails its next write.
            self.cfg.set("keepalive", 120)
            self.cfg.set("accesslog", "-")

        def load(self):
            return application

    Server().run()
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    from cloudml_os.runtimes import available_runtimes, ensure_runtime
    from cloudml_os.store import migrate

    migrate(settings.database_url)
    for name in available_runtimes():
        ensure_runtime(name, settings.runtimes_dir)
    env = {**os.environ, "CLOUDML_OS_DATA_DIR": str(settings.data_dir),
           "CLOUDML_OS_API_PORT": str(settings.api_port), "CLOUDML_OS_API_HOST": settings.api_host}
    if getattr(args, "config", None):
        env["CLOUDML_OS_CONFIG"] = str(Path(args.config).absolute())
    command = [sys.executable, "-m", "cloudml_os.cli"]
    children = [
        subprocess.Popen([*command, "worker"], env=env),
        subprocess.Popen([*command, "api"], env=env),
        subprocess.Popen([*command, "monitor"], env=env),
        subprocess.Popen([*command, "beat"], env=env),
    ]
    base = f"http://{settings.api_host}:{settings.api_port}"
    data_flag = f" --data-dir {settings.data_dir}" if getattr(args, "data_dir", None) else ""
    print(f"\ncloudml-os is starting on {base} (data in {settings.data_dir})\n"
          f"Get a token:   .venv/bin/cloudml-os token create --project my-project --role admin{data_flag}\n"
          f"Then:          curl -H 'Authorization: Bearer TOKEN' {base}/v1/projects/my-project/jobs\n"
          f"Stop with Ctrl-C.\n", flush=True)

    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping and all(child.poll() is None for child in children):
        time.sleep(0.5)
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
    return 0 if stopping else 1


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS,
                        help="TOML settings file (default: $CLOUDML_OS_CONFIG)")
    common.add_argument("--data-dir", default=argparse.SUPPRESS,
                        help="where data lives (default: ./var or $CLOUDML_OS_DATA_DIR)")
    parser = argparse.ArgumentParser(prog="cloudml-os", description=__doc__.splitlines()[0], parents=[common])
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", parents=[common], help="run the whole platform in the foreground (embedded default)")
    up.add_argument("--port", type=int)
    up.add_argument("--host")
    up.set_defaults(func=cmd_up)

    api = commands.add_parser("api", parents=[common], help="serve the REST API")
    api.add_argument("--port", type=int)
    api.add_argument("--host")
    api.add_argument("--threads", type=int, default=16)
    api.set_defaults(func=cmd_api)

    worker = commands.add_parser("worker", parents=[common], help="run a Celery worker")
    worker.add_argument("--concurrency", type=int, default=8)
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(func=cmd_worker)

    beat = commands.add_parser("beat", parents=[common],
                               help="send the reconciler's task on schedule (Celery beat; one or more)")
    beat.add_argument("--loglevel", default="INFO")
    beat.set_defaults(func=cmd_beat)

    monitor = commands.add_parser("monitor", parents=[common], help="probe serving replicas; eject and replace")
    monitor.set_defaults(func=cmd_monitor)

    db = commands.add_parser("db", parents=[common], help="database maintenance")
    db = db.add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", parents=[common], help="apply migrations").set_defaults(func=cmd_db_upgrade)

    token = commands.add_parser("token", parents=[common], help="API tokens")
    token = token.add_subparsers(dest="token_command", required=True)
    create = token.add_parser("create", parents=[common], help="print a new API token")
    create.add_argument("--project", required=True)
    create.add_argument("--role", required=True, choices=["admin", "member", "viewer"])
    create.add_argument("--description", default="")
    create.set_defaults(func=cmd_token_create)

    runtime = commands.add_parser("runtime", parents=[common], help="node runtimes")
    runtime = runtime.add_subparsers(dest="runtime_command", required=True)
    build = runtime.add_parser("build", parents=[common], help="build framework runtimes (once; reused)")
    build.add_argument("names", nargs="*")
    build.set_defaults(func=cmd_runtime_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"cloudml-os: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
