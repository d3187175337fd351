"""Ready, self-refreshing client objects for the vendor SDKs a pipeline already uses.

They are methods of the sync :class:`~gateway.client.Client` (this module's
:class:`ClientHelpers` is one of its bases), so they sit next to ``credentials()``::

    cg.boto3_session(connector, resource)      boto3.Session on botocore RefreshableCredentials
    cg.psycopg_conninfo(connector, resource)   a libpq conninfo string (the current login)
    cg.sqlalchemy_url(connector, resource)     a sqlalchemy URL (the current login)
    cg.sqlalchemy_engine(connector, resource)  an Engine whose every new connection logs in afresh
    install_sqlalchemy_refresh(engine, cg, connector, resource)   the same hook on your own engine
    cg.redis_client(connector, resource)       redis.Redis with a credential provider
    cg.pymysql_connect(connector, resource)    a new pymysql connection (the current login)

Every helper asks ``client.credentials(connector, resource, ttl)`` whenever the vendor
library needs a login, so it gets the client's cached credential, which the client renews
or re-issues in the background (a dynamic database user changes its name too). Nothing here
holds a credential of its own or logs one; the objects' ``repr()`` names no secret.

The vendor SDKs are the caller's own, optional packages: each is imported only when its
helper runs (a missing one is an ImportError that says what to install). This module is the
one place in gateway.client that reaches boto3/botocore, psycopg, sqlalchemy, redis and
pymysql: pyproject's import-linter contracts ("client-light", "vendor-sdks-in-their-plugin")
name exactly these imports in their ``ignore_imports``, and forbid every other.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from gateway.client.credentials import AWSCredential, Credential, MySQLCredential, PostgresCredential, RedisCredential

__all__ = ["ClientHelpers", "install_sqlalchemy_refresh"]

_DIST = {"boto3": "boto3", "botocore": "boto3", "sqlalchemy": "sqlalchemy", "redis": "redis", "pymysql": "pymysql",
         "psycopg": "psycopg"}
_DRIVERS = {"postgres": "postgresql+psycopg", "mysql": "mysql+pymysql"}


@contextlib.contextmanager
def _needs(top: str) -> Iterator[None]:
    """Around a helper's import of one of the caller's optional SDKs: a missing one is an
    ImportError that says what to install."""
    try:
        yield
    except ImportError:
        raise ImportError(f"This credgate helper needs {top}: pip install {_DIST.get(top, top)}") from None


def _typed(cred: Credential, kinds: tuple[type[Credential], ...], helper: str) -> Any:
    if not isinstance(cred, kinds):
        wanted = " or ".join(k.connector_type or k.__name__ for k in kinds)
        raise TypeError(f"{helper}() needs a {wanted} connector; {cred.connector} issued a "
                        f"{cred.type or 'untyped'} credential (lease {cred.lease_id}).")
    return cred


def _no_login(kwargs: dict[str, Any], names: tuple[str, ...], helper: str) -> None:
    given = sorted(set(kwargs) & set(names))
    if given:
        raise TypeError(f"{helper}() sets the login itself; don't pass {', '.join(given)}")


def _libpq_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _dsn_query(cred: Credential) -> dict[str, str]:
    dsn = cred.get("dsn")
    return dict(parse_qsl(urlsplit(dsn).query)) if dsn else {}


def _url_without_login(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


# --- boto3 ---------------------------------------------------------------------


def _aws_metadata(cred: AWSCredential) -> dict[str, str | None]:
    return {"access_key": cred.access_key_id, "secret_key": cred.secret_access_key, "token": cred.session_token,
            "expiry_time": cred.expires_at.isoformat()}


@functools.cache
def _boto3_classes() -> tuple[type, type]:
    with _needs("boto3"):
        import boto3
        import botocore.credentials as botocore_credentials

    class CredgateSession(boto3.Session):
        """A boto3 Session whose ``client()``/``resource()`` default ``endpoint_url`` to the
        connector's (an S3-compatible store, a VPC endpoint, a local stand-in)."""

        endpoint_url: str | None = None

        def client(self, *args: Any, **kwargs: Any) -> Any:
            if self.endpoint_url and len(args) < 6:  # endpoint_url is client()'s sixth argument
                kwargs.setdefault("endpoint_url", self.endpoint_url)
            return super().client(*args, **kwargs)

        def resource(self, *args: Any, **kwargs: Any) -> Any:
            if self.endpoint_url and len(args) < 6:
                kwargs.setdefault("endpoint_url", self.endpoint_url)
            return super().resource(*args, **kwargs)

    class CredgateProvider(botocore_credentials.CredentialProvider):
        METHOD = CANONICAL_NAME = "credgate"

        def __init__(self, credentials: Any) -> None:
            super().__init__()
            self._credentials = credentials

        def load(self) -> Any:
            return self._credentials

    return CredgateSession, CredgateProvider


# --- redis ---------------------------------------------------------------------


@functools.cache
def _redis_provider_class() -> type:
    with _needs("redis"):
        import redis.credentials as redis_credentials

    class CredgateRedisCredentials(redis_credentials.CredentialProvider):
        """redis-py asks it for ``(username, password)`` on each new connection."""

        def __init__(self, client: Any, connector: str, resource: str, ttl: int | None) -> None:
            self._client, self.connector, self.resource, self.ttl = client, connector, resource, ttl

        def get_credentials(self) -> tuple[str, str]:
            cred = _typed(self._client.credentials(self.connector, self.resource, self.ttl), (RedisCredential,),
                          "redis_client")
            return cred.username or "default", cred.password or ""

        async def get_credentials_async(self) -> tuple[str, str]:
            return self.get_credentials()

        def __repr__(self) -> str:
            return f"<credgate credentials {self.connector}/{self.resource}>"

    return CredgateRedisCredentials


# --- SQLAlchemy ----------------------------------------------------------------


def install_sqlalchemy_refresh(engine: Any, client: Any, connector: str, resource: str,
                               ttl: int | None = None) -> Any:
    """Make every new connection of ``engine`` log in with the client's current credential
    for ``connector``/``resource``: a ``do_connect`` listener sets ``user`` and ``password``
    in the driver's connect arguments (psycopg, psycopg2, pymysql, asyncpg all take those).

    Connections already in the pool keep the login they opened with; the gateway ends them
    when their lease is revoked (at its expiry, by the reaper), and ``pool_pre_ping=True``
    replaces a dead one with a new, freshly logged-in connection. An ``AsyncEngine`` is
    accepted (its ``sync_engine`` gets the listener). Returns ``engine``.
    """
    with _needs("sqlalchemy"):
        import sqlalchemy.event as event

    def do_connect(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        cred = _typed(client.credentials(connector, resource, ttl), (PostgresCredential, MySQLCredential),
                      "install_sqlalchemy_refresh")
        cparams["user"] = cred.username
        cparams["password"] = cred.password

    event.listen(getattr(engine, "sync_engine", engine), "do_connect", do_connect)
    return engine


# --- the methods ---------------------------------------------------------------


class ClientHelpers:
    """Vendor-SDK helpers of the sync :class:`~gateway.client.Client` (see the module docstring)."""

    credentials: Any  # the Client's own credentials(connector, resource, ttl)

    def _margin(self) -> float:
        core = getattr(self, "_core", None)
        return float(getattr(core, "margin", 30.0))

    def boto3_session(self, connector: str, resource: str, ttl: int | None = None,
                      region_name: str | None = None) -> Any:
        """A ``boto3.Session`` whose credentials are botocore ``RefreshableCredentials``.

        botocore asks the client for the credential again once less than a third of its
        lifetime (at least the client's margin + 1 s) is left, and must have a new one within
        the margin; the client serves its background-refreshed credential, so a long-lived
        session (and every client/resource made from it) keeps working across leases.
        ``region_name`` defaults to the connector's region. If the connector has an
        ``endpoint_url``, the session's ``client()`` and ``resource()`` use it unless given
        another (it is also ``session.endpoint_url``).
        """
        session_class, provider_class = _boto3_classes()
        with _needs("botocore"):
            import botocore.credentials as botocore_credentials
            import botocore.session as botocore_session

        def fetch() -> dict[str, str | None]:
            return _aws_metadata(_typed(self.credentials(connector, resource, ttl), (AWSCredential,), "boto3_session"))

        first = _typed(self.credentials(connector, resource, ttl), (AWSCredential,), "boto3_session")
        margin = self._margin()
        refreshable = botocore_credentials.RefreshableCredentials.create_from_metadata(
            metadata=_aws_metadata(first), refresh_using=fetch, method="credgate",
            advisory_timeout=max(margin + 1.0, first.lifetime / 3), mandatory_timeout=margin,
        )
        core = botocore_session.get_session()
        # only credgate: no environment variable, profile or instance metadata is consulted
        core.register_component("credential_provider",
                                botocore_credentials.CredentialResolver([provider_class(refreshable)]))
        session = session_class(botocore_session=core, region_name=region_name or first.region)
        session.endpoint_url = first.get("endpoint_url")
        return session

    def psycopg_conninfo(self, connector: str, resource: str, ttl: int | None = None, **params: Any) -> str:
        """A libpq conninfo string (``host=... port=... dbname=... user=... password=...`` and
        the connector's ``sslmode``) with the current credential; ``params`` add or override
        keywords (``connect_timeout=5``, ``application_name=...``). The string holds the
        password: build it for each new connection (the cache makes that cheap) rather than
        keeping it, since the user and password change when the lease is re-issued."""
        cred = _typed(self.credentials(connector, resource, ttl), (PostgresCredential,), "psycopg_conninfo")
        values: dict[str, Any] = {"host": cred.host, "port": cred.port, "dbname": cred.database,
                                  "user": cred.username, "password": cred.password}
        values.update(_dsn_query(cred))
        values.update(params)
        return " ".join(f"{key}={_libpq_quote(str(value))}" for key, value in values.items() if value is not None)

    def sqlalchemy_url(self, connector: str, resource: str, ttl: int | None = None,
                       drivername: str | None = None) -> Any:
        """A ``sqlalchemy.engine.URL`` with the current credential (``postgresql+psycopg`` for a
        postgres connector, ``mysql+pymysql`` for mysql, unless ``drivername``). Its ``str()``
        and ``repr()`` mask the password. For an engine that outlives the credential, use
        :meth:`sqlalchemy_engine` (or :func:`install_sqlalchemy_refresh`)."""
        cred = _typed(self.credentials(connector, resource, ttl), (PostgresCredential, MySQLCredential),
                      "sqlalchemy_url")
        return self._sqlalchemy_url(cred, drivername, login=True)

    def _sqlalchemy_url(self, cred: Any, drivername: str | None, *, login: bool) -> Any:
        with _needs("sqlalchemy"):
            from sqlalchemy.engine import URL as url
        return url.create(drivername or _DRIVERS[cred.connector_type], host=cred.host, port=cred.port,
                          database=cred.database, username=cred.username if login else None,
                          password=cred.password if login else None, query=_dsn_query(cred))

    def sqlalchemy_engine(self, connector: str, resource: str, ttl: int | None = None,
                          drivername: str | None = None, **engine_kwargs: Any) -> Any:
        """``sqlalchemy.create_engine(...)`` for the connector's database, with
        :func:`install_sqlalchemy_refresh`: its URL holds no login; each new connection logs
        in with the client's current credential. ``pool_pre_ping`` defaults to True, so a
        pooled connection the gateway ended (its lease revoked) is replaced transparently;
        ``engine_kwargs`` go to ``create_engine`` (``pool_recycle=``, ``pool_size=``...)."""
        with _needs("sqlalchemy"):
            import sqlalchemy
        cred = _typed(self.credentials(connector, resource, ttl), (PostgresCredential, MySQLCredential),
                      "sqlalchemy_engine")
        engine_kwargs.setdefault("pool_pre_ping", True)
        engine = sqlalchemy.create_engine(self._sqlalchemy_url(cred, drivername, login=False), **engine_kwargs)
        return install_sqlalchemy_refresh(engine, self, connector, resource, ttl)

    def redis_client(self, connector: str, resource: str, ttl: int | None = None, **kwargs: Any) -> Any:
        """A ``redis.Redis`` for the connector's server whose ``credential_provider`` hands each
        new connection the client's current user and password (``AUTH user password``).

        A connection already open stays logged in as the user it opened with until that
        user's lease is revoked (at its expiry, or by an admin): the gateway then deletes the
        ACL user, which closes its connections, and redis-py's retry on a connection error
        reconnects, logging in with the current credential. ``kwargs`` go to
        ``redis.Redis.from_url`` (``decode_responses=True``, ``socket_timeout=``...)."""
        with _needs("redis"):
            import redis
        _no_login(kwargs, ("username", "password", "credential_provider"), "redis_client")
        cred = _typed(self.credentials(connector, resource, ttl), (RedisCredential,), "redis_client")
        if cred.url:
            url = _url_without_login(cred.url)
        else:
            url = f"redis://{cred.host}:{cred.port or 6379}"
        return redis.Redis.from_url(url, credential_provider=_redis_provider_class()(self, connector, resource, ttl),
                                    **kwargs)

    def pymysql_connect(self, connector: str, resource: str, ttl: int | None = None, **kwargs: Any) -> Any:
        """A new ``pymysql`` connection logged in with the current credential (host, port,
        user, password, database from the credential; ``kwargs`` add the rest:
        ``autocommit=True``, ``ssl=...``). Call it for each connection you open: a connection
        keeps its login, the next call gets the re-issued one."""
        with _needs("pymysql"):
            import pymysql
        _no_login(kwargs, ("user", "password", "passwd"), "pymysql_connect")
        cred = _typed(self.credentials(connector, resource, ttl), (MySQLCredential,), "pymysql_connect")
        params: dict[str, Any] = {"host": cred.host, "port": cred.port or 3306, "user": cred.username,
                                  "password": cred.password, "database": cred.database}
        params.update(kwargs)
        return pymysql.connect(**params)
