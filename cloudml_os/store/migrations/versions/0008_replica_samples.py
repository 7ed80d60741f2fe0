"""replica probe samples: each replica's health-probe count, failures and latency per ten seconds

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 11:40:00.000000
"""
import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'replica_samples',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('version_id', sa.Integer(), nullable=False),
        sa.Column('replica_id', sa.Integer(), nullable=False),
        sa.Column('replica', sa.String(length=64), nullable=False),
        sa.Column('time', sa.DateTime(), nullable=False),
        sa.Column('probes', sa.Integer(), nullable=False),
        sa.Column('failures', sa.Integer(), nullable=False),
        sa.Column('latency_p50_ms', sa.Double(), nullable=True),
        sa.Column('latency_max_ms', sa.Double(), nullable=True),
        sa.Column('healthy', sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_replica_samples_version_time', 'replica_samples', ['version_id', 'time'])
    op.create_index('ix_replica_samples_time', 'replica_samples', ['time'])


def downgrade() -> None:
    op.drop_index('ix_replica_samples_time', table_name='replica_samples')
    op.drop_index('ix_replica_samples_version_time', table_name='replica_samples')
    op.drop_table('replica_samples')
