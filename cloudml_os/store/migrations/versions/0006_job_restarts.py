"""job restarts: jobs.restart_count, nodes.attempt and nodes.log_base

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 11:00:00.000000
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('restart_count', sa.Integer(), nullable=False, server_default='0'))
    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.add_column(sa.Column('attempt', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('log_base', sa.BigInteger(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.drop_column('log_base')
        batch_op.drop_column('attempt')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('restart_count')
