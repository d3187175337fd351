"""credgate inside ZenML (issue 13 item 4).

- :mod:`credgate_zenml.secrets_store`: a ZenML custom secrets store that keeps every ZenML
  secret's values in credgate (4a).
- :mod:`credgate_zenml.service_connector`: the ZenML service connector type ``credgate`` (4b):
  it holds a credgate OAuth2 client (or token) on the ZenML server, hands clients a connector
  holding a credgate run token minted for their pipeline run (4c), and issues short-lived
  credentials with it: a boto3 session or S3 client for credgate's ``aws`` connectors, a
  psycopg connection for its ``postgres`` connectors.
- :func:`zenml_init_hook`: the ``zenml.init_hooks`` entry point that makes ZenML (server and
  clients) know the ``credgate`` type.

docs/zenml.md says how to configure a ZenML server with them. They import ZenML and credgate's
light client (``gateway.client``) only, never the gateway's server packages: a ZenML server
needs ``pip install credgate zenml[server]``, not credgate's server.
"""


def zenml_init_hook() -> None:
    """Register the ``credgate`` service connector type with ZenML.

    ZenML calls it (entry point group ``zenml.init_hooks``) while ``import zenml`` is under way;
    this package imports nothing of ZenML at the top, so importing the connector module first
    (which imports ZenML, which calls this) works too."""
    import credgate_zenml.service_connector  # noqa: F401  (defining the class registers it)
