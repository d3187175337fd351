"""``docker-credential-credgate``: a Docker credential helper (the docker-credential-helpers
protocol) that answers ``get`` with a short-lived credential from credgate.

Actions (the first argument; input on stdin, output on stdout):

- ``get``: stdin holds a server URL (``registry.example.com`` or ``https://host/v2/``);
  prints ``{"ServerURL": ..., "Username": ..., "Secret": ...}`` from the connector/resource
  the URL's host maps to. The credential's ``username`` (or ``user``) is the Username and
  its ``password`` (or ``token``, ``secret``) the Secret. An unmapped host prints
  ``credentials not found in native keychain`` (the protocol's not-found message) and exits 1,
  so Docker falls back to anonymous access.
- ``list``: prints the mapped hosts as ``{"host": ""}`` (no username: none is issued to list).
- ``store``: refused (exit 1, the reason on stdout, as the protocol reports errors): credgate
  hands out short-lived credentials, it keeps none that ``docker login`` gives it.
- ``erase``: accepted, does nothing (nothing was stored); exit 0.
- ``version``: prints the version.

The map, host -> CONNECTOR:RESOURCE, comes from ``CREDGATE_DOCKER_REGISTRIES``
(``host=connector:resource`` pairs separated by commas or whitespace) or else from the JSON
file ``CREDGATE_DOCKER_CONFIG`` (default ``~/.config/credgate/docker-registries.json``):
``{"registries.example.com": "registry:pull"}``. The gateway and token are credgate's own:
``CREDGATE_ADDR``, ``CREDGATE_TOKEN`` or the token ``credgate login`` kept.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

NOT_FOUND = "credentials not found in native keychain"
MISSING_URL = "no credentials server URL"
DEFAULT_CONFIG = "~/.config/credgate/docker-registries.json"


class HelperError(Exception):
    """Reported on stdout with exit code 1 (the protocol's error channel)."""


def host_of(server_url: str) -> str:
    """``https://Reg.Example.com:5000/v2/`` and ``reg.example.com:5000`` -> ``reg.example.com:5000``."""
    text = server_url.strip()
    if "://" not in text:
        text = "//" + text
    return urlsplit(text).netloc.lower()


def registries() -> dict[str, tuple[str, str]]:
    """host -> (connector, resource), from the environment or the config file."""
    raw: dict[str, Any]
    pairs = os.environ.get("CREDGATE_DOCKER_REGISTRIES")
    if pairs is not None:
        raw = {}
        for item in pairs.replace(",", " ").split():
            host, sep, target = item.partition("=")
            if not sep:
                raise HelperError(f"CREDGATE_DOCKER_REGISTRIES: {item!r} is not host=connector:resource")
            raw[host] = target
    else:
        path = Path(os.environ.get("CREDGATE_DOCKER_CONFIG") or DEFAULT_CONFIG).expanduser()
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise HelperError(f"can't read {path}: {type(exc).__name__}") from None
        if not isinstance(raw, dict):
            raise HelperError(f"{path} must hold a JSON object of host to connector:resource")
    out = {}
    for host, target in raw.items():
        connector, sep, resource = str(target).partition(":")
        if not sep or not connector or not resource:
            raise HelperError(f"registry {host}: {target!r} is not connector:resource")
        out[host_of(str(host))] = (connector, resource)
    return out


def credential(connector: str, resource: str) -> dict[str, Any]:
    """Issue (wrapped and unwrapped at once for a wrap-only connector) one credential."""
    from gateway.cli.common import client
    from gateway.cli.cred import unwrapped
    from gateway.client.errors import RequestFailed

    body = {"connector": connector, "resource": resource}
    with client() as c:
        try:
            return c.request("POST", "/v1/credentials", json=body)
        except RequestFailed as exc:
            if exc.code != "wrap_required":
                raise
            out = c.request("POST", "/v1/credentials", json={**body, "wrap": True})
    return unwrapped(out["wrap_token"])


def get(server_url: str) -> dict[str, str]:
    if not server_url.strip():
        raise HelperError(MISSING_URL)
    target = registries().get(host_of(server_url))
    if target is None:
        raise HelperError(NOT_FOUND)
    cred = credential(*target).get("credential") or {}
    username = cred.get("username") or cred.get("user")
    secret = cred.get("password") or cred.get("token") or cred.get("secret")
    if not username or not secret:
        raise HelperError(f"the credential of {target[0]} has no username and password (or token)")
    return {"ServerURL": server_url.strip(), "Username": username, "Secret": secret}


def _fail(message: str) -> NoReturn:
    sys.stdout.write(message + "\n")
    sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    from gateway.cli.errors import UsageProblem
    from gateway.client.errors import GatewayUnreachable, RequestFailed

    action = args[0] if len(args) == 1 else ""
    try:
        if action == "get":
            sys.stdout.write(json.dumps(get(sys.stdin.read())) + "\n")
        elif action == "list":
            sys.stdout.write(json.dumps({host: "" for host in registries()}) + "\n")
        elif action == "store":
            sys.stdin.read()
            raise HelperError("credgate does not store registry credentials: it issues short-lived ones "
                              "(map the registry in CREDGATE_DOCKER_REGISTRIES instead of docker login)")
        elif action == "erase":
            sys.stdin.read()  # nothing was stored: nothing to erase
        elif action == "version":
            from importlib.metadata import PackageNotFoundError, version

            try:
                sys.stdout.write(f"docker-credential-credgate credgate {version('credgate')}\n")
            except PackageNotFoundError:  # pragma: no cover - source tree
                sys.stdout.write("docker-credential-credgate (not installed)\n")
        else:
            sys.stderr.write("usage: docker-credential-credgate get|list|store|erase|version (input on stdin)\n")
            sys.exit(2)
    except HelperError as exc:
        _fail(str(exc))
    except RequestFailed as exc:
        _fail(f"credgate: {exc.code}: {exc.message}")
    except (GatewayUnreachable, UsageProblem) as exc:
        _fail(str(exc))


if __name__ == "__main__":
    main()
