"""resumable upload sessions of the objects API

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 07:30:00.000000
"""
import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'object_uploads',
        sa.Column('upload_id', sa.String(length=36), nullable=False),
        sa.Column('project', sa.String(length=64), nullable=False),
        sa.Column('name', sa.String(length=1024), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('chunk_bytes', sa.BigInteger(), nullable=False),
        sa.Column('md5', sa.String(length=32), nullable=True),
        sa.Column('sha256', sa.String(length=64), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('upload_id'),
    )
    op.create_index('ix_object_uploads_project', 'object_uploads', ['project'])
    op.create_index('ix_object_uploads_updated_at', 'object_uploads', ['updated_at'])


def downgrade() -> None:
    op.drop_index('ix_object_uploads_updated_at', table_name='object_uploads')
    op.drop_index('ix_object_uploads_project', table_name='object_uploads')
    op.drop_table('object_uploads')
