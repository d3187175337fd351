"""``credgate serve --workers N``: one parent, N worker processes serving one socket.

The parent binds the socket, holds the SQLite store's lock (no other ``credgate serve``
may serve the file; its workers may), runs the migrations and the first-run set-up
(signing and audit keys, the bootstrap admin token) once, then forks N workers (the
parent has closed everything it opened by then: no thread, no connection is inherited,
only the imported code and the socket; a fork starts in a fraction of a second where a
fresh interpreter took seconds on a loaded machine). Each worker builds its own app and
runtime on the shared socket; the kernel spreads connections among them.

- Workers are replicas of one another: on PostgreSQL the change feed (LISTEN/NOTIFY)
  keeps their caches right and the reaper's leadership row picks one leader; on SQLite
  the change log is polled (gateway/store/changes.py: a change is seen by every worker
  within ``STALE_BOUND_SECONDS``) and the reaper leads by a file lock.
- Per worker: caches, rate limits (a client may get N times the per-address rate),
  /metrics (the scrape is answered by one worker: ``credgate_process{worker,pid}`` says
  which), the TLS context and its file watcher, the audit checkpoint timer, the KEK.
  PostgreSQL pools: each worker gets ceil(database_pool_size / N).
- Worker 0 alone serves the loopback health listener (``health_listen``).
- Signals to the parent: SIGTERM/SIGINT stop every worker (graceful, then killed past
  GRACEFUL_SECONDS + 5); SIGHUP is forwarded (each worker reloads its TLS files). A
  worker that dies is started again (after a second if it died young); one that fails
  while the serve is starting stops the serve (exit 3). A worker whose parent is gone stops.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from multiprocessing.connection import wait
from collections.abc import Callable
from typing import Any

log = logging.getLogger("credgate")


def worker_count(settings: Any) -> int:
    """``workers`` if set, else the CPUs this process may run on; 1 for an in-memory SQLite store."""
    from sqlalchemy.engine import make_url

    url = make_url(settings.store_url)
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        return 1
    if settings.workers is not None:
        return settings.workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _prepare(settings: Any, workers: int) -> None:
    """Migrations and first-run set-up, once, before any worker starts."""
    import asyncio

    from gateway.runtime import Runtime

    async def run() -> None:
        rt = await Runtime.start(settings, workers=workers, prepare=True)
        await rt.aclose()

    asyncio.run(run())
    log.info("migrations and first-run set-up done (once, in pid %d)", os.getpid())


def supervise(settings: Any, n: int, run_worker: Callable[..., None], *, graceful: float) -> int:
    """Run ``n`` workers until SIGTERM/SIGINT; the exit status (0, or 3: start-up failed).

    ``run_worker(settings, index, n, sock, ready, parent)`` serves in a forked worker;
    ``graceful``: how long a worker drains at shutdown (then it is killed, 5 s later)."""
    import uvicorn

    from gateway.store.database import hold_sole_use

    lock = hold_sole_use(settings.store_url)  # held until this process ends: the workers' own
    _prepare(settings, n)
    sock = uvicorn.Config("gateway.web.app:create_app", host=settings.host, port=settings.port).bind_socket()
    ctx = multiprocessing.get_context("fork")
    procs: list[Any] = [None] * n
    born = [0.0] * n
    due = [0.0] * n  # when a dead worker is started again
    readies: list[Any] = [None] * n
    flags = {"stop": False, "hup": False}

    def start(i: int) -> None:
        readies[i] = ctx.Event()
        p = ctx.Process(target=_worker, name=f"credgate-worker-{i}",
                        args=(run_worker, settings, i, n, sock, readies[i], os.getpid()))
        p.start()
        procs[i], born[i] = p, time.monotonic()

    def on_stop(_sig: int, _frame: Any) -> None:
        flags["stop"] = True

    def on_hup(_sig: int, _frame: Any) -> None:
        flags["hup"] = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    status = 0
    log.info("starting %d workers (pid %d supervises)", n, os.getpid())
    for i in range(n):
        start(i)
    starting = True
    try:
        while not flags["stop"]:
            wait([p.sentinel for p in procs if p is not None], timeout=0.2)
            if flags["hup"]:
                flags["hup"] = False
                for p in procs:
                    if p is not None and p.is_alive():
                        os.kill(p.pid, signal.SIGHUP)
            now = time.monotonic()
            for i, p in enumerate(procs):
                if flags["stop"]:
                    break
                if p is not None and not p.is_alive():
                    p.join()
                    if starting and not readies[i].is_set():
                        log.error("worker %d failed to start (exit %s): stopping", i, p.exitcode)
                        flags["stop"], status = True, 3
                        break
                    log.warning("worker %d (pid %d) exited (%s); starting another", i, p.pid, p.exitcode)
                    procs[i], due[i] = None, now + (1.0 if now - born[i] < 1.0 else 0.0)
                elif p is None and now >= due[i] and not flags["stop"]:
                    start(i)
            if starting and all(r is not None and r.is_set() for r in readies):
                starting = False
                log.info("all %d workers serving", n)
    finally:
        _stop([p for p in procs if p is not None], graceful)
        sock.close()
        if lock is not None:
            os.close(lock)
    return status


def _worker(run_worker: Callable[..., None], *args: Any) -> None:
    """A forked worker's start: the parent's signal handlers undone, then ``run_worker``."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)  # uvicorn installs its own once serving
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until serving: then it reloads the TLS files
    run_worker(*args)


def _stop(procs: list[Any], graceful: float) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()  # SIGTERM: uvicorn's graceful shutdown
    deadline = time.monotonic() + graceful + 5
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            log.warning("worker pid %d did not stop in time: killed", p.pid)
            p.kill()
            p.join()
