"""A ZenML service connector type ``credgate``: ZenML asks it for a client, it asks credgate.

The connector holds only a credgate identity, never the target's credentials:

- ``client-credentials``: a credgate OAuth2 client (``client_id`` + ``client_secret``), the
  long-lived identity of the ZenML server, kept by ZenML as a ZenML secret (in credgate too,
  when the server's secrets store is :mod:`credgate_zenml.secrets_store`);
- ``token``: a credgate admin key or gateway access token (the same role, for a quick start);
- ``run-token``: a short-lived credgate run token (``POST /v1/runs/{run_id}/token``), bound to
  one pipeline run and to one credgate connector/resource. Users don't configure it: it is
  what the two methods above hand a client.

When ZenML asks for a connector client (``get_connector_client``: the ZenML server's
``/service_connectors/{id}/client``, or the local store in the client's process), a
``client-credentials``/``token`` connector mints a credgate run token for the pipeline run
(the run of the ZenML API token that asked, on a server; the step's run, in a step; else a
fresh ``zenml-adhoc-...`` run), scoped to the one credgate connector and resource asked for,
and hands back a ``run-token`` connector: the client never sees the client secret. The
client's ``connect()`` then issues a credential with the run token (one lease per call, with
credgate's ``ttl_seconds``) and returns what ZenML's own consumers expect:

=====================  ===========================  =============================================
ZenML resource type     credgate resource            ``connect()`` returns
=====================  ===========================  =============================================
``aws-generic``         ``aws-generic`` (or config)  ``boto3.Session`` (refreshing credentials)
``s3-bucket``           ``s3-bucket:NAME``            boto3 S3 client, ``client.credentials`` set
                                                     (as ZenML's AWS connector does)
``postgres-database``   the database resource         ``psycopg.Connection`` (psycopg 3)
=====================  ===========================  =============================================

Revoking the run in credgate (``POST /v1/runs/{run_id}/revoke``) makes the run token refused
(401 ``run_revoked``): the next ``connect()``/``verify()`` of the client fails with ZenML's
``AuthorizationException``, and the run's leases are revoked.

Registration: importing this module registers the type with ZenML's
``service_connector_registry`` (ZenML's connector metaclass does it on class creation). ZenML
imports only its built-in connectors itself, but it loads every ``zenml.init_hooks`` entry
point at ``import zenml``: ``credgate_zenml:zenml_init_hook`` imports this module
(docs/zenml.md).
"""

from __future__ import annotations

import re
import ssl
import sys
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar, Dict, List, Optional, Tuple

from pydantic import Field
from zenml.exceptions import AuthorizationException
from zenml.logger import get_logger
from zenml.models import AuthenticationMethodModel, ResourceTypeModel, ServiceConnectorTypeModel
from zenml.service_connectors.service_connector import AuthenticationConfig, ServiceConnector
from zenml.utils.secret_utils import PlainSerializedSecretStr

from gateway.client.errors import CredgateError, RequestFailed
from gateway.client.urls import seg

logger = get_logger(__name__)

__all__ = [
    "CONNECTOR_TYPE", "CredgateClientCredentialsConfig", "CredgateConnectorConfig", "CredgateRunTokenConfig",
    "CredgateServiceConnector", "CredgateTokenConfig",
]

CONNECTOR_TYPE = "credgate"
CLIENT_CREDENTIALS, TOKEN, RUN_TOKEN = "client-credentials", "token", "run-token"
AWS_GENERIC, S3_BUCKET, POSTGRES = "aws-generic", "s3-bucket", "postgres-database"
_BUCKET = r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]"
_RUN_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


# --- configuration --------------------------------------------------------------


class CredgateConnectorConfig(AuthenticationConfig):
    """Where credgate is and what to ask it for (every auth method)."""

    addr: str = Field(title="credgate gateway address (http(s)://host:port)")
    connector: str = Field(title="credgate connector name (e.g. an aws or postgres connector)")
    resource: Optional[str] = Field(
        default=None,
        title="credgate resource (e.g. s3-bucket:NAME, aws-generic, a database); by default "
        "derived from the ZenML resource",
    )
    ttl_seconds: Optional[int] = Field(default=None, ge=1, title="TTL asked for each credential")
    ca_file: Optional[str] = Field(default=None, title="CA bundle to verify the gateway's TLS with")
    timeout: float = Field(default=30.0, title="seconds per request to credgate")


class CredgateClientCredentialsConfig(CredgateConnectorConfig):
    """A credgate OAuth2 client (exchanged at /v1/auth/token)."""

    client_id: str = Field(title="credgate OAuth2 client id")
    client_secret: PlainSerializedSecretStr = Field(title="credgate OAuth2 client secret")


class CredgateTokenConfig(CredgateConnectorConfig):
    """A credgate admin key or gateway access token."""

    token: PlainSerializedSecretStr = Field(title="credgate token")


class CredgateRunTokenConfig(CredgateConnectorConfig):
    """A credgate run token for one pipeline run."""

    run_id: str = Field(title="credgate run id")
    run_token: PlainSerializedSecretStr = Field(title="credgate run token")


_CLIENT_DESCRIPTION = """
The connector authenticates to credgate as {what}. It is the long-lived identity: keep it on
the ZenML server. When a client (a pipeline step, the CLI) asks for a connector client, the
connector mints a credgate run token for the pipeline run, scoped to this credgate connector
and the one resource asked for, and hands the client a `run-token` connector instead: the
client never receives this identity. The expiration (seconds) is the run token's lifetime.
"""

_TYPE_SPEC = ServiceConnectorTypeModel(
    name="credgate",
    connector_type=CONNECTOR_TYPE,
    description="""
Short-lived credentials from a credgate gateway. The connector holds only a credgate identity
(an OAuth2 client, or a run token for one pipeline run); every `connect()` asks credgate for a
new credential with a lease (AWS STS keys, a PostgreSQL role...) and returns what ZenML's own
AWS consumers (and psycopg, for PostgreSQL) expect. Revoking a lease or a run in credgate ends
that access.
""",
    supports_auto_configuration=False,
    emoji=":key:",
    auth_methods=[
        AuthenticationMethodModel(
            name="credgate OAuth2 client credentials",
            auth_method=CLIENT_CREDENTIALS,
            description=_CLIENT_DESCRIPTION.format(what="an OAuth2 client (client id and secret)"),
            min_expiration_seconds=60,
            max_expiration_seconds=86400,
            default_expiration_seconds=3600,
            config_class=CredgateClientCredentialsConfig,
        ),
        AuthenticationMethodModel(
            name="credgate token",
            auth_method=TOKEN,
            description=_CLIENT_DESCRIPTION.format(what="an admin key or a gateway access token"),
            min_expiration_seconds=60,
            max_expiration_seconds=86400,
            default_expiration_seconds=3600,
            config_class=CredgateTokenConfig,
        ),
        AuthenticationMethodModel(
            name="credgate run token",
            auth_method=RUN_TOKEN,
            description="""
A credgate run token, bound to one pipeline run and one credgate connector/resource. This is
what a `client-credentials` or `token` connector hands a client; revoking the run in credgate
ends it.
""",
            config_class=CredgateRunTokenConfig,
        ),
    ],
    resource_types=[
        ResourceTypeModel(
            name="Generic AWS resource (credgate)",
            resource_type=AWS_GENERIC,
            description="""
A boto3 session with temporary credentials issued by a credgate `aws` connector (resource
`aws-generic` unless configured otherwise). The session refreshes its credentials from
credgate before they expire. The resource name is the credgate resource.
""",
            auth_methods=[CLIENT_CREDENTIALS, TOKEN, RUN_TOKEN],
            supports_instances=False,
            emoji=":large_orange_diamond:",
        ),
        ResourceTypeModel(
            name="AWS S3 bucket (credgate)",
            resource_type=S3_BUCKET,
            description="""
A boto3 S3 client with temporary credentials for one bucket, issued by a credgate `aws`
connector (credgate resource `s3-bucket:NAME`); as with ZenML's AWS connector, the client's
`credentials` attribute holds them (the S3 artifact store reads it). Resource names:
`s3://NAME` (canonical), `arn:aws:s3:::NAME`, `NAME` or `s3-bucket:NAME`.
""",
            auth_methods=[CLIENT_CREDENTIALS, TOKEN, RUN_TOKEN],
            supports_instances=True,
            emoji=":package:",
        ),
        ResourceTypeModel(
            name="PostgreSQL database (credgate)",
            resource_type=POSTGRES,
            description="""
A psycopg (3) connection as a role created for this lease by a credgate `postgres` connector.
The resource name is the credgate resource (a database the connector serves). For
SQLAlchemy: `create_engine("postgresql+psycopg://", creator=connector.connect)`, so each
pooled connection gets its own short-lived role. `connect(dsn=True)` returns the libpq URL
instead. No ZenML stack component consumes this type: it is for your steps.
""",
            auth_methods=[CLIENT_CREDENTIALS, TOKEN, RUN_TOKEN],
            supports_instances=True,
            emoji=":elephant:",
        ),
    ],
)


# --- the connector --------------------------------------------------------------


def _current_run_id() -> Optional[str]:
    """The ZenML pipeline run this request is for, if any."""
    # On a ZenML server: the API token of a pipeline run carries its id.
    server_utils = sys.modules.get("zenml.zen_server.utils")
    if server_utils is not None:
        try:
            ctx = server_utils.get_auth_context()
            token = ctx.access_token if ctx is not None else None
            if token is not None and token.pipeline_run_id:
                return str(token.pipeline_run_id)
        except Exception:  # noqa: BLE001 - not within a request
            pass
    # In a step's own process (a local store).
    try:
        from zenml.steps import get_step_context

        return str(get_step_context().pipeline_run.id)
    except Exception:  # noqa: BLE001 - not within a step
        return None


class CredgateServiceConnector(ServiceConnector):
    """ZenML service connector type ``credgate`` (see the module's docstring)."""

    config: CredgateConnectorConfig

    _RUN_ID_PREFIX: ClassVar[str] = "zenml-"
    _auth: Optional[Any] = None  # the identity, kept across calls (an exchanged token is reused)

    @classmethod
    def _get_connector_type(cls) -> ServiceConnectorTypeModel:
        return _TYPE_SPEC

    # --- credgate calls -----------------------------------------------------------

    def _sdk(self) -> Any:
        """A gateway.client.Client authenticated as this connector (no background refresh,
        no revoke on close: each credential's lease runs its TTL unless revoked in credgate)."""
        from gateway.client.auth import ClientCredentials, StaticToken
        from gateway.client.sdk import Client

        cfg = self.config
        if self._auth is None:
            if isinstance(cfg, CredgateClientCredentialsConfig):
                self._auth = ClientCredentials(cfg.client_id, cfg.client_secret.get_secret_value())
            elif isinstance(cfg, CredgateRunTokenConfig):
                self._auth = StaticToken(cfg.run_token.get_secret_value())
            elif isinstance(cfg, CredgateTokenConfig):
                self._auth = StaticToken(cfg.token.get_secret_value())
            else:
                raise ValueError(f"the credgate connector has no identity for auth method {self.auth_method!r}")
        verify: Any = ssl.create_default_context(cafile=cfg.ca_file) if cfg.ca_file else True
        return Client(cfg.addr, auth=self._auth, refresh=False, revoke_on_close=False, retries=2,
                      timeout=cfg.timeout, verify=verify, margin=0.0)

    def _call(self, what: str, fn: Any) -> Any:
        """Run ``fn(client)``; credgate's refusals become ZenML's AuthorizationException,
        naming credgate's code and message (never a secret)."""
        client = self._sdk()
        try:
            return fn(client)
        except RequestFailed as exc:
            raise AuthorizationException(
                f"credgate refused to {what} ({exc.status} {exc.code}: {exc.message})") from None
        except CredgateError as exc:
            raise AuthorizationException(f"credgate: can't {what} ({exc.code}: {exc.message})") from None
        finally:
            client.close()

    def _credgate_resource(self, resource_type: Optional[str], resource_id: Optional[str]) -> str:
        """The credgate resource for a ZenML resource type and (canonical) id."""
        if resource_type == S3_BUCKET and resource_id:
            return "s3-bucket:" + self._bucket(resource_id)
        if resource_type == AWS_GENERIC:
            return self.config.resource or "aws-generic"
        if resource_id:
            return resource_id
        if self.config.resource:
            return self.config.resource
        raise ValueError(f"name a {resource_type or 'credgate'} resource")

    @staticmethod
    def _bucket(resource_id: str) -> str:
        for pattern in (rf"^s3://({_BUCKET})(/.*)?$", rf"^arn:aws:s3:::({_BUCKET})(/.*)?$",
                        rf"^s3-bucket:({_BUCKET})$", rf"^({_BUCKET})$"):
            m = re.match(pattern, resource_id)
            if m:
                return m.group(1)
        raise ValueError(f"not an S3 bucket: {resource_id!r} (s3://NAME, arn:aws:s3:::NAME, NAME or s3-bucket:NAME)")

    def issue(self) -> Any:
        """A new credential (a new lease) for this connector client's resource: a
        ``gateway.client.Credential``."""
        resource = self._credgate_resource(self.resource_type, self.resource_id)
        cfg = self.config
        return self._call(f"issue a credential for {cfg.connector}/{resource}",
                          lambda c: c.credentials(cfg.connector, resource, ttl=cfg.ttl_seconds))

    # --- ZenML's connector interface -------------------------------------------------

    def _canonical_resource_id(self, resource_type: str, resource_id: str) -> str:
        if resource_type == S3_BUCKET:
            return "s3://" + self._bucket(resource_id)
        return resource_id

    def _get_default_resource_id(self, resource_type: str) -> str:
        if resource_type == AWS_GENERIC:
            return self.config.resource or "aws-generic"
        return super()._get_default_resource_id(resource_type)

    def _verify(self, resource_type: Optional[str] = None, resource_id: Optional[str] = None) -> List[str]:
        """Authenticate to credgate (``GET /v1/auth/whoami``: a revoked run, client or token
        is refused here) and list the resource(s) this connector is configured for."""
        who = self._call("authenticate", lambda c: c.request("GET", "/v1/auth/whoami"))
        if isinstance(self.config, CredgateRunTokenConfig) and who.get("run_id") != self.config.run_id:
            raise AuthorizationException("the credgate run token is bound to another run")
        if not resource_type:
            return []
        if resource_id:
            return [resource_id]
        if resource_type == AWS_GENERIC:
            return [self._get_default_resource_id(resource_type)]
        if self.config.resource:
            return [self._canonical_resource_id(resource_type, self.config.resource)]
        return self._listed(resource_type)

    def _listed(self, resource_type: str) -> List[str]:
        """The literal resources of the credgate connector for this type, if this identity
        may read the connector (``connectors:read``); else none (ZenML then asks for a name)."""
        name = self.config.connector
        try:
            out = self._call(f"show connector {name}", lambda c: c.request("GET", f"/v1/connectors/{seg(name)}"))
        except AuthorizationException:
            return []
        ids = []
        for pattern in out.get("resources") or []:
            if not isinstance(pattern, str) or "*" in pattern:
                continue
            if resource_type == S3_BUCKET and pattern.startswith("s3-bucket:"):
                ids.append("s3://" + pattern[len("s3-bucket:"):])
            elif resource_type == POSTGRES and pattern != "aws-generic" and not pattern.startswith("s3-bucket:"):
                ids.append(pattern)
        return ids

    def _get_connector_client(self, resource_type: str, resource_id: str) -> "ServiceConnector":
        """A ``run-token`` connector for the pipeline run asking: this connector's identity
        mints a credgate run token scoped to the one connector and resource."""
        if self.auth_method == RUN_TOKEN:
            return super()._get_connector_client(resource_type, resource_id)
        cfg = self.config
        resource = self._credgate_resource(resource_type, resource_id)
        zenml_run = _current_run_id()
        run_id = self._RUN_ID_PREFIX + (zenml_run or "adhoc-" + uuid.uuid4().hex)
        if not _RUN_ID.match(run_id):
            raise ValueError(f"not a credgate run id: {run_id!r}")
        ttl = self.expiration_seconds or 3600
        out = self._call(
            f"mint a run token for run {run_id} ({cfg.connector}/{resource})",
            lambda c: c.request("POST", f"/v1/runs/{seg(run_id)}/token",
                                json={"connectors": [cfg.connector], "resources": [resource], "ttl_seconds": ttl}),
        )
        expires_at = datetime.now(timezone.utc) + timedelta(seconds=int(out["expires_in"]))
        logger.debug("credgate: run token for run %s (%s/%s), %ss", run_id, cfg.connector, resource, out["expires_in"])
        client_config = CredgateRunTokenConfig(
            addr=cfg.addr, connector=cfg.connector, resource=resource, ttl_seconds=cfg.ttl_seconds,
            ca_file=cfg.ca_file, timeout=cfg.timeout, run_id=run_id, run_token=out["token"],
        )
        name = f"{self.name or 'credgate'} ({resource_type} | {resource_id} client)"
        return CredgateServiceConnector(
            id=self.id, name=name, auth_method=RUN_TOKEN, resource_type=resource_type, resource_id=resource_id,
            config=client_config, expires_at=expires_at.replace(tzinfo=None),
        )

    def _connect_to_resource(self, **kwargs: Any) -> Any:
        """A new credential from credgate, as ZenML's consumers take it (module docstring)."""
        assert self.resource_type is not None and self.resource_id is not None
        if self.resource_type in (AWS_GENERIC, S3_BUCKET):
            session, region, endpoint_url = self._boto3_session()
            if self.resource_type == AWS_GENERIC:
                return session
            client = session.client("s3", region_name=region, endpoint_url=endpoint_url)
            # as ZenML's AWS connector: consumers (the S3 artifact store) read the keys here
            client.credentials = session.get_credentials()
            return client
        if self.resource_type == POSTGRES:
            cred = self.issue()
            if kwargs.pop("dsn", False):
                return cred.dsn
            import psycopg

            return psycopg.connect(cred.dsn, **kwargs)
        raise NotImplementedError(f"the credgate connector can't connect to {self.resource_type} resources")

    def _boto3_session(self) -> Tuple[Any, Optional[str], Optional[str]]:
        """A boto3 Session whose credentials are issued by credgate and issued again (a new
        lease) before they expire."""
        import boto3
        from botocore.credentials import RefreshableCredentials
        from botocore.session import get_session

        first = self.issue()

        def metadata(cred: Any) -> Dict[str, str]:
            return {"access_key": cred.access_key_id, "secret_key": cred.secret_access_key,
                    "token": cred.session_token or "", "expiry_time": cred.expires_at.isoformat()}

        creds = RefreshableCredentials.create_from_metadata(
            metadata=metadata(first), refresh_using=lambda: metadata(self.issue()), method="credgate")
        # botocore refreshes 15/10 minutes before expiry by default: scale to short leases
        lifetime = max(1.0, first.remaining())
        creds._advisory_refresh_timeout = min(15 * 60, lifetime / 3)
        creds._mandatory_refresh_timeout = min(10 * 60, lifetime / 6)
        region = first.region
        botocore_session = get_session()
        botocore_session._credentials = creds
        if region:
            botocore_session.set_config_variable("region", region)
        return boto3.Session(botocore_session=botocore_session), region, first.get("endpoint_url")

    def _configure_local_client(self, **kwargs: Any) -> None:
        raise NotImplementedError(
            "the credgate connector does not write local client configuration; use `credgate exec` "
            "or `credgate cred issue --format credential-process` for local tools")

    @classmethod
    def _auto_configure(cls, auth_method: Optional[str] = None, resource_type: Optional[str] = None,
                        resource_id: Optional[str] = None, **kwargs: Any) -> "CredgateServiceConnector":
        raise NotImplementedError("the credgate connector is not auto-configured")

    def __repr__(self) -> str:  # pydantic's repr would show the config (secrets are masked, but)
        return (f"<CredgateServiceConnector {self.name or ''} auth_method={self.auth_method} "
                f"resource={self.resource_type}:{self.resource_id}>")

    __str__ = __repr__

