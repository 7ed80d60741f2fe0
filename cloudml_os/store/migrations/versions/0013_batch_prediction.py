"""batch prediction jobs: predictionInput/predictionOutput on jobs, and their shards

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 18:00:00.000000
"""
import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('prediction_input', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('prediction_output', sa.JSON(), nullable=False, server_default='{}'))
    with op.batch_alter_table('jobs') as batch:
        batch.alter_column('prediction_output', server_default=None)
    op.create_table(
        'prediction_shards',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=False),
        sa.Column('index', sa.Integer(), nullable=False),
        sa.Column('input_uri', sa.String(length=1100), nullable=False),
        sa.Column('start', sa.BigInteger(), nullable=False),
        sa.Column('end', sa.BigInteger(), nullable=True),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('node', sa.String(length=128), nullable=True),
        sa.Column('run', sa.Integer(), nullable=False),
        sa.Column('failures', sa.Integer(), nullable=False),
        sa.Column('records_total', sa.BigInteger(), nullable=True),
        sa.Column('records_done', sa.BigInteger(), nullable=False),
        sa.Column('predictions', sa.BigInteger(), nullable=False),
        sa.Column('errors', sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('job_id', 'index'),
    )
    op.create_index('ix_prediction_shards_job_id', 'prediction_shards', ['job_id'])


def downgrade() -> None:
    op.drop_index('ix_prediction_shards_job_id', table_name='prediction_shards')
    op.drop_table('prediction_shards')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('prediction_output')
        batch.drop_column('prediction_input')
