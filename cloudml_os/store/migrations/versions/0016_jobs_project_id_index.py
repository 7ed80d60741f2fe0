"""jobs: an index for jobs.list's page (a project's jobs, newest first)

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-08 01:55:00.000000
"""
from alembic import op

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_jobs_project_id', 'jobs', ['project', 'id'])


def downgrade() -> None:
    op.drop_index('ix_jobs_project_id', table_name='jobs')
