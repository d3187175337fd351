"""Addresses of the gateway's API, without the transport (no httpx import)."""

from __future__ import annotations

from urllib.parse import quote

DEFAULT_ADDR = "http://127.0.0.1:8765"


def seg(value: str) -> str:
    """Quote a value for a URL path, keeping '/' between segments."""
    return quote(value, safe="/")
