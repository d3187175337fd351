"""PostgreSQL: one login role per lease, with its own password and ``VALID UNTIL``.

Resources::

    analytics          type "database": CONNECT on it, USAGE on schema public and the
                       configured privileges on ALL TABLES IN SCHEMA public
    analytics/sales    type "schema": CONNECT on the database, USAGE on that schema and
                       the privileges on ALL TABLES IN SCHEMA sales

The admin DSN (material ``dsn``) names a role with CREATEROLE that may grant the
privileges above (the database and table owner, or a holder of GRANT OPTION).
Every role is created ``NOINHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE
NOREPLICATION NOBYPASSRLS`` with ``VALID UNTIL`` at the lease's expiry, so the
server itself refuses a new login once the lease has expired, even if the
gateway is down. An open session outlives ``VALID UNTIL``: only :meth:`revoke`
ends sessions.

The role's password never reaches the server in clear text: the statement
carries a SCRAM (or md5, per the server's ``password_encryption``) verifier
computed by libpq, so a failed ``CREATE ROLE`` logged by the server does not
log the password.

What this connector does not change: privileges the database grants to
``PUBLIC`` (by default CONNECT on every database, TEMP, and before PostgreSQL 15
CREATE on schema public) apply to every role, these included. Tables created
after issuance are not covered by the grant (it is ``ALL TABLES`` at that
moment). With INSERT granted, USAGE on ALL SEQUENCES of the schema is granted
too, so that ``serial`` and identity columns work.

Revocation, in order: ``NOLOGIN`` (committed, so no new session can start),
terminate the role's sessions and wait for them to exit, then in one transaction
in the resource database ``REASSIGN OWNED`` / ``DROP OWNED`` (which removes its
grants), terminate again (a session that was authenticating while ``NOLOGIN``
committed) and ``DROP ROLE``. A role or database already gone is success.
A non-superuser admin first grants itself membership in the role, which
``pg_terminate_backend`` and ``REASSIGN/DROP OWNED`` require (on PostgreSQL 16+
this works for roles the admin created, which hold ADMIN OPTION for it).

Admin connections come from the instance's :class:`~connectors.base.TargetPool`
(``pool_limits.size`` over every database, shared by every call): each call
takes one for its database, and on taking it the session is reset (``SET
SESSION AUTHORIZATION DEFAULT; RESET ALL``, back to the DSN's own options) and
gets the call's ``statement_timeout`` and ``lock_timeout``. A connection goes
back only outside a transaction; one whose call raised is closed. The server's
own connection limit (SQLSTATE 53300) is ``target_too_many_connections``.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Literal
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
    from psycopg import AsyncConnection

__all__ = ["PostgresConfig", "PostgresConnector", "PostgresPasswordMaterial"]

Privilege = Literal["SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"]

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
ROLE = re.compile(r"^cg_[a-z0-9]{1,60}$")  # only roles this connector plans may be altered or dropped

DEFAULT_TIMEOUT = 30.0  # seconds, for calls without an IssueRequest (renew, revoke, verify, list)
# What another revocation of the same role at the same moment makes a revoke fail with, while
# the role still exists: XX000 "tuple concurrently updated", 42704 undefined_object (the other's
# DROP not committed yet), 23505 (both GRANT the role to the admin), deadlock, serialization
# failure. Revoke looks again after these.
RACE_SQLSTATES = frozenset({"XX000", "42704", "23505", "40P01", "40001"})


SCRAM_ITERATIONS = 4096  # PostgreSQL's default (its scram_iterations setting, reported by 16 and later)


def scram_verifier(password: str, iterations: int = SCRAM_ITERATIONS, salt: bytes | None = None) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802, RFC 7677; the
    form of libpq's ``PQencryptPasswordConn``), so a ``CREATE ROLE`` carries no password.
    The passwords this connector makes are ASCII, which SASLprep leaves as they are."""
    import base64
    import hashlib
    import hmac

    if not password.isascii():
        raise ValueError("scram_verifier takes the connector's own ASCII passwords only")
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


class PostgresPasswordMaterial(BaseModel):
    """Auth method ``password``: an admin libpq URL or key/value DSN."""

    model_config = ConfigDict(extra="forbid")

    dsn: SecretStr = Field(description="libpq URL or DSN of a role with CREATEROLE and grant rights")


class PostgresConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    privileges: list[Privilege] = Field(default_factory=lambda: ["SELECT"], min_length=1)
    resource_privileges: dict[str, list[Privilege]] = Field(
        default_factory=dict,
        description="fnmatch pattern -> privileges; the first matching pattern replaces `privileges`",
    )
    host_override: str | None = Field(
        default=None, min_length=1, max_length=255, description="host put in the credential instead of the DSN's"
    )
    connect_timeout: int = Field(default=10, ge=1, le=300)


def _hostport(host: str, port: str) -> str:
    """``host:port`` for a URL: IPv6 in brackets, socket directories percent-encoded."""
    if host.startswith("/"):
        return quote(host, safe="") + (f":{port}" if port else "")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}" if port else host


class PostgresConnector(ConnectorBase):
    """Issues a PostgreSQL login role per lease (see the module docstring)."""

    type: ClassVar[str] = "postgres"
    auth_methods: ClassVar[Mapping[str, type[BaseModel]]] = {"password": PostgresPasswordMaterial}
    config_model: ClassVar[type[BaseModel]] = PostgresConfig
    resource_types: ClassVar[tuple[str, ...]] = ("database", "schema")
    capabilities: ClassVar[ConnectorCapabilities] = ConnectorCapabilities(Revocability.REVOCABLE, renewable=True)
    ttl: ClassVar[TTLLimits] = TTLLimits(
        default=timedelta(hours=1), min=timedelta(seconds=1), max=timedelta(hours=24)
    )

    def __init__(
        self, config: BaseModel, auth_method: str, material: BaseModel, *, name: str = "", pool: PoolLimits | None = None
    ) -> None:
        super().__init__(config, auth_method, material, name=name, pool=pool)
        self.config: PostgresConfig
        config = self.config
        self._dsn = self._material.dsn
        params = self._parse_dsn()
        self._host = config.host_override or params.get("host") or params.get("hostaddr") or "localhost"
        self._port = params.get("port") or "5432"
        self._sslmode = params.get("sslmode")
        self.target_pool = _admin_pool(self._dsn, config.connect_timeout, self.pool_limits)

    # -- pure --------------------------------------------------------------

    def validate_resource(self, resource: str) -> str:
        parts = resource.split("/")
        if len(parts) > 2 or not all(IDENTIFIER.match(p) for p in parts):
            raise ResourceNotSupported(
                "A postgres resource is DATABASE or DATABASE/SCHEMA, each a plain identifier "
                "(a letter or '_', then up to 62 letters, digits or '_').",
            )
        return "database" if len(parts) == 1 else "schema"

    def plan(self, lease_id: str, resource: str) -> dict[str, Any]:
        self.validate_resource(resource)
        database, _, schema = resource.partition("/")
        return {"role": role_name(lease_id), "database": database, "schema": schema or None}

    @classmethod
    def sanitize(cls, exc: BaseException) -> str:
        """A psycopg error as its class and SQLSTATE (psycopg quotes the statement in its
        message, and a failed ``CREATE ROLE`` statement holds a password verifier)."""
        code = getattr(exc, "sqlstate", None)
        return f"{type(exc).__name__} ({code})" if code is not None else generic_sanitize(exc)

    # -- target calls ------------------------------------------------------

    async def issue(self, req: IssueRequest) -> Issued:
        from psycopg import errors, sql

        self.validate_resource(req.resource)
        role = self._role(req.revoke_state)
        database = str(req.revoke_state["database"])
        schema = req.revoke_state.get("schema") or "public"
        if not IDENTIFIER.match(database) or not IDENTIFIER.match(schema):
            raise TargetError("The lease's revoke state names an invalid database or schema.", code="invalid_revoke_state")
        privileges = privileges_for(self.config, req.resource)
        expires_at = as_utc(req.expires_at)
        password = secrets.token_urlsafe(24)
        failure: TargetError | None = None
        try:
            async with self._connection(database, req.timeout_seconds) as conn:
                # SCRAM (every server's default since PostgreSQL 14) is hashed while the setting is
                # asked for, in a worker thread: PBKDF2 in hashlib releases the GIL, libpq's doesn't.
                iterations = int(conn.info.parameter_status("scram_iterations") or SCRAM_ITERATIONS)
                scram = asyncio.ensure_future(
                    run_sync(scram_verifier, password, iterations, timeout=req.timeout_seconds, pool="scram")
                )
                try:
                    (algorithm,) = await (await conn.execute("SHOW password_encryption")).fetchone()  # type: ignore[misc]
                    if algorithm == "scram-sha-256":
                        verifier = (await scram).encode()
                    else:  # md5, the only other: cheap, and libpq knows it
                        verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), algorithm.encode())
                finally:
                    scram.cancel()
                r, s = sql.Identifier(role), sql.Identifier(schema)
                # A GRANT the admin may not give is only a WARNING (01007): collect them and roll back.
                not_granted: list[str] = []

                def notice(diag: Any) -> None:
                    if diag.sqlstate == "01007":
                        not_granted.append(diag.sqlstate)

                statements = [
                    # Concurrent GRANTs on one database update the same catalog rows and fail with
                    # "tuple concurrently updated": issuances into one database take turns here.
                    sql.SQL("SELECT pg_advisory_xact_lock(hashtext('credgate:grant'))"),
                    sql.SQL(
                        "CREATE ROLE {} WITH LOGIN NOINHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE "
                        "NOREPLICATION NOBYPASSRLS PASSWORD {} VALID UNTIL {}"
                    ).format(r, sql.Literal(verifier.decode()), sql.Literal(expires_at.isoformat())),
                    sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), r),
                    sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, r),
                    sql.SQL("GRANT {} ON ALL TABLES IN SCHEMA {} TO {}").format(
                        sql.SQL(", ").join(sql.SQL(p) for p in privileges), s, r
                    ),
                ]
                if "INSERT" in privileges:
                    statements.append(sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA {} TO {}").format(s, r))
                conn.add_notice_handler(notice)
                try:
                    async with conn.transaction():
                        # One round trip (every value is quoted by psycopg.sql, no parameters): the lock
                        # is held for the server's work, not for this process's turns between statements.
                        await conn.execute(sql.SQL("; ").join(statements))
                        if not_granted:
                            raise _NotGranted
                finally:
                    conn.remove_notice_handler(notice)  # the connection goes back to the pool
        except _NotGranted:
            failure = ResourceRejected(
                f"The admin role may not grant every privilege {req.resource} needs (PostgreSQL warned "
                "01007 privilege_not_granted); nothing was created.",
                resource=req.resource,
                reason="not_grantable",
            )
        except TargetError as exc:
            if exc.code == "resource_not_found":  # the resource's database is not there (see _connect_error)
                exc = ResourceRejected(
                    f"Database {database} does not exist at the target; nothing was created.",
                    resource=req.resource,
                    reason="not_found",
                )
            failure = exc
        except errors.DuplicateObject as exc:
            failure = TargetError(
                f"Role {role} already exists at the target; a lease id is never reused ({PostgresConnector.sanitize(exc)}).",
                code="credential_exists",
            )
        except errors.InvalidSchemaName as exc:
            failure = ResourceRejected(
                f"Schema {schema} does not exist in database {database}; nothing was created "
                f"({PostgresConnector.sanitize(exc)}).",
                resource=req.resource,
                reason="not_found",
            )
        except Exception as exc:  # noqa: BLE001 - every vendor error becomes our own sentence
            failure = _translate(exc, "create the role")
        if failure is not None:
            raise failure  # raised outside the except block: no vendor exception in __context__

        host = ",".join(_hostport(h, p) for h, p in self._hosts())
        query = f"?sslmode={quote(self._sslmode)}" if self._sslmode else ""
        credential = {
            "username": role,
            "password": password,
            "host": self._host,
            "port": self._port,
            "dbname": database,
            "dsn": f"postgresql://{quote(role, safe='')}:{quote(password, safe='')}@{host}/{quote(database, safe='')}{query}",
        }
        return Issued(credential=credential, expires_at=expires_at)

    async def renew(self, revoke_state: Mapping[str, Any], expires_at: datetime) -> datetime:
        from psycopg import sql

        role = self._role(revoke_state)
        expires_at = as_utc(expires_at)
        failure: TargetError | None = None
        try:
            async with self._connection(None, DEFAULT_TIMEOUT) as conn:
                async with conn.transaction():
                    cur = await conn.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (role,))
                    row = await cur.fetchone()
                    if row is None or not row[0]:
                        failure = TargetError(
                            f"Role {role} no longer exists (or is being revoked) at the target.", code="credential_gone"
                        )
                    else:
                        await conn.execute(
                            sql.SQL("ALTER ROLE {} VALID UNTIL {}").format(
                                sql.Identifier(role), sql.Literal(expires_at.isoformat())
                            )
                        )
        except TargetError as exc:
            failure = exc
        except Exception as exc:  # noqa: BLE001
            failure = _translate(exc, "renew the role", gone_code="credential_gone")
        if failure is not None:
            raise failure
        return expires_at

    async def revoke(self, revoke_state: Mapping[str, Any]) -> None:
        role = self._role(revoke_state)
        database = revoke_state.get("database")
        failure: TargetError | None = None
        try:
            await self._revoke(role, database if isinstance(database, str) and IDENTIFIER.match(database) else None)
        except TargetError as exc:
            failure = exc
        except Exception as exc:  # noqa: BLE001
            failure = _translate(exc, "revoke the role")
        if failure is not None:
            raise failure

    async def verify(self) -> Verification:
        failure: str | None = None
        try:
            async with self._connection(None, DEFAULT_TIMEOUT) as conn:
                identity, version, can_create = await (  # type: ignore[misc]
                    await conn.execute(
                        "SELECT current_user, current_setting('server_version'), "
                        "(SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user)"
                    )
                ).fetchone()
                databases = await self._databases(conn)
                schemas = await self._schemas(conn)
        except TargetError as exc:
            failure = f"Could not verify the PostgreSQL connector: {exc.message}"
        except Exception as exc:  # noqa: BLE001
            failure = f"Could not verify the PostgreSQL connector ({PostgresConnector.sanitize(exc)})."
        if failure is not None:
            return Verification(ok=False, message=failure)
        reachable = {"database": databases, "schema": schemas}
        if not can_create:
            return Verification(
                ok=False,
                message=f"Connected to PostgreSQL {version} as {identity}, but that role lacks CREATEROLE.",
                identity=identity,
                reachable=reachable,
            )
        return Verification(
            ok=True, message=f"Connected to PostgreSQL {version} as {identity}.", identity=identity, reachable=reachable
        )

    async def list_resources(self, resource_type: str) -> list[str]:
        if resource_type not in self.resource_types:
            raise ResourceNotSupported(
                f"The postgres connector lists resource types {', '.join(self.resource_types)}, not {resource_type!r}."
            )
        failure: TargetError | None = None
        try:
            async with self._connection(None, DEFAULT_TIMEOUT) as conn:
                if resource_type == "database":
                    return await self._databases(conn)
                return await self._schemas(conn)
        except TargetError as exc:
            failure = exc
        except Exception as exc:  # noqa: BLE001
            failure = _translate(exc, "list resources")
        raise failure

    # -- plumbing ----------------------------------------------------------

    def _parse_dsn(self) -> dict[str, str]:
        try:
            from psycopg.conninfo import conninfo_to_dict
        except ImportError:
            raise ValueError("the postgres connector needs psycopg: pip install 'credgate[postgres]'") from None
        try:
            params = conninfo_to_dict(self._dsn.get_secret_value())
        except Exception:  # noqa: BLE001 - libpq's parse error quotes the DSN, which holds the password
            params = None
        if params is None:
            raise ValueError("its admin dsn is not a valid libpq URL or key=value connection string")
        return {k: str(v) for k, v in params.items() if v is not None}

    def _hosts(self) -> list[tuple[str, str]]:
        hosts = self._host.split(",")
        ports = self._port.split(",")
        if len(ports) != len(hosts):
            ports = [ports[0]] * len(hosts)
        return list(zip(hosts, ports))

    def _role(self, revoke_state: Mapping[str, Any]) -> str:
        role = revoke_state.get("role")
        if not isinstance(role, str) or not ROLE.match(role):
            raise TargetError(
                "The lease's revoke state does not name a role this connector creates.", code="invalid_revoke_state"
            )
        return role

    def _connection(self, dbname: str | None, timeout: float) -> AbstractAsyncContextManager[AsyncConnection[Any]]:
        """A pooled admin connection (to ``dbname``, or the DSN's own database) for one call of at
        most ``timeout`` seconds: statement and lock timeouts set, session state reset."""
        assert self.target_pool is not None
        return self.target_pool.connection(dbname, timeout)

    async def _databases(self, conn: AsyncConnection[Any]) -> list[str]:
        cur = await conn.execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate "
            "AND has_database_privilege(datname, 'CONNECT') ORDER BY datname"
        )
        return [name for (name,) in await cur.fetchall() if IDENTIFIER.match(name)]

    async def _schemas(self, conn: AsyncConnection[Any]) -> list[str]:
        cur = await conn.execute(
            "SELECT current_database(), nspname FROM pg_namespace "
            "WHERE nspname !~ '^pg_' AND nspname <> 'information_schema' "
            "AND has_schema_privilege(oid, 'USAGE') ORDER BY nspname"
        )
        return [f"{db}/{name}" for db, name in await cur.fetchall() if IDENTIFIER.match(db) and IDENTIFIER.match(name)]

    async def _revoke(self, role: str, database: str | None) -> None:
        if database is not None:
            try:
                async with self._connection(database, DEFAULT_TIMEOUT) as conn:
                    await self._revoke_on(conn, role, database)
                return
            except TargetError as exc:
                if exc.code != "resource_not_found":  # only _connect_error says so: the database is
                    raise  # gone, and its grants with it
        async with self._connection(None, DEFAULT_TIMEOUT) as conn:
            await self._revoke_on(conn, role, None)

    async def _revoke_on(self, conn: AsyncConnection[Any], role: str, database: str | None) -> None:
        for attempt in range(1, 5):
            try:
                await self._drop(conn, role, database)
                return
            except TargetError:
                raise  # ours (sessions that would not end): never waved through
            except Exception as exc:
                # Someone else dropped the role meanwhile (42704 undefined_object from
                # GRANT, ALTER or REASSIGN, XX000 "tuple concurrently deleted" from DROP):
                # gone is revoked. A role can't be dropped while it owns or holds
                # anything, so nothing of it is left.
                if await self._role_gone(conn, role):
                    return
                # Still there, but changed under us by someone revoking it too (XX000
                # "tuple concurrently updated", a deadlock): look again, a few times.
                if getattr(exc, "sqlstate", None) not in RACE_SQLSTATES or attempt == 4:
                    raise
            await asyncio.sleep(0.05 * attempt)

    @staticmethod
    async def _role_gone(conn: AsyncConnection[Any], role: str) -> bool:
        """True when ``role`` does not exist (False when it does, or the check itself fails)."""
        try:
            cur = await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
            return await cur.fetchone() is None
        except Exception:  # noqa: BLE001 - the connection is broken: the first failure is the one to report
            return False

    async def _drop(self, conn: AsyncConnection[Any], role: str, database: str | None) -> None:
        """End the role's sessions and drop it, in three round trips: look it up; NOLOGIN and
        signal its sessions; then, once they are gone, one transaction that takes the grant
        lock, reassigns and drops what it owns, signals any session that logged in before
        NOLOGIN was committed, and drops the role. The statements of a round trip go as one
        simple query (no parameters: the name is a checked identifier, quoted as a literal
        and as an identifier), which PostgreSQL runs as one implicit transaction: all of it
        or, on an error, none of it, the session left idle either way."""
        from psycopg import sql

        r = sql.Identifier(role)
        cur = await conn.execute(
            "SELECT pg_has_role(current_user, oid, 'USAGE') FROM pg_roles WHERE rolname = %s", (role,)
        )
        row = await cur.fetchone()
        if row is None:
            return  # already gone
        if not row[0]:
            # A non-superuser admin needs the role's privileges to end its sessions and drop what it owns.
            await conn.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(r))
        terminate = sql.SQL(_TERMINATE).format(sql.Literal(role))
        # Committed before the block below: no new logins from here (a login between the signal
        # and this commit is what the block's second signal is for).
        cur = await conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN; {}").format(r, terminate))
        cur.nextset()
        await self._wait_gone(conn, [pid for pid, _ in await cur.fetchall()])
        steps = [
            # Same catalog rows as the GRANTs of issue(): take turns with them (see issue()).
            sql.SQL("SELECT pg_advisory_xact_lock(hashtext('credgate:grant'))"),
            *(
                (sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(r), sql.SQL("DROP OWNED BY {}").format(r))
                if database is not None else ()
            ),
            terminate,  # anything that slipped in before NOLOGIN was committed
            sql.SQL("DROP ROLE IF EXISTS {}").format(r),
        ]
        cur = await conn.execute(sql.SQL("; ").join(steps))
        for _ in range(len(steps) - 2):
            cur.nextset()
        await self._wait_gone(conn, [pid for pid, _ in await cur.fetchall()])

    @staticmethod
    async def _wait_gone(conn: AsyncConnection[Any], pids: list[int], timeout: float = 5.0) -> None:
        """Wait until the signalled sessions have exited (outside a transaction: the
        activity view is a per-transaction snapshot). ``pg_terminate_backend(pid, timeout)``
        would do it one pid at a time, polling each every 100 ms."""
        deadline = asyncio.get_running_loop().time() + timeout
        while pids:
            cur = await conn.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,))
            pids = [pid for (pid,) in await cur.fetchall()]
            if not pids:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise TargetError(
                    f"{len(pids)} session(s) of the role did not end within {timeout:g} s of being terminated.",
                    code="sessions_still_open",
                )
            await asyncio.sleep(0.02)


# Signal every session of a role (the placeholder: its name as a literal) to end; their pids.
_TERMINATE = "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = {} AND pid <> pg_backend_pid()"

# Run on every admin connection a call takes from the pool, in one round trip: whatever an
# earlier call left in the session (a role, a search_path, settings) goes back to the
# connection's own defaults (its DSN's options included), then this call's deadlines.
_PREPARE = "SET SESSION AUTHORIZATION DEFAULT; RESET ALL; SET statement_timeout = {ms}; SET lock_timeout = {ms}"


def _admin_pool(dsn: SecretStr, connect_timeout: int, limits: PoolLimits) -> TargetPool[AsyncConnection[Any]]:
    """The connector's pool of admin connections, keyed by database name (None: the DSN's own).
    The callables hold what they need, not the connector (no reference cycle)."""

    async def open_(dbname: str | None, timeout: float) -> AsyncConnection[Any]:
        import psycopg

        failure: TargetError | None = None
        try:
            return await psycopg.AsyncConnection.connect(
                dsn.get_secret_value(),
                dbname=dbname,
                connect_timeout=connect_timeout,
                application_name="credgate",
                autocommit=True,
                prepare_threshold=None,  # nothing prepared server-side: a reset session holds nothing stale
            )
        except Exception as exc:  # noqa: BLE001
            failure = _connect_error(exc, dbname)
        raise failure

    async def prepare(conn: AsyncConnection[Any], timeout: float) -> None:
        ms = max(1000, int(timeout * 1000))
        await conn.execute(_PREPARE.format(ms=ms))

    def reusable(conn: AsyncConnection[Any]) -> bool:
        from psycopg.pq import TransactionStatus

        return not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE

    async def close(conn: AsyncConnection[Any]) -> None:
        await conn.close()

    return TargetPool("PostgreSQL", open=open_, prepare=prepare, reusable=reusable, close=close, limits=limits)


class _NotGranted(Exception):
    """A GRANT came back with WARNING 01007: roll the issuing transaction back."""


def _connect_error(exc: BaseException, dbname: str | None) -> TargetError:
    """Classify a failed connection. The vendor message is read, never repeated."""
    safe = PostgresConnector.sanitize(exc)
    text = str(exc)
    if "password authentication failed" in text or "no password supplied" in text:
        return TargetError(f"PostgreSQL rejected the admin credentials ({safe}).", code="target_auth_failed")
    if "permission denied" in text:
        return TargetError(
            f"PostgreSQL refused the admin role's connection: it lacks a privilege ({safe}).",
            code="target_permission_denied",
        )
    if dbname is not None and "does not exist" in text and "database" in text:
        return TargetError(f"Database {dbname} does not exist at the target ({safe}).", code="resource_not_found")
    if getattr(exc, "sqlstate", None) == "53300" or "too many" in text or "connection slots are reserved" in text:
        # 53300 too_many_connections: "sorry, too many clients already", "too many connections for
        # role/database", "remaining connection slots are reserved": the server is full, not down.
        return TargetUnreachable(
            f"PostgreSQL refused the admin connection: its connection limit is reached ({safe}).",
            code="target_too_many_connections",
        )
    if "timeout expired" in text:
        return TargetUnreachable(f"PostgreSQL did not answer in time ({safe}).", code="target_timeout")
    return TargetUnreachable(f"Could not connect to PostgreSQL ({safe}).")


def _translate(exc: BaseException, doing: str, gone_code: str | None = None) -> TargetError:
    """A vendor error after connecting, as our own sentence with its class and SQLSTATE."""
    from psycopg import errors

    safe = PostgresConnector.sanitize(exc)
    if isinstance(exc, errors.InsufficientPrivilege):
        return TargetError(
            f"PostgreSQL refused to {doing}: the admin role lacks a privilege ({safe}).", code="target_permission_denied"
        )
    if isinstance(exc, errors.UndefinedObject) and gone_code:
        return TargetError(f"PostgreSQL could not {doing}: the role is gone ({safe}).", code=gone_code)
    if isinstance(exc, errors.QueryCanceled | errors.LockNotAvailable):
        return TargetError(f"PostgreSQL did not {doing} in time ({safe}).", code="target_timeout")
    if isinstance(exc, errors.OperationalError):
        return TargetUnreachable(f"The PostgreSQL connection failed while trying to {doing} ({safe}).")
    return TargetError(f"PostgreSQL failed to {doing} ({safe}).")
