from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi import Request, Response
from fastapi.responses import JSONResponse

from gateway.web.deps import RuntimeDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request, runtime: RuntimeDep) -> Response:
    m = request.app.state.metrics
    await m.refresh(runtime)
    body, content_type = m.render()
    return Response(body, media_type=content_type)


def backend_statuses(runtime, request: Request) -> dict[str, dict[str, object]]:
    """Each backend started on this replica, by its own ``status()`` (no I/O), with the last
    ``POST /v1/backends/NAME/check`` this replica answered, if any: reported, never a reason to
    be unready (the other backends still serve; a store that is down answers 503
    ``backend_unavailable`` on its own requests)."""
    checks = getattr(request.app.state, "backend_checks", None) or {}
    out: dict[str, dict[str, object]] = {}
    for name, backend in sorted(runtime.mounts.live().items()):
        h = backend.status()
        out[name] = {"ok": h.ok, "problem": h.problem, "message": h.message}
        if name in checks:
            last, at = checks[name]
            out[name]["last_check"] = {"ok": last.ok, "problem": last.problem, "checked_at": at.isoformat()}
    return out


@router.get("/readyz", summary="The store is reachable and the KEK is loaded (backends are reported, not required)")
async def readyz(request: Request, runtime: RuntimeDep) -> JSONResponse:
    checks: dict[str, str] = {}
    reasons = []
    try:
        await runtime.store.ping()
        checks["store"] = "ok"
    except Exception as exc:
        checks["store"] = "unreachable"
        reasons.append(f"store unreachable ({type(exc).__name__})")
    try:
        runtime.keyring.current_version
        checks["kek"] = "ok"
    except Exception:
        checks["kek"] = "not loaded"
        reasons.append("KEK not loaded")
    if runtime.audit.healthy:
        checks["audit"] = "ok"
    else:
        failing = [n for n, h in runtime.audit.health.items() if not h.ok]
        checks["audit"] = "unavailable"
        reasons.append("audit sink unavailable: " + ", ".join(failing))
    backends = backend_statuses(runtime, request)
    if reasons:
        body = {
            "status": "not_ready",
            "checks": checks,
            "backends": backends,
            "error": {"code": "not_ready", "message": "Not ready: " + "; ".join(reasons) + "."},
        }
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ready", "checks": checks, "backends": backends})


class HealthListener:
    """``health_listen``: plain HTTP on a loopback address answering ``GET`` of
    ``/healthz`` and ``/readyz`` only, through the gateway's own app (the same answer,
    status and body, as over the main listener), for a probe without a client certificate
    (the kubelet under ``tls_require_client_cert``; docs/tls.md). Anything else is a 404,
    one request per connection, a request head of at most 8 KiB read within 5 s."""

    PATHS = ("/healthz", "/readyz")
    _HEAD_LIMIT = 8192
    _READ_SECONDS = 5.0
    _ANSWER_SECONDS = 10.0

    def __init__(self, app, host: str, port: int, state: dict | None = None) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.state = state if state is not None else {}
        self._server = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=self._HEAD_LIMIT)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader, writer) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._READ_SECONDS)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
                return
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            if method != "GET":
                status, headers, body = 405, [(b"allow", b"GET")], b""
            elif path not in self.PATHS:
                status, headers, body = 404, [], b""
            else:
                try:
                    status, headers, body = await asyncio.wait_for(self._ask(method, path, writer), self._ANSWER_SECONDS)
                except asyncio.TimeoutError:
                    status, headers, body = 503, [], b""
            lines = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}".encode()]
            for name, value in headers:
                if name.lower() not in (b"content-length", b"connection"):
                    lines.append(name + b": " + value)
            lines += [b"content-length: %d" % len(body), b"connection: close", b"", b""]
            writer.write(b"\r\n".join(lines) + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _ask(self, method: str, path: str, writer) -> tuple[int, list, bytes]:
        peer = writer.get_extra_info("peername") or ("127.0.0.1", 0)
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": [(b"host", f"{self.host}:{self.port}".encode())],
            "client": (peer[0], peer[1]), "server": (self.host, self.port), "state": dict(self.state),
        }
        start: dict = {}
        body = bytearray()

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))

        await self.app(scope, receive, send)
        return start.get("status", 500), list(start.get("headers", [])), bytes(body)


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 429: "Too Many Requests", 500: "Internal Server Error",
            503: "Service Unavailable"}
