"""Moving secrets between backends, through the gateway's API: ``credgate secret migrate``
and ``credgate connector repoint``.

Migrate copies every live secret under ``--from BACKEND[/PREFIX]`` to the same relative
path under ``--to BACKEND[/PREFIX]`` (a prefix is a folder: ``local/app`` means the
secrets under ``app/``). Everything goes through the API, so the gateway authorises and
audits each step: the caller needs ``secrets:read`` + ``secrets:reveal`` on the source,
and ``secrets:read`` + ``secrets:reveal`` + ``secrets:write`` on the destination (the
destination is read before a write, to compare, and after it, to verify). The source is
never written to or deleted from.

Idempotent by comparison, so an interrupted run (Ctrl-C, SIGTERM, SIGKILL, a crash) is
resumed by running the same command again, and nothing depends on the report file:

- latest version only (default): the destination's current value is read first; if it
  already equals the source's current value the secret is skipped, otherwise the value is
  written (with ``cas`` = the destination's current version when the backend supports
  check-and-set, so a concurrent writer or an ambiguous retry can't add a second copy)
  and read back to verify.
- ``--all-versions``: the source's readable versions ``s1..sn`` (in order) are compared
  with the destination's history; the largest ``k`` such that the destination's last
  ``k`` versions equal ``s1..sk`` says what is already there, and ``s(k+1)..sn`` are
  appended in order, each with ``cas`` and read back. A crash between a write and its
  record leaves the destination ending in ``s1..s(k+1)``: the next run finds ``k+1``.
  Versions the source destroyed are skipped and reported.

A failure of one secret (413 ``value_too_large``, 409 ``not_supported``, 403 on one path,
a value that does not read back equal) is recorded and the run continues; a 401, or a 403
before any secret succeeded (the caller lacks the right everywhere), stops it with that
error. 429 and 503 are retried with backoff; a write whose answer was lost is never
retried blindly: the secret is compared again from the start.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cli.errors import UsageProblem
from gateway.client.errors import GatewayUnreachable, RequestFailed
from gateway.client.urls import seg

if TYPE_CHECKING:
    from gateway.client.http import Client

TRANSIENT = (429, 503, 504)  # 502 (the store answered and failed) is that secret's own error
DELETED = "deleted"  # a soft-deleted secret: a write restores it after its last version
RETRIES = 5


@dataclass(frozen=True)
class Location:
    """``BACKEND[/PREFIX]``: a backend and a folder in it (``""`` or ending in ``/``)."""

    backend: str
    prefix: str

    def path(self, rel: str) -> str:
        return self.prefix + rel

    def ref(self, rel: str) -> str:
        return f"{self.backend}/{self.prefix}{rel}"

    def __str__(self) -> str:
        return f"{self.backend}/{self.prefix}"

    def holds(self, ref: str) -> str | None:
        """The path of ``ref`` (``BACKEND/PATH``) relative to this folder, or None if outside it."""
        backend, _, path = ref.partition("/")
        if backend != self.backend or not path.startswith(self.prefix) or path == self.prefix:
            return None
        return path[len(self.prefix):]


def parse_location(text: str, option: str) -> Location:
    from gateway import paths
    from gateway.errors import BadRequest

    backend, _, prefix = text.partition("/")
    prefix = prefix.rstrip("/") if prefix.strip("/") else ""
    try:
        paths.backend_name(backend)
        if prefix:
            paths.secret_path(prefix)
    except BadRequest as exc:
        raise UsageProblem(f"{option}: {exc.message} (expected BACKEND[/PREFIX], e.g. local/app)") from None
    return Location(backend, prefix + "/" if prefix else "")


def check_apart(src: Location, dst: Location) -> None:
    if src.backend == dst.backend and (src.prefix.startswith(dst.prefix) or dst.prefix.startswith(src.prefix)):
        raise UsageProblem(f"--from {src} and --to {dst} overlap; the destination must lie outside the source")


# --- talking to the gateway -------------------------------------------------------------


class Stopped(Exception):
    """The run is stopping (Ctrl-C, SIGTERM, or a fatal error elsewhere)."""


class Fatal(Exception):
    """An error that stops the whole run: 401; 403 before anything succeeded; the gateway
    unreachable, or a backend still unavailable (503) or rate limiting (429) after retries
    (the run is resumed later by running it again)."""

    def __init__(self, error: RequestFailed | GatewayUnreachable) -> None:
        super().__init__(str(error))
        self.error = error


class Replan(Exception):
    """Compare this secret again from the start (a write's answer was lost, or cas moved)."""

    def __init__(self, cause: RequestFailed | GatewayUnreachable | None = None) -> None:
        super().__init__()
        self.cause = cause


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, GatewayUnreachable) or (isinstance(exc, RequestFailed) and exc.status in TRANSIENT)


class Api:
    """The calls a migration makes, one client per thread, with retries on 429/503 for reads."""

    def __init__(self, addr: str, token: str | None, stop: threading.Event) -> None:
        self.addr, self.token, self.stop = addr, token, stop
        self._local = threading.local()
        self._clients: list[Client] = []
        self._lock = threading.Lock()

    @property
    def c(self) -> Client:
        c = getattr(self._local, "client", None)
        if c is None:
            from gateway.client.http import Client

            c = self._local.client = Client(self.addr, self.token or "")
            with self._lock:
                self._clients.append(c)
        return c

    def close(self) -> None:
        for c in self._clients:
            c.close()

    def _pause(self, attempt: int) -> None:
        if self.stop.wait(min(0.2 * 2**attempt, 5.0)):
            raise Stopped()

    def read(self, call: Callable[[], Any]) -> Any:
        for attempt in range(RETRIES):
            if self.stop.is_set():
                raise Stopped()
            try:
                return call()
            except (RequestFailed, GatewayUnreachable) as exc:
                if not _is_transient(exc) or attempt == RETRIES - 1:
                    raise
            self._pause(attempt)
        raise AssertionError("unreachable")

    def secret(self, loc: Location, path: str, *, reveal: bool, version: int | None = None) -> Any:
        """The secret as the API shows it; None if absent, :data:`DELETED` if soft-deleted."""
        try:
            return self.read(lambda: self.c.get(
                f"/v1/secrets/{seg(loc.backend)}/{seg(path)}", reveal=reveal or None, version=version))
        except RequestFailed as exc:
            if exc.code == "secret_not_found":
                return None
            if exc.code == "secret_deleted":
                return DELETED
            raise

    def put(self, loc: Location, path: str, data: dict[str, str], cas: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {"data": data}
        if cas is not None:
            body["cas"] = cas
        if self.stop.is_set():
            raise Stopped()
        try:
            return self.c.request("PUT", f"/v1/secrets/{seg(loc.backend)}/{seg(path)}", json=body)
        except (RequestFailed, GatewayUnreachable) as exc:
            if _is_transient(exc):
                raise Replan(exc) from None  # it may have been written: compare again, never write blindly
            if isinstance(exc, RequestFailed) and exc.code == "cas_mismatch":
                raise Replan() from None
            raise

    def list_all(self, loc: Location) -> list[str]:
        """Every live secret's path under the folder, relative to it, in lexical order."""
        found: list[str] = []
        token = None
        while True:
            page = self.read(lambda: self.c.get(
                f"/v1/secrets/{seg(loc.backend)}", prefix=loc.prefix or None, page_token=token, limit=1000))
            found.extend(p[len(loc.prefix):] for p in page["items"] if p.startswith(loc.prefix) and p != loc.prefix)
            token = page["next_page_token"]
            if not token:
                return found

    def backend(self, name: str) -> dict[str, Any]:
        try:
            return self.read(lambda: self.c.get(f"/v1/backends/{seg(name)}"))
        except RequestFailed as exc:
            if exc.code == "backend_not_found":
                raise UsageProblem(f"there is no backend {name!r} (see `credgate backend list`)") from None
            raise


# --- one secret ---------------------------------------------------------------------------


@dataclass
class Outcome:
    source: str
    destination: str
    status: str = "not_done"  # copied | skipped | failed | would_copy | would_skip | not_done
    versions_copied: list[int] = field(default_factory=list)  # source versions written (or to write, dry run)
    versions_skipped: list[int] = field(default_factory=list)  # source versions already at the destination
    versions_unavailable: list[int] = field(default_factory=list)  # destroyed at the source
    destination_versions: list[int] = field(default_factory=list)  # the versions the writes created
    verified: bool = False
    error: dict[str, str] | None = None

    def fail(self, code: str, message: str) -> None:
        self.status, self.error, self.verified = "failed", {"code": code, "message": message}, False


@dataclass(frozen=True)
class Options:
    src: Location
    dst: Location
    all_versions: bool
    dry_run: bool
    cas: bool  # the destination supports check-and-set
    dst_versions: bool  # the destination keeps versions (a written version can be read back by number)


class Migrator:
    """Copies one secret at a time (safe to call from many threads).

    ``present``: the destination paths (relative) listed as live before the run. A secret
    not among them is written without reading the destination first, with ``cas=0`` where
    the backend supports it, so one that appeared since (or was soft-deleted) makes the
    write fail with ``cas_mismatch`` and is compared in full. Without check-and-set the
    destination is always read first."""

    def __init__(self, api: Api, opts: Options, present: set[str] | None = None) -> None:
        self.api, self.o = api, opts
        self.present = present if opts.cas else None

    def _absent(self, rel: str, attempt: int) -> bool:
        return attempt == 0 and self.present is not None and rel not in self.present

    def run(self, rel: str) -> Outcome:
        from gateway import paths
        from gateway.errors import BadRequest

        out = Outcome(self.o.src.ref(rel), self.o.dst.ref(rel))
        try:
            paths.secret_path(self.o.dst.path(rel))
        except BadRequest as exc:
            out.fail(exc.code, exc.message)
            return out
        cause: RequestFailed | GatewayUnreachable | None = None
        tried: set[int] = set()  # source versions whose write was sent (its answer may have been lost)
        for attempt in range(RETRIES):
            out = Outcome(out.source, out.destination)
            try:
                (self._all if self.o.all_versions else self._latest)(rel, out, self._absent(rel, attempt), tried)
                return self._credit(out, tried)
            except Replan as replan:
                cause = replan.cause
                try:
                    self.api._pause(attempt)
                except Stopped:
                    return out
            except Stopped:
                return out  # not_done (or partly done: the next run compares again)
            except RequestFailed as exc:
                if exc.status == 401 or _is_transient(exc):  # transient: still failing after RETRIES
                    raise Fatal(exc) from None
                out.fail(exc.code, exc.message)
                return out
            except GatewayUnreachable as exc:
                raise Fatal(exc) from None
        if cause is not None and _is_transient(cause):
            raise Fatal(cause)
        out.fail("kept_changing", "The destination changed under every attempt to write it (another writer?); "
                 "run again.")
        return out

    @staticmethod
    def _credit(out: Outcome, tried: set[int]) -> Outcome:
        """A version found already there that an earlier attempt of this run sent (its answer
        lost) was copied by this run: report it so."""
        landed = [v for v in out.versions_skipped if v in tried]
        if landed:
            out.versions_skipped = [v for v in out.versions_skipped if v not in tried]
            out.versions_copied = sorted(out.versions_copied + landed)
            if out.status == "skipped":
                out.status = "copied"
        return out

    def _latest(self, rel: str, out: Outcome, absent: bool, tried: set[int]) -> None:
        src = self.api.secret(self.o.src, self.o.src.path(rel), reveal=True)
        if not isinstance(src, dict):
            raise RequestFailed(404, "secret_not_found", f"Secret {out.source} no longer exists.")
        dst = None if absent else self.api.secret(self.o.dst, self.o.dst.path(rel), reveal=True)
        if isinstance(dst, dict) and dst["data"] == src["data"]:
            out.status, out.versions_skipped, out.verified = ("would_skip" if self.o.dry_run else "skipped"), [src["version"]], True
            return
        out.versions_copied = [src["version"]]
        if self.o.dry_run:
            out.status = "would_copy"
            return
        self._write(rel, src["version"], src["data"], self._cas(dst), out, tried)
        out.status, out.verified = "copied", True

    def _cas(self, dst: Any) -> int | None:
        """What a write must find at the destination: its current version, 0 (nothing), or
        None (no check: the backend can't, or the secret is soft-deleted and its last version
        is not readable)."""
        if not self.o.cas or dst == DELETED:
            return None
        return dst["current_version"] if isinstance(dst, dict) else 0

    def _write(self, rel: str, source_version: int, data: dict[str, str], cas: int | None, out: Outcome,
               tried: set[int]) -> int:
        path = self.o.dst.path(rel)
        tried.add(source_version)
        written = self.api.put(self.o.dst, path, data, cas)
        version = written["version"]
        back = self.api.secret(self.o.dst, path, reveal=True, version=version if self.o.dst_versions else None)
        if not isinstance(back, dict) or back["data"] != data:
            raise RequestFailed(0, "verify_mismatch", f"{out.destination} version {version} does not read back equal.")
        out.destination_versions.append(version)
        return version

    def _all(self, rel: str, out: Outcome, absent: bool, tried: set[int]) -> None:
        src_path, dst_path = self.o.src.path(rel), self.o.dst.path(rel)
        meta = self.api.secret(self.o.src, src_path, reveal=False)
        if not isinstance(meta, dict):
            raise RequestFailed(404, "secret_not_found", f"Secret {out.source} no longer exists.")
        source: list[tuple[int, dict[str, str]]] = []
        for v in sorted(x["version"] for x in meta["versions"]):
            try:
                got = self.api.secret(self.o.src, src_path, reveal=True, version=v)
            except RequestFailed as exc:
                if exc.code != "version_not_found":
                    raise
                got = None
            if not isinstance(got, dict):
                out.versions_unavailable.append(v)
            else:
                source.append((v, got["data"]))
        if not source:
            raise RequestFailed(404, "version_not_found", f"Secret {out.source} has no readable version.")
        dmeta = None if absent else self.api.secret(self.o.dst, dst_path, reveal=False)
        history = sorted(x["version"] for x in dmeta["versions"]) if isinstance(dmeta, dict) else []
        tail: list[dict[str, str] | None] = []
        for v in history[-len(source):]:
            try:
                got = self.api.secret(self.o.dst, dst_path, reveal=True, version=v)
            except RequestFailed as exc:
                if exc.code != "version_not_found":
                    raise
                got = None
            tail.append(got["data"] if isinstance(got, dict) else None)
        k = next(k for k in range(min(len(tail), len(source)), -1, -1)
                 if tail[len(tail) - k:] == [d for _, d in source[:k]])
        out.versions_skipped = [v for v, _ in source[:k]]
        out.versions_copied = [v for v, _ in source[k:]]
        if self.o.dry_run:
            out.status, out.verified = ("would_copy" if out.versions_copied else "would_skip"), not out.versions_copied
            return
        if not out.versions_copied:
            out.status, out.verified = "skipped", True
            return
        cas = self._cas(dmeta)
        copied = out.versions_copied
        out.versions_copied = []
        for v, data in source[k:]:
            if self.api.stop.is_set():
                raise Stopped()
            version = self._write(rel, v, data, cas, out, tried)
            out.versions_copied.append(v)
            cas = version if self.o.cas else None
        assert out.versions_copied == copied
        out.status, out.verified = "copied", True


# --- progress -------------------------------------------------------------------------------


class Progress:
    """Count, rate and what is left: a rich bar on a terminal, plain lines on stderr otherwise."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.what = total, what
        self.done = 0
        self.counts: dict[str, int] = {}
        self.started = time.monotonic()
        self._last_line = (0.0, 0)
        self._bar: Any = None
        if sys.stderr.isatty() and total:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[counts]}"),
                            TimeRemainingColumn(), console=Console(stderr=True), transient=False)
            self._task = self._bar.add_task(what, total=total, rate="", counts="")
            self._bar.start()

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def summary(self) -> str:
        return ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(self.counts.items()))

    def advance(self, status: str) -> None:
        self.done += 1
        self.counts[status] = self.counts.get(status, 0) + 1
        if self._bar is not None:
            self._bar.update(self._task, advance=1, rate=f"{self.rate():.1f}/s", counts=self.summary())
            return
        now = time.monotonic()
        last_at, last_done = self._last_line
        if self.done == self.total or now - last_at >= 5 or self.done - last_done >= max(1, self.total // 10):
            self._last_line = (now, self.done)
            self.line()

    def line(self) -> None:
        left = self.total - self.done
        rate = self.rate()
        eta = f", about {left / rate:.0f} s to go" if rate and left else ""
        sys.stderr.write(f"{self.what}: {self.done}/{self.total} done ({self.summary()}), "
                         f"{rate:.1f}/s, {left} left{eta}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# --- the report -----------------------------------------------------------------------------


def default_report_path() -> Path:
    return Path.cwd() / time.strftime("credgate-migrate-%Y%m%dT%H%M%SZ.json", time.gmtime())


class Report:
    """The JSON report, rewritten in place (atomically) as the run goes, so a run that is
    killed leaves what it had recorded. Only a record: resuming never reads it."""

    def __init__(self, path: Path, head: dict[str, Any]) -> None:
        self.path, self.head = path, head
        self.outcomes: dict[str, Outcome] = {}
        self._written = 0.0

    def totals(self) -> dict[str, int]:
        totals: dict[str, int] = {"secrets": len(self.outcomes)}
        for o in self.outcomes.values():
            totals[o.status] = totals.get(o.status, 0) + 1
            totals["verified"] = totals.get("verified", 0) + (1 if o.verified else 0)
            totals["versions_copied"] = totals.get("versions_copied", 0) + len(o.versions_copied)
        return totals

    def write(self, **extra: Any) -> None:
        body = {**self.head, **extra, "totals": self.totals(),
                "secrets": [asdict(o) for o in sorted(self.outcomes.values(), key=lambda o: o.source)]}
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=1)
        os.replace(tmp, self.path)
        self._written = time.monotonic()

    def maybe_write(self, **extra: Any) -> None:
        if time.monotonic() - self._written >= 2.0:
            self.write(**extra)


# --- the run --------------------------------------------------------------------------------


@dataclass
class Result:
    report: Report
    interrupted: bool = False
    fatal: RequestFailed | GatewayUnreachable | None = None


def _stopping_on_sigterm() -> Callable[[], None]:
    """SIGTERM stops the run like Ctrl-C (the report is written); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt()

    previous = signal.signal(signal.SIGTERM, on_term)
    return lambda: signal.signal(signal.SIGTERM, previous)


def migrate(api: Api, opts: Options, rels: list[str], report: Report, concurrency: int,
            present: set[str] | None = None) -> Result:
    migrator = Migrator(api, opts, present)
    for rel in rels:
        report.outcomes[rel] = Outcome(opts.src.ref(rel), opts.dst.ref(rel))
    result = Result(report)
    progress = Progress(len(rels), "dry run" if opts.dry_run else "migrate")
    succeeded = 0

    def settle(rel: str, outcome: Outcome) -> None:
        nonlocal succeeded
        report.outcomes[rel] = outcome
        if outcome.status != "failed" and outcome.status != "not_done":
            succeeded += 1
        elif outcome.error and outcome.error["code"] == "permission_denied" and not succeeded:
            # Refused before anything worked: the caller lacks the right everywhere, say it once.
            result.fatal = RequestFailed(403, outcome.error["code"], outcome.error["message"])
            api.stop.set()
        progress.advance(outcome.status)
        report.maybe_write(complete=False, interrupted=False)

    undo = _stopping_on_sigterm()
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="migrate")
    pending: dict[Future[Outcome], str] = {}
    try:
        it: Iterator[str] = iter(rels)
        first = next(it, None)
        if first is not None:  # one secret alone first: a refusal everywhere shows up once, cleanly
            try:
                settle(first, migrator.run(first))
            except Fatal as exc:
                result.fatal = exc.error
        while not api.stop.is_set():
            while len(pending) < concurrency * 2:
                rel = next(it, None)
                if rel is None:
                    break
                pending[pool.submit(migrator.run, rel)] = rel
            if not pending:
                break
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for f in done:
                rel = pending.pop(f)
                try:
                    settle(rel, f.result())
                except Fatal as exc:
                    result.fatal = exc.error
                    api.stop.set()
    except KeyboardInterrupt:
        result.interrupted = True
        api.stop.set()
        sys.stderr.write("credgate: stopping: finishing the secrets in flight (Ctrl-C again to quit at once)\n")
    try:
        for f in list(pending):
            f.cancel()
        for f, rel in list(pending.items()):
            if not f.cancelled():
                try:
                    settle(rel, f.result())
                except Fatal as exc:
                    result.fatal = exc.error
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        undo()
        progress.close()
        api.close()
    report.write(complete=not (result.interrupted or result.fatal), interrupted=result.interrupted)
    return result


# --- connectors -------------------------------------------------------------------------------


def repoint(c: Client, src: Location, dst: Location, dry_run: bool) -> list[dict[str, Any]]:
    """Every connector whose secret lies under ``src``, bound to the same relative path under
    ``dst`` through ``PUT /v1/connectors/NAME`` (the gateway decides: ``connectors:manage`` on
    the connector, ``secrets:bind`` on the new secret, and the new secret must hold what the
    connector needs). One entry per connector: name, from, to, status, error."""
    results: list[dict[str, Any]] = []
    for row in c.get("/v1/connectors")["items"]:
        rel = src.holds(row["secret"]) if row.get("secret") else None  # keyless: no secret to move
        if rel is None:
            continue
        entry: dict[str, Any] = {"connector": row["name"], "from": row["secret"], "to": dst.ref(rel), "error": None}
        if dry_run:
            entry["status"] = "would_repoint"
        else:
            body = {k: row[k] for k in ("type", "auth_method", "config", "resources", "default_ttl_seconds", "max_ttl_seconds")}
            body["secret"] = dst.ref(rel)
            try:
                c.request("PUT", f"/v1/connectors/{seg(row['name'])}", json=body)
                entry["status"] = "repointed"
            except RequestFailed as exc:
                if exc.status == 401:
                    raise
                entry["status"], entry["error"] = "failed", {"code": exc.code, "message": exc.message}
        results.append(entry)
    return results
