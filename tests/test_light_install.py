"""`pip install credgate` (no extras) is the client and the CLI, without the server
(issue 11, item 3).

Offline: the wheel is built from this checkout with the test venv's setuptools, and a fresh
venv sees exactly the base requirement closure (computed from the wheel's METADATA, without
extras, through the distributions installed here), exposed by a .pth file; the wheel is then
installed with --no-deps --no-index. No index, no network.
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SERVER_DISTS = {"fastapi", "starlette", "sqlalchemy", "uvicorn", "alembic"}
SERVER_MODULES = ("fastapi", "starlette", "sqlalchemy", "uvicorn", "alembic")


def wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as zf:
        (metadata,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        message = email.parser.Parser().parsestr(zf.read(metadata).decode())
    return [Requirement(r) for r in message.get_all("Requires-Dist") or []]


def wanted(req: Requirement, extras: set[str]) -> bool:
    """The requirement applies on this interpreter for these extras ('' = none asked for)."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": extra}) for extra in extras | {""})


def closure(requirements: list[Requirement]) -> dict[str, importlib.metadata.Distribution]:
    """Every distribution the requirements need here, recursively, through importlib.metadata."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = [(r, set()) for r in requirements if wanted(r, set())]
    while todo:
        req, _ = todo.pop()
        name = canonicalize_name(req.name)
        if name in found:
            continue
        dist = importlib.metadata.distribution(req.name)
        found[name] = dist
        for sub in dist.requires or []:
            sub_req = Requirement(sub)
            if wanted(sub_req, set(req.extras)):
                todo.append((sub_req, set()))
    return found


def top_level_entries(dist: importlib.metadata.Distribution) -> set[str]:
    """The names a distribution puts at the top of site-packages (packages, modules, its dist-info)."""
    entries = set()
    for f in dist.files or []:
        parts = Path(str(f)).parts
        if parts and parts[0] != ".." and not parts[0].endswith(".data") and parts[0] != "__pycache__":
            entries.add(parts[0])
    return entries


@pytest.fixture(scope="module")
def light(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, importlib.metadata.Distribution]]]:
    tmp = tmp_path_factory.mktemp("light")
    # Built from a copy of the sources: no build/ or egg-info left in the checkout, and none
    # of an earlier build's leftovers in the wheel.
    source = tmp / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("gateway", "backends", "connectors", "kms"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(wheels), str(source)], check=True, capture_output=True, timeout=300, cwd=tmp)
    (wheel,) = wheels.glob("credgate-*.whl")
    dists = closure(wheel_requirements(wheel))

    exposed = tmp / "exposed"
    exposed.mkdir()
    for dist in dists.values():
        for entry in top_level_entries(dist):
            source = Path(dist.locate_file(entry))
            if source.exists() and not (exposed / entry).exists():
                (exposed / entry).symlink_to(source)

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site,) = (venv / "lib").glob("python*/site-packages")
    (site / "credgate-light-closure.pth").write_text(f"{exposed}\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True, timeout=300, cwd=tmp)
    yield venv, dists


def run(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CREDGATE_", "PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=120, cwd=venv)


def test_the_base_closure_holds_no_server_package(light: tuple[Path, dict]) -> None:
    _, dists = light
    assert {"httpx", "pydantic", "typer", "pyyaml"} <= set(dists), sorted(dists)
    assert not set(dists) & SERVER_DISTS, sorted(set(dists) & SERVER_DISTS)


def test_the_server_packages_are_not_importable(light: tuple[Path, dict]) -> None:
    venv, _ = light
    for module in SERVER_MODULES:
        res = run(venv, str(venv / "bin" / "python"), "-c", f"import {module}")
        assert res.returncode == 1 and "ModuleNotFoundError" in res.stderr, (module, res.stderr)


def test_the_client_and_the_cli_work(light: tuple[Path, dict]) -> None:
    venv, _ = light
    python, credgate = str(venv / "bin" / "python"), str(venv / "bin" / "credgate")
    res = run(venv, python, "-c", "from gateway.client.http import Client; import gateway; print(gateway.__file__)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(str(venv)), res.stdout  # the installed wheel, not this checkout
    res = run(venv, credgate, "--help")
    assert res.returncode == 0 and "secret" in res.stdout and "--output" in res.stdout, res.stderr
    res = run(venv, credgate, "--version")
    assert res.returncode == 0 and res.stdout.startswith("credgate "), res.stderr
    # a client command runs: no gateway there, so it fails in one line, exit 1 (no ImportError)
    res = run(venv, credgate, "--addr", "http://127.0.0.1:9", "--token", "x", "backend", "list")
    assert res.returncode == 1 and res.stderr.startswith("credgate: can't reach the gateway"), res.stderr


def test_serve_says_to_install_the_server(light: tuple[Path, dict]) -> None:
    venv, _ = light
    for args in (["serve"], ["db", "upgrade"], ["keys", "generate", "--out", "kek"]):
        res = run(venv, str(venv / "bin" / "credgate"), *args)
        assert res.returncode == 2 and res.stderr.count("\n") == 1, (args, res.stderr)
        assert "pip install 'credgate[server]'" in res.stderr and "Traceback" not in res.stderr, res.stderr
