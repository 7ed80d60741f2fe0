"""serving: a model's traffic split; a version's request logging and prediction deadline

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 21:30:00.000000
"""
import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('models') as batch:
        batch.add_column(sa.Column('traffic_split', sa.JSON(), nullable=True))
    with op.batch_alter_table('versions') as batch:
        batch.add_column(sa.Column('request_logging', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('prediction_deadline', sa.Double(), nullable=False, server_default='5'))
    with op.batch_alter_table('versions') as batch:
        batch.alter_column('prediction_deadline', server_default=None)


def downgrade() -> None:
    with op.batch_alter_table('versions') as batch:
        batch.drop_column('prediction_deadline')
        batch.drop_column('request_logging')
    with op.batch_alter_table('models') as batch:
        batch.drop_column('traffic_split')
