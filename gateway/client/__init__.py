"""The Python client of the gateway's API (httpx), used by the CLI and by pipelines.

Part of the light base install (``pip install credgate``): imports nothing of the server.
"""
