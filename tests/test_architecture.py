"""The architecture is checked, not described: pyproject's import-linter contracts
(layers, a light client, plugins below the services, vendor SDKs inside their plugin,
a pure error tree, no cycles) pass on this tree, and an upward import breaks them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (the test extra has it)")


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # this tree's packages before the editable install's
    return subprocess.run([str(LINT), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=300)


def copy_tree(tmp_path: Path) -> Path:
    for name in ("gateway", "backends", "connectors", "kms"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_every_contract_is_kept() -> None:
    res = lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


@pytest.mark.parametrize(("module", "line", "broken"), [
    # the store reaching up into the web layer (inside a function: lazy imports count)
    ("gateway/store/database.py", "def _upward():\n    from gateway.web import app  # noqa\n", "gateway.store.database -> gateway.web.app"),
    # the client pulling in the server
    ("gateway/client/http.py", "import sqlalchemy  # noqa\n", "gateway.client.http -> sqlalchemy"),
    # a connector importing the issuing service
    ("connectors/static.py", "from gateway.issuing import service  # noqa\n", "connectors.static -> gateway.issuing.service"),
    # a service importing a vendor SDK directly
    ("gateway/issuing/service.py", "import psycopg  # noqa\n", "gateway.issuing.service -> psycopg"),
    # the error tree importing the web framework
    ("gateway/errors.py", "import fastapi  # noqa\n", "gateway.errors -> fastapi"),
])
def test_an_import_against_the_architecture_breaks_a_contract(tmp_path: Path, module: str, line: str, broken: str) -> None:
    tree = copy_tree(tmp_path)
    with (tree / module).open("a") as f:
        f.write("\n\n" + line)
    res = lint(tree)
    assert res.returncode != 0, res.stdout
    assert broken in res.stdout, res.stdout
