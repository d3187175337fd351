from __future__ import annotations

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
