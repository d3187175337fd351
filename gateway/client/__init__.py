"""The Python client of the gateway's API (httpx), used by the CLI and by pipelines.

Part of the light base install (``pip install credgate``): imports nothing of the server.
"""

# The public API, imported on first use (gateway.client.errors stays importable without httpx):
# from gateway.client import Client, AsyncClient, Credential, CredgateError
_API = {
    "Client": "gateway.client.sdk", "AsyncClient": "gateway.client.sdk", "RunToken": "gateway.client.sdk",
    "Credential": "gateway.client.credentials", "PostgresCredential": "gateway.client.credentials",
    "MySQLCredential": "gateway.client.credentials", "RedisCredential": "gateway.client.credentials",
    "AWSCredential": "gateway.client.credentials", "StaticCredential": "gateway.client.credentials",
    "StaticToken": "gateway.client.auth", "ClientCredentials": "gateway.client.auth", "TokenFile": "gateway.client.auth",
    "CredgateError": "gateway.client.errors", "RequestFailed": "gateway.client.errors",
    "GatewayUnreachable": "gateway.client.errors", "BadRequest": "gateway.client.errors",
    "Unauthenticated": "gateway.client.errors", "PermissionDenied": "gateway.client.errors",
    "NotFound": "gateway.client.errors", "Conflict": "gateway.client.errors", "Gone": "gateway.client.errors",
    "RateLimited": "gateway.client.errors", "Unavailable": "gateway.client.errors",
    "install_sqlalchemy_refresh": "gateway.client.helpers",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'gateway.client' has no attribute {name!r}")
