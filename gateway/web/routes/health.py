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


@router.get("/readyz", summary="The store is reachable and the KEK is loaded")
async def readyz(runtime: RuntimeDep) -> JSONResponse:
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
    if reasons:
        body = {
            "status": "not_ready",
            "checks": checks,
            "error": {"code": "not_ready", "message": "Not ready: " + "; ".join(reasons) + "."},
        }
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ready", "checks": checks})
