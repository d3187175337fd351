"""What every command group shares: the global options, the client, reading the
command line's input (KEY=VALUE pairs, JSON files, durations, BACKEND/PATH) and the
usage error (exit 2).

Light on purpose: no httpx, pydantic or server import at module level, so that
``credgate --help`` starts fast; the client is imported when a command runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from gateway.cli.errors import UsageProblem

if TYPE_CHECKING:
    from gateway.client.http import Client

__all__ = ["GLOBALS", "UsageProblem", "client", "group"]


OUTPUTS = ("table", "json", "yaml")


@dataclass
class Globals:
    """The global options (``--addr``, ``--token``, ``-o``/``--json``), set by the root callback."""

    addr: str | None = None
    token: str | None = None
    output: str = "table"


GLOBALS = Globals()


def client(*, anonymous: bool = False) -> Client:
    """A client for ``--addr`` with ``--token`` (flag, then CREDGATE_TOKEN); failing both,
    the token ``credgate login`` stored, if it was issued by that same gateway.
    ``anonymous``: no token at all (``unwrap``: the wrap token is the credential)."""
    from gateway.client.http import Client

    addr, token = GLOBALS.addr, GLOBALS.token
    if anonymous:
        return Client(addr, token="")
    if token is None:
        from gateway.cli.profile import profile_token

        addr, token = profile_token(addr)
    return Client(addr, token)


# The packages of `credgate[server]`: a command needing one of them says how to install it.
SERVER_PACKAGES = frozenset({
    "fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "aiosqlite", "pydantic_settings", "cryptography",
    "joserfc", "prometheus_client",
})


@contextmanager
def server_code(command: str) -> Iterator[None]:
    """Around the lazy imports of a server-side command: on the light install (no
    ``credgate[server]``) it fails in one line that says what to install."""
    try:
        yield
    except ImportError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in SERVER_PACKAGES:
            raise
        raise UsageProblem(
            f"`credgate {command}` runs the gateway, which this install lacks ({missing} is missing): "
            "pip install 'credgate[server]'"
        ) from None


def split_ref(ref: str, *, allow_bare_backend: bool = False) -> tuple[str, str]:
    """BACKEND/PATH (or BACKEND[/PREFIX] with ``allow_bare_backend``), checked as the gateway checks it."""
    from gateway import paths
    from gateway.errors import BadRequest

    backend, _, path = ref.partition("/")
    try:
        paths.backend_name(backend)
        if path or not allow_bare_backend:
            paths.secret_path(path) if not allow_bare_backend else paths.secret_prefix(path)
    except BadRequest as exc:
        raise UsageProblem(f"{exc.message} (expected BACKEND/PATH, e.g. local/app/db)") from None
    return backend, path


def parse_pairs(pairs: list[str], *, json_values: bool = False) -> dict[str, Any]:
    """KEY=VALUE pairs; KEY=@FILE reads a file. With ``json_values`` (settings, not
    secrets), a value starting with '[' or '{' is parsed as JSON."""
    data: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageProblem("each value must be KEY=VALUE (or KEY=@FILE to read the value from a file)")
        if value.startswith("@"):
            try:
                value = Path(value[1:]).read_text()
            except OSError as exc:
                raise UsageProblem(f"can't read {value[1:]}: {exc.strerror}") from None
        if json_values and value[:1] in ("[", "{"):
            try:
                data[key] = json.loads(value)
                continue
            except json.JSONDecodeError:
                raise UsageProblem(f"the value of {key} starts like JSON but is not valid JSON") from None
        data[key] = value
    return data


def read_json_file(path: Path) -> dict[str, Any]:
    """A JSON object of keys to values (``{"data": {...}}`` as ``secret get -o json`` prints it is unwrapped)."""
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise UsageProblem(f"can't read {path}: {exc.strerror}") from None
    except json.JSONDecodeError:
        raise UsageProblem(f"{path} is not valid JSON") from None
    if isinstance(raw, dict) and set(raw) == {"data"} and isinstance(raw["data"], dict):
        raw = raw["data"]
    if not isinstance(raw, dict):
        raise UsageProblem(f"{path} must hold a JSON object of string keys to string values")
    return raw


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise UsageProblem(f"can't read {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageProblem(f"{path} is not valid JSON") from None
    if not isinstance(raw, dict):
        raise UsageProblem(f"{path} must hold a JSON object ({what})")
    return raw


def key_values(pairs: list[str], option: str, example: str) -> list[tuple[str, str]]:
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UsageProblem(f"{option} takes KEY=VALUE, e.g. {option} {example}")
        out.append((key.strip(), value.strip()))
    return out


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | None) -> int | None:
    """'90', '90s', '15m', '1h', '2d' -> seconds."""
    if text is None:
        return None
    t = text.strip().lower()
    unit = _UNITS.get(t[-1:], None)
    number = t[:-1] if unit else t
    if not number.isdigit() or int(number) <= 0:
        raise UsageProblem(f"{text!r} is not a duration like 90s, 15m, 1h or 2d")
    return int(number) * (unit or 1)


def group(help: str) -> typer.Typer:
    """A command group (``credgate secret``...), formatted like the root: plain click help."""
    return typer.Typer(help=help, no_args_is_help=True, rich_markup_mode=None, add_completion=False,
                       pretty_exceptions_enable=False)
