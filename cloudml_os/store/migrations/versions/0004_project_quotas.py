"""per-project quota overrides (and the row quota checks lock)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 10:50:00.000000
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'project_quotas',
        sa.Column('project', sa.String(length=63), nullable=False),
        sa.Column('gpus', sa.Integer(), nullable=True),
        sa.Column('nodes', sa.Integer(), nullable=True),
        sa.Column('jobs', sa.Integer(), nullable=True),
        sa.Column('replicas', sa.Integer(), nullable=True),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('project'),
    )


def downgrade() -> None:
    op.drop_table('project_quotas')
