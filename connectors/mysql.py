"""MySQL and MariaDB: one user account per lease.

Resources::

    shop           type "database": the privileges ON `shop`.*
    shop/orders    type "table":    the privileges ON `shop`.`orders`

The admin account (material ``host``, ``port``, ``username``, ``password``)
needs CREATE USER, the granted privileges WITH GRANT OPTION, SELECT on
``mysql.user`` (to check that an account exists), and PROCESS plus SUPER or
CONNECTION ADMIN to see and kill other accounts' connections. Without PROCESS
the process list shows only the admin's own connections and revocation cannot
end the user's sessions, so grant it.

Expiry: MariaDB and MySQL have no per-account ``VALID UNTIL`` with sub-day
precision (``PASSWORD EXPIRE INTERVAL`` counts days, and an expired password
still logs in to change itself). The target therefore does not enforce the
lease's expiry: the gateway's reaper revokes the account when the lease
expires. ``renew`` only checks that the account still exists.

Revocation, in order: ``ALTER USER IF EXISTS ... ACCOUNT LOCK`` (no new
logins), ``KILL CONNECTION`` for every connection of the user in
``information_schema.PROCESSLIST``, ``DROP USER IF EXISTS``, then kill again
and wait until no connection of the user remains (MySQL and MariaDB leave the
sessions of a dropped user running). An account already gone is success.

Database names in a database-level GRANT are patterns (``_`` and ``%`` are
wildcards); they are escaped so ``shop_eu`` does not also grant ``shopXeu``.

Admin connections come from the instance's :class:`~connectors.base.TargetPool`;
PyMySQL blocks, so connecting, the liveness ping on taking one, the work and
closing run in the connector's own worker threads. Every statement here
autocommits and sets no session variable; a connection goes back only open, in
autocommit and outside a transaction. The server's connection limits (errors
1040, 1203, and 1226 for ``max_user_connections``) are
``target_too_many_connections``.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from connectors.base import (
    PoolLimits,
    ConnectorBase,
    as_utc,
    IssueRequest,
    Issued,
    ResourceNotSupported,
    ResourceRejected,
    ConnectorCapabilities,
    Revocability,
    TargetError,
    TargetPool,
    TargetUnreachable,
    TTLLimits,
    Verification,
    generic_sanitize,
    privileges_for,
    role_name,
    run_sync,
)

if TYPE_CHECKING:
    from pymysql.connections import Connection

__all__ = ["MySQLConfig", "MySQLConnector", "MySQLPasswordMaterial"]

Privilege = Literal["SELECT", "INSERT", "UPDATE", "DELETE", "CREATE", "DROP", "INDEX", "ALTER", "EXECUTE", "SHOW VIEW"]
TABLE_PRIVILEGES = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "CREATE", "DROP", "INDEX", "ALTER", "SHOW VIEW"})

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
USER = re.compile(r"^cg_[a-z0-9]{1,29}$")  # only accounts this connector plans may be locked or dropped
USER_HOST = re.compile(r"^[A-Za-z0-9.%_:-]{1,255}$")
SYSTEM_SCHEMAS = ("information_schema", "mysql", "performance_schema", "sys")

DEFAULT_TIMEOUT = 30.0  # seconds, for calls without an IssueRequest

# MySQL/MariaDB error numbers this module tells apart
ER_ACCESS_DENIED = 1045
ER_CANNOT_USER = 1396
ER_NO_SUCH_THREAD = 1094
ER_NO_SUCH_TABLE = 1146
# The server's connection limits: 1040 max_connections, 1203 max_user_connections (global),
# 1226 an account's MAX_USER_CONNECTIONS (1226 also covers other resource limits: read its text)
ER_CON_COUNT_ERROR = 1040
ER_TOO_MANY_USER_CONNECTIONS = 1203
ER_USER_LIMIT_REACHED = 1226
PERMISSION_ERRORS = frozenset({1044, 1142, 1143, 1227, 1410})
CONNECTION_ERRORS = frozenset({2003, 2006, 2013, 2055})

T = TypeVar("T")


class MySQLPasswordMaterial(BaseModel):
    """Auth method ``password``: an admin account."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(min_length=1, max_length=255)
    port: int = Field(default=3306, ge=1, le=65535)
    username: str = Field(min_length=1, max_length=80)
    password: SecretStr


class MySQLConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    privileges: list[Privilege] = Field(default_factory=lambda: ["SELECT"], min_length=1)
    resource_privileges: dict[str, list[Privilege]] = Field(
        default_factory=dict,
        description="fnmatch pattern -> privileges; the first matching pattern replaces `privileges`",
    )
    user_host: str = Field(default="%", pattern=USER_HOST.pattern, description="the host part of created accounts")
    connect_timeout: int = Field(default=10, ge=1, le=300)


def _ident(name: str) -> str:
    """A backtick-quoted identifier."""
    return "`" + name.replace("`", "``") + "`"


def _db_pattern(name: str) -> str:
    """A database name for ``GRANT ... ON db.*``, where ``_`` and ``%`` are wildcards: escape them."""
    return _ident(name.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%"))


class MySQLConnector(ConnectorBase):
    """Issues a MySQL/MariaDB account per lease (see the module docstring)."""

    type: ClassVar[str] = "mysql"
    auth_methods: ClassVar[Mapping[str, type[BaseModel]]] = {"password": MySQLPasswordMaterial}
    config_model: ClassVar[type[BaseModel]] = MySQLConfig
    resource_types: ClassVar[tuple[str, ...]] = ("database", "table")
    capabilities: ClassVar[ConnectorCapabilities] = ConnectorCapabilities(Revocability.REVOCABLE, renewable=True)
    ttl: ClassVar[TTLLimits] = TTLLimits(
        default=timedelta(hours=1), min=timedelta(seconds=1), max=timedelta(hours=24)
    )

    def __init__(
        self, config: BaseModel, auth_method: str, material: BaseModel, *, name: str = "", pool: PoolLimits | None = None
    ) -> None:
        super().__init__(config, auth_method, material, name=name, pool=pool)
        self.config: MySQLConfig
        self._material: MySQLPasswordMaterial
        self._threads = f"connector:{name or 'mysql'}"  # its own worker threads: a slow MySQL holds only these
        self.target_pool = _admin_pool(self._material, self.config.connect_timeout, self.pool_limits, self._threads)

    # -- pure --------------------------------------------------------------

    def validate_resource(self, resource: str) -> str:
        parts = resource.split("/")
        if len(parts) > 2 or not all(NAME.match(p) for p in parts):
            raise ResourceNotSupported(
                "A mysql resource is DATABASE or DATABASE/TABLE, each 1-64 letters, digits, '_' or '-'."
            )
        if len(parts) == 2:
            extra = sorted(set(privileges_for(self.config, resource)) - TABLE_PRIVILEGES)
            if extra:
                raise ResourceNotSupported(
                    f"Privilege {', '.join(extra)} cannot be granted on a table; use a database resource."
                )
            return "table"
        return "database"

    def plan(self, lease_id: str, resource: str) -> dict[str, Any]:
        self.validate_resource(resource)
        database, _, table = resource.partition("/")
        return {"user": role_name(lease_id), "host": self.config.user_host, "database": database, "table": table or None}

    @classmethod
    def sanitize(cls, exc: BaseException) -> str:
        """A PyMySQL error as its class, SQLSTATE and MySQL error number (never its message,
        which quotes the statement). PyMySQL 1.1+ sets ``sqlstate`` on server errors, and
        SQLSTATEs like HY000 say little, so the error number (``args[0]``) is kept too."""
        errno = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        sqlstate = getattr(exc, "sqlstate", None)
        if sqlstate is not None:
            return f"{type(exc).__name__} ({sqlstate})" + (f" [error {errno}]" if errno is not None else "")
        if errno is not None:
            return f"{type(exc).__name__} ({errno})"
        return generic_sanitize(exc)

    # -- target calls ------------------------------------------------------

    async def issue(self, req: IssueRequest) -> Issued:
        self.validate_resource(req.resource)
        user, host = self._account(req.revoke_state)
        database = req.revoke_state.get("database")
        table = req.revoke_state.get("table")
        if not isinstance(database, str) or not NAME.match(database) or (table is not None and not NAME.match(str(table))):
            raise TargetError("The lease's revoke state names an invalid database or table.", code="invalid_revoke_state")
        privileges = privileges_for(self.config, req.resource)
        password = secrets.token_urlsafe(24)
        target = f"{_ident(database)}.{_ident(table)}" if table else f"{_db_pattern(database)}.*"
        account = f"{_ident(user)}@{_ident(host)}"

        def work(conn: Connection) -> None:
            with conn.cursor() as cur:
                if table:
                    cur.execute(
                        "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
                        (database, table),
                    )
                else:
                    cur.execute("SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", (database,))
                if cur.fetchone() is None:
                    raise ResourceRejected(
                        f"{req.resource} does not exist at the target; nothing was created.",
                        resource=req.resource, reason="not_found",
                    )
                # conn.escape quotes the password for this connection's sql_mode; no %-formatting follows.
                cur.execute(f"CREATE USER {account} IDENTIFIED BY {conn.escape(password)}")
                refused: int | None = None
                try:
                    cur.execute(f"GRANT {', '.join(privileges)} ON {target} TO {account}")
                except Exception as exc:
                    cur.execute(f"DROP USER IF EXISTS {account}")  # DDL autocommits: undo by hand
                    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
                    if code not in PERMISSION_ERRORS and code != ER_NO_SUCH_TABLE:
                        raise
                    refused = code
                if refused is not None:  # this resource, not the connector: the caller's request can't be met
                    missing = refused == ER_NO_SUCH_TABLE
                    raise ResourceRejected(
                        f"{req.resource} does not exist at the target; nothing was created (error {refused})."
                        if missing else
                        f"The admin account may not grant {', '.join(privileges)} on {req.resource}; "
                        f"nothing was created (error {refused}).",
                        resource=req.resource, reason="not_found" if missing else "not_grantable",
                    )

        await self._call(work, "create the user", req.timeout_seconds)
        m = self._material
        credential = {
            "username": user,
            "password": password,
            "host": m.host,
            "port": str(m.port),
            "database": database,
            "dsn": f"mysql://{quote(user, safe='')}:{quote(password, safe='')}@{self._url_host()}:{m.port}/{quote(database, safe='')}",
        }
        return Issued(credential=credential, expires_at=as_utc(req.expires_at))

    async def renew(self, revoke_state: Mapping[str, Any], expires_at: datetime) -> datetime:
        """The target has no expiry of its own: check the account exists and return ``expires_at``."""
        user, host = self._account(revoke_state)

        def work(conn: Connection) -> bool:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM mysql.user WHERE User = %s AND Host = %s", (user, host))
                return cur.fetchone() is not None

        if not await self._call(work, "check the user", DEFAULT_TIMEOUT):
            raise TargetError(f"User {user} no longer exists at the target.", code="credential_gone")
        return as_utc(expires_at)

    async def revoke(self, revoke_state: Mapping[str, Any]) -> None:
        user, host = self._account(revoke_state)
        account = f"{_ident(user)}@{_ident(host)}"

        def work(conn: Connection) -> None:
            with conn.cursor() as cur:
                try:
                    cur.execute(f"ALTER USER IF EXISTS {account} ACCOUNT LOCK")
                    self._kill(cur, user)
                    cur.execute(f"DROP USER IF EXISTS {account}")
                except Exception as exc:
                    # Dropped by someone else meanwhile (ER_CANNOT_USER, 1396, from a server or
                    # statement without IF EXISTS, or a concurrent DROP): gone is revoked.
                    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
                    if code != ER_CANNOT_USER:
                        raise
                    cur.execute("SELECT 1 FROM mysql.user WHERE User = %s AND Host = %s", (user, host))
                    if cur.fetchone() is not None:
                        raise
                self._kill(cur, user, wait=5.0)  # a dropped user's sessions keep running otherwise

        await self._call(work, "revoke the user", DEFAULT_TIMEOUT)

    async def verify(self) -> Verification:
        def work(conn: Connection) -> tuple[str, str, list[str]]:
            with conn.cursor() as cur:
                cur.execute("SELECT CURRENT_USER(), VERSION()")
                identity, version = cur.fetchone()
            return identity, version, self._databases(conn)

        try:
            identity, version, databases = await self._call(work, "verify the connection", DEFAULT_TIMEOUT)
        except TargetError as exc:
            return Verification(ok=False, message=f"Could not verify the MySQL connector: {exc.message}")
        return Verification(
            ok=True,
            message=f"Connected to MySQL/MariaDB {version} as {identity}.",
            identity=identity,
            reachable={"database": databases},
        )

    async def list_resources(self, resource_type: str) -> list[str]:
        if resource_type not in self.resource_types:
            raise ResourceNotSupported(
                f"The mysql connector lists resource types {', '.join(self.resource_types)}, not {resource_type!r}."
            )
        if resource_type == "database":
            return await self._call(self._databases, "list databases", DEFAULT_TIMEOUT)

        def tables(conn: Connection) -> list[str]:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.TABLES "
                    "WHERE TABLE_SCHEMA NOT IN %s ORDER BY TABLE_SCHEMA, TABLE_NAME",
                    (SYSTEM_SCHEMAS,),
                )
                return [f"{db}/{name}" for db, name in cur.fetchall() if NAME.match(db) and NAME.match(name)]

        return await self._call(tables, "list tables", DEFAULT_TIMEOUT)

    # -- plumbing ----------------------------------------------------------

    def _account(self, revoke_state: Mapping[str, Any]) -> tuple[str, str]:
        user, host = revoke_state.get("user"), revoke_state.get("host")
        if not isinstance(user, str) or not USER.match(user) or not isinstance(host, str) or not USER_HOST.match(host):
            raise TargetError(
                "The lease's revoke state does not name an account this connector creates.", code="invalid_revoke_state"
            )
        return user, host

    def _url_host(self) -> str:
        host = self._material.host
        return f"[{host}]" if ":" in host and not host.startswith("[") else host

    @staticmethod
    def _databases(conn: Connection) -> list[str]:
        with conn.cursor() as cur:
            cur.execute("SHOW DATABASES")
            return sorted(db for (db,) in cur.fetchall() if db not in SYSTEM_SCHEMAS and NAME.match(db))

    @staticmethod
    def _kill(cur: Any, user: str, wait: float = 0.0) -> None:
        """Kill every connection of ``user``; with ``wait``, until none is left (bounded)."""
        import pymysql

        deadline = time.monotonic() + wait
        while True:
            cur.execute(
                "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s AND ID <> CONNECTION_ID()", (user,)
            )
            ids = [int(i) for (i,) in cur.fetchall()]
            for thread_id in ids:
                try:
                    cur.execute(f"KILL CONNECTION {thread_id:d}")
                except pymysql.err.OperationalError as exc:
                    if exc.args[0] != ER_NO_SUCH_THREAD:  # it ended by itself meanwhile
                        raise
            if not ids or wait <= 0:
                return
            if time.monotonic() > deadline:
                raise TargetError(
                    f"{len(ids)} connection(s) of the user did not end within {wait:g} s of being killed.",
                    code="sessions_still_open",
                )
            time.sleep(0.02)

    async def _call(self, work: Callable[[Connection], T], doing: str, timeout: float) -> T:
        """Run ``work`` on a pooled admin connection in a thread; vendor errors become our own sentence."""
        try:
            import pymysql
        except ImportError:
            raise TargetError(
                "The mysql connector needs PyMySQL: pip install 'credgate[mysql]'.", code="missing_dependency"
            ) from None

        pool = self.target_pool
        assert pool is not None
        failure: TargetError | None = None
        try:
            async with pool.connection(None, timeout) as conn:
                return await pool.run_sync(conn, work, timeout=timeout, pool=self._threads)
        except TargetError as exc:
            failure = exc
        except asyncio.TimeoutError:
            failure = TargetUnreachable(f"MySQL did not answer in time to {doing}.", code="target_timeout")
        except pymysql.err.MySQLError as exc:
            failure = _translate(exc, doing)
        except Exception as exc:  # noqa: BLE001 - every vendor error becomes our own sentence
            failure = TargetError(f"MySQL failed to {doing} ({MySQLConnector.sanitize(exc)}).")
        raise failure  # outside the except blocks: no vendor exception in __context__


def _admin_pool(m: MySQLPasswordMaterial, connect_timeout: int, limits: PoolLimits, threads: str) -> TargetPool[Any]:
    """The connector's pool of admin connections (one target, no key). PyMySQL blocks: opening,
    checking and closing run in the connector's worker threads. The callables hold what they
    need, not the connector."""

    def connect() -> Connection:
        import pymysql

        return pymysql.connect(
            host=m.host,
            port=m.port,
            user=m.username,
            password=m.password.get_secret_value(),
            connect_timeout=connect_timeout,
            read_timeout=DEFAULT_TIMEOUT,
            write_timeout=DEFAULT_TIMEOUT,
            autocommit=True,
            charset="utf8mb4",
        )

    async def open_(_key: Any, timeout: float) -> Connection:
        import pymysql

        failure: TargetError | None = None
        try:
            return await run_sync(connect, timeout=min(timeout, connect_timeout + 1.0), pool=threads)
        except asyncio.TimeoutError:
            failure = TargetUnreachable("MySQL did not accept a connection in time.", code="target_timeout")
        except pymysql.err.MySQLError as exc:
            failure = _translate(exc, "connect")
        except Exception as exc:  # noqa: BLE001
            failure = TargetUnreachable(f"Could not connect to MySQL ({MySQLConnector.sanitize(exc)}).")
        raise failure

    def check(conn: Connection, timeout: float) -> None:
        # The socket deadline of this call's statements (PyMySQL reads these per I/O), then a
        # COM_PING: a connection the server ended while idle fails here and is replaced.
        conn._read_timeout = conn._write_timeout = max(1, int(timeout))  # noqa: SLF001
        conn.ping(reconnect=False)

    async def prepare(conn: Connection, timeout: float) -> None:
        await run_sync(check, conn, timeout, timeout=min(timeout, 10.0), pool=threads)

    def reusable(conn: Connection) -> bool:
        # Every statement of this connector autocommits and sets no session variable; a
        # connection is taken back only open, in autocommit and outside a transaction.
        from pymysql.constants import SERVER_STATUS

        return bool(conn.open) and bool(conn.autocommit_mode) and not conn.server_status & SERVER_STATUS.SERVER_STATUS_IN_TRANS

    async def close(conn: Connection) -> None:
        await run_sync(conn.close, timeout=5.0, pool=threads)

    return TargetPool("MySQL", open=open_, prepare=prepare, reusable=reusable, close=close, limits=limits)


def _translate(exc: BaseException, doing: str) -> TargetError:
    """A PyMySQL error as our own sentence with its class, SQLSTATE and error number (never its message)."""
    safe = MySQLConnector.sanitize(exc)
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    if code == ER_ACCESS_DENIED:
        return TargetError(f"MySQL rejected the admin credentials ({safe}).", code="target_auth_failed")
    if code in (ER_CON_COUNT_ERROR, ER_TOO_MANY_USER_CONNECTIONS) or (
        code == ER_USER_LIMIT_REACHED and "max_user_connections" in str(exc)  # read, never repeated
    ):
        return TargetUnreachable(
            f"MySQL refused the admin connection: its connection limit is reached ({safe}).",
            code="target_too_many_connections",
        )
    if code in CONNECTION_ERRORS:
        return TargetUnreachable(f"Could not reach MySQL to {doing} ({safe}).")
    if code in PERMISSION_ERRORS:
        return TargetError(
            f"MySQL refused to {doing}: the admin account lacks a privilege ({safe}).", code="target_permission_denied"
        )
    if code == ER_CANNOT_USER and doing == "create the user":
        return TargetError(
            f"The user already exists at the target; a lease id is never reused ({safe}).", code="credential_exists"
        )
    if code == ER_NO_SUCH_TABLE:
        return TargetError(f"A table is missing at the target ({safe}).", code="resource_not_found")
    return TargetError(f"MySQL failed to {doing} ({safe}).")
