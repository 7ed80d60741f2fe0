"""The Horizon-style web dashboard at ``/dashboard``: server-rendered pages over the ``/v1`` API.

It has no model of its own: every page reads, and every button acts, through the ``/v1`` API of the same
application, called in-process with the signed-in user's own credential (:mod:`.v1client`). So the API's
authentication (local tokens or Keystone), its authorisation (:func:`cloudml_os.auth.authorize`), its
validation and its workflows decide what a user sees and may do; the dashboard cannot drift from them.

The credential lives in an encrypted, HttpOnly, SameSite session cookie that expires when its user has been
idle for 30 minutes, 12 hours after sign-in at the latest, and at sign-out (:mod:`.sessions`); every form
carries a CSRF token (Flask-WTF). Front-end libraries (Bootstrap, htmx, Chart.js) come from npm through
``make assets`` into ``static/vendor``; nothing is fetched from a CDN.
"""

from __future__ import annotations

import datetime as dt
import secrets
from pathlib import Path

from flask import Flask
from flask_wtf.csrf import CSRFProtect

from cloudml_os.config import Settings
from cloudml_os.dashboard.sessions import DashboardSessionInterface, RevokedSessionsInDatabase
from cloudml_os.keys import kept_secret
from cloudml_os.store import Store

SESSION_SECRET_FILE = "dashboard-session.key"
SESSION_IDLE = dt.timedelta(minutes=30)
SESSION_LIFETIME = dt.timedelta(hours=12)


def session_secret(settings: Settings) -> str:
    """The key that encrypts session cookies (and signs CSRF tokens): ``dashboard_secret_key``, else one made
    once in ``data_dir``.

    Kept in a file (mode 0600) so that every API process of the installation, and a restarted one, accept
    the same cookies.
    """
    if settings.dashboard_secret_key:
        return settings.dashboard_secret_key
    return kept_secret(Path(settings.data_dir) / SESSION_SECRET_FILE, lambda: secrets.token_urlsafe(48))


def register_dashboard(app: Flask, settings: Settings, store: Store) -> None:
    """Mount the dashboard on ``app``: its sessions and their cookie, CSRF protection of its forms, its blueprint.

    The session cookie is ``Secure`` whenever the request came over HTTPS; ``dashboard_secure_cookie`` makes it
    ``Secure`` over plain HTTP too (a TLS proxy that does not tell the WSGI server the scheme).
    """
    from cloudml_os.dashboard.views import blp

    app.secret_key = session_secret(settings)
    app.session_interface = DashboardSessionInterface(
        app.secret_key, RevokedSessionsInDatabase(store),
        idle=SESSION_IDLE, lifetime=SESSION_LIFETIME)
    app.config.update(
        SESSION_COOKIE_NAME="cloudml_os_dashboard",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_PATH="/dashboard",
        SESSION_COOKIE_SECURE=settings.dashboard_secure_cookie,  # HTTPS requests get Secure cookies anyway
        # Only the dashboard's forms are checked (in its blueprint); /v1 callers send bearer tokens, not cookies.
        WTF_CSRF_CHECK_DEFAULT=False,
        WTF_CSRF_TIME_LIMIT=None,  # the token lives as long as the session
    )
    CSRFProtect(app)
    app.register_blueprint(blp)
