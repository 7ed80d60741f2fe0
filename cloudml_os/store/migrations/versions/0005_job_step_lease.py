"""job step lease: jobs.lease_owner and jobs.lease_until

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 11:00:00.000000
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lease_owner', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('lease_until', sa.DateTime(), nullable=True))
        batch_op.create_index('ix_jobs_lease_until', ['lease_until'])


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_lease_until')
        batch_op.drop_column('lease_until')
        batch_op.drop_column('lease_owner')
