"""Vault / OpenBao: credentials from a customer's own dynamic secrets engine.

credgate does not create anything itself here: it reads ``{mount}/creds/{role}`` from an
existing Vault (or OpenBao) dynamic secrets engine, and the credgate lease wraps the
Vault lease. The customer keeps their roles, creation statements and policies in Vault;
credgate adds its own policy decision, audit, run scoping and wrap tokens in front.

Configuration::

    address     "https://vault.example:8200"   http(s)://host[:port]
    namespace   "team-a"                        sent as X-Vault-Namespace (optional)
    ca_cert     "-----BEGIN CERTIFICATE-----..." PEM of the CA(s) to trust (optional)
    mount       "database"                      the secrets engine's mount
    engine      "database" | "aws"              how the engine's answer maps to a credential
    approle_mount "approle"                     auth method ``approle`` only
    timeout     10                              seconds, each HTTP call (connect and read)
    per_lease_token false                       a child token per lease (see "What a crash...")

Auth methods (the material): ``token`` (``token``: a Vault token, used as given) and
``approle`` (``role_id`` and ``secret_id``: a login at first use, and again when the
token is about to expire or stops working). The token needs::

    path "<mount>/creds/*"     { capabilities = ["read"] }
    path "<mount>/roles"       { capabilities = ["list"] }     # list_resources, verify
    path "sys/leases/renew"    { capabilities = ["update"] }
    path "sys/leases/revoke"   { capabilities = ["update"] }
    path "sys/leases/lookup"   { capabilities = ["update"] }   # tells "not renewable" from "gone"

plus Vault's ``default`` policy (``auth/token/lookup-self``). With ``per_lease_token``
(below) also ``update`` on ``auth/token/create``, ``auth/token/renew-accessor`` and
``auth/token/revoke-accessor``. The connector does not renew its own token: give it a
token that lives as long as the connector (a periodic token renewed elsewhere), or use
``approle``.

Resources: ``vault-role:ROLE`` is ``GET {mount}/creds/ROLE``.

Engines (``ENGINES``: Vault's answer key -> credential key; more engines are one entry):

- ``database``: ``username``, ``password``.
- ``aws``: ``access_key``, ``secret_key``, ``security_token`` (None for an ``iam_user``
  role) as ``aws_access_key_id``, ``aws_secret_access_key``, ``aws_session_token``, the
  names the aws connector and the client helpers use. Only ``database`` is tested: the
  aws engine is an external plugin OpenBao 2.x does not ship.

Leases
------
- ``issue``: one ``GET {mount}/creds/{role}``. ``expires_at`` is the earliest of the
  credgate expiry, ``now + lease_duration`` and the expiry of the Vault token that read
  it: Vault revokes every lease a token created when that token expires or is revoked,
  so no credential outlives its token (an approle token's TTL is the AppRole's
  ``token_ttl``; a root or periodic token has none). The Vault ``lease_id`` comes back in
  :attr:`Issued.revoke_state` and the gateway stores it with the lease when it activates
  it.
- ``renew``: ``PUT sys/leases/renew {lease_id, increment}``, the increment being what
  is left until the asked expiry. Vault may grant less (the role's ``max_ttl``): the
  expiry in force is returned (capped at the token's expiry as above). A lease Vault
  reported not renewable, or refuses to renew, is :class:`NotRenewable` (409); a lease
  Vault no longer has is ``credential_gone``.
- ``revoke``: ``PUT sys/leases/revoke {lease_id}`` (synchronous). Vault answers 204 for a
  lease it does not know, so revoking twice, or a lease already expired, is success.

What a crash leaves behind. The Vault lease id is only known from Vault's answer, after
the ``pending`` lease row was committed. If the gateway dies (or the call times out)
between Vault's answer and the activation, the lease row holds only the planned state
(mount, role, no lease id); ``revoke`` with it has nothing to name and succeeds, and the
Vault lease runs to its own end: the role's ``default_ttl``, and at the latest the
reading token's expiry. What bounds it, and what does not:

- the token: every lease dies with the token that read it. With ``approle`` and a short
  ``token_ttl`` that is a tight bound, and ``auth/token/revoke-accessor`` of the
  gateway's token (its accessor is in ``verify``'s identity) revokes everything it ever
  issued, in an emergency;
- the lease prefix: every lease of a role is named ``{mount}/creds/{role}/<random>``, so
  ``sys/leases/revoke-prefix/{mount}/creds/{role}`` (sudo) ends all of them, credgate's
  live ones too: an operator's tool, not something the gateway can do for one lease;
- the role's ``default_ttl``: set it no longer than the connector's default TTL and the
  orphan lives no longer than a credential would have anyway;
- ``per_lease_token: true`` makes that bound the credgate lease itself: each credential
  is read with a fresh child token (``auth/token/create``, the connector token's policies,
  TTL until the lease's expiry), so the Vault lease dies with that token at the credgate
  expiry at the latest, whatever the gateway knows. Its accessor joins the revoke state;
  ``renew`` renews the token (``renew-accessor``) and then the lease, ``revoke`` revokes
  the lease and then the token (``revoke-accessor``). One more Vault call per issuance
  and per renewal. A crash between the token's creation and the read leaves only a
  token with no lease, which dies at the same time.

Errors: no answer, a 5xx, 429 or a sealed server is :class:`TargetUnreachable` (503); a
refused token or login ``target_auth_failed``; a 403 with a working token
``target_permission_denied``; an unknown role :class:`ResourceRejected` (``not_found``).
Messages carry the HTTP status only, never Vault's text.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from connectors.base import (
    ConnectorBase,
    ConnectorCapabilities,
    IssueRequest,
    Issued,
    NotRenewable,
    PoolLimits,
    ResourceNotSupported,
    ResourceRejected,
    Revocability,
    TargetError,
    TargetUnreachable,
    TTLLimits,
    Verification,
    as_utc,
    generic_sanitize,
)

__all__ = ["VaultConnector", "VaultConfig", "VaultTokenMaterial", "VaultAppRoleMaterial", "ENGINES", "credential_from", "parse_resource"]

PREFIX = "vault-role:"
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_UNREACHABLE_STATUS = {429, 500, 501, 502, 503, 504}
_TOKEN_MARGIN = 30.0  # seconds: an approle token this close to its expiry is replaced before use

# engine -> (Vault's answer key -> credential key, the keys that must be present)
ENGINES: Mapping[str, tuple[Mapping[str, str], frozenset[str]]] = MappingProxyType({
    "database": (MappingProxyType({"username": "username", "password": "password"}),
                 frozenset({"username", "password"})),
    "aws": (MappingProxyType({"access_key": "aws_access_key_id", "secret_key": "aws_secret_access_key",
                              "security_token": "aws_session_token"}),
            frozenset({"access_key", "secret_key"})),
})


class VaultTokenMaterial(BaseModel):
    """Auth method ``token``: a Vault token, used as given."""

    model_config = ConfigDict(extra="forbid")

    token: SecretStr

    @field_validator("token")
    @classmethod
    def _not_empty(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value().strip():
            raise ValueError("the token is empty")
        return v


class VaultAppRoleMaterial(BaseModel):
    """Auth method ``approle``: an AppRole's role id and secret id (both kept out of reprs)."""

    model_config = ConfigDict(extra="forbid")

    role_id: SecretStr
    secret_id: SecretStr


def _segments(v: str, what: str) -> str:
    v = v.strip("/")
    if not v or not all(_SEGMENT.match(s) and s not in (".", "..") for s in v.split("/")):
        raise ValueError(f"the {what} is segments of A-Z a-z 0-9 . _ - joined by /")
    return v


class VaultConfig(BaseModel):
    """See the module docstring."""

    model_config = ConfigDict(extra="forbid")

    address: str = Field(min_length=1, max_length=2048)
    namespace: str | None = Field(None, min_length=1, max_length=256)
    ca_cert: str | None = Field(None, min_length=1, max_length=65536, description="PEM of the CA(s) to trust")
    mount: str = Field("database", min_length=1, max_length=256)
    engine: Literal["database", "aws"] = "database"
    approle_mount: str = Field("approle", min_length=1, max_length=128)
    timeout: float = Field(10.0, gt=0, le=120)
    per_lease_token: bool = Field(
        False, description="read each credential with a child token living as long as the credgate lease",
    )

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s?#@]+/?$", v):
            raise ValueError("the address must be http(s)://host[:port]")
        return v.rstrip("/")

    @field_validator("mount", "approle_mount")
    @classmethod
    def _mount(cls, v: str) -> str:
        return _segments(v, "mount")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str | None) -> str | None:
        return None if v is None else _segments(v, "namespace")

    @field_validator("ca_cert")
    @classmethod
    def _pem(cls, v: str | None) -> str | None:
        if v is not None and "-----BEGIN CERTIFICATE-----" not in v:
            raise ValueError("ca_cert is the PEM text of one or more certificates")
        return v


def credential_from(engine: str, data: Mapping[str, Any]) -> dict[str, str] | None:
    """The credential in a ``{mount}/creds/{role}`` answer's ``data`` for ``engine`` (see
    ``ENGINES``), or None if a key the engine always returns is missing or empty. Empty
    optional keys (an ``iam_user`` role's ``security_token``) are left out."""
    mapping, required = ENGINES[engine]
    if not required <= {k for k, v in data.items() if v}:
        return None
    return {out: str(data[key]) for key, out in mapping.items() if data.get(key)}


def parse_resource(resource: str) -> str:
    """The role of ``vault-role:ROLE``; raises ResourceNotSupported."""
    if isinstance(resource, str) and resource.startswith(PREFIX):
        role = resource[len(PREFIX):]
        if _SEGMENT.match(role) and role not in (".", ".."):
            return role
    raise ResourceNotSupported("A vault resource is 'vault-role:<role>' (A-Z a-z 0-9 . _ -, at most 128).")


class VaultHTTPError(Exception):
    """A Vault answer with an error status. Holds the status only: Vault's text can quote a
    request (a role name, a statement), so it is never kept."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", value.replace("Z", "+00:00")))
    except ValueError:
        return None


class VaultConnector(ConnectorBase):
    """Credentials from a Vault/OpenBao dynamic secrets engine; see the module docstring."""

    type: ClassVar[str] = "vault"
    auth_methods: ClassVar[Mapping[str, type[BaseModel]]] = MappingProxyType(
        {"token": VaultTokenMaterial, "approle": VaultAppRoleMaterial}
    )
    config_model: ClassVar[type[BaseModel]] = VaultConfig
    resource_types: ClassVar[tuple[str, ...]] = ("vault-role",)
    capabilities: ClassVar[ConnectorCapabilities] = ConnectorCapabilities(Revocability.REVOCABLE, renewable=True)
    ttl: ClassVar[TTLLimits] = TTLLimits(default=timedelta(hours=1), min=timedelta(seconds=60), max=timedelta(days=7))

    def __init__(
        self, config: BaseModel, auth_method: str, material: BaseModel, *, name: str = "", pool: PoolLimits | None = None
    ) -> None:
        super().__init__(config, auth_method, material, name=name, pool=pool)
        self.config: VaultConfig
        self._http: Any = None  # httpx.AsyncClient, built at first use
        self._token: str | None = None  # the Vault token in use
        self._token_expires: datetime | None = None  # None: it does not expire (or not known yet)
        self._token_known = False
        self._login_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<VaultConnector {self.auth_method} {self.config.address} {self.config.mount} ({self.config.engine})>"

    @classmethod
    def sanitize(cls, exc: BaseException) -> str:
        """A Vault error as its HTTP status; an httpx error as its class name; never text."""
        if isinstance(exc, VaultHTTPError):
            return f"VaultHTTPError (HTTP {exc.status})"
        return generic_sanitize(exc)

    # -- pure -------------------------------------------------------------

    def validate_resource(self, resource: str) -> str:
        parse_resource(resource)
        return "vault-role"

    def plan(self, lease_id: str, resource: str) -> dict[str, Any]:
        """Where the lease will come from; its Vault lease id is added by ``issue``'s answer."""
        return {"mount": self.config.mount, "role": parse_resource(resource)}

    # -- HTTP ---------------------------------------------------------------

    def _client(self) -> Any:
        if self._http is None:
            import httpx

            verify: Any = True
            if self.config.ca_cert:
                verify = ssl.create_default_context(cadata=self.config.ca_cert)
            headers = {"X-Vault-Request": "true"}
            if self.config.namespace:
                headers["X-Vault-Namespace"] = self.config.namespace
            self._http = httpx.AsyncClient(
                base_url=self.config.address + "/v1/", headers=headers, verify=verify, trust_env=False,
                timeout=httpx.Timeout(self.config.timeout), follow_redirects=False,
                limits=httpx.Limits(max_connections=self.pool_limits.size * 4),
            )
        return self._http

    async def aclose(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    async def _send(self, method: str, path: str, *, token: str | None, json: Any = None) -> dict[str, Any]:
        """One request; the parsed body ({} for 204). Raises VaultHTTPError or an httpx error."""
        headers = {"X-Vault-Token": token} if token is not None else None
        r = await self._client().request(method, path, json=json, headers=headers)
        if r.status_code >= 400:
            raise VaultHTTPError(r.status_code)
        if r.status_code == 204 or not r.content:
            return {}
        body = r.json()
        return body if isinstance(body, dict) else {}

    def _unreachable(self, exc: BaseException, doing: str) -> TargetUnreachable:
        if isinstance(exc, VaultHTTPError):  # sealed, overloaded, or its own target (a database) down
            return TargetUnreachable(f"Vault could not serve {doing} now ({self.sanitize(exc)}).")
        code = "target_timeout" if "Timeout" in type(exc).__name__ else "target_unreachable"
        return TargetUnreachable(f"Vault did not answer while {doing} ({self.sanitize(exc)}).", code=code)

    async def _login(self) -> None:
        """Take the material's token (looked up once for its expiry), or log in with AppRole."""
        if self.auth_method == "token":
            token = self._material.token.get_secret_value()
            data = (await self._send("GET", "auth/token/lookup-self", token=token)).get("data") or {}
            self._token, self._token_expires = token, _parse_time(data.get("expire_time"))
        else:
            m = self._material
            try:
                body = await self._send("POST", f"auth/{self.config.approle_mount}/login", token=None, json={
                    "role_id": m.role_id.get_secret_value(), "secret_id": m.secret_id.get_secret_value()})
            except VaultHTTPError as exc:
                if exc.status in (400, 401, 403):
                    raise TargetError(f"Vault refused the AppRole login ({self.sanitize(exc)}).",
                                      code="target_auth_failed") from None
                raise
            auth = body.get("auth") or {}
            duration = int(auth.get("lease_duration") or 0)
            self._token = auth.get("client_token")
            self._token_expires = datetime.now(UTC) + timedelta(seconds=duration) if duration else None
        self._token_known = True

    def _token_stale(self) -> bool:
        if not self._token_known:
            return True
        if self.auth_method != "approle" or self._token_expires is None:
            return False
        return (self._token_expires - datetime.now(UTC)).total_seconds() < _TOKEN_MARGIN

    async def _ensure_token(self, force: bool = False, seen: str | None = None) -> str:
        async with self._login_lock:
            if force and self._token == seen:
                self._token_known = False
            if self._token_stale():
                await self._login()
            assert self._token is not None
            return self._token

    async def _call(self, doing: str, method: str, path: str, json: Any = None, *, token: str | None = None
                    ) -> dict[str, Any]:
        """An authenticated request, translated: unreachable -> TargetUnreachable, a refused or
        dead token -> target_auth_failed, a denial with a live token -> target_permission_denied.
        An AppRole token that stopped working is replaced once. Other Vault statuses are
        raised as VaultHTTPError for the caller to judge."""
        import httpx

        try:
            if token is not None:  # a per-lease child token: it has its parent's policies
                try:
                    return await self._send(method, path, token=token, json=json)
                except VaultHTTPError as exc:
                    if exc.status not in (401, 403):
                        raise
                    raise TargetError(f"Vault denied the lease's token while {doing} ({self.sanitize(exc)}).",
                                      code="target_permission_denied") from None
            token = await self._ensure_token()
            try:
                return await self._send(method, path, token=token, json=json)
            except VaultHTTPError as exc:
                if exc.status not in (401, 403):
                    raise
                if await self._token_alive(token):
                    raise TargetError(
                        f"Vault denied permission while {doing} ({self.sanitize(exc)}); check the token's policy "
                        f"for {path.split('/')[0]}/... (see the vault connector's docs).",
                        code="target_permission_denied",
                    ) from None
                if self.auth_method != "approle":
                    raise TargetError(f"Vault refused the connector's token while {doing} ({self.sanitize(exc)}).",
                                      code="target_auth_failed") from None
            token = await self._ensure_token(force=True, seen=token)
            return await self._send(method, path, token=token, json=json)
        except VaultHTTPError as exc:
            if exc.status in _UNREACHABLE_STATUS:
                raise self._unreachable(exc, doing) from None
            if exc.status in (401, 403):
                raise TargetError(f"Vault refused the connector's token while {doing} ({self.sanitize(exc)}).",
                                  code="target_auth_failed") from None
            raise
        except (httpx.TransportError, asyncio.TimeoutError, OSError) as exc:
            raise self._unreachable(exc, doing) from None
        except httpx.HTTPError as exc:
            raise TargetError(f"Vault failed while {doing} ({self.sanitize(exc)}).") from None

    async def _token_alive(self, token: str) -> bool:
        try:
            await self._send("GET", "auth/token/lookup-self", token=token)
        except VaultHTTPError as exc:
            if exc.status in _UNREACHABLE_STATUS:
                raise
            return False
        return True

    def _capped(self, when: datetime) -> datetime:
        return min(when, self._token_expires) if self._token_expires is not None else when

    # -- the lease ----------------------------------------------------------

    async def issue(self, req: IssueRequest) -> Issued:
        state = req.revoke_state
        mount, role = state.get("mount", self.config.mount), state.get("role") or parse_resource(req.resource)
        child: dict[str, Any] | None = None
        if self.config.per_lease_token:
            child = await self._child_token(req)
        try:
            body = await self._call(f"reading {mount}/creds/{role}", "GET", f"{mount}/creds/{role}",
                                    token=child["token"] if child else None)
        except Exception as exc:  # a cancellation leaves the child token to its TTL
            if child is not None:
                await self._revoke_accessor_quietly(child["accessor"])
            if isinstance(exc, VaultHTTPError):
                if exc.status in (400, 404):  # Vault: 400 "unknown role", 404 no such mount
                    raise ResourceRejected(f"Vault has no role {role} under {mount} ({self.sanitize(exc)}).",
                                           resource=req.resource, reason="not_found") from None
                raise TargetError(f"Vault refused reading {mount}/creds/{role} ({self.sanitize(exc)}).") from None
            raise
        now = datetime.now(UTC)
        lease_id = body.get("lease_id")
        data = body.get("data") or {}
        credential = credential_from(self.config.engine, data if isinstance(data, Mapping) else {})
        if not isinstance(lease_id, str) or not lease_id or credential is None:
            if isinstance(lease_id, str) and lease_id:
                await self._revoke_id(lease_id)  # nothing usable: don't leave it behind
            if child is not None:
                await self._revoke_accessor_quietly(child["accessor"])
            raise TargetError(
                f"Vault's answer for {mount}/creds/{role} is not a {self.config.engine} engine's credential.",
                code="unexpected_answer",
            )
        duration = int(body.get("lease_duration") or 0)
        expires = as_utc(req.expires_at)
        if duration > 0:
            expires = min(expires, now + timedelta(seconds=duration))
        revoke_state: dict[str, Any] = {"lease_id": lease_id, "renewable": bool(body.get("renewable"))}
        token_expires = child["expires"] if child is not None else self._token_expires
        if token_expires is not None:
            expires = min(expires, token_expires)
            revoke_state["token_expires_at"] = token_expires.isoformat()
        if child is not None:
            revoke_state["token_accessor"] = child["accessor"]
        return Issued(credential=credential, expires_at=expires, revoke_state=revoke_state)

    async def _child_token(self, req: IssueRequest) -> dict[str, Any]:
        """``per_lease_token``: a child of the connector's token (its policies), living until the
        credgate lease's expiry: the Vault lease read with it ends with it at the latest, even if
        the gateway never learns the lease id (see "What a crash leaves behind")."""
        seconds = max(1, int((as_utc(req.expires_at) - datetime.now(UTC)).total_seconds()))
        try:
            body = await self._call("creating the lease's token", "POST", "auth/token/create", {
                "ttl": f"{seconds}s", "renewable": True, "display_name": "credgate-" + req.lease_id[-24:],
                "meta": {"credgate_lease": req.lease_id}, "no_default_policy": False,
            })
        except VaultHTTPError as exc:
            raise TargetError(f"Vault refused creating the lease's token ({self.sanitize(exc)}).") from None
        auth = body.get("auth") or {}
        if not auth.get("client_token") or not auth.get("accessor"):
            raise TargetError("Vault's answer to a token creation has no token.", code="unexpected_answer")
        duration = int(auth.get("lease_duration") or 0)
        expires = datetime.now(UTC) + timedelta(seconds=duration) if duration else None
        return {"token": auth["client_token"], "accessor": auth["accessor"], "expires": expires}

    async def _revoke_accessor(self, accessor: str) -> None:
        """Revoke a per-lease token (and with it every lease it read); unknown is success."""
        try:
            await self._call("revoking the lease's token", "POST", "auth/token/revoke-accessor", {"accessor": accessor})
        except VaultHTTPError as exc:
            if exc.status == 400:  # Vault: "invalid accessor": expired or already revoked
                return
            raise TargetError(f"Vault refused revoking the lease's token ({self.sanitize(exc)}).") from None

    async def _revoke_accessor_quietly(self, accessor: str) -> None:
        try:
            await self._revoke_accessor(accessor)
        except Exception:  # noqa: BLE001 - clean-up of a failed issuance: the token dies at its TTL anyway
            pass

    async def renew(self, revoke_state: Mapping[str, Any], expires_at: datetime) -> datetime:
        lease_id = revoke_state.get("lease_id")
        if not isinstance(lease_id, str) or not lease_id:
            raise TargetError("This lease has no Vault lease id (its issuance never completed).",
                              code="credential_missing")
        if revoke_state.get("renewable") is False:
            raise NotRenewable("Vault issued this lease as not renewable; issue a new credential.")
        token_cap = _parse_time(revoke_state.get("token_expires_at"))
        wanted = as_utc(expires_at)
        accessor = revoke_state.get("token_accessor")
        if isinstance(accessor, str) and accessor:
            token_cap = await self._renew_accessor(accessor, wanted)
        if token_cap is not None:
            wanted = min(wanted, token_cap)
        increment = max(1, int((wanted - datetime.now(UTC)).total_seconds()))
        try:
            body = await self._call("renewing the lease", "PUT", "sys/leases/renew",
                                    {"lease_id": lease_id, "increment": increment})
        except VaultHTTPError as exc:
            if exc.status == 400:  # "lease not found" or "lease is not renewable": Vault says which only in text
                if await self._lease_exists(lease_id):
                    raise NotRenewable("Vault refused to renew this lease; issue a new credential.") from None
                raise TargetError("Vault no longer has this lease.", code="credential_gone") from None
            raise TargetError(f"Vault refused renewing the lease ({self.sanitize(exc)}).") from None
        duration = int(body.get("lease_duration") or 0)
        new = datetime.now(UTC) + timedelta(seconds=duration)
        return min(new, token_cap) if token_cap is not None else new

    async def _renew_accessor(self, accessor: str, wanted: datetime) -> datetime | None:
        """Move a per-lease token's expiry to ``wanted`` (Vault may grant less); its new expiry."""
        increment = max(1, int((wanted - datetime.now(UTC)).total_seconds()))
        try:
            body = await self._call("renewing the lease's token", "POST", "auth/token/renew-accessor",
                                    {"accessor": accessor, "increment": f"{increment}s"})
        except VaultHTTPError as exc:
            if exc.status == 400:  # "invalid accessor": the token, and so its leases, are gone
                raise TargetError("Vault no longer has this lease's token.", code="credential_gone") from None
            raise TargetError(f"Vault refused renewing the lease's token ({self.sanitize(exc)}).") from None
        duration = int((body.get("auth") or {}).get("lease_duration") or 0)
        return datetime.now(UTC) + timedelta(seconds=duration) if duration else None

    async def _lease_exists(self, lease_id: str) -> bool:
        """``sys/leases/lookup`` (needs update on it); unknown if denied: assume it exists."""
        try:
            await self._call("looking the lease up", "PUT", "sys/leases/lookup", {"lease_id": lease_id})
        except VaultHTTPError:
            return False
        except TargetError as exc:
            if exc.code == "target_permission_denied":
                return True
            raise
        return True

    async def revoke(self, revoke_state: Mapping[str, Any]) -> None:
        lease_id = revoke_state.get("lease_id")
        accessor = revoke_state.get("token_accessor")
        if not lease_id:
            return  # issuance never completed: nothing known to revoke (see "What a crash leaves behind")
        if not isinstance(lease_id, str) or not isinstance(accessor, (str, type(None))):
            raise TargetError("The revoke state's lease id is not a string.", code="invalid_revoke_state")
        await self._revoke_id(lease_id)  # synchronous: the credential is gone when it answers
        if accessor:
            await self._revoke_accessor(accessor)

    async def _revoke_id(self, lease_id: str) -> None:
        try:
            await self._call("revoking the lease", "PUT", "sys/leases/revoke", {"lease_id": lease_id})
        except VaultHTTPError as exc:
            raise TargetError(f"Vault refused revoking the lease ({self.sanitize(exc)}).") from None

    # -- inspection ---------------------------------------------------------

    async def verify(self) -> Verification:
        try:
            me = (await self._call("looking the token up", "GET", "auth/token/lookup-self")).get("data") or {}
            roles = await self._roles()
            updates = ["sys/leases/renew", "sys/leases/revoke"]
            if self.config.per_lease_token:
                updates += ["auth/token/create", "auth/token/renew-accessor", "auth/token/revoke-accessor"]
            caps = await self._call("reading the token's capabilities", "POST", "sys/capabilities-self", {"paths": [
                f"{self.config.mount}/creds/{r}" for r in roles[:1]] + updates})
        except (TargetError, VaultHTTPError) as exc:
            what = exc.message if isinstance(exc, TargetError) else f"({self.sanitize(exc)})"
            return Verification(ok=False, message=f"Could not verify the vault connector: {what}")
        missing = [p for p in updates if not {"update", "root", "sudo"} & set(caps.get(p) or [])]
        if roles and not {"read", "root"} & set(caps.get(f"{self.config.mount}/creds/{roles[0]}") or []):
            missing.append(f"{self.config.mount}/creds/*")
        identity = f"token accessor {me.get('accessor')}" if me.get("accessor") else None
        if missing:
            return Verification(ok=False, message=f"The Vault token lacks: {', '.join(missing)}.", identity=identity,
                                reachable={"vault-role": [PREFIX + r for r in roles]})
        return Verification(ok=True, message=f"{len(roles)} role(s) under {self.config.mount}.", identity=identity,
                            reachable={"vault-role": [PREFIX + r for r in roles]})

    async def _roles(self) -> list[str]:
        try:
            body = await self._call("listing roles", "LIST", f"{self.config.mount}/roles")
        except VaultHTTPError as exc:
            if exc.status == 404:  # no roles (or no such mount)
                return []
            raise TargetError(f"Vault refused listing roles ({self.sanitize(exc)}).") from None
        keys = (body.get("data") or {}).get("keys") or []
        return sorted(k for k in keys if isinstance(k, str) and _SEGMENT.match(k))

    async def list_resources(self, resource_type: str) -> list[str]:
        if resource_type != "vault-role":
            raise ResourceNotSupported("The vault connector's resource type is 'vault-role'.")
        return [PREFIX + r for r in await self._roles()]

