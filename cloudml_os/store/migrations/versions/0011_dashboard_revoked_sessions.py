"""dashboard sessions signed out before they expired, refused by every API process of the installation

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 04:20:00.000000
"""
import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'dashboard_revoked_sessions',
        sa.Column('session_id', sa.String(length=32), nullable=False),
        sa.Column('until', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('session_id'),
    )
    op.create_index('ix_dashboard_revoked_sessions_until', 'dashboard_revoked_sessions', ['until'])


def downgrade() -> None:
    op.drop_index('ix_dashboard_revoked_sessions_until', table_name='dashboard_revoked_sessions')
    op.drop_table('dashboard_revoked_sessions')
