"""Redis: one ACL user per lease, limited to one key prefix.

A lease for resource ``features`` is the Redis user ``cg_<lease>`` created with::

    ACL SETUSER cg_<lease> reset on >PASSWORD ~features:* resetchannels -@all <grants> -@dangerous -function|flush ...

so it can run the granted commands (``+@read`` by default) on keys matching
``features:*`` only, and no pub/sub channel. Revoking kills the user's open
connections and deletes it; both steps count "already gone" as success.

Limits worth knowing:

- Redis has no expiring users: the gateway's lease reaper enforces the expiry
  by revoking, so ``renew`` only checks that the user still exists.
- Key patterns don't restrict commands that take no key: ``FLUSHDB`` and
  ``FLUSHALL`` (in ``@write``) wipe *every* key, ``KEYS`` lists every key
  name, and ``FUNCTION LOAD/DELETE/FLUSH/RESTORE`` (in ``@write``) or
  ``SCRIPT FLUSH/KILL`` (in ``@scripting``) change or stop what every other
  user runs. Unless ``allow_dangerous`` is set, :data:`SERVER_WIDE_EXCLUSIONS`
  (``-@dangerous`` and those subcommands) are appended *after* the grants, so
  they hold even with ``+@write`` or ``+@all`` (``SCAN``, in ``@read``, still
  lists key names of the whole database; values stay protected). Subcommand
  rules need Redis 7 or later.
- ACL users are per node: they are not replicated to replicas or cluster
  peers, and they survive a restart only if the server saves its ACL file.
  Point the connector at a single primary.
- ACL rules don't depend on the database number. When the material's URL
  names a database other than 0, ``+select`` is granted so clients can reach
  it, and the credential's ``url`` names it.

Admin connections come from the instance's :class:`~connectors.base.TargetPool`
(each slot a redis-py client of one connection, PINGed when taken). Not
redis-py's own ``BlockingConnectionPool``: its wait is fixed per pool rather
than each call's deadline, and running out of connections there is a
``ConnectionError`` told apart from an unreachable server only by its text. A
server at ``maxclients`` is ``target_too_many_connections``.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
import secrets
from collections.abc import Mapping
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, ClassVar
from urllib.parse import quote, unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from connectors.base import (
    PoolLimits,
    ConnectorBase,
    IssueRequest,
    Issued,
    ResourceNotSupported,
    ConnectorCapabilities,
    Revocability,
    TargetError,
    TargetPool,
    TargetUnreachable,
    TTLLimits,
    Verification,
    role_name,
    generic_sanitize,
)

__all__ = ["RedisConnector", "RedisConfig", "RedisPasswordMaterial", "KEYSPACE"]

KEYSPACE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_CATEGORY = re.compile(r"^[+-]@[a-z]+$")
_COMMAND = re.compile(r"^[+-][a-z|]+$")
_RESOURCE_PATTERN = re.compile(r"^[A-Za-z0-9._*?-]{1,128}$")
_SEPARATOR = re.compile(r"^[!-~]{1,8}$")
_GLOB_CHARS = set("*?[]\\^")
_USER = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DEFAULT_TIMEOUT = 10.0
# Appended after every lease's grants (unless ``allow_dangerous``): commands whose effect is not
# limited to the lease's keys. ``@dangerous`` holds FLUSHALL, FLUSHDB, KEYS, CONFIG, DEBUG,
# SHUTDOWN, MODULE, ACL, REPLICAOF/SLAVEOF, MIGRATE, RESTORE, SWAPDB, MONITOR, CLIENT KILL and
# more; the server-wide script and function subcommands are in ``@write`` or ``@scripting``
# only, so they are named one by one (subcommand rules need Redis 7).
SERVER_WIDE_EXCLUSIONS = (
    "-@dangerous",
    "-function|load", "-function|delete", "-function|flush", "-function|restore", "-function|kill",
    "-script|flush", "-script|kill", "-script|debug",
)
SCAN_CALLS = 10  # SCAN COUNT 100 calls made by list_resources (about 1000 keys)


def _check_grants(grants: list[str]) -> list[str]:
    for i, grant in enumerate(grants):
        if not (_CATEGORY.match(grant) or _COMMAND.match(grant)):
            raise ValueError(
                f"grant #{i + 1} must be a category (+@read, -@write) or a command (+get, -config|set)"
            )
    return grants


class RedisPasswordMaterial(BaseModel):
    """An admin login able to run ``ACL SETUSER``, ``ACL DELUSER`` and ``CLIENT KILL``.

    ``url`` is ``redis://host:port/db`` (``rediss://`` for TLS); a username or
    password given separately wins over one inside the URL.
    """

    model_config = ConfigDict(extra="forbid")

    url: SecretStr
    username: str | None = Field(default=None, min_length=1, max_length=256)
    password: SecretStr | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: SecretStr) -> SecretStr:
        _parse_url(value.get_secret_value())  # raises ValueError without quoting the URL
        return value


class RedisConfig(BaseModel):
    """What a lease's user may do.

    ``categories`` are ACL grants applied after ``-@all`` to every resource,
    unless a ``resource_commands`` pattern (fnmatch over the resource name,
    first match wins) names other grants for it.
    """

    model_config = ConfigDict(extra="forbid")

    categories: list[str] = Field(default_factory=lambda: ["+@read"], min_length=1, max_length=64)
    resource_commands: dict[str, list[str]] = Field(default_factory=dict)
    key_separator: str = ":"
    allow_dangerous: bool = False

    @field_validator("categories")
    @classmethod
    def _categories(cls, value: list[str]) -> list[str]:
        return _check_grants(value)

    @field_validator("resource_commands")
    @classmethod
    def _resource_commands(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for pattern, grants in value.items():
            if not _RESOURCE_PATTERN.match(pattern):
                raise ValueError("a resource pattern is 1-128 characters of A-Z a-z 0-9 . _ - * ?")
            if not grants:
                raise ValueError("each resource pattern needs at least one grant")
            _check_grants(grants)
        return value

    @field_validator("key_separator")
    @classmethod
    def _separator(cls, value: str) -> str:
        if not _SEPARATOR.match(value) or _GLOB_CHARS & set(value):
            raise ValueError("key_separator is 1-8 printable characters, no spaces and none of * ? [ ] \\ ^")
        return value

    def grants_for(self, resource: str) -> list[str]:
        for pattern, grants in self.resource_commands.items():
            if fnmatch.fnmatchcase(resource, pattern):
                return list(grants)
        return list(self.categories)


class _Target:
    """The parsed admin URL (no secrets kept here but the URL's own password)."""

    def __init__(self, scheme: str, host: str, port: int, db: int, username: str | None, password: str | None):
        self.tls = scheme == "rediss"
        self.scheme, self.host, self.port, self.db = scheme, host, port, db
        self.username, self.password = username, password

    @property
    def url_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host


def _parse_url(url: str) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError:
        raise ValueError("url is not a valid redis:// URL") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("url must start with redis:// or rediss://")
    if not parts.hostname:
        raise ValueError("url must name a host")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError("url path must be a database number")
    if parts.query or parts.fragment:
        raise ValueError("url must not have a query or fragment")
    return _Target(
        parts.scheme,
        parts.hostname,
        port,
        int(path or 0),
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None,
    )


def _error(exc: BaseException, doing: str) -> TargetError:
    """A Redis (or socket) failure as a credgate error; never the vendor's text."""
    from redis import exceptions as rx

    what = RedisConnector.sanitize(exc)
    if isinstance(exc, rx.AuthenticationError):
        return TargetError(f"Redis refused the connector's login while {doing} ({what}).", code="target_auth_failed")
    if isinstance(exc, rx.ConnectionError) and "max number of clients" in str(exc).lower():  # read, never repeated
        return TargetUnreachable(
            f"Redis refused the connection while {doing}: its maxclients limit is reached ({what}).",
            code="target_too_many_connections",
        )
    if isinstance(exc, (rx.ConnectionError, rx.TimeoutError, OSError, asyncio.TimeoutError)):
        return TargetUnreachable(f"Redis could not be reached while {doing} ({what}).")
    if isinstance(exc, rx.NoPermissionError):
        return TargetError(
            f"The connector's Redis login lacks a permission needed for {doing} ({what}).",
            code="target_permission_denied",
        )
    return TargetError(f"Redis failed while {doing} ({what}).")


async def _ping(client: Any, timeout: float) -> None:
    """Ready for a call: the connection answers (one closed by the server while idle fails here
    and is replaced). An admin connection carries no state between calls: every command of this
    connector is a single ACL, CLIENT, SCAN or PING (no MULTI, no SELECT of its own, no pub/sub)."""
    await client.execute_command("PING")


def _reusable(client: Any) -> bool:
    return True  # redis-py disconnects a connection whose command failed; it reconnects at the next


async def _close(client: Any) -> None:
    await client.aclose()


def _planned_user(revoke_state: Mapping[str, Any]) -> str:
    user = revoke_state.get("user")
    if not isinstance(user, str) or not _USER.match(user) or user == "default":
        raise TargetError("The lease's revoke state names no valid Redis user.", code="invalid_revoke_state")
    return user


class RedisConnector(ConnectorBase):
    """Short-lived Redis ACL users scoped to one key prefix (``<resource><sep>*``)."""

    type: ClassVar[str] = "redis"
    auth_methods: ClassVar[Mapping[str, type[BaseModel]]] = MappingProxyType({"password": RedisPasswordMaterial})
    config_model: ClassVar[type[BaseModel]] = RedisConfig
    resource_types: ClassVar[tuple[str, ...]] = ("keyspace",)
    # renewable: the reaper enforces expiry; renew only checks the user exists
    capabilities: ClassVar[ConnectorCapabilities] = ConnectorCapabilities(Revocability.REVOCABLE, renewable=True)
    ttl: ClassVar[TTLLimits] = TTLLimits(
        default=timedelta(hours=1), min=timedelta(seconds=1), max=timedelta(hours=24)
    )

    def __init__(
        self, config: BaseModel, auth_method: str, material: BaseModel, *, name: str = "", pool: PoolLimits | None = None
    ) -> None:
        super().__init__(config, auth_method, material, name=name, pool=pool)
        self.config: RedisConfig
        self._material: RedisPasswordMaterial
        self._target = _parse_url(self._material.url.get_secret_value())
        self.target_pool = TargetPool(
            "Redis", open=self._open, prepare=_ping, reusable=_reusable, close=_close, limits=self.pool_limits
        )

    @classmethod
    def sanitize(cls, exc: BaseException) -> str:
        """A redis-py error as its class name only (plus an errno for a socket error): redis
        errors carry no codes, and their messages can quote a key, an ACL rule or a password."""
        return generic_sanitize(exc)

    def __repr__(self) -> str:
        return f"<RedisConnector {self._target.url_host}:{self._target.port}/{self._target.db}>"

    # -- pure -------------------------------------------------------------

    def validate_resource(self, resource: str) -> str:
        if not isinstance(resource, str) or not KEYSPACE.match(resource):
            raise ResourceNotSupported(
                "A redis resource is a key prefix of 1-128 characters of A-Z a-z 0-9 . _ - "
                "(resource 'features' grants the keys 'features:*')."
            )
        return "keyspace"

    def plan(self, lease_id: str, resource: str) -> dict[str, Any]:
        self.validate_resource(resource)
        return {"user": role_name(lease_id)}

    def acl_rules(self, resource: str, password: str) -> list[str]:
        """The arguments after ``ACL SETUSER <user>`` for a lease on ``resource``."""
        self.validate_resource(resource)
        rules = ["reset", "on", ">" + password, f"~{resource}{self.config.key_separator}*", "resetchannels", "-@all"]
        rules += self.config.grants_for(resource)
        if self._target.db != 0:
            rules.append("+select")
        if not self.config.allow_dangerous:
            rules += SERVER_WIDE_EXCLUSIONS  # after the grants: they win over +@write, +@scripting, +@all
        return rules

    # -- I/O ----------------------------------------------------------------

    async def _open(self, _key: Any, timeout: float) -> Any:
        """A new admin connection: a client of one connection, which connects (and logs in) at
        its first command (the pool's PING). Not a ``single_connection_client``: redis-py's own
        pool of one reconnects a connection the server closed, and a client dropped unclosed
        (a connector never closed) does not touch a closed event loop."""
        return self._client(timeout)

    def _client(self, timeout: float) -> Any:
        import redis.asyncio as aioredis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        t = self._target
        password = self._material.password.get_secret_value() if self._material.password else t.password
        return aioredis.Redis(
            host=t.host,
            port=t.port,
            db=t.db,
            username=self._material.username or t.username,
            password=password,
            ssl=t.tls,
            socket_timeout=max(timeout, DEFAULT_TIMEOUT),  # each call's own deadline is cut in _run
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            max_connections=1,
            decode_responses=True,
        )

    async def _run(self, doing: str, timeout: float, work: Any) -> Any:
        """Run ``await work(client)`` on a pooled admin connection under one deadline (the wait
        for a free connection included)."""
        assert self.target_pool is not None
        try:
            async with asyncio.timeout(timeout):
                async with self.target_pool.connection(None, timeout) as client:
                    return await work(client)
        except TargetError:
            raise
        except Exception as exc:  # noqa: BLE001 - every driver failure is mapped, never quoted
            raise _error(exc, doing) from None

    async def issue(self, req: IssueRequest) -> Issued:
        user = _planned_user(req.revoke_state)
        password = secrets.token_urlsafe(32)
        rules = self.acl_rules(req.resource, password)

        async def work(client: Any) -> None:
            await client.execute_command("ACL", "SETUSER", user, *rules)

        await self._run("creating the lease's ACL user", req.timeout_seconds, work)
        t = self._target
        scheme = "rediss" if t.tls else "redis"
        url = f"{scheme}://{user}:{quote(password, safe='')}@{t.url_host}:{t.port}"
        if t.db:
            url += f"/{t.db}"
        return Issued(
            credential={"username": user, "password": password, "host": t.host, "port": str(t.port), "url": url},
            expires_at=req.expires_at,
        )

    async def renew(self, revoke_state: Mapping[str, Any], expires_at: datetime) -> datetime:
        """Redis users don't expire by themselves: the gateway's reaper revokes
        the lease at its expiry. Renewing only checks the user still exists."""
        user = _planned_user(revoke_state)

        async def work(client: Any) -> Any:
            return await client.execute_command("ACL", "GETUSER", user)

        if not await self._run("looking up the lease's ACL user", DEFAULT_TIMEOUT, work):
            raise TargetError("The lease's Redis user no longer exists; it can't be renewed.", code="credential_missing")
        return expires_at

    async def revoke(self, revoke_state: Mapping[str, Any]) -> None:
        """Kill the user's connections, then delete it. Idempotent."""
        user = _planned_user(revoke_state)

        async def work(client: Any) -> None:
            from redis.exceptions import ResponseError

            try:
                await client.execute_command("CLIENT", "KILL", "USER", user)
            except ResponseError as exc:
                if "no such user" not in str(exc).lower():  # read for classification only
                    raise
            # Deleting a user also closes connections authenticated as it, so a
            # login between the two commands can't survive. 0 deleted: already gone.
            await client.execute_command("ACL", "DELUSER", user)

        await self._run("removing the lease's ACL user", DEFAULT_TIMEOUT, work)

    async def _scan_prefixes(self, client: Any, calls: int) -> list[str]:
        """First key segments seen in at most ``calls`` ``SCAN ... COUNT 100`` calls."""
        sep = self.config.key_separator
        prefixes: set[str] = set()
        cursor = 0
        for _ in range(calls):
            cursor, keys = await client.execute_command("SCAN", cursor, "COUNT", 100)
            for key in keys:
                head = key.split(sep, 1)[0] if sep in key else None
                if head and KEYSPACE.match(head):
                    prefixes.add(head)
            if int(cursor) == 0:
                break
        return sorted(prefixes)

    async def verify(self) -> Verification:
        """Log in, ``ACL WHOAMI``, ``PING`` and sample the key prefixes (one SCAN)."""
        from redis.exceptions import NoPermissionError

        async def work(client: Any) -> tuple[str, list[str] | None]:
            whoami = await client.execute_command("ACL", "WHOAMI")
            await client.execute_command("PING")
            try:
                sample = await self._scan_prefixes(client, calls=1)
            except NoPermissionError:
                sample = None
            return str(whoami), sample

        try:
            whoami, sample = await self._run("verifying the connector", DEFAULT_TIMEOUT, work)
        except TargetError as exc:
            return Verification(ok=False, message=exc.message)
        message = f"Logged in to Redis as {whoami}."
        if sample is None:
            return Verification(ok=True, message=message + " SCAN is not permitted.", identity=whoami)
        return Verification(ok=True, message=message, identity=whoami, reachable={"keyspace": sample})

    async def list_resources(self, resource_type: str) -> list[str]:
        """Key prefixes (first segments) among about the first 1000 keys SCAN returns."""
        if resource_type != "keyspace":
            raise ResourceNotSupported(f"Connector type redis has no resource type {resource_type!r}; it has: keyspace.")

        async def work(client: Any) -> list[str]:
            return await self._scan_prefixes(client, calls=SCAN_CALLS)

        return await self._run("listing key prefixes", DEFAULT_TIMEOUT, work)
