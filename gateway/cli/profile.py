"""The profile ``credgate login`` keeps: the gateway token of one sign-in
(``$CREDGATE_PROFILE``, default ``~/.config/credgate/profile.json``, mode 0600), used by
client commands without ``--token``/``CREDGATE_TOKEN``, but only towards the gateway that
issued it."""

from __future__ import annotations

import json
import os
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gateway.cli.errors import LoginFailed, UsageProblem


def profile_path() -> Path:
    """``$CREDGATE_PROFILE``, else ``$XDG_CONFIG_HOME/credgate/profile.json`` (``~/.config`` by default)."""
    if os.environ.get("CREDGATE_PROFILE"):
        return Path(os.environ["CREDGATE_PROFILE"]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "credgate" / "profile.json"


def load_profile() -> dict[str, Any] | None:
    path = profile_path()
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageProblem(f"can't read the profile {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageProblem(f"the profile {path} is not valid JSON; `credgate logout` removes it") from None
    if not (isinstance(raw, dict) and isinstance(raw.get("addr"), str) and isinstance(raw.get("access_token"), str)):
        raise UsageProblem(f"the profile {path} is not a credgate profile; `credgate logout` removes it")
    return raw


def write_profile(data: dict[str, Any]) -> Path:
    """Atomically, created 0600 (its directory 0700 when we create it)."""
    path = profile_path()
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
        os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def profile_token(addr: str | None) -> tuple[str | None, str | None]:
    """The stored sign-in for ``addr`` (or for the profile's gateway when none is given)."""
    profile = load_profile()
    if profile is None:
        return addr, None
    target = (addr or profile["addr"]).rstrip("/")
    if target != profile["addr"].rstrip("/"):
        return addr, None  # never send a gateway's token to another server
    expires = profile.get("expires_at")
    if isinstance(expires, (int, float)) and expires <= time.time():
        when = datetime.fromtimestamp(expires, timezone.utc).isoformat(timespec="seconds")
        raise LoginFailed("login_expired", f"the sign-in to {target} expired at {when}; run `credgate login` again")
    return target, profile["access_token"]
