"""A throwaway PostgreSQL cluster with scram-sha-256 password authentication.

The machine's shared server on 127.0.0.1:5432 uses trust authentication, so it
accepts any password and ignores ``VALID UNTIL``.  :class:`PgCluster` builds a
private cluster from the installed Debian binaries in which TCP connections
must present a correct, unexpired password::

    with PgCluster() as pg:
        psycopg.connect(pg.dsn())                    # superuser, right password
        psycopg.connect(pg.dsn(password="wrong"))    # OperationalError

Only TCP connections to 127.0.0.1 require a password; the Unix socket in the
private socket directory uses trust (only the cluster owner can reach it).
This module does not depend on pytest.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from .managed import ManagedService

__all__ = ["PgCluster", "find_pg_bin", "free_port"]

_PG_ROOT = Path("/usr/lib/postgresql")
_REQUIRED = ("initdb", "pg_ctl", "postgres")
_RUN_AS = "postgres"


def _version_key(path: Path) -> tuple[int, ...]:
    """Sort key for ``/usr/lib/postgresql/<version>`` directories (numeric, newest last)."""
    return tuple(int(part) for part in re.findall(r"\d+", path.name)) or (0,)


def find_pg_bin() -> Path:
    """Return the ``bin`` directory of the newest installed PostgreSQL.

    Looks in ``$CREDGATE_PG_BIN`` first, then ``/usr/lib/postgresql/*/bin``, then
    the directory of ``initdb`` on ``PATH``.  Raises :class:`RuntimeError`
    naming the missing binary when no directory holds ``initdb``, ``pg_ctl``
    and ``postgres``.
    """
    candidates: list[Path] = []
    override = os.environ.get("CREDGATE_PG_BIN")
    if override:
        candidates.append(Path(override))
    if _PG_ROOT.is_dir():
        versions = sorted((p for p in _PG_ROOT.iterdir() if p.is_dir()), key=_version_key, reverse=True)
        candidates.extend(v / "bin" for v in versions)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)

    missing = _REQUIRED[0]
    for directory in candidates:
        absent = [name for name in _REQUIRED if not os.access(directory / name, os.X_OK)]
        if not absent:
            return directory
        missing = absent[0]
    searched = ", ".join(str(c) for c in candidates) or f"{_PG_ROOT}/*/bin and PATH"
    raise RuntimeError(
        f"PostgreSQL binary {missing!r} not found (searched {searched}); "
        "install the Debian 'postgresql' package or set CREDGATE_PG_BIN"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class PgCluster(ManagedService):
    """A private PostgreSQL cluster on 127.0.0.1 with scram-sha-256 on TCP.

    Attributes:
        host: always ``"127.0.0.1"``.
        port: the TCP port (set by :meth:`start`).
        superuser: the superuser role name (``"postgres"``).
        password: the superuser's password (random unless given).
        base_dir: the temporary directory holding data, socket and log, or None.
    """

    host = "127.0.0.1"

    def __init__(self, superuser: str = "postgres", password: str | None = None, start_timeout: int = 30) -> None:
        self.superuser = superuser
        self.password = password if password is not None else secrets.token_urlsafe(18)
        self.port: int = 0
        self.start_timeout = start_timeout
        self.base_dir: Path | None = None
        self._bin: Path | None = None
        self._owner: pwd.struct_passwd | None = None

    # -- paths -------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self._base / "data"

    @property
    def socket_dir(self) -> Path:
        """The directory holding the server's Unix socket."""
        return self._base / "sock"

    @property
    def log_file(self) -> Path:
        """The server log written by ``pg_ctl -l``."""
        return self._base / "postgres.log"

    @property
    def running(self) -> bool:
        """Whether :meth:`start` succeeded and :meth:`stop` has not run yet."""
        return self.base_dir is not None and self.port != 0

    @property
    def _base(self) -> Path:
        if self.base_dir is None:
            raise RuntimeError("PgCluster is not started")
        return self.base_dir

    # -- helpers -----------------------------------------------------------

    def dsn(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        """A libpq URL ``postgresql://user:pw@127.0.0.1:port/db`` (TCP, so password auth applies).

        ``user`` defaults to the superuser; ``password`` defaults to the
        superuser's password when ``user`` is the superuser (or omitted), and is
        left out of the URL for other users unless given.
        """
        if not self.port:
            raise RuntimeError("PgCluster is not started")
        role = user if user is not None else self.superuser
        if password is None and role == self.superuser:
            password = self.password
        auth = quote(role, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def _owner_account(self) -> pwd.struct_passwd | None:
        """The account to run binaries as: ``postgres`` when we are root, else None (ourselves)."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(_RUN_AS)
        except KeyError:
            raise RuntimeError(
                f"running as root, and initdb refuses root, but there is no {_RUN_AS!r} user to run it as"
            ) from None

    def _command(self, *args: str) -> list[str]:
        """Prefix ``args`` with ``runuser -u postgres --`` when running as root."""
        if self._owner is None:
            return list(args)
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        if not os.access(runuser, os.X_OK):
            raise RuntimeError("running as root needs 'runuser' (util-linux) to start PostgreSQL as postgres")
        return [runuser, "-u", self._owner.pw_name, "--", *args]

    def _run(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL binary as the cluster owner; raise RuntimeError with its output on failure."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        proc = subprocess.run(
            self._command(*args),
            cwd=self._base,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            name = Path(args[0]).name
            raise RuntimeError(
                f"{name} failed with exit code {proc.returncode}:\n{proc.stdout}{proc.stderr}".rstrip()
            )
        return proc

    def _chown(self, path: Path) -> None:
        if self._owner is not None:
            os.chown(path, self._owner.pw_uid, self._owner.pw_gid)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> PgCluster:
        """Create the cluster and start the server; returns ``self``.

        Cleans up after itself if any step fails.
        """
        if self.base_dir is not None:
            raise RuntimeError("PgCluster already started")
        self._bin = find_pg_bin()
        self._owner = self._owner_account()
        self.base_dir = Path(tempfile.mkdtemp(prefix="credgate-pg-"))
        self._guard_exit()
        try:
            self._init()
            self._start_server()
        except BaseException:
            self.stop()
            raise
        return self

    def _init(self) -> None:
        """Run initdb with trust on the socket and scram-sha-256 on TCP."""
        base = self._base
        os.chmod(base, 0o700)
        self._chown(base)
        self.socket_dir.mkdir(mode=0o700)
        self._chown(self.socket_dir)
        pwfile = base / "pwfile"
        pwfile.write_text(self.password + "\n")
        os.chmod(pwfile, 0o600)
        self._chown(pwfile)
        try:
            self._run(
                str(self._bin / "initdb"),
                "-D", str(self.data_dir),
                "-U", self.superuser,
                f"--pwfile={pwfile}",
                "-A", "trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "-E", "UTF8",
                "--locale=C",
                timeout=120,
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def _start_server(self, attempts: int = 3) -> None:
        """Start the server on a free port, retrying if another process grabbed the port."""
        for attempt in range(attempts):
            port = free_port(self.host)
            options = (
                f"-c listen_addresses={self.host} -p {port} -k {self.socket_dir} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            try:
                self._run(
                    str(self._bin / "pg_ctl"),
                    "start", "-w",
                    "-t", str(self.start_timeout),
                    "-D", str(self.data_dir),
                    "-l", str(self.log_file),
                    "-o", options,
                    timeout=self.start_timeout + 15,
                )
            except RuntimeError as exc:
                log = self._log_tail()
                if attempt + 1 < attempts and "could not bind" in log:
                    continue
                raise RuntimeError(f"{exc}\n--- server log ---\n{log}") from None
            self.port = port
            return

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().splitlines()[0]
            return int(first)
        except (OSError, IndexError, ValueError):
            return None

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m immediate``) and remove the directory. Idempotent."""
        base = self.base_dir
        if base is None:
            return
        try:
            if (self.data_dir / "postmaster.pid").exists() and self._bin is not None:
                try:
                    self._run(
                        str(self._bin / "pg_ctl"), "stop", "-m", "immediate", "-w", "-D", str(self.data_dir),
                        timeout=30,
                    )
                except (RuntimeError, subprocess.TimeoutExpired, OSError):
                    pid = self._postmaster_pid()
                    if pid is not None:
                        try:
                            os.kill(pid, signal.SIGKILL)
                            time.sleep(0.2)
                        except ProcessLookupError:
                            pass
        finally:
            shutil.rmtree(base, ignore_errors=True)
            self.base_dir = None
            self.port = 0
            self._release_exit_guard()

    def __repr__(self) -> str:
        state = f"port={self.port}" if self.port else "stopped"
        return f"<PgCluster {state} dir={self.base_dir}>"
