"""one serving cluster per version: cluster lease columns, replicas lose cluster_name

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 20:45:00.000000
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('clusters', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lock_owner', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('lock_until', sa.DateTime(), nullable=True))

    # A replica is now node replica-K of its version's cluster, cml-serve-{version id}.
    with op.batch_alter_table('replicas', schema=None) as batch_op:
        batch_op.drop_column('cluster_name')


def downgrade() -> None:
    # Old replicas each had a cluster of their own; their names are made up again in that pattern.
    with op.batch_alter_table('replicas', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cluster_name', sa.String(length=128), nullable=True))
    op.execute("UPDATE replicas SET cluster_name = 'cml-serve-' || version_id || '-r' || id")
    with op.batch_alter_table('replicas', schema=None) as batch_op:
        batch_op.alter_column('cluster_name', existing_type=sa.String(length=128), nullable=False)
        batch_op.create_unique_constraint('uq_replicas_cluster_name', ['cluster_name'])

    with op.batch_alter_table('clusters', schema=None) as batch_op:
        batch_op.drop_column('lock_until')
        batch_op.drop_column('lock_owner')
