"""The one explicit registry of plugin types: every module that can touch
long-lived secret material or issue a credential is named here.

Modules are imported lazily, so a missing optional SDK is a clear
configuration error for the type that needs it, not an import failure at
start-up.
"""

from __future__ import annotations

import importlib
from typing import Any

from gateway.errors import BadRequest

# type name -> ("module:Class", pip extra that brings its SDK or None)
BACKEND_TYPES: dict[str, tuple[str, str | None]] = {
    "local": ("backends.local:LocalBackend", None),
    "vault": ("backends.vault:VaultBackend", "vault"),  # HashiCorp Vault / OpenBao, KV v2
    "aws": ("backends.aws:AWSSecretsManagerBackend", "aws"),  # AWS Secrets Manager
    "gcp": ("backends.gcp:GCPSecretManagerBackend", "gcp"),  # GCP Secret Manager
    "azure": ("backends.azure:AzureKeyVaultBackend", "azure"),  # Azure Key Vault secrets
}

CONNECTOR_TYPES: dict[str, tuple[str, str | None]] = {
    "postgres": ("connectors.postgres:PostgresConnector", "postgres"),
    "mysql": ("connectors.mysql:MySQLConnector", "mysql"),
    "redis": ("connectors.redis:RedisConnector", "redis"),
    "aws": ("connectors.aws:AWSConnector", "aws"),
    "gcp": ("connectors.gcp:GCPConnector", "gcp"),  # OAuth2 access tokens, GCS-downscoped
    "azure": ("connectors.azure:AzureConnector", "azure"),  # Entra tokens, user-delegation SAS
    "static": ("connectors.static:StaticConnector", None),
    "registry": ("connectors.registry:RegistryConnector", "aws"),  # ECR needs boto3; token auth only cryptography/joserfc
    "kubernetes": ("connectors.kubernetes:KubernetesConnector", None),  # httpx only (a base dependency)
    "vault": ("connectors.vault:VaultConnector", "vault"),  # a Vault/OpenBao dynamic secrets engine's creds
}


# KEK sources held by a KMS (CREDGATE_KEK_SOURCE); `file` and `env` are gateway.crypto.keyring's own.
KEK_SOURCES: dict[str, tuple[str, str | None]] = {
    "aws-kms": ("kms.aws:AwsKmsSource", "aws"),  # a customer-managed AWS KMS key
    "vault-transit": ("kms.vault_transit:VaultTransitSource", "vault"),  # a Vault/OpenBao transit key
}


def _load(kind: str, table: dict[str, tuple[str, str | None]], type_name: str) -> Any:
    try:
        target, extra = table[type_name]
    except KeyError:
        known = ", ".join(sorted(table)) or "none"
        raise BadRequest(
            f"Unknown {kind} type {type_name!r}; known types: {known}.", code=f"unknown_{kind}_type"
        ) from None
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f" Install it with: pip install 'credgate[{extra}]'." if extra else ""
        raise BadRequest(
            f"The {kind} type {type_name!r} needs a package that is not installed ({exc.name}).{hint}",
            code="missing_dependency",
        ) from None
    return getattr(module, attr)


def backend_class(type_name: str) -> Any:
    return _load("backend", BACKEND_TYPES, type_name)


def connector_class(type_name: str) -> Any:
    return _load("connector", CONNECTOR_TYPES, type_name)


def kek_source_class(type_name: str) -> Any:
    return _load("kek_source", KEK_SOURCES, type_name)
