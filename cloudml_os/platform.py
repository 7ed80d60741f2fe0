"""Wiring: builds the real store, driver, artifact store and plugins from settings, for each process.

The only place where concrete implementations are chosen; everything else receives them as arguments.
"""

from __future__ import annotations

from flask import Flask

from cloudml_os.artifacts.local import LocalArtifactStore
from cloudml_os.cloud.base import load_driver
from cloudml_os.config import Settings, load_settings
from cloudml_os.frameworks.base import load_frameworks
from cloudml_os.store import Node, Store
from cloudml_os.tasks import job_starter, make_celery
from cloudml_os.workflows.train import TrainingContext


def training_context(settings: Settings) -> TrainingContext:
    from cloudml_os.remote import connect_node

    def connect(node: Node, private_key: str):
        return connect_node(node, private_key, settings)

    return TrainingContext(
        settings=settings,
        store=Store(settings.database_url),
        driver=load_driver(settings),
        artifacts=LocalArtifactStore(settings.artifacts_root),
        frameworks=load_frameworks(),
        connect=connect,
    )


def worker_celery(settings: Settings):
    return make_celery(settings, lambda: training_context(settings))


def wsgi_app(settings: Settings | None = None) -> Flask:
    """The API application with its real dependencies (what gunicorn serves)."""
    from cloudml_os.app import create_app

    settings = settings or load_settings()
    return create_app(
        settings,
        store=Store(settings.database_url),
        artifacts=LocalArtifactStore(settings.artifacts_root),
        frameworks=load_frameworks(),
        start_job=job_starter(make_celery(settings)),
    )
