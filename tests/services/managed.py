"""The lifecycle shared by every throwaway service the tests start."""

from __future__ import annotations

import atexit
from types import TracebackType
from typing import Self


class ManagedService:
    """A service with ``start()``/``stop()``, usable as a context manager, and
    stopped at interpreter exit if a test forgot to."""

    _atexit_registered = False

    def start(self) -> Self:  # pragma: no cover - abstract
        raise NotImplementedError

    def stop(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _guard_exit(self) -> None:
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True

    def _release_exit_guard(self) -> None:
        if self._atexit_registered:
            atexit.unregister(self.stop)
            self._atexit_registered = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
