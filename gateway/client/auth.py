"""How the client authenticates, without the transport (shared by Client and AsyncClient).

An :class:`Auth` says which bearer to send and, when it needs a (new) gateway access token,
which form to POST to ``/v1/auth/token``; the client does the I/O and hands the answer back.

- :class:`StaticToken`: an admin key, a gateway access token, or a run token, as given.
- :class:`ClientCredentials`: OAuth2 client_credentials (client_secret_post); the access
  token is fetched again before it expires.
- :class:`TokenFile`: a workload token in a file (e.g. a Kubernetes projected service-account
  token) from a trusted issuer, exchanged (RFC 8693 token-exchange, or RFC 7523 jwt-bearer)
  for a gateway access token; the file is read again when it changes, and exchanged again
  before the gateway token or the workload token expires.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

from gateway.client.errors import CredgateError

__all__ = ["Auth", "ClientCredentials", "StaticToken", "TokenFile", "auth_from_env"]

GRANT_CC = "client_credentials"
GRANT_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GRANT_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"


class Auth:
    """No authentication (e.g. only unwrapping)."""

    def bearer(self) -> str | None:
        return None

    def token_form(self, now: float) -> dict[str, str] | None:
        """The form to POST to /v1/auth/token when a gateway token is needed now, else None."""
        return None

    def accept(self, body: dict[str, Any], now: float) -> None:
        """The token endpoint's answer to :meth:`token_form`."""

    def invalidate(self) -> bool:
        """The gateway refused the bearer (401): forget it. True if a fresh one can be fetched."""
        return False

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


class StaticToken(Auth):
    """An admin key, gateway access token or run token, sent as it is."""

    def __init__(self, token: str) -> None:
        self._token = token

    def bearer(self) -> str | None:
        return self._token


class _Exchanged(Auth):
    """A gateway access token fetched from /v1/auth/token and fetched again before it expires."""

    def __init__(self, refresh_before: float | None = None) -> None:
        self.refresh_before = refresh_before
        self._access: str | None = None
        self._refresh_at = 0.0
        self.fetches = 0  # how many tokens were fetched (for tests and metrics)

    def bearer(self) -> str | None:
        return self._access

    def _due(self, now: float) -> bool:
        return self._access is None or now >= self._refresh_at

    def accept(self, body: dict[str, Any], now: float) -> None:
        access, lifetime = body.get("access_token"), float(body.get("expires_in") or 0)
        if not isinstance(access, str) or not access:
            raise CredgateError("The token endpoint answered without an access token.", code="invalid_token_response")
        margin = lifetime / 3 if self.refresh_before is None else min(self.refresh_before, lifetime * 0.95)
        self._access, self._refresh_at = access, now + lifetime - margin
        self.fetches += 1

    def invalidate(self) -> bool:
        self._access = None
        return True


class ClientCredentials(_Exchanged):
    """OAuth2 client credentials: refreshed ``refresh_before`` seconds before the access token
    expires (by default at two thirds of its lifetime)."""

    def __init__(self, client_id: str, client_secret: str, *, refresh_before: float | None = None) -> None:
        super().__init__(refresh_before)
        self.client_id = client_id
        self._secret = client_secret

    def token_form(self, now: float) -> dict[str, str] | None:
        if not self._due(now):
            return None
        return {"grant_type": GRANT_CC, "client_id": self.client_id, "client_secret": self._secret}

    def __repr__(self) -> str:
        return f"<ClientCredentials client_id={self.client_id}>"


def _jwt_exp(token: str) -> float | None:
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


class TokenFile(_Exchanged):
    """A workload token read from ``path`` and exchanged at /v1/auth/token.

    ``grant`` is ``"token-exchange"`` (default) or ``"jwt-bearer"``. The file is read again
    whenever its modification time, size or inode changes (a projected token is rotated by
    replacing it), and the new token is exchanged at once."""

    def __init__(self, path: str | os.PathLike[str], *, grant: str = "token-exchange",
                 refresh_before: float | None = None) -> None:
        super().__init__(refresh_before)
        if grant not in ("token-exchange", "jwt-bearer"):
            raise ValueError("grant is 'token-exchange' or 'jwt-bearer'")
        self.path = Path(path)
        self.grant = grant
        self._stamp: tuple[int, int, int] | None = None
        self._subject: str | None = None

    def _read_if_changed(self) -> bool:
        try:
            st = self.path.stat()
        except OSError as exc:
            raise CredgateError(f"Can't read the token file {self.path} ({type(exc).__name__}).",
                                code="token_file_unreadable") from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp and self._subject is not None:
            return False
        token = self.path.read_text().strip()
        if not token:
            raise CredgateError(f"The token file {self.path} is empty.", code="token_file_unreadable")
        changed = token != self._subject
        self._stamp, self._subject = stamp, token
        return changed

    def token_form(self, now: float) -> dict[str, str] | None:
        changed = self._read_if_changed()
        exp = _jwt_exp(self._subject or "")
        if not changed and not self._due(now) and (exp is None or now < exp - 5):
            return None
        assert self._subject is not None
        if self.grant == "jwt-bearer":
            return {"grant_type": GRANT_JWT_BEARER, "assertion": self._subject}
        return {"grant_type": GRANT_EXCHANGE, "subject_token": self._subject, "subject_token_type": TOKEN_TYPE_JWT}

    def __repr__(self) -> str:
        return f"<TokenFile {self.path} grant={self.grant}>"


def auth_from_env(env: dict[str, str] | None = None) -> Auth:
    """From the environment, first found wins: CREDGATE_TOKEN, CREDGATE_RUN_TOKEN,
    CREDGATE_CLIENT_ID + CREDGATE_CLIENT_SECRET, CREDGATE_TOKEN_FILE (+ CREDGATE_TOKEN_GRANT)."""
    env = dict(os.environ) if env is None else env
    if env.get("CREDGATE_TOKEN"):
        return StaticToken(env["CREDGATE_TOKEN"])
    if env.get("CREDGATE_RUN_TOKEN"):
        return StaticToken(env["CREDGATE_RUN_TOKEN"])
    if env.get("CREDGATE_CLIENT_ID") and env.get("CREDGATE_CLIENT_SECRET"):
        return ClientCredentials(env["CREDGATE_CLIENT_ID"], env["CREDGATE_CLIENT_SECRET"])
    if env.get("CREDGATE_TOKEN_FILE"):
        return TokenFile(env["CREDGATE_TOKEN_FILE"], grant=env.get("CREDGATE_TOKEN_GRANT", "token-exchange"))
    return Auth()


def auth_from(token: str | None = None, *, run_token: str | None = None, client_id: str | None = None,
              client_secret: str | None = None, token_file: str | os.PathLike[str] | None = None,
              auth: Auth | None = None) -> Auth:
    """The one authentication the arguments name, else the environment's."""
    given = [a for a in (auth, token, run_token, client_id or client_secret, token_file) if a]
    if len(given) > 1:
        raise ValueError("give one of auth, token, run_token, client_id/client_secret, token_file")
    if auth is not None:
        return auth
    if token:
        return StaticToken(token)
    if run_token:
        return StaticToken(run_token)
    if client_id or client_secret:
        if not (client_id and client_secret):
            raise ValueError("client credentials need both client_id and client_secret")
        return ClientCredentials(client_id, client_secret)
    if token_file:
        return TokenFile(token_file)
    return auth_from_env()
