"""The SecretBackend contract (tests/contract/backend_suite.py) over the ``aws`` backend type."""

from tests.contract.backend_suite import *  # noqa: F403 (the suite's tests and fixtures)
from tests.contract.backend_suite import kinds

kind = kinds("aws")
