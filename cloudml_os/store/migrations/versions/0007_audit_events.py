"""audit trail of mutating API calls (the dashboard's admin Events panel)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 11:00:00.000000
"""
import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'audit_events',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('time', sa.DateTime(), nullable=False),
        sa.Column('caller', sa.String(length=255), nullable=False),
        sa.Column('caller_project', sa.String(length=63), nullable=False),
        sa.Column('project', sa.String(length=63), nullable=True),
        sa.Column('method', sa.String(length=8), nullable=False),
        sa.Column('resource', sa.String(length=512), nullable=False),
        sa.Column('status', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_audit_events_time', 'audit_events', ['time'])
    op.create_index('ix_audit_events_project', 'audit_events', ['project'])


def downgrade() -> None:
    op.drop_index('ix_audit_events_project', table_name='audit_events')
    op.drop_index('ix_audit_events_time', table_name='audit_events')
    op.drop_table('audit_events')
