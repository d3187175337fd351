"""The baseline: a bare FastAPI app with one JSON endpoint, served exactly like the
gateway (uvicorn, uvloop, httptools, one worker). Started by bench/run.py."""

from __future__ import annotations

from fastapi import FastAPI

app = FastAPI()


@app.get("/ping")
async def ping() -> dict[str, str]:
    return {"status": "ok"}
