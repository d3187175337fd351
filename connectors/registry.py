"""Container registries: docker login credentials from Amazon ECR, or Docker Registry v2 bearer tokens.

Two auth methods, two kinds of credential:

- ``ecr`` (material: an AWS access key pair, like the ``aws`` connector): ECR
  ``GetAuthorizationToken``, decoded into what ``docker login`` takes (``username``
  ``AWS``, ``password``, ``proxy_endpoint``). Resource ``ecr-repository:NAME`` (pull
  only) or ``ecr-repository:NAME:pull+push``; issuing checks that the repository exists
  (``DescribeRepositories``, 409 ``not_found`` otherwise).

  **What ECR can't scope.** An ECR token *is* the caller's IAM identity: it opens every
  repository that identity may reach, for as long as the token lives. So scoping is done
  on the identity: with ``config.role_arn`` the connector first assumes that role with a
  session policy that allows ``ecr:GetAuthorizationToken`` and the pull (or pull and push)
  actions on this one repository's ARN only, and asks for the token *as that session*
  (:func:`ecr_session_policy`). Without ``role_arn`` the token carries the material's own
  ECR permissions, over every repository: the credential says so (``scoped: "false"``) and
  ``verify`` warns. ECR tokens live 12 hours (AWS: "The authorization token is valid for 12
  hours"), and nothing shortens or revokes one: the type is ``EXPIRY_ONLY``, its longest
  TTL is 12 h, and the credential's ``token_expires_at`` is ECR's own stated expiry, which
  may be *later* than the lease's (a lease that ends does not end the token). An expiry ECR
  states that is already past (moto answers a fixed 2015 date) is not believed; the
  documented 12 h is reported instead.

- ``token`` (material: the token-signing private key, PEM, and its certificate chain,
  leaf first; the registry's ``auth.token.rootcertbundle`` trusts the chain's root or the
  leaf itself): a JWT as the distribution project's token-authentication spec describes
  ("Token Authentication Implementation", docs/spec/auth/jwt.md). Header: ``alg`` RS256
  (RSA key) or ES256/ES384 (EC P-256/P-384), ``typ`` JWT, ``kid`` in libtrust's key id
  format (:func:`libtrust_kid`) and, unless ``config.x5c`` is off, ``x5c`` with the chain.
  Claims: ``iss`` (``config.issuer``, the registry's ``auth.token.issuer``), ``sub`` (the
  principal of the issuance, ``IssueRequest.principal``), ``aud`` (``config.service``, the
  registry's ``auth.token.service``), ``exp`` (the lease's expiry), ``nbf``, ``iat``,
  ``jti`` (the lease id) and ``access``: ``[{"type": "repository", "name": NAME,
  "actions": [...]}]``.

  The credential is the token itself (``token``, with ``registry``, ``scope``, ``service``):
  a client sends it as ``Authorization: Bearer`` to the registry. ``docker login`` can't
  take it (docker fetches its own token from the registry's realm); tools that accept a
  registry bearer token, or an HTTP client, can.

  Resources ``repository:NAME`` (``config.default_actions``, pull unless set) or
  ``repository:NAME:ACTIONS`` with ACTIONS ``pull``, ``push`` or ``pull+push`` (a ``+``, as
  resource strings have no commas). The actions are part of the resource string, so the
  connector's allowed resource patterns decide them (``repository:team/*:pull``). The
  registry is the only one to check a token, until ``exp``: ``EXPIRY_ONLY``, not renewable.
  Unless ``config.check_registry`` is off, ``issue`` presents the new token to the
  registry's ``GET /v2/`` once, so a key the registry does not trust fails at issue
  (502 ``target_auth_failed``) and a registry that is down answers 503, not a token
  that will never work.

Clients: ``ecr`` keeps one boto3 session and one client per service (``ecr``, ``sts``)
per instance, like ``aws``; the scoped ECR client of an assumed session is built per
call and closed. ``token`` keeps one ``httpx.AsyncClient``. Both close in ``aclose``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from connectors.aws import AWSKeysMaterial
from connectors.base import (
    endpoint_url,
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
    ValidationFailed,
    Verification,
    generic_sanitize,
    run_sync,
)

__all__ = [
    "RegistryConnector",
    "RegistryConfig",
    "ECRMaterial",
    "TokenSigningMaterial",
    "parse_resource",
    "ecr_session_policy",
    "libtrust_kid",
    "ECR_TOKEN_LIFETIME",
]

ECR_TOKEN_LIFETIME = timedelta(hours=12)
ECR_PREFIX, REPO_PREFIX = "ecr-repository:", "repository:"
# distribution's reference grammar: path components of lower-case alphanumerics with separators
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_NAME = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_ACTIONS = {"pull": ("pull",), "push": ("push",), "pull+push": ("pull", "push")}
ECR_PULL = ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability",
            "ecr:DescribeImages", "ecr:ListImages"]
ECR_PUSH = ["ecr:PutImage", "ecr:InitiateLayerUpload", "ecr:UploadLayerPart", "ecr:CompleteLayerUpload",
            "ecr:BatchCheckLayerAvailability"]
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_+=,.@-]")
CONNECT_TIMEOUT = READ_TIMEOUT = 10.0
DEFAULT_TIMEOUT = 30.0
_T = TypeVar("_T")


class ECRMaterial(AWSKeysMaterial):
    """Auth method ``ecr``: an AWS access key pair (and a session token if the keys are
    temporary), as the ``aws`` connector takes it."""


class TokenSigningMaterial(BaseModel):
    """Auth method ``token``: the registry token issuer's signing key and its certificate chain."""

    model_config = ConfigDict(extra="forbid")

    private_key: SecretStr = Field(description="PEM, PKCS#8 or traditional; RSA or EC P-256/P-384")
    certificate_chain: str = Field(min_length=1, max_length=65536, description="PEM certificates, leaf first")


class RegistryConfig(BaseModel):
    """Non-secret settings. ``ecr`` reads ``region``, ``endpoint_url``, ``role_arn``,
    ``external_id``, ``registry_id``, ``session_name_prefix``; ``token`` reads ``registry_url``,
    ``service``, ``issuer``, ``default_actions``, ``x5c``, ``check_registry``. A field of the
    other auth method is refused."""

    model_config = ConfigDict(extra="forbid")

    # ecr
    region: str = Field("us-east-1", pattern=r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
    endpoint_url: str | None = Field(None, max_length=512, description="ecr: the ECR (and STS) endpoint")
    role_arn: str | None = Field(None, pattern=r"^arn:aws[a-z-]*:iam::\d{12}:role/[A-Za-z0-9_+=,.@/-]{1,512}$")
    external_id: str | None = Field(None, min_length=2, max_length=1224, pattern=r"^[A-Za-z0-9_+=,.@:/-]+$")
    registry_id: str | None = Field(None, pattern=r"^\d{12}$", description="ecr: the account whose registry")
    session_name_prefix: str = Field("credgate", pattern=r"^[A-Za-z0-9_+=,.@-]{1,32}$")
    # token
    registry_url: str | None = Field(None, max_length=512, description="token: the registry, e.g. https://reg:5000")
    service: str | None = Field(None, min_length=1, max_length=255, description="token: aud (auth.token.service)")
    issuer: str | None = Field(None, min_length=1, max_length=255, description="token: iss (auth.token.issuer)")
    default_actions: Literal["pull", "push", "pull+push"] = "pull"
    x5c: bool = Field(True, description="token: put the certificate chain in the header (else kid only)")
    check_registry: bool = Field(True, description="token: present each new token to GET /v2/ once")

    _ECR_FIELDS: ClassVar[tuple[str, ...]] = ("endpoint_url", "role_arn", "external_id", "registry_id")
    _TOKEN_FIELDS: ClassVar[tuple[str, ...]] = ("registry_url", "service", "issuer")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return None if value is None else endpoint_url(value, "endpoint_url")

    @field_validator("registry_url")
    @classmethod
    def _registry(cls, value: str | None) -> str | None:
        return None if value is None else endpoint_url(value, "registry_url")

    @property
    def partition(self) -> str:
        if self.region.startswith("cn-"):
            return "aws-cn"
        if self.region.startswith("us-gov-"):
            return "aws-us-gov"
        return "aws"


def parse_resource(resource: str) -> tuple[str, str, tuple[str, ...] | None]:
    """``(resource type, repository, actions or None for the default)``; raises ResourceNotSupported."""
    if not isinstance(resource, str):
        raise ResourceNotSupported("A registry resource is a string.")
    for kind, prefix in (("ecr-repository", ECR_PREFIX), ("repository", REPO_PREFIX)):
        if resource.startswith(prefix):
            rest = resource[len(prefix):]
            name, _, actions = rest.partition(":")
            if not _REPO_NAME.match(name) or len(name) > 255:
                raise ResourceNotSupported(
                    "A repository name is lower-case path components of a-z 0-9 separated by . _ __ or -, "
                    "joined by '/'."
                )
            if actions and actions not in _ACTIONS:
                raise ResourceNotSupported("Repository actions are 'pull', 'push' or 'pull+push'.")
            return kind, name, (_ACTIONS[actions] if actions else None)
    raise ResourceNotSupported(
        "A registry resource is 'repository:NAME[:pull|push|pull+push]' (auth method token) "
        "or 'ecr-repository:NAME[:pull|pull+push]' (auth method ecr)."
    )


def ecr_session_policy(repository_arn: str, actions: tuple[str, ...]) -> dict[str, Any]:
    """The session policy an ``ecr`` lease is issued under: ``GetAuthorizationToken`` (which
    takes no resource) and the pull (and push) actions on one repository, nothing else."""
    allowed = list(ECR_PULL)
    if "push" in actions:
        allowed += [a for a in ECR_PUSH if a not in allowed]
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "ecr:GetAuthorizationToken", "Resource": "*"},
            {"Effect": "Allow", "Action": allowed, "Resource": repository_arn},
        ],
    }


def libtrust_kid(public_key: Any) -> str:
    """docker/libtrust's key id: SHA-256 of the DER SubjectPublicKeyInfo, first 240 bits,
    base32, in 12 groups of 4 joined by ':' (what the registry matches a ``kid`` against)."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    return ":".join(b32[i:i + 4] for i in range(0, 48, 4))


class RegistryConnector(ConnectorBase):
    """Docker login credentials (ECR) or registry bearer tokens (distribution token auth)."""

    type: ClassVar[str] = "registry"
    auth_methods: ClassVar[Mapping[str, type[BaseModel]]] = {"ecr": ECRMaterial, "token": TokenSigningMaterial}
    config_model: ClassVar[type[BaseModel]] = RegistryConfig
    resource_types: ClassVar[tuple[str, ...]] = ("ecr-repository", "repository")
    ttl: ClassVar[TTLLimits] = TTLLimits(
        default=timedelta(hours=1), min=timedelta(minutes=1), max=ECR_TOKEN_LIFETIME,
    )
    capabilities: ClassVar[ConnectorCapabilities] = ConnectorCapabilities(
        revocability=Revocability.EXPIRY_ONLY, renewable=False,
    )

    def __init__(
        self, config: BaseModel, auth_method: str, material: BaseModel, *, name: str = "", pool: PoolLimits | None = None
    ) -> None:
        super().__init__(config, auth_method, material, name=name, pool=pool)
        self.config: RegistryConfig
        cfg = self.config
        other = RegistryConfig._TOKEN_FIELDS if auth_method == "ecr" else RegistryConfig._ECR_FIELDS
        stray = [f for f in other if getattr(cfg, f) is not None]
        if stray:
            raise ValidationFailed(
                f"Auth method {auth_method} does not use: {', '.join(stray)}.", code="invalid_connector_config"
            )
        if cfg.external_id and not cfg.role_arn:
            raise ValidationFailed("external_id is only used with role_arn.", code="invalid_connector_config")
        self._threads = f"connector:{name or 'registry'}"
        self._lock = threading.Lock()  # the boto3 session (not thread-safe)
        self._clients_lock = threading.Lock()
        self._session: Any = None
        self._clients: dict[str, Any] = {}
        self._http: Any = None
        self._signer: Any = None
        if auth_method == "token":
            missing = [f for f in RegistryConfig._TOKEN_FIELDS if getattr(cfg, f) is None]
            if missing:
                raise ValidationFailed(
                    f"Auth method token needs config: {', '.join(missing)}.", code="invalid_connector_config"
                )
            self._signer = _Signer.load(self._material)  # type: ignore[arg-type]

    @classmethod
    def sanitize(cls, exc: BaseException) -> str:
        """A botocore error as its class and AWS error code; an httpx error as its class (and
        an HTTP status); never a message (AWS quotes parameters, URLs can carry tokens)."""
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code is not None:
                return f"{type(exc).__name__} ({code})"
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return f"{type(exc).__name__} ({status})"
        return generic_sanitize(exc)

    def __repr__(self) -> str:
        where = self.config.registry_url if self.auth_method == "token" else self.config.region
        return f"<RegistryConnector {self.auth_method} {where}>"

    # -- pure ----------------------------------------------------------------

    def _parsed(self, resource: str) -> tuple[str, str, tuple[str, ...]]:
        kind, name, actions = parse_resource(resource)
        want = "ecr-repository" if self.auth_method == "ecr" else "repository"
        if kind != want:
            raise ResourceNotSupported(f"Auth method {self.auth_method} serves '{want}:NAME' resources only.")
        if actions is None:
            actions = ("pull",) if kind == "ecr-repository" else _ACTIONS[self.config.default_actions]
        if kind == "ecr-repository" and actions == ("push",):
            raise ResourceNotSupported("An ECR push needs pull too: ask for 'ecr-repository:NAME:pull+push'.")
        return kind, name, actions

    def validate_resource(self, resource: str) -> str:
        return self._parsed(resource)[0]

    def plan(self, lease_id: str, resource: str) -> dict[str, Any]:
        """Names for the audit trail only: nothing is created that could be revoked."""
        _, name, actions = self._parsed(resource)
        state: dict[str, Any] = {"auth_method": self.auth_method, "repository": name, "actions": list(actions)}
        if self.auth_method == "ecr":
            state["session_name"] = _NAME_CHARS.sub("", f"{self.config.session_name_prefix}-{lease_id}")[:64]
        else:
            state["jti"] = lease_id
        return state

    async def renew(self, revoke_state: Mapping[str, Any], expires_at: datetime) -> datetime:
        raise NotRenewable("Registry tokens can't be extended; request a new lease.")

    async def revoke(self, revoke_state: Mapping[str, Any]) -> None:
        """Nothing to do: an ECR token and a registry JWT both end at their expiry."""
        return None

    async def issue(self, req: IssueRequest) -> Issued:
        if req.revoke_state.get("auth_method", self.auth_method) != self.auth_method:
            raise TargetError("The lease was planned for another auth method.", code="invalid_revoke_state")
        _, name, actions = self._parsed(req.resource)
        if self.auth_method == "ecr":
            return await self._issue_ecr(req, name, actions)
        return await self._issue_token(req, name, actions)

    async def verify(self) -> Verification:
        if self.auth_method == "token":
            return await self._verify_token()
        return await self._verify_ecr()

    async def list_resources(self, resource_type: str) -> list[str]:
        want = "ecr-repository" if self.auth_method == "ecr" else "repository"
        if resource_type != want:
            raise ResourceNotSupported(
                f"Auth method {self.auth_method} of connector type registry lists '{want}' only."
            )
        if self.auth_method == "ecr":
            return [ECR_PREFIX + r for r in await self._ecr_repositories()]
        return [REPO_PREFIX + r for r in await self._catalog()]

    async def aclose(self) -> None:
        for client in list(self._clients.values()):
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing sockets of a dropped instance
                pass
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()

    # -- token ---------------------------------------------------------------

    def _token(self, *, subject: str, jti: str, access: list[dict[str, Any]], expires_at: datetime) -> str:
        now = int(time.time())
        claims = {
            "iss": self.config.issuer, "sub": subject, "aud": self.config.service,
            "exp": int(expires_at.timestamp()), "nbf": now, "iat": now, "jti": jti, "access": access,
        }
        return self._signer.sign(claims, x5c=self.config.x5c)

    def _client_http(self) -> Any:
        if self._http is None:
            import httpx

            self._http = httpx.AsyncClient(timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT),
                                           follow_redirects=False, trust_env=False)
        return self._http

    async def _registry_get(self, path: str, token: str, timeout: float, doing: str) -> Any:
        import httpx

        try:
            return await asyncio.wait_for(
                self._client_http().get(f"{self.config.registry_url}{path}",
                                        headers={"Authorization": f"Bearer {token}"}),
                timeout,
            )
        except (httpx.TransportError, asyncio.TimeoutError, OSError) as exc:
            what = self.sanitize(exc)
        raise TargetUnreachable(f"The registry could not be reached while {doing} ({what}).")

    async def _issue_token(self, req: IssueRequest, name: str, actions: tuple[str, ...]) -> Issued:
        expires_at = req.expires_at
        subject = req.principal or f"connector:{self.name}"
        jti = str(req.revoke_state.get("jti") or req.lease_id)
        access = [{"type": "repository", "name": name, "actions": list(actions)}]
        token = self._token(subject=subject, jti=jti, access=access, expires_at=expires_at)
        if self.config.check_registry:
            r = await self._registry_get("/v2/", token, req.timeout_seconds, "checking the new token")
            if r.status_code in (401, 403):
                raise TargetError(
                    f"The registry refused a token signed with this connector's key (HTTP {r.status_code}); "
                    "check its rootcertbundle, issuer and service.", code="target_auth_failed",
                )
            if r.status_code != 200:
                raise TargetError(f"The registry answered GET /v2/ with HTTP {r.status_code}.")
        host = urlsplit(self.config.registry_url).netloc  # type: ignore[arg-type]
        credential = {
            "registry": self.config.registry_url or "", "registry_host": host, "token": token,
            "scope": f"repository:{name}:{','.join(actions)}", "service": self.config.service or "",
            "expires_at": expires_at.isoformat(),
        }
        return Issued(credential=credential, expires_at=expires_at)

    async def _verify_token(self) -> Verification:
        expires = datetime.now(UTC) + timedelta(minutes=1)
        token = self._token(subject=f"connector:{self.name}", jti=secrets.token_hex(12), access=[], expires_at=expires)
        kid = self._signer.kid
        try:
            r = await self._registry_get("/v2/", token, DEFAULT_TIMEOUT, "verifying")
        except TargetError as exc:
            return Verification(ok=False, message=exc.message)
        if r.status_code != 200:
            return Verification(ok=False, message=f"The registry refused a token signed with key {kid} "
                                                  f"(HTTP {r.status_code}).")
        message = f"The registry accepts tokens signed with key {kid} ({self._signer.alg})."
        try:
            repos = await self._catalog()
        except TargetError:
            return Verification(ok=True, message=message + " Listing its catalog is not permitted.", identity=kid)
        return Verification(ok=True, message=message, identity=kid, reachable={"repository": [REPO_PREFIX + r for r in repos]})

    async def _catalog(self) -> list[str]:
        """``GET /v2/_catalog`` with a token for ``registry:catalog:*`` (first page, up to 1000)."""
        expires = datetime.now(UTC) + timedelta(minutes=1)
        access = [{"type": "registry", "name": "catalog", "actions": ["*"]}]
        token = self._token(subject=f"connector:{self.name}", jti=secrets.token_hex(12), access=access,
                            expires_at=expires)
        r = await self._registry_get("/v2/_catalog?n=1000", token, DEFAULT_TIMEOUT, "listing the catalog")
        if r.status_code != 200:
            raise TargetError(f"The registry answered GET /v2/_catalog with HTTP {r.status_code}.",
                              code="target_permission_denied")
        try:
            repos = r.json().get("repositories") or []
        except ValueError:
            raise TargetError("The registry's catalog is not JSON.") from None
        return sorted(str(x) for x in repos if isinstance(x, str))

    # -- ecr -----------------------------------------------------------------

    def _own_session(self) -> Any:
        with self._lock:
            if self._session is None:
                import boto3

                self._session = boto3.session.Session()
            return self._session

    def _new_client(self, service: str, keys: Mapping[str, str | None] | None = None) -> Any:
        from botocore.config import Config

        session = self._own_session()
        if keys is None:
            m = self._material
            keys = {
                "aws_access_key_id": m.aws_access_key_id,
                "aws_secret_access_key": m.aws_secret_access_key.get_secret_value(),
                "aws_session_token": m.aws_session_token.get_secret_value() if m.aws_session_token else None,
            }
        config = Config(connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT,
                        retries={"total_max_attempts": 3, "mode": "standard"}, ignore_configured_endpoint_urls=True)
        with self._lock:  # a boto3 session is not thread-safe
            return session.client(service, region_name=self.config.region, endpoint_url=self.config.endpoint_url,
                                  config=config, **keys)

    def _client(self, service: str) -> Any:
        """This instance's client for ``service`` (signed with the material), built once."""
        client = self._clients.get(service)
        if client is None:
            with self._clients_lock:
                client = self._clients.get(service)
                if client is None:
                    client = self._clients[service] = self._new_client(service)
        return client

    async def _call(self, doing: str, timeout: float, fn: Callable[[], _T]) -> _T:
        try:
            return await run_sync(fn, timeout=timeout, pool=self._threads)
        except TargetError:
            raise
        except Exception as exc:  # noqa: BLE001 - every botocore failure is mapped, never quoted
            err = _aws_error(exc, doing)
        raise err

    def _repository_arn(self, name: str, account: str) -> str:
        return f"arn:{self.config.partition}:ecr:{self.config.region}:{account}:repository/{name}"

    async def _issue_ecr(self, req: IssueRequest, name: str, actions: tuple[str, ...]) -> Issued:
        registry_id = self.config.registry_id
        # The role session lives as long as the lease (15 min to 1 h: STS's floor, and the default
        # MaxSessionDuration); the ECR token minted from it states its own expiry.
        session_seconds = int(min(max(req.ttl.total_seconds(), 900), 3600))

        def call() -> tuple[dict[str, Any], str]:
            from botocore.exceptions import ClientError

            ecr = self._client("ecr")
            kwargs: dict[str, Any] = {"repositoryNames": [name]}
            if registry_id:
                kwargs["registryId"] = registry_id
            try:
                repo = ecr.describe_repositories(**kwargs)["repositories"][0]
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "RepositoryNotFoundException":
                    return {}, ""
                raise
            account = repo.get("registryId") or registry_id or ""
            if not self.config.role_arn:
                return _auth_data(ecr.get_authorization_token(**_registry_ids(registry_id))), "false"
            policy = ecr_session_policy(repo.get("repositoryArn") or self._repository_arn(name, account), actions)
            assume: dict[str, Any] = {
                "RoleArn": self.config.role_arn, "RoleSessionName": req.revoke_state.get("session_name")
                or _NAME_CHARS.sub("", f"{self.config.session_name_prefix}-{req.lease_id}")[:64],
                "DurationSeconds": session_seconds, "Policy": json.dumps(policy, separators=(",", ":")),
            }
            if self.config.external_id:
                assume["ExternalId"] = self.config.external_id
            creds = self._client("sts").assume_role(**assume)["Credentials"]
            scoped = self._new_client("ecr", {
                "aws_access_key_id": creds["AccessKeyId"], "aws_secret_access_key": creds["SecretAccessKey"],
                "aws_session_token": creds["SessionToken"],
            })
            try:
                return _auth_data(scoped.get_authorization_token(**_registry_ids(registry_id))), "true"
            finally:
                scoped.close()

        data, scoped = await self._call("the ECR authorization token request", req.timeout_seconds, call)
        if not data:
            raise ResourceRejected(f"ECR has no repository {name!r}.", resource=req.resource, reason="not_found")
        try:
            username, password = base64.b64decode(data["authorizationToken"]).decode().split(":", 1)
        except (KeyError, ValueError):
            raise TargetError("ECR answered an authorization token that is not base64 'user:password'.") from None
        now = datetime.now(UTC)
        stated = data.get("expiresAt")
        if isinstance(stated, datetime):
            stated = stated if stated.tzinfo else stated.replace(tzinfo=UTC)
        token_expires = stated if isinstance(stated, datetime) and stated > now else now + ECR_TOKEN_LIFETIME
        expires_at = min(req.expires_at, token_expires)
        endpoint = str(data.get("proxyEndpoint", ""))
        credential = {
            "username": username, "password": password, "proxy_endpoint": endpoint,
            "registry": urlsplit(endpoint).netloc or endpoint, "repository": name, "scoped": scoped,
            "expires_at": expires_at.isoformat(), "token_expires_at": token_expires.isoformat(),
        }
        return Issued(credential=credential, expires_at=expires_at)

    async def _ecr_repositories(self) -> list[str]:
        registry_id = self.config.registry_id

        def call() -> list[str]:
            pages = self._client("ecr").get_paginator("describe_repositories")
            kwargs = {"registryId": registry_id} if registry_id else {}
            return sorted(r["repositoryName"] for p in pages.paginate(**kwargs) for r in p.get("repositories", []))

        return await self._call("listing ECR repositories", DEFAULT_TIMEOUT, call)

    async def _verify_ecr(self) -> Verification:
        try:
            arn = await self._call("the GetCallerIdentity request", DEFAULT_TIMEOUT,
                                   lambda: self._client("sts").get_caller_identity()["Arn"])
        except TargetError as exc:
            return Verification(ok=False, message=exc.message)
        if self.config.role_arn:
            message = f"Authenticated to AWS as {arn}; ECR tokens are issued as {self.config.role_arn}, scoped per repository."
        else:
            message = (f"Authenticated to AWS as {arn}. Without role_arn, every ECR token carries this identity's "
                       "own permissions over every repository: it can't be scoped.")
        try:
            repos = await self._ecr_repositories()
        except TargetError:
            return Verification(ok=True, message=message + " Listing repositories is not permitted.", identity=arn)
        return Verification(ok=True, message=message, identity=arn,
                            reachable={"ecr-repository": [ECR_PREFIX + r for r in repos]})


def _registry_ids(registry_id: str | None) -> dict[str, Any]:
    return {"registryIds": [registry_id]} if registry_id else {}


def _auth_data(response: Mapping[str, Any]) -> dict[str, Any]:
    data = response.get("authorizationData") or []
    if not data:
        raise TargetError("ECR answered no authorization data.")
    return dict(data[0])


def _aws_error(exc: BaseException, doing: str) -> TargetError:
    """A botocore failure as a credgate error: class and AWS error code only."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    what = RegistryConnector.sanitize(exc)
    unreachable = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)
    if isinstance(exc, unreachable + (asyncio.TimeoutError, OSError)):
        return TargetUnreachable(f"AWS could not be reached while {doing} ({what}).")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("InvalidClientTokenId", "SignatureDoesNotMatch", "UnrecognizedClientException",
                    "ExpiredToken", "ExpiredTokenException", "InvalidAccessKeyId",
                    "InvalidSignatureException"):
            return TargetError(f"AWS refused the connector's keys while {doing} ({what}).", code="target_auth_failed")
        if code in ("AccessDenied", "AccessDeniedException"):
            return TargetError(f"AWS denied {doing} ({what}).", code="target_permission_denied")
        return TargetError(f"AWS refused {doing} ({what}).")
    return TargetError(f"{doing} failed ({what}).")


class _Signer:
    """The token auth method's key: algorithm, libtrust kid, x5c chain, and signing (joserfc)."""

    def __init__(self, key: Any, alg: str, kid: str, x5c: list[str]) -> None:
        self._key, self.alg, self.kid, self.x5c = key, alg, kid, x5c

    def __repr__(self) -> str:
        return f"<registry signer {self.alg} {self.kid}>"

    @classmethod
    def load(cls, material: TokenSigningMaterial) -> _Signer:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from joserfc.jwk import ECKey, RSAKey

        try:
            private = serialization.load_pem_private_key(material.private_key.get_secret_value().encode(), None)
        except (ValueError, TypeError):
            raise ValueError("private_key is not an unencrypted PEM private key") from None
        try:
            chain = x509.load_pem_x509_certificates(material.certificate_chain.encode())
        except ValueError:
            raise ValueError("certificate_chain is not PEM certificates") from None
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if chain[0].public_key().public_bytes(der, pub) != private.public_key().public_bytes(der, pub):
            raise ValueError("the first certificate of certificate_chain is not private_key's")
        if isinstance(private, rsa.RSAPrivateKey):
            if private.key_size < 2048:
                raise ValueError("an RSA private_key must be at least 2048 bits")
            alg, key = "RS256", RSAKey.import_key(private)
        elif isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name in ("secp256r1", "secp384r1"):
            alg = "ES256" if private.curve.name == "secp256r1" else "ES384"
            key = ECKey.import_key(private)
        else:
            raise ValueError("private_key must be RSA or EC P-256/P-384")
        x5c = [base64.b64encode(c.public_bytes(der)).decode() for c in chain]
        return cls(key, alg, libtrust_kid(private.public_key()), x5c)

    def sign(self, claims: Mapping[str, Any], *, x5c: bool) -> str:
        from joserfc import jwt

        header: dict[str, Any] = {"typ": "JWT", "alg": self.alg, "kid": self.kid}
        if x5c:
            header["x5c"] = list(self.x5c)
        return jwt.encode(header, dict(claims), self._key, algorithms=[self.alg])
