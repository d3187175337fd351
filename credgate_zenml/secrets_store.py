"""A ZenML custom secrets store backed by credgate.

ZenML keeps a secret's name, scope and metadata in its own SQL database and hands the
secret's *values* to its secrets store. This one writes them to credgate, through its HTTP
API, at ``BACKEND/PREFIX<secret_id>`` (by default ``local/zenml/<uuid>``): encrypted under
credgate's keys, in whichever credgate backend is named, audited by credgate, and never in
ZenML's database.

Configured like any ZenML custom secrets store (docs/zenml.md), e.g. for a ZenML server::

    ZENML_SECRETS_STORE_TYPE=custom
    ZENML_SECRETS_STORE_CLASS_PATH=credgate_zenml.secrets_store.CredgateSecretsStore
    ZENML_SECRETS_STORE_ADDR=https://credgate.internal:8765
    ZENML_SECRETS_STORE_TOKEN=...            # or CLIENT_ID + CLIENT_SECRET, or TOKEN_FILE
    ZENML_SECRETS_STORE_BACKEND=local
    ZENML_SECRETS_STORE_PREFIX=zenml/
    ZENML_SECRETS_STORE_CA_FILE=/etc/credgate/ca.pem

Errors follow ZenML's own stores: no values stored for a secret ID raises ``KeyError``;
anything else credgate refuses (a wrong token, a missing permission, a gateway that is down)
raises :class:`CredgateSecretsStoreError` naming credgate's error code and message, never a
value. Values are never logged.
"""

from __future__ import annotations

import ssl
import time
from typing import Any, ClassVar, Dict, Optional, Type
from urllib.parse import urlencode
from uuid import UUID

from pydantic import SecretStr, model_validator
from zenml.config.secrets_store_config import SecretsStoreConfiguration
from zenml.enums import SecretsStoreType
from zenml.logger import get_logger
from zenml.zen_stores.secrets_stores.base_secrets_store import BaseSecretsStore

from gateway.client.auth import Auth, auth_from
from gateway.client.errors import CredgateError, Gone, NotFound, RequestFailed
from gateway.client.http import Client, seg

logger = get_logger(__name__)

__all__ = ["CredgateSecretsStore", "CredgateSecretsStoreConfiguration", "CredgateSecretsStoreError"]


class CredgateSecretsStoreError(RuntimeError):
    """credgate refused or could not be reached: carries credgate's error code, never a value."""

    def __init__(self, message: str, *, code: Optional[str] = None, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class CredgateSecretsStoreConfiguration(SecretsStoreConfiguration):
    """Where and as whom the store reaches credgate.

    Attributes:
        addr: the gateway's address (``http(s)://host:port``).
        token: an admin key or gateway access token, sent as the bearer.
        client_id, client_secret: an OAuth2 client of credgate (exchanged at /v1/auth/token and
            fetched again before the access token expires).
        token_file: a workload token file (e.g. a Kubernetes projected token) exchanged at
            /v1/auth/token, read again when it changes.
        backend: the credgate backend that holds the values.
        prefix: the path under which each secret lives, as ``PREFIX<secret_id>``.
        ca_file: a CA bundle to verify the gateway's TLS certificate with.
        timeout: seconds per request.
    """

    type: SecretsStoreType = SecretsStoreType.CUSTOM
    class_path: Optional[str] = "credgate_zenml.secrets_store.CredgateSecretsStore"
    addr: str = "http://127.0.0.1:8765"
    token: Optional[SecretStr] = None
    client_id: Optional[str] = None
    client_secret: Optional[SecretStr] = None
    token_file: Optional[str] = None
    backend: str = "local"
    prefix: str = "zenml/"
    ca_file: Optional[str] = None
    timeout: float = 30.0

    @model_validator(mode="after")
    def _one_identity(self) -> "CredgateSecretsStoreConfiguration":
        given = [n for n, v in (("token", self.token), ("client_id", self.client_id or self.client_secret),
                                ("token_file", self.token_file)) if v]
        if len(given) != 1:
            raise ValueError(
                "the credgate secrets store needs exactly one identity: token, client_id + client_secret, "
                f"or token_file (given: {', '.join(given) or 'none'})"
            )
        if (self.client_id or self.client_secret) and not (self.client_id and self.client_secret):
            raise ValueError("client credentials need both client_id and client_secret")
        if not self.backend or "/" in self.backend:
            raise ValueError("backend must be one credgate backend name")
        if self.prefix.startswith("/"):
            raise ValueError("prefix must be relative to the backend (e.g. 'zenml/')")
        return self


class CredgateSecretsStore(BaseSecretsStore):
    """ZenML secret values in credgate, at ``BACKEND/PREFIX<secret_id>``."""

    config: CredgateSecretsStoreConfiguration
    TYPE: ClassVar[SecretsStoreType] = SecretsStoreType.CUSTOM
    CONFIG_TYPE: ClassVar[Type[SecretsStoreConfiguration]] = CredgateSecretsStoreConfiguration

    _client: Optional[Client] = None
    _auth: Optional[Auth] = None

    @model_validator(mode="before")
    @classmethod
    def _credgate_config(cls, data: Any) -> Any:
        # ZenML builds a generic SecretsStoreConfiguration (type, class_path and the extra
        # fields from ZENML_SECRETS_STORE_*) and converts only its built-in types.
        if isinstance(data, dict):
            cfg = data.get("config")
            if isinstance(cfg, SecretsStoreConfiguration) and not isinstance(cfg, CredgateSecretsStoreConfiguration):
                data = {**data, "config": CredgateSecretsStoreConfiguration(**cfg.model_dump())}
            elif isinstance(cfg, dict):
                data = {**data, "config": CredgateSecretsStoreConfiguration(**cfg)}
        return data

    # --- the connection -----------------------------------------------------------

    def _initialize(self) -> None:
        cfg = self.config
        self._auth = auth_from(
            token=cfg.token.get_secret_value() if cfg.token else None,
            client_id=cfg.client_id,
            client_secret=cfg.client_secret.get_secret_value() if cfg.client_secret else None,
            token_file=cfg.token_file,
        )
        # token="" so that CREDGATE_TOKEN in the server's environment is not picked up
        verify: Any = ssl.create_default_context(cafile=cfg.ca_file) if cfg.ca_file else True
        self._client = Client(cfg.addr, token="", timeout=cfg.timeout, verify=verify)
        # Fail at start-up, not at the first secret: the gateway answers and knows the backend.
        try:
            self._call("GET", f"/v1/backends/{seg(cfg.backend)}", what=f"show backend {cfg.backend!r}")
        except CredgateSecretsStoreError as exc:
            if exc.status != 403:
                raise
            # an identity allowed only secrets under the prefix may not read backends: fine
        except (NotFound, Gone):
            raise CredgateSecretsStoreError(f"credgate has no backend {cfg.backend!r}", code="not_found") from None
        logger.debug("credgate secrets store: %s backend %s, prefix %r", cfg.addr, cfg.backend, cfg.prefix)

    def _headers(self) -> Dict[str, str]:
        assert self._auth is not None and self._client is not None
        form = self._auth.token_form(time.time())
        if form is not None:
            body = self._client.request(
                "POST", "/v1/auth/token", content=urlencode(form).encode(),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            self._auth.accept(body, time.time())
        bearer = self._auth.bearer()
        return {"Authorization": f"Bearer {bearer}"} if bearer else {}

    def _call(self, method: str, path: str, *, what: str, json: Any = None,
              params: Optional[Dict[str, Any]] = None) -> Any:
        assert self._client is not None and self._auth is not None
        for attempt in (0, 1):
            try:
                return self._client.request(method, path, json=json, params=params, headers=self._headers())
            except RequestFailed as exc:
                if exc.status == 401 and attempt == 0 and self._auth.invalidate():
                    continue  # an exchanged access token expired or was revoked: fetch one again
                if isinstance(exc, (NotFound, Gone)):
                    raise
                raise CredgateSecretsStoreError(
                    f"credgate refused to {what} at {self.config.addr} ({exc.status} {exc.code}: {exc.message})",
                    code=exc.code, status=exc.status,
                ) from None
            except CredgateError as exc:
                raise CredgateSecretsStoreError(f"credgate: can't {what}: {exc}", code=exc.code) from None
        raise AssertionError("unreachable")

    def _path(self, secret_id: UUID) -> str:
        return f"/v1/secrets/{seg(self.config.backend)}/{seg(self.config.prefix + str(secret_id))}"

    def _ref(self, secret_id: UUID) -> str:
        return f"{self.config.backend}/{self.config.prefix}{secret_id}"

    # --- ZenML's secrets store interface -------------------------------------------

    def store_secret_values(self, secret_id: UUID, secret_values: Dict[str, str]) -> None:
        """Write the values of a new secret (a new version in credgate)."""
        self._call("PUT", self._path(secret_id), json={"data": dict(secret_values)},
                   what=f"store the values of secret {secret_id}")
        logger.debug("credgate secrets store: stored %s (%d keys)", self._ref(secret_id), len(secret_values))

    def get_secret_values(self, secret_id: UUID) -> Dict[str, str]:
        """The secret's values. Raises KeyError when credgate holds none for this ID."""
        try:
            out = self._call("GET", self._path(secret_id), params={"reveal": True},
                             what=f"read the values of secret {secret_id}")
        except (NotFound, Gone):
            raise KeyError(f"Secret with ID {secret_id} not found in credgate ({self._ref(secret_id)}).") from None
        data = out.get("data") if isinstance(out, dict) else None
        if not isinstance(data, dict):
            raise CredgateSecretsStoreError(f"credgate answered without the values of secret {secret_id}")
        return {str(k): str(v) for k, v in data.items()}

    def update_secret_values(self, secret_id: UUID, secret_values: Dict[str, str]) -> None:
        """Replace the values (a new version in credgate). Raises KeyError when none are stored."""
        try:
            self._call("GET", self._path(secret_id), what=f"find secret {secret_id}")  # metadata only
        except (NotFound, Gone):
            raise KeyError(f"Secret with ID {secret_id} not found in credgate ({self._ref(secret_id)}).") from None
        self.store_secret_values(secret_id, secret_values)

    def delete_secret_values(self, secret_id: UUID) -> None:
        """Destroy every version of the values. Raises KeyError when none are stored."""
        try:
            self._call("DELETE", self._path(secret_id), params={"destroy": True},
                       what=f"delete the values of secret {secret_id}")
        except (NotFound, Gone):
            raise KeyError(f"Secret with ID {secret_id} not found in credgate ({self._ref(secret_id)}).") from None
        logger.debug("credgate secrets store: destroyed %s", self._ref(secret_id))
