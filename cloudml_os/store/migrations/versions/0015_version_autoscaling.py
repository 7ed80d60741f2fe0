"""serving: a version's autoscaling policy

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-08 01:20:00.000000
"""
import sqlalchemy as sa
from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('versions') as batch:
        batch.add_column(sa.Column('auto_scaling', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('versions') as batch:
        batch.drop_column('auto_scaling')
