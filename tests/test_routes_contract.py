"""Routes call services; no route builds a query: pyproject's ``routes-call-services``
contract refuses a route that imports the store's models or SQLAlchemy (issue 11, item 1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_architecture import LINT, copy_tree, lint

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (the test extra has it)")


@pytest.mark.parametrize(("line", "broken"), [
    ("from gateway.store.models import PolicyRow  # noqa\n", "gateway.web.routes.policies -> gateway.store.models"),
    ("def _query():\n    from sqlalchemy import select  # noqa\n", "gateway.web.routes.policies -> sqlalchemy"),
])
def test_a_route_building_a_query_breaks_the_contract(tmp_path: Path, line: str, broken: str) -> None:
    tree = copy_tree(tmp_path)
    with (tree / "gateway/web/routes/policies.py").open("a") as f:
        f.write("\n\n" + line)
    res = lint(tree)
    assert res.returncode != 0, res.stdout
    assert "Routes call services; no route builds a query" in res.stdout and broken in res.stdout, res.stdout
