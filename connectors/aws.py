"""AWS: temporary STS credentials, optionally scoped to one S3 bucket.

Four kinds of credential, chosen by ``credential_type``:

- ``web-identity`` (auth method ``web-identity``): ``AssumeRoleWithWebIdentity``
  on ``role_arn`` with a session policy, trading a JWT the gateway signs for
  this issuance (``sub`` the principal, ``run`` the run, ``aud``
  ``web_identity_audience``). No secret exists for such a connector anywhere:
  the role trusts the gateway as an IAM OIDC provider (README, "Keyless
  federation"), and the STS call itself is unsigned.

- ``assume-role`` (auth method ``iam-role``, the default there): ``AssumeRole``
  on ``role_arn`` with a session policy. The role's trust policy must let the
  material's principal assume it, and its ``MaxSessionDuration`` (1 h unless
  raised) caps the TTL; AWS refuses longer requests.
- ``federation-token`` (auth method ``secret-key``, the default there):
  ``GetFederationToken`` for an IAM *user's* long-term keys. The result's
  permissions are the intersection of the user's and the session policy, so
  ``aws-generic`` passes an allow-everything policy (without one, a federation
  token has no permissions at all).
- ``session-token`` (auth method ``secret-key``): ``GetSessionToken``. Such a
  token carries the user's full permissions and **can't be scoped**: only the
  ``aws-generic`` resource is accepted.

Resources: ``s3-bucket:NAME`` (the bucket and its objects, ``s3:*``) and
``aws-generic`` (the role's or user's own permissions).

STS credentials can't be revoked or extended (``EXPIRY_ONLY``): ``revoke`` is
a no-op and ``renew`` is refused. To cut off a live assume-role session early,
attach an ``aws:TokenIssueTime`` deny to the role (not done here).

Clients: an instance builds one boto3 session, and on it one client per service
(``sts``; ``s3`` for listing buckets), on first use, and reuses them for every
later call from any thread; building a client costs tens of milliseconds of CPU,
a call about one. The gateway keeps one instance per connector while its
configuration and material are unchanged, and builds a new one (new clients,
signing with the new keys) when either changes; the old instance's ``aclose``
closes its clients' connections, as does removing the connector. Calls run on
the connector's own worker threads (``connector:NAME``, 8), so an endpoint that
hangs holds only those.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from connectors.base import (
    endpoint_url,
    is_ipv4,
    PoolLimits,
    ConnectorBase,
    KeylessMaterial,
    IssueRequest,
    Issued,
    ResourceNotSupported,
    ConnectorCapabilities,
    NotRenewable,
    Revocability,
    TargetError,
    TargetUnreachable,
    TTLLimits,
    Verification,
    generic_sanitize,
    run_sync,
)
from gateway.errors import ValidationFailed

__all__ = [
    "AWSConnector",
    "AWSConfig",
    "AWSKeysMaterial",
    "AWSWebIdentityMaterial",
    "CredentialType",
    "session_policy",
    "parse_resource",
    "federation_name",
]

CredentialType = Literal["assume-role", "federation-token", "session-token", "web-identity"]
CREDENTIAL_TYPES: dict[str, tuple[str, ...]] = {
    "iam-role": ("assume-role",),
    "secret-key": ("federation-token", "session-token"),
    "web-identity": ("web-identity",),
}
DEFAULT_CREDENTIAL_TYPE = {"iam-role": "assume-role", "secret-key": "federation-token", "web-identity": "web-identity"}

GENERIC = "aws-generic"
S3_PREFIX = "s3-bucket:"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_+=,.@-]")
CONNECT_TIMEOUT = READ_TIMEOUT = 10.0
DEFAULT_TIMEOUT = 30.0
_T = TypeVar("_T")


class AWSKeysMaterial(BaseModel):
    """An access key pair (and a session token if the keys are temporary)."""

    model_config = ConfigDict(extra="forbid")

    aws_access_key_id: str = Field(min_length=4, max_length=128, pattern=r"^[A-Za-z0-9]+$")
    aws_secret_access_key: SecretStr
    aws_session_token: SecretStr | None = None


class AWSWebIdentityMaterial(KeylessMaterial):
    """Auth method ``web-identity``: no material. The gateway signs a JWT per issuance (its
    ``sub`` the principal, ``run`` the run) and STS ``AssumeRoleWithWebIdentity`` trades it for
    the role's credentials; the role trusts the gateway as an IAM OIDC provider."""


class AWSConfig(BaseModel):
    """Where to call STS and which credential to make.

    ``credential_type`` defaults by auth method: ``assume-role`` for
    ``iam-role`` (which needs ``role_arn``), ``federation-token`` for
    ``secret-key``.
    """

    model_config = ConfigDict(extra="forbid")

    region: str = Field("us-east-1", pattern=r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
    endpoint_url: str | None = Field(None, max_length=512)
    role_arn: str | None = Field(None, pattern=r"^arn:aws[a-z-]*:iam::\d{12}:role/[A-Za-z0-9_+=,.@/-]{1,512}$")
    external_id: str | None = Field(None, min_length=2, max_length=1224, pattern=r"^[A-Za-z0-9_+=,.@:/-]+$")
    credential_type: CredentialType | None = None
    session_name_prefix: str = Field("credgate", pattern=r"^[A-Za-z0-9_+=,.@-]{1,32}$")
    web_identity_audience: str = Field(
        "sts.amazonaws.com", min_length=1, max_length=255,
        description="web-identity: the token's aud, the client ID registered with the IAM OIDC provider",
    )

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return None if value is None else endpoint_url(value, "endpoint_url")

    @model_validator(mode="after")
    def _consistent(self) -> AWSConfig:
        if self.credential_type in ("assume-role", "web-identity") and not self.role_arn:
            raise ValueError(f"credential_type {self.credential_type} needs role_arn")
        if self.credential_type in ("federation-token", "session-token") and self.role_arn:
            raise ValueError(f"role_arn is only used by assume-role, not {self.credential_type}")
        if self.external_id and not self.role_arn:
            raise ValueError("external_id is only used with role_arn")
        return self

    @property
    def partition(self) -> str:
        if self.region.startswith("cn-"):
            return "aws-cn"
        if self.region.startswith("us-gov-"):
            return "aws-us-gov"
        return "aws"


def parse_resource(resource: str) -> tuple[str, str | None]:
    """``(resource type, bucket or None)``; raises ResourceNotSupported."""
    if resource == GENERIC:
        return GENERIC, None
    if isinstance(resource, str) and resource.startswith(S3_PREFIX):
        bucket = resource[len(S3_PREFIX) :]
        if _BUCKET.match(bucket) and ".." not in bucket and not is_ipv4(bucket):
            return "s3-bucket", bucket
        raise ResourceNotSupported(
            "An S3 bucket name is 3-63 characters of a-z 0-9 . -, starts and ends with a letter "
            "or digit, has no '..' and is not an IP address."
        )
    raise ResourceNotSupported("An aws resource is 's3-bucket:<bucket name>' or 'aws-generic'.")


def session_policy(
    resource: str, credential_type: CredentialType = "assume-role", partition: str = "aws"
) -> dict[str, Any] | None:
    """The session policy a lease on ``resource`` is issued with, or None for none.

    ``s3-bucket:NAME`` allows ``s3:*`` on the bucket and its objects, nothing
    else. ``aws-generic`` passes no policy to ``AssumeRole`` (the role's own
    permissions) and an allow-everything policy to ``GetFederationToken``
    (intersected with the user's permissions). ``GetSessionToken`` takes no
    policy, so it only serves ``aws-generic``.
    """
    kind, bucket = parse_resource(resource)
    if credential_type == "session-token":
        if kind != GENERIC:
            raise ResourceNotSupported(
                "Session tokens can't be scoped to a resource; this connector only serves 'aws-generic'."
            )
        return None
    if kind == "s3-bucket":
        return {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": "s3:*",
                    "Resource": [f"arn:{partition}:s3:::{bucket}", f"arn:{partition}:s3:::{bucket}/*"],
                }
            ],
        }
    if credential_type == "federation-token":
        return {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    return None


def federation_name(prefix: str, lease_id: str) -> str:
    """A ``GetFederationToken`` name (2-32 characters) that ends with the lease id's tail."""
    tail = re.sub(r"[^A-Za-z0-9]", "", lease_id)[-max(16, 31 - len(prefix)) :] or "lease"
    head = prefix[: 31 - len(tail)]
    name = f"{head}-{tail}" if head else tail
    return name if len(name) >= 2 else name + "00"


def _error(exc: BaseException, doing: str, hint: str = "") -> TargetError:
    """A botocore failure as a credgate error: class and AWS error code only
    (``hint`` is added to a ValidationError, AWS's answer to a bad parameter)."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    what = AWSConnector.sanitize(exc)
    unreachable = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)
    if isinstance(exc, unreachable + (asyncio.TimeoutError, OSError)):
        return TargetUnreachable(f"AWS could not be reached while {doing} ({what}).")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code")
        return TargetError(f"AWS refused {doing} ({what}).{hint if code == 'ValidationError' else ''}")
    return TargetError(f"AWS failed while {doing} ({what}).")


class AWSConnector(ConnectorBase):
    """Temporary AWS credentials from STS; see the module docstring.

    ``session-token`` connectors are unscoped: they accept only the
    ``aws-generic`` resource (``s3-bucket:*`` raises ResourceNotSupported),
    because ``GetSessionToken`` takes no session policy.
    """

    type: ClassVar[str] = "aws"
    auth_methods: ClassVar[Mapping[str, type[BaseModel]]] = MappingProxyType(
        {"secret-key": AWSKeysMaterial, "iam-role": AWSKeysMaterial, "web-identity": AWSWebIdentityMaterial}
    )
    config_model: ClassVar[type[BaseModel]] = AWSConfig
    resource_types: ClassVar[tuple[str, ...]] = ("s3-bucket", GENERIC)
    capabilities: ClassVar[ConnectorCapabilities] = ConnectorCapabilities(Revocability.EXPIRY_ONLY, renewable=False)
    # STS allows 36 h for federation and session tokens; 12 h (AssumeRole's cap) for all.
    ttl: ClassVar[TTLLimits] = TTLLimits(default=timedelta(hours=1), min=timedelta(seconds=900), max=timedelta(hours=12))

    def __init__(
        self, config: BaseModel, auth_method: str, material: BaseModel, *, name: str = "", pool: PoolLimits | None = None
    ) -> None:
        super().__init__(config, auth_method, material, name=name, pool=pool)
        self.config: AWSConfig
        self._material: AWSKeysMaterial
        self.credential_type: CredentialType = self.config.credential_type or DEFAULT_CREDENTIAL_TYPE[auth_method]  # type: ignore[assignment]
        if self.credential_type not in CREDENTIAL_TYPES[auth_method]:
            raise ValidationFailed(
                f"Auth method {auth_method} can't make {self.credential_type} credentials; "
                f"it makes: {', '.join(CREDENTIAL_TYPES[auth_method])}.",
                code="invalid_connector_config",
            )
        if auth_method in ("iam-role", "web-identity") and not self.config.role_arn:
            raise ValidationFailed(f"Auth method {auth_method} needs config.role_arn.", code="invalid_connector_config")
        if self.config.external_id and auth_method == "web-identity":
            raise ValidationFailed("external_id is not used with web-identity.", code="invalid_connector_config")
        self._threads = f"connector:{name or 'aws'}"  # its own worker threads: a slow endpoint holds only these
        self._session: Any = None  # boto3 session, built with the first client
        self._clients: dict[str, Any] = {}  # service -> client (see "clients" below)
        self._lock = threading.Lock()

    @classmethod
    def sanitize(cls, exc: BaseException) -> str:
        """A botocore error as its class and AWS error code (``response["Error"]["Code"]``),
        never its message: AWS quotes request parameters there (an ARN, a policy, a key id)."""
        response = getattr(exc, "response", None)
        code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
        return f"{type(exc).__name__} ({code})" if code is not None else generic_sanitize(exc)

    def __repr__(self) -> str:
        return f"<AWSConnector {self.credential_type} {self.config.region}>"

    # -- pure -------------------------------------------------------------

    def validate_resource(self, resource: str) -> str:
        kind, _ = parse_resource(resource)
        session_policy(resource, self.credential_type)  # session tokens refuse s3-bucket
        return kind

    def plan(self, lease_id: str, resource: str) -> dict[str, Any]:
        """Names only, for the audit trail (CloudTrail shows them): nothing is revoked."""
        self.validate_resource(resource)
        state: dict[str, Any] = {
            "session_name": _NAME_CHARS.sub("", f"{self.config.session_name_prefix}-{lease_id}")[:64],
            "credential_type": self.credential_type,
        }
        if self.credential_type == "federation-token":
            state["federated_user"] = federation_name(self.config.session_name_prefix, lease_id)
        return state

    # -- clients ---------------------------------------------------------------
    #
    # One boto3 session and one client per service (sts, s3) per instance, built on first
    # use and then reused by every call: building a client costs 40-150 ms of CPU (botocore
    # loads the service model and endpoint rules), an STS call about 1.5 ms. An instance
    # holds one configuration and one material for its whole life (the catalog builds a new
    # instance when either changes, and closes the old one), so a client never outlives the
    # material it signs with, and no other connector's instance can reach it.

    def _client(self, service: str) -> Any:
        """This instance's client for ``service``, from any thread (botocore clients are
        thread-safe; the session they are built from is not, so it is used under the lock)."""
        client = self._clients.get(service)  # after the first call: no lock
        if client is not None:
            return client
        session = self._own_session()
        with self._lock:
            client = self._clients.get(service)
            if client is None:
                client = self._clients[service] = self._new_client(session, service)
            return client

    def _new_client(self, session: Any, service: str, keys: Mapping[str, str] | None = None) -> Any:
        """Build one client on the instance's session (the one place a client is made): signed
        with the material's keys, with ``keys`` (temporary ones), or, for web-identity's STS
        (``AssumeRoleWithWebIdentity`` is called unsigned: the token is the authentication),
        unsigned."""
        from botocore import UNSIGNED
        from botocore.config import Config

        options: dict[str, Any] = {
            "connect_timeout": CONNECT_TIMEOUT,
            "read_timeout": READ_TIMEOUT,
            "retries": {"total_max_attempts": 3, "mode": "standard"},  # 2 retries
            "ignore_configured_endpoint_urls": True,  # no AWS_ENDPOINT_URL redirect of the keys
        }
        signing: dict[str, Any] = {}
        if keys is not None:
            signing = dict(keys)
        elif isinstance(self._material, AWSKeysMaterial):
            m = self._material
            signing = {
                "aws_access_key_id": m.aws_access_key_id,
                "aws_secret_access_key": m.aws_secret_access_key.get_secret_value(),
                "aws_session_token": m.aws_session_token.get_secret_value() if m.aws_session_token else None,
            }
        else:
            options["signature_version"] = UNSIGNED
        return session.client(
            service, region_name=self.config.region, endpoint_url=self.config.endpoint_url,
            config=Config(**options), **signing,
        )

    async def aclose(self) -> None:
        """Close the clients' HTTP connections (the instance was replaced or removed, or the
        gateway stops). A call in flight finishes, its connection closed after it; a call that
        still arrives is served by the same client on a new connection, released with the
        instance. Nothing is rebuilt. (No lock: the event loop must not wait for a thread
        building a client; a client built while this runs is released with the instance.)"""
        for client in list(self._clients.values()):
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing sockets of a dropped instance: nothing to report
                pass

    # -- I/O ----------------------------------------------------------------

    async def _call(self, doing: str, timeout: float, fn: Callable[[], _T], hint: str = "") -> _T:
        try:
            return await run_sync(fn, timeout=timeout, pool=self._threads)
        except TargetError:
            raise
        except Exception as exc:  # noqa: BLE001 - every botocore failure is mapped, never quoted
            raise _error(exc, doing, hint) from None

    async def issue(self, req: IssueRequest) -> Issued:
        ct = req.revoke_state.get("credential_type", self.credential_type)
        if ct != self.credential_type:
            raise TargetError("The lease was planned for another credential type.", code="invalid_revoke_state")
        policy = session_policy(req.resource, ct, self.config.partition)
        policy_json = json.dumps(policy, separators=(",", ":")) if policy else None
        seconds = int(req.ttl.total_seconds())
        token = await self.identity_token(self.config.web_identity_audience, req) if ct == "web-identity" else None

        def call() -> dict[str, Any]:
            sts = self._client("sts")
            if ct == "web-identity":
                kwargs = {
                    "RoleArn": self.config.role_arn,
                    "RoleSessionName": req.revoke_state["session_name"],
                    "WebIdentityToken": token,
                    "DurationSeconds": seconds,
                }
                if policy_json:
                    kwargs["Policy"] = policy_json
                return sts.assume_role_with_web_identity(**kwargs)["Credentials"]
            if ct == "assume-role":
                kwargs: dict[str, Any] = {
                    "RoleArn": self.config.role_arn,
                    "RoleSessionName": req.revoke_state["session_name"],
                    "DurationSeconds": seconds,
                }
                if policy_json:
                    kwargs["Policy"] = policy_json
                if self.config.external_id:
                    kwargs["ExternalId"] = self.config.external_id
                return sts.assume_role(**kwargs)["Credentials"]
            if ct == "federation-token":
                name = req.revoke_state.get("federated_user") or federation_name(
                    self.config.session_name_prefix, req.lease_id
                )
                kwargs = {"Name": name, "DurationSeconds": seconds}
                if policy_json:
                    kwargs["Policy"] = policy_json
                return sts.get_federation_token(**kwargs)["Credentials"]
            return sts.get_session_token(DurationSeconds=seconds)["Credentials"]

        hint = (
            " A TTL above the role's MaxSessionDuration (1 h unless raised) is refused by AWS."
            if ct in ("assume-role", "web-identity")
            else ""
        )
        creds = await self._call(f"the {ct} request", req.timeout_seconds, call, hint)
        expiration = creds.get("Expiration")
        if isinstance(expiration, datetime):
            expiration = expiration if expiration.tzinfo else expiration.replace(tzinfo=UTC)
            expires_at = min(expiration, req.expires_at)
        else:
            expires_at = req.expires_at
        credential = {
            "aws_access_key_id": creds["AccessKeyId"],
            "aws_secret_access_key": creds["SecretAccessKey"],
            "aws_session_token": creds["SessionToken"],
            "region": self.config.region,
            "expiration": expires_at.isoformat(),
        }
        if self.config.endpoint_url:
            credential["endpoint_url"] = self.config.endpoint_url
        return Issued(credential=credential, expires_at=expires_at)

    async def renew(self, revoke_state: Mapping[str, Any], expires_at: datetime) -> datetime:
        raise NotRenewable("AWS STS credentials can't be extended; request a new lease.")

    async def revoke(self, revoke_state: Mapping[str, Any]) -> None:
        """Nothing to do: STS credentials end at their expiry."""
        return None

    async def _buckets(self) -> list[str]:
        """The buckets the material (web-identity: the role, assumed for this call) may list,
        as resources (``s3-bucket:NAME``)."""
        keys = await self._own_role_keys() if self.credential_type == "web-identity" else None

        def call() -> list[str]:
            s3 = self._client("s3") if keys is None else self._temp_client("s3", keys)
            try:
                names = (b["Name"] for b in s3.list_buckets().get("Buckets", []))
                return sorted(S3_PREFIX + name for name in names)
            finally:
                if keys is not None:
                    s3.close()

        return await self._call("listing S3 buckets", DEFAULT_TIMEOUT, call)

    def _own_session(self) -> Any:
        with self._lock:
            if self._session is None:
                import boto3

                self._session = boto3.session.Session()
            return self._session

    def _temp_client(self, service: str, keys: Mapping[str, str]) -> Any:
        """A client signed with temporary keys, for one call (closed by the caller)."""
        session = self._own_session()
        with self._lock:  # a boto3 session is not thread-safe
            return self._new_client(session, service, keys)

    async def _own_role_keys(self) -> dict[str, str]:
        """web-identity, for the connector's own checks (verify, list): the role's keys for 15
        minutes, from a token whose subject is ``connector:NAME``."""
        token = await self.identity_token(self.config.web_identity_audience)
        session_name = _NAME_CHARS.sub("", f"{self.config.session_name_prefix}-verify")[:64]

        def call() -> dict[str, str]:
            creds = self._client("sts").assume_role_with_web_identity(
                RoleArn=self.config.role_arn, RoleSessionName=session_name, WebIdentityToken=token,
                DurationSeconds=900,
            )["Credentials"]
            return {"aws_access_key_id": creds["AccessKeyId"], "aws_secret_access_key": creds["SecretAccessKey"],
                    "aws_session_token": creds["SessionToken"]}

        return await self._call("the AssumeRoleWithWebIdentity request", DEFAULT_TIMEOUT, call)

    async def verify(self) -> Verification:
        """``GetCallerIdentity`` (the material's ARN), then the buckets it may list
        (``reachable={"s3-bucket": ["s3-bucket:NAME", ...]}``)."""

        def whoami(keys: Mapping[str, str] | None = None) -> str:
            if keys is None:
                return self._client("sts").get_caller_identity()["Arn"]
            sts = self._temp_client("sts", keys)
            try:
                return sts.get_caller_identity()["Arn"]
            finally:
                sts.close()

        try:
            if self.credential_type == "web-identity":
                keys = await self._own_role_keys()
                arn = await self._call("the GetCallerIdentity request", DEFAULT_TIMEOUT, lambda: whoami(keys))
            else:
                arn = await self._call("the GetCallerIdentity request", DEFAULT_TIMEOUT, whoami)
        except TargetError as exc:
            return Verification(ok=False, message=exc.message)
        message = f"Authenticated to AWS as {arn}; issues {self.credential_type} credentials."
        if self.credential_type == "web-identity" and self.identity is not None:
            message += f" No secret is held: the role trusts this gateway as OIDC issuer {self.identity.issuer}."
        if self.credential_type == "session-token":
            return Verification(ok=True, message=message, identity=arn)
        try:
            buckets = await self._buckets()
        except TargetError:
            return Verification(ok=True, message=message + " Listing S3 buckets is not permitted.", identity=arn)
        return Verification(ok=True, message=message, identity=arn, reachable={"s3-bucket": buckets})

    async def list_resources(self, resource_type: str) -> list[str]:
        if resource_type == GENERIC:
            return [GENERIC]
        if resource_type != "s3-bucket":
            raise ResourceNotSupported(
                f"Connector type aws has no resource type {resource_type!r}; it has: s3-bucket, aws-generic."
            )
        if self.credential_type == "session-token":
            raise ResourceNotSupported("Session tokens can't be scoped to a resource; only 'aws-generic' is served.")
        return await self._buckets()
