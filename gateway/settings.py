"""Gateway settings: one pydantic-settings class.

Precedence, highest first: command-line flags, ``CREDGATE_*`` environment
variables, the YAML file given with ``--config``, the defaults below.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from cryptography import x509
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from gateway.errors import ConfigurationError, field_path
from gateway.paths import CLIENT_ID

_BEARER = re.compile(r"[A-Za-z0-9._~+/-]+=*")  # RFC 6750 b64token: what an Authorization header carries
DEFAULT_DATA_DIR = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "credgate"


def normalize_subject(text: str) -> str:
    """``text`` as RFC 4514 in cryptography's spelling (``2.5.4.3=a`` -> ``CN=a``,
    escapes as it writes them); ValueError if it is not a distinguished name."""
    try:
        name = x509.Name.from_rfc4514_string(text.strip()).rfc4514_string()
    except ValueError:
        raise ValueError(
            f"{text!r} is not an RFC 4514 distinguished name (e.g. 'CN=zenml-server,O=acme', no spaces after commas)"
        ) from None
    if not name:
        raise ValueError("an empty subject matches no certificate")
    return name


def client_subjects(mapping: Mapping[str, str]) -> dict[str, str]:
    """Validate ``tls_client_subjects``: keys normalized, values client ids (ValueError otherwise)."""
    out: dict[str, str] = {}
    for subject, client_id in mapping.items():
        if not isinstance(client_id, str) or not CLIENT_ID.match(client_id):
            raise ValueError(f"{client_id!r} is not a client id (1-63 characters of a-z, 0-9, '_', '.', '-')")
        key = normalize_subject(subject)
        if out.setdefault(key, client_id) != client_id:
            raise ValueError(f"subject {key!r} is mapped to two clients")
    return out


def split_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) of a loopback address; ValueError otherwise."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8766)")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{text!r}: the health listener has no TLS and no authentication: bind it to a loopback "
                         "address (127.0.0.1, ::1)")
    return host, int(port)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CREDGATE_", extra="forbid")

    dev: bool = Field(False, description="Development mode: create the data dir, a KEK file and a bootstrap token.")
    data_dir: Path = Field(DEFAULT_DATA_DIR, description="Where the embedded store and the dev KEK file live.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the store; default: SQLite file credgate.db in the data directory."
    )
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=1, le=65535)

    # Key-encryption key: a file (never group/world readable) or the value itself.
    kek_file: Path | None = Field(None, description="File holding the versioned KEK (lines 'N:<base64 32 bytes>').")
    kek: SecretStr | None = Field(None, description="The versioned KEK itself, same format as the file.")
    # Or a KEK held by a KMS (docs/kek.md): the KEK versions are stored wrapped by the KMS key.
    kek_source: Literal["file", "env", "aws-kms", "vault-transit"] | None = Field(
        None, description="Where the KEK is: file (kek_file), env (kek), aws-kms or vault-transit; "
        "default: whichever of kek_file and kek is set (a file of the data dir in --dev).",
    )
    kek_aws_key_id: str | None = Field(None, description="aws-kms: key id, key ARN, alias/NAME or alias ARN.")
    kek_aws_region: str | None = Field(None, description="aws-kms: the region (default: the AWS SDK's).")
    kek_aws_endpoint_url: str | None = Field(None, description="aws-kms: another KMS endpoint (VPC, FIPS).")
    kek_vault_url: str | None = Field(None, description="vault-transit: the Vault/OpenBao address.")
    kek_vault_mount: str = Field("transit", description="vault-transit: where the transit engine is mounted.")
    kek_vault_key: str | None = Field(None, description="vault-transit: the transit key's name.")
    kek_vault_token: SecretStr | None = Field(None, description="vault-transit: the token (or kek_vault_token_file).")
    kek_vault_token_file: Path | None = Field(
        None, description="vault-transit: a file holding the token, re-read when it changes (a Vault Agent sink)."
    )
    kek_vault_namespace: str | None = Field(None, description="vault-transit: the Vault namespace.")
    kek_vault_ca_cert: Path | None = Field(None, description="vault-transit: PEM CA bundle to verify the server.")
    kek_kms_timeout_seconds: float = Field(5.0, gt=0, le=120, description="Deadline of every call to the KMS.")
    kek_check_seconds: float = Field(
        60.0, gt=0, le=86400, description="How often the KMS key's version is checked (a rotation there is "
        "followed) and KEK versions made by other replicas are picked up.",
    )
    kek_kms_grace_seconds: float = Field(
        0.0, ge=0, description="0: the unwrapped KEK is kept for the life of the process, like a KEK file. N: "
        "once the KMS has not answered for N seconds, reads and writes of sealed data fail with 503 "
        "kms_unavailable until it answers (the KMS as an off switch); N must exceed kek_check_seconds.",
    )

    bootstrap_token: SecretStr | None = Field(
        None, description="Becomes the first admin token of an empty store: 'cgt_' and 28 or more characters of "
        "A-Z a-z 0-9 - . _ ~ + / (e.g. cgt_$(openssl rand -hex 32))."
    )
    bootstrap_token_file: Path | None = Field(
        None, description="Where a generated first admin token is written (mode 0600, atomically) instead of "
        "being printed; refused if the file exists and group or others can read it.",
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Addresses or CIDRs of reverse proxies whose X-Forwarded-For is believed (comma-separated); "
        "default none: the client address is the connection's peer.",
    )

    public_url: str | None = Field(
        None, description="The gateway's URL as callers see it: the issuer of its tokens (default http://HOST:PORT)."
    )

    # TLS (gateway/web/tls.py): HTTPS with a certificate and key; client certificates with a client CA.
    tls_cert_file: Path | None = Field(None, description="PEM certificate (chain) to serve HTTPS with.")
    tls_key_file: Path | None = Field(None, description="PEM private key of that certificate.")
    tls_client_ca_file: Path | None = Field(None, description="PEM CA(s) client certificates are verified against.")
    tls_require_client_cert: bool = Field(False, description="Refuse TLS connections without a client certificate.")
    tls_client_subjects: dict[str, str] = Field(
        default_factory=dict,
        description="Client certificate subject (RFC 4514, e.g. 'CN=zenml-server,O=acme') -> OAuth2 client id.",
    )
    tls_key_group_readable: bool = Field(
        False, description="Accept a TLS key file its group may read (mode 0440/0640), as a Kubernetes Secret "
        "volume read through the pod's fsGroup is; others may never read it.",
    )
    tls_reload_check_seconds: float = Field(
        5.0, gt=0, le=3600, description="How often the TLS files are checked for a change and reloaded live "
        "(SIGHUP reloads at once; docs/tls.md).",
    )
    tls_refused_log_seconds: float = Field(
        10.0, gt=0, le=3600, description="Refused TLS handshakes are logged at most once per reason per this "
        "long; the ones not logged are counted in the next line (all are counted in a metric).",
    )
    health_listen: str | None = Field(
        None, description="A loopback HOST:PORT (e.g. 127.0.0.1:8766) serving only GET /healthz and /readyz over "
        "plain HTTP, for a probe that has no client certificate (docs/tls.md).",
    )

    login_issuer: str | None = Field(
        None, description="Name of the trusted issuer admins sign in with (`credgate login`, the console)."
    )
    login_client_id: str | None = Field(None, description="The OAuth2 client id credgate uses at that issuer.")
    login_scopes: str = Field("openid email profile groups", description="Scopes asked for at sign-in.")

    console: bool = Field(True, description="Serve the web console at /console (sign-in: an admin key, or the "
                          "identity provider named by login_issuer).")
    console_session_seconds: int = Field(
        3600, ge=300, le=43200, description="How long a console sign-in lasts (an IdP sign-in: never past its id_token).")
    console_reveal_seconds: int = Field(30, ge=2, le=600, description="How long the console shows a revealed value.")
    console_reauth_seconds: int = Field(
        900, ge=60, le=43200, description="A reveal in the console needs a sign-in at most this old; older, the "
        "console asks to sign in again.")

    audit_sinks: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Extra audit sinks besides the store, set in the config file: "
        "[{type: file, path: ..., required: true}, {type: stdout}].",
    )
    audit_wait_seconds: float = Field(2.0, gt=0, description="How long a write waits for a failing required sink.")
    audit_checkpoint_every: int = Field(100, ge=1, description="Checkpoint the audit chain every N events.")
    audit_checkpoint_seconds: float = Field(
        5.0, gt=0, le=3600, description="Also checkpoint this often while new events arrive (and at shutdown)."
    )

    audit_refusal_window_seconds: float = Field(
        10.0, ge=0, le=3600,
        description="Refusals that change nothing (401/403/429) of one kind (address, outcome, route, caller) "
        "within this window are written one by one up to audit_refusal_first, then counted: one aggregate event "
        "(count, first and last time) for the rest. 0: every refusal is its own event.",
    )
    audit_refusal_first: int = Field(
        3, ge=1, le=1000, description="How many refusals of one kind in a window are written one by one before "
        "the rest are counted (a mistyped token stays fully recorded; a flood is folded).",
    )
    audit_refusal_table_size: int = Field(
        10_000, ge=1, description="At most this many kinds of refusal are counted at once (least recently seen "
        "written out first).",
    )

    audit_retention_days: float = Field(
        0, ge=0, le=36500,
        description="Audit events older than this many days are archived (the export line format, with the "
        "checkpoints that cover them) into a new file under audit_archive_dir and pruned from the store, by the "
        "reaper's leader every audit_retention_check_seconds; the chain still verifies from the cut on, and the "
        "archive against it. 0: keep every event in the store.",
    )
    audit_archive_dir: Path | None = Field(
        None, description="Where the retention policy writes its archives (default: DATA_DIR/audit-archive); "
        "on Kubernetes, a persistent volume.",
    )
    audit_retention_check_seconds: float = Field(
        3600.0, gt=0, le=86400 * 7, description="How often the retention policy looks for events to prune.",
    )

    rate_per_address: float = Field(500.0, ge=0, description="Requests/s per client address (0: no limit).")
    burst_per_address: float = Field(1000.0, ge=1)
    rate_per_principal: float = Field(200.0, ge=0, description="Requests/s per authenticated principal (0: no limit).")
    burst_per_principal: float = Field(400.0, ge=1)
    rate_per_action: dict[str, list[float]] = Field(
        default_factory=dict,
        description="Per principal and action: {action: [rate, burst]}, e.g. {'credentials:issue': [5, 10]}.",
    )
    max_header_bytes: int = Field(16384, ge=1024, description="Largest accepted request header block (431 past it).")
    max_concurrency: int = Field(1000, ge=1, description="Connections+tasks a worker serves at once (503 past it).")
    workers: int | None = Field(
        None, ge=1, le=256,
        description="Worker processes `credgate serve` runs on its one socket (unset: the CPUs this process may "
        "use). Migrations and the first-run set-up run once, in the parent; caches, rate limits and /metrics "
        "are per worker; database_pool_size is divided among them. 1: one process, no supervisor.",
    )
    keep_alive_seconds: int = Field(5, ge=1, description="Idle keep-alive connections are closed after this.")

    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="Largest accepted request body.")
    page_size_max: int = Field(1000, ge=1)

    reaper_enabled: bool = Field(True, description="Run the reaper in this process (one leader among replicas).")
    reaper_interval_seconds: float = Field(5.0, gt=0, description="How often the reaper looks for work.")
    reaper_leader_ttl_seconds: float = Field(
        15.0, gt=0,
        description="The reaper leader's lease (PostgreSQL): a leader that can't renew it within this stops acting, "
        "and another replica takes over within this plus one heartbeat (min(reaper_interval_seconds, ttl/3)).",
    )
    pending_timeout_seconds: float = Field(
        120.0, gt=0, description="A pending lease older than this is a crashed issuance: revoke by its plan."
    )
    delivery_deadline_seconds: float = Field(
        60.0, ge=0, le=3600,
        description="A revocable credential whose response was not handed to the server whole within this of "
        "its activation (the gateway crashed, or the client left before the answer) is revoked by the reaper "
        "(audited 'undelivered'). A retry with the same Idempotency-Key before then gets the credential and "
        "restarts the deadline; after it, 410 lease_ended: issue anew. A process killed in the moment between "
        "sending a response and recording it may revoke a credential its client did get. Keep it well above "
        "the time an issuance's answer takes to leave (seconds). 0: off.",
    )
    target_timeout_seconds: float = Field(30.0, gt=0, description="Timeout of every call to a connector's target.")
    target_pool_size: int = Field(
        4, ge=1, le=100,
        description="Admin connections each connector instance keeps to its target at most (PostgreSQL, MySQL, "
        "Redis; over every database a PostgreSQL connector reaches), per replica, shared by issue, renew, revoke, "
        "verify and list: a burst queues in the gateway instead of taking the target's connections from its other "
        "clients. Size it against the target's limit (max_connections, maxclients) and the number of replicas.",
    )
    target_pool_wait_seconds: float = Field(
        10.0, ge=0, le=300,
        description="How long a call waits for a free admin connection (never past its own deadline, "
        "target_timeout_seconds) before it is refused with 503 target_busy and Retry-After.",
    )
    target_pool_idle_seconds: float = Field(
        60.0, gt=0, le=3600,
        description="An admin connection unused this long is closed (a quiet connector keeps none open).",
    )
    backend_timeout_seconds: float = Field(
        10.0, gt=0, description="Deadline of every call to a secret backend (503 backend_unavailable past it)."
    )
    revoke_backoff_base_seconds: float = Field(1.0, gt=0)
    revoke_backoff_cap_seconds: float = Field(300.0, gt=0)
    stuck_after_attempts: int = Field(5, ge=1, description="A revocation failing this often counts as stuck.")

    database_pool_size: int = Field(
        20, ge=1, le=500,
        description="PostgreSQL connections each replica keeps open (plus up to 10 more under bursts, one listener "
        "and one for the reaper's lock); size it against max_connections and the number of replicas. With several "
        "workers each gets ceil(size / workers) and ceil(10 / workers) more under bursts, plus its own listener, "
        "group-commit connection and reaper lock.",
    )
    database_connect_timeout_seconds: float = Field(
        5.0, gt=0, le=300,
        description="PostgreSQL store: how long a new connection (or a free pooled one) may take, and how long a "
        "connection whose data goes unacknowledged (a partition) or whose idle keepalives go unanswered lives. "
        "Past it a request answers 503 store_unavailable with Retry-After.",
    )
    database_statement_timeout_seconds: float = Field(
        60.0, ge=0, le=3600,
        description="PostgreSQL store: the longest one statement may run (statement_timeout; 0: no limit). "
        "Past it the request answers 503 store_unavailable.",
    )
    cache_stale_seconds: float = Field(
        30.0, ge=0, le=3600,
        description="While this replica can't hear the store's change feed (a store outage, a failover), what "
        "its caches hold (verified tokens, secret metadata, connectors, policies) keeps answering for at most this "
        "long after the feed was lost; nothing new is cached meanwhile. A change made on another replica in that "
        "time may go unseen here for as long. 0: stop using the caches as soon as the feed is lost.",
    )
    material_cache_seconds: float = Field(
        30.0, ge=0, le=3600,
        description="How long a connector's material, read from its backend, is reused (0: read it for every use). "
        "A change made through the gateway drops it at once on every replica; this bounds out-of-band changes.",
    )
    run_token_max_ttl_seconds: int = Field(
        86400, ge=60, le=86400,
        description="The longest a run token lives (a longer ttl_seconds asked for is cut to this). It is also "
        "refused as soon as its run, its delegator (client, admin key, issuer mapping) or its delegator's token is revoked.",
    )

    @field_validator("bootstrap_token")
    @classmethod
    def _token_shape(cls, v: SecretStr | None) -> SecretStr | None:
        # Refused here, in one line, rather than accepted and then refused on every request.
        # Never quotes the value.
        if v is None:
            return v
        token = v.get_secret_value()
        if not token.startswith("cgt_"):
            raise ValueError("CREDGATE_BOOTSTRAP_TOKEN must start with 'cgt_', the prefix of admin tokens "
                             "(e.g. cgt_$(openssl rand -hex 32)); without it the gateway never looks it up")
        if len(token) < 32 or len(token) > 4096:
            raise ValueError("CREDGATE_BOOTSTRAP_TOKEN must be 32 to 4096 characters long")
        if not _BEARER.fullmatch(token):
            raise ValueError("CREDGATE_BOOTSTRAP_TOKEN may hold only A-Z a-z 0-9 - . _ ~ + / (and a trailing =): "
                             "no spaces or newlines, which can't be sent back in an Authorization header")
        return v

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _proxies(cls, v: Any) -> Any:
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except ValueError:
                    raise ValueError("give a JSON list or comma-separated addresses") from None
            return [p for p in re.split(r"[,\s]+", text) if p]
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        out = []
        for item in v:
            try:
                out.append(str(ipaddress.ip_network(item.strip(), strict=False)))
            except ValueError:
                raise ValueError(f"{field_path([item])!r} is not an IP address or CIDR (e.g. 10.0.0.0/8)") from None
        return out

    @field_validator("tls_client_subjects")
    @classmethod
    def _subjects(cls, v: dict[str, str]) -> dict[str, str]:
        return client_subjects(v)

    @field_validator("health_listen")
    @classmethod
    def _health_listen(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        host, port = split_listen(v)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def health_address(self) -> tuple[str, int] | None:
        return split_listen(self.health_listen) if self.health_listen else None

    @model_validator(mode="after")
    def _tls(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("give tls_cert_file and tls_key_file together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file (client certificates need TLS)")
        if self.tls_require_client_cert and self.tls_client_ca_file is None:
            raise ValueError("tls_require_client_cert needs tls_client_ca_file to verify client certificates against")
        if self.tls_client_subjects and self.tls_client_ca_file is None:
            raise ValueError("tls_client_subjects needs tls_client_ca_file to verify client certificates against")
        if self.health_address is not None and self.health_address[1] == self.port:
            raise ValueError("health_listen needs a port of its own, not the gateway's port")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).expanduser())
        return self

    @field_validator("kek_file", "kek", "kek_source", "kek_aws_key_id", "kek_aws_region", "kek_aws_endpoint_url",
                     "kek_vault_url", "kek_vault_key", "kek_vault_token", "kek_vault_token_file", "kek_vault_namespace",
                     "kek_vault_ca_cert", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: Any) -> Any:
        # compose passes ${VAR:-} as an empty variable: the same as not setting it.
        return None if isinstance(v, str) and not v.strip() else v

    @model_validator(mode="after")
    def _kek_source(self) -> Settings:
        aws = {"kek_aws_key_id", "kek_aws_region", "kek_aws_endpoint_url"}
        vault = {"kek_vault_url", "kek_vault_key", "kek_vault_token", "kek_vault_token_file", "kek_vault_namespace",
                 "kek_vault_ca_cert"}
        source = self.kek_source
        if source in ("aws-kms", "vault-transit"):
            if self.kek_file is not None or self.kek is not None:
                raise ValueError(f"kek_source={source} holds the KEK in the KMS: unset kek_file and kek")
            own, other = (aws, vault) if source == "aws-kms" else (vault, aws)
            needed = ["kek_aws_key_id"] if source == "aws-kms" else ["kek_vault_url", "kek_vault_key"]
            missing = [name for name in needed if getattr(self, name) is None]
            if missing:
                raise ValueError(f"kek_source={source} needs {' and '.join(missing)}")
            if source == "vault-transit" and (self.kek_vault_token is None) == (self.kek_vault_token_file is None):
                raise ValueError("kek_source=vault-transit needs exactly one of kek_vault_token and kek_vault_token_file")
            if self.kek_vault_url is not None and not re.match(r"^https?://", self.kek_vault_url):
                raise ValueError("kek_vault_url must start with http:// or https://")
            if self.kek_kms_grace_seconds and self.kek_kms_grace_seconds <= self.kek_check_seconds:
                raise ValueError("kek_kms_grace_seconds must be 0 or longer than kek_check_seconds")
        else:
            own, other = set(), aws | vault
            if source == "file" and self.kek is not None:
                raise ValueError("kek_source=file reads kek_file: unset kek")
            if source == "env" and (self.kek is None or self.kek_file is not None):
                raise ValueError("kek_source=env needs kek (and no kek_file)")
            if source == "file" and self.kek_file is None and not self.dev:
                raise ValueError("kek_source=file needs kek_file")
        stray = sorted(name for name in other - own if getattr(self, name) is not None)
        if stray:
            raise ValueError(f"{', '.join(stray)} set, but kek_source is {source or 'not set'}")
        for name in ("kek_vault_token_file", "kek_vault_ca_cert"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).expanduser())
        return self

    @model_validator(mode="after")
    def _expand(self) -> Settings:
        self.data_dir = self.data_dir.expanduser()
        if self.kek_file is not None:
            self.kek_file = self.kek_file.expanduser()
        if self.bootstrap_token_file is not None:
            if self.bootstrap_token is not None:
                raise ValueError("give bootstrap_token or bootstrap_token_file, not both")
            self.bootstrap_token_file = self.bootstrap_token_file.expanduser()
        return self

    @property
    def store_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'credgate.db'}"

    @property
    def issuer_url(self) -> str:
        scheme = "https" if self.tls_cert_file else "http"
        return (self.public_url or f"{scheme}://{self.host}:{self.port}").rstrip("/")

    @property
    def proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(p) for p in self.trusted_proxies)

    @property
    def dev_kek_file(self) -> Path:
        return self.data_dir / "kek"

    @property
    def audit_archive_path(self) -> Path:
        return (self.audit_archive_dir or self.data_dir / "audit-archive").expanduser()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("yaml_file"):
            sources.append(YamlConfigSettingsSource(settings_cls))
        return tuple(sources)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings; ``overrides`` are command-line flags (None means 'not given')."""
    cls: type[Settings] = Settings
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigurationError(f"config file {config_file} does not exist")

        class FileSettings(Settings):
            model_config = SettingsConfigDict(yaml_file=config_file)

        cls = FileSettings
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise ConfigurationError(_one_line(exc)) from None


def _one_line(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        parts = []
        for e in errors():
            loc = field_path(e.get("loc", ())) or "settings"
            parts.append(f"{loc}: {e.get('msg')}")
        return "invalid settings: " + "; ".join(parts)
    return f"invalid settings: {exc}"
