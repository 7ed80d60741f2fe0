"""The dashboard's sessions: encrypted cookies that expire, and that signing out revokes.

A session is a cookie its browser keeps but cannot read: the session's data (the user's API or Keystone token,
their project and role, the CSRF token, flashed messages), its random id, when it was issued and when its user
last acted, serialised as Flask serialises sessions and encrypted with Fernet (AES-128-CBC and HMAC-SHA256)
under a key derived from the installation's session key. So a stolen cookie does not give away the token, and
every API process holding the key accepts a session, whichever process issued it.

A cookie is refused (the request starts a new, empty session) when it cannot be decrypted, when its user has
not acted for the idle limit, when it was issued longer ago than the absolute limit, or when its session was
signed out: signing out writes the session's id into :class:`RevokedSessions` (the installation's database,
shared by every API process on every host) until the session would have ended anyway, so a copy of the cookie
taken before is refused after. That list is the only session state the server keeps.

What counts as the user acting is the views' decision (:meth:`DashboardSessionInterface.touch`); this module
knows nothing of views.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flask import Flask, Request, Response, request
from flask.sessions import SecureCookieSession, SessionInterface, session_json_serializer

from cloudml_os.store import Store

SESSION_ID = re.compile(r"[0-9a-f]{32}")


def cookie_key(secret: str) -> bytes:
    """The Fernet key of session cookies, derived from the installation's session key (HKDF-SHA256), so that
    it differs from the key Flask-WTF signs CSRF tokens with."""
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=b"cloudml-os dashboard session cookie").derive(secret.encode())
    return base64.urlsafe_b64encode(derived)


class RevokedSessions(Protocol):
    """Ids of sessions signed out before they expired, kept where every API process looks."""

    def revoke(self, session_id: str, until: float, now: float) -> None:
        """Refuse ``session_id`` from now on; it may be forgotten after ``until`` (its absolute expiry)."""

    def is_revoked(self, session_id: str) -> bool:
        ...


class RevokedSessionsInDatabase:
    """Revoked session ids in the installation's database (``dashboard_revoked_sessions``), which every API
    process of the installation shares, on whatever host it runs."""

    def __init__(self, store: Store):
        self.store = store

    def revoke(self, session_id: str, until: float, now: float) -> None:
        self.store.revoke_session(session_id, dt.datetime.fromtimestamp(until, dt.UTC).replace(tzinfo=None))

    def is_revoked(self, session_id: str) -> bool:
        return self.store.session_revoked(session_id)


class DashboardSession(SecureCookieSession):
    """A session's data, with its id, when it was issued and when its user last acted (epoch seconds).

    ``ended`` says that the request brought a cookie that was refused as expired or revoked.
    """

    def __init__(self, data: dict[str, Any] | None = None, *, session_id: str, issued: float, seen: float,
                 ended: bool = False):
        super().__init__(data)
        self.session_id, self.issued, self.seen, self.ended = session_id, issued, seen, ended


class DashboardSessionInterface(SessionInterface):
    """Flask's session interface for the dashboard's encrypted, expiring, revocable cookies.

    The cookie's name, path, ``HttpOnly`` and ``SameSite`` come from the app's ``SESSION_COOKIE_*`` settings;
    it is ``Secure`` when the request came over HTTPS (behind a TLS proxy: as the WSGI server was told by it)
    or when ``SESSION_COOKIE_SECURE`` says so for every request. It has no expiry date: the browser drops it
    when it closes, and the server refuses it at the idle or absolute limit whatever the browser does.
    """

    def __init__(self, secret: str, revoked: RevokedSessions, *, idle: dt.timedelta, lifetime: dt.timedelta,
                 clock: Callable[[], float] = time.time):
        self._fernet = Fernet(cookie_key(secret))
        self.revoked, self.idle, self.lifetime, self.clock = revoked, idle, lifetime, clock

    def open_session(self, app: Flask, request: Request) -> DashboardSession:
        now = self.clock()
        value = request.cookies.get(self.get_cookie_name(app))
        if not value:
            return self._new_session(now)
        try:
            sealed = session_json_serializer.loads(self._fernet.decrypt(value.encode()))
            session_id, data = sealed["id"], sealed["data"]
            issued, seen = float(sealed["issued"]), float(sealed["seen"])
        except (InvalidToken, ValueError, TypeError, KeyError):
            return self._new_session(now)  # not ours (or of an older format): no session
        if not isinstance(data, dict) or not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
            return self._new_session(now)
        if (now - seen > self.idle.total_seconds() or now - issued > self.lifetime.total_seconds()
                or self.revoked.is_revoked(session_id)):
            ended = self._new_session(now, ended=True)
            ended.modified = True  # the browser's cookie is deleted unless the request puts something in
            return ended
        return DashboardSession(data, session_id=session_id, issued=issued, seen=seen)

    def _new_session(self, now: float, ended: bool = False) -> DashboardSession:
        return DashboardSession(session_id=secrets.token_hex(16), issued=now, seen=now, ended=ended)

    def touch(self, session: DashboardSession) -> None:
        """The user acted: the idle limit counts from now."""
        session.seen = self.clock()
        session.modified = True

    def renew(self, session: DashboardSession) -> None:
        """Empty the session and give it a new id, issued now (signing in, and after signing out)."""
        session.clear()
        session.session_id, session.issued, session.seen = secrets.token_hex(16), self.clock(), self.clock()
        session.modified = True

    def revoke(self, session: DashboardSession) -> None:
        """Sign the session out: every process that reads ``revoked`` refuses its id from now on (a copy of its
        cookie included); ``session`` starts anew."""
        self.revoked.revoke(session.session_id, until=session.issued + self.lifetime.total_seconds(),
                            now=self.clock())
        self.renew(session)

    def save_session(self, app: Flask, session: DashboardSession, response: Response) -> None:  # type: ignore[override]
        name, domain, path = self.get_cookie_name(app), self.get_cookie_domain(app), self.get_cookie_path(app)
        secure = self.get_cookie_secure(app) or request.is_secure
        samesite, httponly = self.get_cookie_samesite(app), self.get_cookie_httponly(app)
        if session.accessed:
            response.vary.add("Cookie")
        if not session.modified:
            return
        response.vary.add("Cookie")
        if not session:
            response.delete_cookie(name, domain=domain, path=path, secure=secure, samesite=samesite,
                                   httponly=httponly)
            return
        sealed = {"id": session.session_id, "issued": session.issued, "seen": session.seen, "data": dict(session)}
        value = self._fernet.encrypt(session_json_serializer.dumps(sealed).encode()).decode()
        response.set_cookie(name, value, domain=domain, path=path, secure=secure, samesite=samesite,
                            httponly=httponly)
