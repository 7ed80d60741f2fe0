"""The embedded broker: kombu's SQLAlchemy transport, polled often enough for short step hand-overs.

kombu's virtual transports poll every second by default, and its SQLAlchemy transport hands every
transport option to ``create_engine``, so ``polling_interval`` cannot be set as an option there.
"""

from kombu.transport import sqlalchemy

POLLING_INTERVAL = 0.05


class Transport(sqlalchemy.Transport):
    polling_interval = POLLING_INTERVAL
