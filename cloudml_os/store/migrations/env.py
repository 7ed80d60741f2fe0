"""Alembic environment: runs migrations online against the URL the Store was given."""

from alembic import context
from sqlalchemy import create_engine

from cloudml_os.store.models import Base

config = context.config
with create_engine(config.get_main_option("sqlalchemy.url")).connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
