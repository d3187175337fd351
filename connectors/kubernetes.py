"""Kubernetes: a service-account token per lease, bound to a per-lease Secret.

Resource: ``kubernetes-namespace:NAMESPACE`` (a DNS-1123 label). Which
namespaces a connector may serve is decided by its ``resources`` patterns in the
gateway, as for every type (e.g. ``kubernetes-namespace:team-*``).

The material (auth method ``token``) is the bearer ``token`` of an identity
allowed, in the target namespaces, to ``create`` ``serviceaccounts/token``,
and to ``create``, ``get`` and ``delete`` ``secrets``. The config names the API
server (``server``, https), the CA bundle that signs its serving certificate
(``certificate_authority``, PEM, not secret: TLS is always verified against it),
the service account to issue for (``service_account``, or per resource through
``service_accounts``: fnmatch pattern -> name, first match wins) and the token's
``audiences`` (default: none requested, so the API server's own).

An issuance, in order:

1. ``plan`` (pure) names the lease's Secret, ``credgate-lease-<lease id tail>``,
   its namespace and service account: the gateway commits them before anything
   exists in the cluster, so ``revoke`` can find the Secret after a crash.
2. ``issue`` creates that Secret (type ``Opaque``, label ``credgate.io/lease``,
   no data), then a ``TokenRequest`` (``POST
   /api/v1/namespaces/{ns}/serviceaccounts/{sa}/token``) with
   ``expirationSeconds`` = the TTL (Kubernetes' minimum is 10 minutes, hence
   ``ttl.min``), the audiences, and ``boundObjectRef`` = the Secret (name and
   uid). The credential: ``token``, ``expiration``, ``namespace``, ``server``
   and a ready ``kubeconfig`` (JSON, which is YAML: cluster server and
   ``certificate-authority-data``, the user's token, a context on the
   namespace).
3. ``revoke`` deletes the Secret (with a uid precondition, so a Secret someone
   else created under the same name later is never touched). The API server
   then refuses the token: a bound token is valid only while its object exists.
   Already gone is success. Note that *other* audiences that verify the JWT
   offline (without a TokenReview) still accept it until it expires.

Tokens can't be extended (a new TokenRequest is a new credential): ``renew``
raises :class:`NotRenewable`.

One ``httpx.AsyncClient`` per instance (built on first use, TLS verified with the
configured CA bundle only, closed by ``aclose``). Errors keep the HTTP status and
the Kubernetes ``Status.reason`` (``Forbidden``, ``NotFound``...), never the
``Status.message`` (it quotes names and user ids).
"""

from __future__ import annotations

import base64
import fnmatch
import json
import re
import ssl
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, ClassVar
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

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
    Verification,
    generic_sanitize,
)

__all__ = ["KubernetesConnector", "KubernetesConfig", "KubernetesTokenMaterial", "parse_resource", "secret_name",
           "kubeconfig", "LEASE_LABEL", "PREFIX"]

PREFIX = "kubernetes-namespace:"
RESOURCE_TYPE = "kubernetes-namespace"
LEASE_LABEL = "credgate.io/lease"
SECRET_PREFIX = "credgate-lease-"
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # DNS-1123 label: namespaces, SA names
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")  # DNS-1123 subdomain: SA names
DEFAULT_TIMEOUT = 30.0


class KubernetesTokenMaterial(BaseModel):
    """Auth method ``token``: a bearer token (a service-account token, an OIDC id token...)
    allowed to create ``serviceaccounts/token`` and create/get/delete ``secrets``."""

    model_config = ConfigDict(extra="forbid")

    token: SecretStr = Field(min_length=1, max_length=16384)


class KubernetesConfig(BaseModel):
    """Where the API server is, how to trust it, and what to issue."""

    model_config = ConfigDict(extra="forbid")

    server: str = Field(max_length=512, description="the API server, https://HOST[:PORT]")
    certificate_authority: str = Field(
        min_length=1, max_length=65536, description="PEM CA bundle the API server's certificate chains to"
    )
    service_account: str | None = Field(None, description="the service account tokens are issued for")
    service_accounts: dict[str, str] = Field(
        default_factory=dict, description="resource pattern (fnmatch) -> service account; first match wins"
    )
    audiences: list[str] = Field(
        default_factory=list, max_length=16, description="the tokens' audiences (empty: the API server's own)"
    )
    cluster_name: str = Field("kubernetes", pattern=r"^[A-Za-z0-9._-]{1,64}$", description="names in the kubeconfig")

    @field_validator("server")
    @classmethod
    def _server(cls, value: str) -> str:
        return endpoint_url(value, "server", schemes=("https",))

    @field_validator("certificate_authority")
    @classmethod
    def _ca(cls, value: str) -> str:
        if "-----BEGIN CERTIFICATE-----" not in value:
            raise ValueError("certificate_authority must be a PEM certificate bundle")
        try:
            ssl.create_default_context(cadata=value)
        except (ssl.SSLError, ValueError):
            raise ValueError("certificate_authority holds no usable certificate") from None
        return value

    @field_validator("service_account")
    @classmethod
    def _sa(cls, value: str | None) -> str | None:
        if value is not None and not _SUBDOMAIN.match(value):
            raise ValueError("a service account name is a DNS-1123 subdomain (lowercase a-z 0-9 - .)")
        return value

    @field_validator("service_accounts")
    @classmethod
    def _sas(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > 64:
            raise ValueError("at most 64 service account mappings")
        for pattern, sa in value.items():
            if not pattern or len(pattern) > 256:
                raise ValueError("a resource pattern is 1-256 characters")
            if not _SUBDOMAIN.match(sa):
                raise ValueError("a service account name is a DNS-1123 subdomain (lowercase a-z 0-9 - .)")
        return value

    @field_validator("audiences")
    @classmethod
    def _audiences(cls, value: list[str]) -> list[str]:
        if any(not a or len(a) > 512 or any(c.isspace() for c in a) for a in value):
            raise ValueError("an audience is 1-512 characters without spaces")
        return list(dict.fromkeys(value))


def parse_resource(resource: str) -> str:
    """The namespace of a ``kubernetes-namespace:NAMESPACE`` resource; raises ResourceNotSupported."""
    if isinstance(resource, str) and resource.startswith(PREFIX):
        namespace = resource[len(PREFIX):]
        if _LABEL.match(namespace):
            return namespace
        raise ResourceNotSupported(
            "A Kubernetes namespace is 1-63 characters of a-z 0-9 -, starting and ending with a letter or digit."
        )
    raise ResourceNotSupported("A kubernetes resource is 'kubernetes-namespace:<namespace>'.")


def secret_name(lease_id: str) -> str:
    """The lease's Secret: ``credgate-lease-`` and the last 24 letters and digits of the lease id."""
    tail = re.sub(r"[^a-z0-9]", "", lease_id.lower())[-24:]
    if not tail:
        raise ResourceNotSupported("The lease id has no letters or digits to name a Secret with.")
    return SECRET_PREFIX + tail


def kubeconfig(*, server: str, ca_pem: str, token: str, namespace: str, cluster: str, user: str) -> str:
    """A kubeconfig (``apiVersion: v1``, ``kind: Config``) as JSON text, which is valid YAML."""
    context = f"{cluster}-{namespace}"
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": {
            "server": server,
            "certificate-authority-data": base64.b64encode(ca_pem.encode()).decode(),
        }}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": context, "context": {"cluster": cluster, "user": user, "namespace": namespace}}],
        "current-context": context,
        "preferences": {},
    }
    return json.dumps(doc, indent=2)


def _reason(response: Any) -> str:
    """The Kubernetes ``Status.reason`` of an error response (``Forbidden``...), never its message."""
    try:
        body = response.json()
    except ValueError:
        return ""
    reason = body.get("reason") if isinstance(body, dict) else None
    return reason if isinstance(reason, str) and re.fullmatch(r"[A-Za-z]{1,64}", reason) else ""


def _caused_by_tls(exc: BaseException) -> bool:
    """Whether a transport error comes from the TLS handshake (an untrusted certificate)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ssl.SSLError):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


class KubernetesConnector(ConnectorBase):
    """Service-account tokens bound to a per-lease Secret; see the module docstring."""

    type: ClassVar[str] = "kubernetes"
    auth_methods: ClassVar[Mapping[str, type[BaseModel]]] = MappingProxyType({"token": KubernetesTokenMaterial})
    config_model: ClassVar[type[BaseModel]] = KubernetesConfig
    resource_types: ClassVar[tuple[str, ...]] = (RESOURCE_TYPE,)
    capabilities: ClassVar[ConnectorCapabilities] = ConnectorCapabilities(Revocability.REVOCABLE, renewable=False)
    # TokenRequest refuses expirationSeconds under 10 minutes.
    ttl: ClassVar[TTLLimits] = TTLLimits(default=timedelta(hours=1), min=timedelta(seconds=600), max=timedelta(hours=24))

    def __init__(
        self, config: BaseModel, auth_method: str, material: BaseModel, *, name: str = "", pool: PoolLimits | None = None
    ) -> None:
        super().__init__(config, auth_method, material, name=name, pool=pool)
        self.config: KubernetesConfig
        self._material: KubernetesTokenMaterial
        self._http: Any = None  # httpx.AsyncClient, built on first use

    def __repr__(self) -> str:
        return f"<KubernetesConnector {self.config.server}>"

    @classmethod
    def sanitize(cls, exc: BaseException) -> str:
        """An httpx error as its class name (its text may quote a URL); anything else, generic."""
        return generic_sanitize(exc)

    # -- pure -------------------------------------------------------------

    def validate_resource(self, resource: str) -> str:
        parse_resource(resource)
        self._service_account(resource)
        return RESOURCE_TYPE

    def _service_account(self, resource: str) -> str:
        for pattern, sa in self.config.service_accounts.items():
            if fnmatch.fnmatchcase(resource, pattern):
                return sa
        if self.config.service_account is None:
            raise ResourceNotSupported("No service account is configured for this namespace.")
        return self.config.service_account

    def plan(self, lease_id: str, resource: str) -> dict[str, Any]:
        """The Secret ``revoke`` deletes: its namespace and name (and the service account, for the audit trail)."""
        namespace = parse_resource(resource)
        return {"namespace": namespace, "secret": secret_name(lease_id),
                "service_account": self._service_account(resource)}

    # -- HTTP ---------------------------------------------------------------

    def _client(self) -> Any:
        if self._http is None:
            import httpx

            tls = ssl.create_default_context(cadata=self.config.certificate_authority)  # this CA only
            self._http = httpx.AsyncClient(
                base_url=self.config.server, verify=tls, trust_env=False, follow_redirects=False,
                headers={"Accept": "application/json", "User-Agent": "credgate-kubernetes-connector"},
                timeout=DEFAULT_TIMEOUT,
            )
        return self._http

    async def aclose(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    async def _request(
        self, method: str, path: str, doing: str, timeout: float, body: dict[str, Any] | None = None
    ) -> Any:
        """One API call with the material's bearer token; transport failures mapped, never quoted."""
        import httpx

        headers = {"Authorization": f"Bearer {self._material.token.get_secret_value()}"}
        try:
            return await self._client().request(method, path, json=body, headers=headers, timeout=timeout)
        except httpx.TimeoutException as exc:
            error: TargetError = TargetUnreachable(
                f"The Kubernetes API server did not answer in time while {doing} ({self.sanitize(exc)}).",
                code="target_timeout",
            )
        except httpx.TransportError as exc:
            if _caused_by_tls(exc):
                error = TargetError(
                    f"The Kubernetes API server's TLS certificate is not trusted by the configured "
                    f"certificate_authority ({self.sanitize(exc)}).", code="target_tls_untrusted",
                )
            else:
                error = TargetUnreachable(
                    f"The Kubernetes API server could not be reached while {doing} ({self.sanitize(exc)})."
                )
        raise error  # outside the except block: the httpx exception is not chained

    def _failed(self, response: Any, doing: str) -> TargetError:
        """A non-2xx answer as a credgate error: HTTP status and Status.reason only."""
        status, reason = response.status_code, _reason(response)
        what = f"HTTP {status}{' ' + reason if reason else ''}"
        if status == 401:
            return TargetError(f"The Kubernetes API server refused the connector's token while {doing} ({what}).",
                               code="target_auth_failed")
        if status == 403:
            return TargetError(f"The connector's identity lacks a permission for {doing} ({what}).",
                               code="target_permission_denied")
        if status in (429, 502, 503, 504):
            return TargetUnreachable(f"The Kubernetes API server is unavailable while {doing} ({what}).")
        return TargetError(f"The Kubernetes API server refused {doing} ({what}).")

    @staticmethod
    def _path(namespace: str, *parts: str) -> str:
        return "/api/v1/namespaces/" + "/".join(quote(p, safe="") for p in (namespace, *parts))

    # -- issue / renew / revoke ---------------------------------------------

    def _state(self, revoke_state: Mapping[str, Any]) -> tuple[str, str]:
        namespace, name = revoke_state.get("namespace"), revoke_state.get("secret")
        if not (isinstance(namespace, str) and _LABEL.match(namespace) and isinstance(name, str)
                and name.startswith(SECRET_PREFIX) and _SUBDOMAIN.match(name)):
            raise TargetError("The revoke state names no lease Secret.", code="invalid_revoke_state")
        return namespace, name

    async def _create_secret(self, namespace: str, name: str, req: IssueRequest) -> str:
        """Create the lease's Secret and return its uid (a Secret of this lease left by an earlier attempt is reused)."""
        label = name[len(SECRET_PREFIX):]
        body = {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace, "labels": {LEASE_LABEL: label},
                         "annotations": {"credgate.io/lease-id": req.lease_id}},
        }
        r = await self._request("POST", self._path(namespace, "secrets"), "creating the lease's Secret",
                                req.timeout_seconds, body)
        if r.status_code == 201 or r.status_code == 200:
            return str(r.json()["metadata"]["uid"])
        if r.status_code == 404:
            raise ResourceRejected(f"Namespace {namespace} does not exist in the cluster.",
                                   resource=req.resource, reason="not_found")
        if r.status_code == 409:  # taken: ours from an earlier attempt of this lease, or not ours
            got = await self._request("GET", self._path(namespace, "secrets", name), "reading the lease's Secret",
                                      req.timeout_seconds)
            if got.status_code == 200:
                meta = got.json().get("metadata") or {}
                if (meta.get("labels") or {}).get(LEASE_LABEL) == label:
                    return str(meta["uid"])
            raise TargetError(f"A Secret named {name} already exists in namespace {namespace} and is not this lease's.",
                              code="credential_exists")
        raise self._failed(r, "creating the lease's Secret")

    async def issue(self, req: IssueRequest) -> Issued:
        namespace, name = self._state(req.revoke_state)
        if parse_resource(req.resource) != namespace:
            raise TargetError("The lease was planned for another namespace.", code="invalid_revoke_state")
        sa = req.revoke_state.get("service_account") or self._service_account(req.resource)
        uid = await self._create_secret(namespace, name, req)
        spec: dict[str, Any] = {
            "expirationSeconds": max(600, int(req.ttl.total_seconds())),
            "boundObjectRef": {"kind": "Secret", "apiVersion": "v1", "name": name, "uid": uid},
        }
        if self.config.audiences:
            spec["audiences"] = list(self.config.audiences)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        r = await self._request("POST", self._path(namespace, "serviceaccounts", sa, "token"),
                                "requesting a service-account token", req.timeout_seconds, body)
        if r.status_code == 404:
            # Nothing may be left behind for a ResourceRejected: remove the Secret first.
            await self.revoke(req.revoke_state)
            raise ResourceRejected(f"Service account {sa} does not exist in namespace {namespace}.",
                                   resource=req.resource, reason="not_found")
        if r.status_code not in (200, 201):
            raise self._failed(r, "requesting a service-account token")
        status = r.json().get("status") or {}
        token = status.get("token")
        if not isinstance(token, str) or not token:
            raise TargetError("The Kubernetes API server answered a TokenRequest without a token.")
        expires_at = req.expires_at
        stamp = status.get("expirationTimestamp")
        if isinstance(stamp, str):
            try:
                granted = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
                expires_at = min(expires_at, granted if granted.tzinfo else granted.replace(tzinfo=UTC))
            except ValueError:
                pass
        user = f"{sa}@{namespace}"
        credential = {
            "token": token,
            "expiration": expires_at.isoformat(),
            "namespace": namespace,
            "service_account": sa,
            "server": self.config.server,
            "kubeconfig": kubeconfig(server=self.config.server, ca_pem=self.config.certificate_authority, token=token,
                                     namespace=namespace, cluster=self.config.cluster_name, user=user),
        }
        return Issued(credential=credential, expires_at=expires_at)

    async def renew(self, revoke_state: Mapping[str, Any], expires_at: datetime) -> datetime:
        raise NotRenewable("A Kubernetes service-account token can't be extended; request a new lease.")

    async def revoke(self, revoke_state: Mapping[str, Any]) -> None:
        """Delete the lease's Secret (the bound token dies with it). Gone, or replaced by a Secret
        that is not this lease's, is success; the delete carries the uid read just before."""
        namespace, name = self._state(revoke_state)
        label = name[len(SECRET_PREFIX):]
        path = self._path(namespace, "secrets", name)
        got = await self._request("GET", path, "reading the lease's Secret", DEFAULT_TIMEOUT)
        if got.status_code == 404:
            return None
        if got.status_code != 200:
            raise self._failed(got, "reading the lease's Secret")
        meta = got.json().get("metadata") or {}
        if (meta.get("labels") or {}).get(LEASE_LABEL) != label:
            return None  # a Secret of the same name that is not ours: ours is gone
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": meta.get("uid")}}
        r = await self._request("DELETE", path, "deleting the lease's Secret", DEFAULT_TIMEOUT, body)
        if r.status_code in (200, 202, 404, 409):  # 409: the uid precondition failed, ours was deleted already
            return None
        raise self._failed(r, "deleting the lease's Secret")

    # -- verify / list ------------------------------------------------------

    async def verify(self) -> Verification:
        """A ``SelfSubjectReview`` (who the token authenticates as), then the namespaces it may list."""
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
        try:
            r = await self._request("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                                    "the SelfSubjectReview", DEFAULT_TIMEOUT, body)
            if r.status_code not in (200, 201):
                raise self._failed(r, "the SelfSubjectReview")
        except TargetError as exc:
            return Verification(ok=False, message=exc.message)
        user = ((r.json().get("status") or {}).get("userInfo") or {}).get("username")
        identity = user if isinstance(user, str) else None
        message = f"Authenticated to the Kubernetes API server {self.config.server} as {identity or 'an unnamed user'}."
        try:
            namespaces = await self.list_resources(RESOURCE_TYPE)
        except TargetError:
            return Verification(ok=True, message=message + " Listing namespaces is not permitted.", identity=identity)
        return Verification(ok=True, message=message, identity=identity, reachable={RESOURCE_TYPE: namespaces})

    async def list_resources(self, resource_type: str) -> list[str]:
        if resource_type != RESOURCE_TYPE:
            raise ResourceNotSupported(
                f"Connector type kubernetes has no resource type {resource_type!r}; it has: {RESOURCE_TYPE}."
            )
        r = await self._request("GET", "/api/v1/namespaces", "listing namespaces", DEFAULT_TIMEOUT)
        if r.status_code != 200:
            raise self._failed(r, "listing namespaces")
        names = ((item.get("metadata") or {}).get("name") for item in r.json().get("items") or [])
        return sorted(PREFIX + n for n in names if isinstance(n, str) and _LABEL.match(n))
