"""Validation of the names callers put in URLs: backend names and secret paths."""

from __future__ import annotations

import re

from gateway.errors import BadRequest

BACKEND_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_PATH = 512
MAX_SEGMENTS = 32


def backend_name(name: str) -> str:
    if not BACKEND_NAME.match(name):
        raise BadRequest(
            "A backend name is 1-63 characters of a-z, 0-9, '_' and '-', starting with a letter.",
            code="invalid_backend_name",
        )
    return name


def secret_path(path: str, *, allow_empty: bool = False) -> str:
    """A path is segments of ``[A-Za-z0-9._-]`` joined by ``/``; ``.``/``..`` and empty segments are refused.

    The message never quotes the path: a caller may paste a value into it by mistake.
    """
    if path == "" and allow_empty:
        return path
    if not path:
        raise BadRequest("The secret path is empty.", code="invalid_path")
    if len(path) > MAX_PATH:
        raise BadRequest(f"The secret path is longer than {MAX_PATH} characters.", code="invalid_path")
    segments = path.split("/")
    if len(segments) > MAX_SEGMENTS:
        raise BadRequest(f"The secret path has more than {MAX_SEGMENTS} segments.", code="invalid_path")
    for seg in segments:
        if seg == "":
            raise BadRequest("The secret path has an empty segment (leading, trailing or doubled '/').", code="invalid_path")
        if seg in (".", ".."):
            raise BadRequest("The secret path may not contain '.' or '..' segments.", code="invalid_path")
        if not _SEGMENT.match(seg):
            raise BadRequest(
                "A secret path segment may only contain A-Z, a-z, 0-9, '.', '_' and '-'.", code="invalid_path"
            )
    return path


def secret_prefix(prefix: str) -> str:
    """A listing prefix: a path, optionally ending in '/', or a partial last segment."""
    if prefix == "":
        return prefix
    body = prefix[:-1] if prefix.endswith("/") else prefix
    secret_path(body)
    return prefix


CLIENT_ID = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")  # an OAuth2 client id credgate issues
