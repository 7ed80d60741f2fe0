"""``cloudml``: the user's command for the platform, as ``gcloud ai-platform`` is for Cloud ML Engine.

It speaks only the public ``/v1`` REST API over HTTP, like any other client, so it must import nothing
of the server side (Flask, SQLAlchemy, Celery, kombu, paramiko, openstacksdk, marshmallow): a user
installs it on a laptop that has none of them. ``main`` holds the command tree; ``http`` the one HTTP
client every command uses; ``settings`` the user's configuration file; ``output`` the ``--format`` of
results; ``packaging`` the trainer's sdist; ``logs`` the following of a job's logs.
"""
