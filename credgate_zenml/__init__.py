"""credgate inside ZenML (issue 13 item 4).

- :mod:`credgate_zenml.secrets_store`: a ZenML custom secrets store that keeps every ZenML
  secret's values in credgate (docs/zenml.md says how to configure a ZenML server with it).

Imports ZenML and credgate's light client (``gateway.client``) only, never the gateway's
server packages: a ZenML server needs ``pip install credgate zenml[server]``, not credgate's
server. Not written yet: the ``credgate`` service connector type (4b) and the run-token flow (4c).
"""
