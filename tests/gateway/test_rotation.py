"""KEK rotation: adds a version, re-wraps every data key while serving, resumes, retires."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from gateway.web.app import create_app
from gateway.errors import ConfigurationError
from gateway.crypto.keyring import LocalKeyRing, format_key, new_key_file
from gateway.store.models import BackendRow, SecretVersionRow
from tests.conftest import ADMIN_TOKEN, Gateway


async def kek_versions_in_use(gw: Gateway) -> set[int]:
    async with gw.runtime.store.read() as s:
        a = set((await s.execute(select(SecretVersionRow.kek_version))).scalars())
        b = set((await s.execute(select(BackendRow.kek_version).where(BackendRow.kek_version.is_not(None)))).scalars())
    return a | b


async def fill(gw: Gateway, n: int) -> dict[str, str]:
    expected = {}
    for i in range(n):
        path = f"rot/{i:04d}"
        r = await gw.client.put(f"/v1/secrets/local/{path}", json={"data": {"v": f"value-{i}"}})
        assert r.status_code == 200
        expected[path] = f"value-{i}"
    await gw.client.put("/v1/backends/extra", json={"type": "local"})
    return expected


async def test_rotate_while_serving(gateway: Gateway, kek_file: Path) -> None:
    expected = await fill(gateway, 120)
    gateway.runtime.keys._batch = 7  # many small batches, so reads interleave with them
    assert await kek_versions_in_use(gateway) == {1}

    stop = asyncio.Event()
    failures: list[str] = []
    reads = 0

    async def reader() -> None:
        nonlocal reads
        paths = list(expected)
        while not stop.is_set():
            path = paths[reads % len(paths)]
            r = await gateway.client.get(f"/v1/secrets/local/{path}", params={"reveal": "true"})
            if r.status_code != 200 or r.json()["data"]["v"] != expected[path]:
                failures.append(r.text)
            w = await gateway.client.put(f"/v1/secrets/local/live/{reads}", json={"data": {"v": "w"}})
            if w.status_code != 200:
                failures.append(w.text)
            reads += 1

    readers = [asyncio.create_task(reader()) for _ in range(3)]
    await asyncio.sleep(0.05)
    r = await gateway.client.post("/v1/keys/rotate")
    assert r.status_code == 202 and r.json()["current_version"] == 2
    await gateway.runtime.keys.wait()
    stop.set()
    await asyncio.gather(*readers)

    assert failures == [] and reads > 0
    assert await kek_versions_in_use(gateway) == {2}
    status = (await gateway.client.get("/v1/keys/status")).json()
    states = {v["version"]: (v["state"], v["references"]) for v in status["versions"]}
    assert states[1] == ("retired", 0) and states[2][0] == "current" and status["rewrap_pending"] == 0
    assert LocalKeyRing(path=kek_file).versions() == [1, 2]
    for path, value in list(expected.items())[::17]:
        got = (await gateway.client.get(f"/v1/secrets/local/{path}", params={"reveal": "true"})).json()
        assert got["data"]["v"] == value


async def test_after_rotation_the_old_version_is_not_needed(kek_file: Path, settings_factory) -> None:
    first = create_app(settings_factory())
    async with first.router.lifespan_context(first):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=first), base_url="http://gateway",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
            gateway = Gateway(first, client)
            expected = await fill(gateway, 5)
            await gateway.client.post("/v1/keys/rotate")
            await gateway.runtime.keys.wait()
    # Restart with version 1 dropped from the KEK source entirely: everything must still open.
    only_v2 = [line for line in kek_file.read_text().splitlines() if line.startswith("2:")]
    app = create_app(settings_factory(kek_file=None, kek="\n".join(only_v2)))
    async with app.router.lifespan_context(app):
        backend = await app.state.runtime.mounts.get("local")
        for path, value in expected.items():
            assert (await backend.get(path)).data == {"v": value}


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_interrupted_rewrap_resumes_at_start(settings_factory, kek_file: Path) -> None:
    settings = settings_factory()
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        rt = app.state.runtime
        backend = await rt.mounts.get("local")
        for i in range(30):
            await backend.put(f"r/{i}", {"v": str(i)}, author="test")
        # Simulate a crash mid-rotation: a new version is current, only one batch re-wrapped.
        rt.keyring.add_version()
        await rt.keys.sync()
        rt.keys._batch = 10
        assert await rt.keys._rewrap_batch() == 10
        assert (await rt.keys.status()).rewrap_pending == 22  # 20 secrets, the signing key, the audit key
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        rt = app.state.runtime
        await rt.keys.wait()  # start-up resumed it by itself
        status = await rt.keys.status()
        assert status.rewrap_pending == 0 and status.current_version == 2
        backend = await rt.mounts.get("local")
        assert (await backend.get("r/29")).data == {"v": "29"}


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_rotation_with_a_read_only_kek_says_what_to_do(settings_factory, kek_file: Path) -> None:
    import httpx

    from tests.conftest import ADMIN_TOKEN

    app = create_app(settings_factory(kek_file=None, kek=kek_file.read_text()))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://g", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as c:
            r = await c.post("/v1/keys/rotate")
            assert r.status_code == 409 and r.json()["error"]["code"] == "kek_read_only"
            assert "higher N" in r.json()["error"]["message"]


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_a_different_kek_is_refused_at_start(settings_factory, tmp_path: Path) -> None:
    app = create_app(settings_factory())
    async with app.router.lifespan_context(app):
        await (await app.state.runtime.mounts.get("local")).put("x", {"k": "v"}, author="t")
    other = tmp_path / "other-kek"
    new_key_file(other)
    app = create_app(settings_factory(kek_file=other))
    with pytest.raises(ConfigurationError, match="fingerprint mismatch"):
        async with app.router.lifespan_context(app):
            pass


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_a_kek_missing_a_referenced_version_is_refused(settings_factory, kek_file: Path) -> None:
    app = create_app(settings_factory())
    async with app.router.lifespan_context(app):
        await (await app.state.runtime.mounts.get("local")).put("x", {"k": "v"}, author="t")
    lone = format_key(5, b"5" * 32)
    app = create_app(settings_factory(kek_file=None, kek=lone))
    with pytest.raises(ConfigurationError, match=r"KEK version\(s\) \[1\]"):
        async with app.router.lifespan_context(app):
            pass


async def test_rotation_needs_permission(gateway: Gateway) -> None:
    token = (await gateway.client.post("/v1/admin-keys", json={"name": "aud", "role": "auditor"})).json()["token"]
    async with gateway.as_token(token) as aud:
        assert (await aud.get("/v1/keys/status")).status_code == 200
        assert (await aud.post("/v1/keys/rotate")).status_code == 403
    assert (await gateway.client.get("/v1/keys/status")).json()["current_version"] == 1
