"""Container health check for credgate (the image has python, not curl).

    python healthcheck.py [PATH]      # PATH: /healthz (default) or /readyz

GETs PATH on the gateway in this container and exits 0 on a 200, 1 otherwise, with
one line on stderr saying why. With CREDGATE_HEALTH_LISTEN set (the gateway's
plain-HTTP loopback health listener, docs/tls.md) the URL is http://THAT/PATH: no
TLS and no client certificate, so it works under tls_require_client_cert too.
Otherwise it is built from CREDGATE_PORT (default 8765) and, when
CREDGATE_TLS_CERT_FILE is set, https (the certificate is not verified: the peer
is this container's own process on the loopback). HEALTHCHECK_URL overrides it whole,
e.g. when TLS is configured by flags or a config file instead of the environment.
Proxy variables are ignored. Writes nothing to disk.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request

TIMEOUT_SECONDS = 4.0


def probe_url(path: str, environ: os._Environ[str] | dict[str, str]) -> str:
    if environ.get("HEALTHCHECK_URL"):
        return environ["HEALTHCHECK_URL"]
    if environ.get("CREDGATE_HEALTH_LISTEN", "").strip():
        return f"http://{environ['CREDGATE_HEALTH_LISTEN'].strip()}{path}"
    scheme = "https" if environ.get("CREDGATE_TLS_CERT_FILE") else "http"
    port = int(environ.get("CREDGATE_PORT") or 8765)
    return f"{scheme}://127.0.0.1:{port}{path}"


def check(url: str) -> tuple[bool, str]:
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if url.startswith("https:"):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # loopback to our own process; see the docstring
        handlers.append(urllib.request.HTTPSHandler(context=ctx))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=TIMEOUT_SECONDS) as resp:
            return resp.status == 200, f"{url}: {resp.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: {exc.code}"
    except (OSError, ValueError) as exc:
        return False, f"{url}: {type(exc).__name__}: {exc}"


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/healthz"
    ok, why = check(probe_url(path, os.environ))
    if not ok:
        print(f"unhealthy: {why}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
