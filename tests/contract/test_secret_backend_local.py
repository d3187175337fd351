"""The SecretBackend contract (tests/contract/backend_suite.py) over the ``local`` backend type."""

from pathlib import Path

from gateway.plugins.registry import BACKEND_TYPES
from tests.contract.backend_suite import *  # noqa: F403 (the suite's tests and fixtures)
from tests.contract.backend_suite import KINDS, kinds

kind = kinds("local-sqlite", "local-postgres")


def test_every_registered_backend_type_runs_the_contract() -> None:
    """Each type in the registry has its module here, importing the whole suite."""
    assert {k.split("-")[0] for k in KINDS} == set(BACKEND_TYPES)
    here = Path(__file__).parent
    for name in BACKEND_TYPES:
        module = here / f"test_secret_backend_{name}.py"
        assert module.is_file() and "from tests.contract.backend_suite import *" in module.read_text(), module
