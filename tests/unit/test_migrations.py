"""The Alembic migrations build exactly the schema the models describe, on SQLite and PostgreSQL, and go back.

Migrations are written by hand (several changes land at once); a column a model has and no migration adds,
or the other way round, would only show on a real installation's next upgrade. Alembic's own comparison
(the one ``alembic revision --autogenerate`` uses) finds it here first.
"""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from cloudml_os.store import MIGRATIONS, migrate
from cloudml_os.store.models import Base


def _differences(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def _alembic(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'migrations.db'}"
    return request.getfixturevalue("own_database_url")


def test_migrations_build_the_schema_the_models_describe(database_url):
    migrate(database_url)
    assert _differences(database_url) == []


def test_migrations_go_down_to_nothing_and_up_again(database_url):
    migrate(database_url)
    command.downgrade(_alembic(database_url), "base")
    engine = create_engine(database_url)
    with engine.connect() as connection:
        tables = MigrationContext.configure(connection).impl.dialect.get_table_names(connection)
    engine.dispose()
    assert set(tables) <= {"alembic_version"}
    migrate(database_url)
    assert _differences(database_url) == []
