"""hyperparameter tuning: a job's trials, and a separate namespace for the Optuna study storage

Optuna keeps its studies in the platform's database but in tables of its own (``studies``, ``trials``…)
and with an Alembic version table of its own (``alembic_version``, the same name as ours). On PostgreSQL
they live in the schema ``optuna`` made here (the worker connects with ``search_path=optuna``); SQLite and
MySQL keep them in a sibling database (see ``cloudml_os.workflows.tune.study_storage``).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 04:00:00.000000
"""
import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'job_trials',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=False),
        sa.Column('trial_id', sa.Integer(), nullable=False),
        sa.Column('optuna_number', sa.Integer(), nullable=False),
        sa.Column('slot', sa.Integer(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('hyperparameters', sa.JSON(), nullable=False),
        sa.Column('objective', sa.Double(), nullable=True),
        sa.Column('training_step', sa.BigInteger(), nullable=True),
        sa.Column('reported_step', sa.BigInteger(), nullable=False),
        sa.Column('stopped_early', sa.Boolean(), nullable=False),
        sa.Column('error_message', sa.Text(), nullable=False),
        sa.Column('start_time', sa.DateTime(), nullable=False),
        sa.Column('end_time', sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('job_id', 'trial_id'),
        sa.UniqueConstraint('job_id', 'optuna_number'),
    )
    op.create_index('ix_job_trials_job_id', 'job_trials', ['job_id'])
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('CREATE SCHEMA IF NOT EXISTS optuna')


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('DROP SCHEMA IF EXISTS optuna CASCADE')
    op.drop_index('ix_job_trials_job_id', table_name='job_trials')
    op.drop_table('job_trials')
